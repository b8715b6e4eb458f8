"""Run a model over rows: in-process, or sharded over Ray Data model actors.

`ModelWorker` is the callable class that Ray Data's `map_batches` instantiates
once per replica (it holds a loaded backend) and feeds batches. The same class
runs in-process with `executor="local"`, so Ray adds scheduling and nothing else.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from selfspec.config import ModelConfig

# fn(backend, rows) -> rows: the per-batch work a stage does with a model.
BatchFn = Callable[[Any, list[dict[str, Any]]], list[dict[str, Any]]]


def _node_id() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - metadata only
        pass
    return "local"


class ModelWorker:
    """Holds one model replica; maps `fn` over batches of rows."""

    def __init__(self, model: dict, fn: BatchFn, adapters: dict[str, str] | None = None, num_threads: int | None = None):
        import torch

        from selfspec.models import load_backend

        if num_threads:
            torch.set_num_threads(num_threads)
        self.backend = load_backend(ModelConfig(**model), adapters)
        self.fn = fn
        self.node_id = _node_id()

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        rows = _batch_to_rows(batch)
        out = self.fn(self.backend, rows)
        for row in out:
            row["node_id"] = self.node_id
        return _rows_to_batch(out)


def _batch_to_rows(batch: dict[str, Any]) -> list[dict[str, Any]]:
    keys = list(batch)
    n = len(batch[keys[0]]) if keys else 0
    return [{k: _plain(batch[k][i]) for k in keys} for i in range(n)]


def _plain(value: Any) -> Any:
    """Arrow/numpy values back to Python lists and scalars."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _rows_to_batch(rows: list[dict[str, Any]]) -> dict[str, list]:
    if not rows:
        return {}
    return {k: [r.get(k) for r in rows] for k in rows[0]}


def map_with_model(
    rows: list[dict[str, Any]],
    fn: BatchFn,
    model: ModelConfig,
    *,
    executor: str = "ray",
    replicas: int = 1,
    batch_size: int = 16,
    num_cpus: float = 1,
    num_gpus: float = 0,
    adapters: dict[str, str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Apply `fn(backend, batch_rows)` to all rows with `replicas` model replicas.

    Row order of the result is not guaranteed under Ray; rows carry their own ids.
    """
    if not rows:
        return []
    threads = max(1, math.floor(num_cpus)) if not num_gpus else None
    if executor == "local":
        worker = ModelWorker(model.model_dump(), fn, adapters, threads)
        out: list[dict[str, Any]] = []
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            out.extend(_batch_to_rows(worker(_rows_to_batch(batch))))
            if progress:
                progress(len(batch))
        return out

    import ray

    # Messages and lists travel as Python objects; Arrow would coerce nested types.
    dataset = ray.data.from_items(rows)
    mapped = dataset.map_batches(
        ModelWorker,
        fn_constructor_kwargs={"model": model.model_dump(), "fn": fn, "adapters": adapters, "num_threads": threads},
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=replicas),
        num_cpus=num_cpus,
        num_gpus=num_gpus,
    )
    out = []
    for batch in mapped.iter_batches(batch_size=None, batch_format="default"):
        new = _batch_to_rows(batch)
        out.extend(new)
        if progress:
            progress(len(new))
    return out

