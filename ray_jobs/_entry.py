"""What every `ray job submit` entrypoint shares: parse, validate, connect, delegate.

An entrypoint is `python -m ray_jobs.<name> --config FILE_OR_NAME key=value ...`.
It checks the config before touching the cluster (a bad key exits 2 naming it),
connects with `selfspec.runtime.init_ray()` (the job's `RAY_ADDRESS`), prints the
cluster it landed on to the job log, then runs the same command `selfspec <command>`
runs, so a job and the CLI never drift apart.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable

from selfspec.config import RunConfig


def parse(command: str, argv: list[str]):
    """-> argparse namespace of `selfspec <command>` (same options, same overrides)."""
    from selfspec.cli import build_parser

    return build_parser().parse_args([command, *argv])


def describe_cluster(executor: str) -> str:
    """One line for the job log: where this job runs and with what."""
    if executor != "ray":
        return "executor: local (SELFSPEC_EXECUTOR=local), no Ray cluster"
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    job = ray.get_runtime_context().get_job_id()
    return (
        f"ray job {job} on {os.environ.get('RAY_ADDRESS') or 'a local Ray'}: {len(nodes)} nodes, "
        f"{total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs"
    )


def main(
    job: str,
    command: str | None = None,
    argv: list[str] | None = None,
    run: Callable[[RunConfig, object], int] | None = None,
) -> int:
    """Run `selfspec <command>` (default: `job`) as the Ray job `ray_jobs.<job>`.

    `run(config, args)` replaces the CLI's handler. -> the process exit code.
    """
    from selfspec.config import ConfigError, load_config
    from selfspec.runtime import init_ray

    command = command or job
    argv = sys.argv[1:] if argv is None else list(argv)
    name = f"ray_jobs.{job}"
    args = parse(command, argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    started = time.time()
    print(f"[{name}] config {args.config} -> run directory {config.runs_dir.rstrip('/')}/{config.name}", flush=True)
    executor = init_ray()
    print(f"[{name}] {describe_cluster(executor)}", flush=True)
    if run is None:
        from selfspec.cli import main as selfspec_main

        code = selfspec_main([command, *argv])
    else:
        code = int(run(config, args) or 0)
    status = "succeeded" if code == 0 else f"failed (exit {code})"
    print(f"[{name}] {status} in {time.time() - started:.1f}s", flush=True)
    return code
