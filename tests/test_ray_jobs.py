"""The `ray job submit` entrypoints: fast checks that need no cluster."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from selfspec.cli import COMMANDS

REPO = Path(__file__).resolve().parent.parent
JOBS = ["generate", "index", "train", "eval", "serve", "pipeline"]


def entry_call(job: str) -> ast.Call:
    """The `main(...)` call in ray_jobs/<job>.py."""
    tree = ast.parse((REPO / "ray_jobs" / f"{job}.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "main"]
    assert len(calls) == 1, f"ray_jobs/{job}.py must call _entry.main once"
    return calls[0]


@pytest.mark.parametrize("job", JOBS)
def test_each_job_runs_a_selfspec_command(job):
    call = entry_call(job)
    assert call.args[0].value == job
    command = next((k.value.value for k in call.keywords if k.arg == "command"), job)
    assert command in COMMANDS


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--config", "no-such-config"], "no-such-config"),
        (["generate.bogus=1"], "generate.bogus"),
        (["generate.target=-3"], "generate.target"),
    ],
)
def test_bad_config_exits_2_naming_it_before_touching_ray(argv, needle, capsys, monkeypatch):
    from ray_jobs._entry import main

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # nothing listens: connecting would hang, not fail
    assert main("pipeline", command="run", argv=argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ray_jobs.pipeline: error:") and needle in err


def test_job_module_runs_as_a_script_and_fails_cleanly():
    result = subprocess.run(
        [sys.executable, "-m", "ray_jobs.generate", "--config", "default", "generate.nope=1"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "unknown config key 'generate.nope'" in result.stderr


def test_local_executor_needs_no_cluster(capsys, monkeypatch):
    from ray_jobs._entry import describe_cluster

    assert "no Ray cluster" in describe_cluster("local")
