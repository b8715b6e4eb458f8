"""Serving on vLLM: selfspec's Serve app against Ray's own `ray.serve.llm` OpenAI app.

Both serve the embedded model on one vLLM engine with LoRA enabled (1 replica), on
127.0.0.1, and get the same load in one run: N concurrent chat clients, all on the base,
all on one adapter, and spread over three adapters. The apps cannot alternate rounds
(each holds an engine of several GiB), so each runs its rounds in turn, ours first, and
the load average is printed beside every figure.

`ray.serve.llm` loads adapters only from cloud storage (`lora_config.dynamic_lora_loading_path`
must start with s3://, gs://, abfss:// or azure://; a local folder is refused), so its
adapters are served from a local S3 (moto's server on 127.0.0.1), as a cluster would
serve them from a bucket. Needs the vllm venv plus moto:

    make setup-vllm && .venv-vllm/bin/pip install 'moto[server]' boto3
    .venv-vllm/bin/python benchmarks/serve_llm_compare.py [--clients 8] [--requests 32]
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
from serving_throughput import free_port, load  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

BUCKET = "selfspec-bench"
CREDENTIALS = {"aws_access_key_id": "bench", "aws_secret_access_key": "bench"}  # moto accepts any
ADAPTERS = ["a1", "a2", "a3"]


def wait_for_models(client, names: set[str], deadline_s: float) -> None:
    """Poll /v1/models until `names` are listed (Serve answers 404 while an app deploys)."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            if names <= {m.id for m in client.models.list().data}:
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the app did not list {sorted(names)} within {deadline_s:.0f}s")
        time.sleep(2)


def start_local_s3(adapters: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """moto's S3 server on a loopback port, holding the adapters at s3://BUCKET/adapters/<name>/."""
    import boto3

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **CREDENTIALS)
    for _ in range(100):
        try:
            s3.create_bucket(Bucket=BUCKET)
            break
        except Exception:  # noqa: BLE001 - the server is starting
            time.sleep(0.2)
    for name, folder in adapters.items():
        for file in Path(folder).iterdir():
            s3.upload_file(str(file), BUCKET, f"adapters/{name}/{file.name}")
    return server, endpoint


def measure(client, label: str, models_by_case: dict[str, list[str]], args, say) -> dict[str, float]:
    # Warm-up: one request per adapter first (ray.serve.llm fails concurrent first requests
    # to one adapter: "The lora adapter 'base:a1' has already been loaded"), then a full load.
    for model in models_by_case["mixed"]:
        load(client, [model], 1, 1, args.max_tokens)
    load(client, models_by_case["mixed"], args.clients, args.clients, args.max_tokens)
    rates: dict[str, list[float]] = {case: [] for case in models_by_case}
    for round_ in range(1, args.rounds + 1):
        for case, models in models_by_case.items():
            r = load(client, models, args.clients, args.requests, args.max_tokens)
            rates[case].append(r["rps"])
            say(
                f"{label:>15} {round_:>5} {case:>7} {r['rps']:>7.2f} {r['tok_s']:>7.1f} {r['p50']:>7.2f} "
                f"{r['p99']:>7.2f} {os.getloadavg()[0]:>9.1f}"
            )
    return {case: statistics.mean(v) for case, v in rates.items()}


def serve_selfspec(client, model_path: str, adapters: dict[str, str], folder: Path, workdir: Path, args, say):
    """Ours: AdapterModel replicas on the vllm backend, adapters from a local folder."""
    from ray import serve

    from selfspec.config import RunConfig
    from selfspec.serving.app import APP_NAME, build_app

    config = RunConfig.model_validate(
        {
            "runs_dir": str(workdir / "runs"),
            "model": {"backend": "vllm", "dtype": args.dtype, "max_model_len": 2048, "cpu_kv_cache_gib": args.kv_cache_gib,
                      "max_lora_rank": 8, "max_loras": len(ADAPTERS)},  # the engine settings ray.serve.llm gets
            "serve": {
                "adapter_dirs": [str(folder)],
                "max_batch_size": args.clients,
                "max_ongoing_requests": max(64, 2 * args.clients),
                "num_cpus_per_replica": 1,
            },
        }
    )
    started = time.time()
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    wait_for_models(client, {"base", *ADAPTERS}, 600)
    say(f"{'selfspec':>15} app up in {time.time() - started:.0f}s")
    rates = measure(client, "selfspec", {"base": ["base"], "single": ["a1"], "mixed": ADAPTERS}, args, say)
    serve.delete(APP_NAME)
    return rates


def serve_ray_llm(client, model_path: str, adapters: dict[str, str], folder: Path, workdir: Path, args, say):
    """ray.serve.llm: its OpenAI app and LoRA multiplexing, adapters from the local S3."""
    from ray import serve
    from ray.serve.llm import LLMConfig, build_openai_app

    s3_server, endpoint = start_local_s3(adapters)
    try:
        env = {"VLLM_CPU_KVCACHE_SPACE": f"{args.kv_cache_gib:g}", "AWS_ENDPOINT_URL_S3": endpoint,
               "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
               "AWS_DEFAULT_REGION": "us-east-1", "HF_HUB_OFFLINE": "1"}
        llm_config = LLMConfig(
            model_loading_config={"model_id": "base", "model_source": model_path},
            engine_kwargs={"dtype": args.dtype, "max_model_len": 2048, "enable_lora": True, "max_lora_rank": 8,
                           "max_loras": len(ADAPTERS), "enable_prefix_caching": True},
            lora_config={"dynamic_lora_loading_path": f"s3://{BUCKET}/adapters", "max_num_adapters_per_replica": len(ADAPTERS)},
            placement_group_config={"bundles": [{"CPU": 1}]},
            deployment_config={"num_replicas": 1},
            runtime_env={"env_vars": env},
            log_engine_metrics=False,
        )
        started = time.time()
        serve.run(build_openai_app({"llm_configs": [llm_config]}), name="ray-serve-llm", route_prefix="/")
        wait_for_models(client, {"base"}, 600)
        say(f"{'ray.serve.llm':>15} app up in {time.time() - started:.0f}s")
        theirs = {"base": ["base"], "single": ["base:a1"], "mixed": [f"base:{a}" for a in ADAPTERS]}
        rates = measure(client, "ray.serve.llm", theirs, args, say)
        serve.delete("ray-serve-llm")
        return rates
    finally:
        s3_server.terminate()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32, help="requests per measurement")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--kv-cache-gib", type=float, default=1)
    parser.add_argument("--apps", default="selfspec,ray.serve.llm", help="which apps to measure, in order")
    parser.add_argument("--out", help="also write the report to this file")
    args = parser.parse_args()

    import ray
    from openai import OpenAI
    from ray import serve
    from transformers import AutoConfig

    from selfspec.models.resolve import resolve_model

    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    model_path = resolve_model("embedded:smollm2-135m-instruct")
    workdir = Path(tempfile.mkdtemp(prefix="serve-llm-bench-"))
    folder = workdir / "runs" / "bench" / "adapters"
    adapters = make_adapters(AutoConfig.from_pretrained(model_path), folder, ADAPTERS, 8)
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = f"{args.kv_cache_gib:g}"
    # Logical CPUs: ray.serve.llm asks 2 for its engine replica (actor + bundle) and 1 for its ingress.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
    flags = sorted({f for f in Path("/proc/cpuinfo").read_text().split() if f in {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}})
    say(f"# serving on vLLM: selfspec's app vs ray.serve.llm ({time.strftime('%Y-%m-%d %H:%M')})")
    say(f"embedded smollm2-135m-instruct, vLLM {__import__('vllm').__version__}, ray {ray.__version__}, dtype {args.dtype}, "
        f"{os.cpu_count()} cores, flags {' '.join(flags)}; LoRA r=8 all-linear x {len(ADAPTERS)}")
    say(f"{args.clients} concurrent clients, {args.requests} chat requests x {args.max_tokens} tokens per measurement")
    say()
    say(f"{'app':>15} {'round':>5} {'case':>7} {'req/s':>7} {'tok/s':>7} {'p50 s':>7} {'p99 s':>7} {'load avg':>9}")
    results = {}
    runs = {"selfspec": serve_selfspec, "ray.serve.llm": serve_ray_llm}
    try:
        for app in args.apps.split(","):
            results[app] = runs[app](client, model_path, adapters, folder, workdir, args, say)
    finally:
        serve.shutdown()
        ray.shutdown()
    say()
    for case in ("base", "single", "mixed") if len(results) == 2 else ():
        say(f"{case:>7}: selfspec {results['selfspec'][case]:.2f} req/s, ray.serve.llm {results['ray.serve.llm'][case]:.2f}"
            f" req/s; ray.serve.llm / selfspec = {results['ray.serve.llm'][case] / results['selfspec'][case]:.2f}")
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
