"""Instruction generation: the base model writes new domain tasks from sampled seeds.

Pure functions over rows: build a prompt in the paper's style (a domain
description, a few numbered seed tasks, an open slot for the next one), parse
the model's numbered continuation into (instruction, input) items, and filter
each item with a named reason for every drop.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from typing import Any

from selfspec.metrics import normalize_entity
from selfspec.schema import Seed, seeds_by_task

NO_INPUT = "<noinput>"

PROMPT_HEADER = (
    "{description}\n"
    "Below is a list of diverse tasks in this domain for a {domain} language model. "
    "Each task has an instruction and, when the instruction needs one, an input "
    "(a passage, sentence, table or question) written out in full; otherwise the input is "
    "\"{no_input}\". Every task can be done with text alone. Continue the list with new "
    "tasks that differ from the ones above in wording and in kind.\n\n"
)

ITEM_SPLIT = re.compile(r"\n\s*(?:\d+\s*[.)]\s*)?Instruction\s*:", re.IGNORECASE)
INPUT_SPLIT = re.compile(r"\n\s*Input\s*:", re.IGNORECASE)
# Unlike ITEM_SPLIT, no item number: "N. Instruction:" starts another task.
INSTRUCTION_LINE = re.compile(r"\n\s*Instruction\s*:", re.IGNORECASE)
# The demos show no outputs, so a model that writes one has finished the task's
# instruction and input: with one task per prompt, generation stops there.
ITEM_END_STOPS = ("\nOutput:", "\nResponse:", "\nAnswer:")
OUTPUT_SPLIT = re.compile(r"\n\s*(?:Output|Response|Answer)\s*:", re.IGNORECASE)


def format_task(number: int, instruction: str, input: str, input_first: bool = False) -> str:
    if input_first:
        return f"{number}. Input: {input or NO_INPUT}\nInstruction: {instruction}\n"
    return f"{number}. Instruction: {instruction}\nInput: {input or NO_INPUT}\n"


def sample_demos(seeds: list[Seed], k: int, rng: random.Random) -> list[Seed]:
    return rng.sample(seeds, min(k, len(seeds)))


def build_prompt(
    domain: str,
    description: str,
    demos: list[Seed],
    passages: list[str] = (),
    new_input: str | None = None,
    open_field: str = "",
) -> str:
    """A plain completion prompt that ends where the model writes the next instruction.

    With `new_input` (a real passage), every task shows its input first and the prompt
    ends with that input, so the model writes an instruction for a given text; with
    `open_field` too ("Question"), it ends on that field of the input, which the model
    fills before it writes the instruction."""
    text = PROMPT_HEADER.format(description=description, domain=domain, no_input=NO_INPUT)
    if passages:
        text += "Domain knowledge to ground the new tasks:\n"
        text += "".join(f"[{i + 1}] {p}\n" for i, p in enumerate(passages)) + "\n"
    input_first = new_input is not None
    for number, seed in enumerate(demos, start=1):
        text += format_task(number, seed["instruction"], seed["input"], input_first) + "\n"
    if input_first and open_field:
        return text + f"{len(demos) + 1}. Input: {new_input}\n{open_field}:"
    if input_first:
        return text + f"{len(demos) + 1}. Input: {new_input}\nInstruction:"
    return text + f"{len(demos) + 1}. Instruction:"


def make_prompt_rows(
    seeds: list[Seed], domain: str, description: str, count: int, num_demos: int, seed: int, round: int,
    by_task: bool = True, task_weights: dict[str, float] | None = None, per_demo_set: int = 1,
) -> list[dict[str, Any]]:
    """Deterministic prompts for one round: the same (seed, round) gives the same rows.

    `by_task`: each prompt's demos share one seed task type (`task` of the row), types
    drawn in proportion to the seeds' (or to `task_weights`); otherwise demos mix types
    and `task` is "". `per_demo_set`: consecutive prompts of one type share a draw of demos."""
    from selfspec.quality import task_draws, task_profiles

    by_type = seeds_by_task(seeds)
    tasks = task_draws(task_profiles(seeds), count, random.Random(f"{seed}:{round}:tasks"), task_weights) if by_task else [""] * count
    rows = []
    drawn: dict[str, list[Seed]] = {}  # task type -> the demos its current prompts share
    made: Counter[str] = Counter()
    for index, task in enumerate(tasks):
        if made[task] % per_demo_set == 0:
            drawn[task] = sample_demos(by_type[task] if task else seeds, num_demos, random.Random(f"{seed}:{round}:{index}"))
        made[task] += 1
        demos = drawn[task]
        rows.append(
            {
                "prompt_id": f"r{round}-p{index}",
                "task": task,
                "prompt": build_prompt(domain, description, demos),
                "seed_ids": [d["id"] for d in demos],
                "passage_ids": [],
                "given_input": "",  # a real passage the task must use (retrieval.passage_as_input)
                "open_field": "",  # the input field the model fills after the given passage
            }
        )
    return rows


def parse_given_input(completion: str, truncated: bool) -> dict[str, Any]:
    """The instruction a model wrote for a given input: its first line."""
    text = completion.strip(" ")
    line, newline, _ = text.partition("\n")
    instruction = " ".join(line.split())
    error = None if instruction else "unparseable"
    if error is None and truncated and not newline:
        error = "truncated"
    return {"instruction": instruction, "input": "", "error": error, "position": 0}


def parse_open_field(completion: str, given_input: str, field: str, truncated: bool) -> dict[str, Any]:
    """A task over a given passage whose input has more fields: the model wrote the open
    field (and any after it), then "Instruction:" and the instruction on one line."""
    value, *after = INSTRUCTION_LINE.split(completion, maxsplit=1)
    line, newline, _ = (after[0] if after else "").strip(" ").partition("\n")
    instruction, value = " ".join(line.split()), value.strip()
    error = None
    if truncated and not newline:
        error = "truncated"
    elif not (after and instruction and value):
        error = "unparseable"
    return {"instruction": instruction, "input": f"{given_input}\n{field}: {value}", "error": error, "position": 0}


def parse_tasks(completion: str, truncated: bool) -> list[dict[str, Any]]:
    """Split the continuation of "N. Instruction:" into items.

    Returns dicts with instruction, input and `error` (None, "unparseable" or
    "truncated": the last item of a completion cut by the token limit, unless an
    "Output:" line shows that its instruction and input were finished).
    """
    pieces = [p for p in ITEM_SPLIT.split("\n" + completion.lstrip(" ")) if p.strip()]
    items = []
    for position, piece in enumerate(pieces):
        body, *answer = OUTPUT_SPLIT.split(piece, maxsplit=1)
        # An item followed by an "Output:" line or by the next item was written in full.
        complete = bool(answer) or position < len(pieces) - 1
        parts = INPUT_SPLIT.split(body, maxsplit=1)
        instruction = parts[0]
        input = parts[1] if len(parts) > 1 else ""
        # A following numbered item without "Instruction:" ends this one.
        input = re.split(r"\n\s*\d+\s*[.)]\s", input)[0]
        instruction, input = " ".join(instruction.split()), input.strip()
        if input.strip('"').lower() in {NO_INPUT, "none", "n/a", "", "noinput"}:
            input = ""
        error = None
        if not instruction:
            error = "unparseable"
        if error is None and truncated and not complete:
            error = "truncated"
        items.append({"instruction": instruction, "input": input, "error": error, "position": position})
    if not items:
        items.append({"instruction": "", "input": "", "error": "unparseable", "position": 0})
    return items


def _blacklist_pattern(words: list[str]) -> re.Pattern:
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)


def instruction_drop_reason(
    instruction: str, input: str, min_words: int, max_words: int, blacklist: list[str]
) -> str | None:
    """Why a parsed task is unusable, or None to keep it (the ROUGE-L check comes later)."""
    words = instruction.split()
    if len(words) < min_words:
        return "too_short"
    if len(words) + len(input.split()) > max_words:
        return "too_long"
    if blacklist and _blacklist_pattern(blacklist).search(instruction):
        return "blacklisted"
    if not instruction[0].isascii() or not instruction[0].isalnum():
        return "unusable"  # starts with punctuation or a non-ASCII symbol
    if instruction.lower().startswith(("write a program", "write a code", "write a script")):
        return "unusable"
    if input and normalize_entity(input) == normalize_entity(instruction):
        return "unusable"  # the input only repeats the instruction
    return None
