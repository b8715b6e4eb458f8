"""Data generation: parsing, filters, dedup, a real run on Ray Data, and resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from itertools import combinations
from pathlib import Path

import pytest

from selfspec.config import load_config
from selfspec.dedup import RougeDeduper, rouge_l, rouge_tokens
from selfspec.io import RunDir, read_json, read_parquet
from selfspec.quality import task_profiles
from selfspec.seeds import find_seed_file, load_seeds
from selfspec.stages.generate_instructions import build_prompt, instruction_drop_reason, parse_tasks
from selfspec.stages.generate_responses import collapse_repeated_items, ground_list_items, is_degenerate, response_drop_reason

BLACKLIST = load_config("default").generate.blacklist


def test_prompt_ends_in_an_open_numbered_slot():
    demos = [{"id": "a", "task": "t", "instruction": "List the genes.", "input": "BRCA1 and TP53.", "output": "x"}]
    prompt = build_prompt("biomedical", "Biomedicine.", demos)
    assert prompt.startswith("Biomedicine.") and prompt.endswith("2. Instruction:")
    assert "1. Instruction: List the genes.\nInput: BRCA1 and TP53." in prompt


def test_parse_numbered_items_inputs_and_truncation():
    text = " Name the drug class of metformin.\nInput: <noinput>\n\n5. Instruction: Classify the abstract.\nInput: Aspirin lowers risk.\nOutput: yes\n\n6. Instruction: Summarize the"
    items = parse_tasks(text, truncated=True)
    assert [i["instruction"] for i in items] == ["Name the drug class of metformin.", "Classify the abstract.", "Summarize the"]
    assert [i["input"] for i in items[:2]] == ["", "Aspirin lowers risk."]
    assert [i["error"] for i in items] == [None, None, "truncated"]
    assert parse_tasks("   \n", truncated=False)[0]["error"] == "unparseable"
    # A cut completion whose only item already reached its output line lost nothing.
    finished = parse_tasks(" List the genes.\nInput: BRCA1 and TP53 were mutated.\nOutput: BRCA1; TP53\nThe", truncated=True)
    assert [(i["instruction"], i["input"], i["error"]) for i in finished] == [("List the genes.", "BRCA1 and TP53 were mutated.", None)]


@pytest.mark.parametrize(
    "instruction, input, reason",
    [
        ("List genes.", "", "too_short"),
        ("Describe the image of the tumour cells in detail please.", "", "blacklisted"),
        ("Plot the dose response curve for the drug.", "", "blacklisted"),
        ("Summarize " + "very " * 150 + "long text.", "", "too_long"),
        ("- List every disease named in this sentence.", "", "unusable"),
        ("Write a program that parses gene names.", "", "unusable"),
        ("List every  disease named in the sentence.", "list every disease\nnamed in the sentence.", "unusable"),
        ("List every disease named in the sentence.", "Asthma and gout were present.", None),
    ],
)
def test_instruction_filters_give_a_reason(instruction, input, reason):
    assert instruction_drop_reason(instruction, input, 4, 150, BLACKLIST) == reason


def test_response_filters():
    assert response_drop_reason("", "stop") == "empty_response"
    assert response_drop_reason("The answer is yes.", "length") == "truncated_response"
    passage = "IJC tolerance in skin injury found in non human primates."
    assert response_drop_reason(passage.upper() + "\n", "stop", passage) == "copied_input"
    assert response_drop_reason("No.", "stop", passage) is None
    assert is_degenerate("the drug the drug the drug the drug the drug the drug the drug the drug")
    assert response_drop_reason("Metformin is a biguanide that lowers hepatic glucose output.", "stop") is None


def test_an_answer_that_repeats_a_seed_answer_of_its_type_is_dropped():
    """A pretrained base copies its demos' answers: Gemma 3 270M answered 18 of 81 longer
    biomedical rows with a seed's answer, word for word, on a passage of their own."""
    from selfspec.quality import task_profiles
    from selfspec.stages.generate import Drops, answer_rows

    seeds = load_seeds("seeds/biomedical.yaml").seeds
    summary = next(s for s in seeds if s["task"] == "summarization")
    seed_answers: dict[str, list[list[str]]] = {}
    for seed in seeds:
        seed_answers.setdefault(seed["task"], []).append(rouge_tokens(seed["output"]))
    passage = "Deficiency of the ninth component of human complement (C9) is common in Japan."

    def row(n: int, task: str, output: str) -> dict:
        return {
            "id": f"r{n}", "task": task, "instruction": "Summarize the abstract in one sentence.", "input": passage,
            "domain": "biomedical", "seed_ids": [], "passage_ids": [], "model": "m", "adapter": "", "round": 1,
            "config_hash": "h", "output": output, "samples": [output], "finish_reason": "stop", "completion_tokens": 9,
        }

    gen = load_config("default").generate
    answered = [
        row(0, "summarization", summary["output"]),
        row(1, "summarization", summary["output"].rstrip(".") + " in most patients."),
        row(2, "summarization", "C9 deficiency is the most common complement deficiency in Japan."),
        row(3, "open_qa", summary["output"]),  # another type's seed answer: not this filter's call
    ]
    drops = Drops()
    examples, _ = answer_rows(answered, task_profiles(seeds), gen, drops, seed_answers)
    assert [e["id"] for e in examples] == ["r2", "r3"]
    assert drops == {"copied_seed_answer": 2}
    assert drops.by_task == {"summarization": {"copied_seed_answer": 2}}
    assert answer_rows(answered, task_profiles(seeds), gen, Drops())[0][0]["id"] == "r0"  # no seed answers given


def test_a_short_figure_copied_from_a_demo_is_dropped_where_its_input_lacks_it():
    """A figure that is a seed answer word for word and appears nowhere in the row's input was
    read off a demo; the same figure in the row's own input, and short words, stay."""

    from selfspec.dedup import rouge_tokens
    from selfspec.quality import task_profiles
    from selfspec.seeds import load_seeds
    from selfspec.stages.generate import Drops, answer_rows

    seeds = load_seeds("seeds/finance.yaml").seeds
    seed_answers: dict[str, list[list[str]]] = {}
    for seed in seeds:
        seed_answers.setdefault(seed["task"], []).append(rouge_tokens(seed["output"]))
    copied = next(s["output"] for s in seeds if s["task"] == "table_qa" and s["output"] == "181.4")
    news = "Unocal said net natural gas output averaged 976 mln cubic feet per day in 1986, down 10 pct."

    def row(n: int, output: str, input: str = news, task: str = "table_qa") -> dict:
        return {
            "id": f"r{n}", "task": task, "instruction": "Give only the answer.", "input": input,
            "domain": "finance", "seed_ids": [], "passage_ids": [], "model": "m", "adapter": "", "round": 1,
            "config_hash": "h", "output": output, "samples": [output], "finish_reason": "stop", "completion_tokens": 3,
        }

    answered = [
        row(0, copied),  # a demo's figure on a passage without it
        row(1, copied, input=news + " Gross profit was 181.4 million."),  # the row's own figure
        row(2, "976 mln"),  # read from its own input
        row(3, "Unocal"),  # a short name: never judged a copy
        row(4, copied, task="open_qa"),  # not a seed answer of this type
    ]
    drops = Drops()
    examples, _ = answer_rows(answered, task_profiles(seeds), load_config("default").generate, drops, seed_answers)
    assert [e["id"] for e in examples] == ["r1", "r2", "r3", "r4"]
    assert drops == {"copied_seed_answer": 1}


def test_a_task_without_input_is_dropped_where_every_seed_of_its_type_has_one():

    from selfspec.quality import task_profiles
    from selfspec.stages.generate import Drops, parse_round

    seeds = load_seeds("seeds/biomedical.yaml").seeds
    profiles = task_profiles(seeds)
    assert profiles["chemical_protein_relation"].input_required and not profiles["open_qa"].input_required
    marked = "<< Aspirin >> irreversibly inhibits [[ cyclooxygenase-1 ]] in platelets."

    def raw(task: str, completion: str) -> dict:
        return {"task": task, "completion": completion, "finish_reason": "stop", "given_input": ""}

    rows = [
        raw("chemical_protein_relation", " Name the relation between the marked chemical and protein.\nOutput: x"),
        raw("chemical_protein_relation", f" Name the relation between the marked chemical and protein.\nInput: {marked}\nOutput: x"),
        raw("open_qa", " Which enzyme does aspirin inhibit irreversibly in platelets?\nOutput: x"),
    ]
    gen = load_config("default").generate
    drops = Drops()
    items = parse_round(rows, gen, drops, profiles)
    assert [(i["row"]["task"], i["input"]) for i in items] == [("chemical_protein_relation", marked), ("open_qa", "")]
    assert drops == {"missing_input": 1}
    assert drops.by_task == {"chemical_protein_relation": {"missing_input": 1}}
    assert len(parse_round(rows, gen, Drops())) == 3  # no profiles: no type to compare with


def test_seed_inputs_in_labelled_fields_are_known_and_their_open_field_is_parsed():
    from selfspec.quality import input_fields, task_profiles
    from selfspec.stages.generate_instructions import parse_open_field

    profiles = task_profiles(load_seeds("seeds/biomedical.yaml").seeds)
    assert profiles["yes_no_qa"].input_fields == ("Abstract", "Question")
    assert profiles["drug_drug_interaction"].input_fields == ("Sentence", "Drug 1", "Drug 2")
    assert profiles["disease_ner"].input_fields == () == profiles["open_qa"].input_fields
    assert input_fields(["Headline: A\nEntity: B", "Headline: C"]) == ()  # not the same fields in every seed
    given = "Abstract: Serum urate fell by 40% in the treated arm."
    item = parse_open_field(" Did treatment lower serum urate?\nInstruction: Answer yes, no or maybe.", given, "Question", False)
    assert item == {"instruction": "Answer yes, no or maybe.", "error": None, "position": 0,
                    "input": f"{given}\nQuestion: Did treatment lower serum urate?"}
    assert parse_open_field(" Did treatment lower serum urate?\nInstr", given, "Question", True)["error"] == "truncated"
    assert parse_open_field(" Did treatment lower serum urate?", given, "Question", False)["error"] == "unparseable"
    assert parse_open_field("\nInstruction: Answer yes or no.", given, "Question", False)["error"] == "unparseable"
    # A new numbered item is another task, not this one's instruction.
    assert parse_open_field(" Is it safe?\n4. Instruction: Name the drug.", given, "Question", False)["error"] == "unparseable"


def test_list_answers_that_loop_are_cut_to_their_distinct_items():
    looped = "duchenne muscular dystrophy; myotonic dystrophy; Myotonic dystrophy; myotonic dystrophy; myoto"
    assert collapse_repeated_items(looped, truncated=True) == "duchenne muscular dystrophy; myotonic dystrophy"
    typed = "Chemicals: cisplatin; cisplatin\nDiseases: nephrotoxicity; nephrotoxicity; nephro"
    assert collapse_repeated_items(typed, truncated=True) == "Chemicals: cisplatin\nDiseases: nephrotoxicity"
    # Lists without a repeat, and prose, are left to the other filters.
    assert collapse_repeated_items("BRCA1; BRCA2", truncated=False) is None
    assert collapse_repeated_items("The patient was treated with cisplatin and", truncated=True) is None


def test_list_items_the_input_does_not_contain_are_removed():
    sentence = "Serum lithium rose after enalapril was added, and the patient developed nephrogenic Diabetes Insipidus."
    assert ground_list_items("lithium; Enalapril; warfarin", sentence) == ("lithium; Enalapril", 1)
    typed = "Chemicals: lithium; enalapril\nDiseases: tardive dyskinesia"
    assert ground_list_items(typed, sentence) == ("Chemicals: lithium; enalapril\nDiseases: none", 1)
    assert ground_list_items("none", sentence) == ("none", 0)  # an empty list is an answer
    assert ground_list_items("warfarin; aspirin", sentence) == ("", 2)  # nothing it listed is there
    # A template written back: its letters are in every sentence, but not as mentions.
    template = "Chemicals: a; b\nDiseases: c; d"
    assert ground_list_items(template, sentence) == ("", 4)
    assert ground_list_items("lithium; ium; a", sentence) == ("lithium", 2)


def test_every_list_seed_is_grounded_in_its_own_input():
    """The seeds, which a person wrote, pass the filter unchanged: it drops only what a
    person would not have written."""
    from selfspec.quality import task_profiles
    from selfspec.seeds import load_seeds

    for path in ("seeds/biomedical.yaml", "seeds/finance.yaml"):
        seeds = load_seeds(path).seeds
        profiles = task_profiles(seeds)
        listed = [s for s in seeds if profiles[s["task"]].list_answers and s["input"]]
        assert len(listed) >= 9
        for seed in listed:
            assert ground_list_items(seed["output"], seed["input"]) == (seed["output"], 0), seed["id"]


def test_seed_types_answering_in_lists_are_known_from_the_seeds():
    from selfspec.quality import task_profiles
    from selfspec.seeds import load_seeds

    profiles = task_profiles(load_seeds("seeds/biomedical.yaml").seeds)
    assert {t for t, p in profiles.items() if p.list_answers} == {"disease_ner", "chemical_ner", "gene_ner", "chemical_disease_ner"}


def test_dedup_matches_brute_force_rouge_l():
    import random

    rng = random.Random(0)
    words = "the a of gene drug dose patient list classify risk protein cancer answer entity".split()
    texts = [" ".join(rng.choices(words, k=rng.randint(4, 12))) for _ in range(300)]
    texts += [t + " now" for t in texts[:50]]
    dedup = RougeDeduper(0.7)
    got = [keep for keep, _ in dedup.filter(texts)]
    kept: list[list[str]] = []
    expected = []
    for text in texts:
        toks = rouge_tokens(text)
        ok = all(rouge_l(k, toks) <= 0.7 for k in kept)
        expected.append(ok)
        if ok:
            kept.append(toks)
    assert got == expected
    assert dedup.exact_comparisons < len(texts) * len(texts) / 20  # the bound prunes most pairs


def tiny_config(tmp_path: Path, *extra: str):
    return load_config(
        "default",
        [
            f"runs_dir={tmp_path}",
            "name=gen",
            "generate.target=4",
            "generate.prompts_per_round=12",  # two batches a round; the embedded model keeps 1-3
            "generate.temperature=0.7",  # as the shipped configs: fewer instructions run past the limit
            "generate.batch_size=6",
            "generate.instruction_max_new_tokens=96",
            "generate.response_max_new_tokens=96",
            *extra,
        ],
    )


def assert_no_near_duplicates(rows):
    tokens = [rouge_tokens(r["instruction"]) for r in rows]
    assert all(rouge_l(a, b) <= 0.7 for a, b in combinations(tokens, 2))


def test_generation_on_ray_data_writes_examples_with_provenance(tmp_path, ray_local):
    from collections import Counter

    from selfspec.quality import majority_seed_label
    from selfspec.stages.generate import format_summary, run_generate

    config = tiny_config(tmp_path)
    summary = run_generate(config, RunDir(str(tmp_path / "gen")), executor="ray")
    rows = read_parquet(tmp_path / "gen" / "data" / "examples.parquet")
    assert len(rows) == 4 == summary["counts"]["final_examples"]
    assert len({r["id"] for r in rows}) == 4
    assert all(r["seed_ids"] and r["model"] == config.model.ref and r["round"] >= 1 for r in rows)
    assert_no_near_duplicates(rows)
    counts = summary["counts"]
    drops = sum(summary["drops"]["instruction"].values())
    assert counts["raw_instructions"] == counts["kept_instructions"] + drops
    by_task = summary["yield_by_task"]  # per task type, summing to the round totals
    for stage in ("prompts", "kept_instructions", "examples"):
        assert sum(v[stage] for v in by_task.values()) == counts[stage]
    assert "yield by task type" in format_summary(summary) or len(by_task) == 1
    # Drops per task type add up to the drops by reason of both filters.
    reasons = Counter(summary["drops"]["instruction"]) + Counter(summary["drops"]["response"])
    per_type = sum((Counter(r) for r in summary["drops_by_task"].values()), Counter())
    assert per_type == reasons and set(summary["drops_by_task"]) <= set(by_task)
    alpaca = [json.loads(line) for line in (tmp_path / "gen" / "data" / "alpaca.jsonl").read_text().splitlines()]
    chat = [json.loads(line) for line in (tmp_path / "gen" / "data" / "chat.jsonl").read_text().splitlines()]
    assert [a["instruction"] for a in alpaca] == [r["instruction"] for r in rows]
    assert chat[0]["messages"][1] == {"role": "assistant", "content": rows[0]["output"]}
    assert (tmp_path / "gen" / "config.yaml").exists()
    # The label check ran on every seed of each label type; rows of a type it found unreliable
    # carry the seeds' majority label.
    checked = summary["label_check"]
    profiles = task_profiles(load_seeds(find_seed_file(config.generate.seeds[0])).seeds)
    label_types = {t for t, p in profiles.items() if p.labelled}
    assert set(checked) == label_types and all(r["seeds"] >= 2 for r in checked.values())
    unreliable = {t for t, r in checked.items() if not r["reliable"]}
    relabelled = {t for t in unreliable if "majority_label" in checked[t]}
    for task in relabelled:
        assert {r["output"] for r in rows if r["task"] == task} <= {checked[task]["majority_label"]}
        assert checked[task]["relabelled"] == sum(r["task"] == task for r in rows)
    # A type whose seeds tie for the most common label has no majority to give: no rows.
    for task in unreliable - relabelled:
        assert majority_seed_label(profiles[task]) is None and not any(r["task"] == task for r in rows)
    # Rows of relabelled types are answered with that label directly: the model never labels them.
    assert counts.get("fixed_label", 0) == sum(by_task.get(t, {}).get("kept_instructions", 0) for t in relabelled)
    assert counts.get("fixed_label", 0) >= sum(checked[t]["relabelled"] for t in relabelled)
    if unreliable == label_types:
        assert counts["labelled"] == 0
    assert "label check on the seeds" in format_summary(summary)

    # A rerun with the same config finds everything done and generates nothing.
    again = run_generate(config, RunDir(str(tmp_path / "gen")), executor="local")
    assert again["rounds_resumed"] == again["rounds"] == summary["rounds"]

    # A new target reselects from the same shards: no refusal, no new round.
    fewer = run_generate(tiny_config(tmp_path, "generate.target=2"), RunDir(str(tmp_path / "gen")), executor="local")
    assert fewer["rounds_resumed"] == fewer["rounds"] == summary["rounds"]
    reselected = read_parquet(tmp_path / "gen" / "data" / "examples.parquet")
    assert len(reselected) == 2 and {r["id"] for r in reselected} <= {r["id"] for r in rows}


def test_changed_config_is_refused_without_overwrite(tmp_path):
    from selfspec.config import ConfigError
    from selfspec.stages.generate import read_manifest

    run_dir = RunDir(str(tmp_path))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text(json.dumps({"config_hash": "aaa", "shards": [{"round": 1}]}))
    with pytest.raises(ConfigError, match="another config"):
        read_manifest(run_dir, "bbb", overwrite=False)
    assert read_manifest(run_dir, "bbb", overwrite=True)["shards"] == []


def test_contamination_check_flags_overlapping_examples(tmp_path):
    from selfspec.contamination import check_contamination

    task = tmp_path / "task"
    task.mkdir()
    passage = "metformin lowers hepatic glucose production and improves insulin sensitivity in patients with type two diabetes"
    (task / "test.jsonl").write_text(json.dumps({"id": "t1", "input": passage, "output": "yes"}) + "\n")
    examples = [
        {"id": "e1", "instruction": "Answer the question.", "input": passage, "output": "yes"},
        {"id": "e2", "instruction": "Name a gene.", "input": "", "output": "BRCA1"},
    ]
    report, flagged = check_contamination(examples, [str(tmp_path)], n=13)
    assert flagged == {"e1"} and report["tasks"]["task"] == {"examples_flagged": 1, "task_items_matched": 1}


def _shards(data: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in sorted((data / "shards").glob("*.parquet"))}


@pytest.mark.slow
def test_sigkill_midway_then_rerun_finishes_without_loss_or_duplicates(tmp_path):
    args = [
        sys.executable, "-m", "selfspec.cli", "generate", f"runs_dir={tmp_path}", "name=kill",
        "generate.target=8", "generate.prompts_per_round=6", "generate.batch_size=6",
        "generate.response_max_new_tokens=96",
    ]
    env = {**os.environ, "SELFSPEC_EXECUTOR": "local"}
    data = tmp_path / "kill" / "data"
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 900
    # The manifest is written before round 1 (the label check): wait for round 1's shard.
    while time.time() < deadline and not _shards(data) and proc.poll() is None:
        time.sleep(0.5)
    assert proc.poll() is None, "generation finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _shards(data)
    assert before and not (data / "examples.parquet").exists()
    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=1500)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    after = _shards(data)
    assert all(after[name] == mtime for name, mtime in before.items())  # finished shards kept as they were
    rows = read_parquet(data / "examples.parquet")
    assert len(rows) == 8 and len({r["id"] for r in rows}) == 8
    summary = read_json(data / "summary.json")
    assert summary["rounds_resumed"] == len(before)


def test_first_round_is_sized_by_the_expected_yield_then_by_the_measured_one():
    from selfspec.stages.generate import prompts_for_round

    gen = load_config("default", ["generate.expected_yield=0.4"]).generate
    assert prompts_for_round(gen, 48, []) == 132  # 48 / 0.4 * 1.1
    shards = [{"counts": {"prompts": 100, "examples": 25}}]
    assert prompts_for_round(gen, 10, shards) == 44  # 10 / 0.25 * 1.1
    assert prompts_for_round(gen, 1, shards) == gen.batch_size * gen.replicas  # never below one batch per replica
    # Rows removed as contaminated or for balance do not count: the yield is what counts.
    assert prompts_for_round(gen, 10, shards, made=40) == 28  # 10 / 0.4 * 1.1
    # A first round for half the target measures the yield before the rest is sized.
    half = load_config("default", ["generate.expected_yield=0.4", "generate.first_round_share=0.5"]).generate
    assert prompts_for_round(half, 1000, []) == 1375  # 500 / 0.4 * 1.1
    assert prompts_for_round(half, 10, shards) == 44  # later rounds: the measured yield, as before


def test_a_round_weighted_toward_low_yield_types_is_sized_by_their_own_yields():
    """Deficit types get most of a later round's prompts, and they are the ones the model
    completes least: the pooled yield would ask too few prompts and force another round."""
    from selfspec.stages.generate import prompts_for_round

    gen = load_config("default").generate
    shards = [{
        "counts": {"prompts": 200, "examples": 100},
        "yield_by_task": {"easy": {"prompts": 100, "examples": 80}, "hard": {"prompts": 100, "examples": 20}},
    }]
    assert prompts_for_round(gen, 20, shards) == 44  # pooled: 20 / 0.5 * 1.1
    assert prompts_for_round(gen, 20, shards, weights={"easy": 0.5, "hard": 0.5}) == 44  # the same mix
    assert prompts_for_round(gen, 20, shards, weights={"easy": 0.25, "hard": 0.75}) == 63  # 20 / 0.35 * 1.1
    # Rows later removed scale every type's yield; a type never prompted counts at the pooled yield.
    assert prompts_for_round(gen, 20, shards, made=50, weights={"easy": 0.25, "hard": 0.75}) == 126  # / 0.175
    assert prompts_for_round(gen, 20, shards, weights={"easy": 0.5, "new": 0.5}) == 34  # 20 / 0.65 * 1.1


def test_tasks_over_given_passages_collide_only_on_the_same_passage():
    from selfspec.dedup import InputScopedDeduper

    ner = "List every disease mentioned in the abstract, separated by semicolons."
    first = "Hereditary hemochromatosis is an iron overload disorder caused by HFE mutations."
    second = "Wilson disease is an autosomal recessive disorder of copper accumulation in the liver."
    dedup = InputScopedDeduper(0.7)
    dedup.add([(ner, first)])
    verdicts = [keep for keep, _ in dedup.filter([
        (ner, second),  # the same task on a new passage: a new instance
        ("Summarize the findings of the abstract in one sentence.", first),  # another task, same passage
        ("List every disease mentioned in this abstract, separated by semicolons.", first),  # a copy
        ("Summarize the findings of this abstract in one sentence.", first),  # a copy of one kept just now
    ])]
    assert verdicts == [True, True, False, False]


def test_calibrated_labels_are_each_labels_score_less_its_content_free_score(backend):
    from selfspec.stages.generate import CONTENT_FREE_INPUT, score_labels
    from selfspec.stages.generate_responses import build_response_messages

    demo = {"instruction": "Classify the sentiment of the sentence.", "input": "Profit fell by half.", "output": "negative"}
    rows = [
        {"id": "a", "instruction": "Classify the sentiment of the sentence.", "input": "Sales rose 20% to a record.",
         "labels": ["positive", "negative", "neutral"]},
        {"id": "b", "instruction": "Does the sentence report a loss?", "input": "The firm lost EUR 3 million.",
         "labels": ["yes", "no"]},
    ]
    for row in rows:
        row["messages"] = build_response_messages(row["instruction"], row["input"], [demo])
    scored = score_labels(backend, rows, None)
    for row, out in zip(rows, scored):
        blank = build_response_messages(row["instruction"], CONTENT_FREE_INPUT, [demo])
        own = backend.loglikelihood([(row["messages"], label) for label in row["labels"]])
        empty = backend.loglikelihood([(blank, label) for label in row["labels"]])
        best = max(range(len(own)), key=lambda i: own[i] - empty[i])
        assert out["output"] == row["labels"][best] and out["samples"] == [out["output"]]
        assert out["id"] == row["id"] and "messages" not in out and "labels" not in out


def test_one_model_pass_serves_every_kind_of_row(backend):
    """A round's instruction prompts of every kind (free, over a given passage) go through
    one pass, each kind with its own sampling; label and response rows likewise. Each row
    gets what a pass of its kind alone gives it (greedy), in the order given."""
    import functools

    from selfspec.models import SamplingParams
    from selfspec.stages.generate import answer_batch, score_labels, write_instructions, write_responses
    from selfspec.stages.generate_responses import build_response_messages

    prompts = ["1. Instruction: Name a symptom of influenza.\n2. Instruction:",
               "Input: Aspirin irreversibly inhibits COX-1.\nInstruction:",
               "1. Instruction: Define hypertension.\n2. Instruction:"]
    rows = [{"prompt_id": f"r1-p{i}", "prompt": p, "sampling": kind} for i, (p, kind) in enumerate(zip(prompts, ["free", "given", "free"]))]
    sampling = {"free": SamplingParams(max_new_tokens=12, seed=0), "given": SamplingParams(max_new_tokens=4, stop=("\n",), seed=0)}
    together = write_instructions(backend, rows, sampling, None)
    assert [r["prompt_id"] for r in together] == ["r1-p0", "r1-p1", "r1-p2"]
    for kind in sampling:
        alone = write_instructions(backend, [r for r in rows if r["sampling"] == kind], {kind: sampling[kind]}, None)
        assert [r["completion"] for r in alone] == [r["completion"] for r in together if r["sampling"] == kind]
    assert together[1]["completion_tokens"] <= 4 < together[0]["completion_tokens"]

    demo = {"instruction": "Classify the sentiment of the sentence.", "input": "Profit fell by half.", "output": "negative"}
    label_row = {"id": "a", "instruction": demo["instruction"], "input": "Sales rose 20%.", "labels": ["positive", "negative"]}
    response_row = {"id": "b", "instruction": "Explain what EBITDA measures.", "input": ""}
    for row in (label_row, response_row):
        row["messages"] = build_response_messages(row["instruction"], row["input"], [demo])
    steps = {"label": functools.partial(score_labels, adapter=None),
             "response": functools.partial(write_responses, params=SamplingParams(max_new_tokens=8), adapter=None)}
    mixed = answer_batch(backend, [{**response_row, "answer_step": "response"}, {**label_row, "answer_step": "label"}], steps)
    assert [r["id"] for r in mixed] == ["b", "a"]
    assert mixed[1]["output"] == score_labels(backend, [label_row], None)[0]["output"]
    assert mixed[0]["output"] == write_responses(backend, [response_row], SamplingParams(max_new_tokens=8), None)[0]["output"]
