"""Evaluation harness: task loading, metrics, scoring, the eval outputs and the report."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import numpy as np
import pytest

from selfspec.metrics import (
    bootstrap_weights,
    extract_entities,
    extract_label,
    extract_typed_entities,
    metric_stats,
    metric_value,
    paired_difference,
    parse_final_number,
    parse_number,
    score_with_ci,
)
from selfspec.tasks import BUILTIN_TASKS, TaskError, load_task, load_tasks

CHEMPROT_LABELS = [
    "INHIBITOR", "SUBSTRATE", "INDIRECT-DOWNREGULATOR", "INDIRECT-UPREGULATOR", "ANTAGONIST", "ACTIVATOR",
    "PRODUCT-OF", "AGONIST", "DOWNREGULATOR", "UPREGULATOR", "AGONIST-INHIBITOR", "AGONIST-ACTIVATOR",
]

YESNO = [
    ("q1", "Abstract: Aspirin lowered the rate of stroke by half in the trial.\nQuestion: Does aspirin lower stroke risk?", "yes"),
    ("q2", "Abstract: Vitamin C did not change the duration of colds.\nQuestion: Does vitamin C shorten colds?", "no"),
    ("q3", "Abstract: Results on sleep and memory were mixed.\nQuestion: Does sleep improve memory?", "maybe"),
]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_task(folder: Path, rows: list[dict], meta: str | None = None, dev: list[dict] | None = None) -> Path:
    write_jsonl(folder / "test.jsonl", rows)
    if dev:
        write_jsonl(folder / "dev.jsonl", dev)
    if meta:
        (folder / "task.yaml").write_text(meta)
    return folder


def yesno_task(folder: Path) -> Path:
    rows = [{"id": i, "input": x, "output": y, "choices": ["yes", "no", "maybe"]} for i, x, y in YESNO]
    dev = [{"id": "d1", "input": "Abstract: Smoking raised lung cancer risk tenfold.\nQuestion: Does smoking raise lung cancer risk?", "output": "yes"}]
    meta = "name: yesno\ninstruction: Answer the research question with yes, no or maybe.\nmetric: [accuracy, macro_f1]\nlabels: [\"yes\", \"no\", maybe]\n"
    return write_task(folder, rows, meta, dev)


# -- tasks ---------------------------------------------------------------------
def test_malformed_line_is_reported_with_file_and_line(tmp_path):
    folder = tmp_path / "bio" / "broken"
    write_task(folder, [{"id": "a", "input": "x", "output": "y"}])
    path = folder / "test.jsonl"
    path.write_text(path.read_text() + '{"id": "b", "input": "x", "output": "y"}\n{"id": "c", "input": "x",\n')
    with pytest.raises(TaskError, match=re.escape(f"{path}:3: invalid JSON")):
        load_task(folder)
    path.write_text('{"id": "a", "input": "x", "output": "y"}\n\n{"id": "b", "output": "y"}\n')
    with pytest.raises(TaskError, match=re.escape(f"{path}:3: missing field 'input'")):
        load_tasks([str(tmp_path)])
    path.write_text('{"id": "a", "input": "x", "output": "z", "choices": ["y", "n"]}\n')
    with pytest.raises(TaskError, match=re.escape(f"{path}:1: output 'z' is not one of choices")):
        load_task(folder)
    (folder / "task.yaml").write_text("labels: [yes, no]\n")
    path.write_text('{"id": "a", "input": "x", "output": "yes"}\n{"id": "b", "input": "x", "output": "perhaps"}\n')
    with pytest.raises(TaskError, match=re.escape(f"{path}:2: output 'perhaps' is not one of the task's labels")):
        load_task(folder)


def test_cli_reports_malformed_task_before_any_work(tmp_path, capsys):
    from selfspec.cli import main

    folder = tmp_path / "tasks" / "bad"
    write_task(folder, [{"id": "a", "input": "x", "output": "y"}])
    (folder / "test.jsonl").write_text('{"id": "a", "input": "x", "output": "y"}\nnot json\n')
    assert main(["eval", "--tasks", str(tmp_path / "tasks"), f"runs_dir={tmp_path}"]) == 2
    assert f"{folder / 'test.jsonl'}:2: invalid JSON" in capsys.readouterr().err


def test_task_tree_expands_recursively_with_domains(tmp_path):
    yesno_task(tmp_path / "biomedical" / "yesno")
    write_task(tmp_path / "finance" / "deep" / "headlines", [{"id": "h", "input": "Shares rose.", "output": "Shares rose"}])
    tasks = load_tasks([str(tmp_path)])
    assert [(t.name, t.domain, t.kind) for t in tasks] == [
        ("yesno", "biomedical", "choice"),
        ("headlines", "deep", "text"),
    ]
    assert tasks[0].labels == ("yes", "no", "maybe") and tasks[0].metrics == ("accuracy", "macro_f1")
    # Unquoted yes/no in task.yaml are labels, not YAML 1.1 booleans.
    (tmp_path / "biomedical" / "yesno" / "task.yaml").write_text("name: yesno\nlabels: [yes, no, maybe]\n")
    assert load_tasks([str(tmp_path)])[0].labels == ("yes", "no", "maybe")
    assert tasks[1].metrics == ("rouge_l",) and len(tasks[0].demos) == 1
    with pytest.raises(TaskError, match="unknown task set 'builtin:nowhere'"):
        load_tasks(["builtin:nowhere"])
    with pytest.raises(TaskError, match="two tasks named 'yesno'"):
        load_tasks([str(tmp_path), str(yesno_task(tmp_path / "copy" / "yesno"))])


def test_every_shared_task_loads(shared_data):
    """All ten task.yaml files of the shared data load, bc5cdr's unquoted 'Chemicals: a'
    values included, with the kinds and metrics their scoring needs."""
    tasks = {t.name: t for t in load_tasks([str(shared_data)])}
    assert set(tasks) == {
        "bc5cdr", "bioasq_yesno", "chemprot", "ncbi_disease", "pubmedqa",
        "convfinqa", "fpb", "gold_headline", "sentfin", "tatqa",
    }
    assert tasks["bc5cdr"].instruction.endswith("(write 'none' for an empty list).")
    assert tasks["bc5cdr"].entity_types == ("Chemicals", "Diseases")
    assert tasks["ncbi_disease"].kind == "entities" and tasks["ncbi_disease"].entity_types is None
    assert tasks["convfinqa"].kind == "numeric"
    assert tasks["convfinqa"].metrics == ("numeric_match", "numeric_match_scaled")
    assert tasks["tatqa"].kind == "text"
    assert tasks["tatqa"].metrics == ("exact_match", "numeric_match", "numeric_match_scaled", "token_f1")
    assert tasks["chemprot"].kind == "choice" and len(tasks["chemprot"].labels) == 12


def test_task_yaml_with_unquoted_colons_in_values(tmp_path):
    folder = write_task(
        tmp_path / "bio" / "typed",
        [{"id": "a", "input": "x", "output": "Chemicals: none\nDiseases: none"}],
        "name: typed\ninstruction: Answer in two lines: 'Chemicals: a; b' and 'Diseases: c'.\nmetric: [entity_f1]\n",
    )
    task = load_task(folder)
    assert task.instruction == "Answer in two lines: 'Chemicals: a; b' and 'Diseases: c'."
    assert task.metrics == ("entity_f1",) and task.entity_types == ("Chemicals", "Diseases")
    (folder / "task.yaml").write_text("name: typed\n  nested: [1\n")
    with pytest.raises(TaskError, match="task.yaml:2: invalid YAML"):
        load_task(folder)


@pytest.mark.skipif(not (BUILTIN_TASKS / "biomedical").is_dir(), reason="builtin tasks not shipped yet")
def test_builtin_task_sets_load():
    tasks = load_tasks(["builtin:biomedical", "builtin:finance"])
    assert {t.domain for t in tasks} == {"biomedical", "finance"}
    assert all(t.test for t in tasks)


# -- metrics -------------------------------------------------------------------
def value(metric, preds, golds):
    return metric_value(metric, metric_stats(metric, preds, golds))


def test_classification_metrics():
    preds, golds = ["a", "b", None, "a"], ["a", "a", "b", "a"]
    assert value("accuracy", preds, golds) == 0.5
    # a: tp 2, fp 0, fn 1 -> F1 0.8; b: tp 0, fp 1, fn 1 -> 0; an unparsed answer is only a miss.
    assert value("macro_f1", preds, golds) == pytest.approx(0.4)


def test_entity_numeric_and_rouge_metrics():
    assert value("entity_f1", [["Ataxia", "cancer"]], ["ataxia; Breast Cancer"]) == pytest.approx(0.5)
    assert value("entity_f1", [[], ["asthma"]], ["asthma", "Asthma"]) == pytest.approx(2 / 3)
    assert parse_number("The answer is $1,234.5.") == 1234.5
    assert parse_number("Growth was 12% in 2023") == 12.0
    assert value("numeric_em", [1240.0, 1300.0, None], ["1234.5", "1234.5", "7"]) == pytest.approx(1 / 3)
    assert value("rouge_l", ["net sales rose", "profit fell"], ["net sales rose", "shares were flat"]) == 0.5


def scores(metric, preds, golds, metas=None):
    """Per-example scores of a mean metric."""
    return list(metric_stats(metric, preds, golds, 0.01, metas)[:, 0])


def test_numeric_match_convfinqa():
    """ConvFinQA: gold is the program's raw result, percentages as fractions."""
    assert parse_final_number("In 2008 it was 168, so 168 / 3 = 56") == 56.0
    assert parse_final_number("The answer is $1,949 (up from 1,800 in 2018)") == 1949.0
    assert parse_final_number("It fell from 2008-2009 by -3.5%") == -3.5
    preds = ["0.12574", "0.1257", "12.574%", "12.574", "0.13", "56", "$56.4", "57", None, "No.", "yes"]
    golds = ["0.12574"] * 5 + ["56"] * 4 + ["no", "no"]
    metas = [{"answer_is_number": True}] * 9 + [{"answer_is_number": False}] * 2
    # Rounded to the gold's 5 decimals or within 1%: 0.1257 is 0.03% off; 0.13 is 3.4% off.
    # "12.574%" is the right percentage but only the scaled variant (x/100) accepts it.
    assert scores("numeric_match", preds, golds, metas) == [1, 1, 0, 0, 0, 1, 1, 0, 0, 1, 0]
    assert scores("numeric_match_scaled", preds, golds, metas) == [1, 1, 1, 1, 0, 1, 1, 0, 0, 1, 0]
    # Without meta a gold that is one number is numeric, any other is text.
    assert scores("numeric_match", ["$1,234.0", "No"], ["1234", "no"]) == [1, 1]


def test_tatqa_metrics():
    """TAT-QA: numbers in the unit of meta.scale at 2 decimals; spans by text; multi-spans as sets."""
    rows = [  # (prediction, gold, answer_type, scale)
        ("-22.22%", "-22.22", "arithmetic", "percent"),
        ("-22.2", "-22.22", "arithmetic", "percent"),
        ("-0.2222", "-22.22", "arithmetic", "percent"),
        ("It was -12.6 million", "-12.6", "arithmetic", "million"),
        ("3", "3", "count", ""),
        ("$1,949", "$1,949", "span", "thousand"),
        ("1,949", "$1,949", "span", "thousand"),
        ("$282; $234; $259", "$234; $259; $282", "multi-span", "thousand"),
        ("$234; $282", "$234; $259; $282", "multi-span", "thousand"),
        ("net sales rose", "the net sales", "span", ""),
    ]
    preds, golds = [r[0] for r in rows], [r[1] for r in rows]
    metas = [{"answer_type": r[2], "scale": r[3]} for r in rows]
    assert scores("exact_match", preds, golds, metas) == [0, 0, 0, 0, 1, 1, 0, 1, 0, 0]
    assert scores("numeric_match", preds, golds, metas) == [1, 0, 0, 1, 1, 1, 0, 1, 0, 0]
    assert scores("numeric_match_scaled", preds, golds, metas) == [1, 0, 1, 1, 1, 1, 0, 1, 0, 0]
    # Spans: SQuAD token F1 ("1,949" and "$1,949" are one token); two of three spans: 2/3;
    # "net sales rose" vs "the net sales": P 2/3, R 1 -> 0.8. Numbers score their numeric match.
    assert scores("token_f1", preds, golds, metas) == pytest.approx([1, 0, 0, 1, 1, 1, 1, 1, 2 / 3, 0.8])
    assert value("token_f1", ["Net sales"], ["net sales."]) == 1.0


def test_typed_entity_f1():
    """BC5CDR: (type, mention) pairs; a chemical listed as a disease is a miss."""
    gold = "Chemicals: dobutamine\nDiseases: Torsade de pointes; congestive heart failure"
    types = ["Chemicals", "Diseases"]
    right = extract_typed_entities("Chemicals: Dobutamine\nDiseases: torsade de pointes; congestive heart failure", types)
    assert right == [["Chemicals", "dobutamine"], ["Diseases", "congestive heart failure"], ["Diseases", "torsade de pointes"]]
    assert value("entity_f1", [right], [gold]) == 1.0
    swapped = extract_typed_entities("Chemicals: none\nDiseases: dobutamine; congestive heart failure", types)
    # tp: congestive heart failure; fp: (disease, dobutamine); fn: the chemical and torsade de pointes.
    assert value("entity_f1", [swapped], [gold]) == pytest.approx(2 / (2 + 1 + 2))
    # Bullets under a header, either number of the type name; text before any header ignored.
    listed = extract_typed_entities("Here they are.\n**Chemical:**\n- dobutamine\nDisease: none", types)
    assert listed == [["Chemicals", "dobutamine"]]
    # Micro-averaged over examples; an empty gold ("none") with an empty answer adds nothing.
    assert value("entity_f1", [listed, []], [gold, "Chemicals: none\nDiseases: none"]) == pytest.approx(2 / 4)
    # Untyped tasks (NCBI disease) are unchanged.
    assert value("entity_f1", [["ataxia"]], ["Ataxia; cancer"]) == pytest.approx(2 / 3)


def test_answer_extraction():
    labels = ["positive", "negative", "neutral"]
    assert extract_label("Answer: Positive.", labels) == "positive"
    assert extract_label("It is negative, not positive", labels) == "negative"
    assert extract_label("I cannot tell", labels) is None
    assert extract_label("Maybe not.", ["yes", "no", "maybe"]) == "maybe"
    assert extract_entities("Diseases: ataxia; Breast cancer.") == ["ataxia", "breast cancer"]
    assert extract_entities("- asthma\n- cystic fibrosis\n") == ["asthma", "cystic fibrosis"]
    assert extract_entities("None") == []


def test_bootstrap_ci_is_seeded_and_paired():
    rng = np.random.default_rng(1)
    golds = list(rng.choice(["x", "y", "z"], 60))
    preds = [g if rng.random() < 0.7 else "x" for g in golds]
    stats = metric_stats("macro_f1", preds, golds)
    weights = bootstrap_weights(len(golds), 300, seed=0)
    first = score_with_ci("macro_f1", stats, weights)
    assert first == score_with_ci("macro_f1", stats, bootstrap_weights(len(golds), 300, seed=0))
    assert first["ci_low"] < first["value"] < first["ci_high"]
    assert paired_difference("macro_f1", stats, stats, weights) == {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    assert score_with_ci("accuracy", metric_stats("accuracy", preds, golds), None)["ci_low"] is None


# -- scoring -------------------------------------------------------------------
def tiny_config(tmp_path, **eval_fields):
    from selfspec.config import EvalConfig, ModelConfig, RunConfig

    return RunConfig(
        name="t",
        runs_dir=str(tmp_path / "runs"),
        model=ModelConfig(backend="transformers", max_batch_size=16),
        eval=EvalConfig(**{"bootstrap": 100, "max_new_tokens": 12, **eval_fields}),
    )


def test_loglik_batch_equals_single(fp32_backend, tmp_path):
    from selfspec.stages.evaluate import build_requests, run_requests

    tasks = load_tasks([str(yesno_task(tmp_path / "bio" / "yesno"))])
    # Rows of different lengths (0- and 1-shot) so that the batch is padded.
    requests = build_requests(tasks, {"base": None}, tiny_config(tmp_path, shots=[0, 1], max_examples=2), [])
    assert {r["mode"] for r in requests} == {"loglik"} and len(requests) == 4
    batched = run_requests(fp32_backend, requests)
    for request, together in zip(requests, batched):
        alone = run_requests(fp32_backend, [request])[0]
        assert alone["output"] == together["output"]
        for label in ("yes", "no", "maybe"):
            assert alone["logliks"][label] == pytest.approx(together["logliks"][label], abs=1e-4)


def chemprot_task(folder: Path) -> Path:
    """A ChemProt-like task: 12 labels its instruction does not list, rows carrying them as choices."""
    rows = [
        {"id": "c1", "input": "<< Aspirin >> irreversibly inhibits [[ COX-1 ]].", "output": "INHIBITOR", "choices": CHEMPROT_LABELS},
        {"id": "c2", "input": "<< Losartan >> blocks the [[ AT1 receptor ]].", "output": "ANTAGONIST", "choices": CHEMPROT_LABELS},
    ]
    meta = "name: relations\ninstruction: Which relation does the chemical have to the protein? Answer with one label.\n"
    meta += f"metric: [accuracy, macro_f1]\nlabels: [{', '.join(CHEMPROT_LABELS)}]\n"
    return write_task(folder, rows, meta)


def test_prompt_names_a_label_set_the_instruction_does_not(tmp_path):
    from selfspec.stages.evaluate import build_messages

    chemprot = load_task(chemprot_task(tmp_path / "bio" / "relations"))
    prompt = build_messages(chemprot, chemprot.test[0], [])[-1]["content"]
    assert prompt.endswith("\n\nAnswer with one of: " + ", ".join(CHEMPROT_LABELS) + ".")
    assert "Options:" not in prompt
    # "yes, no or maybe" is already in the instruction: nothing added.
    yesno = load_task(yesno_task(tmp_path / "bio" / "yesno"))
    assert build_messages(yesno, yesno.test[0], [])[-1]["content"].endswith("Question: Does aspirin lower stroke risk?")
    # A row with its own choices gets them as options instead.
    row = {"id": "m", "input": "Which organ makes insulin?", "output": "pancreas", "choices": ["liver", "pancreas"]}
    prompt = build_messages(chemprot, row, [])[-1]["content"]
    assert prompt.endswith("Options:\n- liver\n- pancreas") and "Answer with one of" not in prompt


def test_demos_never_come_from_test_rows(tmp_path):
    """k-shot demos come from dev.jsonl, or without one from the seeds, never from test rows,
    even where a dev row or seed repeats a test input."""
    from selfspec.seeds import load_seeds
    from selfspec.stages.evaluate import build_requests, demo_pool, pick_demos

    rows = [{"id": f"t{i}", "input": f"Abstract: finding {i}.\nQuestion: Is finding {i} real?", "output": "yes"} for i in range(6)]
    meta = "name: {}\ninstruction: Answer the question with yes or no.\nlabels: [\"yes\", \"no\"]\n"
    dev = [{"id": f"d{i}", "input": f"Abstract: dev finding {i}.\nQuestion: Is it real?", "output": "no"} for i in range(3)]
    dev.append({"id": "d-leak", "input": "abstract:  finding 0.\nquestion: is finding 0 real?", "output": "yes"})
    with_dev = write_task(tmp_path / "biomedical" / "with_dev", rows, meta.format("with_dev"), dev)
    no_dev = write_task(tmp_path / "biomedical" / "no_dev", rows, meta.format("no_dev"))
    seed_file = tmp_path / "seeds.yaml"
    seeds = [{"id": f"s{i}", "task": "yes_no_qa", "instruction": "Answer yes or no.", "input": f"Seed question {i}?", "output": "yes"} for i in range(3)]
    seeds.append({"id": "s-leak", "task": "yes_no_qa", "instruction": "Answer yes or no.", "input": rows[1]["input"], "output": "yes"})
    seed_file.write_text(json.dumps({"domain": "biomedical", "seeds": seeds}))
    seed_sets = [load_seeds(seed_file)]
    tasks = load_tasks([str(with_dev), str(no_dev)])
    assert [d["id"] for d in demo_pool(tasks[0], "auto", seed_sets)] == ["d0", "d1", "d2"]
    assert [d["id"] for d in demo_pool(tasks[1], "auto", seed_sets)] == ["s0", "s1", "s2"]

    test_ids = {r["id"] for r in rows}
    test_texts = {" ".join(r["input"].lower().split()) for r in rows}
    for task in tasks:
        for row in rows:
            demos = pick_demos(demo_pool(task, "auto", seed_sets), 3, row["id"], seed=0)
            assert len(demos) == 3 and not {d["id"] for d in demos} & test_ids
    requests = build_requests(tasks, {"base": None}, tiny_config(tmp_path, shots=[3], scoring="both"), seed_sets)
    demo_turns = [m["content"] for r in requests for m in r["messages"][:-1]]
    assert len(demo_turns) == 2 * 6 * 2 * 3 * 2  # tasks x rows x scorings x shots x (user, assistant)
    for turn in demo_turns:
        assert not any(text in " ".join(turn.lower().split()) for text in test_texts)


def test_both_scorings_report_each_figure(fp32_backend, tmp_path):
    """eval.scoring=both: choice tasks by generation (headline) and by log-likelihood, each
    with CIs, paired deltas and domain averages; other tasks by generation in both."""
    from selfspec.config import ServeConfig
    from selfspec.report import render_markdown
    from selfspec.serving.registry import decide_promotion
    from selfspec.stages.evaluate import build_requests, collect, execute, summarize

    yesno_task(tmp_path / "biomedical" / "yesno")
    write_task(
        tmp_path / "biomedical" / "diseases",
        [{"id": "n1", "input": "Mutations in BRCA1 cause breast cancer.", "output": "breast cancer"}],
        "instruction: List every disease mentioned in the text, separated by semicolons.\nmetric: [entity_f1]\n",
    )
    tasks = load_tasks([str(tmp_path / "biomedical")])
    config = tiny_config(tmp_path, scoring="both", max_examples=2)
    # "copy" is the base under a second name: the deltas exist and are zero.
    models = {"base": None, "copy": None}
    requests = build_requests(tasks, models, config, [])
    assert sorted({(r["task"], r["mode"]) for r in requests}) == [
        ("diseases", "generate"), ("yesno", "generate"), ("yesno", "loglik"),
    ]
    predictions = collect(tasks, models, requests, execute(requests, config, models, executor="local"), 0.01)
    metrics = json.loads(json.dumps(summarize(tasks, models, predictions, config)))

    assert metrics["scorings"] == ["generate", "loglik"] and set(metrics["by_scoring"]) == {"loglik"}
    assert metrics["tasks"]["yesno"]["scorings"] == ["generate", "loglik"]
    assert metrics["tasks"]["diseases"]["scorings"] == ["generate"]
    loglik = metrics["by_scoring"]["loglik"]
    for section, mode in ((metrics, "generate"), (loglik, "loglik")):
        rows = [r for r in predictions["base"]["yesno"] if r["scoring"] == mode]
        assert len(rows) == 2 and all((r.get("logliks") is not None) == (mode == "loglik") for r in rows)
        accuracy = section["results"]["base"]["yesno"]["0"]["accuracy"]
        assert accuracy["value"] == round(recompute("accuracy", rows), 6)
        assert accuracy["ci_low"] <= accuracy["value"] <= accuracy["ci_high"]
        assert section["deltas"]["copy"]["yesno"]["0"]["accuracy"] == {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0}
        domain = section["domains"]["base"]["biomedical"]["0"]
        assert domain["primary_ci_low"] <= domain["primary"] <= domain["primary_ci_high"]
        assert set(section["domain_deltas"]["copy"]["biomedical"]["0"]) == {"value", "ci_low", "ci_high"}
    # Generation-only tasks carry the same figures in both.
    assert loglik["results"]["base"]["diseases"] == metrics["results"]["base"]["diseases"]

    # The copy against the base's best scoring: the best figure, and zero only where it is the headline's.
    best = metrics["against_best_reference"]["copy"]["biomedical"]["0"]
    figures = {s: section["domains"]["base"]["biomedical"]["0"]["primary"] for s, section in (("generate", metrics), ("loglik", loglik))}
    assert best["reference_scoring"] == max(figures, key=figures.get) and best["reference"] == max(figures.values())
    assert best["value"] == round(figures["generate"] - max(figures.values()), 6)
    assert best["ci_low"] <= best["value"] <= best["ci_high"]

    text = render_markdown(metrics)
    assert "## Choice tasks scored by log-likelihood over the label set" in text
    assert "## Against the reference's best scoring" in text
    assert text.count("| yesno | biomedical | 0 | accuracy |") == 2
    decision = decide_promotion(metrics, "copy", "biomedical", ServeConfig())
    assert not decision.passed and decision.checks[0]["delta"] == 0.0


def test_generation_scoring_extracts_labels(fp32_backend, tmp_path):
    from selfspec.stages.evaluate import build_requests, parse_answer, run_requests

    tasks = load_tasks([str(yesno_task(tmp_path / "bio" / "yesno"))])
    requests = build_requests(tasks, {"base": None}, tiny_config(tmp_path, scoring="generate", max_examples=2), [])
    assert {r["mode"] for r in requests} == {"generate"}
    for request, result in zip(requests, run_requests(fp32_backend, requests)):
        parsed = parse_answer(tasks[0], tasks[0].test[request["index"]], result["output"], None)
        assert parsed == extract_label(result["output"], ["yes", "no", "maybe"])


def test_evaluation_answers_only_what_its_folder_lacks(tmp_path, monkeypatch, adapter_dir):
    """Answers are stored per batch: a rerun after a kill answers only what is missing,
    reuses what was answered (even a hand-edited answer proves it) and skips a torn last
    line; once finished, an evaluation with another adapter answers only that adapter's."""
    import selfspec.stages.evaluate as evaluate
    from selfspec.io import RunDir

    tasks = [str(yesno_task(tmp_path / "bio" / "yesno"))]
    config = tiny_config(tmp_path, shots=[0], scoring="generate", max_examples=4, batch_size=1, max_new_tokens=4)
    run_dir = RunDir(str(tmp_path / "runs" / "t"))
    checkpoint = tmp_path / "runs" / "t" / "eval" / "answers.jsonl"
    real_batch, calls = evaluate.run_request_batch, []

    def dies_on_third_batch(backend, rows):
        calls.append(len(rows))
        if len(calls) == 3 and not (checkpoint.parent / "predictions").exists():  # the first run only
            raise RuntimeError("killed")
        return real_batch(backend, rows)

    monkeypatch.setattr(evaluate, "run_request_batch", dies_on_third_batch)
    with pytest.raises(RuntimeError, match="killed"):
        evaluate.run_eval(config, run_dir, tasks=tasks, models=["base"], executor="local")
    records = [json.loads(line) for line in checkpoint.read_text().splitlines()]
    assert len(records) == 2 and not (checkpoint.parent / "metrics.json").exists()

    records[0]["result"]["output"] = "maybe, from the checkpoint"
    checkpoint.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"key": "torn')
    calls.clear()
    metrics = evaluate.run_eval(config, run_dir, tasks=tasks, models=["base"], executor="local")
    assert sum(calls) == len(YESNO) - 2  # only what the kill left unanswered
    rows = [json.loads(line) for line in (checkpoint.parent / "predictions" / "base" / "yesno.jsonl").read_text().splitlines()]
    assert sum(r["output"] == "maybe, from the checkpoint" for r in rows) == 1
    assert metrics["results"]["base"]["yesno"]["0"]["accuracy"]["value"] == round(recompute("accuracy", rows), 6)
    assert len(checkpoint.read_text().splitlines()) == len(YESNO)  # the torn line was cut

    calls.clear()  # a report elsewhere (--out) still draws on the run's answers
    elsewhere = tmp_path / "elsewhere"
    both = evaluate.run_eval(config, run_dir, tasks=tasks, models=["base", str(adapter_dir)], out=str(elsewhere), executor="local")
    assert sum(calls) == len(YESNO)  # the adapter's requests only
    assert both["results"]["base"] == metrics["results"]["base"]
    assert (elsewhere / "metrics.json").exists() and not (elsewhere / "answers.jsonl").exists()

    # Another model or adapter never reuses an answer.
    request = evaluate.build_requests(load_tasks(tasks), {"base": None}, config, [])[0]
    keys = {evaluate.AnswerStore(checkpoint, {"base": identity}).key(request) for identity in ("a", "b")}
    assert len(keys) == 2


# -- the whole stage -----------------------------------------------------------
@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    """A LoRA adapter with random (untrained) weights: enough to differ from the base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from selfspec.models.resolve import resolve_model

    model = AutoModelForCausalLM.from_pretrained(resolve_model("embedded:smollm2-135m-instruct"))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    folder = tmp_path_factory.mktemp("adapters") / "tiny-spec"
    peft_model.save_pretrained(folder)
    return folder


def eval_tasks(root: Path) -> Path:
    yesno_task(root / "biomedical" / "yesno")
    write_task(
        root / "biomedical" / "diseases",
        [
            {"id": "n1", "input": "Patients with cystic fibrosis and asthma were enrolled.", "output": "cystic fibrosis; asthma"},
            {"id": "n2", "input": "Mutations in BRCA1 cause breast cancer.", "output": "breast cancer"},
        ],
        "instruction: List every disease mentioned in the text, separated by semicolons.\nmetric: [entity_f1]\n",
    )
    write_task(
        root / "finance" / "numbers",
        [
            {"id": "m1", "input": "Revenue was 120 and costs were 80. What was the profit?", "output": "40"},
            {"id": "m2", "input": "A share costs 10 and you buy 3. What do you pay?", "output": "30"},
        ],
        "instruction: Answer with a number.\nmetric: [numeric_em]\n",
    )
    write_task(
        root / "finance" / "summary",
        [{"id": "s1", "input": "Nokia said net sales rose 5% to EUR 6 billion in the quarter.", "output": "Nokia's sales rose 5%."}],
        "instruction: Summarize the news in one sentence.\nmetric: [rouge_l, exact_match]\n",
    )
    return root


def recompute(metric: str, rows: list[dict]) -> float:
    """An independent few-line implementation of each metric, from predictions.jsonl."""
    preds, golds = [r["parsed"] for r in rows], [r["gold"] for r in rows]
    if metric == "accuracy":
        return statistics.fmean(p == g for p, g in zip(preds, golds))
    if metric == "macro_f1":
        f1s = []
        for c in sorted(set(golds) | {p for p in preds if p is not None}):
            tp = sum(p == c == g for p, g in zip(preds, golds))
            fp = sum(p == c != g for p, g in zip(preds, golds))
            fn = sum(g == c != p for p, g in zip(preds, golds))
            f1s.append(2 * tp / (2 * tp + fp + fn))
        return statistics.fmean(f1s)
    if metric == "entity_f1":
        tp = fp = fn = 0
        for p, g in zip(preds, golds):
            pred, gold = {e.lower() for e in p}, {e.strip().lower() for e in g.split(";")}
            tp, fp, fn = tp + len(pred & gold), fp + len(pred - gold), fn + len(gold - pred)
        return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
    if metric == "numeric_em":
        return statistics.fmean(p is not None and math.isclose(p, float(g), rel_tol=0.01) for p, g in zip(preds, golds))
    if metric == "rouge_l":
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        return statistics.fmean(scorer.score(g, p)["rougeL"].fmeasure for p, g in zip(preds, golds))
    if metric == "exact_match":
        norm = lambda s: " ".join(s.lower().split()).strip(" .,:;!?\"'`")
        return statistics.fmean(norm(p) == norm(g) for p, g in zip(preds, golds))
    raise AssertionError(metric)


def test_eval_cli_end_to_end(ray_local, adapter_dir, tmp_path, capsys):
    from selfspec.cli import main

    tasks = eval_tasks(tmp_path / "tasks")
    run = tmp_path / "runs" / "t"
    write_jsonl(run / "train" / "metrics.jsonl", [{"step": s, "epoch": s / 4, "loss": 2.0 / s, "lr": 1e-4, "tokens_per_s": 200} for s in range(1, 9)])
    (run / "data").mkdir(parents=True)
    (run / "data" / "summary.json").write_text(json.dumps({
        "counts": {"prompts": 10, "raw_instructions": 25, "kept_instructions": 12, "examples": 11},
        "drops": {"instruction": {"rouge_duplicate": 9, "too_short": 4}, "response": {"empty": 1}},
        "label_check": {
            "yes_no_qa": {"seeds": 9, "right": 4, "prior_right": 4, "reliable": False, "majority_label": "yes", "relabelled": 61},
            "drug_drug_interaction": {"seeds": 9, "right": 4, "prior_right": 2, "p": 0.0328, "reliable": True},
        },
    }))
    code = main([
        "eval", "--tasks", str(tasks), "--models", f"base,{adapter_dir}",
        "name=t", f"runs_dir={tmp_path / 'runs'}", "model.backend=transformers",
        "eval.shots=[0,1]", "eval.max_examples=2", "eval.bootstrap=200", "eval.max_new_tokens=12",
        "eval.batch_size=16",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| Task | Domain | Shots | Metric | n | base | tiny-spec | Δ tiny-spec |" in printed
    assert "report.html" in printed

    out = run / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["models"]) == ["base", "tiny-spec"]
    assert set(metrics["tasks"]) == {"yesno", "diseases", "numbers", "summary"}
    checked = 0
    for model in ("base", "tiny-spec"):
        for task, info in metrics["tasks"].items():
            rows = [json.loads(line) for line in (out / "predictions" / model / f"{task}.jsonl").read_text().splitlines()]
            assert set(rows[0]) >= {"id", "prompt", "output", "parsed", "gold", "score"}
            for shot in ("0", "1"):
                shot_rows = [r for r in rows if str(r["shot"]) == shot]
                result = metrics["results"][model][task][shot]
                assert result["n"] == len(shot_rows) == min(2, info["n_total"])
                for metric in info["metrics"]:
                    assert round(recompute(metric, shot_rows), 6) == result[metric]["value"], (model, task, shot, metric)
                    assert result[metric]["ci_low"] <= result[metric]["value"] <= result[metric]["ci_high"]
                    checked += 1
    assert checked == 2 * 2 * 6
    assert set(metrics["deltas"]["tiny-spec"]["yesno"]["0"]) == {"accuracy", "macro_f1"}
    assert set(metrics["domains"]["base"]) == {"biomedical", "finance"}
    bio = metrics["domains"]["base"]["biomedical"]["0"]
    assert bio["primary_ci_low"] <= bio["primary"] <= bio["primary_ci_high"]
    assert set(metrics["domain_deltas"]["tiny-spec"]["finance"]["1"]) == {"value", "ci_low", "ci_high"}
    # 1-shot prompts hold a demo from dev.jsonl: one user/assistant pair before the question.
    yesno = [json.loads(line) for line in (out / "predictions" / "base" / "yesno.jsonl").read_text().splitlines()]
    assert [len(r["prompt"]) for r in yesno] == [1, 1, 3, 3]

    assert "tiny-spec" in (out / "results.md").read_text()
    report = (out / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", report, re.IGNORECASE)
    assert 'src="http' not in report
    assert report.count('src="data:image/png;base64,') == 3  # per task, funnel, loss curve
    assert "Label check:" in report and "unreliable: 61 rows answer &#x27;yes&#x27;" in report
    assert "<td>drug_drug_interaction</td><td>4</td><td>2</td><td>9</td><td>0.033</td><td class=\"flat\">reliable" in report
    assert "<td>yes_no_qa</td><td>4</td><td>4</td><td>9</td><td>-</td>" in report  # a summary from before p


def test_report_shows_typed_entity_answers():
    from selfspec.report import _answer

    record = {"parsed": [["Chemicals", "cisplatin"], ["Diseases", "nephrotoxicity"]], "score": 0.5}
    assert _answer(record) == "Chemicals: cisplatin; Diseases: nephrotoxicity  [0.50]"
    assert _answer({"parsed": ["ataxia", "cancer"], "score": 1.0}) == "ataxia; cancer  [1.00]"
