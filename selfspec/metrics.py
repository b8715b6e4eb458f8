"""Evaluation metrics, answer extraction and bootstrap confidence intervals.

Every metric is computed the same way: each example contributes a row of counts
(`metric_stats`), and the metric is a function of the column sums
(`metric_from_sums`). That makes corpus-level metrics (macro-F1, entity micro-F1)
and per-example means (accuracy, ROUGE-L) bootstrap alike: a resample is a
weighting of the rows, and the same weights give paired CIs for differences.

Definitions:
- accuracy, exact_match: answer equals gold after `normalize_text`.
- macro_f1: mean per-class F1 over the classes present in gold or predictions
  (scikit-learn's default); an unparsed answer counts only as a miss.
- rouge_l: mean ROUGE-L F-measure (rouge-score, stemmed).
- entity_f1: micro F1 over case-insensitive entity sets; gold splits on ';'.
- numeric_em: first number of the answer within a relative tolerance of gold.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import Any, Sequence

import numpy as np

NUMBER = re.compile(r"[-+]?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
ANSWER_MARKER = re.compile(r"answer\s*(?:is|:)", re.IGNORECASE)
LIST_MARKER = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s*")
NO_ENTITIES = {"none", "n/a", "no diseases", "no entities", "nothing"}


# -- normalization and answer extraction ---------------------------------------
def normalize_text(text: Any) -> str:
    """Lowercase, collapse whitespace, drop surrounding punctuation and quotes."""
    if text is None:
        return ""
    return " ".join(str(text).lower().split()).strip(" .,:;!?\"'`")


def normalize_entity(text: str) -> str:
    return " ".join(text.lower().split())


def gold_entities(gold: str) -> set[str]:
    """Gold entity lists are joined with ';' (for example "ataxia; cancer")."""
    return {normalize_entity(e) for e in gold.split(";") if e.strip()}


def extract_label(text: str, labels: Sequence[str]) -> str | None:
    """The label a free-form answer names: the earliest whole-word match, longest on ties.

    "Answer: Positive." -> "positive"; "It is neither" -> None.
    """
    best: tuple[int, int, str] | None = None
    for label in labels:
        match = re.search(rf"(?<!\w){re.escape(label.strip())}(?!\w)", text, re.IGNORECASE)
        if match and (best is None or (match.start(), -len(label)) < best[:2]):
            best = (match.start(), -len(label), label)
    return best[2] if best else None


def extract_entities(text: str) -> list[str]:
    """Entities of a generated list: split on ';' or lines (commas when nothing else
    separates them), strip bullets and a short leading "Diseases:" label.

    Returns the sorted set of normalized entities.
    """
    text = text.strip()
    head, sep, tail = text.partition(":")
    if sep and len(head.split()) <= 5 and "\n" not in head:
        text = tail
    parts = [p for line in text.splitlines() for p in line.split(";")]
    if len([p for p in parts if p.strip()]) == 1:
        parts = parts[0].split(",")
    entities = set()
    for part in parts:
        entity = normalize_entity(LIST_MARKER.sub("", part)).strip(" .,:\"'`")
        if entity and entity not in NO_ENTITIES:
            entities.add(entity)
    return sorted(entities)


def parse_number(text: Any) -> float | None:
    """The answer's number: the first after "answer is"/"answer:" if present, else the first.

    Thousands separators, currency signs and a trailing % are dropped ("12%" -> 12.0).
    """
    if text is None:
        return None
    text = str(text)
    marker = ANSWER_MARKER.search(text)
    match = NUMBER.search(text, marker.end() if marker else 0) or NUMBER.search(text)
    if not match:
        return None
    cleaned = match.group().replace(",", "").replace("$", "").replace(" ", "")
    try:
        return float(cleaned)
    except ValueError:
        return None


def numbers_match(pred: float | None, gold: float | None, rel_tol: float) -> bool:
    if pred is None or gold is None:
        return False
    return math.isclose(pred, gold, rel_tol=rel_tol, abs_tol=0.0) or pred == gold


# -- per-example statistics ----------------------------------------------------
@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(pred: Any, gold: str) -> float:
    return _rouge_scorer().score(str(gold), "" if pred is None else str(pred))["rougeL"].fmeasure


def metric_stats(
    metric: str, preds: Sequence[Any], golds: Sequence[str], rel_tol: float = 0.01
) -> np.ndarray:
    """One row of counts per example; `metric_from_sums` turns column sums into the metric.

    `preds` are parsed answers: label strings (or None) for accuracy and F1, entity
    lists for entity_f1, numbers for numeric_em, text for ROUGE-L.
    """
    if metric in ("accuracy", "exact_match"):
        rows = [[float(p is not None and normalize_text(p) == normalize_text(g))] for p, g in zip(preds, golds)]
    elif metric == "rouge_l":
        rows = [[rouge_l(p, g)] for p, g in zip(preds, golds)]
    elif metric == "numeric_em":
        rows = [[float(numbers_match(_as_number(p), parse_number(g), rel_tol))] for p, g in zip(preds, golds)]
    elif metric == "entity_f1":
        rows = []
        for p, g in zip(preds, golds):
            pred_set, gold_set = {normalize_entity(e) for e in (p or [])}, gold_entities(g)
            tp = len(pred_set & gold_set)
            rows.append([tp, len(pred_set) - tp, len(gold_set) - tp])
    elif metric == "macro_f1":
        classes = sorted(set(golds) | {p for p in preds if p is not None})
        rows = []
        for p, g in zip(preds, golds):
            row = []
            for c in classes:
                row += [float(p == c and g == c), float(p == c and g != c), float(g == c and p != c)]
            rows.append(row)
    else:
        raise ValueError(f"unknown metric '{metric}'")
    return np.asarray(rows, dtype=np.float64).reshape(len(golds), -1)


def _as_number(value: Any) -> float | None:
    if value is None or isinstance(value, (int, float)):
        return value
    return parse_number(value)


def metric_from_sums(metric: str, sums: np.ndarray, n: np.ndarray | int) -> np.ndarray:
    """The metric from column sums; vectorized over leading axes (bootstrap resamples)."""
    sums = np.asarray(sums, dtype=np.float64)
    if metric in ("accuracy", "exact_match", "rouge_l", "numeric_em"):
        return sums[..., 0] / n
    if metric == "entity_f1":
        return _f1(sums[..., 0], sums[..., 1], sums[..., 2], empty=1.0)
    if metric == "macro_f1":
        tp, fp, fn = sums[..., 0::3], sums[..., 1::3], sums[..., 2::3]
        present = (tp + fp + fn) > 0
        f1 = _f1(tp, fp, fn, empty=0.0)
        return np.where(present, f1, 0.0).sum(axis=-1) / np.maximum(present.sum(axis=-1), 1)
    raise ValueError(f"unknown metric '{metric}'")


def _f1(tp, fp, fn, empty: float):
    denom = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), empty)


def metric_value(metric: str, stats: np.ndarray) -> float:
    """The point estimate; column sums use math.fsum so the value is exactly reproducible."""
    sums = np.array([math.fsum(stats[:, j]) for j in range(stats.shape[1])])
    return float(metric_from_sums(metric, sums, len(stats)))


def example_score(metric: str, pred: Any, gold: str, rel_tol: float = 0.01) -> float:
    """The metric on a single example (macro-F1 reports correctness)."""
    if metric == "macro_f1":
        metric = "accuracy"
    return metric_value(metric, metric_stats(metric, [pred], [gold], rel_tol))


# -- bootstrap -----------------------------------------------------------------
def bootstrap_weights(n: int, samples: int, seed: int | Sequence[int]) -> np.ndarray:
    """`samples` x `n` resampling counts (each row sums to n), seeded."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=samples).astype(np.float64)


def bootstrap_values(metric: str, stats: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The metric on every resample given by `weights`."""
    return metric_from_sums(metric, weights @ stats, len(stats))


def interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap values."""
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def score_with_ci(
    metric: str, stats: np.ndarray, weights: np.ndarray | None, digits: int = 6
) -> dict[str, float | None]:
    """`{"value", "ci_low", "ci_high"}`, rounded; no CI when `weights` is None."""
    value = round(metric_value(metric, stats), digits)
    if weights is None or not len(weights):
        return {"value": value, "ci_low": None, "ci_high": None}
    low, high = interval(bootstrap_values(metric, stats, weights))
    return {"value": value, "ci_low": round(low, digits), "ci_high": round(high, digits)}


def paired_difference(
    metric: str, stats: np.ndarray, reference: np.ndarray, weights: np.ndarray | None, digits: int = 6
) -> dict[str, float | None]:
    """Difference `stats - reference` on the same examples, with a paired bootstrap CI."""
    value = round(metric_value(metric, stats) - metric_value(metric, reference), digits)
    if weights is None or not len(weights):
        return {"value": value, "ci_low": None, "ci_high": None}
    diffs = bootstrap_values(metric, stats, weights) - bootstrap_values(metric, reference, weights)
    low, high = interval(diffs)
    return {"value": value, "ci_low": round(low, digits), "ci_high": round(high, digits)}
