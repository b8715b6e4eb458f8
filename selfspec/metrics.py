"""Evaluation metrics, answer extraction and bootstrap confidence intervals.

Every metric is computed the same way: each example contributes a row of counts
(`metric_stats`), and the metric is a function of the column sums
(`metric_from_sums`). That makes corpus-level metrics (macro-F1, entity micro-F1)
and per-example means (accuracy, ROUGE-L) bootstrap alike: a resample is a
weighting of the rows, and the same weights give paired CIs for differences.

Some metrics read the gold row's `meta` (only the keys in `SCORING_META`): TAT-QA's
`answer_type` and `scale`, ConvFinQA's `answer_is_number` (../shared/data/README.md).

Definitions:
- accuracy, exact_match: answer equals gold after `normalize_text`; a multi-span gold
  (meta.answer_type "multi-span", spans joined by "; ") is compared as a set of spans.
- macro_f1: mean per-class F1 over the classes present in gold or predictions
  (scikit-learn's default); an unparsed answer counts only as a miss.
- rouge_l: mean ROUGE-L F-measure (rouge-score, stemmed).
- entity_f1: micro F1 over case-insensitive entity sets; gold splits on ';'. A gold of
  two or more `Type: a; b` lines ('none' for empty) is scored as typed (type, mention)
  pairs, so a chemical listed as a disease is a miss.
- numeric_em: first number of the answer within a relative tolerance of gold.
- numeric_match: the data README's numeric match. A numeric gold is compared with the
  answer's final number: TAT-QA rows (meta.scale, the answer's unit) after rounding both
  to 2 decimals; others (ConvFinQA) after rounding both to the gold's decimals, or within
  `rel_tol`. Other golds (yes / no, spans) by exact_match.
- numeric_match_scaled: numeric_match that also accepts the answer's number x/100 or
  x*100 (the FinQA percent convention), reported beside numeric_match, never instead.
- token_f1: SQuAD token F1; multi-span golds aligned one-to-one with the answer's spans
  (DROP / TAT-QA); a numeric gold scores its numeric_match, as TAT-QA's F1 does.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from functools import lru_cache
from typing import Any, Sequence

import numpy as np

# A sign only where it cannot be a hyphen ("2008-2009" holds no negative number).
NUMBER = re.compile(r"(?:(?<![\w.])[-+])?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?:(?<![\w.])[-+])?\.\d+")
ANSWER_MARKER = re.compile(r"answer\s*(?:is|:)", re.IGNORECASE)
LIST_MARKER = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s*")
NO_ENTITIES = {"none", "n/a", "no diseases", "no entities", "nothing"}
# A line of a typed entity answer: "Chemicals: a; b" (bold markers allowed in answers).
TYPED_LINE = re.compile(r"^[\s*]*([A-Za-z][A-Za-z ]{0,30}?)[\s*]*:[\s*]*(.*)$")
# The gold row's meta keys that metrics read; prediction records keep them as `gold_meta`.
SCORING_META = ("answer_type", "scale", "answer_is_number")
NUMERIC_ANSWER_TYPES = {"arithmetic", "count"}
TEXT_ANSWER_TYPES = {"span", "multi-span"}
MEAN_METRICS = ("accuracy", "exact_match", "rouge_l", "numeric_em", "numeric_match", "numeric_match_scaled", "token_f1")


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
    return _number_value(match) if match else None


def _number_value(match: re.Match) -> float | None:
    """A `NUMBER` match as a float, thousands separators, `$` and spaces dropped."""
    try:
        return float(match.group().replace(",", "").replace("$", "").replace(" ", ""))
    except ValueError:
        return None


def numbers_match(pred: float | None, gold: float | None, rel_tol: float) -> bool:
    if pred is None or gold is None:
        return False
    return math.isclose(pred, gold, rel_tol=rel_tol, abs_tol=0.0) or pred == gold


def typed_entities(gold: str) -> dict[str, list[str]] | None:
    """A typed gold answer, two or more lines `Type: a; b` ('none' when empty), as
    {type: normalized mentions}; None for any other text (an untyped '; ' list)."""
    lines = [line for line in gold.splitlines() if line.strip()]
    matches = [TYPED_LINE.match(line) for line in lines]
    if len(lines) < 2 or not all(matches):
        return None
    found = {}
    for match in matches:
        mentions = (normalize_entity(x) for x in match.group(2).split(";"))
        found[match.group(1).strip()] = [e for e in mentions if e and e not in NO_ENTITIES]
    return found


def _type_key(name: str) -> str:
    return name.strip().lower().rstrip("s")  # "Chemical" and "Chemicals" name one type


def extract_typed_entities(text: str, types: Sequence[str]) -> list[list[str]]:
    """(type, mention) pairs of a generated typed list: a line starting with a type name
    ("Chemicals:", either number, any case) opens that type, and it and the lines below
    it hold that type's mentions (read as `extract_entities` does); text before the first
    type line is ignored. Returns sorted [type, mention] pairs, types as in `types`."""
    names = {_type_key(t): t for t in types}
    groups: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        match = TYPED_LINE.match(LIST_MARKER.sub("", line))
        if match and _type_key(match.group(1)) in names:
            current, line = names[_type_key(match.group(1))], match.group(2)
        if current is not None:
            groups.setdefault(current, []).append(line)
    return sorted([t, e] for t, lines in groups.items() for e in extract_entities("\n".join(lines)))


def _entity_set(items: Any) -> set:
    """Normalized mentions, or (type, mention) pairs for typed answers."""
    found = set()
    for item in items or []:
        if isinstance(item, str):
            found.add(normalize_entity(item))
        else:
            kind, mention = item
            found.add((str(kind).lower(), normalize_entity(mention)))
    return found


def entity_counts(pred: Any, gold: str) -> list[float]:
    """[true positives, false positives, false negatives] of one answer's entity set."""
    typed = typed_entities(gold)
    if typed is None:
        gold_set = gold_entities(gold)
    else:
        gold_set = {(kind.lower(), mention) for kind, mentions in typed.items() for mention in mentions}
    pred_set = _entity_set(pred)
    tp = len(pred_set & gold_set)
    return [tp, len(pred_set) - tp, len(gold_set) - tp]


def parse_final_number(text: Any) -> float | None:
    """The model's final number (data README): the first number after the last "answer
    is"/"answer:" if there is one, else the last number; `$`, `,` and `%` dropped."""
    if text is None:
        return None
    text = str(text)
    markers = list(ANSWER_MARKER.finditer(text))
    after = NUMBER.search(text, markers[-1].end()) if markers else None
    numbers = [after] if after else list(NUMBER.finditer(text))
    return _number_value(numbers[-1]) if numbers else None


def gold_number(gold: str, meta: dict[str, Any] | None = None) -> float | None:
    """The gold answer as a number, or None when it is text (yes / no, a span).

    TAT-QA's meta.answer_type and ConvFinQA's meta.answer_is_number decide where given;
    otherwise the gold is a number when it is one number ("$1,234", "12.5%").
    """
    meta = meta or {}
    if meta.get("answer_type") in TEXT_ANSWER_TYPES or meta.get("answer_is_number") is False:
        return None
    cleaned = gold.strip().replace(",", "").replace("$", "").rstrip("%").strip()
    try:
        return float(cleaned)
    except ValueError:
        return parse_number(gold) if meta.get("answer_type") in NUMERIC_ANSWER_TYPES else None


def _rounded(x: float, decimals: int) -> Decimal:
    # Decimal of the shortest repr: rounds what the model wrote, not its binary float.
    return Decimal(repr(x)).quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP)


def _gold_decimals(gold: str) -> int:
    digits = gold.strip().replace(",", "").rstrip("%")
    return len(digits.split(".", 1)[1]) if "." in digits else 0


def number_matches(pred: float, gold_text: str, gold: float, meta: dict[str, Any], rel_tol: float) -> bool:
    """One number against a numeric gold: TAT-QA rows (meta.scale) at 2 decimals,
    others at the gold's decimals or within `rel_tol`."""
    try:
        if "scale" in meta:
            return _rounded(pred, 2) == _rounded(gold, 2)
        decimals = _gold_decimals(gold_text)
        return _rounded(pred, decimals) == _rounded(gold, decimals) or math.isclose(pred, gold, rel_tol=rel_tol)
    except (InvalidOperation, ValueError):  # inf / nan
        return False


def answer_spans(text: str) -> list[str]:
    """A multi-span answer's spans: separated by ';' or by lines."""
    return [span for span in re.split(r"[;\n]", text) if span.strip()]


def exact_match(pred: Any, gold: str, meta: dict[str, Any] | None = None) -> bool:
    """Equality after `normalize_text`; multi-span golds as sets of spans."""
    if pred is None:
        return False
    if (meta or {}).get("answer_type") == "multi-span":
        return {normalize_text(s) for s in answer_spans(str(pred))} == {normalize_text(s) for s in answer_spans(gold)}
    return normalize_text(pred) == normalize_text(gold)


def numeric_match(
    pred: Any, gold: str, meta: dict[str, Any] | None = None, rel_tol: float = 0.01, scaled: bool = False
) -> bool:
    """The data README's numeric match of one answer (a parsed number, or text whose final
    number is read); `scaled` also accepts x/100 and x*100."""
    meta = meta or {}
    number = gold_number(gold, meta)
    if number is None:
        return exact_match(pred, gold, meta)
    value = pred if isinstance(pred, (int, float)) or pred is None else parse_final_number(pred)
    if value is None:
        return False
    candidates = [value, value / 100, value * 100] if scaled else [value]
    return any(number_matches(c, gold, number, meta, rel_tol) for c in candidates)


def squad_tokens(text: str) -> list[str]:
    """SQuAD's answer normalization: lowercase, no punctuation, no articles, split."""
    text = "".join(c for c in str(text).lower() if c not in string.punctuation)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def token_f1(pred: str, gold: str) -> float:
    """SQuAD token F1 of one answer string against one gold string."""
    pred_tokens, gold_tokens = squad_tokens(pred), squad_tokens(gold)
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if not common:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def spans_f1(pred_spans: Sequence[str], gold_spans: Sequence[str]) -> float:
    """Multi-span token F1 (DROP / TAT-QA): the best one-to-one alignment of predicted
    and gold spans, its F1s summed over the larger of the two counts."""
    from scipy.optimize import linear_sum_assignment

    if not pred_spans or not gold_spans:
        return float(not pred_spans and not gold_spans)
    scores = np.array([[token_f1(p, g) for p in pred_spans] for g in gold_spans])
    rows, cols = linear_sum_assignment(scores, maximize=True)
    return float(scores[rows, cols].sum() / max(len(pred_spans), len(gold_spans)))


def answer_f1(pred: Any, gold: str, meta: dict[str, Any] | None = None, rel_tol: float = 0.01) -> float:
    """token_f1 of one answer: a numeric gold scores its numeric match, a multi-span gold
    the aligned span F1, any other the SQuAD token F1."""
    meta = meta or {}
    if pred is None:
        return 0.0
    if gold_number(gold, meta) is not None:
        return float(numeric_match(pred, gold, meta, rel_tol))
    if meta.get("answer_type") == "multi-span":
        return spans_f1(answer_spans(str(pred)), answer_spans(gold))
    return token_f1(str(pred), gold)


# -- per-example statistics ----------------------------------------------------
@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(pred: Any, gold: str) -> float:
    return _rouge_scorer().score(str(gold), "" if pred is None else str(pred))["rougeL"].fmeasure


def scoring_meta(meta: dict[str, Any] | None) -> dict[str, Any]:
    """The part of a row's meta that metrics read."""
    return {key: meta[key] for key in SCORING_META if key in (meta or {})}


def metric_stats(
    metric: str,
    preds: Sequence[Any],
    golds: Sequence[str],
    rel_tol: float = 0.01,
    metas: Sequence[dict[str, Any] | None] | None = None,
) -> np.ndarray:
    """One row of counts per example; `metric_from_sums` turns column sums into the metric.

    `preds` are parsed answers: label strings (or None) for accuracy and F1, entity
    lists (or [type, mention] pairs) for entity_f1, numbers or text for the numeric
    metrics, text for the others. `metas` are the rows' meta objects (see SCORING_META).
    """
    metas = list(metas) if metas is not None else [None] * len(golds)
    if metric == "accuracy":
        rows = [[float(p is not None and normalize_text(p) == normalize_text(g))] for p, g in zip(preds, golds)]
    elif metric == "exact_match":
        rows = [[float(exact_match(p, g, m))] for p, g, m in zip(preds, golds, metas)]
    elif metric == "rouge_l":
        rows = [[rouge_l(p, g)] for p, g in zip(preds, golds)]
    elif metric == "numeric_em":
        rows = [[float(numbers_match(_as_number(p), parse_number(g), rel_tol))] for p, g in zip(preds, golds)]
    elif metric in ("numeric_match", "numeric_match_scaled"):
        scaled = metric == "numeric_match_scaled"
        rows = [[float(numeric_match(p, g, m, rel_tol, scaled))] for p, g, m in zip(preds, golds, metas)]
    elif metric == "token_f1":
        rows = [[answer_f1(p, g, m, rel_tol)] for p, g, m in zip(preds, golds, metas)]
    elif metric == "entity_f1":
        rows = [entity_counts(p, g) for p, g in zip(preds, golds)]
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
    if metric in MEAN_METRICS:
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


def example_score(
    metric: str, pred: Any, gold: str, rel_tol: float = 0.01, meta: dict[str, Any] | None = None
) -> float:
    """The metric on a single example (macro-F1 reports correctness)."""
    if metric == "macro_f1":
        metric = "accuracy"
    return metric_value(metric, metric_stats(metric, [pred], [gold], rel_tol, [meta]))


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
