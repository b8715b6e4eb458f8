"""A real specialization run, timed: `selfspec run` (generate, train, evaluate) at a given target.

Prints, for one run on this machine:
- the CPU and its matmul flags (avx2, avx512f, avx512_bf16, amx);
- each stage's wall time (from the run's pipeline.json) and the whole command's;
- kept examples per hour of generation, and the share of completions cut at their token limit;
- training tokens/s and its share of the matmul rate (FLOPs per token as in train_throughput.py);
- evaluation requests per second.

Usage:
    python benchmarks/specialization_run.py --config biomedical-1k --target 1000 [override ...]
    python benchmarks/specialization_run.py --summarize RUN_DIR     # a finished run's figures

With --summarize nothing runs: the figures come from the run's files, and the matmul rate is
measured now (say so when you record them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

MATMUL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy: every process counts, Ray's workers and
    vLLM's engine core included (they are not the caller's children)."""
    import psutil

    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def cpu_facts() -> str:
    flags: set[str] = set()
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    present = [f for f in MATMUL_FLAGS if f in flags]
    return f"{model}, {os.cpu_count()} cores; matmul flags: {' '.join(present) or 'none found'}"


def completions_cut(summary: dict) -> tuple[int, int]:
    """(completions cut at their token limit, completions) of a generation summary."""
    counts, drops = summary["counts"], summary["drops"]
    cut = drops.get("instruction", {}).get("truncated", 0) + drops.get("response", {}).get("truncated_response", 0)
    return cut, counts.get("prompts", 0) + counts.get("kept_instructions", 0)


def training_share(run_dir: Path, train: dict) -> tuple[float, float, str]:
    """(achieved GFLOP/s, matmul GFLOP/s, precision) of a finished training stage."""
    import torch

    from selfspec.config import load_config
    from selfspec.stages import train as T
    from train_throughput import matmul_gflops

    config = load_config(str(run_dir / "config.yaml"), [])
    amp = T.autocast_dtype(config.train.precision, torch.device("cpu"))
    model, _ = T.load_lora_model(config.model.ref, config.train, torch.device("cpu"), amp)
    shape = model.get_base_model().config
    n_matmul = sum(p.numel() for p in model.parameters() if not p.requires_grad and p.dim() == 2)
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rows = max(1, train["steps"] * config.train.batch_size)
    tokens_per_row = train["tokens"] / rows
    flops = 4 * n_matmul + 6 * n_lora + 6 * shape.num_hidden_layers * tokens_per_row * shape.hidden_size
    torch.set_num_threads(max(1, int(config.train.cpus_per_worker)))
    return train["tokens_per_s"] * flops / 1e9, matmul_gflops(amp or torch.float32), str(amp or torch.float32)


def report(run_dir: Path, wall: float | None) -> None:
    ledger = json.loads((run_dir / "pipeline.json").read_text())["stages"]
    print(f"run: {run_dir}")
    print(f"machine: {cpu_facts()}")
    total = sum(s["seconds"] for s in ledger.values())
    print(f"{'stage':12s} {'seconds':>8s} {'minutes':>8s}")
    for name, stage in ledger.items():
        print(f"{name:12s} {stage['seconds']:8.0f} {stage['seconds'] / 60:8.1f}")
    print(f"{'stages':12s} {total:8.0f} {total / 60:8.1f}" + (f"   (command: {wall / 60:.1f} min)" if wall else ""))
    for name, stage in ledger.items():
        summary = stage["summary"]
        if name.startswith("generate"):
            kept = summary["counts"]["final_examples"]
            cut, completions = completions_cut(summary)
            print(f"{name}: {kept} kept examples in {stage['seconds'] / 60:.1f} min = "
                  f"{kept / stage['seconds'] * 3600:.0f} per hour; {summary['tokens']} tokens generated; "
                  f"cut at the token limit: {cut} of {completions} completions ({cut / max(completions, 1):.1%})")
        elif name.startswith("train"):
            achieved, peak, precision = training_share(run_dir, summary)
            print(f"{name}: {summary['steps']} steps, {summary['tokens']} tokens at {summary['tokens_per_s']:.0f} tokens/s "
                  f"= {achieved:.1f} GFLOP/s, {achieved / peak:.1%} of the {precision} matmul rate ({peak:.0f} GFLOP/s, "
                  f"measured now); loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}")
        elif name == "eval":
            metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
            requests = metrics.get("requests", 0)
            print(f"eval: {requests} requests in {stage['seconds'] / 60:.1f} min "
                  f"({requests / max(stage['seconds'], 1e-9):.2f} per s)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="biomedical-1k")
    parser.add_argument("--target", type=int, default=1000)
    parser.add_argument("--runs-dir", default="runs/benchmark")
    parser.add_argument("--summarize", help="a finished run's directory: print its figures, run nothing")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. eval.max_examples=100")
    args = parser.parse_args()
    if args.summarize:
        report(Path(args.summarize), None)
        return 0
    from selfspec.config import load_config

    name = load_config(args.config, []).name
    command = [sys.executable, "-m", "selfspec.cli", "run", "--config", args.config,
               f"runs_dir={args.runs_dir}", f"generate.target={args.target}", *args.overrides]
    print("$", " ".join(command[2:]), flush=True)
    started = time.perf_counter()
    code = subprocess.call(command)
    wall = time.perf_counter() - started
    if code:
        print(f"selfspec run failed with exit code {code} after {wall / 60:.1f} min", file=sys.stderr)
        return code
    report(Path(args.runs_dir) / name, wall)
    return 0


if __name__ == "__main__":
    sys.exit(main())
