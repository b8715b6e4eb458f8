"""`selfspec run`: the whole self-specialization pipeline, chained through the run directory.

Round 1 generates data with the base model and trains an adapter; round k > 1
generates with the previous round's adapter (the specialized model writes the
next round) into `runs/<name>/round-<k>/`. The run ends with an evaluation of the
base against every adapter. Each finished stage is recorded in `pipeline.json`
with the hash of its config and inputs; a rerun skips stages whose record still
matches and whose outputs exist, and a stage killed midway resumes on its own
(generation by shard, training from its latest checkpoint, evaluation by
finished batch).
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Callable

from selfspec.config import RunConfig, dump_config
from selfspec.io import RunDir, atomic_write_text, exists, file_digest, read_json, run_dir_for, write_json


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


class StageLedger:
    """`pipeline.json`: which stages finished, with which config and inputs."""

    def __init__(self, run_dir: RunDir):
        self.path = run_dir.path("pipeline.json")
        self.state: dict[str, Any] = read_json(self.path) if exists(self.path) else {"stages": {}}

    def finished(self, key: str, fingerprint: str) -> dict[str, Any] | None:
        record = self.state["stages"].get(key)
        if record and record["fingerprint"] == fingerprint and all(exists(p) for p in record["outputs"]):
            return record
        return None

    def record(self, key: str, fingerprint: str, outputs: list[str], summary: dict[str, Any], seconds: float) -> None:
        self.state["stages"][key] = {
            "fingerprint": fingerprint,
            "outputs": outputs,
            "summary": summary,
            "seconds": round(seconds, 2),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        write_json(self.path, self.state)


def run_stage(
    ledger: StageLedger, key: str, fingerprint: str, outputs: list[str], work: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    done = ledger.finished(key, fingerprint)
    if done:
        print(f"[{key}] finished earlier with the same config and inputs; skipped")
        return done["summary"]
    print(f"[{key}] running")
    started = time.perf_counter()
    summary = work()
    ledger.record(key, fingerprint, outputs, summary, time.perf_counter() - started)
    return summary


def round_config(config: RunConfig, round: int, adapter: str | None) -> RunConfig:
    """Round k > 1 writes into runs/<name>/round-<k> and generates with the last adapter."""
    if round == 1:
        return config
    return config.model_copy(
        update={
            "name": f"{config.name}/round-{round}",
            "generate": config.generate.model_copy(update={"adapter": adapter, "seed": config.generate.seed + round}),
        }
    )


def run_pipeline(config: RunConfig, executor: str = "ray") -> dict[str, Any]:
    """Generate, train and evaluate for `pipeline.rounds` rounds; returns per-stage summaries."""
    from selfspec.stages.generate import run_generate

    root = run_dir_for(config)
    atomic_write_text(root.path("config.yaml"), dump_config(config))
    ledger = StageLedger(root)
    stages = config.pipeline.stages
    summaries: dict[str, Any] = {}
    adapters: list[str] = []
    adapter: str | None = None
    for round in range(1, config.pipeline.rounds + 1):
        cfg = round_config(config, round, adapter)
        run_dir = run_dir_for(cfg)
        examples = run_dir.path("data", "examples.parquet")
        # The whole generate section: a new target or label tolerance reselects from the shards.
        data_fp = _digest([cfg.section_hash("model", "generate", "retrieval"), adapter and _adapter_fingerprint(adapter)])
        if "generate" in stages:
            summaries[f"generate-r{round}"] = run_stage(
                ledger, f"generate-r{round}", data_fp, [examples],
                lambda: run_generate(cfg, run_dir, executor=executor),
            )
        if "train" in stages:
            from selfspec.stages.train import run_train

            train_fp = _digest([cfg.section_hash("model", "train"), data_fp])
            summary = run_stage(
                ledger, f"train-r{round}", train_fp, [],
                # A training run killed midway continues from its latest checkpoint.
                lambda: run_train(cfg, run_dir, round=round, resume="auto"),
            )
            adapter = summary["adapter"]
            ledger.state["stages"][f"train-r{round}"]["outputs"] = [adapter]
            write_json(ledger.path, ledger.state)
            adapters.append(adapter)
            summaries[f"train-r{round}"] = summary
    if "eval" in stages:
        from selfspec.stages.evaluate import run_eval

        eval_fp = _digest([config.section_hash("model", "eval"), [_adapter_fingerprint(a) for a in adapters]])
        summaries["eval"] = run_stage(
            ledger, "eval", eval_fp, [root.path("eval", "metrics.json")],
            lambda: run_eval(config, root, models=["base", *adapters], executor=executor),
        )
    write_json(root.path("summary.json"), summaries)
    return summaries


def _adapter_fingerprint(adapter_dir: str) -> str:
    """Adapters are identified by their weights' content, not their path."""
    path = f"{adapter_dir.rstrip('/')}/adapter_model.safetensors"
    return file_digest(path) if exists(path) else "missing"


def cli(config: RunConfig, args) -> int:
    from selfspec.runtime import init_ray

    executor = init_ray()
    summaries = run_pipeline(config, executor=executor)
    root = run_dir_for(config)
    print(f"run directory: {root.root}")
    for key, summary in summaries.items():
        if key.startswith("generate"):
            from selfspec.stages.generate import format_summary

            print(f"[{key}] " + format_summary(summary).replace("\n", "\n    "))
        elif key.startswith("train"):
            print(f"[{key}] adapter {summary.get('adapter')} final loss {summary.get('final_loss')}")
    if "eval" in summaries:
        results = root.path("eval", "results.md")
        if exists(results):
            from selfspec.io import read_bytes

            print(read_bytes(results).decode())
        print(f"report: {root.path('eval', 'report.html')}")
    return 0
