"""lm-evaluation-harness through `selfspec serve` vs lm-evaluation-harness on the model itself.

Writes PubMedQA (the shared data's task, first N rows) as an lm-eval multiple-choice task
(yes / no / maybe scored by log-likelihood), then runs lm-eval twice on it:

1. `local-completions` against the selfspec Serve app on 127.0.0.1 (token-id prompts, echo,
   logprobs: the requests this server answers as vLLM's does);
2. `hf` on the same weights (and the same adapter, through `peft=`).

and prints both accuracies, how many answers differ and the largest difference between the
two runs' log-likelihoods of a choice (they should agree to ~1e-3 in fp32).

lm-eval lives in its own virtual environment (it pins its own packages), for example:

    python3.11 -m venv .lmeval-venv
    .lmeval-venv/bin/pip install torch==2.13.0 && .lmeval-venv/bin/pip install "lm-eval[hf,api]"

    python benchmarks/lm_eval_pubmedqa.py [--rows 100] [--adapter runs/x/adapters/bio] \\
        [--lm-eval-python .lmeval-venv/bin/python] [--out DIR]

Cost on 2 CPU cores: 3 choices x N rows of ~300-token prompts, twice (a few minutes per 100 rows).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
TASK_DIR = REPO.parent / "shared" / "data" / "biomedical" / "pubmedqa"
TASK_NAME = "selfspec_pubmedqa"


def write_lm_eval_task(task_dir: Path, rows: int, out: Path) -> Path:
    """An lm-eval task folder for a selfspec task with a label set: `rows.jsonl` ({prompt,
    gold}: the instruction and input as selfspec words them, then "Answer:"; gold is the
    label's index) and `<TASK_NAME>.yaml` (multiple choice over the labels, accuracy).
    -> the folder, for lm-eval's --include_path."""
    from selfspec.schema import user_message
    from selfspec.tasks import load_task, read_task_jsonl

    task = load_task(task_dir)
    labels = list(task.labels)
    records = read_task_jsonl(task_dir / "test.jsonl", task.labels)[:rows]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "rows.jsonl", "w") as f:
        for row in records:
            prompt = user_message(task.instruction, row["input"]) + "\nAnswer:"
            f.write(json.dumps({"id": row["id"], "prompt": prompt, "gold": labels.index(row["output"])}) + "\n")
    config = {
        "task": TASK_NAME,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(out / "rows.jsonl")}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{prompt}}",
        "doc_to_choice": labels,
        "doc_to_target": "gold",
        "target_delimiter": " ",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    (out / f"{TASK_NAME}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return out


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_lm_eval(python: str, model: str, model_args: dict[str, str], include: Path, out: Path, batch: int) -> dict:
    """Run lm-eval's CLI; -> {"acc": accuracy, "logliks": {doc id: [loglik per choice]}}."""
    args = ",".join(f"{k}={v}" for k, v in model_args.items())
    command = [
        python, "-m", "lm_eval", "--model", model, "--model_args", args, "--tasks", TASK_NAME,
        "--include_path", str(include), "--output_path", str(out), "--log_samples", "--batch_size", str(batch),
    ]
    if model == "hf":
        command += ["--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(command, check=True, env=env)
    results = json.loads(max(out.rglob("results_*.json")).read_text())
    samples = [json.loads(line) for line in max(out.rglob(f"samples_{TASK_NAME}_*.jsonl")).read_text().splitlines()]
    logliks = {s["doc"]["id"]: [float(r[0]) for r in s["filtered_resps"]] for s in samples}
    return {"acc": results["results"][TASK_NAME]["acc,none"], "logliks": logliks}


def serve_and_evaluate(args, model_path: str, include: Path, out: Path) -> dict:
    """lm-eval `local-completions` against the Serve app, started here and stopped after."""
    import ray
    from ray import serve

    from selfspec.config import RunConfig
    from selfspec.serving.app import APP_NAME, build_app

    adapter = Path(args.adapter).resolve() if args.adapter else None
    config = RunConfig.model_validate(
        {
            "runs_dir": str(out / "runs"),
            "model": {"dtype": args.dtype, "backend": "transformers"},
            "serve": {
                "adapter_dirs": [str(adapter)] if adapter else [],
                "num_cpus_per_replica": 2,
                "max_batch_size": max(16, args.batch),
            },
        }
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()  # after ray.init, whose processes take ports of their own
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    try:
        model_args = {
            "model": adapter.name if adapter else "base",
            "base_url": f"http://127.0.0.1:{port}/v1/completions",
            "tokenizer": model_path,
            "tokenizer_backend": "huggingface",
            "num_concurrent": "1",
            "max_retries": "1",
        }
        return run_lm_eval(args.lm_eval_python, "local-completions", model_args, include, out / "served", args.batch)
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--adapter", help="a PEFT adapter directory; evaluated on both sides instead of the base")
    parser.add_argument("--dtype", default="float32", help="both sides; fp32 makes their log-likelihoods comparable")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lm-eval-python", default=os.environ.get("LM_EVAL_PYTHON", ".lmeval-venv/bin/python"))
    parser.add_argument("--task-dir", default=str(TASK_DIR))
    parser.add_argument("--out", help="where the task, lm-eval outputs and runs go (default: a temporary folder)")
    args = parser.parse_args()

    from selfspec.models.resolve import resolve_model

    out = Path(args.out or tempfile.mkdtemp(prefix="lm-eval-pubmedqa-")).resolve()
    model_path = resolve_model("embedded:smollm2-135m-instruct")
    include = write_lm_eval_task(Path(args.task_dir), args.rows, out / "task")
    served = serve_and_evaluate(args, model_path, include, out)
    hf_args = {"pretrained": model_path, "dtype": args.dtype}
    if args.adapter:
        hf_args["peft"] = str(Path(args.adapter).resolve())
    direct = run_lm_eval(args.lm_eval_python, "hf", hf_args, include, out / "hf", args.batch)

    ids = sorted(served["logliks"])
    differ = sum(argmax(served["logliks"][i]) != argmax(direct["logliks"][i]) for i in ids)
    gap = max(abs(a - b) for i in ids for a, b in zip(served["logliks"][i], direct["logliks"][i]))
    print(f"PubMedQA, first {len(ids)} rows, {args.adapter or 'base model'}, {args.dtype}; outputs in {out}")
    print(f"  lm-eval local-completions via selfspec serve: accuracy {served['acc']:.3f}")
    print(f"  lm-eval hf:                                  accuracy {direct['acc']:.3f}")
    print(f"  answers that differ: {differ}; largest log-likelihood difference: {gap:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
