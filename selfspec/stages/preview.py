"""`selfspec generate --preview N`: a small real run, its yield, and the cost of the full target."""

from __future__ import annotations

from selfspec.config import RunConfig
from selfspec.io import RunDir, read_parquet
from selfspec.stages.generate import format_summary, run_generate


def estimate(summary: dict, target: int, config: RunConfig) -> dict[str, float]:
    """Scale the preview's measured seconds per example to the full target."""
    made = max(summary["counts"].get("examples", 0), 1)
    seconds = summary["seconds"] / made * target
    gpus = config.generate.replicas * config.generate.num_gpus_per_replica
    return {
        "examples_per_prompt": summary["counts"].get("examples", 0) / max(summary["counts"].get("prompts", 1), 1),
        "seconds_per_example": summary["seconds"] / made,
        "full_target_hours": seconds / 3600,
        "full_target_gpu_hours": seconds / 3600 * gpus,
    }


def preview(config: RunConfig, run_dir: RunDir, n: int, executor: str) -> dict:
    preview_dir = RunDir(run_dir.path("preview"))
    summary = run_generate(config, preview_dir, executor=executor, overwrite=True, target=n)
    examples = read_parquet(preview_dir.path("data", "examples.parquet"))
    for number, example in enumerate(examples, start=1):
        print(f"--- example {number} (seeds {', '.join(example['seed_ids'])})")
        print(f"instruction: {example['instruction']}")
        if example["input"]:
            print(f"input: {example['input']}")
        print(f"output: {example['output']}")
    print("---")
    print(format_summary(summary))
    cost = estimate(summary, config.generate.target, config)
    backend = config.model.backend
    print(
        f"yield {cost['examples_per_prompt']:.2f} examples per prompt; {cost['seconds_per_example']:.1f}s per example "
        f"with {config.generate.replicas} replica(s) on backend '{backend}'"
    )
    print(
        f"estimate for generate.target={config.generate.target}: {cost['full_target_hours']:.2f} h"
        + (f", {cost['full_target_gpu_hours']:.2f} GPU-hours" if cost["full_target_gpu_hours"] else " (CPU)")
    )
    return cost
