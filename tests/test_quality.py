"""Data-quality filters: seed task profiles, self-consistency, label balance, task mix,
grounded prompts and domain relevance (the embedded encoder, no generator)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from selfspec.quality import (
    DomainRelevance,
    balance_labels,
    fit_passage,
    off_form,
    label_caps,
    label_check,
    majority_label,
    majority_seed_label,
    relabel_with_majority,
    select_task_mix,
    round_task_weights,
    task_draws,
    task_profiles,
)
from selfspec.seeds import load_seeds
from selfspec.stages.generate_instructions import build_prompt, make_prompt_rows, parse_given_input


def seed(i: int, task: str, output: str, input: str = "Some sentence about a drug.") -> dict:
    return {"id": f"s{i}", "task": task, "instruction": f"Do task {task} number {i}.", "input": input, "output": output}


SEEDS = [
    seed(1, "yes_no_qa", "yes"), seed(2, "yes_no_qa", "no"), seed(3, "yes_no_qa", "maybe"), seed(4, "yes_no_qa", "yes"),
    seed(5, "open_qa", "Insulin lowers blood glucose by moving it into cells.", input=""),
    seed(6, "open_qa", "Statins block HMG-CoA reductase in the liver.", input=""),
]


def test_profiles_tell_label_tasks_from_open_ones():
    profiles = task_profiles(SEEDS)
    assert profiles["yes_no_qa"].labels == ("yes", "no", "maybe")
    assert profiles["yes_no_qa"].label_shares == {"yes": 0.5, "no": 0.25, "maybe": 0.25}
    assert profiles["yes_no_qa"].share == pytest.approx(4 / 6)
    assert not profiles["open_qa"].labelled and profiles["open_qa"].input_words == 0


def test_shipped_seed_label_tasks():
    for path, labelled in [
        ("seeds/biomedical.yaml", {"yes_no_qa", "drug_drug_interaction", "chemical_protein_relation"}),
        ("seeds/finance.yaml", {"news_sentiment", "headline_entity_sentiment", "headline_question"}),
    ]:
        profiles = task_profiles(load_seeds(path).seeds)
        assert labelled <= {t for t, p in profiles.items() if p.labelled}
        assert not profiles["summarization"].labelled and not profiles["open_qa"].labelled
        # Short answers that never repeat are lists or topics, not labels.
        assert not profiles["document_classification"].labelled
    bio = task_profiles(load_seeds("seeds/biomedical.yaml").seeds)
    assert not any(bio[t].labelled for t in ("chemical_ner", "gene_ner", "multiple_choice_qa"))
    # Table answers (numbers, spans) are short but never repeat: open answers, not labels.
    assert not task_profiles(load_seeds("seeds/finance.yaml").seeds)["table_qa"].labelled


def test_majority_keeps_a_clear_majority_only():
    profile = task_profiles(SEEDS)["yes_no_qa"]
    assert majority_label(["Yes.", "yes, it does", "no", "Yes", "maybe"], profile, 0.6) == ("yes", 0.6)
    label, share = majority_label(["yes", "no", "maybe", "yes", "no"], profile, 0.6)
    assert label is None and share == 0.4
    # Answers naming no label count against the majority.
    assert majority_label(["yes", "I think so", "unclear", "yes", "hmm"], profile, 0.6)[0] is None
    assert majority_label(["It depends on the dose."] * 5, profile, 0.6) == (None, 0.0)


def test_label_caps_follow_the_seed_shares():
    shares = {"yes": 0.5, "no": 0.25, "maybe": 0.25}
    # 'no' may hold at most 1.5 * 25% of what is kept: 6 of 16.
    assert label_caps({"no": 40, "yes": 8, "maybe": 2}, shares, 1.5) == {"no": 6, "yes": 8, "maybe": 2}
    assert label_caps({"yes": 5, "no": 4, "maybe": 3}, shares, 1.5) == {"yes": 5, "no": 4, "maybe": 3}
    # One label alone, allowed under all of it: cut to the floor of two rows.
    assert label_caps({"no": 30}, shares, 1.5) == {"no": 2}
    assert label_caps({"no": 1}, shares, 1.5) == {"no": 1}


def test_label_check_keeps_a_type_only_where_labels_beat_the_majority_label():
    gold = ["yes"] * 4 + ["no"] * 3 + ["maybe"] * 2
    always_yes = [(g, "yes") for g in gold]  # 4 right: what the majority label gets, no more
    better = [(g, g if i < 5 else "no") for i, g in enumerate(gold)]  # 7 right
    unsure = [(g, None) for g in gold[:5]] + [(g, g) for g in gold[5:]]  # no clear label counts as wrong
    checked = label_check({"yes_no_qa": always_yes, "relation": better, "other": unsure})
    assert checked["yes_no_qa"] == {"seeds": 9, "right": 4, "prior_right": 4, "p": pytest.approx(0.6, abs=0.05), "reliable": False}
    assert checked["relation"]["right"] == 7 and checked["relation"]["reliable"] and checked["relation"]["p"] < 0.05
    assert checked["other"]["right"] == 4 and not checked["other"]["reliable"]
    # Beating the prior by chance is not enough: 7 of 10 right against a prior of 5 (p = 0.17).
    coin = ["yes"] * 5 + ["no"] * 5
    lucky = label_check({"headline": [(g, g if i < 7 else ("no" if g == "yes" else "yes")) for i, g in enumerate(coin)]})
    assert lucky["headline"]["right"] == 7 and lucky["headline"]["p"] == pytest.approx(0.1719, abs=1e-3)
    assert not lucky["headline"]["reliable"]
    assert label_check({"headline": [(g, g) for g in coin[:9]] + [("no", "yes")]})["headline"]["reliable"]  # 9 of 10
    assert label_check({"case": [("Yes", "yes "), ("no", "yes")]})["case"]["right"] == 1  # labels compare normalized


def test_unreliable_types_take_the_seeds_majority_label():
    seeds = [seed(0, "yn", "No"), seed(1, "yn", "yes"), seed(2, "yn", "Yes"), seed(3, "yn", "maybe"), seed(4, "qa", "A long answer.")]
    profiles = task_profiles(seeds)
    assert majority_seed_label(profiles["yn"]) == "yes"  # 2 of 4, spelled as the first seed that gives it
    tie = task_profiles([seed(0, "yn", "yes"), seed(1, "yn", "no"), seed(2, "yn", "No"), seed(3, "yn", "yes")])
    assert majority_seed_label(tie["yn"]) is None  # 2 yes / 2 no: no label is the better guess
    from selfspec.stages.generate import unreliable_label_plan

    both = {**profiles, "tie": tie["yn"]}
    assert unreliable_label_plan({"yn", "tie"}, both, "majority") == ({"yn"}, {"tie"})
    assert unreliable_label_plan({"yn", "tie"}, both, "drop") == (set(), {"yn", "tie"})
    # Nothing else to make: nothing dropped, the tied type keeps the model's labels.
    assert unreliable_label_plan({"tie"}, {"tie": tie["yn"]}, "majority") == (set(), set())
    assert unreliable_label_plan({"yn"}, {"yn": profiles["yn"]}, "drop") == ({"yn"}, set())
    rows = [{"id": "r1", "task": "yn", "output": "no", "label": "no"}, {"id": "r2", "task": "qa", "output": "x", "label": ""}]
    relabelled = relabel_with_majority(rows, profiles, {"yn"})
    assert relabelled == [{"id": "r1", "task": "yn", "output": "yes", "label": "yes"}, rows[1]]
    assert relabel_with_majority(rows, profiles, set()) == rows


def test_balance_labels_drops_newest_rows_of_the_surplus_label():
    profiles = task_profiles(SEEDS)
    rows = [{"id": f"r{i}", "task": "yes_no_qa", "label": "no"} for i in range(10)]
    rows += [{"id": f"p{i}", "task": "yes_no_qa", "label": "yes"} for i in range(7)]
    rows += [{"id": "y1", "task": "yes_no_qa", "label": "yes"}, {"id": "m1", "task": "yes_no_qa", "label": "maybe"}]
    rows += [{"id": "o1", "task": "open_qa", "label": ""}]
    kept, dropped = balance_labels(rows, profiles, 1.5)
    counts = Counter(r["label"] for r in kept if r["task"] == "yes_no_qa")
    assert counts == {"no": 5, "yes": 8, "maybe": 1}  # 'no' at most 1.5 x its 25% seed share
    assert [r["id"] for r in kept if r["label"] == "no"] == [f"r{i}" for i in range(counts["no"])]
    assert {"y1", "m1", "o1"} <= {r["id"] for r in kept} and dropped == 5


def test_task_mix_and_draws_follow_the_seeds():
    profiles = task_profiles(SEEDS)
    draws = task_draws(profiles, 30, random.Random(0))
    assert Counter(draws) == {"yes_no_qa": 20, "open_qa": 10}
    rows = [{"id": f"y{i}", "task": "yes_no_qa"} for i in range(30)] + [{"id": f"o{i}", "task": "open_qa"} for i in range(5)]
    picked = select_task_mix(rows, 12, profiles)
    assert Counter(r["task"] for r in picked) == {"yes_no_qa": 8, "open_qa": 4}
    short = select_task_mix(rows, 33, profiles)  # open_qa has only 5: the rest fills up
    assert len(short) == 33 and Counter(r["task"] for r in short)["open_qa"] == 5


def test_later_rounds_draw_more_of_the_task_types_short_of_their_share():
    profiles = task_profiles(SEEDS)  # yes_no_qa 2/3, open_qa 1/3 of the seeds
    made = [{"task": "yes_no_qa"}] * 20 + [{"task": "open_qa"}] * 2
    weights = round_task_weights(made, 30, profiles)  # only open_qa is short
    assert weights == pytest.approx({"yes_no_qa": 1 / 3, "open_qa": 2 / 3})
    assert Counter(task_draws(profiles, 12, random.Random(0), weights)) == {"yes_no_qa": 4, "open_qa": 8}
    rows = make_prompt_rows(SEEDS, "biomedical", "Biomedicine.", 12, 2, seed=0, round=2, task_weights=weights)
    assert Counter(r["task"] for r in rows) == {"yes_no_qa": 4, "open_qa": 8}
    # Every type at its share: back to the seeds' proportions.
    met = round_task_weights([{"task": "yes_no_qa"}] * 20 + [{"task": "open_qa"}] * 10, 30, profiles)
    assert Counter(task_draws(profiles, 30, random.Random(0), met)) == {"yes_no_qa": 20, "open_qa": 10}


def test_prompts_draw_demos_of_one_task_type():
    rows = make_prompt_rows(SEEDS, "biomedical", "Biomedicine.", 12, 2, seed=0, round=1)
    by_id = {s["id"]: s for s in SEEDS}
    assert Counter(r["task"] for r in rows) == {"yes_no_qa": 8, "open_qa": 4}
    for row in rows:
        assert {by_id[i]["task"] for i in row["seed_ids"]} == {row["task"]}
    mixed = make_prompt_rows(SEEDS, "biomedical", "Biomedicine.", 4, 3, seed=0, round=1, by_task=False)
    assert {r["task"] for r in mixed} == {""}


def test_consecutive_prompts_of_a_type_share_a_draw_of_demos_and_so_do_their_answers():
    """prompts_per_demo_set: a type's prompts share demos in runs of that many (the engines'
    prefix caches prefill them once); 1 draws for every prompt, as before. Instructions from
    prompts that shared demos get the same answer demos, and other rows their own draw."""
    from selfspec.stages.generate_responses import response_rows

    single = make_prompt_rows(SEEDS, "biomedical", "Biomedicine.", 24, 2, seed=0, round=1)
    assert single == make_prompt_rows(SEEDS, "biomedical", "Biomedicine.", 24, 2, seed=0, round=1, per_demo_set=1)
    rows = make_prompt_rows(SEEDS, "biomedical", "Biomedicine.", 24, 2, seed=0, round=1, per_demo_set=3)
    assert [r["task"] for r in rows] == [r["task"] for r in single]
    for task in ("yes_no_qa", "open_qa"):
        draws = [tuple(r["seed_ids"]) for r in rows if r["task"] == task]
        runs = [draws[i : i + 3] for i in range(0, len(draws), 3)]
        assert all(len(set(run)) == 1 for run in runs) and len({run[0] for run in runs}) > 1
        first = next(r for r in rows if r["task"] == task)
        assert first["prompt"] == next(r for r in single if r["task"] == task)["prompt"]  # a run's draw is its first prompt's
    kept = [{**r, "id": f"i{n}", "instruction": f"Answer question {n}.", "input": ""} for n, r in enumerate(rows)]
    same_draw = [r for r in kept if r["task"] == kept[0]["task"]][:3]  # one run of prompts
    demos_of = lambda row: [m["content"] for m in row["messages"][:-1]]  # noqa: E731
    shared = response_rows(same_draw, SEEDS, 2, by_instruction_demos=True)
    assert len(shared) == 3 and all(demos_of(r) == demos_of(shared[0]) for r in shared)
    own = [demos_of(r) for r in response_rows(kept, SEEDS, 2)]
    assert len({tuple(d) for d in own}) > len({tuple(r["seed_ids"]) for r in kept})  # per row: more draws than prompt draws


def test_grounded_prompt_ends_with_the_given_passage_and_parses_one_line():
    prompt = build_prompt("biomedical", "Biomedicine.", SEEDS[:2], new_input="Aspirin inhibits COX-1.")
    assert prompt.endswith("3. Input: Aspirin inhibits COX-1.\nInstruction:")
    assert "1. Input: Some sentence about a drug.\nInstruction: Do task yes_no_qa number 1." in prompt
    item = parse_given_input(" List the drugs in the sentence.\nOutput: aspirin", truncated=False)
    assert item["instruction"] == "List the drugs in the sentence." and item["error"] is None
    assert parse_given_input(" List the drugs in the sentence and then some", truncated=True)["error"] == "truncated"
    assert parse_given_input("\n", truncated=False)["error"] == "unparseable"


def test_fit_passage_cuts_at_a_sentence_end():
    text = "One two three four. Five six seven eight. Nine ten eleven twelve."
    assert fit_passage(text, 100) == text
    assert fit_passage(text, 9) == "One two three four. Five six seven eight."


def test_domain_relevance_scores_seeds_above_off_domain_text():
    from selfspec.retrieval.index import load_encoder

    seeds = load_seeds("seeds/biomedical.yaml").seeds
    relevance = DomainRelevance(load_encoder("embedded:all-minilm-l6-v2", "float32"), seeds)
    assert sum(s >= relevance.threshold for s in relevance.seed_scores) >= 0.9 * len(seeds)
    on, off = relevance.scores([
        "List the diseases mentioned in the abstract.\nPatients with type 2 diabetes and chronic kidney disease received metformin.",
        "Write a limerick about your favourite football team.\nThe team won the cup final on Saturday.",
    ])
    assert on >= relevance.threshold > off


def test_answers_far_longer_than_the_seeds_answers_are_off_form():
    gene_ner = task_profiles(load_seeds("seeds/biomedical.yaml").seeds)["gene_ner"]
    sentence = "A susceptibility gene for hereditary breast-ovarian cancer, BRCA1, has been assigned to chromosome 17q21."
    assert off_form(sentence, gene_ner) and not off_form("BRCA1", gene_ner)
    assert not off_form(sentence, None)  # a row without a task type has no form to keep


def test_response_budgets_cover_every_answer_off_form_keeps():
    from selfspec.quality import FORM_LENGTH_RATIO, response_budget

    profiles = task_profiles(load_seeds("seeds/biomedical.yaml").seeds)
    gene_ner, summary = profiles["gene_ner"], profiles["summarization"]
    # An entity list gets a smaller budget than a summary; the config's limit caps both.
    assert response_budget(gene_ner, 200) < response_budget(summary, 200) <= 200
    assert response_budget(summary, 64) == 64
    assert response_budget(None, 128) == 128
    # The longest answer off_form keeps fits, at up to 2 tokens a word.
    assert response_budget(gene_ner, 10_000) >= 2 * FORM_LENGTH_RATIO * gene_ner.max_output_words


def test_open_ended_rows_leave_label_tasks_to_scoring_and_carry_their_type_budget():
    from selfspec.config import GenerateConfig
    from selfspec.quality import response_budget
    from selfspec.stages.generate import open_ended_rows

    profiles = task_profiles(load_seeds("seeds/biomedical.yaml").seeds)
    gen = GenerateConfig(response_max_new_tokens=128)
    rows = [{"id": str(i), "task": task} for i, task in enumerate(["yes_no_qa", "gene_ner", "summarization", ""])]
    out = open_ended_rows(rows, profiles, gen)
    assert profiles["yes_no_qa"].labelled
    assert [r["task"] for r in out] == ["gene_ner", "summarization", ""]
    assert [r["max_new_tokens"] for r in out] == [response_budget(profiles["gene_ner"], 128), response_budget(profiles["summarization"], 128), 128]
    assert out[0]["max_new_tokens"] < 128


def test_write_responses_gives_each_row_its_own_budget(backend):
    from selfspec.models import SamplingParams
    from selfspec.stages.generate import write_responses

    messages = [{"role": "user", "content": "Write a long essay about the history of medicine."}]
    rows = [{"id": "a", "messages": messages, "max_new_tokens": 4}, {"id": "b", "messages": messages}]
    out = write_responses(backend, rows, SamplingParams(max_new_tokens=12), None)
    assert [r["id"] for r in out] == ["a", "b"]
    assert [r["completion_tokens"] for r in out] == [4, 12]
    assert all(r["finish_reason"] == "length" and "max_new_tokens" not in r and "messages" not in r for r in out)
