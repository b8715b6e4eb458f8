"""Response generation: the same model answers each kept instruction, guided by seed demos.

Prompts are chat message lists (seed demos as earlier user/assistant turns), so
an instruction-tuned model gets its chat template and a pretrained base gets the
plain Alpaca-style template. Decoding is greedy.
"""

from __future__ import annotations

import random
import re
from typing import Any

from selfspec.dedup import rouge_l, rouge_tokens
from selfspec.metrics import normalize_entity
from selfspec.schema import Seed, seeds_by_task, user_message

# Plain-template models continue with the next "### Instruction:" block; stop there.
RESPONSE_STOPS = ("### Instruction:", "### Response:", "\n\n\n\n")


def build_response_messages(instruction: str, input: str, demos: list[Seed]) -> list[dict[str, str]]:
    messages: list[dict[str, str]] = []
    for demo in demos:
        messages.append({"role": "user", "content": user_message(demo["instruction"], demo["input"])})
        messages.append({"role": "assistant", "content": demo["output"]})
    messages.append({"role": "user", "content": user_message(instruction, input)})
    return messages


def response_demos(seeds: list[Seed], k: int, key: str) -> list[Seed]:
    """k seed demos chosen deterministically per instruction id."""
    return random.Random(key).sample(seeds, min(k, len(seeds))) if k else []


def is_degenerate(text: str) -> bool:
    """Loops and babble: a word 4-gram repeated many times, or few distinct words."""
    words = text.lower().split()
    if len(words) < 8:
        return False
    grams = [" ".join(words[i : i + 4]) for i in range(len(words) - 3)]
    most_common = max(grams.count(g) for g in set(grams))
    if most_common >= 4 and most_common * 4 > len(words) * 0.3:
        return True
    return len(set(words)) / len(words) < 0.25


def response_drop_reason(text: str, finish_reason: str, input: str = "") -> str | None:
    if not text.strip() or not re.search(r"\w", text):
        return "empty_response"
    if input.strip() and normalize_entity(text) == normalize_entity(input):
        return "copied_input"  # the model echoed the task's input instead of answering
    if finish_reason == "length":
        return "truncated_response"
    if is_degenerate(text):
        return "degenerate_response"
    return None


# Answers this short ("none", a label, a name) may repeat a seed's answer by right, unless
# they hold a figure their own input lacks.
MIN_COPIED_WORDS = 4


def copies_seed_answer(text: str, seed_answers: list[list[str]], threshold: float, input: str = "") -> bool:
    """The answer repeats one of its task type's seed answers (ROUGE-L at or above
    `threshold` against the seed answer's `rouge_tokens`) on an input of its own: a small
    base model copies its demos' answers instead of answering. A short answer counts only
    when it is a seed answer word for word, holds a number and its input does not hold it
    ("181.4" read off a demo's table, not the row's passage)."""
    tokens = rouge_tokens(text)
    if len(tokens) < MIN_COPIED_WORDS:
        return (
            bool(re.search(r"\d", text))
            and tokens in seed_answers
            and normalize_entity(text) not in normalize_entity(input)
        )
    return any(rouge_l(tokens, answer) >= threshold for answer in seed_answers)


TYPED_LINE = re.compile(r"^(\s*[A-Za-z][\w ]{0,30}:\s*)(.*)$")


def list_lines(text: str) -> list[tuple[str, str, list[str]]]:
    """A list answer's lines as (head, body, items): 'Chemicals: a; b' -> ('Chemicals: ',
    'a; b', ['a', 'b']); an untyped line has head ''. Items keep their spelling, empty ones
    included."""
    lines = []
    for line in text.strip().split("\n"):
        typed = TYPED_LINE.match(line)
        head, body = (typed.group(1), typed.group(2)) if typed else ("", line)
        lines.append((head, body, [item.strip() for item in body.split(";")]))
    return lines


def collapse_repeated_items(text: str, truncated: bool) -> str | None:
    """A list answer ('a; b; a; a', one list per line, optionally after a 'Type:' head) that
    loops on its items, as small models do, cut to its distinct items; with `truncated`, the
    unfinished last item goes too. None when no item repeats (the answer stands as it is)."""
    lines = list_lines(text)
    out, repeated = [], False
    for n, (head, _, items) in enumerate(lines):
        if truncated and n == len(lines) - 1:
            items = items[:-1]
        seen: dict[str, str] = {}
        for item in items:
            if item and normalize_entity(item) in seen:
                repeated = True
            elif item:
                seen[normalize_entity(item)] = item
        if seen or head:
            out.append(head + "; ".join(seen.values()))
    return "\n".join(out).strip() if repeated and out else None


def is_span_of(item: str, source: str) -> bool:
    """`item` occurs in `source` (both normalized) as a whole span, not inside a word: "b"
    is no mention of "about". A single character is never an entity: it is a template's
    placeholder ("Chemicals: a; b") written back."""
    if len(item) < 2:
        return False
    return re.search(rf"(?<![a-z0-9]){re.escape(item)}(?![a-z0-9])", source) is not None


def ground_list_items(text: str, input: str) -> tuple[str, int]:
    """A list answer over a given input with the items the input does not hold as a span
    removed (case and spacing aside): an extracted entity is a span of its text, so an item
    that is not there was copied from a demo, made up, or a template's placeholder. A typed
    line left empty says 'none'.
    -> (the answer, how many items went); the answer is '' when nothing it listed remains."""
    source = normalize_entity(input)
    lines, removed, kept_any, listed_any = [], 0, False, False
    for head, body, items in list_lines(text):
        listed = [i for i in items if i and i.lower() != "none"]
        listed_any = listed_any or bool(listed)
        grounded = [i for i in listed if is_span_of(normalize_entity(i), source)]
        removed += len(listed) - len(grounded)
        kept_any = kept_any or bool(grounded)
        if head:
            lines.append(head + ("; ".join(grounded) if grounded else "none"))
        elif grounded or not listed:
            lines.append("; ".join(grounded) if grounded else body.strip())
    if listed_any and not kept_any:
        return "", removed
    return "\n".join(lines).strip(), removed


def clean_response(text: str) -> str:
    return text.strip()


def response_rows(
    instructions: list[dict[str, Any]], seeds: list[Seed], k: int, by_instruction_demos: bool = False
) -> list[dict[str, Any]]:
    """Attach the response prompt (messages) to each instruction row; demos come from the
    seeds of the row's task type when it has one, so answers take the seeds' form. They are
    drawn per row, or with `by_instruction_demos` per draw of the instruction prompt's demos
    (rows whose prompts shared demos share these too, and so a prompt prefix)."""
    by_type = seeds_by_task(seeds)

    def key(row: dict[str, Any]) -> str:
        shared = by_instruction_demos and row.get("seed_ids")
        return f"{row.get('task', '')}:{','.join(row['seed_ids'])}" if shared else row["id"]

    return [
        {
            **row,
            "messages": build_response_messages(
                row["instruction"], row["input"], response_demos(by_type.get(row.get("task", ""), seeds), k, key(row))
            ),
        }
        for row in instructions
    ]
