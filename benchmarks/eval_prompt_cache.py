"""Evaluation with both scorings: generation reusing the prefill of the prompt it just scored
(`PromptCache`) vs prefilling it again.

`selfspec eval` with `scoring: both` asks each choice-task prompt twice, once for the
log-likelihood of every label and once for a generated answer; a model call holds both
(`run_requests`, `eval.batch_size` requests in file order). With the prompt cache on, the
log-likelihood pass prefills each context alone (no padding), keeps its KV cache, and the
generation takes it instead of prefilling the prompt again. This runs a config's zero-shot
evaluation requests (the base and a random LoRA adapter, as a run evaluates base and
specialist) three ways, alternating trials, on the same backend: as before (no cache: the
contexts prefill as one padded batch), the contexts row by row without reuse, and with
reuse. It prints seconds per task, the ratios, whether the answers agree with the first
way's, and the machine's CPU flags.

    python benchmarks/eval_prompt_cache.py [--config biomedical-1k] [--rows 16] [--repeats 2] [--shots 0] [key=value ...]

For Gemma 3 270M (sliding-window layers, whose prompts the cache keeps since its decode cache
holds every token): `model.ref=embedded:gemma3-270m model.prompt_format=plain`.

Task paths in the config are under the shared data (SELFSPEC_SHARED_DATA, else ../shared/data).
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="biomedical-1k")
    parser.add_argument("--rows", type=int, default=16, help="test rows per task")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--shots", type=int, default=0, help="demos per prompt (from the seeds or a dev split)")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args()

    from selfspec.config import load_config
    from selfspec.models import load_backend
    from selfspec.models.hf_backend import PROMPT_CACHE_BYTES
    from selfspec.stages.evaluate import build_requests, load_demo_seeds, run_requests
    from selfspec.tasks import load_tasks
    from selfspec.testing import write_random_lora_adapter

    config = load_config(
        args.config, [*args.overrides, "eval.scoring=both", f"eval.shots=[{args.shots}]", f"eval.max_examples={args.rows}"]
    )
    print(f"machine: {cpu_facts()}")
    backend = load_backend(config.model.model_copy(update={"backend": "transformers"}))
    adapter_dir = write_random_lora_adapter(backend.model.config, Path(tempfile.mkdtemp()) / "specialist", seed=1)
    backend.load_adapter("specialist", str(adapter_dir))
    print(f"model: {backend.model_ref}, {backend.model.dtype}; eval.batch_size {config.eval.batch_size} requests per call; {args.shots}-shot")
    ways = {"reuse": "generation reuses the scored prefill", "rows": "contexts row by row, no reuse    ",
            "prefill": "as before (padded contexts)       "}
    totals = dict.fromkeys(ways, 0.0)
    cache = backend.prompt_cache
    tasks = load_tasks(config.eval.tasks)
    seed_sets = load_demo_seeds(config, {t.domain for t in tasks}) if args.shots else []
    for task in tasks:
        requests = build_requests([task], {"base": None, "specialist": "specialist"}, config, seed_sets)
        if not any(r["mode"] == "loglik" for r in requests):
            continue  # a free-form task is asked once: nothing to reuse
        calls = [requests[i : i + config.eval.batch_size] for i in range(0, len(requests), config.eval.batch_size)]
        times: dict[str, list[float]] = {way: [] for way in ways}
        answers: dict[str, list[str]] = {}
        for _ in range(args.repeats):
            for way in ways:
                cache.clear()
                cache.max_bytes = 0 if way == "prefill" else PROMPT_CACHE_BYTES
                cache.__dict__.pop("longest_prefix", None)  # the class's lookup
                if way == "rows":  # entries kept but never found: every context and prompt prefills whole
                    cache.longest_prefix = lambda adapter, ids: (0, None)
                started = time.perf_counter()
                results = [result for call in calls for result in run_requests(backend, call)]
                times[way].append(time.perf_counter() - started)
                answers[way] = [r["output"] for r in results]
        cache.max_bytes = PROMPT_CACHE_BYTES
        cache.__dict__.pop("longest_prefix", None)
        medians = {way: statistics.median(t) for way, t in times.items()}
        for way, median in medians.items():
            totals[way] += median
        print(f"{task.name}: {len(requests)} requests ({len(requests) // 2} per model, both scorings)")
        for way, label in ways.items():
            same = sum(a == b for a, b in zip(answers[way], answers["prefill"]))
            print(
                f"  {label} {' '.join(f'{t:.1f}' for t in times[way])} s, x{medians['prefill'] / medians[way]:.2f} "
                f"of as before (medians); same answers as before {same}/{len(requests)}",
                flush=True,
            )
    if totals["reuse"]:
        print("choice tasks together: " + ", ".join(
            f"{way} {total:.1f} s (x{totals['prefill'] / total:.2f})" for way, total in totals.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
