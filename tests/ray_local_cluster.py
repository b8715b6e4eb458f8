"""A real multi-node Ray cluster on 127.0.0.1 for the e2e tests, made of `ray start` processes.

Every node is `ray start --block` in its own process session, so teardown ends exactly
the processes this cluster started (a kill of each session's process group) and never
touches another Ray on the machine, which `ray stop` would. Token authentication is on:
each cluster gets its own token (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN), never the
user's ~/.ray/auth_token. Ports are picked free so clusters of parallel sessions coexist.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def node_ports() -> list[str]:
    """Ports a node would otherwise take at fixed defaults (52365, 10001, ...)."""
    low = free_port()
    return [
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        # Worker processes take ports from this range; keep it small and our own.
        f"--min-worker-port={low}",
        f"--max-worker-port={low + 60}",
    ]


@dataclass
class LocalRayCluster:
    """Head plus worker nodes on 127.0.0.1; `start()`, `add_worker()`, `stop()`."""

    workdir: Path
    head_cpus: int = 0
    autoscaling_config: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    token: str = field(default_factory=lambda: secrets.token_hex(32))
    port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://{HOST}:{self.dashboard_port}"

    temp_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ssray-", dir="/tmp")))

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for processes that talk to this cluster (token included).

        Without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, Ray swaps 127.0.0.1 for the
        machine's routable address (in `ray start` and when a driver resolves an address);
        with it every node and client stays on loopback. Drivers get RAY_ADDRESS from
        `driver_env()`; `ray job submit` must not see it (it would prefer it to --address).
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
            HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            RAY_USAGE_STATS_ENABLED="0",
            **self.extra_env,
        )
        env.update(extra)
        return env

    def driver_env(self, **extra: str) -> dict[str, str]:
        """Environment for a driver process run outside `ray job submit`."""
        return self.env(RAY_ADDRESS=self.address, **extra)


    def start(self, timeout: float = 180) -> "LocalRayCluster":
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [
            "--head",
            f"--node-ip-address={HOST}",
            f"--port={self.port}",
            f"--num-cpus={self.head_cpus}",
            "--include-dashboard=true",
            f"--dashboard-host={HOST}",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={free_port()}",
            f"--temp-dir={self.temp_dir}",
            "--object-store-memory=300000000",
            *node_ports(),
        ]
        env = self.env()
        if self.autoscaling_config:
            args.append(f"--autoscaling-config={self.autoscaling_config}")
            env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
        log = open(self.workdir / "head.log", "ab")
        self.processes.append(
            subprocess.Popen(
                [str(BIN / "ray"), "start", "--block", "--disable-usage-stats", *args],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True,
            )
        )
        self.wait_for_nodes(1, timeout)
        return self

    def add_worker(self, num_cpus: int, timeout: float = 180) -> None:
        """Join one more node (this module run as a script; see `serve_worker_node`)."""
        expected = len(self.alive_nodes()) + 1
        log = open(self.workdir / f"worker-{len(self.processes)}.log", "ab")
        self.processes.append(
            subprocess.Popen(
                [str(BIN / "python"), __file__, self.address, str(num_cpus)],
                stdout=log, stderr=subprocess.STDOUT, env=self.env(), cwd=REPO, start_new_session=True,
            )
        )
        self.wait_for_nodes(expected, timeout)

    def run(self, *args: str, timeout: float = 120, env: dict[str, str] | None = None, check: bool = True):
        """Run a command against the cluster; -> CompletedProcess (text)."""
        result = subprocess.run(
            list(args), env=env or self.env(), cwd=REPO, capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def alive_nodes(self) -> list[dict]:
        """Alive nodes from the dashboard's state API (plain HTTP with the token)."""
        import urllib.request

        request = urllib.request.Request(
            f"{self.dashboard}/api/v0/nodes?limit=1000", headers={"Authorization": f"Bearer {self.token}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                body = json.load(response)
        except OSError:
            return []
        rows = body.get("data", {}).get("result", {}).get("result", [])
        return [
            {"id": r["node_id"], "cpus": r.get("resources_total", {}).get("CPU", 0), "head": r.get("is_head_node")}
            for r in rows
            if r.get("state") == "ALIVE"
        ]

    def wait_for_nodes(self, count: int, timeout: float, at_most: bool = False) -> list[dict]:
        """Wait until `count` nodes are alive (or, with at_most, no more than `count`)."""
        deadline = time.monotonic() + timeout
        nodes: list[dict] = []
        while time.monotonic() < deadline:
            self.check_alive()
            nodes = self.alive_nodes()
            if (len(nodes) <= count) if at_most else (len(nodes) >= count):
                return nodes
            time.sleep(2)
        raise TimeoutError(f"waited {timeout:.0f}s for {count} nodes; alive: {nodes}; logs in {self.workdir}")

    def check_alive(self) -> None:
        for process in self.processes:
            if process.poll() is not None:
                raise RuntimeError(f"a ray start process exited ({process.returncode}); logs in {self.workdir}")

    def stop(self) -> None:
        """End every process this cluster started: each node's process group, TERM then KILL."""
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            for process in reversed(self.processes):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and self.group_alive():
                time.sleep(0.5)
        for process in self.processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        # Session logs are kept beside the node logs for post-mortems; sockets are not.
        try:
            shutil.copytree(self.temp_dir, self.workdir / "ray-session", symlinks=True, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("sockets", "*.sock", "runtime_resources"))
        except (OSError, shutil.Error):
            pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def group_alive(self) -> list[int]:
        """Pids still alive in this cluster's process groups."""
        groups = {p.pid for p in self.processes}
        alive = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if os.getpgid(int(entry.name)) in groups:
                        alive.append(int(entry.name))
                except (ProcessLookupError, PermissionError):
                    pass
        return alive


def serve_worker_node(address: str, num_cpus: int) -> None:
    """Run one worker node on 127.0.0.1 until killed.

    `ray start --address` cannot keep a worker on loopback (it swaps 127.0.0.1 for the
    routable address, and refuses to start with the switch that stops it), so this
    starts the node the way `ray.cluster_utils.Cluster.add_node` does.
    """
    import ray._private.node
    import ray._private.parameter

    params = ray._private.parameter.RayParams(
        node_ip_address=HOST,
        gcs_address=address,
        num_cpus=num_cpus,
        num_gpus=0,
        object_store_memory=200 * 1024 * 1024,
        min_worker_port=0,
        max_worker_port=0,
        node_manager_port=0,
        dashboard_agent_listen_port=free_port(),
        metrics_export_port=free_port(),
        runtime_env_agent_port=free_port(),
        include_log_monitor=False,
    )
    ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=False)
    print(f"worker node on {HOST} joined {address} with {num_cpus} CPUs", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})


if __name__ == "__main__":
    serve_worker_node(sys.argv[1], int(sys.argv[2]))
