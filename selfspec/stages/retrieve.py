"""`selfspec index` and `selfspec retrieve`, and the grounding of generation prompts in passages.

Building: corpus -> passages (stable ids) -> BM25 and/or embeddings (Ray Data
`map_batches` over encoder actors, longest passages first so batches pad little)
-> faiss -> files in `<run dir>/index/` with a manifest naming the corpus
fingerprint and the settings hash they were built from. A changed corpus or
setting is never used silently: `load_index` raises `StaleIndexError`, and
`ensure_index` (what generation and the CLI call) says why and rebuilds.

Serving: `PromptGrounder` sends each round's queries, batch by batch, to a pool of
retrieval actors that each load the index once (or to one in-process retriever),
and rebuilds every prompt with its top-k passages and their ids.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import sys
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from selfspec.config import ConfigError, RunConfig
from selfspec.io import RunDir, atomic_write_bytes, exists, read_bytes, read_json, run_dir_for, write_json
from selfspec.retrieval.corpus import corpus_fingerprint, make_passages, read_documents, resolve_corpus
from selfspec.retrieval.index import (
    Hit,
    Retriever,
    SearchSettings,
    build_bm25,
    build_faiss_index,
    components_for,
    encode,
    encoder_dtype,
    load_encoder,
    passage_text,
)
from selfspec.seeds import SeedSet, find_seed_file, load_seeds
from selfspec.stages.generate_instructions import build_prompt

INDEX_FORMAT = 1
# Appended to the domain description when retrieval.passage_as_input asks for passage-based tasks.
PASSAGE_AS_INPUT = " Each new task takes one of the numbered passages below, copied in full, as its input."


class StaleIndexError(ConfigError):
    """An index built from another corpus or other settings than the config names."""


# -- what an index is built from -----------------------------------------------------
def corpus_path(config: RunConfig) -> Path:
    """The corpus file or folder; unset means the builtin corpus of the seeds' domain."""
    domain = config.generate.domain or load_seeds(find_seed_file(config.generate.seeds[0])).domain
    return resolve_corpus(config.retrieval.corpus, domain)


def index_dir_for(config: RunConfig, run_dir: RunDir) -> str:
    return config.retrieval.index_dir or run_dir.path("index")


def index_spec(config: RunConfig) -> dict[str, Any]:
    """The settings that shape an index's contents (query-time knobs excluded)."""
    r = config.retrieval
    spec: dict[str, Any] = {
        "format": INDEX_FORMAT,
        "chunk_tokens": r.chunk_tokens,
        "chunk_overlap": r.chunk_overlap,
        "components": components_for(r.method),
    }
    if "dense" in spec["components"]:
        spec.update(encoder=r.encoder, encoder_dtype=r.encoder_dtype, index_type=r.index_type)
        spec.update({"ivf_nlist": r.ivf_nlist} if r.index_type == "ivf" else {})
        spec.update({"hnsw_m": r.hnsw_m} if r.index_type == "hnsw" else {})
    return spec


def spec_hash(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def search_settings(config: RunConfig) -> SearchSettings:
    r = config.retrieval
    return SearchSettings(
        method=r.method, fusion=r.fusion, rrf_k=r.rrf_k, dense_weight=r.dense_weight, fusion_depth=r.fusion_depth,
        ivf_nprobe=r.ivf_nprobe, hnsw_ef_search=r.hnsw_ef_search, query_batch_size=r.query_batch_size,
    )


# -- embeddings on Ray Data encoder actors -------------------------------------------
class PassageEncoder:
    """Callable class for `map_batches`: one encoder per actor, fed batches of passages."""

    def __init__(self, encoder: str, dtype: str, batch_size: int, num_threads: int | None = None):
        import torch

        if num_threads:
            torch.set_num_threads(num_threads)
        self.model = load_encoder(encoder, dtype)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        texts = [str(t) for t in batch["text"]]
        started = time.perf_counter()
        embedding = encode(self.model, texts, self.batch_size)
        # Each row carries its share of the batch's encode time, so the rows sum to it.
        seconds = np.full(len(texts), (time.perf_counter() - started) / max(len(texts), 1))
        return {"row": np.asarray(batch["row"]), "embedding": embedding, "encode_seconds": seconds}


def embed_passages(texts: list[str], config: RunConfig, dtype: str, executor: str = "ray") -> tuple[np.ndarray, float]:
    """Unit embeddings of `texts` in their order, computed by `encode_replicas` encoder actors,
    and the seconds the encoders spent encoding (summed over actors; no start-up or load)."""
    r = config.retrieval
    # Longest first: each batch holds texts of similar length, so little padding.
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    threads = max(1, math.floor(r.num_cpus_per_encoder)) if not r.num_gpus_per_encoder else None
    kwargs = {"encoder": r.encoder, "dtype": dtype, "batch_size": r.encode_batch_size, "num_threads": threads}
    batches = []
    if executor == "local":
        # In-process, torch keeps the caller's thread count.
        worker = PassageEncoder(**{**kwargs, "num_threads": None})
        for start in range(0, len(order), r.encode_batch_size):
            rows = order[start : start + r.encode_batch_size]
            batches.append(worker({"row": np.array(rows), "text": [texts[i] for i in rows]}))
    else:
        import ray

        dataset = ray.data.from_items([{"row": i, "text": texts[i]} for i in order])
        mapped = dataset.map_batches(
            PassageEncoder,
            fn_constructor_kwargs=kwargs,
            batch_size=r.encode_batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=r.encode_replicas),
            num_cpus=r.num_cpus_per_encoder,
            num_gpus=r.num_gpus_per_encoder,
        )
        batches = list(mapped.iter_batches(batch_size=None, batch_format="numpy"))
    out = None
    for batch in batches:
        out = np.empty((len(texts), batch["embedding"].shape[1]), dtype=np.float32) if out is None else out
        out[batch["row"]] = batch["embedding"]
    return out, float(sum(batch["encode_seconds"].sum() for batch in batches))


# -- build, check, load ---------------------------------------------------------------
def build_index(config: RunConfig, index_dir: str, executor: str = "ray") -> tuple[dict[str, Any], Retriever]:
    """Ingest the corpus, build the method's indexes and save them; returns (manifest, retriever)."""
    started = time.perf_counter()
    corpus = corpus_path(config)
    spec = index_spec(config)
    # Marks the folder unusable until the new manifest lands, should the build be killed midway.
    write_json(f"{index_dir}/manifest.json", {"format": INDEX_FORMAT, "complete": False})
    fingerprint = corpus_fingerprint(corpus)
    documents = read_documents(corpus)
    passages = make_passages(documents, config.retrieval.chunk_tokens, config.retrieval.chunk_overlap)
    if not passages:
        raise ConfigError(f"retrieval.corpus: {corpus} holds no text")
    texts = [passage_text(p) for p in passages]
    seconds: dict[str, float] = {"ingest": time.perf_counter() - started}
    bm25 = dense = None
    dtype = None
    if "bm25" in spec["components"]:
        t = time.perf_counter()
        bm25 = build_bm25(texts)
        seconds["bm25"] = time.perf_counter() - t
    if "dense" in spec["components"]:
        t = time.perf_counter()
        dtype = encoder_dtype(config.retrieval.encoder_dtype)
        embeddings, seconds["encode"] = embed_passages(texts, config, dtype, executor)
        seconds["embed"] = time.perf_counter() - t
        t = time.perf_counter()
        dense = build_faiss_index(embeddings, config.retrieval.index_type, config.retrieval.ivf_nlist, config.retrieval.hnsw_m)
        seconds["faiss"] = time.perf_counter() - t
    retriever = Retriever(
        passages, search_settings(config), bm25=bm25, dense=dense, encoder_ref=config.retrieval.encoder, encoder_dtype=dtype
    )
    files = retriever.to_files()
    for name, data in files.items():
        atomic_write_bytes(f"{index_dir}/{name}", data)
    seconds["total"] = time.perf_counter() - started
    manifest = {
        "format": INDEX_FORMAT,
        "complete": True,
        "corpus": str(corpus),
        "corpus_fingerprint": fingerprint,
        "spec": spec,
        "spec_hash": spec_hash(spec),
        "config_hash": config.section_hash("retrieval"),
        "encoder_dtype": dtype,
        "documents": len(documents),
        "passages": len(passages),
        "files": sorted(files),
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "passages_per_s": round(len(passages) / seconds["total"], 1),
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(f"{index_dir}/manifest.json", manifest)
    return manifest, retriever


def check_index(config: RunConfig, index_dir: str) -> dict[str, Any]:
    """The manifest of an index that matches the config and the corpus as it is now.

    Raises FileNotFoundError when there is no index, StaleIndexError when it was built
    from another corpus or other settings, or its build never finished.
    """
    path = f"{index_dir}/manifest.json"
    if not exists(path):
        raise FileNotFoundError(f"no index at {index_dir}; build it with `selfspec index`")
    manifest = read_json(path)
    if not manifest.get("complete"):
        raise StaleIndexError(f"index {index_dir} is incomplete (its build was interrupted); rebuild it with `selfspec index`")
    spec = index_spec(config)
    if manifest["spec_hash"] != spec_hash(spec):
        changed = sorted(k for k in spec.keys() | manifest["spec"].keys() if spec.get(k) != manifest["spec"].get(k))
        raise StaleIndexError(
            f"index {index_dir} was built with other retrieval settings ({', '.join(changed)} differ); "
            "rebuild it with `selfspec index`"
        )
    corpus = corpus_path(config)
    fingerprint = corpus_fingerprint(corpus)
    if manifest["corpus_fingerprint"] != fingerprint:
        raise StaleIndexError(
            f"index {index_dir} was built from corpus {manifest['corpus']} (fingerprint {manifest['corpus_fingerprint']}); "
            f"{corpus} now has fingerprint {fingerprint}: the corpus changed. Rebuild it with `selfspec index`"
        )
    return manifest


def read_index_files(index_dir: str, manifest: dict[str, Any]) -> dict[str, bytes]:
    return {name: read_bytes(f"{index_dir}/{name}") for name in manifest["files"]}


def retriever_from_files(files: dict[str, bytes], manifest: dict[str, Any], settings: SearchSettings) -> Retriever:
    return Retriever.from_files(files, settings, encoder_ref=manifest["spec"].get("encoder"), encoder_dtype=manifest["encoder_dtype"])


def load_index(config: RunConfig, index_dir: str) -> Retriever:
    """The saved index, checked against the config and the corpus (see `check_index`)."""
    manifest = check_index(config, index_dir)
    return retriever_from_files(read_index_files(index_dir, manifest), manifest, search_settings(config))


def ensure_index(config: RunConfig, run_dir: RunDir, executor: str = "ray") -> tuple[str, dict[str, Any], bool]:
    """(index dir, manifest, whether it was built now): reuse a matching index, else build it, saying why."""
    index_dir = index_dir_for(config, run_dir)
    try:
        return index_dir, check_index(config, index_dir), False
    except FileNotFoundError:
        print(f"building the retrieval index at {index_dir}", file=sys.stderr)
    except StaleIndexError as exc:
        print(f"rebuilding the retrieval index: {exc}", file=sys.stderr)
    manifest, _ = build_index(config, index_dir, executor)
    return index_dir, manifest, True


# -- serving queries -----------------------------------------------------------------
class RetrievalWorker:
    """One retrieval actor: loads the index once, then answers batches of queries."""

    def __init__(self, files: dict[str, bytes], manifest: dict[str, Any], settings: SearchSettings):
        self.retriever = retriever_from_files(files, manifest, settings)
        self.retriever.ready()

    def search(self, queries: list[str], k: int) -> list[list[Hit]]:
        return self.retriever.search(queries, k)


class RetrievalActorPool:
    """`replicas` Ray actors sharing one copy of the index files through the object store."""

    def __init__(self, files: dict[str, bytes], manifest: dict[str, Any], settings: SearchSettings, replicas: int, num_cpus: float):
        import ray

        files_ref = ray.put(files)
        actor = ray.remote(num_cpus=num_cpus)(RetrievalWorker)
        self.actors = [actor.remote(files_ref, manifest, settings) for _ in range(replicas)]
        self.batch_size = settings.query_batch_size

    def search(self, queries: list[str], k: int) -> list[list[Hit]]:
        import ray

        batches = [queries[i : i + self.batch_size] for i in range(0, len(queries), self.batch_size)]
        refs = [self.actors[n % len(self.actors)].search.remote(batch, k) for n, batch in enumerate(batches)]
        return [hits for batch in ray.get(refs) for hits in batch]


def seed_query(demos: list[dict[str, Any]]) -> str:
    """What a prompt's seeds are about: their instructions and inputs."""
    return " ".join(" ".join(f"{d['instruction']} {d['input']}".split()) for d in demos)


def render_passage(hit: Hit) -> str:
    text = " ".join(hit["text"].split())
    return f"{hit['title']}: {text}" if hit["title"] else text


# A passage-input row draws from the top_k passages not yet given to its type among this many
# times top_k hits of its query.
PASSAGE_SEARCH_DEPTH = 8


class PromptGrounder:
    """Puts the top-k passages for each prompt's seeds (or a fixed query) into the prompt."""

    def __init__(
        self,
        search: Callable[[list[str], int], list[list[Hit]]],
        top_k: int,
        query: str | None = None,
        passage_as_input: bool = False,
        excluded: Callable[[Hit], bool] | None = None,
        context_passages: int | None = None,
        written_input_tasks: Sequence[str] = (),
    ):
        self.search = search
        self.top_k = top_k
        self.query = query
        self.passage_as_input = passage_as_input
        self.context_passages = context_passages or top_k
        self.written_input_tasks = set(written_input_tasks)  # types whose inputs the model writes
        self.excluded = excluded  # e.g. passages that share n-grams with an evaluation task
        self.given: set[tuple[str, str]] = set()  # (passage id, task type) already used as an input
        self._verdicts: dict[str, bool] = {}

    @property
    def excluded_ids(self) -> set[str]:
        """Passages met in searches so far that `excluded` kept out."""
        return {i for i, out in self._verdicts.items() if out}

    def allowed(self, hits: list[Hit], k: int | None = None) -> list[Hit]:
        """The top `k` (default top_k) hits that `excluded` lets through; each verdict is computed once."""
        k = k or self.top_k
        if self.excluded is None:
            return hits[:k]
        for hit in hits:
            if hit["id"] not in self._verdicts:
                self._verdicts[hit["id"]] = self.excluded(hit)
        return [h for h in hits if not self._verdicts[h["id"]]][:k]

    @classmethod
    def from_config(cls, config: RunConfig, run_dir: RunDir, executor: str | None = None) -> "PromptGrounder":
        """Build or reuse the run's index; serve it from Ray actors when Ray is running."""
        if executor is None:
            import ray

            executor = "ray" if ray.is_initialized() else "local"
        index_dir, manifest, _ = ensure_index(config, run_dir, executor)
        files = read_index_files(index_dir, manifest)
        r = config.retrieval
        if executor == "local":
            retriever = retriever_from_files(files, manifest, search_settings(config))
            search = retriever.search
        else:
            search = RetrievalActorPool(files, manifest, search_settings(config), r.replicas, r.num_cpus_per_retriever).search
        return cls(
            search,
            r.top_k,
            r.query,
            r.passage_as_input,
            context_passages=r.context_passages,
            written_input_tasks=r.written_input_tasks,
        )

    def ground(self, prompts: list[dict[str, Any]], seeds: SeedSet) -> list[dict[str, Any]]:
        """Rows with `prompt` rebuilt around their retrieved passages and `passage_ids` set.

        With `passage_as_input`, a row of a task type whose seeds take an input gets one
        retrieved passage (drawn among the k best that this grounder has not given to that
        type yet, searching deeper than k for them; cut to about twice the seeds' input
        length) as its input, and the model writes only the instruction for it (and, where
        the seeds' inputs are labelled fields, the field after the passage, such as the
        question); types in `written_input_tasks` (inputs of a form no passage has, such as
        marked sentences) see the passages as context instead and the model writes their
        inputs."""
        from selfspec.quality import fit_passage, task_profiles

        by_id = {s["id"]: s for s in seeds.seeds}
        profiles = task_profiles(seeds.seeds)
        demos = [[by_id[i] for i in row["seed_ids"]] for row in prompts]
        queries = [self.query or seed_query(d) for d in demos]
        unique = sorted(set(queries))
        # With exclusions, search deeper so that k passages are usually left after them. Rows
        # that take a passage as input draw from a deeper ranking: queries repeat (one per
        # combination of demos), and their top k soon hold no passage new to a task type.
        depth = self.top_k if self.excluded is None else 3 * self.top_k
        ranked = dict(zip(unique, self.search(unique, depth * (PASSAGE_SEARCH_DEPTH if self.passage_as_input else 1))))
        hits = {q: self.allowed(h) for q, h in ranked.items()}
        # Demos shaped like an evaluation task's documents (yes/no demos, PubMedQA abstracts) can
        # lose every hit to the exclusions: search those queries 10x deeper.
        short = [q for q in unique if len(hits[q]) < self.top_k] if self.excluded is not None else []
        for q, h in zip(short, self.search(short, 10 * depth) if short else []):
            ranked[q], hits[q] = h, self.allowed(h)
        # hits[q] is deep[q]'s first top_k.
        deep = {q: self.allowed(h, PASSAGE_SEARCH_DEPTH * self.top_k) for q, h in ranked.items()} if self.passage_as_input else {}
        out = []
        for row, row_demos, query in zip(prompts, demos, queries):
            profile = profiles.get(row.get("task", ""))
            passage_input = profile and profile.input_words and row["task"] not in self.written_input_tasks
            if self.passage_as_input and passage_input and hits[query]:
                # The k best passages not yet given to this task type, when any are left: the
                # same passage under the same kind of task makes a near-duplicate.
                unused = [h for h in deep[query] if (h["id"], row["task"]) not in self.given]
                fresh = unused[: self.top_k] or hits[query]
                hit = random.Random(row["prompt_id"]).choice(fresh)
                self.given.add((hit["id"], row["task"]))
                passage = fit_passage(hit["text"], max(2 * profile.input_words, 40))
                # Seed inputs in labelled fields ("Abstract: ...", "Question: ..."): the passage
                # fills the first, and the model writes the second before its instruction.
                fields = profile.input_fields
                given = f"{fields[0]}: {passage}" if fields else passage
                open_field = fields[1] if fields else ""
                prompt = build_prompt(seeds.domain, seeds.description, row_demos, new_input=given, open_field=open_field)
                out.append({**row, "prompt": prompt, "passage_ids": [hit["id"]], "given_input": given, "open_field": open_field})
                continue
            description = seeds.description + (PASSAGE_AS_INPUT if self.passage_as_input else "")
            shown = hits[query][: self.context_passages] if self.passage_as_input else hits[query]
            passages = [render_passage(h) for h in shown]
            prompt = build_prompt(seeds.domain, description, row_demos, passages)
            out.append({**row, "prompt": prompt, "passage_ids": [h["id"] for h in shown]})
        return out


# -- commands ------------------------------------------------------------------------
def describe(manifest: dict[str, Any], index_dir: str) -> str:
    spec = manifest["spec"]
    parts = list(spec["components"])
    if "dense" in parts:
        parts[parts.index("dense")] = f"dense ({spec['index_type']}, {spec['encoder']}, {manifest['encoder_dtype']})"
    return (
        f"index: {index_dir}\n"
        f"corpus: {manifest['corpus']} ({manifest['documents']} documents -> {manifest['passages']} passages, "
        f"fingerprint {manifest['corpus_fingerprint']})\n"
        f"indexes: {', '.join(parts)}\n"
        f"built {manifest['built_at']} in {manifest['seconds']['total']:.1f}s ({manifest['passages_per_s']} passages/s)"
    )


def cli_index(config: RunConfig, args) -> int:
    from selfspec.runtime import init_ray

    executor = init_ray()
    index_dir, manifest, built = ensure_index(config, run_dir_for(config), executor)
    print(describe(manifest, index_dir))
    if not built:
        print("the index is up to date with the corpus and settings; nothing rebuilt")
    return 0


def cli_retrieve(config: RunConfig, args) -> int:
    from selfspec.runtime import init_ray

    executor = init_ray()
    index_dir, manifest, _ = ensure_index(config, run_dir_for(config), executor)
    retriever = retriever_from_files(read_index_files(index_dir, manifest), manifest, search_settings(config))
    hits = retriever.search([args.query], config.retrieval.top_k)[0]
    print(f"{config.retrieval.method} top {config.retrieval.top_k} from {index_dir}:")
    for rank, hit in enumerate(hits, start=1):
        print(f"{rank}. {hit['id']}  score {hit['score']:.4f}  {hit['title']}")
        print(textwrap.indent(textwrap.shorten(hit["text"], 300), "   "))
    if not hits:
        print("no passage matches the query")
    return 0
