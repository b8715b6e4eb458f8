"""Records that flow between stages, and their Arrow schemas.

Seed -> Instruction (generated task, no answer yet) -> Example (task + response).
Every generated record carries a content-hash id and its provenance: the seed ids
in its prompt, retrieved passage ids, the model and adapter, the round and the
config hash of the run that wrote it.
"""

from __future__ import annotations

import hashlib
from typing import TypedDict


class Seed(TypedDict):
    id: str
    task: str
    instruction: str
    input: str
    output: str


class Instruction(TypedDict):
    id: str
    task: str  # the seed task type it was written from ("" when its demos mixed types)
    instruction: str
    input: str
    domain: str
    seed_ids: list[str]
    passage_ids: list[str]
    model: str
    adapter: str
    round: int
    config_hash: str


class Example(Instruction):
    output: str
    label: str  # the answer's label for label task types (yes, positive, ...), else ""


def seeds_by_task(seeds: list[Seed]) -> dict[str, list[Seed]]:
    """Seeds grouped by task type, types in order of first appearance."""
    groups: dict[str, list[Seed]] = {}
    for seed in seeds:
        groups.setdefault(seed["task"], []).append(seed)
    return groups


def content_id(instruction: str, input: str = "") -> str:
    """Stable id of a task: the same instruction and input always hash alike."""
    text = " ".join(instruction.split()) + "\x1f" + " ".join(input.split())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def instruction_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("id", pa.string()),
            ("task", pa.string()),
            ("instruction", pa.string()),
            ("input", pa.string()),
            ("domain", pa.string()),
            ("seed_ids", pa.list_(pa.string())),
            ("passage_ids", pa.list_(pa.string())),
            ("model", pa.string()),
            ("adapter", pa.string()),
            ("round", pa.int32()),
            ("config_hash", pa.string()),
        ]
    )


def example_schema():
    import pyarrow as pa

    return instruction_schema().append(pa.field("output", pa.string())).append(pa.field("label", pa.string()))


def to_alpaca(example: Example) -> dict[str, str]:
    return {"instruction": example["instruction"], "input": example["input"], "output": example["output"]}


def user_message(instruction: str, input: str = "") -> str:
    return f"{instruction}\n\n{input}".strip() if input.strip() else instruction.strip()


def to_messages(example: Example) -> dict[str, list[dict[str, str]]]:
    return {
        "messages": [
            {"role": "user", "content": user_message(example["instruction"], example["input"])},
            {"role": "assistant", "content": example["output"]},
        ]
    }
