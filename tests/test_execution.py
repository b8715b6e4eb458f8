"""Model actors on Ray Data get the batch size the config names."""

from __future__ import annotations

from selfspec.config import ModelConfig
from selfspec.execution import map_with_model


def test_ray_data_feeds_the_model_actor_full_batches(ray_local):
    def batch_sizes(backend, rows):
        return [{**row, "batch": len(rows)} for row in rows]

    # The shape: Ray Data cut 826 prompts into blocks of about 4 rows, and
    # map_batches' bundling still left some 4-row batches.
    rows = [{"id": i, "prompt": "x" * 200} for i in range(826)]
    out = map_with_model(rows, batch_sizes, ModelConfig(backend="transformers"), executor="ray", batch_size=16)
    assert sorted(r["id"] for r in out) == list(range(826))
    sizes = [r["batch"] for r in out]
    assert sorted(sizes, reverse=True) == [16] * (16 * 51) + [10] * 10
