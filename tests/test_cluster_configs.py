"""Every cluster definition under cluster/ parses and has what its tool requires.

Fast: no cluster starts. Launcher configs go through Ray's own schema; KubeRay
manifests are checked for the CRD fields KubeRay needs; Serve configs go through
Serve's schema and their import paths build our application, as a RayService would.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
IMAGE_REPO = "/home/ray/selfspec"  # where cluster/Dockerfile puts the repository
LAUNCHER = ["aws.yaml", "gcp.yaml"]
KUBERAY = sorted((CLUSTER / "kuberay").glob("*.yaml"))
RAY_KINDS = {"RayCluster": None, "RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def on_this_machine(path: str) -> str:
    """A path inside the image's repository -> the same file in this checkout."""
    return str(REPO / path[len(IMAGE_REPO) + 1 :]) if path.startswith(IMAGE_REPO + "/") else path


@pytest.mark.parametrize("path", sorted(CLUSTER.rglob("*.yaml")), ids=lambda p: str(p.relative_to(REPO)))
def test_every_cluster_yaml_parses(path):
    docs = load_docs(path)
    assert docs and all(isinstance(d, dict) for d in docs)


# -- Ray cluster launcher -------------------------------------------------------------
@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_passes_ray_schema(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / name).read_text())
    validate_config(prepare_config(config))


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_has_cpu_head_and_autoscaling_gpu_groups(name):
    config = yaml.safe_load((CLUSTER / name).read_text())
    assert config["cluster_name"] and config["provider"]["type"] in {"aws", "gcp"}
    types = config["available_node_types"]
    head = config["head_node_type"]
    assert head in types and types[head]["resources"].get("GPU", 0) == 0
    workers = {k: v for k, v in types.items() if k != head}
    assert workers
    for node_type in workers.values():
        assert node_type["resources"]["GPU"] >= 1
        assert node_type["min_workers"] == 0 < node_type["max_workers"] <= config["max_workers"]
    assert 0 < config["idle_timeout_minutes"]


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_installs_selfspec_and_keeps_token_auth(name):
    config = yaml.safe_load((CLUSTER / name).read_text())
    setup = " ".join(config["setup_commands"])
    assert "[gpu]" in setup and "torch==2.13.0" in setup
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in config[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start)
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--autoscaling-config" in head_start and "--dashboard-host=127.0.0.1" in head_start
    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")


def test_fake_autoscaler_config():
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load((CLUSTER / "local_fake_autoscaler.yaml").read_text())
    validate_config(config)  # the wheel lacks the provider's defaults, so no prepare_config
    assert config["provider"]["type"] == "fake_multinode"
    assert config["provider"]["gcs_address"].startswith("127.0.0.1:")
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"]["CPU"] == 0
    workers = [v for k, v in types.items() if k != config["head_node_type"]]
    assert workers and all(w["min_workers"] == 0 and w["max_workers"] >= 2 for w in workers)
    assert config["idle_timeout_minutes"] <= 1


# -- KubeRay --------------------------------------------------------------------------
def ray_resources() -> list[tuple[str, dict]]:
    out = []
    for path in KUBERAY:
        out.extend((path.name, d) for d in load_docs(path) if d["apiVersion"] == "ray.io/v1")
    return out


def cluster_spec(doc: dict) -> dict:
    field = RAY_KINDS[doc["kind"]]
    return doc["spec"] if field is None else doc["spec"][field]


def test_kuberay_has_cluster_job_and_service():
    assert {d["kind"] for _, d in ray_resources()} == set(RAY_KINDS)


@pytest.mark.parametrize("name,doc", ray_resources(), ids=lambda x: x if isinstance(x, str) else x["kind"])
def test_kuberay_cluster_spec(name, doc):
    assert doc["kind"] in RAY_KINDS and doc["metadata"]["name"]
    spec = cluster_spec(doc)
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"]["mode"] == "token"
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["template"]["spec"]["containers"][0]["image"]
    assert spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and "rayStartParams" in group
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        container = group["template"]["spec"]["containers"][0]
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for part in [head, *spec["workerGroupSpecs"]]
        for v in part["template"]["spec"].get("volumes", [])
        if "persistentVolumeClaim" in v
    }
    storage = {d["metadata"]["name"] for d in load_docs(CLUSTER / "kuberay" / "storage.yaml")}
    assert claims and claims <= storage


def test_rayjob_runs_the_pipeline_with_a_valid_config():
    from selfspec.config import load_config

    (job,) = [d for _, d in ray_resources() if d["kind"] == "RayJob"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "ray_jobs.pipeline"]
    config_path = on_this_machine(argv[argv.index("--config") + 1])
    overrides = [a for a in argv[argv.index("--config") + 2 :] if "=" in a]
    config = load_config(config_path, overrides)
    assert config.runs_dir.startswith("/mnt/shared")
    assert job["spec"]["shutdownAfterJobFinishes"] is True and job["spec"]["backoffLimit"] >= 1


# -- Serve configs (cluster/serve_config.yaml and the RayService's serveConfigV2) -------
def serve_configs() -> list[tuple[str, dict]]:
    out = []
    if (CLUSTER / "serve_config.yaml").exists():
        out.append(("serve_config.yaml", yaml.safe_load((CLUSTER / "serve_config.yaml").read_text())))
    for _, doc in ray_resources():
        if doc["kind"] == "RayService":
            out.append((f"{doc['metadata']['name']}.serveConfigV2", yaml.safe_load(doc["spec"]["serveConfigV2"])))
    return out


def test_rayservice_matches_the_serve_config():
    configs = dict(serve_configs())
    if "serve_config.yaml" not in configs:
        pytest.skip("cluster/serve_config.yaml is not there yet")
    local = configs.pop("serve_config.yaml")
    for service in configs.values():
        assert service["http_options"]["host"] == "0.0.0.0"  # the pod network, not loopback
        assert [a["import_path"] for a in service["applications"]] == [a["import_path"] for a in local["applications"]]
        assert [a["name"] for a in service["applications"]] == [a["name"] for a in local["applications"]]


@pytest.mark.parametrize("name,document", serve_configs(), ids=lambda x: x if isinstance(x, str) else "")
def test_serve_config_imports_and_builds_our_application(name, document):
    pytest.importorskip("selfspec.serving.app", reason="the serving module is not there yet")
    from ray._common.utils import import_attr
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(document)
    assert schema.applications
    for app in schema.applications:
        args = dict(app.args or {})
        if "config" in args:
            args["config"] = on_this_machine(args["config"])
        built = call_user_app_builder_with_args_if_necessary(import_attr(app.import_path), args)
        assert isinstance(built, Application)


# -- run configs shipped for clusters -----------------------------------------------------
def test_cluster_run_configs_load():
    from selfspec.config import load_config

    config = load_config(str(CLUSTER / "pipeline_gpu.yaml"))
    assert config.generate.num_gpus_per_replica >= 1 and config.train.use_gpu
    assert config.serve.host == "0.0.0.0"
