"""Generation stages with the engine's prefix cache (`PromptCache`) vs without.

Every instruction prompt starts with the same header and three seed demos of its task type,
and every answer prompt with three seed demos: rows share long prefixes. With the cache on,
each row prefilled alone keeps its KV cache, and a later row under the same adapter prefills
only past the longest prefix an entry shares with it (vLLM's automatic prefix caching does
this on its engine). This runs round 1's instruction prompts of a shipped config (grounded
in its corpus, sampled as the stage samples them, in calls of `generate.batch_size` rows as
Ray Data feeds the model actor), then the answers stage's open-ended prompts (the config's
seeds stand in for generated instructions), both ways, alternating trials, on one backend.
A third way draws demos for runs of --per-demo-set prompts of a type
(`generate.prompts_per_demo_set`), whose rows then share their whole header and demos. It
prints seconds, the prompt tokens and the tokens that went through a prefill, the seconds
spent in prefill and in decode passes, the ratios, how many completions agree, and the
machine's CPU flags. `model.max_batch_tokens=...` among the overrides sets the decode batch.

    python benchmarks/prefix_cache.py [--config biomedical-1k] [--prompts 128] [--repeats 2] [--per-demo-set 4] [key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from specialization_run import cpu_facts  # noqa: E402


def instruction_prompts(config, count: int, per_demo_set: int) -> tuple[list[dict], dict]:
    """Round 1's instruction rows of `config` as `run_round` makes them, and their sampling."""
    from selfspec.io import RunDir
    from selfspec.stages.generate import instruction_rows, load_seed_sets
    from selfspec.stages.generate_instructions import make_prompt_rows
    from selfspec.stages.retrieve import PromptGrounder

    gen, seeds = config.generate, load_seed_sets(config)[0]
    rows = make_prompt_rows(
        seeds.seeds, seeds.domain, seeds.description, count, gen.num_demos, gen.seed, 1, gen.demos_by_task, per_demo_set=per_demo_set
    )
    with tempfile.TemporaryDirectory() as runs:
        rows = PromptGrounder.from_config(config, RunDir(f"{runs}/{config.name}"), executor="local").ground(rows, seeds)
    return instruction_rows(rows, gen)


def answer_prompts(config, count: int, per_demo_set: int) -> list[dict]:
    """The answers stage's open-ended rows: the config's open-ended seeds stand in for generated
    instructions, and consecutive seeds of a type share a draw of demos `per_demo_set` at a time,
    as instructions from prompts that shared demos do."""
    from selfspec.quality import task_profiles
    from selfspec.stages.generate import load_seed_sets, open_ended_rows
    from selfspec.stages.generate_responses import response_rows

    gen, seeds = config.generate, load_seed_sets(config)[0]
    position: dict[str, int] = {}
    rows = []
    for i, s in enumerate(seeds.seeds):
        task = s.get("task", "")
        n = position[task] = position.get(task, -1) + 1
        rows.append({"instruction": s["instruction"], "input": s["input"], "task": task, "id": f"seed-{i}",
                     "seed_ids": [f"draw-{n // per_demo_set}"]})
    rows = response_rows(rows, seeds.seeds, gen.response_demos, by_instruction_demos=per_demo_set > 1)
    return open_ended_rows(rows, task_profiles(seeds.seeds), gen)[:count]


def compare(backend, name: str, ways: dict[str, tuple[list[dict], int]], prompt_of, work, batch_size: int, repeats: int) -> None:
    """Per way (label -> rows, cache bytes), run `work(batch)` over its rows in calls of
    `batch_size`, ways alternating; the first way is the reference."""
    from selfspec.models.hf_backend import PROMPT_CACHE_BYTES

    # Per way: tokens through prefill passes, and seconds in prefill and in decode passes.
    spent = {"tokens": 0, "prefill": 0.0, "decode": 0.0}
    pending = {}

    def before(module, args, kwargs):
        pending["ids"], pending["start"] = kwargs["input_ids"], time.perf_counter()

    def after(module, args, kwargs, output):
        prefill = pending["ids"].shape[1] > 1
        spent["prefill" if prefill else "decode"] += time.perf_counter() - pending["start"]
        spent["tokens"] += pending["ids"].numel() if prefill else 0

    hooks = [backend.model.register_forward_pre_hook(before, with_kwargs=True),
             backend.model.register_forward_hook(after, with_kwargs=True)]
    tokens = {way: sum(backend.count_tokens(prompt_of(r)) for r in rows) for way, (rows, _) in ways.items()}
    times: dict[str, list[float]] = {way: [] for way in ways}
    through: dict[str, dict] = {}
    texts: dict[str, list[str]] = {}
    for _ in range(repeats):
        for way, (rows, budget) in ways.items():
            backend.prompt_cache.clear()
            backend.prompt_cache.max_bytes = budget
            spent.update(tokens=0, prefill=0.0, decode=0.0)
            started = time.perf_counter()
            out = [row for i in range(0, len(rows), batch_size) for row in work(rows[i : i + batch_size])]
            times[way].append(time.perf_counter() - started)
            through[way], texts[way] = dict(spent), [r.get("completion", r.get("output")) for r in out]
    for hook in hooks:
        hook.remove()
    backend.prompt_cache.max_bytes = PROMPT_CACHE_BYTES
    medians = {way: statistics.median(t) for way, t in times.items()}
    first = next(iter(ways))
    rows = ways[first][0]
    print(f"{name}: {len(rows)} prompts, {tokens[first]} prompt tokens ({tokens[first] / len(rows):.0f} mean), calls of {batch_size}")
    for way, (rows, _) in ways.items():
        same = sum(a == b for a, b in zip(texts[way], texts[first]))
        comparable = rows is ways[first][0]
        last = through[way]
        print(f"  {way}: {' '.join(f'{t:.1f}' for t in times[way])} s, x{medians[first] / medians[way]:.2f}; "
              f"{last['tokens']} tokens through prefill ({last['tokens'] / tokens[way]:.0%} of its {tokens[way]} prompt tokens); "
              f"last trial: prefill {last['prefill']:.1f} s, decode {last['decode']:.1f} s"
              + (f"; same completions {same}/{len(rows)}" if comparable and way != first else ""),
              flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="biomedical-1k")
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--per-demo-set", type=int, default=4, help="a third way: prompts sharing a draw of demos (1: none)")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args()

    from selfspec.config import load_config
    from selfspec.models import load_backend
    from selfspec.models.hf_backend import PROMPT_CACHE_BYTES
    from selfspec.stages.generate import response_params, write_instructions, write_responses

    config = load_config(args.config, [*args.overrides, "generate.prompts_per_demo_set=1"])
    print(f"machine: {cpu_facts()}")
    backend = load_backend(config.model.model_copy(update={"backend": "transformers"}))
    print(f"model: {backend.model_ref}, {backend.model.dtype}; max_batch_tokens {backend.max_batch_tokens}; "
          f"cache {PROMPT_CACHE_BYTES >> 20} MiB; each way's x: the first way's time over its own (medians)")
    gen, grouped = config.generate, args.per_demo_set
    rows, sampling = instruction_prompts(config, args.prompts, 1)
    ways = {"cache off        ": (rows, 0), "cache on         ": (rows, PROMPT_CACHE_BYTES)}
    if grouped > 1:
        ways[f"cache on, {grouped} per demo set"] = (instruction_prompts(config, args.prompts, grouped)[0], PROMPT_CACHE_BYTES)
    compare(backend, f"{config.name} round 1 instruction prompts", ways, lambda r: r["prompt"],
            lambda batch: write_instructions(backend, batch, sampling, None), gen.batch_size, args.repeats)
    answers = answer_prompts(config, args.prompts, 1)
    ways = {"cache off        ": (answers, 0), "cache on         ": (answers, PROMPT_CACHE_BYTES)}
    if grouped > 1:
        ways[f"cache on, {grouped} per demo set"] = (answer_prompts(config, args.prompts, grouped), PROMPT_CACHE_BYTES)
    compare(backend, f"{config.name} answer prompts (its open-ended seeds as the instructions)", ways, lambda r: r["messages"],
            lambda batch: write_responses(backend, batch, response_params(gen), None), gen.batch_size, args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
