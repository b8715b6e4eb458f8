"""The GPU path of the transformers backend, each part side by side with the plain alternative.

One run on one CUDA GPU, with the embedded model (or `--model`):
1. correctness in fp32: the backend's greedy outputs equal one `model.generate` call, a batch
   of 8 equals 8 single calls, and the model answers a simple question sensibly;
2. generation in the backend's dtype: tokens/s at several batch sizes, each side by side with
   one plain `model.generate` call on the same batch, a naive per-prompt fp32 loop, and the
   achieved FLOP/s (2 x parameters x tokens/s) as a share of the GPU's matmul rate;
3. LoRA adapters (`adapter_throughput.py`): the base, one adapter folded into the weights, the
   same adapter applied by PEFT, and one batch spread over several adapters;
4. LoRA training: `selfspec.stages.train.fit` (r=8, alpha=16, all linear layers) tokens/s and
   its share of the matmul rate.
vLLM and faiss-gpu are not measured here (see `pytest -m gpu` for the vLLM path).

    python benchmarks/gpu_path.py [--model embedded:smollm2-135m-instruct] [--batches 1,256,1024] [--trials 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import adapter_throughput as A  # noqa: E402
import generation_throughput as G  # noqa: E402
import train_throughput as TT  # noqa: E402

QUESTION = [{"role": "user", "content": "What is the main function of insulin in the body?"}]


def check_fp32(model_ref: str, new_tokens: int) -> None:
    """Greedy equality checks in fp32, where batching must not change the argmax."""
    from selfspec.config import ModelConfig
    from selfspec.models import SamplingParams, load_backend

    backend = load_backend(ModelConfig(ref=model_ref, backend="transformers", dtype="float32", max_batch_size=8))
    params = SamplingParams(max_new_tokens=new_tokens)
    batch = G.prompts(8)
    ours = [c[0].text for c in backend.generate(batch, params)]
    singles = [backend.generate([p], params)[0][0].text for p in batch]
    eos = backend.tokenizer.eos_token_id
    encoded = backend._encode([backend.render(p) for p in batch])
    with torch.inference_mode():
        out = backend.model.generate(**encoded, max_new_tokens=new_tokens, do_sample=False, pad_token_id=eos)
    plain = []
    for row in out[:, encoded["input_ids"].shape[1]:].tolist():
        plain.append(backend.tokenizer.decode(row[: row.index(eos)] if eos in row else row, skip_special_tokens=True))
    answer = backend.generate([QUESTION], SamplingParams(max_new_tokens=48))[0][0].text
    print(f"fp32 on {backend.device}: batch of 8 == plain model.generate: {sum(a == b for a, b in zip(ours, plain))}/8; "
          f"batch of 8 == 8 single calls: {sum(a == b for a, b in zip(ours, singles))}/8")
    print(f"answer to {QUESTION[0]['content']!r}: {answer!r}")
    del backend
    free_gpu_memory()


def free_gpu_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def generation(backend, batches: list[int], new_tokens: int, peak: float, trials: int) -> dict[int, float]:
    """Median tokens/s per batch over alternating trials (ours, then plain generate)."""
    params = backend.num_parameters
    for batch in batches:  # the first call at each shape pays one-time CUDA costs (kernel choice, allocator)
        G.backend_rate(backend, batch, 8)
        G.plain_generate_rate(backend, batch, 8)
    rates = {}
    print(f"generation, {new_tokens} new tokens, greedy, tok/s: selfspec backend / one plain model.generate call, "
          f"{trials} alternating trials")
    for batch in batches:
        pairs = [(G.backend_rate(backend, batch, new_tokens)[0], G.plain_generate_rate(backend, batch, new_tokens))
                 for _ in range(trials)]
        ours = statistics.median(o for o, _ in pairs)
        rates[batch] = ours
        share = 2 * params * ours / 1e9 / peak
        trial_text = ", ".join(f"{o:.0f}/{p:.0f} = {o / p:.2f}x" for o, p in pairs)
        print(f"  batch {batch:5d}: {trial_text};  median ours {ours:.0f} tok/s = {share:.2%} of matmul")
    return rates


def training(model_ref: str, steps: int, batch_size: int, seq_len: int, peak: float, device: str) -> None:
    from selfspec.config import TrainConfig

    cfg = TrainConfig(max_seq_len=seq_len, batch_size=batch_size, max_steps=steps, packing=True,
                      checkpoint_every=10_000)
    examples = TT.synthetic_examples(steps * batch_size * (seq_len // 50 + 1))
    TT.MODEL = model_ref
    history, info = TT.plain_pytorch(cfg, examples, torch.get_num_threads(), device=device)
    rate, step_seconds = TT.steady_rate(history)
    tokens_per_row = sum(r["tokens"] for r in history) / len(history) / batch_size
    flops = 4 * info["n_matmul"] + 6 * info["n_lora"] + 6 * info["layers"] * tokens_per_row * info["d_model"]
    print(f"LoRA training ({info['precision']}, r={cfg.r}, {info['n_lora'] / 1e6:.2f}M trainable), {steps} steps of "
          f"{batch_size} x {seq_len} packed tokens: {rate:.0f} tokens/s ({step_seconds * 1000:.0f} ms/step), "
          f"{rate * flops / 1e12:.1f} TFLOP/s = {rate * flops / 1e9 / peak:.2%} of matmul; loss "
          f"{history[0]['loss']:.3f} -> {history[-1]['loss']:.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", default="1,256,1024")
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--naive-prompts", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--lora-batch", type=int, default=256)
    parser.add_argument("--lora-new-tokens", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=8)
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--train-seq-len", type=int, default=512)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a slow dry run of the script
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from selfspec.config import ModelConfig
    from selfspec.models import load_backend
    from selfspec.models.resolve import resolve_model

    batches = [int(b) for b in args.batches.split(",")]
    gpu = torch.cuda.get_device_name() if device == "cuda" else "no GPU (dry run on CPU)"
    print(f"{gpu}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")
    check_fp32(args.model, args.new_tokens)
    backend = load_backend(ModelConfig(ref=args.model, backend="transformers", max_batch_size=max(batches)))
    peak = G.matmul_gflops(backend.dtype, size=8192 if device == "cuda" else 2048, device=device)
    print(f"model {args.model}: {backend.num_parameters / 1e6:.1f}M parameters, {backend.dtype}; "
          f"torch matmul in {backend.dtype}: {peak / 1000:.0f} TFLOP/s")
    rates = generation(backend, batches, args.new_tokens, peak, args.trials)
    naive = G.naive_rate(resolve_model(args.model), args.naive_prompts, args.new_tokens, device=device)
    best = max(rates, key=rates.get)
    print(f"naive per-prompt fp32 model.generate on {device}: {naive:.1f} tok/s; best batch {best} / naive "
          f"{rates[best] / naive:.1f}x; batch 1 / naive {rates.get(1, float('nan')) / naive:.2f}x")
    A.adapter_rates(backend, args.adapters, args.lora_batch, args.lora_new_tokens)
    del backend
    free_gpu_memory()
    training(args.model, args.train_steps, args.train_batch, args.train_seq_len, peak, device)
    if device == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
