"""Running at scale, on real local Ray clusters (marker e2e; minutes each).

- multi-node: generation actors and Ray Train workers land on different nodes, and the
  run's metadata records their node ids;
- `ray job submit` of the whole pipeline to a `ray start --head` cluster with token
  authentication: the job succeeds and its run directory holds data, adapter, metrics
  and report;
- SIGKILL of `selfspec run` mid-stage, twice, then a rerun: it completes, finished work
  is not redone, training continues from its checkpoint, and the final dataset has no
  lost or duplicated examples;
- autoscaling on Ray's fake multi-node provider: a head with no CPUs and no workers
  scales out for the pipeline's actors and train workers, then back in when idle.

Clusters run on 127.0.0.1 with their own token and ports (tests/ray_local_cluster.py) and
are always torn down, process group by process group, even when a test fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from ray_local_cluster import BIN, HOST, REPO, LocalRayCluster, free_port
from selfspec.io import write_parquet
from selfspec.schema import example_schema

pytestmark = pytest.mark.e2e

# Small enough for a 2-core machine, large enough that the embedded model finishes
# items within the token limits (truncated items are dropped by design).
TINY_GENERATE = [
    "generate.prompts_per_round=4",
    "generate.batch_size=2",
    "generate.instruction_max_new_tokens=96",
    "generate.response_max_new_tokens=96",
]
TINY_TRAIN = ["train.max_steps=2", "train.batch_size=2", "train.max_seq_len=192", "train.checkpoint_every=1"]
TINY_EVAL = ["eval.max_examples=2", "eval.bootstrap=0", "eval.tasks=[builtin:biomedical]"]
# Ray Data starts dispatching when the first actor is ready; waiting for the whole pool
# gives every replica a batch, so placement on several nodes shows in the metadata.
WAIT_FOR_POOL = {"RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "600"}


@pytest.fixture
def cluster_factory(tmp_path):
    clusters: list[LocalRayCluster] = []

    def make(**kwargs) -> LocalRayCluster:
        cluster = LocalRayCluster(tmp_path / f"cluster{len(clusters)}", **kwargs)
        clusters.append(cluster)
        return cluster.start()

    yield make
    for cluster in clusters:
        cluster.stop()
        assert not cluster.group_alive(), "Ray processes outlived the test"


def run_job_module(cluster: LocalRayCluster, job: str, *args: str, timeout: float, **env: str):
    """`python -m ray_jobs.<job>` as a driver of the cluster; -> CompletedProcess."""
    result = subprocess.run(
        [str(BIN / "python"), "-m", f"ray_jobs.{job}", *args],
        env=cluster.driver_env(**env), cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )
    assert result.returncode == 0, f"ray_jobs.{job} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def fixture_examples(n: int) -> list[dict]:
    return [
        {
            "id": f"ex{i:02d}",
            "instruction": f"Which enzyme does marker {i} encode?",
            "input": "",
            "output": f"Marker {i} encodes the zeta-{i} kinase of the liver.",
            "domain": "biomedical",
            "seed_ids": ["seed-1"],
            "passage_ids": [],
            "model": "embedded:smollm2-135m-instruct",
            "adapter": "",
            "round": 1,
            "config_hash": "fixture",
        }
        for i in range(n)
    ]


# -- multi-node -------------------------------------------------------------------------
def test_generation_and_training_spread_over_nodes(cluster_factory, tmp_path):
    started = time.monotonic()
    cluster = cluster_factory(head_cpus=0)  # the head runs drivers only
    cluster.add_worker(num_cpus=2)
    cluster.add_worker(num_cpus=2)
    nodes = cluster.alive_nodes()
    workers = {n["id"] for n in nodes if not n["head"]}
    assert len(nodes) == 3 and len(workers) == 2
    runs = tmp_path / "runs"

    # One 2-CPU generation replica fits a 2-CPU node: two replicas need both nodes.
    run_job_module(
        cluster, "generate", "--config", "default", f"runs_dir={runs}", "name=multinode",
        "generate.replicas=2", "generate.num_cpus_per_replica=2", "generate.target=2", "generate.max_rounds=1",
        *TINY_GENERATE, timeout=1800, **WAIT_FOR_POOL,
    )
    summary = json.loads((runs / "multinode" / "data" / "summary.json").read_text())
    assert set(summary["node_ids"]) == workers, summary["node_ids"]
    manifest = json.loads((runs / "multinode" / "data" / "manifest.json").read_text())
    assert set(manifest["shards"][0]["node_ids"]) == workers

    # Two 2-CPU training workers, one per node, on a fixed 8-example dataset.
    write_parquet(str(runs / "train2" / "data" / "examples.parquet"), fixture_examples(8), schema=example_schema())
    run_job_module(
        cluster, "train", "--config", "default", f"runs_dir={runs}", "name=train2",
        "train.num_workers=2", "train.cpus_per_worker=2", *TINY_TRAIN, timeout=1800,
    )
    (adapter,) = (runs / "train2" / "adapters").iterdir()
    recorded = json.loads((adapter / "selfspec.json").read_text())["train"]
    assert recorded["num_workers"] == 2
    assert len(recorded["node_ids"]) == 2 and set(recorded["node_ids"]) == workers, recorded["node_ids"]
    print(f"multi-node generation + training: {time.monotonic() - started:.0f}s")


# -- ray job submit --------------------------------------------------------------------
def job_status(cluster: LocalRayCluster, job_id: str) -> str:
    # The SDK, not `ray job status` text: the CLI prints "Job 'x' succeeded", not the enum name.
    # Run in the cluster's env so it authenticates exactly like the CLI calls above.
    probe = (
        "import sys; from ray.job_submission import JobSubmissionClient; "
        "print(JobSubmissionClient(sys.argv[1]).get_job_status(sys.argv[2]).value)"
    )
    out = cluster.run(str(BIN / "python"), "-c", probe, cluster.dashboard, job_id, timeout=120)
    return out.stdout.strip().splitlines()[-1]


def test_pipeline_job_submission_with_token_auth(cluster_factory, tmp_path):
    started = time.monotonic()
    cluster = cluster_factory(head_cpus=2)
    ray = str(BIN / "ray")
    # The token the cluster enforces is the one `ray get-auth-token` reports ...
    token = cluster.run(ray, "get-auth-token", timeout=60).stdout.strip()
    assert token == cluster.token
    # ... and the job API refuses a client without it.
    anonymous = {k: v for k, v in cluster.env().items() if k != "RAY_AUTH_TOKEN"}
    refused = cluster.run(ray, "job", "list", "--address", cluster.dashboard, env=anonymous, timeout=120, check=False)
    assert refused.returncode != 0 and "token" in (refused.stdout + refused.stderr).lower()

    runs = tmp_path / "runs"  # absolute: the job writes where the test looks
    job_id = "selfspec-pipeline-e2e"
    cluster.run(
        ray, "job", "submit", "--address", cluster.dashboard, "--working-dir", ".", "--submission-id", job_id,
        "--no-wait", "--runtime-env-json", json.dumps({"env_vars": {"HF_HUB_OFFLINE": "1"}}), "--",
        "python", "-m", "ray_jobs.pipeline", "--config", "default", "name=jobrun", f"runs_dir={runs}",
        "generate.target=2", "generate.max_rounds=6", *TINY_GENERATE, *TINY_TRAIN, *TINY_EVAL,
        timeout=300,
    )
    deadline = time.monotonic() + 2400
    status = job_status(cluster, job_id)
    while status in ("PENDING", "RUNNING") and time.monotonic() < deadline:
        time.sleep(10)
        status = job_status(cluster, job_id)
    logs = cluster.run(ray, "job", "logs", "--address", cluster.dashboard, job_id, timeout=120, check=False).stdout
    assert status == "SUCCEEDED", f"job {status}:\n{logs[-6000:]}"
    assert "[ray_jobs.pipeline] ray job" in logs and "[ray_jobs.pipeline] succeeded" in logs

    root = runs / "jobrun"
    examples = pq.read_table(root / "data" / "examples.parquet").to_pylist()
    assert len(examples) == 2 and len({e["id"] for e in examples}) == 2
    (adapter,) = (root / "adapters").iterdir()
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert {"base", adapter.name} <= set(metrics["results"])
    assert (root / "eval" / "report.html").stat().st_size > 0 and (root / "eval" / "results.md").exists()
    ledger = json.loads((root / "pipeline.json").read_text())
    assert set(ledger["stages"]) == {"generate-r1", "train-r1", "eval"}
    print(f"pipeline job: {time.monotonic() - started:.0f}s")


# -- kill and resume -----------------------------------------------------------------------
class PipelineRun:
    """`selfspec run` as its own process group, so a SIGKILL takes its children too."""

    def __init__(self, cluster: LocalRayCluster, args: list[str], log: Path):
        self.log = log
        self.process = subprocess.Popen(
            [str(BIN / "selfspec"), "run", *args],
            env=cluster.driver_env(), cwd=REPO, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill_when(self, ready, timeout: float) -> bool:
        """SIGKILL once `ready()` holds; -> False when the run ended first."""
        deadline = time.monotonic() + timeout
        while self.process.poll() is None:
            if ready() or time.monotonic() > deadline:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=60)
                assert time.monotonic() <= deadline, f"timed out; log: {self.log.read_text()[-4000:]}"
                return True
            time.sleep(0.5)
        return False

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            raise


def test_sigkill_mid_stage_then_rerun_resumes(cluster_factory, tmp_path):
    started = time.monotonic()
    cluster = cluster_factory(head_cpus=2)
    runs = tmp_path / "runs"
    target = 3
    args = [
        "--config", "default", "name=killed", f"runs_dir={runs}", "pipeline.stages=[generate,train]",
        f"generate.target={target}", "generate.max_rounds=8", *TINY_GENERATE, *TINY_TRAIN,
        "train.max_steps=4",  # room to kill between the first checkpoint and the end
    ]
    root = runs / "killed"
    shards = root / "data" / "shards"
    ledger_path = root / "pipeline.json"

    def ledger() -> dict:
        return json.loads(ledger_path.read_text())["stages"] if ledger_path.exists() else {}

    def shard_state() -> dict[str, int]:
        return {p.name: p.stat().st_mtime_ns for p in sorted(shards.glob("*.parquet"))}

    # 1. Killed as soon as the first shard lands: inside generation (or, if round 1
    #    reached the target, inside training).
    first = PipelineRun(cluster, args, tmp_path / "run1.log")
    assert first.kill_when(lambda: bool(shard_state()), timeout=1800), "run 1 finished before it could be killed"
    after_first = shard_state()
    assert "train-r1" not in ledger()

    # 2. Killed inside training, once generation is recorded and Ray Train has registered a
    #    checkpoint. A checkpoint folder alone is not enough: Ray restores only what its
    #    checkpoint_manager_snapshot.json lists, and a kill before that write restarts at step 0.
    def training_checkpointed() -> bool:
        if "generate-r1" not in ledger():
            return False
        for snapshot in (root / "train").glob("*/checkpoint_manager_snapshot.json"):
            try:
                if json.loads(snapshot.read_text()).get("latest_checkpoint_result"):
                    return True
            except (OSError, ValueError):  # caught mid-write
                pass
        return False

    second = PipelineRun(cluster, args, tmp_path / "run2.log")
    assert second.kill_when(training_checkpointed, timeout=2400), (
        "run 2 finished before it could be killed"
    )
    after_second = shard_state()
    generate_record = ledger()["generate-r1"]
    assert "train-r1" not in ledger()
    # Shards written before the first kill were kept, not regenerated.
    assert {k: after_second[k] for k in after_first} == after_first

    # 3. The rerun completes without redoing generation.
    third = PipelineRun(cluster, args, tmp_path / "run3.log")
    assert third.wait(timeout=1800) == 0, (tmp_path / "run3.log").read_text()[-4000:]
    log = (tmp_path / "run3.log").read_text()
    assert "[generate-r1] finished earlier with the same config and inputs; skipped" in log
    assert ledger()["generate-r1"] == generate_record
    assert shard_state() == after_second
    assert "train-r1" in ledger()

    # No lost or duplicated examples: the final dataset is the shards' first `target` rows.
    manifest = json.loads((root / "data" / "manifest.json").read_text())
    shard_rows = [r for s in manifest["shards"] for r in pq.read_table(root / "data" / s["file"]).to_pylist()]
    final = pq.read_table(root / "data" / "examples.parquet").to_pylist()
    assert len(final) == target
    assert len({r["id"] for r in final}) == target
    assert [r["id"] for r in final] == [r["id"] for r in shard_rows[:target]]
    assert [s["round"] for s in manifest["shards"]] == list(range(1, len(manifest["shards"]) + 1))
    adapter = Path(ledger()["train-r1"]["outputs"][0])
    assert (adapter / "adapter_model.safetensors").exists()
    # Training went on from the checkpoint the kill left, not from step 0.
    trained = json.loads((adapter / "selfspec.json").read_text())["train"]
    assert trained["resumed"] and trained["restored_from_steps"] and trained["restored_from_steps"][0] >= 1, trained
    print(f"kill and resume: {time.monotonic() - started:.0f}s, shards {list(after_second)}")


# -- autoscaling -------------------------------------------------------------------------
def test_pipeline_scales_out_from_zero_workers_and_back_in(cluster_factory, tmp_path):
    started = time.monotonic()
    config = yaml.safe_load((REPO / "cluster" / "local_fake_autoscaler.yaml").read_text())
    port = free_port()
    config["provider"]["gcs_address"] = f"{HOST}:{port}"
    autoscaling = tmp_path / "autoscaler.yaml"
    autoscaling.write_text(yaml.safe_dump(config))
    cluster = cluster_factory(head_cpus=0, autoscaling_config=autoscaling, port=port)
    (head,) = cluster.alive_nodes()  # zero workers: nothing can run until the autoscaler adds nodes
    assert head["head"] and head["cpus"] == 0

    seen: dict[str, dict] = {}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.update((n["id"], n) for n in cluster.alive_nodes())
            done.wait(2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    runs = tmp_path / "runs"
    try:
        run_job_module(
            cluster, "pipeline", "--config", "default", "name=autoscaled", f"runs_dir={runs}",
            "pipeline.stages=[generate,train]", "generate.target=2", "generate.max_rounds=6",
            *TINY_GENERATE, *TINY_TRAIN, timeout=2400,
        )
    finally:
        done.set()
        watcher.join(timeout=30)
    launched = {i for i, n in seen.items() if not n["head"]}
    assert 1 <= len(launched) <= config["max_workers"], seen

    # The work ran on the nodes the autoscaler launched, never on the CPU-less head.
    generation = json.loads((runs / "autoscaled" / "data" / "summary.json").read_text())
    assert generation["node_ids"] and set(generation["node_ids"]) <= launched
    (adapter,) = (runs / "autoscaled" / "adapters").iterdir()
    training = json.loads((adapter / "selfspec.json").read_text())["train"]
    assert set(training["node_ids"]) <= launched

    # Idle workers go away after idle_timeout_minutes; the head stays.
    remaining = cluster.wait_for_nodes(1, timeout=600, at_most=True)
    assert [n["id"] for n in remaining] == [head["id"]]
    print(f"autoscaling: launched {len(launched)} nodes, back to the head in {time.monotonic() - started:.0f}s")
