"""LoRA adapter throughput of the transformers backend, side by side in one run.

At one batch size, tokens/s of: the base model; one adapter for the whole batch with its
weights folded into a swapped-in copy of the base (`model.merge_single_adapter`, by default on
for fp32 weights only); the same adapter as two small matmuls a layer (`LowRankAdapter`, the
default for bf16 weights); the same adapter applied by PEFT row by row (both paths off); and
the batch spread over several adapters (PEFT `adapter_names`, as `selfspec serve` mixes
requests). Then how many rows
of a mixed batch equal each adapter alone, and how long folding an adapter takes. Adapters are
r=8, alpha=16, all linear layers, with random weights.

    python benchmarks/adapter_throughput.py [--batch 32] [--adapters 4] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import generation_throughput as G  # noqa: E402


def make_adapters(config, folder: Path, names: list[str], rank: int = 8) -> dict[str, str]:
    """LoRA adapters (alpha 2 x rank, all linear layers) at folder/<name>, with random weights
    from their own seeds (the index in `names`) that change the model's outputs."""
    from selfspec.testing import write_random_lora_adapter

    return {name: str(write_random_lora_adapter(config, folder / name, seed=k, r=rank)) for k, name in enumerate(names)}


def adapter_rates(backend, count: int, batch: int, new_tokens: int, trials: int = 2) -> None:
    """Print the side-by-side rates; loads `count` random adapters and unloads them after."""
    from selfspec.models import SamplingParams

    with tempfile.TemporaryDirectory(prefix="selfspec-adapters-") as root:
        for name, path in make_adapters(backend.model.config, Path(root), [f"domain{k}" for k in range(count)]).items():
            backend.load_adapter(name, path)
    names = list(backend.adapter_paths)
    params = SamplingParams(max_new_tokens=new_tokens)
    mixed = [names[i % count] for i in range(batch)]

    default = backend.merge_single_adapter

    one_adapter = backend._one_adapter

    def rate(adapters, fold: bool = True, peft: bool = False) -> float:
        backend.merge_single_adapter = fold
        backend._one_adapter = (lambda name: False) if peft else one_adapter  # PEFT for every batch
        try:
            backend.generate(G.prompts(batch), SamplingParams(max_new_tokens=4), adapters)
            G.synchronize(backend.device)
            start = time.perf_counter()
            out = backend.generate(G.prompts(batch), params, adapters)
            return sum(c[0].completion_tokens for c in out) / (time.perf_counter() - start)
        finally:
            backend._one_adapter = one_adapter

    print(f"adapters at batch {batch}, {new_tokens} new tokens, {backend.dtype} on {backend.device}, tok/s: "
          f"base / one adapter folded / low-rank / by PEFT / spread over {count} adapters")
    for _ in range(trials):  # alternating: machine speed drifts
        base, folded = rate(None), rate(names[0])
        low_rank, peft, spread = rate(names[0], fold=False), rate(names[0], peft=True), rate(mixed)
        print(f"  {base:8.1f} / {folded:8.1f} / {low_rank:8.1f} / {peft:8.1f} / {spread:8.1f}:  folded {folded / peft:.2f}x PEFT, "
              f"low-rank {low_rank / peft:.2f}x PEFT, folded / base {folded / base:.2f}x, low-rank / base {low_rank / base:.2f}x, "
              f"PEFT / base {peft / base:.2f}x, spread / PEFT {spread / peft:.2f}x")
    backend.merge_single_adapter = True  # folded, also in bf16, for the rest
    backend.generate(G.prompts(1), SamplingParams(max_new_tokens=1), names[1])  # fold domain1 ...
    G.synchronize(backend.device)
    start = time.perf_counter()
    backend.generate(G.prompts(1), SamplingParams(max_new_tokens=1), names[0])  # ... then domain0 again
    G.synchronize(backend.device)
    print(f"  switching the folded adapter (one 1-token call included): {time.perf_counter() - start:.3f} s")
    rows = G.prompts(2 * count)
    together = backend.generate(rows, params, [names[i % count] for i in range(len(rows))])
    alone = [backend.generate([p], params, names[i % count])[0][0] for i, p in enumerate(rows)]
    same = sum(a[0].text == b.text for a, b in zip(together, alone))
    differ = sum(a.text != b.text for a, b in zip(alone[:count], alone[count : 2 * count]))
    print(f"  mixed batch of {len(rows)} == each adapter alone (folded): {same}/{len(rows)}; "
          f"adapters change outputs: {differ}/{count} prompts differ between adapters")
    backend.merge_single_adapter = default
    for name in names:
        backend.unload_adapter(name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    from selfspec.config import ModelConfig
    from selfspec.models import load_backend

    backend = load_backend(ModelConfig(ref=args.model, backend="transformers", max_batch_size=args.batch))
    print(f"model {args.model}: {backend.num_parameters / 1e6:.1f}M parameters; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d %H:%M')}")
    adapter_rates(backend, args.adapters, args.batch, args.new_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
