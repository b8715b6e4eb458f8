"""Starting Ray for a command: connect to a cluster when one is named, else run locally."""

from __future__ import annotations

import logging
import os


def init_ray(num_cpus: int | None = None) -> str:
    """Connect to `RAY_ADDRESS` (set by `ray job submit`) or start a local runtime.

    Returns the executor the stages should use: "ray", or "local" when
    SELFSPEC_EXECUTOR=local asks for a plain in-process loop.
    """
    if os.environ.get("SELFSPEC_EXECUTOR") == "local":
        return "local"
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        # A local runtime gets its dashboard on loopback: Ray Train's state queries need it.
        local = {"num_cpus": num_cpus or os.cpu_count(), "include_dashboard": True, "dashboard_host": "127.0.0.1"}
        kwargs = {"address": address} if address else local
        ray.init(ignore_reinit_error=True, logging_level=logging.WARNING, log_to_driver=True, **kwargs)
    quiet_ray_data()
    return "ray"


def quiet_ray_data() -> None:
    """Our stages show their own progress bars; Ray Data's would interleave with them."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # Ray Data warns once that its bars are off: that is what this function is for.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
