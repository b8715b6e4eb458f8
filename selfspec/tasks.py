"""Evaluation tasks: a directory of JSONL examples plus an optional `task.yaml`.

A task directory holds `test.jsonl` (required), `dev.jsonl` and/or `train.jsonl`
(few-shot demonstrations) and `task.yaml` (`name`, `instruction`, `metric`,
`labels`, `answer_format`, optionally `domain` and `seed_task`). Each JSONL line is
`{"id", "input", "output", "choices"?, "meta"?}` (see ../shared/data/README.md).
Any problem in a file is reported as `file:line: message` through `TaskError`.
A task whose every gold output is two or more `Type: a; b` lines (BC5CDR's
"Chemicals: ..." / "Diseases: ...") is a typed entity task: answers are read and
scored as (type, mention) pairs. A task scored by `numeric_match` also reports
`numeric_match_scaled` (see selfspec.metrics).

`builtin:DOMAIN` names the small held-out task sets shipped in
`selfspec/resources/tasks/DOMAIN/`; any other spec is a task directory or a
directory searched recursively for task directories.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from selfspec.metrics import typed_entities

BUILTIN_TASKS = Path(__file__).parent / "resources" / "tasks"
METRICS = (
    "accuracy", "macro_f1", "rouge_l", "entity_f1", "numeric_em", "exact_match",
    "numeric_match", "numeric_match_scaled", "token_f1",
)
NUMERIC_METRICS = {"numeric_em", "numeric_match", "numeric_match_scaled"}
TASK_YAML_FIELDS = {
    "name", "domain", "instruction", "metric", "metrics", "labels", "answer_format", "seed_task",
}
DEMO_SPLITS = ("dev", "train")


class _TaskYamlLoader(yaml.SafeLoader):
    """YAML without implicit booleans: `labels: [yes, no, maybe]` stays three strings."""


_TaskYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


class TaskError(ValueError):
    """A task directory or file that cannot be used; the message names file and line."""


@dataclass(frozen=True)
class Task:
    """One evaluation task, loaded and validated.

    `kind` decides scoring: "choice" (a label set: log-likelihood or generation with
    label extraction), "entities" (a '; '-separated list, typed when `entity_types`),
    "numeric" (only numeric metrics) or "text".
    """

    name: str
    domain: str
    path: str
    instruction: str
    metrics: tuple[str, ...]
    labels: tuple[str, ...] | None
    answer_format: str | None
    seed_task: str | None
    test: list[dict[str, Any]] = field(repr=False)
    demos: list[dict[str, Any]] = field(repr=False)

    @property
    def kind(self) -> str:
        if self.labels or all(row.get("choices") for row in self.test):
            return "choice"
        if "entity_f1" in self.metrics:
            return "entities"
        if set(self.metrics) <= NUMERIC_METRICS:
            return "numeric"
        return "text"

    @cached_property
    def entity_types(self) -> tuple[str, ...] | None:
        """The entity types of a typed entity task (every gold is `Type: a; b` lines),
        in order of first appearance; None for an untyped one."""
        if self.kind != "entities":
            return None
        typed = [typed_entities(row["output"]) for row in self.test]
        if not all(t is not None for t in typed):
            return None
        return tuple(dict.fromkeys(name for t in typed for name in t))

    @property
    def primary_metric(self) -> str:
        return self.metrics[0]

    def choices(self, row: dict[str, Any]) -> list[str]:
        """The label set a row is scored over: its own `choices`, else the task's labels."""
        return list(row.get("choices") or self.labels or ())


def read_task_jsonl(path: Path, labels: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """Read and validate one task JSONL file; raise TaskError naming file and line.

    With `labels`, a row without its own `choices` must have one of them as output.
    """
    rows, first_line_of_id = [], {}
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TaskError(f"{path}: not UTF-8 text ({exc.reason})") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TaskError(f"{path}:{number}: invalid JSON: {exc.msg} (column {exc.colno})") from None
        problem = _row_problem(row)
        if not problem and labels and not row.get("choices") and row["output"] not in labels:
            problem = f"output '{row['output']}' is not one of the task's labels {list(labels)}"
        if problem:
            raise TaskError(f"{path}:{number}: {problem}")
        row["id"] = str(row["id"])
        if row["id"] in first_line_of_id:
            raise TaskError(
                f"{path}:{number}: duplicate id '{row['id']}' (first at line {first_line_of_id[row['id']]})"
            )
        first_line_of_id[row["id"]] = number
        rows.append(row)
    return rows


def _row_problem(row: Any) -> str | None:
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    for name in ("id", "input", "output"):
        if name not in row:
            return f"missing field '{name}'"
    if not isinstance(row["id"], (str, int)) or str(row["id"]) == "":
        return "field 'id' must be a non-empty string"
    for name in ("input", "output"):
        if not isinstance(row[name], str):
            return f"field '{name}' must be a string, got {type(row[name]).__name__}"
    choices = row.get("choices")
    if choices is not None:
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            return "field 'choices' must be a non-empty list of strings"
        if row["output"] not in choices:
            return f"output '{row['output']}' is not one of choices {choices}"
    if "meta" in row and not isinstance(row["meta"], dict):
        return "field 'meta' must be an object"
    return None


def _read_flat_yaml(text: str) -> dict[str, Any] | None:
    """task.yaml written as one `field: value` per line, where a value may hold ': '
    unquoted ("instruction: answer in two lines: 'Chemicals: a'"), which YAML rejects:
    each value is read as YAML when it is a plain value or list, else as the text itself.
    None when the file has any other shape."""
    data: dict[str, Any] = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = re.match(r"([A-Za-z_]\w*):(?:\s+(.*))?$", line)
        if not match:
            return None
        raw = (match.group(2) or "").strip()
        try:
            value = yaml.load(raw, Loader=_TaskYamlLoader)
        except yaml.YAMLError:
            value = raw
        data[match.group(1)] = raw if isinstance(value, dict) else value
    return data


def _read_task_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.load(text, Loader=_TaskYamlLoader) or {}
    except yaml.YAMLError as exc:
        data = _read_flat_yaml(text)
        if data is None:
            mark = getattr(exc, "problem_mark", None)
            raise TaskError(f"{path}:{mark.line + 1 if mark else 1}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise TaskError(f"{path}:1: task.yaml must be a mapping")
    unknown = set(data) - TASK_YAML_FIELDS
    if unknown:
        raise TaskError(
            f"{path}: unknown field(s) {', '.join(sorted(unknown))} "
            f"(fields: {', '.join(sorted(TASK_YAML_FIELDS))})"
        )
    return data


def _metric_list(value: Any, path: Path) -> tuple[str, ...] | None:
    if value is None:
        return None
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names:
        raise TaskError(f"{path}: 'metric' must be a metric name or a non-empty list")
    bad = [n for n in names if n not in METRICS]
    if bad:
        raise TaskError(f"{path}: unknown metric(s) {bad} (known: {', '.join(METRICS)})")
    if "numeric_match" in names and "numeric_match_scaled" not in names:
        # The FinQA x/100, x*100 variant is reported beside the main figure, never in it.
        at = names.index("numeric_match") + 1
        names = [*names[:at], "numeric_match_scaled", *names[at:]]
    return tuple(names)


def load_task(directory: str | Path, domain: str | None = None) -> Task:
    """Load one task directory (`test.jsonl` required); raise TaskError on any problem."""
    directory = Path(directory)
    test_path = directory / "test.jsonl"
    if not test_path.is_file():
        raise TaskError(f"{directory}: not a task directory (no test.jsonl)")
    meta_path = directory / "task.yaml"
    meta = _read_task_yaml(meta_path)
    labels = meta.get("labels")
    if labels is not None and (
        not isinstance(labels, list) or not labels or not all(isinstance(x, (str, int)) for x in labels)
    ):
        raise TaskError(f"{meta_path}: 'labels' must be a non-empty list of strings")
    labels = tuple(str(x) for x in labels) if labels else None
    test = read_task_jsonl(test_path, labels)
    if not test:
        raise TaskError(f"{test_path}: no examples")
    demos: list[dict[str, Any]] = []
    for split in DEMO_SPLITS:
        if (directory / f"{split}.jsonl").is_file():
            demos = read_task_jsonl(directory / f"{split}.jsonl", labels)
            break
    metrics = _metric_list(meta.get("metric", meta.get("metrics")), meta_path)
    if metrics is None:
        has_choices = labels or all(row.get("choices") for row in test)
        metrics = ("accuracy", "macro_f1") if has_choices else ("rouge_l",)
    return Task(
        name=str(meta.get("name") or directory.name),
        domain=str(meta.get("domain") or domain or directory.resolve().parent.name),
        path=str(directory),
        instruction=str(meta.get("instruction") or "").strip(),
        metrics=metrics,
        labels=labels,
        answer_format=meta.get("answer_format"),
        seed_task=meta.get("seed_task"),
        test=test,
        demos=demos,
    )


def resolve_task_spec(spec: str) -> tuple[Path, str | None]:
    """`builtin:DOMAIN` -> the shipped folder and its domain; a path -> itself."""
    if spec.startswith("builtin:"):
        domain = spec.split(":", 1)[1]
        folder = BUILTIN_TASKS / domain
        if not folder.is_dir():
            known = sorted(p.name for p in BUILTIN_TASKS.iterdir()) if BUILTIN_TASKS.is_dir() else []
            raise TaskError(f"unknown task set '{spec}' (builtin: {', '.join(known) or 'none'})")
        return folder, domain
    path = Path(spec).expanduser()
    if not path.exists():
        raise TaskError(f"{spec}: task directory not found")
    return path, None


def find_task_dirs(root: Path) -> list[Path]:
    """`root` itself if it is a task directory, else every task directory below it."""
    if (root / "test.jsonl").is_file():
        return [root]
    return sorted(p.parent for p in root.rglob("test.jsonl"))


def load_tasks(specs: list[str]) -> list[Task]:
    """Expand task specs (directories, trees of them, builtin:DOMAIN) into loaded tasks.

    Task names must be unique across the specs, since outputs are keyed by name.
    """
    tasks: list[Task] = []
    seen: dict[str, str] = {}
    for spec in specs:
        root, domain = resolve_task_spec(spec)
        directories = find_task_dirs(root)
        if not directories:
            raise TaskError(f"{spec}: no task directories (folders holding test.jsonl) found")
        for directory in directories:
            resolved = str(directory.resolve())
            if resolved in seen.values():
                continue
            task = load_task(directory, domain)
            if task.name in seen:
                raise TaskError(
                    f"two tasks named '{task.name}': {seen[task.name]} and {directory}; "
                    "set distinct `name`s in their task.yaml"
                )
            seen[task.name] = resolved
            tasks.append(task)
    return tasks
