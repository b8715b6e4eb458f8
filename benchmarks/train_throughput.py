"""LoRA training throughput: Ray Train with 1 worker vs the same loop in plain PyTorch.

One run measures, on the same machine and thread count:
1. torch matmul GFLOP/s (2048 x 2048) in the training compute dtype (the ceiling);
2. `selfspec.stages.train.fit` called directly, in this process (plain PyTorch);
3. `run_train` through Ray Train: 1 worker with the same CPUs, data from Ray Data, once
   with Ray's default worker niceness (15) and once with its workers at nice 0.
Both loops run the same steps on the same packed data; the first step (allocator and
kernel warm-up) is left out of both rates.

FLOPs per trained token (LoRA, frozen base, no gradient checkpointing):
    4 * N_matmul          forward 2N, backward 2N for activation gradients only
                          (no weight gradients for the frozen base; full fine-tuning is 6N)
  + 6 * N_lora            forward, activation and weight gradients of the adapter
  + 6 * L * T * d         attention scores and values (causal: T/2 keys on average), fwd + bwd
where N_matmul counts every weight used in a matmul (the tied embedding once, as the LM head).
The output layer runs only on tokens that carry loss, so 4 * N_head * (share of tokens
without loss) is taken off. A third loop runs the training loop as it was before the CPU work
of issue 25 (PEFT's LoRA layers as shipped, the output layer at every position), for the ratio;
its loss curve differs only by dropout's random masks.
Then CPU training's attention (`matmul_attention`) against SDPA's: each batch trained both ways in
one process, in alternating order.

Usage: python benchmarks/train_throughput.py [--steps 8] [--batch-size 8] [--seq-len 256] [--threads 2]
       python benchmarks/train_throughput.py --attention-crossover 128 256 320 384 512 [--steps 7]

--attention-crossover runs only that A/B, at each packed row length, with matmul_attention's key
limit lifted: where it stops paying is how `MATMUL_ATTENTION_MAX_KEYS` was chosen.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import torch

from selfspec.config import RunConfig, TrainConfig
from selfspec.io import RunDir, write_parquet
from selfspec.schema import example_schema
from selfspec.stages import train as T
from specialization_run import cpu_facts

MODEL = "embedded:smollm2-135m-instruct"


def matmul_gflops(dtype: torch.dtype, n: int = 2048, seconds: float = 3.0) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        done += 1
    return 2 * n**3 * done / (time.perf_counter() - started) / 1e9


def synthetic_examples(count: int) -> list[dict]:
    """Medical-style tasks of about 60 tokens; packing turns them into full rows."""
    return [
        {
            "id": f"bench{i:04d}",
            "instruction": f"Explain in two sentences how drug {i} lowers blood pressure in adults.",
            "input": "",
            "output": (
                f"Drug {i} blocks the angiotensin receptor, so the vessels relax and widen. "
                f"Lower resistance in the vessels reduces the pressure the heart pumps against, case {i}."
            ),
            "domain": "biomedical",
            "seed_ids": [],
            "passage_ids": [],
            "model": MODEL,
            "adapter": "",
            "round": 1,
            "config_hash": "bench",
        }
        for i in range(count)
    ]


def bench_work(args, seq_len: int) -> tuple[TrainConfig, list[dict]]:
    """The benchmark's training config at `seq_len` packed tokens a row, and enough synthetic
    examples that no row repeats within the run."""
    cfg = TrainConfig(
        max_seq_len=seq_len, batch_size=args.batch_size, max_steps=args.steps, packing=True,
        precision=args.precision, checkpoint_every=10_000, cpus_per_worker=args.threads,
    )
    return cfg, synthetic_examples(args.steps * args.batch_size * (seq_len // 50 + 1))


def steady_rate(rows: list[dict]) -> tuple[float, float]:
    """(tokens/s, s/step) over all steps but the first."""
    rest = rows[1:]
    tokens, seconds = sum(r["tokens"] for r in rest), sum(r["seconds"] for r in rest)
    return tokens / seconds, seconds / len(rest)


def plain_pytorch(
    cfg: TrainConfig, examples: list[dict], threads: int, device: str = "cpu", as_before: bool = False
) -> tuple[list[dict], dict]:
    """`fit` in this process; `as_before`: the loop as it was before this issue's CPU work,
    PEFT's LoRA layers as shipped (nn.Dropout, the input copied to fp32), the output layer
    over every position, its input left strided, the attention mask always passed, and
    SDPA's attention."""
    torch.set_num_threads(threads)
    saved = {name: getattr(T, name) for name in ("loss_positions_head", "use_fast_lora_inputs",
                                                  "contiguous_output_layer_input", "right_padded",
                                                  "use_matmul_attention")}
    if as_before:
        T.use_matmul_attention = lambda model: None
        T.loss_positions_head = lambda model: None
        T.use_fast_lora_inputs = T.contiguous_output_layer_input = lambda model: None
        T.right_padded = lambda mask: False  # the attention mask passed as it was
    try:
        return _plain_pytorch(cfg, examples, threads, device)
    finally:
        for name, value in saved.items():
            setattr(T, name, value)


def lora_model_and_rows(cfg: TrainConfig, examples: list[dict], device: torch.device):
    """-> (LoRA model, tokenizer, training rows, autocast dtype), as `run_train` builds them."""
    amp = T.autocast_dtype(cfg.precision, device)
    model, tokenizer = T.load_lora_model(MODEL, cfg, device, amp)
    records, _ = T.tokenize_examples(examples, tokenizer, T.resolve_template(cfg.template, tokenizer), cfg.max_seq_len)
    rows = T.pack_examples(records, cfg.max_seq_len) if cfg.packing else records
    return model, tokenizer, rows, amp


def _plain_pytorch(cfg: TrainConfig, examples: list[dict], threads: int, device: str) -> tuple[list[dict], dict]:
    device = torch.device(device)
    model, tokenizer, rows, amp = lora_model_and_rows(cfg, examples, device)
    plan = T.StepPlan.build(-(-len(rows) // cfg.batch_size), cfg)
    optimizer, scheduler = T.build_optimizer(model, cfg, plan.total_steps)
    history: list[dict] = []
    T.fit(model, optimizer, scheduler, rows, cfg, plan, pad_id=tokenizer.pad_token_id, device=device, amp=amp,
          on_step=lambda m: history.append(m.row()))
    shape = model.get_base_model().config
    info = {
        "n_matmul": sum(p.numel() for n, p in model.named_parameters() if not p.requires_grad and p.dim() == 2),
        "n_lora": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "n_head": model.get_base_model().get_output_embeddings().weight.numel(),
        "loss_share": (lambda targets, tokens: targets / tokens)(*T.count_tokens([rows])),
        "layers": shape.num_hidden_layers,
        "d_model": shape.hidden_size,
        "precision": str(amp or torch.float32).removeprefix("torch."),
        "rows": len(rows),
    }
    return history, info


def attention_ab(cfg: TrainConfig, examples: list[dict], threads: int, steps: int) -> tuple[float, float]:
    """Each of `steps` batches trained twice in one process, once with SDPA's attention and once
    with `matmul_attention`, in alternating order (the host drifts by 5% between loops and more
    between hours; here it cancels out). -> (tokens/s with SDPA, with matmul_attention), the
    first batch left out."""
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    model, tokenizer, rows, amp = lora_model_and_rows(cfg, examples, device)
    optimizer, scheduler = T.build_optimizer(model, cfg, 2 * steps)
    base = model.get_base_model()
    seconds, tokens = {"sdpa": 0.0, T.TRAIN_ATTENTION: 0.0}, 0
    for i in range(steps):
        batch = rows[i * cfg.batch_size : (i + 1) * cfg.batch_size]
        targets, count = T.count_tokens([batch])
        for attention in ("sdpa", T.TRAIN_ATTENTION) if i % 2 else (T.TRAIN_ATTENTION, "sdpa"):
            base.set_attn_implementation(attention)
            started = time.perf_counter()
            T.train_step(model, optimizer, scheduler, [batch], global_targets=targets, world_size=1,
                         pad_id=tokenizer.pad_token_id, device=device, amp=amp, max_grad_norm=cfg.max_grad_norm)
            seconds[attention] += (time.perf_counter() - started) if i else 0.0
        tokens += count if i else 0
    return tokens / seconds["sdpa"], tokens / seconds[T.TRAIN_ATTENTION]


def attention_crossover(args) -> int:
    """The attention A/B alone at each of --attention-crossover's packed row lengths, with no
    key limit on `matmul_attention` (past it, both arms would run SDPA)."""
    print(f"machine: {cpu_facts()}, {args.threads} threads; {time.strftime('%Y-%m-%d %H:%M')}")
    limit, T.MATMUL_ATTENTION_MAX_KEYS = T.MATMUL_ATTENTION_MAX_KEYS, 10**9
    try:
        for seq_len in args.attention_crossover:
            cfg, examples = bench_work(args, seq_len)
            sdpa_rate, ours_rate = attention_ab(cfg, examples, args.threads, args.steps)
            print(f"packed rows of {seq_len:4d} tokens: matmul_attention {ours_rate:6.1f} vs SDPA {sdpa_rate:6.1f} "
                  f"tokens/s, x{ours_rate / sdpa_rate:.3f}", flush=True)
    finally:
        T.MATMUL_ATTENTION_MAX_KEYS = limit
    print(f"matmul_attention's key limit as shipped: {limit}")
    return 0


def ray_train(cfg: TrainConfig, examples: list[dict], threads: int, worker_niceness: int | None = None) -> list[dict]:
    """`run_train` on a fresh local Ray; `worker_niceness` None keeps Ray's default (15)."""
    import ray

    ray.shutdown()
    system_config = {} if worker_niceness is None else {"worker_niceness": worker_niceness}
    ray.init(num_cpus=threads, include_dashboard=False, log_to_driver=False, _system_config=system_config)
    with tempfile.TemporaryDirectory(prefix="selfspec-bench-") as root:
        config = RunConfig(name="bench", runs_dir=root, train=cfg.model_copy(update={"cpus_per_worker": threads}))
        run_dir = RunDir(f"{root}/bench")
        write_parquet(run_dir.path("data", "examples.parquet"), examples, schema=example_schema())
        T.run_train(config, run_dir)
        with open(run_dir.path("train", "metrics.jsonl")) as f:
            return [json.loads(line) for line in f]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--attention-crossover", type=int, nargs="+", metavar="SEQ_LEN")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.attention_crossover:
        return attention_crossover(args)

    cfg, examples = bench_work(args, args.seq_len)
    load_before = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    amp = T.autocast_dtype(cfg.precision, torch.device("cpu")) or torch.float32
    peak = matmul_gflops(amp)
    full, _ = plain_pytorch(cfg, examples, args.threads, as_before=True)
    plain, info = plain_pytorch(cfg, examples, args.threads)
    sdpa_rate, ours_rate = attention_ab(cfg, examples, args.threads, args.steps)
    ray_rows = ray_train(cfg, examples, args.threads)
    nice0_rows = ray_train(cfg, examples, args.threads, worker_niceness=0)
    peak_after = matmul_gflops(amp)
    load_after = os.getloadavg()[0]

    full_rate, full_step = steady_rate(full)
    plain_rate, plain_step = steady_rate(plain)
    ray_rate, ray_step = steady_rate(ray_rows)
    nice0_rate, nice0_step = steady_rate(nice0_rows)
    tokens_per_row = sum(r["tokens"] for r in plain) / len(plain) / args.batch_size
    flops_per_token = 4 * info["n_matmul"] + 6 * info["n_lora"] + 6 * info["layers"] * tokens_per_row * info["d_model"]
    # The output layer now runs only on tokens that carry loss: count the work done.
    head_saved = 4 * info["n_head"] * (1 - info["loss_share"])
    best_peak = max(peak, peak_after)

    import ray

    print(f"selfspec train throughput ({time.strftime('%Y-%m-%d %H:%M')})")
    print(f"machine: {cpu_facts()}, {args.threads} threads; "
          f"torch {torch.__version__}, ray {ray.__version__}; load average {load_before:.1f} -> {load_after:.1f}")
    print(f"model: {MODEL}; LoRA r={cfg.r} alpha={cfg.alpha} {cfg.target_modules}; "
          f"{info['n_matmul'] / 1e6:.1f}M matmul weights, {info['n_lora'] / 1e6:.2f}M trainable; "
          f"compute {info['precision']}")
    print(f"work: {args.steps} steps of {args.batch_size} packed rows x {args.seq_len} tokens "
          f"({tokens_per_row:.0f} tokens/row); rates exclude step 1")
    print(f"matmul {2048}x{2048} {info['precision']}: {peak:.0f} GFLOP/s before, {peak_after:.0f} after")
    print(f"plain, as before:    {full_rate:8.1f} tokens/s  ({full_step:.2f} s/step)  "
          f"(PEFT's layers as shipped, output layer at every position)")
    print(f"plain PyTorch:       {plain_rate:8.1f} tokens/s  ({plain_step:.2f} s/step)  "
          f"x{plain_rate / full_rate:.2f} vs as before")
    print(f"attention, each batch both ways, alternating: matmul_attention {ours_rate:.1f} vs SDPA {sdpa_rate:.1f} "
          f"tokens/s, x{ours_rate / sdpa_rate:.3f}")
    print(f"Ray Train, 1 worker: {ray_rate:8.1f} tokens/s  ({ray_step:.2f} s/step)  (workers at nice 15, Ray's default)")
    print(f"  workers at nice 0: {nice0_rate:8.1f} tokens/s  ({nice0_step:.2f} s/step)")
    print(f"ratio Ray / plain:   {ray_rate / plain_rate:8.3f}, at nice 0 {nice0_rate / plain_rate:.3f}  (goal >= 0.9)")
    print(f"FLOPs/token = 4*{info['n_matmul'] / 1e6:.1f}M + 6*{info['n_lora'] / 1e6:.2f}M + "
          f"6*{info['layers']}*{tokens_per_row:.0f}*{info['d_model']} = {flops_per_token / 1e6:.0f} MFLOP")
    print(f"  less 4*{info['n_head'] / 1e6:.1f}M (output layer) x {1 - info['loss_share']:.0%} of tokens "
          f"without loss = {(flops_per_token - head_saved) / 1e6:.0f} MFLOP when the output layer runs on loss tokens only")
    for name, rate, flops in (
        ("as before", full_rate, flops_per_token),
        ("plain", plain_rate, flops_per_token - head_saved),
        ("A/B matmul", ours_rate, flops_per_token - head_saved),
        ("A/B sdpa", sdpa_rate, flops_per_token - head_saved),
        ("ray", ray_rate, flops_per_token - head_saved),
        ("ray nice 0", nice0_rate, flops_per_token - head_saved),
    ):
        achieved = rate * flops / 1e9
        print(f"{name:11s}: {achieved:6.1f} GFLOP/s = {achieved / best_peak:.1%} of the matmul rate")
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB "
          f"(Ray Train's worker is a process of its own)")
    print(f"loss step 1 -> {args.steps}: as before {full[0]['loss']:.3f} -> {full[-1]['loss']:.3f}, "
          f"plain {plain[0]['loss']:.3f} -> {plain[-1]['loss']:.3f}, "
          f"ray {ray_rows[0]['loss']:.3f} -> {ray_rows[-1]['loss']:.3f}, "
          f"ray nice 0 {nice0_rows[0]['loss']:.3f} -> {nice0_rows[-1]['loss']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
