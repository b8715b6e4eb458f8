"""Evaluation: the base model and any number of adapters on domain tasks.

The stage is `requests -> model replicas -> predictions -> metrics -> report`:
- `build_requests` turns every (task, shot, example, model) into a prompt: chat
  messages with k demonstrations (from the task's dev/train split or the domain's
  seeds, never a test row); the backend renders them with the chat template or a
  plain template. A label set the instruction does not spell out is named in the prompt.
- `run_requests` is all the model work, on one backend holding the base and every
  adapter (mixed-adapter batches): classification and multiple choice are scored
  by log-likelihood of each label (as lm-evaluation-harness does), by greedy
  generation, or both (`eval.scoring=both`: generation is the headline, as in the
  paper); entity lists, numbers and free text by greedy generation.
- `prediction_record` parses each output (label, entity list, number, text) and
  scores it; `task_metrics` computes every metric with a seeded bootstrap CI and
  a paired CI for each model's difference from the base, once per scoring.
Ray Data feeds request batches to model actors (`selfspec.execution.ModelWorker`,
`eval.replicas` of them, each with `eval.num_cpus_per_replica` CPUs and as many torch
threads), so the base model is loaded once per replica whatever the number of adapters.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shlex
import sys
import time
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from selfspec.config import ConfigError, RunConfig, dump_config
from selfspec.io import RunDir, atomic_write_text, file_digest, run_dir_for, write_json, write_jsonl
from selfspec.metrics import (
    bootstrap_values,
    bootstrap_weights,
    example_score,
    extract_entities,
    extract_label,
    extract_typed_entities,
    gold_number,
    interval,
    metric_stats,
    normalize_text,
    paired_difference,
    parse_final_number,
    parse_number,
    score_with_ci,
    scoring_meta,
)
from selfspec.schema import user_message
from selfspec.tasks import Task, TaskError, load_tasks

BASE = "base"
# Plain-template turns start with "### "; chat models stop at their end-of-turn token.
GENERATE_STOP = ("\n### ",)
# A label answer needs a few tokens; more only lets a small model ramble.
CHOICE_MAX_NEW_TOKENS = 16


# -- models --------------------------------------------------------------------
def resolve_models(models: list[str] | None, run_dir: RunDir) -> dict[str, str | None]:
    """`["base", ADAPTER_DIR, ...]` -> {name: adapter dir or None for the base}.

    An adapter's name is its directory's basename. With no list: the base and every
    adapter directory under the run's `adapters/` (checkpoints excluded).
    """
    if not models:
        try:
            root = run_dir.local() / "adapters"
        except ValueError:  # a remote run directory: name the adapters explicitly
            root = None
        found = []
        if root is not None and root.is_dir():
            found = sorted(
                str(p.parent) for p in root.rglob("adapter_config.json") if "checkpoint" not in str(p)
            )
        models = [BASE, *found]
    resolved: dict[str, str | None] = {}
    for spec in models:
        spec = spec.strip()
        if spec == BASE:
            name, path = BASE, None
        else:
            folder = Path(spec).expanduser()
            if not (folder / "adapter_config.json").is_file():
                raise FileNotFoundError(f"{spec}: not a PEFT adapter directory (no adapter_config.json)")
            name, path = folder.resolve().name, str(folder.resolve())
        if name in resolved:
            raise ConfigError(
                f"two models named '{name}' in --models; adapter names are directory basenames, "
                "so give the directories distinct names"
            )
        resolved[name] = path
    return resolved


def scorings_of(scoring: str) -> list[str]:
    """The scorings of choice tasks a run reports, headline first."""
    return ["generate", "loglik"] if scoring == "both" else [scoring]


def task_scorings(task: Task, scoring: str) -> list[str]:
    """How a task's answers are scored: choice tasks by each configured scoring, the
    others by generation only."""
    return scorings_of(scoring) if task.kind == "choice" else ["generate"]


# -- prompts -------------------------------------------------------------------
def names_every_label(instruction: str, labels: tuple[str, ...]) -> bool:
    """Whether the instruction already spells out each label (whole words, any case)."""
    return all(extract_label(instruction, [label]) for label in labels)


def user_content(instruction: str, row: dict[str, Any], labels: tuple[str, ...] | None) -> str:
    """The user turn: instruction and input as in training data, plus options when a
    row's choices are its own (multiple choice) rather than the task's label set, or
    the label set when the instruction does not name every label (ChemProt's 12)."""
    text = user_message(instruction, row["input"])
    choices = row.get("choices")
    if choices and tuple(choices) != tuple(labels or ()):
        text += "\n\nOptions:\n" + "\n".join(f"- {c}" for c in choices)
    elif labels and not names_every_label(instruction, labels):
        text += f"\n\nAnswer with one of: {', '.join(labels)}."
    return text


def build_messages(task: Task, row: dict[str, Any], demos: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Chat messages: one user/assistant pair per demo, then the example's user turn."""
    messages = []
    for demo in demos:
        instruction = demo.get("instruction") or task.instruction
        messages.append({"role": "user", "content": user_content(instruction, demo, task.labels)})
        messages.append({"role": "assistant", "content": demo["output"]})
    messages.append({"role": "user", "content": user_content(task.instruction, row, task.labels)})
    return messages


def seed_demo_pool(task: Task, seed_sets: list) -> list[dict[str, Any]]:
    """Seeds of the task's domain that fit it: `seed_task` from task.yaml when set, else
    the seed task type whose instructions are closest (ROUGE-L) to the task's, among
    seeds whose answers lie in the label set."""
    from selfspec.metrics import rouge_l

    seeds = [dict(s) for seed_set in seed_sets if seed_set.domain == task.domain for s in seed_set.seeds]
    if task.seed_task:
        return [s for s in seeds if s["task"] == task.seed_task]
    if task.labels:
        labels = {normalize_text(label) for label in task.labels}
        seeds = [s for s in seeds if normalize_text(s["output"]) in labels]
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for seed in seeds:
        groups[seed["task"]].append(seed)
    if not groups:
        return []

    def closeness(group: list[dict[str, Any]]) -> float:
        return sum(rouge_l(s["instruction"], task.instruction) for s in group) / len(group)

    return max(groups.values(), key=closeness)


def demo_pool(task: Task, source: str, seed_sets: list) -> list[dict[str, Any]]:
    """Few-shot demonstrations for a task: its dev/train split, else fitting seeds;
    any whose input is a test row's input is left out (a demo must never be a test row)."""
    test_inputs = {normalize_text(row["input"]) for row in task.test}

    def held_out(pool: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [d for d in pool if not d.get("input") or normalize_text(d["input"]) not in test_inputs]

    if source in ("auto", "split") and task.demos:
        return held_out(task.demos)
    if source == "split":
        raise TaskError(f"{task.path}: eval.demos=split but the task has no dev.jsonl or train.jsonl")
    pool = held_out(seed_demo_pool(task, seed_sets))
    if not pool:
        raise TaskError(
            f"{task.path}: no few-shot demonstrations: no dev/train split and no fitting seeds of "
            f"domain '{task.domain}' (generate.seeds or seeds/{task.domain}.yaml); add dev.jsonl, "
            "set seed_task in task.yaml or use eval.shots=[0]"
        )
    return pool


def pick_demos(pool: list[dict[str, Any]], k: int, row_id: str, seed: int) -> list[dict[str, Any]]:
    """k demos for one example, seeded by the example id (the same for every model)."""
    candidates = [d for d in pool if str(d.get("id")) != row_id]
    rng = random.Random(f"{seed}:{row_id}")
    return rng.sample(candidates, min(k, len(candidates)))


def load_demo_seeds(config: RunConfig, domains: set[str]) -> list:
    """Seed sets for few-shot demos: `generate.seeds`, plus `seeds/<domain>.yaml` for
    task domains those do not cover."""
    from selfspec.seeds import find_seed_file, load_seeds

    seed_sets = [load_seeds(find_seed_file(path)) for path in config.generate.seeds]
    for domain in sorted(domains - {s.domain for s in seed_sets}):
        path = find_seed_file(f"seeds/{domain}.yaml")
        if path.is_file():
            seed_sets.append(load_seeds(path))
    return seed_sets


def build_requests(
    tasks: list[Task], models: dict[str, str | None], config: RunConfig, seed_sets: list
) -> list[dict[str, Any]]:
    """Every (task, shot, example, model) as a JSON-able request, examples in file order."""
    cfg = config.eval
    requests = []
    for task in tasks:
        rows = task.test[: cfg.max_examples]
        modes = task_scorings(task, cfg.scoring)
        max_new = min(cfg.max_new_tokens, CHOICE_MAX_NEW_TOKENS) if task.kind == "choice" else cfg.max_new_tokens
        for shot in cfg.shots:
            pool = demo_pool(task, cfg.demos, seed_sets) if shot else []
            for index, row in enumerate(rows):
                messages = build_messages(task, row, pick_demos(pool, shot, row["id"], cfg.seed))
                for model, path in models.items():
                    for mode in modes:
                        requests.append(
                            {
                                "model": model,
                                "adapter": None if path is None else model,
                                "task": task.name,
                                "shot": shot,
                                "index": index,
                                "messages": messages,
                                "mode": mode,
                                "choices": task.choices(row) if mode == "loglik" else None,
                                "max_new_tokens": max_new,
                            }
                        )
    return requests


# -- model work ----------------------------------------------------------------
def run_requests(backend, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Score or generate every request on one backend: `{"output", "logliks"}` each."""
    from selfspec.models import SamplingParams

    results: list[dict[str, Any]] = [{} for _ in requests]
    scored = [i for i, r in enumerate(requests) if r["mode"] == "loglik"]
    if scored:
        pairs = [(i, c) for i in scored for c in requests[i]["choices"]]
        values = backend.loglikelihood(
            [(requests[i]["messages"], c) for i, c in pairs], adapters=[requests[i]["adapter"] for i, _ in pairs]
        )
        for (i, choice), value in zip(pairs, values):
            results[i].setdefault("logliks", {})[choice] = value
        for i in scored:
            logliks = results[i]["logliks"]
            results[i]["output"] = max(requests[i]["choices"], key=lambda c: logliks[c])
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, request in enumerate(requests):
        if request["mode"] == "generate":
            by_length[request["max_new_tokens"]].append(i)
    for max_new, indices in by_length.items():
        params = SamplingParams(temperature=0.0, max_new_tokens=max_new, stop=GENERATE_STOP)
        completions = backend.generate(
            [requests[i]["messages"] for i in indices], params, adapters=[requests[i]["adapter"] for i in indices]
        )
        for i, completion in zip(indices, completions):
            results[i] = {"output": completion[0].text, "logliks": None}
    return results


def run_request_batch(backend, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The model-actor step: rows carry JSON requests and get JSON results back.

    JSON keeps Arrow from merging per-task label dicts and mixed-type fields into one
    struct type between Ray Data stages.
    """
    results = run_requests(backend, [json.loads(row["request"]) for row in rows])
    return [{"key": row["key"], "result": json.dumps(result)} for row, result in zip(rows, results)]


class AnswerStore:
    """Finished request results, appended per batch to the run's JSONL file and kept, so an
    evaluation killed midway resumes where it stopped, and a later evaluation of the run (a
    round-2 adapter beside round 1's, 3-shot beside 0-shot) answers only its new requests. A result is keyed by its request and the identity of the model that answered
    it (the model section, the adapter's weights), so a changed model or prompt never
    reuses a stale answer. A torn last line (a kill mid-write) is cut."""

    def __init__(self, path: Path, identities: dict[str, str]):
        self.path, self.identities = path, identities
        self.done: dict[str, dict[str, Any]] = {}
        if path.is_file():
            text = path.read_text()
            if text and not text.endswith("\n"):  # cut a torn last line, so appends start clean
                text = text[: text.rfind("\n") + 1]
                with open(path, "r+") as f:
                    f.truncate(len(text.encode()))
            for line in text.splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self.done[record["key"]] = record["result"]

    def key(self, request: dict[str, Any]) -> str:
        blob = json.dumps([self.identities[request["model"]], request], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def add(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())


def model_identities(config: RunConfig, models: dict[str, str | None]) -> dict[str, str]:
    """What decides a model's answers: the model section, plus an adapter's config and weights."""
    base = config.section_hash("model")
    identities = {}
    for name, path in models.items():
        parts = [base]
        if path is not None:
            parts += [file_digest(Path(path) / f) for f in ("adapter_config.json", "adapter_model.safetensors")
                      if (Path(path) / f).is_file()]
        identities[name] = "-".join(parts)
    return identities


def execute(
    requests: list[dict[str, Any]],
    config: RunConfig,
    models: dict[str, str | None],
    executor: str = "ray",
    store: AnswerStore | None = None,
) -> list[dict[str, Any]]:
    """Run requests on model replicas (Ray Data actors, or in-process with executor="local"),
    each holding the base and every adapter; results come back in request order. Requests
    already in `store` are not run again; new results are added to it per batch."""
    from tqdm import tqdm

    from selfspec.execution import map_with_model

    cfg = config.eval
    if executor == "ray":
        from selfspec.runtime import quiet_ray_data

        quiet_ray_data()
    keys = [store.key(r) for r in requests] if store is not None else []
    results: list[dict[str, Any] | None] = [store.done.get(k) for k in keys] if store is not None else [None] * len(requests)
    rows = [{"key": i, "request": json.dumps(r)} for i, r in enumerate(requests) if results[i] is None]
    done_before = len(requests) - len(rows)
    if done_before:
        print(f"eval: {done_before} of {len(requests)} requests answered before (answers.jsonl); answering the other {len(rows)}")

    def finished(new_rows: list[dict[str, Any]]) -> None:
        if store is not None:
            store.add([{"key": keys[row["key"]], "result": json.loads(row["result"])} for row in new_rows])
        bar.update(len(new_rows))

    with tqdm(total=len(requests), initial=done_before, desc="eval", unit="request") as bar:
        out = map_with_model(
            rows,
            run_request_batch,
            config.model,
            executor=executor,
            replicas=cfg.replicas,
            batch_size=cfg.batch_size,
            num_cpus=cfg.num_cpus_per_replica,
            num_gpus=cfg.num_gpus_per_replica,
            adapters={name: path for name, path in models.items() if path is not None},
            progress=finished,
        )
    for row in out:
        results[row["key"]] = json.loads(row["result"])
    missing = sum(r is None for r in results)
    if missing:
        raise RuntimeError(f"{missing} evaluation requests returned no result")
    return results  # type: ignore[return-value]


# -- parsing and scoring -------------------------------------------------------
def parse_answer(task: Task, row: dict[str, Any], output: str, logliks: dict[str, float] | None) -> Any:
    """The answer in the form its metrics compare: a label (or None), a sorted entity
    list ([type, mention] pairs for a typed task), a number (or None; the final number
    for numeric_match, the first for numeric_em; text where the gold is yes / no) or
    stripped text."""
    if task.kind == "choice":
        return output if logliks is not None else extract_label(output, task.choices(row))
    if task.kind == "entities":
        return extract_typed_entities(output, task.entity_types) if task.entity_types else extract_entities(output)
    if task.kind == "numeric":
        if gold_number(row["output"], row.get("meta")) is None:
            return output.strip()
        return parse_final_number(output) if "numeric_match" in task.metrics else parse_number(output)
    return output.strip()


def prediction_record(
    task: Task, row: dict[str, Any], request: dict[str, Any], result: dict[str, Any], rel_tol: float
) -> dict[str, Any]:
    """One line of predictions/<model>/<task>.jsonl; `gold_meta` holds the row's meta
    that its metrics read (TAT-QA's answer type and scale...), when it has any."""
    parsed = parse_answer(task, row, result["output"], result.get("logliks"))
    meta = scoring_meta(row.get("meta"))
    record = {
        "id": row["id"],
        "shot": request["shot"],
        "scoring": request["mode"],
        "prompt": request["messages"],
        "output": result["output"],
        "parsed": parsed,
        "gold": row["output"],
        "score": round(example_score(task.primary_metric, parsed, row["output"], rel_tol, meta), 6),
    }
    if meta:
        record["gold_meta"] = meta
    if result.get("logliks") is not None:
        record["logliks"] = result["logliks"]
    return record


def task_metrics(
    task: Task,
    records: dict[str, list[dict[str, Any]]],
    reference: str,
    weights: np.ndarray | None,
    rel_tol: float,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, np.ndarray]]:
    """Scores of one task at one shot count.

    Returns, per model, `{"n", metric: {value, ci_low, ci_high}}`; per other model, the
    paired difference from `reference`; and per model the bootstrap values of the
    task's first metric (for domain averages). All models share the resamples `weights`.
    """
    n = len(next(iter(records.values())))
    stats = {
        model: {
            metric: metric_stats(
                metric, [r["parsed"] for r in rows], [r["gold"] for r in rows], rel_tol,
                [r.get("gold_meta") for r in rows],
            )
            for metric in task.metrics
        }
        for model, rows in records.items()
    }
    scores = {
        model: {"n": n, **{m: score_with_ci(m, s, weights) for m, s in by_metric.items()}}
        for model, by_metric in stats.items()
    }
    deltas = {}
    if reference in stats:
        for model, by_metric in stats.items():
            if model != reference:
                deltas[model] = {
                    m: paired_difference(m, s, stats[reference][m], weights) for m, s in by_metric.items()
                }
    boot = {}
    if weights is not None:
        boot = {m: bootstrap_values(task.primary_metric, s[task.primary_metric], weights) for m, s in stats.items()}
    return scores, deltas, boot


def task_seed(seed: int, task: Task) -> list[int]:
    """Each task draws its own resamples, so domain averages combine independent ones."""
    return [seed, zlib.crc32(task.name.encode())]


def domain_averages(
    tasks: list[Task], scores: dict[str, Any], boots: dict[tuple[str, str, str], np.ndarray],
    shots: list[int], reference: str,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per model, domain and shot: the mean of each metric over the domain's tasks that
    report it, and `primary`, the mean of each task's first metric, with a bootstrap CI
    (tasks resampled independently); per other model, the paired difference of
    `primary` from `reference` with its CI."""
    averages: dict[str, Any] = {}
    differences: dict[str, Any] = {}
    for domain in sorted({t.domain for t in tasks}):
        members = [t for t in tasks if t.domain == domain]
        for shot in map(str, shots):

            def mean_boot(model: str) -> np.ndarray | None:
                if not boots:
                    return None
                return np.mean([boots[(model, t.name, shot)] for t in members], axis=0)

            for model, by_task in scores.items():
                primary = sum(by_task[t.name][shot][t.primary_metric]["value"] for t in members) / len(members)
                entry: dict[str, Any] = {"tasks": len(members), "primary": round(primary, 6)}
                values = mean_boot(model)
                if values is not None:
                    entry["primary_ci_low"], entry["primary_ci_high"] = (round(x, 6) for x in interval(values))
                for metric in sorted({m for t in members for m in t.metrics}):
                    values = [by_task[t.name][shot][metric]["value"] for t in members if metric in t.metrics]
                    entry[metric] = round(sum(values) / len(values), 6)
                averages.setdefault(model, {}).setdefault(domain, {})[shot] = entry
            if reference not in scores:
                continue
            for model in scores:
                if model == reference:
                    continue
                diff = {"value": round(averages[model][domain][shot]["primary"] - averages[reference][domain][shot]["primary"], 6),
                        "ci_low": None, "ci_high": None}
                if boots:
                    low, high = interval(mean_boot(model) - mean_boot(reference))
                    diff["ci_low"], diff["ci_high"] = round(low, 6), round(high, 6)
                differences.setdefault(model, {}).setdefault(domain, {})[shot] = diff
    return averages, differences


def collect(
    tasks: list[Task], models: dict[str, str | None], requests: list[dict[str, Any]],
    results: list[dict[str, Any]], rel_tol: float,
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Prediction records per model and task, in request order."""
    by_name = {t.name: t for t in tasks}
    predictions: dict[str, dict[str, list[dict[str, Any]]]] = {m: {t.name: [] for t in tasks} for m in models}
    for request, result in zip(requests, results):
        task = by_name[request["task"]]
        row = task.test[request["index"]]
        predictions[request["model"]][task.name].append(prediction_record(task, row, request, result, rel_tol))
    return predictions


def score_section(
    tasks: list[Task], models: dict[str, str | None], predictions: dict[str, dict[str, list[dict[str, Any]]]],
    config: RunConfig, reference: str, scoring: str,
) -> dict[str, Any]:
    """`results`, `deltas`, `domains` and `domain_deltas` with choice tasks scored by
    `scoring` and the other tasks by generation: what a run with eval.scoring=`scoring`
    reports. Every scoring of a task shares its bootstrap resamples."""
    cfg = config.eval
    scores: dict[str, Any] = {m: {} for m in models}
    deltas: dict[str, Any] = {m: {} for m in models if m != reference}
    boots: dict[tuple[str, str, str], np.ndarray] = {}
    for task in tasks:
        n = len(task.test[: cfg.max_examples])
        weights = bootstrap_weights(n, cfg.bootstrap, task_seed(cfg.seed, task)) if cfg.bootstrap else None
        mode = scoring if task.kind == "choice" else "generate"
        for shot in cfg.shots:
            records = {
                m: [r for r in predictions[m][task.name] if r["shot"] == shot and r["scoring"] == mode] for m in models
            }
            task_scores, task_deltas, task_boots = task_metrics(task, records, reference, weights, cfg.numeric_rel_tol)
            for model, value in task_scores.items():
                scores[model].setdefault(task.name, {})[str(shot)] = value
            for model, value in task_deltas.items():
                deltas[model].setdefault(task.name, {})[str(shot)] = value
            for model, values in task_boots.items():
                boots[(model, task.name, str(shot))] = values
    domains, domain_deltas = domain_averages(tasks, scores, boots, cfg.shots, reference)
    return {"results": scores, "deltas": deltas, "domains": domains, "domain_deltas": domain_deltas}, boots


def against_best_reference(
    tasks: list[Task], sections: dict[str, dict[str, Any]], boots: dict[str, dict[tuple[str, str, str], np.ndarray]],
    headline: str, reference: str, shots: list[int],
) -> dict[str, Any]:
    """Per other model, domain and shot: its headline domain average less the reference's best
    domain average under any scoring (the issue's "beats the base's best figure": a gain that
    is more than answer format), with a paired CI; every scoring of a task shares its
    bootstrap resamples, so the pairs hold across scorings."""
    out: dict[str, Any] = {}
    for model in sections[headline]["domains"]:
        if model == reference:
            continue
        for domain, by_shot in sections[headline]["domains"][model].items():
            members = [t for t in tasks if t.domain == domain]
            for shot in map(str, shots):
                best = max(sections, key=lambda s: sections[s]["domains"][reference][domain][shot]["primary"])
                ref_value = sections[best]["domains"][reference][domain][shot]["primary"]
                entry: dict[str, Any] = {
                    "reference_scoring": best,
                    "reference": ref_value,
                    "value": round(by_shot[shot]["primary"] - ref_value, 6),
                    "ci_low": None,
                    "ci_high": None,
                }
                if boots[headline]:
                    mine = np.mean([boots[headline][(model, t.name, shot)] for t in members], axis=0)
                    theirs = np.mean([boots[best][(reference, t.name, shot)] for t in members], axis=0)
                    entry["ci_low"], entry["ci_high"] = (round(x, 6) for x in interval(mine - theirs))
                out.setdefault(model, {}).setdefault(domain, {})[shot] = entry
    return out


def summarize(
    tasks: list[Task], models: dict[str, str | None], predictions: dict[str, dict[str, list[dict[str, Any]]]],
    config: RunConfig,
) -> dict[str, Any]:
    """The metrics document (metrics.json) from prediction records.

    `results`, `deltas`, `domains` and `domain_deltas` hold the headline scoring
    (`scorings[0]`: generation under eval.scoring=both); `by_scoring` holds the same
    four for each other scoring (log-likelihood under both), keyed by its name; with more
    than one scoring, `against_best_reference` holds each model's headline domain average
    less the reference's best under any scoring, with a paired CI.
    """
    cfg = config.eval
    reference = BASE if BASE in models else next(iter(models))
    scorings = scorings_of(cfg.scoring)
    scored = {s: score_section(tasks, models, predictions, config, reference, s) for s in scorings}
    sections = {s: section for s, (section, _) in scored.items()}
    best = {}
    if len(scorings) > 1 and len(models) > 1:
        best = against_best_reference(tasks, sections, {s: b for s, (_, b) in scored.items()}, scorings[0], reference, cfg.shots)
    metrics = {
        "run": config.name,
        "model_ref": config.model.ref,
        "models": models,
        "reference": reference,
        "shots": cfg.shots,
        "scoring": cfg.scoring,
        "scorings": scorings,
        "bootstrap": cfg.bootstrap,
        "seed": cfg.seed,
        "tasks": {
            t.name: {
                "domain": t.domain,
                "path": t.path,
                "kind": t.kind,
                "metrics": list(t.metrics),
                "scorings": task_scorings(t, cfg.scoring),
                "n": len(t.test[: cfg.max_examples]),
                "n_total": len(t.test),
            }
            for t in tasks
        },
        **sections[scorings[0]],
        "by_scoring": {s: sections[s] for s in scorings[1:]},
        **({"against_best_reference": best} if best else {}),
    }
    return metrics


# -- the stage -----------------------------------------------------------------
def run_eval(
    config: RunConfig,
    run_dir: RunDir,
    tasks: list[str] | None = None,
    models: list[str] | None = None,
    out: str | None = None,
    command: str | None = None,
    executor: str = "ray",
) -> dict[str, Any]:
    """Evaluate the base and adapters on task directories; write the eval folder.

    `tasks` are task specs (default `eval.tasks`), `models` are "base" and adapter
    directories (default: base plus the run's adapters); `executor` is "ray" (Ray Data
    model actors) or "local" (in-process). Writes, under `out` (default
    `runs/<name>/eval/`): metrics.json, predictions/<model>/<task>.jsonl, results.md,
    report.html and config.yaml. Returns the metrics document. The run's
    `eval/answers.jsonl` holds every answered request: a rerun (after a kill, or with more
    models, tasks or shots, or another `out`) answers only the rest.
    """
    from selfspec.report import render_html, render_markdown

    started = time.time()
    task_list = load_tasks(list(tasks or config.eval.tasks))
    model_paths = resolve_models(models, run_dir)
    needs_seeds = any(config.eval.shots) and any(
        config.eval.demos == "seeds" or not t.demos for t in task_list
    )
    seed_sets = load_demo_seeds(config, {t.domain for t in task_list}) if needs_seeds else []
    requests = build_requests(task_list, model_paths, config, seed_sets)
    folder = RunDir(out) if out else RunDir(run_dir.eval)
    try:  # the run's answers serve every evaluation of it, wherever its report goes
        store = AnswerStore(RunDir(run_dir.eval).local() / "answers.jsonl", model_identities(config, model_paths))
    except ValueError:  # a remote run directory: answered whole, without a store
        store = None
    results = execute(requests, config, model_paths, executor, store)
    predictions = collect(task_list, model_paths, requests, results, config.eval.numeric_rel_tol)
    metrics = summarize(task_list, model_paths, predictions, config)
    metrics["command"] = command
    metrics["seconds"] = round(time.time() - started, 1)
    metrics["requests"] = len(requests)

    for model, by_task in predictions.items():
        for task_name, rows in by_task.items():
            write_jsonl(folder.path("predictions", model, f"{task_name}.jsonl"), rows)
    atomic_write_text(folder.path("config.yaml"), dump_config(config))
    atomic_write_text(folder.path("results.md"), render_markdown(metrics))
    atomic_write_text(folder.path("report.html"), render_html(metrics, predictions, run_dir))
    # Written last: its presence marks a finished evaluation (the pipeline's ledger checks it).
    write_json(folder.path("metrics.json"), metrics)
    return metrics


def cli(config: RunConfig, args) -> int:
    """`selfspec eval [--tasks A,B] [--models base,DIR,...] [--out DIR]`."""
    from selfspec.report import render_markdown
    from selfspec.runtime import init_ray

    def split(value: str | None) -> list[str] | None:
        return [v.strip() for v in value.split(",") if v.strip()] if value else None

    run_dir = run_dir_for(config)
    tasks, models = split(args.tasks), split(args.models)
    try:
        # Bad task files or adapter paths fail here, before Ray starts.
        load_tasks(list(tasks or config.eval.tasks))
        resolve_models(models, run_dir)
        executor = init_ray()
        metrics = run_eval(
            config, run_dir, tasks=tasks, models=models, out=args.out,
            command=shlex.join(["selfspec", *sys.argv[1:]]), executor=executor,
        )
    except TaskError as exc:
        print(f"selfspec eval: error: {exc}", file=sys.stderr)
        return 2
    folder = args.out or run_dir.eval
    print(render_markdown(metrics))
    print(f"report: {folder.rstrip('/')}/report.html (metrics.json, results.md, predictions/ beside it)")
    return 0

