"""Seed files: shipped sets validate; broken files fail with file and line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from selfspec.seeds import SeedError, load_seeds

REPO = Path(__file__).resolve().parent.parent


def test_shipped_seed_sets_are_valid_and_large_enough():
    bio = load_seeds(REPO / "seeds" / "biomedical.yaml")
    fin = load_seeds(REPO / "seeds" / "finance.yaml")
    assert (bio.domain, fin.domain) == ("biomedical", "finance")
    assert len(bio) >= 80 and len(fin) >= 90
    for seeds in (bio, fin):
        assert len({s["task"] for s in seeds.seeds}) >= 8
        assert all(s["output"] and s["instruction"] for s in seeds.seeds)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


GOOD = """domain: demo
description: A demo domain.
seeds:
  - id: a
    task: qa
    instruction: Say whether the statement holds.
    input: The sky is green.
    output: "no"
  - id: b
    instruction: Name the organ that filters blood.
    output: The kidney.
"""


def test_forgiving_format_aliases_and_bare_booleans(tmp_path):
    path = write(tmp_path, "s.yaml", "- question: Is water wet?\n  answer: yes\n- prompt: Name a colour.\n  response: Red\n  type: open\n")
    seeds = load_seeds(path)
    assert [s["output"] for s in seeds.seeds] == ["yes", "Red"]
    assert seeds.seeds[1]["task"] == "open" and seeds.seeds[0]["id"] == "s-001"
    assert load_seeds(write(tmp_path, "g.yaml", GOOD)).seeds[1]["input"] == ""


@pytest.mark.parametrize(
    "text, message",
    [
        (GOOD.replace("    output: The kidney.\n", ""), r"s\.yaml:9: missing field 'output'"),
        (GOOD.replace('output: "no"', 'output: ""'), r"s\.yaml:4: field 'output' is empty"),
        (GOOD.replace("id: b", "id: a"), r"s\.yaml:9: duplicate id 'a' \(first at line 4\)"),
        (GOOD + "  - instruction: Say whether the statement holds.\n    input: The sky is green.\n    output: x\n", r"s\.yaml:12: duplicate seed"),
        (GOOD.replace("    task: qa\n", "    task: [qa\n"), r"s\.yaml:\d+: invalid YAML"),
        (GOOD.replace("    task: qa", "    tsk: qa"), r"s\.yaml:4: unknown field 'tsk'"),
        ("domain: x\n", r"s\.yaml:1: no 'seeds' list"),
    ],
)
def test_broken_yaml_seed_files_name_file_and_line(tmp_path, text, message):
    with pytest.raises(SeedError, match=message):
        load_seeds(write(tmp_path, "s.yaml", text))


def test_broken_jsonl_seed_file_names_the_line(tmp_path):
    good = json.dumps({"instruction": "Name a gene.", "output": "BRCA1"})
    with pytest.raises(SeedError, match=r"s\.jsonl:2: invalid JSON"):
        load_seeds(write(tmp_path, "s.jsonl", good + "\n{not json\n"))
    with pytest.raises(SeedError, match=r"s\.jsonl:2: missing field 'output'"):
        load_seeds(write(tmp_path, "s.jsonl", good + "\n" + json.dumps({"instruction": "x y z"}) + "\n"))


def test_instructlab_qna_yaml_imports(tmp_path):
    qna = """version: 3
domain: pharmacology
created_by: someone
seed_examples:
  - context: Warfarin is an anticoagulant metabolized by CYP2C9.
    questions_and_answers:
      - question: Which enzyme metabolizes warfarin?
        answer: CYP2C9.
      - question: What class of drug is warfarin?
        answer: An anticoagulant.
document_outline: Warfarin facts
"""
    seeds = load_seeds(write(tmp_path, "qna.yaml", qna))
    assert seeds.domain == "pharmacology" and len(seeds) == 2
    assert seeds.seeds[0]["input"].startswith("Warfarin") and seeds.seeds[0]["output"] == "CYP2C9."


def test_cli_rejects_a_bad_seed_file_and_leaves_outputs_untouched(tmp_path):
    bad = write(tmp_path, "bad.yaml", GOOD.replace('output: "no"', 'output: ""'))
    run_dir = tmp_path / "runs" / "x"
    (run_dir / "data").mkdir(parents=True)
    existing = run_dir / "data" / "examples.parquet"
    existing.write_bytes(b"previous results")
    result = subprocess.run(
        [sys.executable, "-m", "selfspec.cli", "generate", f"runs_dir={tmp_path / 'runs'}", "name=x", f"generate.seeds=[{bad}]"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.returncode == 2
    assert f"{bad}:4: field 'output' is empty" in result.stderr
    assert result.stderr.count("error:") == 1
    assert existing.read_bytes() == b"previous results"
    assert sorted(p.name for p in run_dir.rglob("*")) == ["data", "examples.parquet"]
