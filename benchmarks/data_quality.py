"""Data quality before and after the generation filters, side by side in one run.

Both variants write one round of the same number of prompts with the same model and seeds:
- `paper`: the paper's loop alone (demos of mixed task types, no grounding, no relevance,
  self-consistency or balance filters);
- `filtered`: selfspec's defaults plus grounding in a passage corpus (`--corpus`).
Each variant's kept rows are then measured the same way:
- on-domain share: relevance to the seeds (+ corpus) at or above the seeds' own 5th percentile;
- agreement share: rows with a short answer (at most 3 words) whose answer equals the
  majority of 5 answers sampled at temperature 0.7 (rows with longer answers are not counted);
- task-type mix: each row's nearest seed task type by embedding, against the seeds' mix.

    python benchmarks/data_quality.py --prompts 48 --corpus ../shared/data/biomedical/passages.jsonl
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter

import numpy as np

from selfspec.config import load_config
from selfspec.io import RunDir, read_parquet
from selfspec.metrics import normalize_text
from selfspec.models import SamplingParams, load_backend
from selfspec.quality import DomainRelevance, task_text
from selfspec.retrieval.index import encode, load_encoder
from selfspec.seeds import find_seed_file, load_seeds
from selfspec.stages.generate import run_generate
from selfspec.stages.generate_responses import RESPONSE_STOPS, build_response_messages

PAPER = [
    "generate.demos_by_task=false", "generate.min_relevance=null", "generate.consistency_samples=1",
    "generate.balance_labels=false", "retrieval.enabled=false",
]


def generate_variant(overrides: list[str], prompts: int, root: str) -> list[dict]:
    config = load_config("default", [f"runs_dir={root}", "generate.max_rounds=1", f"generate.prompts_per_round={prompts}",
                                     "generate.target=100000", *overrides])
    run_generate(config, RunDir(f"{root}/{config.name}"), executor="local")
    return read_parquet(f"{root}/{config.name}/data/examples.parquet")


def agreement(backend, rows: list[dict], seeds: list[dict]) -> tuple[int, int]:
    short = [r for r in rows if 0 < len(r["output"].split()) <= 3]
    if not short:
        return 0, 0
    messages = [build_response_messages(r["instruction"], r["input"], seeds[:3]) for r in short]
    samples = backend.generate(messages, SamplingParams(temperature=0.7, max_new_tokens=24, stop=RESPONSE_STOPS, seed=1, n=5))
    agree = 0
    for row, outs in zip(short, samples):
        votes = Counter(normalize_text(o.text) for o in outs)
        agree += votes.most_common(1)[0][0] == normalize_text(row["output"])
    return agree, len(short)


def nearest_types(encoder, rows: list[dict], seeds: list[dict]) -> Counter:
    types = sorted({s["task"] for s in seeds})
    vectors = encode(encoder, [task_text(s["instruction"], s["input"]) for s in seeds])
    centroids = np.stack([vectors[[s["task"] == t for s in seeds]].mean(axis=0) for t in types])
    if not rows:
        return Counter()
    scores = encode(encoder, [task_text(r["instruction"], r["input"]) for r in rows]) @ centroids.T
    return Counter(types[i] for i in scores.argmax(axis=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--seeds", default="seeds/biomedical.yaml")
    parser.add_argument("--corpus", default="builtin:biomedical")
    args = parser.parse_args()
    seeds = load_seeds(find_seed_file(args.seeds)).seeds
    filtered = [f"generate.seeds=[{args.seeds}]", "retrieval.enabled=true", "retrieval.passage_as_input=true",
                "retrieval.top_k=8", f"retrieval.corpus={args.corpus}"]
    results = {}
    with tempfile.TemporaryDirectory() as root:
        rows = {
            "paper": generate_variant([f"generate.seeds=[{args.seeds}]", *PAPER, "name=paper"], args.prompts, root),
            "filtered": generate_variant([*filtered, "name=filtered"], args.prompts, root),
        }
    encoder = load_encoder("embedded:all-minilm-l6-v2", "float32")
    relevance = DomainRelevance(encoder, seeds)
    backend = load_backend(load_config("default").model)
    seed_mix = Counter(s["task"] for s in seeds)
    for name, kept in rows.items():
        scores = relevance.scores([task_text(r["instruction"], r["input"]) for r in kept])
        agree, short = agreement(backend, kept, seeds)
        results[name] = {
            "rows": len(kept),
            "on_domain": round(float(np.mean([s >= relevance.threshold for s in scores])), 3) if kept else None,
            "short_answers": short,
            "agreement": round(agree / short, 3) if short else None,
            "task_mix": dict(nearest_types(encoder, kept, seeds).most_common()),
        }
    print(f"prompts per variant: {args.prompts}; seeds: {args.seeds}; corpus (filtered): {args.corpus}")
    print(f"{'variant':10} {'rows':>5} {'on-domain':>10} {'agreement':>10} {'(short)':>8}  task mix (nearest seed type)")
    for name, r in results.items():
        mix = ", ".join(f"{t} {n}" for t, n in r["task_mix"].items())
        print(f"{name:10} {r['rows']:>5} {str(r['on_domain']):>10} {str(r['agreement']):>10} {r['short_answers']:>8}  {mix}")
    print("seeds' mix: " + ", ".join(f"{t} {n}" for t, n in seed_mix.most_common()))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
