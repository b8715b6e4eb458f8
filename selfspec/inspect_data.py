"""`selfspec inspect`: a generated dataset's profile and a few random rows, for a person to judge.

Reads the run's `data/examples.parquet` (or any Parquet, Alpaca JSON/JSONL or chat
JSONL file), prints `data_profile.format_profile` against the seeds the rows came from
(the config's, or those of the run's own config.yaml when the rows name other seeds), then
N rows drawn with a fixed seed, each with its task type, text and provenance.
"""

from __future__ import annotations

import json
import random
import sys
import textwrap
from pathlib import Path
from typing import Any

from selfspec.config import RunConfig, load_config
from selfspec.data_profile import format_profile, profile, task_name
from selfspec.io import exists, read_bytes, read_parquet, run_dir_for
from selfspec.seeds import find_seed_file, load_seeds

WIDTH = 100
INPUT_LINES = 4
OUTPUT_LINES = 6
EMPTY_EXAMPLE = {
    "id": "", "task": "", "label": "", "instruction": "", "input": "", "output": "",
    "seed_ids": [], "passage_ids": [], "round": None,
}


def _as_example(row: dict[str, Any]) -> dict[str, Any]:
    """A row of any supported file as an example dict; missing columns get empty values."""
    if "messages" in row:
        by_role = {m["role"]: m["content"] for m in row["messages"]}
        row = {"instruction": by_role.get("user", ""), "output": by_role.get("assistant", ""), **row}
    return {**EMPTY_EXAMPLE, **{k: v for k, v in row.items() if v is not None}}


def read_examples(path: str) -> list[dict[str, Any]]:
    """Rows of a Parquet, JSON (a list) or JSONL file; FileNotFoundError names a missing
    path, ValueError names the file and line of bad JSON."""
    if not exists(path):
        raise FileNotFoundError(f"{path}: no such file (run `selfspec generate` first, or pass --file)")
    if path.endswith(".parquet"):
        rows = read_parquet(path)
    elif path.endswith(".json"):
        rows = json.loads(read_bytes(path))
    else:
        rows = []
        for number, line in enumerate(read_bytes(path).decode().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: invalid JSON: {exc.msg}") from None
    return [_as_example(row) for row in rows]


def sample_rows(examples: list[dict[str, Any]], n: int, seed: int, task: str | None = None) -> list[tuple[int, dict[str, Any]]]:
    """Up to n (row index, row) pairs drawn with `seed`, in file order; only `task` rows if given."""
    candidates = [(i, row) for i, row in enumerate(examples) if task is None or row["task"] == task]
    return sorted(random.Random(seed).sample(candidates, max(0, min(n, len(candidates)))), key=lambda pair: pair[0])


def clip(text: str, max_lines: int) -> str:
    """Text wrapped at WIDTH and cut to max_lines, saying how many lines were left out."""
    lines = [wrapped for line in text.splitlines() for wrapped in (textwrap.wrap(line, WIDTH) or [""])]
    if len(lines) <= max_lines:
        return "\n".join(lines)
    return "\n".join(lines[:max_lines] + [f"… ({len(lines) - max_lines} more lines)"])


def _field(name: str, text: str, max_lines: int) -> str:
    body = clip(text, max_lines)
    return f"{name}: {body}" if "\n" not in body else f"{name}:\n" + textwrap.indent(body, "  ")


def format_row(index: int, total: int, row: dict[str, Any]) -> str:
    """One example: a header with task type, label and provenance, then its text."""
    header = [f"row {index + 1} of {total}", task_name(row["task"])]
    if row["label"]:
        header.append(f"label {row['label']}")
    header += [
        f"round {row['round'] if row['round'] is not None else '-'}",
        f"seeds {', '.join(row['seed_ids']) or '-'}",
        f"passages {', '.join(row['passage_ids']) or '-'}",
    ]
    if row["id"]:
        header.append(f"id {row['id']}")
    parts = ["--- " + " | ".join(header), _field("instruction", row["instruction"], INPUT_LINES)]
    if row["input"]:
        parts.append(_field("input", row["input"], INPUT_LINES))
    parts.append(_field("output", row["output"], OUTPUT_LINES))
    return "\n".join(parts)


def render(examples: list[dict[str, Any]], seeds: list[dict[str, Any]], rows: int, seed: int, task: str | None) -> str:
    """The profile of all examples, then the sampled rows (of `task` only, if given)."""
    parts = [format_profile(profile(examples, seeds))]
    picked = sample_rows(examples, rows, seed, task)
    if rows > 0:
        of_task = f" with task {task}" if task is not None else ""
        parts += ["", f"{len(picked)} random row{'' if len(picked) == 1 else 's'}{of_task} (seed {seed}):"]
        parts += [format_row(i, len(examples), row) for i, row in picked]
    return "\n".join(parts)


def profile_seeds(config: RunConfig, examples: list[dict[str, Any]], path: str) -> list[dict[str, Any]]:
    """The seeds to profile rows against: the config's, unless the rows name none of those and
    the run's own config.yaml (beside the file's data/ folder) names the seeds they came from."""
    def seeds_of(cfg: RunConfig) -> list[dict[str, Any]]:
        return [s for name in cfg.generate.seeds for s in load_seeds(find_seed_file(name)).seeds]

    seeds = seeds_of(config)
    named = {i for row in examples for i in row["seed_ids"]}
    if not named or named & {s["id"] for s in seeds}:
        return seeds
    run_config = Path(str(path).removeprefix("file://")).parent.parent / "config.yaml"
    if run_config.is_file():
        theirs = seeds_of(load_config(str(run_config)))
        if named & {s["id"] for s in theirs}:
            return theirs
    return seeds


def cli(config: RunConfig, args) -> int:
    path = args.file or run_dir_for(config).path("data", "examples.parquet")
    try:
        examples = read_examples(path)
    except ValueError as exc:  # bad JSON or Parquet; JSONL errors already name file and line
        message = str(exc) if str(exc).startswith(path) else f"{path}: {exc}"
        print(f"selfspec inspect: error: {message}", file=sys.stderr)
        return 2
    seeds = profile_seeds(config, examples, path)
    if args.task is not None and not any(row["task"] == args.task for row in examples):
        known = ", ".join(sorted({task_name(row["task"]) for row in examples}))
        print(f"selfspec inspect: no rows with task '{args.task}' in {path} (tasks: {known})", file=sys.stderr)
        return 1
    print(path)
    print(render(examples, seeds, args.rows, args.seed, args.task))
    return 0
