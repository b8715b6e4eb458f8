"""Generation throughput of the selfspec backend vs the plain alternatives, in one run.

Prints tokens/s of the transformers backend at several batch sizes, of a naive
per-prompt fp32 `model.generate` loop, and of llama-cpp-python on the same GGUF
when it is installed; at the best batch, the backend side by side with one plain
`model.generate` call on the same model and batch; the ratios; and the achieved
GFLOP/s (2 x parameters x tokens/s) as a fraction of the torch matmul GFLOP/s in
the backend's dtype, measured here in the same run.

With `--engines` (run from `.venv-vllm`) it then compares vLLM's CPU build with the
transformers engine on the same chat prompts, base and three mixed adapters, in tokens/s
and tokens per CPU-second (`vllm_cpu_engines.py`, each engine in its own process).

    python benchmarks/generation_throughput.py [--model embedded:smollm2-135m-instruct] [--new-tokens 64] [--engines]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time

import torch

TOPICS = [
    "insulin", "inflation", "a bond", "DNA", "GDP", "the heart", "a stock", "an antibody",
    "interest rates", "a vaccine", "a balance sheet", "cholesterol", "a dividend", "an enzyme",
    "a mutual fund", "blood pressure",
]


def prompts(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"Explain {TOPICS[i % len(TOPICS)]} in two sentences."}] for i in range(n)]


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_gflops(dtype: torch.dtype, size: int = 2048, repeats: int = 10, device: str = "cpu") -> float:
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    for _ in range(2):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def linear_layers_gflops(model, rows: int, dtype: torch.dtype) -> float:
    """GFLOP/s of the model's own linear layers timed alone on `rows` token rows, weighted by
    their FLOPs in one decode step: what a decode step would reach with no other cost."""
    shapes: dict[tuple[int, int], int] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            key = (module.in_features, module.out_features)
            shapes[key] = shapes.get(key, 0) + 1
    flops = seconds = 0.0
    for (k, n), count in shapes.items():
        x, w = torch.randn(rows, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
        repeats = max(5, int(2e10 / (2 * rows * k * n)))
        for _ in range(3):
            torch.nn.functional.linear(x, w)
        start = time.perf_counter()
        for _ in range(repeats):
            torch.nn.functional.linear(x, w)
        flops += 2 * rows * k * n * count
        seconds += (time.perf_counter() - start) / repeats * count
    return flops / seconds / 1e9


def backend_rate(backend, batch: int, new_tokens: int) -> tuple[float, str, float]:
    """Completion tokens/s, a sample text, and the share of batch slots that would hold a live
    row in one `generate` call, where rows that end early ride along until the longest ends."""
    from selfspec.models import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens)
    backend.generate(prompts(batch), SamplingParams(max_new_tokens=4))  # warm up at this batch
    start = time.perf_counter()
    out = backend.generate(prompts(batch), params)
    seconds = time.perf_counter() - start
    tokens = [c[0].completion_tokens for c in out]
    return sum(tokens) / seconds, out[0][0].text, sum(tokens) / (len(tokens) * max(tokens))


def plain_generate_rate(backend, batch: int, new_tokens: int) -> float:
    """Completion tokens/s of one transformers `model.generate` call, with its SDPA attention,
    on the same model, dtype and left-padded batch: the plain alternative to the backend's own
    decode loop and attention."""
    from selfspec.models.hf_backend import attention_implementation

    eos = backend.tokenizer.eos_token_id
    encoded = backend._encode([backend.render(p) for p in prompts(batch)])
    with attention_implementation(backend.model, "sdpa"), torch.inference_mode():
        backend.model.generate(**encoded, max_new_tokens=4, do_sample=False, pad_token_id=eos)
        start = time.perf_counter()
        out = backend.model.generate(**encoded, max_new_tokens=new_tokens, do_sample=False, pad_token_id=eos)
        synchronize(backend.device)
        seconds = time.perf_counter() - start
    rows = out[:, encoded["input_ids"].shape[1] :].tolist()
    return sum(row.index(eos) + 1 if eos in row else len(row) for row in rows) / seconds


def naive_rate(path: str, count: int, new_tokens: int, device: str = "cpu") -> float:
    """What a user writes first: fp32, one prompt at a time, model.generate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    tokens = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for messages in prompts(count):
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            ids = {k: v.to(device) for k, v in ids.items()}
            out = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False)
            tokens += out.shape[1] - ids["input_ids"].shape[1]
    return tokens / (time.perf_counter() - start)


def llama_cpp_rate(gguf: str, count: int, new_tokens: int) -> float | None:
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_threads=torch.get_num_threads(), verbose=False, n_ctx=512)
    tokens = 0
    start = time.perf_counter()
    for messages in prompts(count):
        out = llm.create_chat_completion(messages=messages, max_tokens=new_tokens, temperature=0.0)
        tokens += out["usage"]["completion_tokens"]
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", default="1,8,32,64,128,256,512")
    parser.add_argument("--naive-prompts", type=int, default=4)
    parser.add_argument("--engines", action="store_true", help="then vLLM-CPU vs transformers (needs vllm-cpu)")
    parser.add_argument("--engine-prompts", type=int, default=128)
    args = parser.parse_args()

    from selfspec.config import ModelConfig
    from selfspec.models import load_backend
    from selfspec.models.resolve import embedded_gguf_path, resolve_model

    torch.set_num_threads(os.cpu_count() or 1)
    batches = [int(b) for b in args.batches.split(",")]
    backend = load_backend(ModelConfig(ref=args.model, backend="transformers", max_batch_size=max(batches)))
    dtype = backend.dtype
    params = backend.num_parameters
    peak = matmul_gflops(dtype)
    print(f"model {args.model}: {params / 1e6:.1f}M parameters, dtype {dtype}, {torch.get_num_threads()} threads")
    print(f"torch matmul 2048x2048 in {dtype}: {peak:.0f} GFLOP/s")

    rates: dict[int, float] = {}
    live: dict[int, float] = {}
    sample = ""
    for batch in batches:
        rates[batch], text, live[batch] = backend_rate(backend, batch, args.new_tokens)
        gflops = 2 * params * rates[batch] / 1e9
        print(f"selfspec backend batch {batch:4d}: {rates[batch]:8.1f} tok/s  {gflops:6.1f} GFLOP/s  {gflops / peak:6.1%} of matmul")
        sample = text
    best = max(rates, key=rates.get)
    print(f"best batch {best}: {rates[best]:.1f} tok/s; sample greedy output: {sample[:160]!r}")
    ceiling = linear_layers_gflops(backend.model, best, dtype)
    print(f"where the time goes at batch {best}: the model's linear layers alone reach {ceiling:.0f} GFLOP/s "
          f"({ceiling / peak:.0%} of matmul); answers end at different steps, so in one generate call "
          f"only {live[best]:.0%} of batch slots would hold a live row")
    segment = backend.decode_segment
    ours, dropless, plain = [], [], []
    for _ in range(2):  # alternating: this machine's speed drifts between runs
        backend.decode_segment = segment
        ours.append(backend_rate(backend, best, args.new_tokens)[0])
        backend.decode_segment = 10**9
        dropless.append(backend_rate(backend, best, args.new_tokens)[0])
        plain.append(plain_generate_rate(backend, best, args.new_tokens))
    backend.decode_segment = segment
    print(f"side by side at batch {best}, alternating (tok/s): our decode loop / the same loop keeping ended rows "
          f"/ one plain model.generate call")
    for o, d, g in zip(ours, dropless, plain):
        print(f"  {o:.1f} / {d:.1f} / {g:.1f}: {o / g:.2f}x plain generate, dropping ended rows every {segment} "
              f"tokens {o / d:.2f}x")

    naive = naive_rate(resolve_model(args.model), args.naive_prompts, args.new_tokens)
    print(f"naive per-prompt fp32 model.generate: {naive:.1f} tok/s")
    llama = None
    if args.model.startswith("embedded:"):
        llama = llama_cpp_rate(str(embedded_gguf_path(args.model.split(':', 1)[1])), args.naive_prompts, args.new_tokens)
    print(f"llama-cpp-python single stream: {'not installed' if llama is None else f'{llama:.1f} tok/s'}")

    print("ratios:")
    print(f"  best batch / naive fp32 loop:     {rates[best] / naive:6.1f}x")
    print(f"  batch 1 / naive fp32 loop:        {rates.get(1, float('nan')) / naive:6.1f}x")
    if llama:
        print(f"  best batch / llama-cpp-python:    {rates[best] / llama:6.1f}x")
    print(f"  achieved / matmul GFLOP/s at best: {2 * params * rates[best] / 1e9 / peak:6.1%}")
    if llama:
        needed = 2 * params * 10 * llama / 1e9
        print(f"10x llama-cpp-python ({10 * llama:.0f} tok/s) needs {needed:.0f} GFLOP/s, "
              f"{needed / peak:.0%} of this machine's {dtype} matmul rate")
    if args.engines:
        import sys
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from vllm_cpu_engines import compare_engines

        del backend  # one engine in memory at a time
        print()
        compare_engines(args.engine_prompts, args.new_tokens, torch.get_num_threads())


if __name__ == "__main__":
    main()
