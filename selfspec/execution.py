"""Run a model over rows: in-process, or sharded over Ray Data model actors.

`ModelWorker` is the callable class that Ray Data's `map_batches` instantiates
once per replica (it holds a loaded backend) and feeds batches. The same class
runs in-process with `executor="local"`, so Ray adds scheduling and nothing else.
"""

from __future__ import annotations

import math
import pickle
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

    def run(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = self.fn(self.backend, rows)
        for row in out:
            row["node_id"] = self.node_id
        return out

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        """Ray Data: each item is one whole batch of rows, pickled, so the model gets exactly
        the batch the caller cut (Ray's blocks never split or merge it) and rows come back as
        the same Python objects (Arrow never coerces their nested types)."""
        return {"rows": [pickle.dumps(self.run(pickle.loads(packed))) for packed in batch["rows"]]}


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
    progress: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Apply `fn(backend, batch_rows)` to all rows with `replicas` model replicas.

    `progress` gets each batch's result rows as they finish (for bars and checkpoints).
    Row order of the result is not guaranteed under Ray; rows carry their own ids.
    """
    if not rows:
        return []
    threads = max(1, math.floor(num_cpus)) if not num_gpus else None
    batches = [rows[start : start + batch_size] for start in range(0, len(rows), batch_size)]
    out: list[dict[str, Any]] = []
    if executor == "local":
        worker = ModelWorker(model.model_dump(), fn, adapters, threads)
        for batch in batches:
            new = worker.run(batch)
            out.extend(new)
            if progress:
                progress(new)
        return out

    import ray

    dataset = ray.data.from_items([{"rows": pickle.dumps(batch)} for batch in batches])
    mapped = dataset.map_batches(
        ModelWorker,
        fn_constructor_kwargs={"model": model.model_dump(), "fn": fn, "adapters": adapters, "num_threads": threads},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=replicas),
        num_cpus=num_cpus,
        num_gpus=num_gpus,
    )
    for result in mapped.iter_batches(batch_size=None, batch_format="default"):
        for packed in result["rows"]:
            new = pickle.loads(packed)
            out.extend(new)
            if progress:
                progress(new)
    return out

