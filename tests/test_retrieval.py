"""Retrieval: stable passage ids, indexes that reload identically, stale-corpus detection,
fusion, the CLI, and generation grounded in passages (in-process and on Ray actors)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selfspec.config import load_config
from selfspec.io import RunDir, read_parquet
from selfspec.retrieval.corpus import chunk_spans, make_passages, read_documents, resolve_corpus
from selfspec.retrieval.index import PooledEncoder, convex_fusion, encode, load_encoder, pooled_layout, reciprocal_rank_fusion, resolve_encoder
from selfspec.stages.retrieve import (
    PromptGrounder,
    StaleIndexError,
    build_index,
    check_index,
    embed_passages,
    ensure_index,
    load_index,
)

DOCS = [
    {"id": "insulin", "title": "Insulin", "text": "Insulin lowers blood glucose by moving glucose into muscle and fat cells."},
    {"id": "warfarin", "title": "Warfarin", "text": "Warfarin blocks vitamin K recycling; its effect is followed with the INR."},
    {"id": "asthma", "title": "Asthma", "text": "Inhaled corticosteroids reduce airway inflammation and asthma attacks."},
    {"id": "statins", "title": "Statins", "text": "Statins inhibit HMG-CoA reductase and lower LDL cholesterol in the blood."},
    {"id": "sepsis", "title": "Sepsis", "text": "Sepsis is organ dysfunction caused by a dysregulated response to infection."},
    {"id": "gout", "title": "Gout", "text": "Gout flares come from urate crystals; allopurinol lowers serum urate over time."},
]
QUERIES = ["What lowers LDL cholesterol?", "How is warfarin monitored?", "crystals in the joint"]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config_for(tmp_path: Path, corpus: Path | str, *extra: str):
    return load_config(
        "default", [f"runs_dir={tmp_path}", "name=r", f"retrieval.corpus={corpus}", "retrieval.encoder_dtype=float32", *extra]
    )


# -- ingestion -----------------------------------------------------------------------
def test_chunks_are_word_windows_with_overlap():
    text = " ".join(f"w{i}" for i in range(25))
    spans = chunk_spans(text, 10, 3)
    words = [text[a:b].split() for a, b in spans]
    assert [w[0] for w in words] == ["w0", "w7", "w14", "w21"] and words[-1][-1] == "w24"
    assert all(len(w) == 10 for w in words[:-1]) and words[0][-3:] == words[1][:3]
    assert chunk_spans("  ", 10, 3) == [] and len(chunk_spans("one two", 10, 3)) == 1


def test_ingestion_ids_are_stable_across_formats_and_edits(tmp_path):
    jsonl = write_jsonl(tmp_path / "c.jsonl", DOCS + [{"text": "A document without an id, " * 30}])
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist(DOCS), parquet)
    folder = tmp_path / "notes"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.md").write_text("# Heart failure\n\nLoop diuretics relieve congestion.\n")
    (folder / "sub" / "b.txt").write_text("Beta blockers slow the heart rate.")
    (folder / "skip.csv").write_text("not,a,passage")

    first = make_passages(read_documents(jsonl), 16, 4)
    assert [p["id"] for p in first] == [p["id"] for p in make_passages(read_documents(jsonl), 16, 4)]
    assert [p["id"] for p in first[:6]] == [f"{d['id']}#0" for d in DOCS]
    unnamed = [p for p in first if p["doc_id"] not in {d["id"] for d in DOCS}]
    assert len(unnamed) > 1 and [p["chunk"] for p in unnamed] == list(range(len(unnamed)))
    assert make_passages(read_documents(parquet), 16, 4) == first[:6]
    folder_passages = make_passages(read_documents(folder), 16, 4)
    assert [(p["id"], p["title"]) for p in folder_passages] == [("a.md#0", "Heart failure"), ("sub/b.txt#0", "")]

    # Editing or adding a document leaves the other documents' ids alone.
    edited = [dict(DOCS[0], text="Insulin is made by beta cells.")] + DOCS[1:] + [{"id": "new", "text": "More text."}]
    after = make_passages(read_documents(write_jsonl(tmp_path / "d.jsonl", edited)), 16, 4)
    assert [p["id"] for p in after[:6]] == [p["id"] for p in first[:6]] and after[-1]["id"] == "new#0"


def test_bad_corpus_rows_name_file_and_line(tmp_path):
    from selfspec.retrieval.corpus import CorpusError

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(DOCS[0]) + "\n" + json.dumps({"id": "x", "title": "no text"}) + "\n")
    with pytest.raises(CorpusError, match=r"bad.jsonl:2: no text field"):
        read_documents(bad)
    with pytest.raises(CorpusError, match="duplicate document id 'insulin'"):
        read_documents(write_jsonl(tmp_path / "dup.jsonl", [DOCS[0], DOCS[0]]))
    with pytest.raises(CorpusError, match="no builtin corpus 'builtin:astronomy'"):
        resolve_corpus("builtin:astronomy", "biomedical")
    assert len(read_documents(resolve_corpus(None, "finance"))) >= 100


# -- fusion ----------------------------------------------------------------------------
def test_reciprocal_rank_fusion_on_a_toy_case():
    fused = reciprocal_rank_fusion([["a", "b", "c"], ["b", "c", "d"]], k=60)
    assert [d for d, _ in fused] == ["b", "c", "a", "d"]
    scores = dict(fused)
    assert scores["b"] == pytest.approx(1 / 62 + 1 / 61) and scores["a"] == pytest.approx(1 / 61)
    assert scores["c"] == pytest.approx(1 / 63 + 1 / 62) and scores["d"] == pytest.approx(1 / 63)
    # Equal scores: the better single rank wins, then the smaller id.
    assert [d for d, _ in reciprocal_rank_fusion([["x", "y"], ["y", "x"]])] == ["x", "y"]


def test_convex_fusion_scales_each_list():
    fused = convex_fusion([[("a", 10.0), ("b", 5.0), ("c", 0.0)], [("c", 0.9), ("b", 0.8), ("d", 0.4)]], [0.25, 0.75])
    assert dict(fused) == pytest.approx({"a": 0.25, "b": 0.125 + 0.75 * 0.8, "c": 0.75, "d": 0.0})
    assert [d for d, _ in fused] == ["c", "b", "a", "d"]


# -- encoder -----------------------------------------------------------------------------
def test_pooled_encoder_gives_the_sentence_transformer_embeddings():
    from sentence_transformers import SentenceTransformer

    texts = [d["text"] for d in DOCS] + QUERIES + ["word " * 400]  # the last one is truncated
    ours = load_encoder("embedded:all-minilm-l6-v2", "float32")
    assert isinstance(ours, PooledEncoder) and ours.pooling == "mean" and ours.max_length == 256
    reference = SentenceTransformer(resolve_encoder("embedded:all-minilm-l6-v2"))
    expected = reference.encode(texts, batch_size=4, normalize_embeddings=True, convert_to_numpy=True)
    assert encode(ours, texts, batch_size=4) == pytest.approx(expected, abs=1e-5)


def test_other_sentence_transformer_layouts_keep_the_library(tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(resolve_encoder("embedded:all-minilm-l6-v2"), folder)
    assert pooled_layout(str(folder)) == {"pooling": "mean", "max_length": 256}
    modules = json.loads((folder / "modules.json").read_text())
    (folder / "modules.json").write_text(json.dumps(modules + [{"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"}]))
    assert pooled_layout(str(folder)) is None
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "config_sentence_transformers.json").write_text(json.dumps({"prompts": {"query": "query: "}}))
    assert pooled_layout(str(folder)) is None
    assert pooled_layout(str(tmp_path)) is None  # not a sentence-transformers folder


# -- indexes -----------------------------------------------------------------------------
@pytest.mark.parametrize("method, index_type", [("bm25", "flat"), ("hybrid", "flat"), ("dense", "hnsw"), ("dense", "ivf")])
def test_index_saved_reloaded_and_queried_gives_identical_results(tmp_path, method, index_type):
    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS)
    config = config_for(tmp_path, corpus, f"retrieval.method={method}", f"retrieval.index_type={index_type}")
    manifest, built = build_index(config, str(tmp_path / "index"), executor="local")
    assert manifest["passages"] == len(DOCS) and manifest["corpus_fingerprint"]
    reloaded = load_index(config, str(tmp_path / "index"))
    before, after = built.search(QUERIES, 3), reloaded.search(QUERIES, 3)
    assert before == after
    assert [hits[0]["id"] for hits in after] == ["statins#0", "warfarin#0", "gout#0"]


def test_changed_corpus_or_settings_are_detected_and_rebuilt(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS)
    config = config_for(tmp_path, corpus)
    run_dir = RunDir(str(tmp_path / "r"))
    index_dir, manifest, built = ensure_index(config, run_dir, executor="local")
    assert built and not ensure_index(config, run_dir, executor="local")[2]

    write_jsonl(corpus, DOCS + [{"id": "lithium", "text": "Lithium levels rise with dehydration and thiazides."}])
    with pytest.raises(StaleIndexError, match="the corpus changed"):
        load_index(config, index_dir)
    with pytest.raises(StaleIndexError, match="chunk_tokens differ"):
        check_index(config_for(tmp_path, corpus, "retrieval.chunk_tokens=50"), index_dir)
    _, manifest, built = ensure_index(config, run_dir, executor="local")
    assert built and manifest["passages"] == len(DOCS) + 1 and "the corpus changed" in capsys.readouterr().err
    assert load_index(config, index_dir).search(["lithium thiazides"], 1)[0][0]["id"] == "lithium#0"


def test_cli_index_and_retrieve(tmp_path, monkeypatch, capsys):
    from selfspec.cli import main

    monkeypatch.setenv("SELFSPEC_EXECUTOR", "local")
    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS)
    common = [f"runs_dir={tmp_path}", "name=cli", f"retrieval.corpus={corpus}"]
    assert main(["index", *common]) == 0
    assert "6 documents -> 6 passages" in capsys.readouterr().out
    # The CLI takes overrides before the query.
    assert main(["retrieve", *common, "retrieval.top_k=2", "LDL cholesterol in the blood"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("1. statins#0  score ") and lines[3].startswith("2. insulin#0  score ")


# -- grounded generation -------------------------------------------------------------------
def test_fixed_query_and_passage_as_input_shape_the_prompt(tmp_path):
    from selfspec.stages.generate import load_seed_sets
    from selfspec.stages.generate_instructions import make_prompt_rows
    from selfspec.stages.retrieve import PASSAGE_AS_INPUT

    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS)
    config = config_for(tmp_path, corpus, "retrieval.query=urate crystals", "retrieval.passage_as_input=true", "retrieval.top_k=1")
    seeds = load_seed_sets(config)[0]
    prompts = make_prompt_rows(seeds.seeds, seeds.domain, seeds.description, 12, 3, 0, 1)
    grounded = PromptGrounder.from_config(config, RunDir(str(tmp_path / "r")), executor="local").ground(prompts, seeds)
    assert [r["passage_ids"] for r in grounded] == [["gout#0"]] * 12
    assert [r["prompt_id"] for r in grounded] == [r["prompt_id"] for r in prompts]
    with_input = {s["task"] for s in seeds.seeds if s["input"]}
    given = [r for r in grounded if r["task"] in with_input]
    assert given and len(given) < len(grounded)
    # Task types that take an input get the passage itself as their input; the model writes the
    # instruction. Where the seeds' inputs are labelled fields (Abstract / Question), the passage
    # fills the first and the prompt opens the second for the model.
    from selfspec.quality import task_profiles

    profiles = task_profiles(seeds.seeds)
    assert any(profiles[r["task"]].input_fields for r in given) and any(not profiles[r["task"]].input_fields for r in given)
    for row in given:
        fields = profiles[row["task"]].input_fields
        if fields:
            assert row["given_input"].startswith(f"{fields[0]}: Gout flares") and row["open_field"] == fields[1]
            assert row["prompt"].endswith(f"4. Input: {row['given_input']}\n{fields[1]}:")
        else:
            assert row["given_input"].startswith("Gout flares") and not row["open_field"]
            assert row["prompt"].endswith(f"4. Input: {row['given_input']}\nInstruction:")
    # Types without an input see the passage as knowledge and are asked to use it.
    for row in grounded:
        if row not in given:
            assert not row["given_input"] and PASSAGE_AS_INPUT.strip() in row["prompt"] and "[1] Gout: Gout flares" in row["prompt"]


def test_written_input_tasks_write_their_own_inputs_beside_the_passages(tmp_path):
    from selfspec.config import ConfigError
    from selfspec.stages.generate import load_seed_sets, run_generate
    from selfspec.stages.generate_instructions import make_prompt_rows
    from selfspec.stages.retrieve import PASSAGE_AS_INPUT

    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS)
    common = ("retrieval.query=urate crystals", "retrieval.passage_as_input=true", "retrieval.top_k=1")
    config = config_for(tmp_path, corpus, *common)
    seeds = load_seed_sets(config)[0]
    prompts = make_prompt_rows(seeds.seeds, seeds.domain, seeds.description, 24, 3, 0, 1)
    given = PromptGrounder.from_config(config, RunDir(str(tmp_path / "r")), executor="local").ground(prompts, seeds)
    written = sorted({r["task"] for r in given if r["given_input"]})[0]
    config = config_for(tmp_path, corpus, *common, f"retrieval.written_input_tasks=[{written}]")
    grounded = PromptGrounder.from_config(config, RunDir(str(tmp_path / "r")), executor="local").ground(prompts, seeds)
    for before, row in zip(given, grounded):
        if row["task"] == written:
            assert not row["given_input"] and PASSAGE_AS_INPUT.strip() in row["prompt"] and "[1] Gout:" in row["prompt"]
        else:
            assert row["given_input"] == before["given_input"]
    config = config_for(tmp_path, corpus, *common, "retrieval.written_input_tasks=[chemprot_relation]")
    with pytest.raises(ConfigError, match="retrieval.written_input_tasks: chemprot_relation is not a task type"):
        run_generate(config, RunDir(str(tmp_path / "bad")), executor="local")  # before any model or index
    assert not (tmp_path / "bad").exists()


def test_a_query_whose_top_hits_are_all_excluded_searches_deeper(tmp_path):
    from selfspec.stages.generate import load_seed_sets
    from selfspec.stages.generate_instructions import make_prompt_rows

    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS)
    config = config_for(tmp_path, corpus, "retrieval.query=urate crystals", "retrieval.passage_as_input=true", "retrieval.top_k=1",
                        "retrieval.method=dense")  # dense ranks every passage
    seeds = load_seed_sets(config)[0]
    prompts = make_prompt_rows(seeds.seeds, seeds.domain, seeds.description, 6, 3, 0, 1)
    grounder = PromptGrounder.from_config(config, RunDir(str(tmp_path / "r")), executor="local")
    ranked = [h["id"] for h in grounder.search(["urate crystals"], 10)[0]]
    assert len(ranked) > 3  # below the first search's depth (3 x top_k)
    grounder.excluded = lambda hit: hit["id"] != ranked[3]
    assert {tuple(r["passage_ids"]) for r in grounder.ground(prompts, seeds)} == {(ranked[3],)}


def test_tasks_without_input_see_only_context_passages(tmp_path):
    from selfspec.stages.generate import load_seed_sets
    from selfspec.stages.generate_instructions import make_prompt_rows

    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS)
    config = config_for(
        tmp_path, corpus, "retrieval.passage_as_input=true", "retrieval.top_k=3", "retrieval.context_passages=1"
    )
    seeds = load_seed_sets(config)[0]
    prompts = make_prompt_rows(seeds.seeds, seeds.domain, seeds.description, 12, 3, 0, 1)
    grounded = PromptGrounder.from_config(config, RunDir(str(tmp_path / "r")), executor="local").ground(prompts, seeds)
    without_input = [r for r in grounded if not r["given_input"]]
    # BM25 finds nothing for a prompt whose seeds share no word with the tiny corpus; such a
    # prompt asks for a task with an input of its own.
    assert all(len(r["passage_ids"]) <= 1 for r in grounded)
    assert any(r["passage_ids"] for r in without_input)
    for row in without_input:
        assert "[2] " not in row["prompt"] and ("[1] " in row["prompt"]) == bool(row["passage_ids"])


@pytest.mark.parametrize("top_k", [len(DOCS), 1])
def test_a_passage_goes_to_each_task_type_once_while_others_are_left(tmp_path, top_k):
    from collections import Counter

    from selfspec.stages.generate import load_seed_sets
    from selfspec.stages.generate_instructions import make_prompt_rows

    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS)
    # Dense search ranks every passage, so each prompt has all of them to choose from: in its
    # top k, or (top_k=1) deeper in its ranking once the best ones are given.
    config = config_for(tmp_path, corpus, "retrieval.method=dense", "retrieval.passage_as_input=true", f"retrieval.top_k={top_k}")
    seeds = load_seed_sets(config)[0]
    prompts = make_prompt_rows(seeds.seeds, seeds.domain, seeds.description, 40, 3, 0, 1)
    grounder = PromptGrounder.from_config(config, RunDir(str(tmp_path / "r")), executor="local")
    given = [r for r in grounder.ground(prompts, seeds) if r["given_input"]]
    per_type = Counter(r["task"] for r in given)
    uses = Counter((r["passage_ids"][0], r["task"]) for r in given)
    # Every type gets distinct passages until it has used them all.
    for task, count in per_type.items():
        type_uses = [n for (_, t), n in uses.items() if t == task]
        assert len(type_uses) == min(count, len(DOCS)), task
    assert grounder.given == set(uses)


def grounding_config(tmp_path: Path, *extra: str):
    return load_config(
        "default",
        [
            f"runs_dir={tmp_path}",
            "name=grounded",
            "retrieval.enabled=true",
            "generate.target=2",
            "generate.batch_size=4",
            "generate.prompts_per_round=8",
            "generate.max_rounds=4",
            "generate.instruction_max_new_tokens=96",
            "generate.response_max_new_tokens=48",
            *extra,
        ],
    )


def test_grounded_generation_records_passage_ids_from_the_corpus(tmp_path):
    from selfspec.stages.generate import run_generate

    config = grounding_config(tmp_path, "retrieval.passage_as_input=true")
    summary = run_generate(config, RunDir(str(tmp_path / "grounded")), executor="local")
    rows = read_parquet(tmp_path / "grounded" / "data" / "examples.parquet")
    assert len(rows) == 2 == summary["counts"]["final_examples"]
    from selfspec.quality import FIELD_LINE

    passages = {p["id"]: p["text"] for p in make_passages(read_documents(resolve_corpus("builtin:biomedical", "")), 200, 32)}
    for row in rows:
        # A task with an input takes one passage as it (as its first field where the seeds'
        # inputs are labelled fields), cut at a sentence end; others see top_k.
        if row["input"]:
            passage = FIELD_LINE.sub("", row["input"].split("\n")[0], count=1)
            assert len(row["passage_ids"]) == 1
            assert " ".join(passages[row["passage_ids"][0]].split()).startswith(passage.rstrip("."))
        else:
            assert len(row["passage_ids"]) == config.retrieval.top_k
    assert {i for r in rows for i in r["passage_ids"]} <= set(passages)


def test_rows_grounded_in_a_tasks_own_documents_are_flagged_and_removed_before_the_target(tmp_path):
    from selfspec.stages.generate import run_generate

    # An evaluation task whose test inputs are the corpus passages themselves: every row
    # grounded in one is contaminated, as the PubMedQA abstracts of the shared corpus are.
    documents = read_documents(resolve_corpus("builtin:biomedical", ""))
    task = tmp_path / "tasks" / "own_documents"
    task.mkdir(parents=True)
    write_jsonl(task / "test.jsonl", [{"id": d["id"], "input": d["text"], "output": "yes"} for d in documents])
    config = grounding_config(
        tmp_path, "retrieval.passage_as_input=true", f"generate.contamination.tasks=[{tmp_path / 'tasks'}]",
        "generate.contamination.remove=true", "generate.max_rounds=2", "generate.contamination.exclude_passages=false",
    )
    summary = run_generate(config, RunDir(str(tmp_path / "grounded")), executor="local")
    rows = read_parquet(tmp_path / "grounded" / "data" / "examples.parquet")
    report = summary["contamination"]
    assert report["examples_flagged"] >= 1 and report["removed"] == report["examples_flagged"]
    assert report["tasks"]["own_documents"]["examples_flagged"] == report["examples_flagged"]
    assert report["final_flagged"] == 0 and summary["drops"]["final"]["contaminated"] == report["removed"]
    # Flagged rows do not count toward the target: generation went on for another round
    # (every row here copies a task document, so none is left to keep).
    assert summary["rounds"] == 2 and report["examples_checked"] > config.generate.target
    assert len(rows) == report["examples_checked"] - report["removed"]


def test_corpus_passages_from_a_tasks_own_documents_never_reach_a_prompt(tmp_path):
    from selfspec.stages.generate import run_generate

    # Half the corpus documents are a task's test inputs: those passages are flagged and kept
    # out of every prompt, so no generated row is grounded in them or flagged for them.
    documents = read_documents(resolve_corpus("builtin:biomedical", ""))
    own = documents[::2]
    task = tmp_path / "tasks" / "own_documents"
    task.mkdir(parents=True)
    write_jsonl(task / "test.jsonl", [{"id": d["id"], "input": d["text"], "output": "yes"} for d in own])
    config = grounding_config(
        tmp_path, "retrieval.passage_as_input=true", f"generate.contamination.tasks=[{tmp_path / 'tasks'}]",
        "generate.contamination.remove=true",
    )
    summary = run_generate(config, RunDir(str(tmp_path / "grounded")), executor="local")
    rows = read_parquet(tmp_path / "grounded" / "data" / "examples.parquet")
    report = summary["contamination"]
    assert report["passages_excluded"] >= 1 and report["examples_flagged"] == 0
    passages = {p["id"]: p for p in make_passages(documents, 200, 32)}
    own_ids = {d["id"] for d in own}
    used = {i for r in rows for i in r["passage_ids"]}
    assert rows and used and not any(passages[i]["doc_id"] in own_ids for i in used)


def test_ray_actors_and_encoders_match_the_in_process_path(tmp_path, ray_local):
    import numpy as np

    from selfspec.stages.generate import load_seed_sets
    from selfspec.stages.generate_instructions import make_prompt_rows

    config = grounding_config(tmp_path, "retrieval.method=hybrid", "retrieval.replicas=2", "retrieval.query_batch_size=3")
    texts = [d["text"] for d in DOCS] * 2
    (on_ray, ray_seconds), (local, _) = embed_passages(texts, config, "float32", "ray"), embed_passages(texts, config, "float32", "local")
    assert np.allclose(on_ray, local, atol=1e-6)
    assert ray_seconds > 0

    seeds = load_seed_sets(config)[0]
    prompts = make_prompt_rows(seeds.seeds, seeds.domain, seeds.description, 8, 3, 0, 1)
    on_ray = PromptGrounder.from_config(config, RunDir(str(tmp_path / "grounded")), executor="ray").ground(prompts, seeds)
    local = PromptGrounder.from_config(config, RunDir(str(tmp_path / "grounded")), executor="local").ground(prompts, seeds)
    assert on_ray == local
    row = on_ray[0]
    assert row["seed_ids"] == prompts[0]["seed_ids"] and len(row["passage_ids"]) == 2
    assert "Domain knowledge to ground the new tasks:\n[1] " in row["prompt"] and row["prompt"].endswith("4. Instruction:")
