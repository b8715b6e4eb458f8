"""What keeps synthetic data clean: task-type profiles of the seeds, label answers,
self-consistency votes, label balance, task-type mix and domain relevance.

Pure functions over rows and seeds, except `DomainRelevance`, which holds an encoder.
Every threshold here is set from the seeds (never from evaluation data):
- a task type is *labelled* when its seeds answer in at most `LABEL_MAX_WORDS` words
  (median) and some answers repeat (yes/no/maybe, sentiment, relation names); its
  label set is those answers;
- label shares and task-type shares follow the seeds';
- the relevance threshold is a low percentile of the seeds' own relevance.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from selfspec.metrics import extract_label, normalize_text
from selfspec.schema import Seed, seeds_by_task

# A task type whose seed answers have at most this many words (median) is a label task.
LABEL_MAX_WORDS = 3
# An answer longer than this many times its type's longest seed answer is off form.
FORM_LENGTH_RATIO = 2
# Label balancing never cuts a label below this many rows.
MIN_LABEL_ROWS = 2


@dataclass(frozen=True)
class TaskProfile:
    """What the seeds of one task type look like."""

    task: str
    seeds: int
    share: float  # of all seeds
    input_words: int  # median words of the seeds' inputs (0: the type takes no input)
    output_words: int  # median words of the seeds' outputs
    max_output_words: int  # the longest seed output, in words
    labels: tuple[str, ...]  # label set (seed spelling), empty for open-ended types
    label_shares: dict[str, float]  # normalized label -> share among the type's seeds
    list_answers: bool = False  # most seed answers are '; '-separated lists (entity lists)
    input_required: bool = False  # every seed of the type has an input
    input_fields: tuple[str, ...] = ()  # labelled lines every seed input has ("Abstract", "Question")

    @property
    def labelled(self) -> bool:
        return bool(self.labels)


def task_profiles(seeds: Sequence[Seed]) -> dict[str, TaskProfile]:
    """One profile per seed task type, in order of first appearance."""
    profiles = {}
    for task, members in seeds_by_task(seeds).items():
        output_words = int(statistics.median(len(s["output"].split()) for s in members))
        labels: tuple[str, ...] = ()
        shares: dict[str, float] = {}
        spelled: dict[str, str] = {}
        for s in members:
            spelled.setdefault(normalize_text(s["output"]), s["output"].strip())
        # Short answers that repeat form a label set; short answers that never repeat are
        # lists or names (entity lists, topics), not labels.
        if output_words <= LABEL_MAX_WORDS and len(spelled) < len(members):
            labels = tuple(spelled.values())
            counts = Counter(normalize_text(s["output"]) for s in members)
            shares = {label: count / len(members) for label, count in counts.items()}
        profiles[task] = TaskProfile(
            task=task,
            seeds=len(members),
            share=len(members) / len(seeds),
            input_words=int(statistics.median(len(s["input"].split()) for s in members)),
            output_words=output_words,
            max_output_words=max(len(s["output"].split()) for s in members),
            labels=labels,
            label_shares=shares,
            list_answers=2 * sum(";" in s["output"] for s in members) > len(members),
            input_required=all(s["input"].strip() for s in members),
            input_fields=input_fields([s["input"] for s in members]),
        )
    return profiles


FIELD_LINE = re.compile(r"^([A-Z][A-Za-z0-9 ]{0,24}):\s")


def input_fields(inputs: Sequence[str]) -> tuple[str, ...]:
    """The field labels of inputs written as labelled lines ("Abstract: ...", "Question: ..."):
    the labels at least two thirds of the inputs share, when there are two or more and every
    input starts with a labelled line; else ()."""
    shapes: Counter[tuple[str, ...]] = Counter()
    for text in inputs:
        lines = text.strip().splitlines()
        if not lines or not FIELD_LINE.match(lines[0]):
            return ()
        shapes[tuple(m.group(1) for line in lines if (m := FIELD_LINE.match(line)))] += 1
    shape, count = shapes.most_common(1)[0] if shapes else ((), 0)
    return shape if len(shape) >= 2 and 3 * count >= 2 * len(inputs) else ()


def off_form(answer: str, profile: TaskProfile | None) -> bool:
    """An answer far longer than any seed answer of its task type (more than
    `FORM_LENGTH_RATIO` times the longest): for an entity list, a copied or paraphrased
    input rather than the list."""
    return profile is not None and len(answer.split()) > FORM_LENGTH_RATIO * profile.max_output_words


# Generous: biomedical words with their punctuation run about 1.5 tokens each.
TOKENS_PER_WORD = 2


def response_budget(profile: TaskProfile | None, cap: int) -> int:
    """New tokens an open-ended answer may take: enough for the longest answer `off_form`
    keeps, so an answer cut there would have been dropped anyway; never above `cap`."""
    if profile is None:
        return cap
    return min(cap, max(16, FORM_LENGTH_RATIO * profile.max_output_words * TOKENS_PER_WORD + 8))


def label_task(profiles: dict[str, TaskProfile], task: str) -> TaskProfile | None:
    """The profile of `task` when it is a label task, else None."""
    profile = profiles.get(task)
    return profile if profile is not None and profile.labelled else None


def answer_label(text: str, profile: TaskProfile) -> str | None:
    """The label a free-form answer names, spelled as in the seeds; None when it names none."""
    return extract_label(text, profile.labels) if profile.labelled else None


def majority_label(answers: Iterable[str], profile: TaskProfile, min_agreement: float) -> tuple[str | None, float]:
    """Self-consistency: the label most sampled answers name, if at least `min_agreement`
    of all samples name it. Returns (label or None, its share of the samples)."""
    answers = list(answers)
    votes = Counter(label for label in (answer_label(a, profile) for a in answers) if label)
    if not votes or not answers:
        return None, 0.0
    label, count = votes.most_common(1)[0]
    share = count / len(answers)
    return (label if share >= min_agreement else None), share


def label_check(results: dict[str, list[tuple[str, str | None]]]) -> dict[str, dict[str, Any]]:
    """Whether the model's labels carry more than the seeds' prior, per label task type.

    `results`: task -> (gold, given) label of each of its seeds, labelled leave-one-out as
    generation labels a row (given None: no clear label). The prior is the majority-class
    baseline: always answering the type's most common seed label gets its count right. A
    type is `reliable` when the model labels more seeds right than that by more than chance:
    `p`, the chance that a labeller right at the prior's rate gets `right` or more of the
    seeds (one-sided binomial), is at most LABEL_CHECK_ALPHA. Otherwise its rows would teach
    noise: on 10 seeds, 7 right against a prior of 5 happens by chance 17% of the time."""
    out = {}
    for task, pairs in results.items():
        right = sum(given is not None and normalize_text(given) == normalize_text(gold) for gold, given in pairs)
        prior = max(Counter(normalize_text(gold) for gold, _ in pairs).values(), default=0)
        p = binomial_tail(right, len(pairs), prior / len(pairs)) if pairs else 1.0
        out[task] = {
            "seeds": len(pairs), "right": right, "prior_right": prior, "p": round(p, 4),
            "reliable": right > prior and p <= LABEL_CHECK_ALPHA,
        }
    return out


# The label check's significance level: the usual one-sided 5%.
LABEL_CHECK_ALPHA = 0.05


def binomial_tail(k: int, n: int, rate: float) -> float:
    """P(X >= k) for X ~ Binomial(n, rate)."""
    return min(1.0, sum(math.comb(n, i) * rate**i * (1 - rate) ** (n - i) for i in range(k, n + 1)))


def majority_seed_label(profile: TaskProfile) -> str | None:
    """The label most seeds of a label type give, spelled as in the seeds; None when two or
    more labels tie for most (5 yes / 5 no): then no label is the better guess."""
    top = max(profile.label_shares.values())
    leaders = [label for label in profile.labels if profile.label_shares.get(normalize_text(label)) == top]
    return leaders[0] if len(leaders) == 1 else None


def relabel_with_majority(rows: list[dict[str, Any]], profiles: dict[str, TaskProfile], tasks: set[str]) -> list[dict[str, Any]]:
    """Rows of the given label types answered with their seeds' majority label: where the
    model's labels are right no more often than that label (`label_check`), it is the better
    guess for every row, and the row still teaches the type's answer form."""
    majority = {t: majority_seed_label(profiles[t]) for t in tasks}
    return [{**r, "output": majority[r["task"]], "label": majority[r["task"]]} if r["task"] in majority else r for r in rows]


def label_caps(counts: dict[str, int], shares: dict[str, float], tolerance: float) -> dict[str, int]:
    """How many rows of each label to keep so that no label's share of the kept rows
    exceeds `tolerance` times its seed share (a label the seeds lack gets the smallest
    seed share). Over-represented labels are cut, the others kept whole; no label is cut
    below `MIN_LABEL_ROWS`, since a handful of rows shows no imbalance."""
    floor = min(shares.values()) if shares else 1.0
    allowed = {label: min(1.0, tolerance * shares.get(label, floor)) for label in counts}
    caps = dict(counts)
    for _ in range(len(caps) + 1):
        total = sum(caps.values())
        over = [l for l, c in caps.items() if c > allowed[l] * total]
        if not over:
            break
        rest = total - sum(caps[l] for l in over)
        limit = sum(allowed[l] for l in over)
        if limit >= 1.0:
            break
        # Kept rows: rest + each over-represented label at its allowed share of the new total.
        new_total = rest / (1.0 - limit)
        for l in over:
            caps[l] = min(caps[l], math.floor(allowed[l] * new_total + 1e-9))
    return {l: max(c, min(counts[l], MIN_LABEL_ROWS)) for l, c in caps.items()}


def balance_labels(rows: list[dict[str, Any]], profiles: dict[str, TaskProfile], tolerance: float) -> tuple[list[dict[str, Any]], int]:
    """Drop the newest rows of over-represented labels, task type by task type, so that
    label shares follow the seeds'. Returns (kept rows in their order, rows dropped)."""
    by_type: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, row in enumerate(rows):
        if label_task(profiles, row.get("task", "")) and row.get("label"):
            by_type[row["task"]][normalize_text(row["label"])].append(i)
    dropped: set[int] = set()
    for task, by_label in by_type.items():
        caps = label_caps({l: len(ix) for l, ix in by_label.items()}, profiles[task].label_shares, tolerance)
        for label, indices in by_label.items():
            dropped.update(indices[caps[label]:])
    return [r for i, r in enumerate(rows) if i not in dropped], len(dropped)


def select_task_mix(rows: list[dict[str, Any]], target: int, profiles: dict[str, TaskProfile]) -> list[dict[str, Any]]:
    """Up to `target` rows whose task-type mix follows the seeds': each type first gets its
    seed share of the target (as far as it has rows), then free slots go to the rows left,
    in order. Rows keep their order within the result."""
    if len(rows) <= target:
        return list(rows)
    by_type: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_type[row.get("task", "")].append(i)
    picked: set[int] = set()
    for task, indices in by_type.items():
        share = profiles[task].share if task in profiles else 0.0
        picked.update(indices[: round(share * target)])
    chosen = sorted(picked)[:target]
    chosen += [i for i in range(len(rows)) if i not in picked][: target - len(chosen)]
    return [rows[i] for i in sorted(chosen)]


def task_draws(profiles: dict[str, TaskProfile], count: int, rng, weights: dict[str, float] | None = None) -> list[str]:
    """`count` task types in proportion to their seed shares, or to `weights` when given
    (largest remainders), shuffled."""
    weights = weights if weights and sum(weights.values()) > 0 else {t: p.share for t, p in profiles.items()}
    total = sum(weights.values())
    exact = {t: weights.get(t, 0.0) / total * count for t in profiles}
    draws = {t: math.floor(x) for t, x in exact.items()}
    for t in sorted(exact, key=lambda t: draws[t] - exact[t])[: count - sum(draws.values())]:
        draws[t] += 1
    out = [t for t, n in draws.items() for _ in range(n)]
    rng.shuffle(out)
    return out


def round_task_weights(rows: list[dict[str, Any]], target: int, profiles: dict[str, TaskProfile]) -> dict[str, float]:
    """Task-type weights for a round's prompts: half follow the seeds' shares, half go to
    the types still short of their seed share of `target` (by how short), so a type the
    model rarely completes gets more prompts without starving the round's yield."""
    have = Counter(row.get("task", "") for row in rows)
    deficits = {t: max(p.share * target - have[t], 0.0) for t, p in profiles.items()}
    total = sum(deficits.values())
    return {t: 0.5 * p.share + 0.5 * (deficits[t] / total if total else p.share) for t, p in profiles.items()}


def fit_passage(text: str, max_words: int) -> str:
    """The passage cut to about `max_words` words at a sentence end (whole when shorter)."""
    words = text.split()
    if len(words) <= max_words:
        return " ".join(words)
    cut = " ".join(words[:max_words])
    end = max(cut.rfind(". "), cut.rfind("? "), cut.rfind("! "))
    if end >= len(cut) // 3:
        return cut[: end + 1]
    return cut


def task_text(instruction: str, input: str) -> str:
    return f"{instruction}\n{input}".strip()


class DomainRelevance:
    """Cosine similarity to the domain: the mean of the seeds' centroid and, when given,
    the corpus centroid, with the embedded sentence encoder (unit-length embeddings).

    `threshold` is the `percentile` of the seeds' own scores, each seed scored against
    a centroid that leaves it out, so a typical seed always passes."""

    def __init__(self, encoder, seeds: Sequence[Seed], passages: Sequence[str] = (), percentile: float = 5.0):
        from selfspec.retrieval.index import encode

        self._encode = lambda texts: encode(encoder, list(texts), batch_size=16)
        seed_vectors = self._encode(task_text(s["instruction"], s["input"]) for s in seeds)
        corpus_centroid = self._encode(passages).mean(axis=0) if len(passages) else None
        seed_sum = seed_vectors.sum(axis=0)
        self.centroid = self._mix(seed_sum / len(seeds), corpus_centroid)
        # Leave-one-out scores of the seeds set the threshold.
        loo = [
            float(v @ self._mix((seed_sum - v) / max(len(seeds) - 1, 1), corpus_centroid))
            for v in seed_vectors
        ]
        self.seed_scores = loo
        self.threshold = float(np.percentile(loo, percentile))

    @staticmethod
    def _mix(seed_centroid: np.ndarray, corpus_centroid: np.ndarray | None) -> np.ndarray:
        centroid = seed_centroid if corpus_centroid is None else (seed_centroid + corpus_centroid) / 2
        return centroid / max(float(np.linalg.norm(centroid)), 1e-12)

    def scores(self, texts: Sequence[str]) -> list[float]:
        if not texts:
            return []
        return [float(x) for x in self._encode(texts) @ self.centroid]
