"""LoRA fine-tuning on Ray Train, on the real embedded model with tiny configs.

Fast: tokenization and planning, a plain-PyTorch LoRA step (adapter moves, base does not),
QLoRA's CPU error, and one 1-worker Ray Train run shared by the adapter tests (overfit,
files, stock PEFT loading, export). Slow: 2 workers vs 1 worker, fault injection, explicit
resume, bf16 vs fp32 loss curves.
"""

from __future__ import annotations

import json
import math
import types

import pytest
import torch

from selfspec.config import ConfigError, RunConfig, TrainConfig
from selfspec.io import RunDir, write_parquet
from selfspec.schema import example_schema
from selfspec.stages import train as T

MODEL = "embedded:smollm2-135m-instruct"
CPU = torch.device("cpu")


def make_examples(n: int = 16, domain: str = "biomedical") -> list[dict]:
    """Fixed, distinctive tasks that a small model can memorise in a few steps."""
    return [
        {
            "id": f"ex{i:02d}",
            "instruction": f"Which enzyme does marker {i} encode?",
            "input": "",
            "output": f"Marker {i} encodes the zeta-{i} kinase of the liver.",
            "domain": domain,
            "seed_ids": ["seed-1"],
            "passage_ids": [],
            "model": MODEL,
            "adapter": "",
            "round": 1,
            "config_hash": "test",
        }
        for i in range(n)
    ]


def make_run(tmp_path, name: str, examples: list[dict], **train) -> tuple[RunConfig, RunDir]:
    config = RunConfig(name=name, runs_dir=str(tmp_path / "runs"), train=TrainConfig(**train))
    run_dir = RunDir(str(tmp_path / "runs" / name))
    write_parquet(run_dir.path("data", "examples.parquet"), examples, schema=example_schema())
    return config, run_dir


def read_metrics(run_dir: RunDir) -> list[dict]:
    with open(run_dir.path("train", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def adapter_weights(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(f"{path}/adapter_model.safetensors")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from selfspec.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(MODEL))


# -- plain functions --------------------------------------------------------------
@pytest.mark.parametrize("template", ["chat", "alpaca"])
def test_tokenize_masks_prompt_and_keeps_response(tokenizer, template):
    example = make_examples(1)[0]
    record, reason = T.tokenize_example(example, tokenizer, template, max_seq_len=256)
    assert reason is None
    ids, labels = record["input_ids"], record["labels"]
    assert len(ids) == len(labels)
    n_prompt = labels.index(next(t for t in labels if t != T.IGNORE_INDEX))
    assert all(t == T.IGNORE_INDEX for t in labels[:n_prompt])
    assert labels[n_prompt:] == ids[n_prompt:]
    response = tokenizer.decode(ids[n_prompt:])
    assert response.startswith(example["output"]) and tokenizer.eos_token in response
    # The prompt part is exactly what inference feeds the model.
    prompt, _ = T.render_example(example, tokenizer, template)
    assert tokenizer.decode(ids[:n_prompt]) == prompt


def test_tokenize_truncates_responses_and_drops_with_reasons(tokenizer):
    long_prompt = dict(make_examples(1)[0], id="long", instruction="word " * 300)
    empty = dict(make_examples(1)[0], id="empty", output="  ")
    ok = make_examples(1)[0]
    records, drops = T.tokenize_examples([long_prompt, empty, ok], tokenizer, "chat", max_seq_len=48)
    assert drops == {"prompt_too_long": 1, "empty_output": 1}
    assert len(records) == 1 and len(records[0]["input_ids"]) <= 48


def test_packing_keeps_examples_whole_and_plan_counts_steps():
    records = [{"input_ids": [i] * n, "labels": [T.IGNORE_INDEX] + [i] * (n - 1)} for i, n in enumerate([5, 4, 3, 6, 2])]
    rows = T.pack_examples(records, max_seq_len=9)
    assert [len(r["input_ids"]) for r in rows] == [9, 9, 2]
    assert sum(len(r["labels"]) for r in rows) == 20

    plan = T.StepPlan.build(micro_batches_per_epoch=5, cfg=TrainConfig(grad_accum=2, epochs=1.5))
    assert (plan.steps_per_epoch, plan.total_steps) == (3, 5)
    steps = list(T.planned_steps(list(range(10)), plan, batch_size=2, seed=0))
    assert [s for s, _ in steps] == [1, 2, 3, 4, 5]
    assert [len(m) for _, m in steps] == [2, 2, 1, 2, 2]
    assert sorted(x for _, m in steps[:3] for b in m for x in b) == list(range(10))  # one epoch
    # Resuming after step 4 takes the very batches the uninterrupted run took.
    assert list(T.planned_steps(list(range(10)), plan, 2, 0, start_step=4)) == steps[4:]


def test_batches_grouped_by_length_pad_less_and_still_cover_each_epoch_once():
    rows = [{"input_ids": [k] * (1 + (k * 37) % 300)} for k in range(1000)]
    def padded(batches):
        return sum(max(len(r["input_ids"]) for r in b) * len(b) for b in batches)
    real = sum(len(r["input_ids"]) for r in rows)
    plain = T.epoch_batches(rows, 8, seed=0, epoch=0)
    grouped = T.epoch_batches(rows, 8, seed=0, epoch=0, group_by_length=True)
    assert len(grouped) == len(plain) == 125
    assert sorted(r["input_ids"][0] for b in grouped for r in b) == list(range(1000))
    assert padded(grouped) < 1.05 * real < padded(plain)
    # Still shuffled: not longest first, and another epoch takes other batches.
    sizes = [len(b[0]["input_ids"]) for b in grouped]
    assert sizes != sorted(sizes, reverse=True)
    assert T.epoch_batches(rows, 8, seed=0, epoch=1, group_by_length=True) != grouped
    assert T.epoch_batches(rows, 8, seed=0, epoch=0, group_by_length=True) == grouped  # resumable


def test_qlora_on_cpu_fails_at_once_with_a_clear_message(tmp_path):
    config, run_dir = make_run(tmp_path, "qlora", make_examples(2), qlora=True)
    with pytest.raises(ConfigError, match="qlora=true needs a CUDA GPU"):
        T.run_train(config, run_dir)


def test_lora_step_moves_adapter_and_leaves_base_untouched(tokenizer):
    cfg = TrainConfig(max_seq_len=64, batch_size=4, lr=1e-3, max_steps=2, warmup_ratio=0)
    amp = T.autocast_dtype(cfg.precision, CPU)
    model, tok = T.load_lora_model(MODEL, cfg, CPU, amp)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    records, _ = T.tokenize_examples(make_examples(4), tok, "chat", cfg.max_seq_len)
    plan = T.StepPlan.build(1, cfg)
    optimizer, scheduler = T.build_optimizer(model, cfg, plan.total_steps)
    losses = []
    T.fit(model, optimizer, scheduler, records, cfg, plan, pad_id=tok.pad_token_id, device=CPU, amp=amp,
          on_step=lambda m: losses.append(m.loss))
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    params = dict(model.named_parameters())
    assert all(torch.equal(frozen[n], params[n]) for n in frozen), "a base weight changed"
    # B starts at zero, so A first moves on step 2; after two steps every adapter tensor moved.
    assert all(not torch.equal(trainable[n], params[n]) for n in trainable)


# -- one Ray Train run, shared by the adapter tests ------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_local):
    """16 fixed examples, 6 steps at a high constant learning rate: enough to overfit."""
    tmp_path = tmp_path_factory.mktemp("trained")
    config, run_dir = make_run(
        tmp_path, "overfit", make_examples(16), max_seq_len=64, batch_size=8, lr=2e-3,
        schedule="constant", warmup_ratio=0, max_steps=6, checkpoint_every=3,
    )
    summary = T.run_train(config, run_dir)
    return config, run_dir, summary


def test_training_overfits_and_writes_metrics(trained):
    config, run_dir, summary = trained
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert set(metrics[0]) >= {"step", "epoch", "loss", "lr", "tokens_per_s"}
    assert summary["final_loss"] <= metrics[0]["loss"] / 2, [m["loss"] for m in metrics]
    assert summary["steps"] == 6 and summary["examples"] == 16 and summary["tokens_per_s"] > 0


def test_adapter_is_standard_peft_with_model_card(trained):
    config, run_dir, summary = trained
    adapter = run_dir.path("adapters", "biomedical-r1")
    assert summary["adapter"] == adapter
    with open(f"{adapter}/adapter_config.json") as f:
        assert json.load(f)["base_model_name_or_path"] == MODEL
    with open(f"{adapter}/selfspec.json") as f:
        meta = json.load(f)
    assert (meta["domain"], meta["base_model"], meta["run"], meta["round"]) == ("biomedical", MODEL, "overfit", 1)
    assert meta["train"]["steps"] == 6
    with open(f"{adapter}/README.md") as f:
        card = f.read()
    assert MODEL in card and "examples.parquet" in card and "final loss" in card and "| r | 8 |" in card
    weights = adapter_weights(adapter)
    assert weights and all("lora_" in k for k in weights), "the adapter file must hold only LoRA weights"


def test_adapter_differs_from_init_loads_in_stock_peft_and_changes_output(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfspec.models import resolve_model

    config, run_dir, _ = trained
    adapter = run_dir.path("adapters", "biomedical-r1")
    # The same seed and dtype as the training run give the same initial adapter.
    init, _ = T.load_lora_model(MODEL, config.train, CPU, T.autocast_dtype(config.train.precision, CPU))
    initial = {k.replace(".default", ""): v for k, v in init.state_dict().items() if "lora_" in k}
    trained_weights = adapter_weights(adapter)
    assert trained_weights.keys() == initial.keys()
    assert all(not torch.equal(trained_weights[k], initial[k]) for k in initial)

    path = resolve_model(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), adapter)
    model.eval()
    messages = [{"role": "user", "content": make_examples(16)[3]["instruction"]}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    batch = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)

    def greedy() -> str:
        out = model.generate(**batch, max_new_tokens=16, do_sample=False)
        return tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)

    tuned = greedy()
    with model.disable_adapter():
        base = greedy()
    assert tuned != base
    assert "zeta-3" in tuned, tuned


def test_export_merge_writes_a_full_model_that_matches_the_adapter(trained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from selfspec.models import resolve_model

    _, run_dir, _ = trained
    adapter = run_dir.path("adapters", "biomedical-r1")
    out = T.export_adapter(adapter, str(tmp_path / "merged"), merge=True)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(resolve_model(MODEL), dtype=torch.float32), adapter
    )
    ids = torch.tensor([[1, 504, 3458, 314, 260, 8130, 30]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_model(ids).logits, atol=1e-4, rtol=1e-4)
    assert (tmp_path / "merged" / "tokenizer.json").exists() and (tmp_path / "merged" / "README.md").exists()


# -- slow: scaling, faults, resume, precision ------------------------------------------
@pytest.mark.slow
def test_two_workers_take_the_same_first_step_as_one_worker_with_twice_the_batch(tmp_path, ray_local):
    """4 examples = one global batch either way; fp32, no dropout, one step.

    Tolerance: the step's loss agrees to rtol 1e-5 (the workers' right padding differs, so
    the sums run in a different order). Adam's first update is lr * g / (|g| + eps) per
    element (lr 1e-3): +-lr wherever |g| >> eps, whatever the rounding of g, but where |g|
    is near eps (1e-8) a rounding difference in g moves it. So on average the 1-step LoRA
    weights agree to 1e-8 (1e-5 of an update), and no element differs by more than 5e-5
    (5% of an update).
    """
    examples = [dict(e, output=e["output"] + " Extra words." * i) for i, e in enumerate(make_examples(4))]
    common = dict(max_seq_len=96, lr=1e-3, max_steps=1, dropout=0.0, precision="fp32", warmup_ratio=0)
    one_cfg, one_dir = make_run(tmp_path, "one", examples, batch_size=4, num_workers=1, **common)
    two_cfg, two_dir = make_run(tmp_path, "two", examples, batch_size=2, num_workers=2, **common)
    one = T.run_train(one_cfg, one_dir)
    two = T.run_train(two_cfg, two_dir)
    assert two["num_workers"] == 2 and two["steps"] == 1
    assert two["first_loss"] == pytest.approx(one["first_loss"], rel=1e-5)
    a, b = adapter_weights(one["adapter"]), adapter_weights(two["adapter"])
    assert a.keys() == b.keys()
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert diffs.mean().item() <= 1e-8, f"mean weight difference {diffs.mean().item():.3g}"
    assert diffs.max().item() <= 5e-5, f"largest weight difference {diffs.max().item():.3g}"


@pytest.mark.slow
def test_injected_failure_restores_latest_checkpoint_and_continues(tmp_path, ray_local, monkeypatch, capsys):
    """Through the CLI: SELFSPEC_FAIL_AT_STEP=3 raises once; Ray restores step 2 and finishes."""
    from selfspec.cli import main

    runs = tmp_path / "runs"
    config, run_dir = make_run(tmp_path, "fault", make_examples(8))
    monkeypatch.setenv("SELFSPEC_FAIL_AT_STEP", "3")
    code = main([
        "train", f"runs_dir={runs}", "name=fault", "train.max_seq_len=64", "train.batch_size=4",
        "train.max_steps=4", "train.checkpoint_every=2", "train.max_failures=1", "train.cpus_per_worker=1",
    ])
    assert code == 0
    assert "restored from steps [2]" in capsys.readouterr().out
    with open(run_dir.path("adapters", "biomedical-r1", "selfspec.json")) as f:
        summary = json.load(f)["train"]
    assert summary["restored_from_steps"] == [2] and summary["steps"] == 4
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3, 4]  # nothing lost, nothing repeated


@pytest.mark.slow
def test_explicit_resume_continues_a_failed_run(tmp_path, ray_local):
    from ray.train import TrainingFailedError

    config, run_dir = make_run(
        tmp_path, "resume", make_examples(8), max_seq_len=64, batch_size=4, max_steps=4, checkpoint_every=2
    )
    with pytest.raises(TrainingFailedError):
        T.run_train(config, run_dir, fail_at_step=3)
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3]
    changed = config.model_copy(update={"train": config.train.model_copy(update={"lr": 1e-2})})
    with pytest.raises(ConfigError, match="config changed since it started \\(lr\\)"):
        T.run_train(changed, run_dir, resume=True)
    summary = T.run_train(config, run_dir, resume=True)
    assert summary["resumed"] and summary["restored_from_steps"] == [2] and summary["steps"] == 4
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3, 4]


def loss_and_grad(model, batch, amp) -> tuple[float, torch.Tensor]:
    """One forward and backward from zeroed gradients: (summed loss, all adapter gradients)."""
    model.zero_grad(set_to_none=True)
    loss = T.response_loss_sum(model, batch, amp)
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


def test_output_layer_on_loss_positions_only_equals_the_full_forward(tokenizer, monkeypatch):
    cfg = TrainConfig(max_seq_len=64, batch_size=4, max_steps=1, dropout=0.0)
    model, tok = T.load_lora_model(MODEL, cfg, CPU, None)
    assert T.loss_positions_head(model) is not None
    records, _ = T.tokenize_examples(make_examples(4), tok, "chat", cfg.max_seq_len)
    batch = T.collate(records, tok.pad_token_id)
    results = []
    for head in (T.loss_positions_head, lambda model: None):
        monkeypatch.setattr(T, "loss_positions_head", head)
        results.append(loss_and_grad(model, batch, None))
    (fast, fast_grad), (full, full_grad) = results
    assert fast == pytest.approx(full, rel=1e-5)
    # fp32; the fused head sums its matmuls in another order (seen: 5e-7 of the norm)
    assert ((fast_grad - full_grad).norm() / full_grad.norm()).item() < 1e-5


@pytest.mark.slow
def test_bf16_loss_and_gradients_track_fp32(tokenizer):
    """Same data, same init: bf16 autocast gives fp32's first loss (within 1%) and gradient
    (cosine 0.99), and its loss curve falls.

    The curves themselves part after two steps (seen here: 12% at step 3, lr 3e-4): LoRA's A
    matrices get their first gradient at step 2, and Adam's first update is about
    lr * sign(g) per element, so bf16 rounding of A's many small gradients turns into
    whole-lr steps in other directions. Matching curves step for step is not what bf16
    training promises; matching losses and gradients is.
    """
    cfg = TrainConfig(max_seq_len=64, batch_size=8, lr=3e-4, max_steps=4, dropout=0.0)
    first: dict[str, tuple[float, torch.Tensor]] = {}
    for precision in ("fp32", "bf16"):
        amp = T.autocast_dtype(precision, CPU)
        model, tok = T.load_lora_model(MODEL, cfg, CPU, amp)
        records, _ = T.tokenize_examples(make_examples(16), tok, "chat", cfg.max_seq_len)
        batch = T.collate(records[: cfg.batch_size], tok.pad_token_id)
        loss = T.response_loss_sum(model, batch, amp)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None])
        targets, _ = T.count_tokens([records[: cfg.batch_size]])
        first[precision] = (loss.item() / targets, grads)
        if precision == "bf16":
            model.zero_grad(set_to_none=True)
            plan = T.StepPlan.build(2, cfg.model_copy(update={"precision": precision}))
            optimizer, scheduler = T.build_optimizer(model, cfg, plan.total_steps)
            losses = []
            T.fit(model, optimizer, scheduler, records, cfg, plan, pad_id=tok.pad_token_id, device=CPU, amp=amp,
                  on_step=lambda m: losses.append(m.loss))
            # Two batches a step apart, each seen again an epoch later: each one's loss falls.
            assert losses[2] < losses[0] and losses[3] < losses[1], losses
    (loss32, grad32), (loss16, grad16) = first["fp32"], first["bf16"]
    assert loss16 == pytest.approx(loss32, rel=0.01)
    assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0).item() >= 0.99


def test_masked_dropout_keeps_the_share_and_scale_of_nn_dropout():
    dropout = T.MaskedDropout(0.05).train()
    x = torch.ones(1000, 999, dtype=torch.bfloat16)
    torch.manual_seed(0)
    out = dropout(x)
    kept = out != 0
    assert kept.float().mean().item() == pytest.approx(0.95, abs=0.002)
    assert torch.all(out[kept] == torch.tensor(1 / 0.95, dtype=torch.bfloat16))
    torch.manual_seed(0)
    assert torch.equal(dropout(x), out)  # torch's generator: seeded runs repeat
    # no lane of a random word is favoured (the words span the full 64 bits, sign included)
    lanes = kept.flatten()[: 4 * 240_000].view(-1, 4).float().mean(dim=0)
    assert torch.allclose(lanes, torch.full((4,), 0.95), atol=0.003)
    assert dropout.eval()(x) is x


def test_low_rank_forward_is_peft_lora_arithmetic(tokenizer):
    """The CPU forward of plain LoRA layers (scalings on the rank-r activations, the update
    inside addmm) gives PEFT's loss and gradients, with dropout on: the same masks are drawn
    from the same seed. fp32, so only rounding order differs."""
    cfg = TrainConfig(max_seq_len=64, batch_size=4, dropout=0.1)
    model, tok = T.load_lora_model(MODEL, cfg, CPU, None)
    records, _ = T.tokenize_examples(make_examples(4), tok, "chat", cfg.max_seq_len)
    batch = T.collate(records, tok.pad_token_id)
    from peft.tuners.lora.layer import Linear as LoraLinear

    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert layers and all("forward" in vars(m) for m in layers)  # the fast forward is installed
    with torch.no_grad():  # PEFT starts lora_B at zero: give the update something to add
        for m in layers:
            m.lora_B["default"].weight.normal_(std=0.02)
    model.train()
    results = []
    for fast in (True, False):
        for m in layers:
            if fast:
                m.forward = types.MethodType(T.low_rank_forward, m)
            else:
                del m.forward  # PEFT's own
        torch.manual_seed(7)
        results.append(loss_and_grad(model, batch, None))
    (fast, fast_grad), (peft, peft_grad) = results
    assert fast == pytest.approx(peft, rel=1e-5)
    assert ((fast_grad - peft_grad).norm() / peft_grad.norm()).item() < 1e-5, (fast_grad - peft_grad).abs().max()
    # eval mode: no dropout, and the base's output plus the scaled update
    model.eval()
    with torch.no_grad():
        x = torch.randn(2, 5, layers[0].in_features)
        expected = type(layers[0]).forward(layers[0], x)
        for m in layers:
            m.forward = types.MethodType(T.low_rank_forward, m)
        assert torch.allclose(layers[0](x), expected, atol=1e-5)


def test_fast_lora_inputs_equal_peft_layers_in_bf16(tokenizer):
    """Under bf16 autocast the fast layers (no fp32 copy of the input, the scalings on the
    rank-r activations, the update inside addmm) match PEFT's own layers, which cast the
    input to fp32 and straight back, within bf16 rounding."""
    cfg = TrainConfig(max_seq_len=64, batch_size=4, dropout=0.0)
    amp = torch.bfloat16
    model, tok = T.load_lora_model(MODEL, cfg, CPU, amp)
    # SDPA's attention keeps its scores in fp32, so what differs here is the LoRA layers alone.
    model.get_base_model().set_attn_implementation("sdpa")
    records, _ = T.tokenize_examples(make_examples(4), tok, "chat", cfg.max_seq_len)
    batch = T.collate(records, tok.pad_token_id)
    from peft.tuners.lora.layer import Linear as LoraLinear

    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert layers and all(not m.cast_input_dtype_enabled for m in layers)
    with torch.no_grad():
        for m in layers:
            m.lora_B["default"].weight.normal_(std=0.02)
    results = []
    for fast in (True, False):
        for m in layers:
            m.cast_input_dtype_enabled = not fast
            if not fast:
                del m.forward
        results.append(loss_and_grad(model, batch, amp))
    (fast, fast_grad), (peft, peft_grad) = results
    # bf16 rounds at other points: both stay as close to each other as bf16 runs are to fp32 (0.2-0.4%)
    assert fast == pytest.approx(peft, rel=1e-2)
    cosine = torch.nn.functional.cosine_similarity(fast_grad, peft_grad, dim=0).item()
    assert cosine >= 0.99, cosine


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_cross_entropy_equals_cross_entropy_on_full_logits(dtype, monkeypatch):
    """The fused output layer + loss, in blocks of 3 rows, gives F.cross_entropy's loss and
    input gradient on the full fp32 logits, as the unfused path computes them."""
    monkeypatch.setattr(T.HeadCrossEntropy, "BLOCK_FLOATS", 3 * 50)
    torch.manual_seed(0)
    weight = torch.randn(50, 16).to(dtype)
    targets = torch.randint(0, 50, (10,))
    grads = []
    for fused in (True, False):
        hidden = torch.randn(10, 16, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_()
        if fused:
            loss = T.HeadCrossEntropy.apply(hidden, weight, targets)
        else:
            loss = torch.nn.functional.cross_entropy((hidden @ weight.t()).float(), targets, reduction="sum")
        (loss * 0.5).backward()
        grads.append((loss.item(), hidden.grad))
    (fused_loss, fused_grad), (loss, grad) = grads
    assert fused_loss == pytest.approx(loss, rel=1e-6)
    assert fused_grad.dtype == dtype and torch.allclose(fused_grad.float(), grad.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)


def test_right_padded_batches_run_without_the_mask_and_give_the_same_loss(tokenizer, monkeypatch):
    cfg = TrainConfig(max_seq_len=64, batch_size=4, dropout=0.0)
    model, tok = T.load_lora_model(MODEL, cfg, CPU, None)
    records, _ = T.tokenize_examples(make_examples(4), tok, "chat", cfg.max_seq_len)
    records[0] = {key: value[:-7] for key, value in records[0].items()}  # rows of two lengths
    batch = T.collate(records, tok.pad_token_id)
    assert T.right_padded(batch["attention_mask"]) and not bool(batch["attention_mask"].all())
    assert not T.right_padded(batch["attention_mask"].flip(1))  # left padding keeps its mask
    results = []
    for skip_mask in (True, False):
        monkeypatch.setattr(T, "right_padded", lambda mask, skip=skip_mask: skip)
        results.append(loss_and_grad(model, batch, None))
    (causal, causal_grad), (masked, masked_grad) = results
    assert causal == pytest.approx(masked, rel=1e-5)
    assert ((causal_grad - masked_grad).norm() / masked_grad.norm()).item() < 1e-5


@pytest.mark.parametrize("padded", [False, True])
def test_matmul_attention_equals_sdpa_forward_and_backward(padded):
    """fp32, grouped query heads (6 query heads on 2 key/value heads), causal rows with and
    without a left-padding mask: the same output and gradients as transformers' SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    batch, length = 3, 11
    module = types.SimpleNamespace(is_causal=True, num_key_value_groups=3, training=True)
    mask = None
    if padded:
        keys = torch.ones(batch, length, dtype=torch.bool)
        keys[1, :4] = False  # row 1: four pad tokens on the left
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        mask = (causal[None] & keys[:, None, :])[:, None]  # (batch, 1, queries, keys), True: attend
    outputs = []
    for attention in (T.matmul_attention, sdpa_attention_forward):
        torch.manual_seed(1)
        q, k, v = (torch.randn(batch, h, length, 8, requires_grad=True) for h in (6, 2, 2))
        out, _ = attention(module, q, k, v, mask, scaling=0.3)
        real = slice(None) if not padded else (torch.arange(batch)[:, None] != 1) | (torch.arange(length)[None] >= 4)
        grad_out = torch.randn(out.shape)
        (out * grad_out)[real].sum().backward()
        outputs.append((out[real], q.grad, k.grad, v.grad))
    for ours, sdpa in zip(*outputs):
        torch.testing.assert_close(ours, sdpa, atol=1e-5, rtol=1e-4)


def test_matmul_attention_leaves_rows_over_its_key_limit_to_sdpa():
    """Past MATMUL_ATTENTION_MAX_KEYS the SDPA kernel runs: its output, bit for bit."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    module = types.SimpleNamespace(is_causal=True, num_key_value_groups=3, training=True)
    length = T.MATMUL_ATTENTION_MAX_KEYS + 1
    q, k, v = (torch.randn(1, h, length, 8) for h in (6, 2, 2))
    assert torch.equal(T.matmul_attention(module, q, k, v, None)[0], sdpa_attention_forward(module, q, k, v, None)[0])


def test_cpu_training_runs_matmul_attention_with_the_loss_and_gradients_of_sdpa(tokenizer):
    """fp32, the real model: right-padded rows (no mask: causal) and the same rows left-padded
    (the mask passed) give SDPA's loss and adapter gradients."""
    cfg = TrainConfig(max_seq_len=64, batch_size=4, dropout=0.0)
    model, tok = T.load_lora_model(MODEL, cfg, CPU, None)
    base = model.get_base_model()
    assert base.config._attn_implementation == T.TRAIN_ATTENTION
    records, _ = T.tokenize_examples(make_examples(4), tok, "chat", cfg.max_seq_len)
    records[0] = {key: value[:-7] for key, value in records[0].items()}  # rows of two lengths
    right = T.collate(records, tok.pad_token_id)
    pads = (1 - right["attention_mask"]).sum(dim=1)
    left = {key: torch.stack([row.roll(int(p)) for row, p in zip(value, pads)]) for key, value in right.items()}
    assert not T.right_padded(left["attention_mask"])
    for batch in (right, left):
        results = []
        for attention in (T.TRAIN_ATTENTION, "sdpa"):
            base.set_attn_implementation(attention)
            results.append(loss_and_grad(model, batch, None))
        (ours, ours_grad), (sdpa, sdpa_grad) = results
        assert ours == pytest.approx(sdpa, rel=1e-5)
        assert ((ours_grad - sdpa_grad).norm() / sdpa_grad.norm()).item() < 1e-5
