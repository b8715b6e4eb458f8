"""Contamination check: word n-gram overlap of generated examples with evaluation tasks.

An example is flagged when any of its word n-grams (13 by default, as in GPT-3's
and Llama's decontamination) also occurs in a task's test inputs or outputs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

WORD = re.compile(r"\w+")


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = WORD.findall(text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def task_files(paths: Iterable[str]) -> list[Path]:
    """Every test.jsonl under the given task directories (or the files themselves)."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(sorted(path.rglob("test.jsonl")))
        else:
            raise FileNotFoundError(f"contamination task path '{raw}' does not exist")
    return files


class ContaminationIndex:
    """The word n-grams of evaluation tasks' test inputs and outputs, built once, against
    which generated examples are checked as often as needed."""

    def __init__(self, tasks: list[str], n: int = 13):
        self.n = n
        self.index: dict[tuple[str, ...], set[tuple[str, str]]] = {}
        for file in task_files(tasks):
            task = file.parent.name
            for line in file.read_text().splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                for gram in ngrams(f"{item.get('input', '')} {item.get('output', '')}", n):
                    self.index.setdefault(gram, set()).add((task, str(item.get("id"))))

    def matches(self, example: dict[str, Any]) -> set[tuple[str, str]]:
        """(task, item id) of every task item sharing an n-gram with the example."""
        text = " ".join(example.get(k, "") for k in ("instruction", "input", "output"))
        return {hit for gram in ngrams(text, self.n) for hit in self.index.get(gram, ())}

    def check(self, examples: list[dict[str, Any]]) -> tuple[dict[str, Any], set[str]]:
        """Return (report, ids of flagged examples)."""
        flagged: set[str] = set()
        per_task: dict[str, dict[str, set[str]]] = {}
        for example in examples:
            for task, item_id in self.matches(example):
                flagged.add(example["id"])
                entry = per_task.setdefault(task, {"examples": set(), "items": set()})
                entry["examples"].add(example["id"])
                entry["items"].add(item_id)
        report = {
            "n": self.n,
            "examples_checked": len(examples),
            "examples_flagged": len(flagged),
            "tasks": {
                task: {"examples_flagged": len(v["examples"]), "task_items_matched": len(v["items"])}
                for task, v in sorted(per_task.items())
            },
            "flagged_ids": sorted(flagged),
        }
        return report, flagged


def check_contamination(
    examples: list[dict[str, Any]], tasks: list[str], n: int = 13
) -> tuple[dict[str, Any], set[str]]:
    """Return (report, ids of flagged examples)."""
    return ContaminationIndex(tasks, n).check(examples)
