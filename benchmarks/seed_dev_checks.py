"""Dev checks on the seeds alone (never an evaluation task's rows): the numbers behind the
1k configs' sampling choices and behind self-specialization's premise.

1. Instructions for a given input, leave-one-out: each seed that has an input gets a
   prompt with 3 other seeds of its task type and its own input; the model writes the
   instruction. ROUGE-L against the seed's real instruction, per sampling setting: how
   often the model writes the task the seeds mean, not a drifting one.
2. Answers, leave-one-out: each seed answered 0-shot and with k seed demos of its type;
   set F1 of the answer (split on ';') against the seed's output. Few-shot far above
   zero-shot is what the adapter can learn from the model's own demos-guided answers.

3. With --adapter DIR: the same answers 0-shot through a trained adapter (did it learn
   the seeds' tasks?), and --skip-instructions leaves out check 1.
4. With --labels: how the label of a label task is best read from the model, leave-one-out
   on the seeds whose type has a label set (k seed demos of the type): sampled answers'
   majority (self-consistency, as generation labels today), log-likelihood over the label
   set, and log-likelihood calibrated by a content-free input ("N/A", Zhao et al. 2021:
   each label's score minus its score when the input says nothing). Accuracy against the
   seed's own label and the labels each method gives. With --nearest also (4b) with the
   nearest seeds of the type as demos, and the encoder's nearest seeds' vote alone.

Usage: python benchmarks/seed_dev_checks.py [--seeds seeds/biomedical.yaml] [--model embedded:smollm2-135m-instruct]
           [--adapter RUN/adapters/NAME] [--skip-instructions]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from selfspec.config import ModelConfig  # noqa: E402
from selfspec.dedup import rouge_l, rouge_tokens  # noqa: E402
from selfspec.metrics import gold_entities  # noqa: E402
from selfspec.models import SamplingParams, load_backend  # noqa: E402
from selfspec.quality import answer_label, label_task, majority_label, task_profiles  # noqa: E402
from selfspec.seeds import find_seed_file, load_seeds  # noqa: E402
from selfspec.stages.generate import best_label, label_scores  # noqa: E402
from selfspec.stages.generate_instructions import build_prompt  # noqa: E402
from selfspec.stages.generate_responses import RESPONSE_STOPS, build_response_messages  # noqa: E402

SETTINGS = [(1.0, 0.98), (0.7, 0.9), (0.3, 0.9), (0.0, 1.0)]


def others_of_type(seeds: list[dict], seed: dict, k: int) -> list[dict]:
    pool = [s for s in seeds if s["task"] == seed["task"] and s["id"] != seed["id"]]
    return random.Random(seed["id"]).sample(pool, min(k, len(pool)))


def set_f1(answer: str, reference: str) -> float:
    a, b = gold_entities(answer), gold_entities(reference)
    if not a and not b:
        return 1.0
    hits = len(a & b)
    return 2 * hits / (len(a) + len(b)) if hits else 0.0


def by_task(seeds: list[dict], scores: list[float]) -> dict[str, float]:
    groups: dict[str, list[float]] = defaultdict(list)
    for seed, score in zip(seeds, scores):
        groups[seed["task"]].append(score)
    return {task: sum(v) / len(v) for task, v in groups.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="seeds/biomedical.yaml")
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--demos", type=int, default=3)
    parser.add_argument("--adapter", help="a trained adapter directory: also answer 0-shot through it")
    parser.add_argument("--skip-instructions", action="store_true", help="leave out check 1")
    parser.add_argument("--skip-answers", action="store_true", help="leave out checks 2 and 3")
    parser.add_argument("--labels", action="store_true", help="run check 4")
    parser.add_argument("--nearest", action="store_true", help="check 4 also with the nearest seeds as demos")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    seed_set = load_seeds(find_seed_file(args.seeds))
    seeds = seed_set.seeds
    adapters = {"adapter": args.adapter} if args.adapter else None
    backend = load_backend(ModelConfig(ref=args.model, backend="transformers"), adapters)
    print(f"seed dev checks: {args.seeds} ({len(seeds)} seeds), model {args.model}")

    if not args.skip_instructions:
        check_instructions(backend, seed_set, args.demos)
    if not args.skip_answers:
        check_answers(backend, seeds, args.demos, adapter="adapter" if args.adapter else None)
    if args.labels:
        check_labels(backend, seeds, args.demos)
    if args.labels and args.nearest:
        check_nearest_labels(backend, seeds, args.demos)
    return 0


def check_instructions(backend, seed_set, demos: int) -> None:
    seeds = seed_set.seeds
    grounded = [s for s in seeds if s["input"]]
    prompts = [
        build_prompt(seed_set.domain, seed_set.description, others_of_type(seeds, s, demos), new_input=s["input"])
        for s in grounded
    ]
    print(f"\n1. instruction for a given input ({len(grounded)} seeds): ROUGE-L with the seed's own instruction")
    for temperature, top_p in SETTINGS:
        started = time.perf_counter()
        params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=64, stop=("\n",), seed=0)
        outputs = backend.generate(prompts, params)
        scores = [rouge_l(rouge_tokens(o[0].text), rouge_tokens(s["instruction"])) for s, o in zip(grounded, outputs)]
        per_task = " ".join(f"{t}={v:.2f}" for t, v in by_task(grounded, scores).items())
        print(f"  temperature {temperature:.1f} top_p {top_p:.2f}: mean {sum(scores) / len(scores):.3f} "
              f"({time.perf_counter() - started:.0f}s)  {per_task}")


def check_answers(backend, seeds: list[dict], demos: int, adapter: str | None) -> None:
    print(f"\n2. answers, set F1 against the seed's output ({len(seeds)} seeds)")
    params = SamplingParams(temperature=0.0, max_new_tokens=64, stop=("\n\n",))
    runs = [(0, None), (demos, None)] + ([(0, adapter)] if adapter else [])
    for k, name in runs:
        messages = [build_response_messages(s["instruction"], s["input"], others_of_type(seeds, s, k)) for s in seeds]
        outputs = backend.generate(messages, params, name)
        scores = [set_f1(o[0].text.strip(), s["output"]) for s, o in zip(seeds, outputs)]
        per_task = " ".join(f"{t}={v:.2f}" for t, v in by_task(seeds, scores).items())
        print(f"  {k}-shot{' through the adapter' if name else ''}: mean {sum(scores) / len(scores):.3f}  {per_task}")


def labelled_seeds(seeds: list[dict]) -> list[tuple[dict, object]]:
    """(seed, its type's profile) for each seed of a label type whose answer names a label."""
    profiles = task_profiles(seeds)
    return [(s, p) for s in seeds if (p := label_task(profiles, s["task"])) and answer_label(s["output"], p)]


def check_labels(backend, seeds: list[dict], demos: int, samples: int = 5, agreement: float = 0.6) -> None:
    rows = labelled_seeds(seeds)
    print(f"\n4. labels, leave-one-out on {len(rows)} seeds of {len({s['task'] for s, _ in rows})} label types, {demos} demos")
    messages = [build_response_messages(s["instruction"], s["input"], others_of_type(seeds, s, demos)) for s, _ in rows]
    gold = [answer_label(s["output"], p) for s, p in rows]
    started = time.perf_counter()
    params = SamplingParams(temperature=0.7, max_new_tokens=24, stop=RESPONSE_STOPS, seed=0, n=samples)
    sampled = [majority_label([c.text for c in out], p, agreement)[0] for out, (_, p) in
               zip(backend.generate(messages, params), rows)]
    greedy = [answer_label(out[0].text, p) for out, (_, p) in
              zip(backend.generate(messages, SamplingParams(max_new_tokens=24, stop=RESPONSE_STOPS)), rows)]
    own, empty = label_scores(backend, [{"instruction": s["instruction"], "messages": m, "labels": list(p.labels)}
                                        for m, (s, p) in zip(messages, rows)], None)
    loglik = [best_label(p.labels, o) for (_, p), o in zip(rows, own)]
    calibrated = [best_label(p.labels, [a - b for a, b in zip(o, e)]) for (_, p), o, e in zip(rows, own, empty)]
    print(f"  ({time.perf_counter() - started:.0f}s)  gold labels: {dict(Counter(gold))}")
    for name, got in (("sampled majority", sampled), ("greedy", greedy), ("log-likelihood", loglik),
                      ("calibrated log-likelihood", calibrated)):
        hits = [g == y for g, y in zip(got, gold)]
        per_task = by_task([s for s, _ in rows], [float(h) for h in hits])
        print(f"  {name:27s}: accuracy {sum(hits) / len(hits):.3f}  "
              + " ".join(f"{t}={v:.2f}" for t, v in per_task.items())
              + f"  labels {dict(Counter(str(g) for g in got))}")


def check_nearest_labels(backend, seeds: list[dict], demos: int, encoder: str = "embedded:all-minilm-l6-v2") -> None:
    """Check 4 with demos chosen by similarity (Liu et al. 2022): the k seeds of the type whose
    inputs are nearest the seed's own (retrieval's encoder), nearest last; and the encoder
    alone as a labeller, the majority label of the k nearest seeds sharing the label set."""
    from selfspec.retrieval.index import encode, load_encoder

    rows = labelled_seeds(seeds)
    gold = [answer_label(s["output"], p) for s, p in rows]
    vectors = encode(load_encoder(encoder, "float32"), [s["input"] or s["instruction"] for s, _ in rows])
    similarity = vectors @ vectors.T

    def nearest(i: int, same_type: bool) -> list[int]:
        s, p = rows[i]
        pool = [j for j in range(len(rows)) if j != i
                and (rows[j][0]["task"] == s["task"] if same_type else rows[j][1].labels == p.labels)]
        return sorted(pool, key=lambda j: -similarity[i, j])[:demos]

    print(f"\n4b. labels with the {demos} nearest seeds of the type as demos ({encoder})")
    messages = [build_response_messages(s["instruction"], s["input"], [rows[j][0] for j in nearest(i, True)][::-1])
                for i, (s, _) in enumerate(rows)]
    own, empty = label_scores(backend, [{"instruction": s["instruction"], "messages": m, "labels": list(p.labels)}
                                        for m, (s, p) in zip(messages, rows)], None)
    knn = [Counter(gold[j] for j in nearest(i, False)).most_common(1)[0][0] for i in range(len(rows))]
    for name, got in (
        ("log-likelihood", [best_label(p.labels, o) for (_, p), o in zip(rows, own)]),
        ("calibrated log-likelihood", [best_label(p.labels, [a - b for a, b in zip(o, e)]) for (_, p), o, e in zip(rows, own, empty)]),
        (f"encoder {demos}-NN vote", knn),
    ):
        hits = [g == y for g, y in zip(got, gold)]
        per_task = by_task([s for s, _ in rows], [float(h) for h in hits])
        print(f"  {name:27s}: accuracy {sum(hits) / len(hits):.3f}  " + " ".join(f"{t}={v:.2f}" for t, v in per_task.items()))


if __name__ == "__main__":
    sys.exit(main())
