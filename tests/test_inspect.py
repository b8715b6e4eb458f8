"""Data profile and `selfspec inspect`: the mix and label balance beside the seeds, random rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from selfspec.cli import main
from selfspec.config import dump_config, load_config
from selfspec.data_profile import format_profile, profile, seed_labels
from selfspec.io import write_parquet
from selfspec.report import data_quality_html
from selfspec.schema import example_schema


def example(n: int, task: str, label: str, output: str, *, input: str = "", passages=(), round: int = 1) -> dict:
    return {
        "id": f"ex{n}",
        "instruction": f"Instruction number {n}.",
        "input": input,
        "domain": "demo",
        "seed_ids": ["s1", "s2"],
        "passage_ids": list(passages),
        "model": "embedded:smollm2-135m-instruct",
        "adapter": "",
        "round": round,
        "config_hash": "abc",
        "output": output,
        "task": task,
        "label": label,
    }


LONG_INPUT = "\n".join(f"Sentence {i} of a long abstract about asthma and eczema." for i in range(1, 9))
EXAMPLES = [
    example(1, "yes_no_qa", "yes", "Yes.", input="Trial D.", passages=["pub-1"], round=0),
    example(2, "yes_no_qa", "yes", "yes"),
    example(3, "yes_no_qa", "no", "No, it does not."),
    example(4, "yes_no_qa", "", "It is hard to say from this trial alone."),
    example(5, "disease_ner", "", "asthma; eczema", input=LONG_INPUT, passages=["pub-2", "pub-3"]),
    example(6, "open_qa", "", "They lower LDL cholesterol."),
]
SEEDS = [
    {"id": "s1", "task": "yes_no_qa", "instruction": "a", "input": "x", "output": "yes"},
    {"id": "s2", "task": "yes_no_qa", "instruction": "b", "input": "x", "output": "No."},
    {"id": "s3", "task": "yes_no_qa", "instruction": "c", "input": "x", "output": "yes"},
    {"id": "s4", "task": "disease_ner", "instruction": "d", "input": "x", "output": "asthma; chronic obstructive pulmonary disease"},
    {"id": "s5", "task": "open_qa", "instruction": "e", "input": "", "output": "Statins lower LDL cholesterol by inhibiting HMG-CoA reductase."},
]


def test_profile_counts_shares_and_label_balance_beside_the_seeds():
    p = profile(EXAMPLES, SEEDS)
    assert (p["examples"], p["seeds"]) == (6, 5)
    assert list(p["tasks"]) == ["yes_no_qa", "disease_ner", "open_qa"]
    assert p["tasks"]["yes_no_qa"] == {"examples": {"count": 4, "share": 4 / 6}, "seeds": {"count": 3, "share": 3 / 5}}
    assert p["tasks"]["open_qa"]["seeds"] == {"count": 1, "share": 0.2}
    # Only yes_no_qa has labels: its seeds' outputs are short; the NER and QA seeds are not.
    assert p["labels"] == {"yes_no_qa": {"examples": {"yes": 2, "no": 1, "": 1}, "seeds": {"yes": 2, "no": 1}}}
    assert p["with_passage"] == pytest.approx(2 / 6)
    assert p["median_words"] == {"input": {"examples": 0.0, "seeds": 1.0}, "output": {"examples": 3.0, "seeds": 1.0}}
    assert seed_labels(SEEDS) == ["yes", "no", "yes", "", ""]


def test_profile_treats_missing_task_and_label_columns_as_empty():
    old = [{k: v for k, v in row.items() if k not in ("task", "label")} for row in EXAMPLES[:3]]
    p = profile(old, SEEDS)
    assert p["tasks"][""] == {"examples": {"count": 3, "share": 1.0}, "seeds": {"count": 0, "share": 0.0}}
    assert p["tasks"]["yes_no_qa"]["examples"] == {"count": 0, "share": 0.0}
    assert p["labels"] == {"yes_no_qa": {"examples": {}, "seeds": {"yes": 2, "no": 1}}}
    text = format_profile(p)
    assert "(no task)" in text and "yes_no_qa    - | yes 2 (67%), no 1 (33%)" in text
    assert profile([], [])["with_passage"] == 0.0


def test_format_profile_and_html_tables():
    p = profile(EXAMPLES, SEEDS)
    text = format_profile(p)
    assert text.splitlines()[0] == (
        "6 examples from 5 seeds; 33% with a passage; median words: input 0 (seeds 1), output 3 (seeds 1)"
    )
    assert "yes_no_qa           4   66.7%      3   60.0%" in text
    assert "yes_no_qa    yes 2 (50%), no 1 (25%), (no label) 1 (25%) | yes 2 (67%), no 1 (33%)" in text
    page = data_quality_html(p)
    assert "<td>yes_no_qa</td><td>4</td><td>66.7%</td><td>3</td><td>60.0%</td>" in page
    assert '<td class="text">yes 2 (50%), no 1 (25%), (no label) 1 (25%)</td>' in page
    assert "Labels in seeds" in page and "33% with a passage" in page


@pytest.fixture
def run(tmp_path) -> tuple[list[str], Path]:
    """A run directory holding EXAMPLES as examples.parquet, and overrides that point at it."""
    import pyarrow as pa

    schema = example_schema()
    for column in ("task", "label"):
        if column not in schema.names:
            schema = schema.append(pa.field(column, pa.string()))
    path = tmp_path / "runs" / "demo" / "data" / "examples.parquet"
    write_parquet(path, [{name: row[name] for name in schema.names} for row in EXAMPLES], schema=schema)
    (tmp_path / "seeds.yaml").write_text(yaml.safe_dump({"domain": "demo", "seeds": SEEDS}))
    return [f"runs_dir={tmp_path / 'runs'}", "name=demo", f"generate.seeds=[{tmp_path / 'seeds.yaml'}]"], path


def rows_shown(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("--- row ")]


def test_cli_prints_profile_and_seeded_random_rows(run, capsys):
    overrides, path = run
    assert main(["inspect", *overrides, "--rows", "3", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == str(path)
    assert "yes_no_qa           4   66.7%      3   60.0%" in out
    assert "3 random rows (seed 1):" in out and len(rows_shown(out)) == 3
    assert main(["inspect", *overrides, "--rows", "3", "--seed", "1"]) == 0
    assert capsys.readouterr().out == out

    assert main(["inspect", *overrides]) == 0  # default: 10 rows, so all 6
    out = capsys.readouterr().out
    assert len(rows_shown(out)) == 6
    assert "--- row 1 of 6 | yes_no_qa | label yes | round 0 | seeds s1, s2 | passages pub-1 | id ex1" in out
    assert "instruction: Instruction number 1.\ninput: Trial D.\noutput: Yes." in out
    assert "--- row 6 of 6 | open_qa | round 1 | seeds s1, s2 | passages - | id ex6" in out


def test_rows_are_profiled_against_the_seeds_they_came_from(run, capsys):
    """Without the run's seed override, the rows name none of the shipped seeds: the profile
    takes the seeds from the run's own config.yaml beside the data folder."""
    overrides, path = run
    seeds_override = [o for o in overrides if o.startswith("generate.seeds=")]
    config = load_config(None, seeds_override)
    (path.parent.parent / "config.yaml").write_text(dump_config(config))
    assert main(["inspect", "--file", str(path), "--rows", "0"]) == 0
    assert "yes_no_qa           4   66.7%      3   60.0%" in capsys.readouterr().out
    (path.parent.parent / "config.yaml").unlink()
    assert main(["inspect", "--file", str(path), "--rows", "0"]) == 0  # the default seeds, then
    assert "yes_no_qa           4   66.7%      3   60.0%" not in capsys.readouterr().out


def test_cli_task_filter_truncates_long_input(run, capsys):
    overrides, _ = run
    assert main(["inspect", *overrides, "--task", "disease_ner"]) == 0
    out = capsys.readouterr().out
    assert "1 random row with task disease_ner (seed 0):" in out
    assert rows_shown(out) == ["--- row 5 of 6 | disease_ner | round 1 | seeds s1, s2 | passages pub-2, pub-3 | id ex5"]
    assert "  Sentence 4 of a long abstract" in out and "Sentence 5" not in out and "… (4 more lines)" in out
    assert "yes_no_qa" in out  # the profile still covers every row

    assert main(["inspect", *overrides, "--task", "summarization"]) == 1
    assert "no rows with task 'summarization'" in capsys.readouterr().err


def test_cli_reads_alpaca_and_chat_jsonl_without_provenance(run, tmp_path, capsys):
    overrides, _ = run
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text(json.dumps({"instruction": "Name an organ.", "input": "", "output": "The liver."}) + "\n")
    assert main(["inspect", *overrides, "--file", str(alpaca)]) == 0
    out = capsys.readouterr().out
    assert "(no task)           1  100.0%      0    0.0%" in out
    assert "--- row 1 of 1 | (no task) | round - | seeds - | passages -\ninstruction: Name an organ.\noutput: The liver." in out

    chat = tmp_path / "chat.jsonl"
    messages = [{"role": "user", "content": "Name a vein."}, {"role": "assistant", "content": "The portal vein."}]
    chat.write_text(json.dumps({"messages": messages}) + "\n\n{broken\n")
    assert main(["inspect", *overrides, "--file", str(chat)]) == 2
    assert f"selfspec inspect: error: {chat}:3: invalid JSON" in capsys.readouterr().err
    chat.write_text(json.dumps({"messages": messages}) + "\n")
    assert main(["inspect", *overrides, "--file", str(chat)]) == 0
    assert "instruction: Name a vein.\noutput: The portal vein." in capsys.readouterr().out


def test_cli_missing_file_exits_2_naming_the_path(tmp_path, capsys):
    code = main(["inspect", f"runs_dir={tmp_path / 'runs'}", "name=nothing"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"selfspec inspect: error: {tmp_path / 'runs' / 'nothing' / 'data' / 'examples.parquet'}: no such file" in err
