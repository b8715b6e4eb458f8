"""`selfspec generate`: rounds of instruction generation, dedup and response generation.

Each round: build prompts from sampled seeds -> the model writes new tasks (Ray
Data over model replicas) -> parse and filter -> global ROUGE-L dedup on the
driver -> the model answers the kept tasks -> filter -> one Parquet shard and a
manifest entry, written atomically. A rerun reads the manifest and continues
with the next round, so finished rounds are never regenerated.
"""

from __future__ import annotations

import functools
import math
import time
from collections import Counter
from dataclasses import replace
from typing import Any, Callable

from selfspec.config import ConfigError, RunConfig, dump_config
from selfspec.data_profile import profile
from selfspec.dedup import InputScopedDeduper, RougeDeduper, rouge_tokens
from selfspec.execution import map_with_model
from selfspec.io import (
    RunDir,
    atomic_write_text,
    exists,
    read_json,
    read_parquet,
    run_dir_for,
    write_json,
    write_jsonl,
    write_parquet,
)
from selfspec.models import SamplingParams
from selfspec.schema import Example, content_id, example_schema, seeds_by_task, to_alpaca, to_messages, user_message
from selfspec.seeds import SeedSet, find_seed_file, load_seeds
from selfspec.quality import (
    DomainRelevance,
    TaskProfile,
    answer_label,
    balance_labels,
    label_check,
    label_task,
    majority_label,
    majority_seed_label,
    off_form,
    relabel_with_majority,
    response_budget,
    select_task_mix,
    round_task_weights,
    task_profiles,
    task_text,
)
from selfspec.stages.generate_instructions import (
    ITEM_END_STOPS,
    instruction_drop_reason,
    make_prompt_rows,
    parse_given_input,
    parse_open_field,
    parse_tasks,
)
from selfspec.stages.generate_responses import (
    RESPONSE_STOPS,
    clean_response,
    collapse_repeated_items,
    copies_seed_answer,
    ground_list_items,
    response_drop_reason,
    response_rows,
)

ADAPTER_NAME = "specialized"


# -- batch functions run inside model replicas (picklable, pure over rows) ----------
def per_group(rows: list[dict[str, Any]], group_of: Callable[[dict[str, Any]], Any], run: Callable) -> list[Any]:
    """`run(key, rows)` once per group of rows (groups in key order), each result back at its
    row's place: one engine call per sampling setting within a batch of mixed rows."""
    groups: dict[Any, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(group_of(row), []).append(i)
    out: list[Any] = [None] * len(rows)
    for key in sorted(groups):
        index = groups[key]
        for i, result in zip(index, run(key, [rows[i] for i in index])):
            out[i] = result
    return out


def instruction_rows(prompts: list[dict[str, Any]], gen) -> tuple[list[dict[str, Any]], dict[str, SamplingParams]]:
    """(prompts with the name of their sampling, sorted by it so that batches share one; the
    sampling per name): free tasks, an instruction line for a given passage, an input field
    then that line."""
    # Stop where the model would start the task after the ones we keep.
    next_number = gen.num_demos + gen.instructions_per_prompt + 1
    params = SamplingParams(
        temperature=gen.temperature,
        top_p=gen.top_p,
        max_new_tokens=gen.instruction_max_new_tokens,
        stop=(f"\n{next_number}.", f"\n{next_number} .", *(ITEM_END_STOPS if gen.instructions_per_prompt == 1 else ())),
        seed=gen.seed,
    )
    # An instruction for a given passage is one line: stop at its end, not at the token limit.
    given_temperature = gen.temperature if gen.given_input_temperature is None else gen.given_input_temperature
    one_line = replace(params, stop=("\n",), temperature=given_temperature)
    # An input field, then the instruction line: stop at the blank line after it.
    field_then_line = replace(params, stop=("\n\n", f"\n{next_number}.", *ITEM_END_STOPS), temperature=given_temperature)
    sampling = {"free": params, "given": one_line, "field": field_then_line}

    def kind(prompt: dict[str, Any]) -> str:
        return "field" if prompt.get("open_field") else "given" if prompt["given_input"] else "free"

    order = list(sampling)
    return sorted(({**p, "sampling": kind(p)} for p in prompts), key=lambda p: order.index(p["sampling"])), sampling


def response_params(gen) -> SamplingParams:
    """Open-ended answers: greedy, at most `response_max_new_tokens` (a row may carry a smaller
    budget), stopped at the next prompt marker."""
    return SamplingParams(temperature=0.0, max_new_tokens=gen.response_max_new_tokens, stop=RESPONSE_STOPS)


def open_ended_rows(rows: list[dict[str, Any]], profiles: dict[str, TaskProfile], gen) -> list[dict[str, Any]]:
    """The rows the answers stage writes a free response for (not label tasks), each with its
    task type's token budget (`response_budget`)."""
    return [
        {**r, "max_new_tokens": response_budget(profiles.get(r["task"]), gen.response_max_new_tokens)}
        for r in rows
        if not label_task(profiles, r["task"])
    ]


def write_instructions(
    backend, rows: list[dict[str, Any]], params: dict[str, SamplingParams], adapter: str | None
) -> list[dict[str, Any]]:
    """Complete instruction prompts; a row's `sampling` names its entry of `params` (free
    tasks, an instruction line for a given passage, an input field then that line)."""

    def complete(kind: str, group: list[dict[str, Any]]) -> list[dict[str, Any]]:
        kind_params = params[kind]
        seed = None if kind_params.seed is None else kind_params.seed + sum(map(ord, group[0]["prompt_id"]))
        completions = backend.generate([r["prompt"] for r in group], replace(kind_params, seed=seed), adapters=adapter)
        return [{**row, "completion": c[0].text, "finish_reason": c[0].finish_reason, "completion_tokens": c[0].completion_tokens}
                for row, c in zip(group, completions)]

    return per_group(rows, lambda r: r["sampling"], complete)


def answer_batch(backend, rows: list[dict[str, Any]], steps: dict[str, Callable]) -> list[dict[str, Any]]:
    """Answer rows with the step their `answer_step` names (labels scored or sampled, free
    responses written): one model pass serves every kind of row of a round."""
    return per_group(rows, lambda r: r["answer_step"], lambda kind, group: steps[kind](backend, group))


def write_responses(backend, rows: list[dict[str, Any]], params: SamplingParams, adapter: str | None) -> list[dict[str, Any]]:
    """Answer rows; a row's own `max_new_tokens` (its task type's budget) overrides params'."""
    completions = per_group(
        rows,
        lambda r: r.get("max_new_tokens") or params.max_new_tokens,
        lambda budget, group: backend.generate([r["messages"] for r in group], replace(params, max_new_tokens=budget), adapters=adapter),
    )
    out = []
    for row, c in zip(rows, completions):
        out.append({
            **without_prompt(row),
            "output": clean_response(c[0].text),
            "samples": [clean_response(x.text) for x in c],
            "finish_reason": c[0].finish_reason,
            "completion_tokens": sum(x.completion_tokens for x in c),
        })
    return out


CONTENT_FREE_INPUT = "N/A"


def label_scores(backend, rows: list[dict[str, Any]], adapter: str | None) -> tuple[list[list[float]], list[list[float]]]:
    """Per row, each label of its `labels` scored (log-likelihood) after the row's prompt, and
    after the same prompt with a content-free input."""
    requests, blanks = [], []
    for row in rows:
        blank = [*row["messages"][:-1], {"role": "user", "content": user_message(row["instruction"], CONTENT_FREE_INPUT)}]
        requests += [(row["messages"], label) for label in row["labels"]]
        blanks += [(blank, label) for label in row["labels"]]
    scores = iter(backend.loglikelihood(requests + blanks, adapters=adapter))
    own = [[next(scores) for _ in row["labels"]] for row in rows]
    empty = [[next(scores) for _ in row["labels"]] for row in rows]
    return own, empty


def best_label(labels: list[str], scores: list[float]) -> str:
    return labels[max(range(len(labels)), key=scores.__getitem__)]


def score_labels(backend, rows: list[dict[str, Any]], adapter: str | None) -> list[dict[str, Any]]:
    """Label rows by calibrated log-likelihood: each label's score after the row's prompt less
    its score after a content-free input; the best calibrated label is the answer (`samples`
    holds it alone: no vote to take)."""
    out = []
    for row, own, empty in zip(rows, *label_scores(backend, rows, adapter)):
        out.append(answered_with(row, best_label(row["labels"], [a - b for a, b in zip(own, empty)])))
    return out


def without_prompt(row: dict[str, Any]) -> dict[str, Any]:
    """A row to answer, less what only the model needed (its prompt and budgets)."""
    return {k: v for k, v in row.items() if k not in ("messages", "max_new_tokens", "labels")}


def answered_with(row: dict[str, Any], label: str) -> dict[str, Any]:
    """A label row answered with one label and no sampled text: no vote to take."""
    return {**without_prompt(row), "output": label, "samples": [label], "finish_reason": "stop", "completion_tokens": 0}


def label_rows_and_step(rows: list[dict[str, Any]], gen, profiles: dict[str, TaskProfile], adapter: str | None):
    """Label-task rows as `generate.label_method` answers them, and the batch function:
    calibrated log-likelihood over the type's labels, or `consistency_samples` sampled answers."""
    if gen.label_method == "calibrated":
        return [{**r, "labels": list(profiles[r["task"]].labels)} for r in rows], functools.partial(score_labels, adapter=adapter)
    params = SamplingParams(
        temperature=gen.consistency_temperature if gen.consistency_samples > 1 else 0.0,
        max_new_tokens=gen.label_max_new_tokens,
        stop=RESPONSE_STOPS,
        seed=gen.seed,
        n=gen.consistency_samples,
    )
    return rows, functools.partial(write_responses, params=params, adapter=adapter)


def row_label(row: dict[str, Any], profile: TaskProfile, gen) -> tuple[str | None, float]:
    """An answered label row's label: the clear majority of its samples (one sample: itself)."""
    agreement = gen.consistency_agreement if len(row["samples"]) > 1 else 0.0
    return majority_label(row["samples"], profile, agreement)


def unreliable_label_plan(unreliable: set[str], profiles: dict[str, TaskProfile], mode: str) -> tuple[set[str], set[str]]:
    """(types whose rows take the seeds' majority label, types that make no rows) of the label
    types the check found unreliable. "drop" makes none of them; "majority" relabels each, but
    a type whose seeds tie for the most common label has no better guess to give: no rows.
    Where that would leave no type at all, nothing is dropped: types with a majority label take
    it, tied ones keep the model's labels."""
    tied = {t for t in unreliable if majority_seed_label(profiles[t]) is None}
    dropped = unreliable if mode == "drop" else tied
    if dropped == set(profiles):
        return unreliable - tied, set()
    return unreliable - dropped, dropped


def check_seed_labels(config: RunConfig, seeds: SeedSet, profiles: dict[str, TaskProfile], executor: str) -> dict[str, Any]:
    """The label check of `generate.unreliable_labels`: every seed of a label type labelled as
    a generated row is, its demos drawn from the other seeds of its type (leave-one-out),
    against its own label."""
    gen = config.generate
    adapter = ADAPTER_NAME if gen.adapter else None
    rows, gold = [], {}
    for task, members in seeds_by_task(seeds.seeds).items():
        profile = label_task(profiles, task)
        if profile is None:
            continue
        for n, seed in enumerate(members):
            gold[seed["id"]] = (task, answer_label(seed["output"], profile) or seed["output"])
            row = {"id": seed["id"], "task": task, "instruction": seed["instruction"], "input": seed["input"]}
            rows += response_rows([row], members[:n] + members[n + 1 :], gen.response_demos)
    rows, step = label_rows_and_step(rows, gen, profiles, adapter)
    adapters = {ADAPTER_NAME: gen.adapter} if gen.adapter else None
    results: dict[str, list[tuple[str, str | None]]] = {}
    for row in _map(rows, step, config, executor, adapters, "label check on the seeds"):
        task, label = gold[row["id"]]
        results.setdefault(task, []).append((label, row_label(row, profiles[task], gen)[0]))
    return label_check(results)


# -- seeds and run state ------------------------------------------------------------
def load_seed_sets(config: RunConfig) -> list[SeedSet]:
    return [load_seeds(find_seed_file(path)) for path in config.generate.seeds]


# Keys that choose how many of the generated rows to keep, not how a row is made: a run's
# shards stay valid when they change (raise the target and generation goes on from them).
# unreliable_labels also spares the model labelling rows whose label it replaces; rows made
# that way keep the majority label if the key later becomes `keep`.
SELECTION_KEYS = {
    "target", "max_rounds", "prompts_per_round", "expected_yield", "first_round_share", "balance_labels", "label_tolerance",
    "unreliable_labels",
}


def generation_hash(config: RunConfig) -> str:
    """What makes a generated row: the manifest's resume check."""
    return config.section_hash("model", "generate", "retrieval", exclude={"generate": SELECTION_KEYS})


def read_manifest(run_dir: RunDir, config_hash: str, overwrite: bool) -> dict[str, Any]:
    path = run_dir.path("data", "manifest.json")
    if exists(path):
        manifest = read_json(path)
        if manifest["config_hash"] == config_hash:
            return manifest
        if not overwrite:
            raise ConfigError(
                f"{path}: the run holds data generated with another config "
                f"(hash {manifest['config_hash']}, now {config_hash}); "
                "use a new run name (name=...) or pass --overwrite"
            )
    return {"config_hash": config_hash, "shards": []}


class Progress:
    """A tqdm bar per stage and round; quiet when tqdm is missing or disabled."""

    def __init__(self, total: int, desc: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="row", leave=False)

    def __call__(self, rows: list) -> None:
        self.bar.update(len(rows))

    def close(self) -> None:
        self.bar.close()


def _map(rows, fn, config: RunConfig, executor: str, adapters, desc: str):
    bar = Progress(len(rows), desc)
    try:
        return map_with_model(
            rows,
            fn,
            config.model,
            executor=executor,
            replicas=config.generate.replicas,
            batch_size=config.generate.batch_size,
            num_cpus=config.generate.num_cpus_per_replica,
            num_gpus=config.generate.num_gpus_per_replica,
            adapters=adapters,
            progress=bar,
        )
    finally:
        bar.close()


# -- one round ---------------------------------------------------------------------
class Drops(Counter):
    """Dropped rows by reason, and the same per task type (`by_task`), to see which filter
    takes a type's rows."""

    def __init__(self) -> None:
        super().__init__()
        self.by_task: dict[str, Counter[str]] = {}

    def add(self, reason: str, task: str) -> None:
        self[reason] += 1
        self.by_task.setdefault(task, Counter())[reason] += 1


def parse_round(
    raw: list[dict[str, Any]], gen, drops: Drops, profiles: dict[str, TaskProfile] | None = None
) -> list[dict[str, Any]]:
    """Parsed, filtered (instruction, input) items of a round's completions, with the row
    they came from; every drop is counted by reason in `drops`. A task without an input is
    dropped ("missing_input") where every seed of its type has one (`profiles`)."""
    profiles = profiles or {}
    items = []
    for row in raw:
        truncated = row["finish_reason"] == "length"
        if row["given_input"] and row.get("open_field"):
            parsed = [parse_open_field(row["completion"], row["given_input"], row["open_field"], truncated)]
        elif row["given_input"]:
            parsed = [{**parse_given_input(row["completion"], truncated), "input": row["given_input"]}]
        else:
            parsed = parse_tasks(row["completion"], truncated)
        for item in parsed[: gen.instructions_per_prompt]:
            reason = item["error"] or instruction_drop_reason(
                item["instruction"], item["input"], gen.min_words, gen.max_words, gen.blacklist
            )
            profile = profiles.get(row["task"])
            if reason is None and not item["input"] and profile is not None and profile.input_required:
                reason = "missing_input"
            if reason:
                drops.add(reason, row["task"])
            else:
                items.append({**item, "row": row})
    return items


def answer_rows(
    answered: list[dict[str, Any]],
    profiles: dict[str, TaskProfile],
    gen,
    drops: Drops,
    seed_answers: dict[str, list[list[str]]] | None = None,
) -> tuple[list[Example], dict[str, int]]:
    """Examples from answered rows, and counts of the list answers repaired (cut out of a
    loop; items not in the input removed). A label task keeps the label a clear majority of
    its sampled answers names (spelled as in the seeds); other tasks keep the greedy answer,
    unless it repeats a seed answer of its type (`seed_answers`: task -> `rouge_tokens` of
    each seed's output)."""
    examples, repaired, ungrounded = [], 0, 0
    seed_answers = seed_answers or {}
    for row in sorted(answered, key=lambda r: r["id"]):
        profile = label_task(profiles, row["task"])
        if profile is not None:
            label, share = row_label(row, profile, gen)
            if label is None:
                drops.add("no_majority" if share else "off_label", row["task"])
                continue
            row = {**row, "output": label, "label": label}
        else:
            task_profile = profiles.get(row["task"])
            if task_profile is not None and task_profile.list_answers:
                collapsed = collapse_repeated_items(row["output"], row["finish_reason"] == "length")
                if collapsed:  # a list that looped: its distinct items are the answer
                    row = {**row, "output": collapsed, "finish_reason": "stop"}
                    repaired += 1
                if row["input"] and row["finish_reason"] != "length":
                    grounded, removed = ground_list_items(row["output"], row["input"])
                    if not grounded:
                        drops.add("ungrounded_items", row["task"])
                        continue
                    row = {**row, "output": grounded}
                    ungrounded += removed
            reason = response_drop_reason(row["output"], row["finish_reason"], row["input"])
            over_budget = reason == "truncated_response" and row["completion_tokens"] < gen.response_max_new_tokens
            if over_budget or (reason is None and off_form(row["output"], task_profile)):
                reason = "off_form"  # longer than its type's seed-sized budget, or than off_form allows
            if reason is None and copies_seed_answer(
                row["output"], seed_answers.get(row["task"], []), gen.rouge_threshold, row["input"]
            ):
                reason = "copied_seed_answer"
            if reason:
                drops.add(reason, row["task"])
                continue
            row = {**row, "label": ""}
        examples.append(Example(**{k: row[k] for k in example_schema().names}))
    return examples, {"repaired_lists": repaired, "ungrounded_items_removed": ungrounded}


def run_round(
    config: RunConfig,
    seeds: SeedSet,
    round: int,
    num_prompts: int,
    dedup: RougeDeduper,
    grounded_dedup: InputScopedDeduper,
    executor: str,
    config_hash: str,
    retriever=None,
    relevance: DomainRelevance | None = None,
    task_weights: dict[str, float] | None = None,
    fixed_labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Generate, filter and answer one round; returns the shard's rows and counts.
    `task_weights`: draw prompt task types in these proportions, not the seeds'.
    `fixed_labels`: label types answered with the given label, without asking the model."""
    gen = config.generate
    adapter = ADAPTER_NAME if gen.adapter else None
    adapters = {ADAPTER_NAME: gen.adapter} if gen.adapter else None
    profiles = task_profiles(seeds.seeds)
    started = time.perf_counter()
    prompts = make_prompt_rows(
        seeds.seeds, seeds.domain, seeds.description, num_prompts, gen.num_demos, gen.seed, round, gen.demos_by_task, task_weights,
        gen.prompts_per_demo_set,
    )
    if retriever is not None:
        prompts = retriever.ground(prompts, seeds)
    rows, sampling = instruction_rows(prompts, gen)
    raw = _map(rows, functools.partial(write_instructions, params=sampling, adapter=adapter), config, executor, adapters, f"round {round}: instructions")
    raw.sort(key=lambda r: r["prompt_id"])
    drops = Drops()
    items = parse_round(raw, gen, drops, profiles)
    raw_count = len(items) + sum(drops.values())
    if relevance is not None and items:
        scores = relevance.scores([task_text(i["instruction"], i["input"]) for i in items])
        on_domain = []
        for item, score in zip(items, scores):
            if score >= relevance.threshold:
                on_domain.append(item)
            else:
                drops.add("off_domain", item["row"]["task"])
        items = on_domain
    # A free task is new when its instruction is; a task over a given passage, when no task
    # over the same passage has a similar instruction.
    verdicts: list[bool] = [False] * len(items)
    free = [n for n, i in enumerate(items) if not i["row"]["given_input"]]
    grounded = [n for n, i in enumerate(items) if i["row"]["given_input"]]
    for n, (keep, _) in zip(free, dedup.filter([items[n]["instruction"] for n in free])):
        verdicts[n] = keep
    for n, (keep, _) in zip(grounded, grounded_dedup.filter([(items[n]["instruction"], items[n]["input"]) for n in grounded])):
        verdicts[n] = keep
    # Both indexes hold every kept task, as a resumed run rebuilds them from the shards.
    dedup.add([items[n]["instruction"] for n in grounded if verdicts[n]])
    grounded_dedup.add([(items[n]["instruction"], items[n]["input"]) for n in free if verdicts[n] and items[n]["input"]])
    kept = [
        {
            "id": content_id(item["instruction"], item["input"]),
            "task": item["row"]["task"],
            "instruction": item["instruction"],
            "input": item["input"],
            "domain": seeds.domain,
            "seed_ids": list(item["row"]["seed_ids"]),
            "passage_ids": list(item["row"]["passage_ids"]),
            "model": config.model.ref,
            "adapter": gen.adapter or "",
            "round": round,
            "config_hash": config_hash,
        }
        for item, keep in zip(items, verdicts)
        if keep
    ]
    for item, keep in zip(items, verdicts):
        if not keep:
            drops.add("near_duplicate", item["row"]["task"])
    instruction_tokens = sum(r["completion_tokens"] for r in raw)

    to_answer = response_rows(kept, seeds.seeds, gen.response_demos, by_instruction_demos=gen.prompts_per_demo_set > 1)
    fixed_labels = fixed_labels or {}
    fixed = [answered_with(r, fixed_labels[r["task"]]) for r in to_answer if r["task"] in fixed_labels]
    labelled = [r for r in to_answer if label_task(profiles, r["task"]) and r["task"] not in fixed_labels]
    open_ended = open_ended_rows(to_answer, profiles, gen)
    labelled, label_step = label_rows_and_step(labelled, gen, profiles, adapter)
    steps = {"label": label_step, "response": functools.partial(write_responses, params=response_params(gen), adapter=adapter)}
    to_model = [{**r, "answer_step": "label"} for r in labelled] + [{**r, "answer_step": "response"} for r in open_ended]
    answered = list(fixed) + [
        {k: v for k, v in r.items() if k != "answer_step"}
        for r in _map(to_model, functools.partial(answer_batch, steps=steps), config, executor, adapters, f"round {round}: answers")
    ]
    response_drops = Drops()
    seed_answers = {
        task: [rouge_tokens(s["output"]) for s in members] for task, members in seeds_by_task(seeds.seeds).items()
    }
    examples, repairs = answer_rows(answered, profiles, gen, response_drops, seed_answers)
    nodes = sorted({r.get("node_id", "local") for r in raw + answered})
    return {
        "examples": examples,
        "counts": {
            "prompts": len(prompts),
            "raw_instructions": raw_count,
            "kept_instructions": len(kept),
            "labelled": len(labelled),
            "fixed_label": len(fixed),
            **repairs,
            "examples": len(examples),
        },
        "drops": {"instruction": dict(drops), "response": dict(response_drops)},
        "yield_by_task": yield_by_task(prompts, kept, examples),
        "drops_by_task": {
            task: dict(drops.by_task.get(task, Counter()) + response_drops.by_task.get(task, Counter()))
            for task in sorted(set(drops.by_task) | set(response_drops.by_task))
        },
        "tokens": instruction_tokens + sum(r["completion_tokens"] for r in answered),
        "seconds": time.perf_counter() - started,
        "node_ids": nodes,
    }


def yield_by_task(prompts, kept, examples) -> dict[str, dict[str, int]]:
    """Task type -> prompts, kept instructions and examples: where each type's rows are lost."""
    table: dict[str, dict[str, int]] = {}
    for stage, rows in (("prompts", prompts), ("kept_instructions", kept), ("examples", examples)):
        for row in rows:
            counts = table.setdefault(row["task"] or "", {"prompts": 0, "kept_instructions": 0, "examples": 0})
            counts[stage] += 1
    return table


def summed_by_task(shards: list[dict[str, Any]], field: str) -> dict[str, Counter[str]]:
    """Task type -> the counts the shards hold under `field` (yield_by_task, drops_by_task), summed."""
    table: dict[str, Counter[str]] = {}
    for shard in shards:
        for task, counts in shard.get(field, {}).items():
            table.setdefault(task, Counter()).update(counts)
    return table


def prompts_for_round(
    gen, remaining: int, shards: list[dict[str, Any]], made: int | None = None, weights: dict[str, float] | None = None
) -> int:
    """Enough prompts for the remaining examples at the yield seen so far; before any round,
    for `first_round_share` of them at `expected_yield`. `made`: the examples that count
    toward the target (after contamination removal and label balance); default all the
    shards' examples. `weights`: the round's task-type mix; each type's own yield so far then
    counts at its weight, as the types short of their share are often the ones the model
    completes least (a type not prompted yet counts at the pooled yield)."""
    if gen.prompts_per_round:
        return gen.prompts_per_round
    prompts = sum(s["counts"]["prompts"] for s in shards)
    examples = sum(s["counts"]["examples"] for s in shards)
    made = examples if made is None else made
    if prompts:
        expected_yield = made / prompts
        by_task = summed_by_task(shards, "yield_by_task")
        if weights and examples and sum(weights.values()) > 0:
            kept_share = made / examples  # what contamination removal and the balance leave
            per_type = {
                t: by_task[t]["examples"] / by_task[t]["prompts"] * kept_share
                if by_task.get(t, {}).get("prompts") else expected_yield
                for t in weights
            }
            expected_yield = sum(w * per_type[t] for t, w in weights.items()) / sum(weights.values())
        expected_yield = max(expected_yield, 0.1)
    else:
        expected_yield, remaining = gen.expected_yield, math.ceil(remaining * gen.first_round_share)
    need = math.ceil(remaining / expected_yield * 1.1)
    return max(gen.batch_size * gen.replicas, min(need, 8 * max(remaining, 1)))


# -- the stage ---------------------------------------------------------------------
def run_generate(
    config: RunConfig,
    run_dir: RunDir | None = None,
    *,
    executor: str = "ray",
    overwrite: bool = False,
    target: int | None = None,
) -> dict[str, Any]:
    """Generate until `target` examples exist; resume from the manifest. Returns the summary."""
    run_dir = run_dir or run_dir_for(config)
    gen = config.generate
    target = target or gen.target
    seed_sets = load_seed_sets(config)
    seeds = seed_sets[0]
    if len(seed_sets) > 1:
        seeds = SeedSet(seeds.path, gen.domain or seeds.domain, seeds.description, [s for ss in seed_sets for s in ss.seeds])
    elif gen.domain:
        seeds = SeedSet(seeds.path, gen.domain, seeds.description, seeds.seeds)
    profiles = task_profiles(seeds.seeds)
    unknown = sorted(set(config.retrieval.written_input_tasks) - set(profiles))
    if unknown:
        raise ConfigError(
            f"retrieval.written_input_tasks: {', '.join(unknown)} is not a task type of the seeds "
            f"({', '.join(profiles)})"
        )
    config_hash = generation_hash(config)
    data = functools.partial(run_dir.path, "data")
    manifest = read_manifest(run_dir, config_hash, overwrite)
    atomic_write_text(run_dir.path("config.yaml"), dump_config(config))
    checking = gen.unreliable_labels != "keep"
    if checking and "label_check" not in manifest and any(p.labelled for p in profiles.values()):
        manifest["label_check"] = check_seed_labels(config, seeds, profiles, executor)
        write_json(data("manifest.json"), manifest)
    unreliable = {t for t, r in manifest.get("label_check", {}).items() if not r["reliable"]} if checking else set()
    relabelled_types, dropped_types = unreliable_label_plan(unreliable, profiles, gen.unreliable_labels)
    if unreliable:
        plan = [f"{', '.join(sorted(relabelled_types))}: rows take the seeds' majority label"] if relabelled_types else []
        plan += [f"{', '.join(sorted(dropped_types))}: no rows"] if dropped_types else []
        print(f"label check: the model's labels of the seeds of {', '.join(sorted(unreliable))} do not beat "
              f"their majority label by more than chance; {'; '.join(plan) or 'their labels kept: no other type to make'}")

    dedup = RougeDeduper(gen.rouge_threshold)
    dedup.add([s["instruction"] for s in seeds.seeds])
    grounded_dedup = InputScopedDeduper(gen.rouge_threshold)
    grounded_dedup.add([(s["instruction"], s["input"]) for s in seeds.seeds if s["input"]])
    done: list[Example] = []
    for shard in manifest["shards"]:
        rows = read_parquet(data(shard["file"]))
        dedup.add([r["instruction"] for r in rows])
        grounded_dedup.add([(r["instruction"], r["input"]) for r in rows if r["input"]])
        done.extend(rows)
    resumed = len(manifest["shards"])

    retriever = None
    if config.retrieval.enabled:
        from selfspec.stages.retrieve import PromptGrounder

        retriever = PromptGrounder.from_config(config, run_dir)
        retriever.given.update((i, r["task"]) for r in done if r["input"] for i in r["passage_ids"])
    relevance = domain_relevance(config, seeds) if gen.min_relevance is not None else None
    contamination = None
    if gen.contamination.tasks:
        from selfspec.contamination import ContaminationIndex

        contamination = ContaminationIndex(gen.contamination.tasks, gen.contamination.n)
        if retriever is not None and gen.contamination.remove and gen.contamination.exclude_passages:
            retriever.excluded = lambda hit: bool(contamination.matches({"input": hit["text"]}))

    def usable(rows: list[Example]) -> list[Example]:
        """Rows that count toward the target: contaminated ones removed (when asked), then
        label shares balanced; generation goes on until the target is met after both."""
        if contamination is not None and gen.contamination.remove:
            rows = [r for r in rows if not contamination.matches(r)]
        rows = relabel_with_majority([r for r in rows if r["task"] not in dropped_types], profiles, relabelled_types)
        # Relabelled types hold one label by design: the balance leaves them alone.
        balanced_profiles = {t: p for t, p in profiles.items() if t not in relabelled_types}
        return balance_labels(rows, balanced_profiles, gen.label_tolerance)[0] if gen.balance_labels else rows

    round = len(manifest["shards"]) + 1
    while (counted := len(usable(done))) < target:
        if round > gen.max_rounds:
            print(f"stopped after generate.max_rounds={gen.max_rounds} rounds with {counted}/{target} examples")
            break
        weights = round_task_weights(usable(done), target, profiles) if done else {t: p.share for t, p in profiles.items()}
        weights = {t: 0.0 if t in dropped_types else w for t, w in weights.items()}
        num_prompts = prompts_for_round(gen, target - counted, manifest["shards"], counted, weights)
        result = run_round(
            config, seeds, round, num_prompts, dedup, grounded_dedup, executor, config_hash, retriever, relevance, weights,
            fixed_labels={t: majority_seed_label(profiles[t]) for t in relabelled_types},
        )
        shard_file = f"shards/round-{round:04d}.parquet"
        examples = result.pop("examples")
        write_parquet(data(shard_file), examples, schema=example_schema())
        done.extend(examples)
        manifest["shards"].append({"round": round, "file": shard_file, **result})
        write_json(data("manifest.json"), manifest)
        print(
            f"round {round}: {result['counts']['prompts']} prompts -> {result['counts']['kept_instructions']} "
            f"instructions -> {result['counts']['examples']} examples ({len(done)}/{target}, {result['seconds']:.0f}s)"
        )
        round += 1

    balanced = usable(done)
    final = select_task_mix(balanced, target, profiles) if gen.demos_by_task else balanced[:target]
    report = None
    if contamination is not None:
        # Every generated row is checked; with remove, flagged ones never reach the final set.
        report, flagged = contamination.check(done)
        report["removed"] = len(flagged) if gen.contamination.remove else 0
        report["final_flagged"] = sum(e["id"] in flagged for e in final)
        if retriever is not None and retriever.excluded is not None:
            report["passages_excluded"] = len(retriever.excluded_ids)
        write_json(data("contamination.json"), report)
    write_parquet(data("examples.parquet"), final, schema=example_schema())
    write_jsonl(data("alpaca.jsonl"), (to_alpaca(e) for e in final))
    write_jsonl(data("chat.jsonl"), (to_messages(e) for e in final))
    summary = summarize(manifest, final, resumed, report)
    removed = report["removed"] if report else 0
    flagged_ids = flagged if report and gen.contamination.remove else set()
    unreliable_rows = sum(r["task"] in dropped_types and r["id"] not in flagged_ids for r in done)
    summary["drops"]["final"] = {
        "contaminated": removed,
        "unreliable_labels": unreliable_rows,
        "label_balance": len(done) - removed - unreliable_rows - len(balanced),
    }
    if "label_check" in manifest:
        summary["label_check"] = {task: dict(result) for task, result in manifest["label_check"].items()}
        for task in relabelled_types:
            relabelled = sum(r["task"] == task for r in final)
            summary["label_check"][task].update(majority_label=majority_seed_label(profiles[task]), relabelled=relabelled)
    summary["profile"] = profile(final, seeds.seeds)
    if relevance is not None:
        summary["relevance_threshold"] = float(f"{relevance.threshold:.4f}")
    write_json(data("summary.json"), summary)
    return summary


def domain_relevance(config: RunConfig, seeds: SeedSet) -> DomainRelevance:
    """The relevance scorer of `generate.min_relevance`: seeds plus, with retrieval on, up to
    256 passages of its corpus (evenly spaced) describe the domain."""
    from selfspec.retrieval.index import encoder_dtype, load_encoder

    passages: list[str] = []
    if config.retrieval.enabled:
        from selfspec.retrieval.corpus import read_documents
        from selfspec.stages.retrieve import corpus_path

        documents = read_documents(corpus_path(config))
        step = max(1, len(documents) // 256)
        passages = [d["text"] for d in documents[::step]][:256]
    encoder = load_encoder(config.retrieval.encoder, encoder_dtype(config.retrieval.encoder_dtype))
    gen = config.generate
    relevance = DomainRelevance(encoder, seeds.seeds, passages, gen.relevance_percentile)
    if gen.min_relevance != "auto":
        relevance.threshold = float(gen.min_relevance)
    return relevance


def summarize(manifest: dict[str, Any], final: list[Example], resumed: int, contamination) -> dict[str, Any]:
    counts: Counter[str] = Counter()
    drops: dict[str, Counter[str]] = {"instruction": Counter(), "response": Counter()}
    tokens = seconds = 0.0
    nodes: set[str] = set()
    for shard in manifest["shards"]:
        counts.update(shard["counts"])
        for stage in drops:
            drops[stage].update(shard["drops"][stage])
        tokens += shard["tokens"]
        seconds += shard["seconds"]
        nodes.update(shard.get("node_ids", []))
    return {
        "counts": {**counts, "final_examples": len(final)},
        "drops": {k: dict(v) for k, v in drops.items()},
        "yield_by_task": {task: dict(stages) for task, stages in summed_by_task(manifest["shards"], "yield_by_task").items()},
        "drops_by_task": {
            task: dict(reasons.most_common()) for task, reasons in sorted(summed_by_task(manifest["shards"], "drops_by_task").items())
        },
        "rounds": len(manifest["shards"]),
        "rounds_resumed": resumed,
        "tokens": int(tokens),
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1) if seconds else 0.0,
        "node_ids": sorted(nodes),
        "contamination": None if contamination is None else {k: v for k, v in contamination.items() if k != "flagged_ids"},
    }


def format_summary(summary: dict[str, Any]) -> str:
    c = summary["counts"]
    lines = [
        f"prompts {c.get('prompts', 0)} -> parsed tasks {c.get('raw_instructions', 0)} -> kept instructions "
        f"{c.get('kept_instructions', 0)} -> examples {c.get('examples', 0)} (final {c['final_examples']})",
        f"rounds {summary['rounds']} (resumed {summary['rounds_resumed']}), {summary['tokens']} tokens, "
        f"{summary['tokens_per_s']} tokens/s",
    ]
    for stage, reasons in summary["drops"].items():
        if reasons:
            lines.append(f"{stage} drops: " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])))
    by_task = summary.get("yield_by_task") or {}
    if len(by_task) > 1:
        lines.append(
            "yield by task type (prompts -> instructions -> examples): "
            + ", ".join(f"{t} {v['prompts']} -> {v['kept_instructions']} -> {v['examples']}" for t, v in sorted(by_task.items()))
        )
    drops_by_task = summary.get("drops_by_task") or {}
    if len(drops_by_task) > 1:
        lines.append(
            "drops by task type (top 3 reasons): "
            + "; ".join(f"{t} " + ", ".join(f"{k} {v}" for k, v in list(reasons.items())[:3])
                        for t, reasons in drops_by_task.items())
        )
    if summary.get("contamination"):
        c = summary["contamination"]
        lines.append(
            f"contamination: {c['examples_flagged']} of {c['examples_checked']} generated examples flagged, "
            f"{c.get('removed', 0)} removed, {c.get('final_flagged', 0)} in the final set"
            + (f"; {c['passages_excluded']} corpus passages overlapping a task kept out of prompts" if "passages_excluded" in c else "")
        )
    if summary.get("label_check"):
        lines.append(
            "label check on the seeds (right / the majority label's / seeds, p): "
            + ", ".join(f"{t} {r['right']} / {r['prior_right']:g} / {r['seeds']}"
                        + (f", p {r['p']:.2f}" if "p" in r else "") + label_check_note(r)
                        for t, r in summary["label_check"].items())
        )
    if summary.get("profile"):
        from selfspec.data_profile import format_profile

        lines.append(format_profile(summary["profile"]))
    return "\n".join(lines)


def label_check_note(result: dict[str, Any]) -> str:
    if result["reliable"]:
        return ""
    if "majority_label" in result:
        return f" ({result['relabelled']} rows answered '{result['majority_label']}')"
    return " (no rows)"


def cli(config: RunConfig, args) -> int:
    from selfspec.runtime import init_ray

    run_dir = run_dir_for(config)
    executor = init_ray()
    if args.preview:
        from selfspec.stages.preview import preview

        preview(config, run_dir, args.preview, executor)
        return 0
    summary = run_generate(config, run_dir, executor=executor, overwrite=args.overwrite)
    print(format_summary(summary))
    print(f"data: {run_dir.path('data', 'examples.parquet')}")
    return 0
