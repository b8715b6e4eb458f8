"""A generated dataset's quality next to its size, set beside the seeds it came from.

`profile(examples, seeds)` counts the task-type mix of the data and of the seeds (does
the mix follow the seeds?), the label balance per task type (did the model answer
"yes" to everything?), median lengths and the share of rows grounded in a passage.
Rows may lack `task` and `label` (data written before those columns): missing is "".
"""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any, Iterable

from selfspec.metrics import normalize_text
from selfspec.quality import task_profiles

def _words(text: Any) -> int:
    return len(str(text or "").split())


def _median(values: list[int]) -> float:
    return float(statistics.median(values)) if values else 0.0


def seed_labels(seeds: Iterable[dict[str, Any]]) -> list[str]:
    """Each seed's label: its normalized output where its task type is a label task
    (`selfspec.quality.task_profiles`), else ""."""
    seeds = list(seeds)
    profiles = task_profiles([{**s, "task": s.get("task") or ""} for s in seeds])
    return [normalize_text(s["output"]) if profiles[s.get("task") or ""].labelled else "" for s in seeds]


def _balance(tasks: list[str], labels: list[str], task: str, keep_empty: bool = True) -> dict[str, int]:
    """Label -> count over the rows of one task type, most common first."""
    return dict(Counter(label for t, label in zip(tasks, labels) if t == task and (label or keep_empty)).most_common())


def _mix(tasks: list[str]) -> dict[str, dict[str, float]]:
    counts = Counter(tasks)
    return {task: {"count": n, "share": n / len(tasks)} for task, n in counts.items()}


def profile(examples: list[dict[str, Any]], seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """Examples (rows of examples.parquet) and seeds (schema.Seed dicts) -> a plain dict:

    - `examples`, `seeds`: row counts;
    - `tasks`: task type -> {examples: {count, share}, seeds: {count, share}}, data's
      largest first (a side without the type has count 0, share 0.0);
    - `labels`: task type -> {examples: {label: count}, seeds: {label: count}}, most
      common first, for task types whose data rows carry a `label` or whose seeds are
      label tasks (`seed_labels`); data rows of such a type without a label count under "";
    - `median_words`: {input, output} -> {examples, seeds};
    - `with_passage`: share of rows with a non-empty `passage_ids`.
    """
    data_tasks = [row.get("task") or "" for row in examples]
    seed_tasks = [s.get("task") or "" for s in seeds]
    data_mix, seed_mix = _mix(data_tasks), _mix(seed_tasks)
    empty = {"count": 0, "share": 0.0}
    order = sorted(
        set(data_mix) | set(seed_mix),
        key=lambda t: (-data_mix.get(t, empty)["count"], -seed_mix.get(t, empty)["count"], t),
    )
    tasks = {t: {"examples": data_mix.get(t, empty), "seeds": seed_mix.get(t, empty)} for t in order}

    data_labels = [row.get("label") or "" for row in examples]
    seed_label = seed_labels(seeds)
    labelled = {t for t, label in zip(data_tasks + seed_tasks, data_labels + seed_label) if label}
    labels = {
        t: {"examples": _balance(data_tasks, data_labels, t), "seeds": _balance(seed_tasks, seed_label, t, keep_empty=False)}
        for t in order
        if t in labelled
    }
    median_words = {
        field: {
            "examples": _median([_words(row.get(field)) for row in examples]),
            "seeds": _median([_words(s.get(field)) for s in seeds]),
        }
        for field in ("input", "output")
    }
    with_passage = sum(1 for row in examples if row.get("passage_ids")) / len(examples) if examples else 0.0
    return {
        "examples": len(examples),
        "seeds": len(seeds),
        "tasks": tasks,
        "labels": labels,
        "median_words": median_words,
        "with_passage": with_passage,
    }


def task_name(task: str) -> str:
    return task or "(no task)"


def label_counts(counts: dict[str, int]) -> str:
    """{"yes": 3, "no": 1, "": 1} -> "yes 3 (60%), no 1 (20%), (no label) 1 (20%)"."""
    total = sum(counts.values())
    return ", ".join(f"{label or '(no label)'} {n} ({n / total:.0%})" for label, n in counts.items()) or "-"


def headline(profile: dict[str, Any]) -> str:
    """Sizes, passage share and median lengths in one line."""
    words = ", ".join(f"{f} {w['examples']:g} (seeds {w['seeds']:g})" for f, w in profile["median_words"].items())
    return (
        f"{profile['examples']} examples from {profile['seeds']} seeds; "
        f"{profile['with_passage']:.0%} with a passage; median words: {words}"
    )


def format_profile(profile: dict[str, Any]) -> str:
    """The profile as a compact plain-text table for a terminal."""
    lines = [headline(profile), ""]
    width = max([len(task_name(t)) for t in profile["tasks"]] + [len("task type")])
    lines.append(f"{'task type':<{width}}  {'examples':>8} {'share':>7}  {'seeds':>5} {'share':>7}")
    for task, sides in profile["tasks"].items():
        d, s = sides["examples"], sides["seeds"]
        lines.append(f"{task_name(task):<{width}}  {d['count']:>8} {d['share']:>7.1%}  {s['count']:>5} {s['share']:>7.1%}")
    if profile["labels"]:
        lines += ["", "label balance (examples | seeds)"]
        for task, sides in profile["labels"].items():
            lines.append(f"{task_name(task):<{width}}  {label_counts(sides['examples'])} | {label_counts(sides['seeds'])}")
    return "\n".join(lines)
