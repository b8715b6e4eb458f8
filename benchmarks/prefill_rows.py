"""Long prompts: prefill row by row (causal attention, no padding mask) vs one padded batch,
and whether row prefill makes a larger batch token budget worth it.

The engine prefills a batch whose longest prompt has ROW_PREFILL_MIN_TOKENS or more one row at
a time: a row alone needs no padding mask, so SDPA takes its causal path, which skips the
masked half of the scores that a padded batch's explicit mask makes it compute. This runs
the zero-shot evaluation prompts of shared tasks (generated answers, greedy, as
`selfspec eval` asks them) both ways, alternating trials, and prints seconds, prompt tokens/s
and the ratio per task, with the machine's CPU flags.

Then round 1's instruction prompts of a shipped config (grounded in its corpus, sampled as the
stage samples them) at each `model.max_batch_tokens` in --budgets, row prefill on: padding no
longer costs long prompts their prefill, so a larger budget may buy larger decode batches. Then
the answers stage's open-ended prompts (the config's seeds of free-answer types stand in for
generated instructions; three seed demos each, greedy, each row at its task type's token budget,
the stage's stops) at the same budgets.

    python benchmarks/prefill_rows.py [--tasks finance/convfinqa finance/tatqa biomedical/pubmedqa] [--rows 16]
        [--config biomedical-1k --prompts 64 --budgets 8192 32768]

Task paths are under the shared data (SELFSPEC_SHARED_DATA, else ../shared/data).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from specialization_run import cpu_facts  # noqa: E402

SHARED = Path(os.environ.get("SELFSPEC_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="*", default=["finance/convfinqa", "finance/tatqa", "biomedical/pubmedqa"])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--config", default="biomedical-1k")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--budgets", type=int, nargs="*", default=[8192, 32768])
    args = parser.parse_args()

    from selfspec.config import ModelConfig
    from selfspec.models import SamplingParams, hf_backend, load_backend
    from selfspec.stages.evaluate import GENERATE_STOP, build_messages
    from selfspec.tasks import load_task

    print(f"machine: {cpu_facts()}")
    backend = load_backend(ModelConfig(backend="transformers", max_batch_tokens=8192))
    print(f"model: {backend.model_ref}, {backend.model.dtype}; row prefill from {hf_backend.ROW_PREFILL_MIN_TOKENS} tokens")
    params = SamplingParams(max_new_tokens=args.new_tokens, stop=GENERATE_STOP)
    threshold = hf_backend.ROW_PREFILL_MIN_TOKENS
    for name in args.tasks:
        task = load_task(SHARED / name)
        prompts = [build_messages(task, row, []) for row in task.test[: args.rows]]
        tokens = [backend.count_tokens(p) for p in prompts]
        times: dict[str, list[float]] = {"rows": [], "padded": []}
        texts: dict[str, list[str]] = {}
        for _ in range(args.repeats):
            for way, minimum in (("rows", threshold), ("padded", 10**9)):
                hf_backend.ROW_PREFILL_MIN_TOKENS = minimum
                started = time.perf_counter()
                out = backend.generate(prompts, params)
                times[way].append(time.perf_counter() - started)
                texts[way] = [c[0].text for c in out]
        hf_backend.ROW_PREFILL_MIN_TOKENS = threshold
        rows, padded = statistics.median(times["rows"]), statistics.median(times["padded"])
        same = sum(a == b for a, b in zip(texts["rows"], texts["padded"]))
        print(
            f"{task.name}: {len(prompts)} prompts, {statistics.mean(tokens):.0f} tokens mean, {max(tokens)} max\n"
            f"  row by row: {' '.join(f'{t:.1f}' for t in times['rows'])} s ({sum(tokens) / rows:.0f} prompt tokens/s)\n"
            f"  padded:     {' '.join(f'{t:.1f}' for t in times['padded'])} s ({sum(tokens) / padded:.0f} prompt tokens/s)\n"
            f"  row by row runs x{padded / rows:.2f} the padded batch (medians); same greedy text {same}/{len(prompts)}"
            + (" (bf16 kernels round differently; fp32 outputs are equal, tests/test_models.py)" if same < len(prompts) else ""),
            flush=True,
        )
    if args.budgets:
        budgets(backend, args)
    return 0


def budgets(backend, args) -> None:
    """Round 1's instruction prompts of `args.config`, then answer prompts, at each batch token budget."""
    import tempfile

    from selfspec.config import load_config
    from selfspec.io import RunDir
    from selfspec.stages.generate import instruction_rows, load_seed_sets, write_instructions
    from selfspec.stages.generate_instructions import make_prompt_rows
    from selfspec.stages.retrieve import PromptGrounder

    with tempfile.TemporaryDirectory() as runs:
        config = load_config(args.config, [f"runs_dir={runs}"])
        gen, seeds = config.generate, load_seed_sets(config)[0]
        rows = make_prompt_rows(seeds.seeds, seeds.domain, seeds.description, args.prompts, gen.num_demos, gen.seed, 1, gen.demos_by_task)
        rows = PromptGrounder.from_config(config, RunDir(f"{runs}/{config.name}")).ground(rows, seeds)
    rows, sampling = instruction_rows(rows, gen)
    tokens = [backend.count_tokens(r["prompt"]) for r in rows]
    print(f"{args.config} round 1 instruction prompts: {len(rows)}, {statistics.mean(tokens):.0f} tokens mean, {max(tokens)} max")
    time_budgets(backend, args, lambda: write_instructions(backend, rows, sampling, None))

    # The answers stage's open-ended prompts (label tasks are scored, not written), with the
    # seeds standing in for generated instructions, each at its task type's token budget.
    from selfspec.quality import task_profiles
    from selfspec.stages.generate import open_ended_rows, response_params, write_responses
    from selfspec.stages.generate_responses import response_rows

    seed_rows = [{"instruction": s["instruction"], "input": s["input"], "task": s.get("task", ""), "id": f"seed-{i}"} for i, s in enumerate(seeds.seeds)]
    answers = open_ended_rows(response_rows(seed_rows, seeds.seeds, gen.response_demos), task_profiles(seeds.seeds), gen)[: args.prompts]
    tokens = [backend.count_tokens(row["messages"]) for row in answers]
    print(f"{args.config} answer prompts (its open-ended seeds as the instructions): {len(answers)}, {statistics.mean(tokens):.0f} tokens mean, {max(tokens)} max")
    time_budgets(backend, args, lambda: write_responses(backend, answers, response_params(gen), None))


def time_budgets(backend, args, work) -> None:
    """Time `work` at each of --budgets, alternating, --repeats times; print against the first."""
    times: dict[int, list[float]] = {b: [] for b in args.budgets}
    for _ in range(args.repeats):
        for budget in args.budgets:
            backend.max_batch_tokens = budget
            started = time.perf_counter()
            work()
            times[budget].append(time.perf_counter() - started)
    first = statistics.median(times[args.budgets[0]])
    for budget in args.budgets:
        median = statistics.median(times[budget])
        print(f"  max_batch_tokens {budget}: {' '.join(f'{t:.1f}' for t in times[budget])} s, x{first / median:.2f} the first budget (medians)")


if __name__ == "__main__":
    sys.exit(main())
