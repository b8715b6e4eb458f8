"""Seed task files: written by people, so the format is forgiving and validated clearly.

Accepted inputs:
- YAML: a mapping with `domain`, `description` and `seeds` (a list), or a bare list;
- JSONL: one seed object per line;
- InstructLab taxonomy `qna.yaml` (knowledge: `seed_examples[].questions_and_answers`,
  skills: `seed_examples[].question/answer/context`).
Field aliases: prompt/question -> instruction, context -> input, response/answer ->
output, type -> task. Any problem is reported as `file:line: message`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from selfspec.schema import Seed, content_id

ALIASES = {
    "prompt": "instruction",
    "question": "instruction",
    "context": "input",
    "response": "output",
    "answer": "output",
    "type": "task",
    "task_type": "task",
}
KNOWN_FIELDS = {"id", "task", "instruction", "input", "output"}


class SeedError(ValueError):
    """A seed file that cannot be used; the message names file and line."""


@dataclass
class SeedSet:
    path: str
    domain: str
    description: str
    seeds: list[Seed] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seeds)


def _yaml_items(path: Path, text: str) -> tuple[dict[str, Any], list[tuple[int, Any]]]:
    """Parse YAML, returning top-level metadata and (line, item) per seed."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        problem = getattr(exc, "problem", None) or str(exc)
        raise SeedError(f"{path}:{line}: invalid YAML: {problem}") from None
    if data is None:
        raise SeedError(f"{path}:1: the file is empty")
    if isinstance(data, list):
        return {}, [(n.start_mark.line + 1, item) for n, item in zip(node.value, data)]
    if not isinstance(data, dict):
        raise SeedError(f"{path}:1: expected a mapping with 'seeds' or a list of seeds")
    key = next((k for k in ("seeds", "seed_examples") if k in data), None)
    if key is None:
        raise SeedError(f"{path}:1: no 'seeds' list found (keys: {', '.join(map(str, data))})")
    value_node = next(v for k, v in node.value if k.value == key)
    if not isinstance(data[key], list):
        raise SeedError(f"{path}:{value_node.start_mark.line + 1}: '{key}' must be a list")
    meta = {k: v for k, v in data.items() if k != key}
    items = [(n.start_mark.line + 1, item) for n, item in zip(value_node.value, data[key])]
    if key == "seed_examples":
        items = list(_instructlab_items(items))
    return meta, items


def _instructlab_items(items):
    """Flatten InstructLab qna.yaml seed_examples into plain seed dicts."""
    for line, item in items:
        if isinstance(item, dict) and "questions_and_answers" in item:
            for qa in item["questions_and_answers"] or []:
                yield line, {
                    "task": "knowledge_qa",
                    "instruction": (qa or {}).get("question"),
                    "input": item.get("context", ""),
                    "output": (qa or {}).get("answer"),
                }
        else:
            yield line, {"task": "skill", **(item or {})}


def _jsonl_items(path: Path, text: str) -> list[tuple[int, Any]]:
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise SeedError(f"{path}:{number}: invalid JSON: {exc.msg}") from None
    return items


def _normalize(path: Path, line: int, item: Any, index: int, prefix: str) -> Seed:
    if not isinstance(item, dict):
        raise SeedError(f"{path}:{line}: a seed must be a mapping, got {type(item).__name__}")
    fields: dict[str, Any] = {}
    for key, value in item.items():
        name = ALIASES.get(str(key).lower(), str(key).lower())
        if name not in KNOWN_FIELDS:
            raise SeedError(
                f"{path}:{line}: unknown field '{key}' (fields: id, task, instruction, input, output)"
            )
        # YAML 1.1 reads bare yes/no as booleans; people mean the words.
        fields[name] = ("yes" if value else "no") if isinstance(value, bool) else value
    for required in ("instruction", "output"):
        value = fields.get(required)
        if value is None:
            raise SeedError(f"{path}:{line}: missing field '{required}'")
        if not isinstance(value, (str, int, float)) or not str(value).strip():
            raise SeedError(f"{path}:{line}: field '{required}' is empty")
    return Seed(
        id=str(fields.get("id") or f"{prefix}-{index + 1:03d}"),
        task=str(fields.get("task") or "general").strip(),
        instruction=str(fields["instruction"]).strip(),
        input=str(fields.get("input") or "").strip(),
        output=str(fields["output"]).strip(),
    )


def load_seeds(path: str | Path) -> SeedSet:
    """Read and validate one seed file; raise SeedError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise SeedError(f"{path}: seed file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SeedError(f"{path}: not UTF-8 text ({exc.reason})") from None
    if path.suffix == ".jsonl":
        meta, items = {}, _jsonl_items(path, text)
    elif path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SeedError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
        # JSON is YAML: reuse the YAML reader for line numbers.
        meta, items = _yaml_items(path, text) if data is not None else ({}, [])
    else:
        meta, items = _yaml_items(path, text)
    if not items:
        raise SeedError(f"{path}:1: no seeds in the file")
    domain = str(meta.get("domain") or path.stem)
    prefix = path.stem
    seeds, first_line_of_id, first_line_of_task = [], {}, {}
    for index, (line, item) in enumerate(items):
        seed = _normalize(path, line, item, index, prefix)
        if seed["id"] in first_line_of_id:
            raise SeedError(
                f"{path}:{line}: duplicate id '{seed['id']}' (first at line {first_line_of_id[seed['id']]})"
            )
        key = content_id(seed["instruction"], seed["input"])
        if key in first_line_of_task:
            raise SeedError(
                f"{path}:{line}: duplicate seed: same instruction and input as line {first_line_of_task[key]}"
            )
        first_line_of_id[seed["id"]] = line
        first_line_of_task[key] = line
        seeds.append(seed)
    description = str(meta.get("description") or meta.get("task_description") or domain)
    return SeedSet(path=str(path), domain=domain, description=" ".join(description.split()), seeds=seeds)


def find_seed_file(name: str) -> Path:
    """A seed path as given, or relative to the repository's seeds/ folder."""
    path = Path(name)
    if path.exists():
        return path
    repo_seeds = Path(__file__).resolve().parent.parent / name
    return repo_seeds if repo_seeds.exists() else path
