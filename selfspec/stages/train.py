"""LoRA / QLoRA fine-tuning of the base model on the generated examples, on Ray Train.

Read top to bottom:
1. Data (plain functions): `tokenize_example` renders an example with the chat or Alpaca
   template exactly as inference does and masks the prompt out of the labels;
   `pack_examples` concatenates whole examples into rows; `epoch_batches` shuffles per epoch
   (rows of similar length together with `group_by_length`).
2. Model: `load_lora_model` loads the base (bf16, fp32 or 4-bit) and wraps it in a PEFT adapter.
3. Optimisation: `train_step` is one optimizer step over micro-batches; `fit` runs the steps
   of a plan and calls back after each. The loss is the sum over response tokens divided by
   the response tokens of the whole global batch, so N workers with batch B take exactly the
   step that 1 worker takes with batch N*B.
4. Ray (thin): `train_loop_per_worker` runs `fit` on a worker's shard and reports
   checkpoints; `run_train` builds the `TorchTrainer` and publishes the adapter
   (PEFT files, model card, selfspec.json) from the final checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from selfspec.config import SCALE_ONLY_KEYS, ConfigError, RunConfig, TrainConfig
from selfspec.io import (
    RunDir,
    atomic_write_bytes,
    atomic_write_text,
    exists,
    file_digest,
    run_dir_for,
    write_json,
    write_jsonl,
)
from selfspec.schema import user_message

IGNORE_INDEX = -100
EXAMPLE_COLUMNS = ["id", "instruction", "input", "output", "domain"]
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
# Changing these between a run and its resume keeps the step sequence valid.
RESUMABLE_CHANGES = SCALE_ONLY_KEYS["train"]


# -- 1. data ------------------------------------------------------------------
def resolve_template(requested: str, tokenizer) -> str:
    """`auto` is the chat template when the tokenizer has one, else Alpaca (as inference does)."""
    if requested == "auto":
        return "chat" if tokenizer.chat_template else "alpaca"
    if requested == "chat" and not tokenizer.chat_template:
        raise ConfigError("train.template=chat, but the model's tokenizer has no chat template; use alpaca")
    return requested


def render_example(example: dict[str, Any], tokenizer, template: str) -> tuple[str, str]:
    """Split an example into (prompt, response) text; the prompt is what inference feeds the model."""
    from selfspec.models import render_plain

    user = [{"role": "user", "content": user_message(example["instruction"], example.get("input") or "")}]
    eos_reply = example["output"] + (tokenizer.eos_token or "")
    if template == "alpaca":
        return render_plain(user), eos_reply
    prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(
        user + [{"role": "assistant", "content": example["output"]}], tokenize=False
    )
    # Templates that rewrite earlier turns (e.g. strip reasoning) do not extend the prompt.
    return (prompt, full[len(prompt) :]) if full.startswith(prompt) else (prompt, eos_reply)


def tokenize_example(
    example: dict[str, Any], tokenizer, template: str, max_seq_len: int
) -> tuple[dict[str, list[int]] | None, str | None]:
    """-> ({input_ids, labels}, None) with prompt labels masked, or (None, drop reason).

    Prompt and response are tokenized apart, so the prompt tokens are those inference sees.
    A response that overflows `max_seq_len` is cut; a prompt that fills it is dropped.
    """
    if not example["output"].strip():
        return None, "empty_output"
    prompt, response = render_example(example, tokenizer, template)
    from selfspec.models import prompt_ids as encode_prompt

    prompt_ids = encode_prompt(tokenizer, prompt)
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if len(prompt_ids) >= max_seq_len:
        return None, "prompt_too_long"
    input_ids = (prompt_ids + response_ids)[:max_seq_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_seq_len]
    return {"input_ids": input_ids, "labels": labels}, None


def tokenize_examples(
    examples: list[dict[str, Any]], tokenizer, template: str, max_seq_len: int
) -> tuple[list[dict[str, list[int]]], Counter]:
    """Tokenize in id order (a stable order whatever the shard's arrival order); count drops."""
    records, drops = [], Counter()
    for example in sorted(examples, key=lambda e: e["id"]):
        record, reason = tokenize_example(example, tokenizer, template, max_seq_len)
        if record is None:
            drops[reason] += 1
        else:
            records.append(record)
    return records, drops


def pack_examples(records: list[dict[str, list[int]]], max_seq_len: int) -> list[dict[str, list[int]]]:
    """Concatenate whole examples, in order, into rows of at most `max_seq_len` tokens.

    Examples in one row attend to the ones before them (no block-diagonal mask on CPU
    attention); their prompts stay masked, so the loss is still on responses only.
    """
    rows: list[dict[str, list[int]]] = []
    ids: list[int] = []
    labels: list[int] = []
    for record in records:
        if ids and len(ids) + len(record["input_ids"]) > max_seq_len:
            rows.append({"input_ids": ids, "labels": labels})
            ids, labels = [], []
        ids = ids + record["input_ids"]
        labels = labels + record["labels"]
    if ids:
        rows.append({"input_ids": ids, "labels": labels})
    return rows


# Rows sorted by length together, for group_by_length: HF Trainer's megabatch of 50 batches.
LENGTH_GROUP_BATCHES = 50


def epoch_batches(rows: list[dict], batch_size: int, seed: int, epoch: int, group_by_length: bool = False) -> list[list[dict]]:
    """This epoch's micro-batches: a permutation seeded by (seed, epoch), cut into batches.
    `group_by_length`: each window of 50 batches' rows is sorted by length before the cut and
    the batches are shuffled, so a batch holds rows of similar length and pads little (as HF
    Trainer's `group_by_length`; random batches of the finance-1k set padded to 1.6x its tokens)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(rows), generator=generator).tolist()
    if group_by_length:
        window = LENGTH_GROUP_BATCHES * batch_size
        order = [
            i for s in range(0, len(order), window)
            for i in sorted(order[s : s + window], key=lambda i: -len(rows[i]["input_ids"]))
        ]
    batches = [[rows[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]
    if group_by_length:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


def collate(rows: list[dict[str, list[int]]], pad_id: int, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Right-pad to the longest row; padding is masked from attention and loss."""
    width = max(len(r["input_ids"]) for r in rows)
    pad = [width - len(r["input_ids"]) for r in rows]
    batch = {
        "input_ids": [r["input_ids"] + [pad_id] * n for r, n in zip(rows, pad)],
        "attention_mask": [[1] * len(r["input_ids"]) + [0] * n for r, n in zip(rows, pad)],
        "labels": [r["labels"] + [IGNORE_INDEX] * n for r, n in zip(rows, pad)],
    }
    return {k: torch.tensor(v, device=device) for k, v in batch.items()}


@dataclass(frozen=True)
class StepPlan:
    """Optimizer steps per epoch and in all; a step is `grad_accum` micro-batches per worker."""

    steps_per_epoch: int
    total_steps: int
    grad_accum: int

    @classmethod
    def build(cls, micro_batches_per_epoch: int, cfg: TrainConfig) -> "StepPlan":
        per_epoch = max(1, math.ceil(micro_batches_per_epoch / cfg.grad_accum))
        total = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))
        return cls(per_epoch, total, cfg.grad_accum)


def planned_steps(
    rows: list[dict], plan: StepPlan, batch_size: int, seed: int, start_step: int = 0, group_by_length: bool = False
) -> Iterator[tuple[int, list[list[dict]]]]:
    """Yield (step number, micro-batches) from `start_step + 1` to the end of the plan.

    The order depends only on the seed and the epoch, so a resumed run takes the same
    batches the uninterrupted run would have taken.
    """
    step = start_step
    while step < plan.total_steps:
        epoch, position = divmod(step, plan.steps_per_epoch)
        batches = epoch_batches(rows, batch_size, seed, epoch, group_by_length)
        for k in range(position, plan.steps_per_epoch):
            if step >= plan.total_steps:
                return
            step += 1
            yield step, batches[k * plan.grad_accum : (k + 1) * plan.grad_accum]


# -- 2. model -----------------------------------------------------------------
def check_qlora(cfg: TrainConfig) -> None:
    """QLoRA quantizes the base to 4 bits with bitsandbytes, which needs CUDA."""
    if cfg.qlora and not cfg.use_gpu:
        raise ConfigError(
            "train.qlora=true needs a CUDA GPU (4-bit base via bitsandbytes); "
            "set train.use_gpu=true on a GPU cluster, or train.qlora=false to train LoRA on CPU"
        )


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 mixed precision where the hardware runs it fast; None means plain fp32."""
    from selfspec.models.hf_backend import cpu_has_bf16

    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_bf16() else None


def load_lora_model(model_ref: str, cfg: TrainConfig, device: torch.device, amp: torch.dtype | None):
    """-> (PeftModel with a fresh adapter, tokenizer). Only adapter weights require grad.

    Under bf16 the frozen base is stored in bf16 (as the inference backend loads it);
    adapter weights stay fp32 (PEFT upcasts them) and autocast runs the matmuls in bf16.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfspec.models import resolve_model

    path = resolve_model(model_ref)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs: dict[str, Any] = {"dtype": amp or torch.float32}
    if cfg.qlora:
        kwargs.update(quantization_config=_bnb_config(device), device_map={"": device})
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if cfg.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model.config.use_cache = False
    torch.manual_seed(cfg.seed)  # the same adapter init on every worker and every retry
    lora = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():  # peft calls a transformers method deprecated in v5
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        model = get_peft_model(model, lora)
    # PEFT would record the resolved cache folder; the config's reference is the portable name.
    model.peft_config["default"].base_model_name_or_path = model_ref
    if device.type == "cpu":
        use_fast_lora_inputs(model)
        use_matmul_attention(model)
    contiguous_output_layer_input(model)
    return model.to(device), tokenizer


def contiguous_output_layer_input(model) -> None:
    """The forward's last-position logits (`logits_to_keep=1`) read a strided slice of the
    hidden states; with autograd on, torch's matmul then expands the output layer's weight
    once per row and copies it (8 x 576 x 49152 values for SmolLM2 at batch 8, 13% of a
    step). A contiguous input folds into one plain matmul."""
    head = model.get_base_model().get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))


TRAIN_ATTENTION = "selfspec_train"
# Longer rows go to SDPA: its kernel never holds rows x heads x length^2 fp32 scores, whose
# elementwise passes grow with the square. Whole LoRA steps, batches of 8 packed rows, bf16, AVX512-BF16
# EPYC, per batch in one process, two runs (`train_throughput.py --attention-crossover`): x1.12-1.13 at
# 128 tokens, x1.09-1.10 at 256 and at 320, x0.92-0.98 at 384, x0.88-0.97 at 512.
MATMUL_ATTENTION_MAX_KEYS = 320


def matmul_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Training attention on CPU as two batched matmuls around an fp32 softmax, the arithmetic
    of transformers' eager attention. Up to MATMUL_ATTENTION_MAX_KEYS keys, whole LoRA steps run
    faster than with the CPU flash-attention kernel, and longer rows slower (the figures are at
    that constant). Each key/value head serves its group of
    query heads as one taller matmul, without repeating the keys. Under bf16 the scores are
    rounded to bf16 before the softmax, as in eager attention (SDPA's kernel keeps them in
    fp32): a first loss moves 0.5-0.8% from fp32's instead of 0.3%, and the adapter gradients
    keep the same cosine to fp32's (0.9994 vs 0.9991; `benchmarks/train_throughput.py` shows
    the loss curves). Long rows, dropout, softcaps, sinks and position biases go to SDPA."""
    if (
        key.shape[-2] > MATMUL_ATTENTION_MAX_KEYS
        or dropout
        or kwargs.get("softcap")
        or kwargs.get("s_aux") is not None
        or kwargs.get("position_bias") is not None
    ):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    batch, heads, length, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[-2]
    group = heads // kv_heads
    scale = dim**-0.5 if scaling is None else scaling
    q = query.reshape(batch, kv_heads, group * length, dim)
    scores = torch.matmul(q, key.transpose(-1, -2)).float().mul_(scale).view(batch, kv_heads, group, length, keys)

    def by_group(mask: torch.Tensor) -> torch.Tensor:  # (batch, heads or 1, length, keys) -> the scores' shape
        return mask.unflatten(1, (kv_heads, group)) if mask.shape[1] == heads and group > 1 else mask.unsqueeze(2)

    if attention_mask is None:
        causal = length > 1 and getattr(module, "is_causal", True)
        hidden = torch.ones(length, keys, dtype=torch.bool, device=query.device).triu_(keys - length + 1) if causal else None
    elif attention_mask.dtype == torch.bool:
        hidden = by_group(~attention_mask)
    else:
        hidden = None
        scores = scores.add_(by_group(attention_mask.float()))
    if hidden is not None:  # finite, as eager: a fully masked row stays a number
        scores = scores.masked_fill_(hidden, torch.finfo(torch.float32).min)
    probs = scores.softmax(dim=-1).to(value.dtype).view(batch, kv_heads, group * length, keys)
    out = torch.matmul(probs, value).view(batch, heads, length, dim)
    return out.transpose(1, 2).contiguous(), None


def use_matmul_attention(model) -> None:
    """CPU training: SDPA's attention becomes `matmul_attention` (other choices stay)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(TRAIN_ATTENTION, matmul_attention)
    AttentionMaskInterface.register(TRAIN_ATTENTION, sdpa_mask)
    base = model.get_base_model()
    if base.config._attn_implementation == "sdpa":
        base.set_attn_implementation(TRAIN_ATTENTION)


class MaskedDropout(torch.nn.Module):
    """Inverted dropout (keep probability 1 - p, kept values scaled by 1 / (1 - p)), as
    nn.Dropout, cheaper on CPU, where nn.Dropout took 21% of a LoRA step on 2 cores:
    - the mask comes from the four 16-bit lanes of 64-bit words, drawn by numpy's SFC64
      seeded from torch's default generator (so `torch.manual_seed` and saved RNG states
      still fix it); torch's own generator draws one number per element, and slower;
    - the mask is a 0/1 tensor in the input's dtype, applied by a multiply (forward and
      backward), which runs several times faster than `torch.where` on a boolean mask.
    p is exact to 1/65536."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.threshold = -32768 + round(p * 65536)  # a lane below it drops its element

    def keep(self, x: torch.Tensor) -> torch.Tensor:
        """1 with probability 1 - p and 0 otherwise, in x's shape and dtype."""
        n = x.numel()
        seed = int(torch.randint(0, 2**62, (1,)).item())
        words = torch.from_numpy(np.random.SFC64(seed).random_raw(-(-n // 4)).view(np.int64))
        lanes = words.view(torch.int16)[:n].to(device=x.device, dtype=torch.int32)
        return lanes.sub_(self.threshold).clamp_(-1, 0).add_(1).to(x.dtype).view(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return x * self.keep(x) * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def low_rank_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """PEFT's LoRA `Linear.forward` for plain LoRA, the same arithmetic with less work on the
    full-width tensors: dropout's 1 / (1 - p) and the LoRA scaling multiply the rank-r
    activations instead of the layer's input and output, and the update is added inside the
    lora_B matmul (in place). Anything else (merged, disabled, mixed adapters, DoRA and other
    variants, lora_B bias) takes PEFT's own forward."""
    plain = not (self.disable_adapters or self.merged or args or kwargs or getattr(self, "lora_variant", None)) and all(
        self.lora_B[name].bias is None for name in self.active_adapters if name in self.lora_B
    )
    if not plain:
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    dtype = result.dtype
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        dropout, scale = self.lora_dropout[name], self.scaling[name]
        if isinstance(dropout, MaskedDropout) and dropout.training and dropout.p > 0:
            h = self.lora_A[name](x * dropout.keep(x))
            scale = scale / (1.0 - dropout.p)
        else:
            h = self.lora_A[name](dropout(x))
        # In place: the base layer's output is not saved for its backward, and the update
        # is added without copying it (a full-width copy per layer and adapter otherwise).
        weight = self.lora_B[name].weight
        result.view(-1, result.shape[-1]).addmm_((h * scale).reshape(-1, h.shape[-1]).to(dtype), weight.t().to(dtype))
    return result


def use_fast_lora_inputs(model) -> None:
    """CPU savings in PEFT's LoRA layers, the same arithmetic:
    - its dropout modules become `MaskedDropout` (the same distribution, cheaper masks);
    - the layer input is no longer cast to the adapter's fp32 dtype. Under bf16 autocast the
      adapter matmul casts it straight back, so the copy only cost time (11% of a step);
    - plain LoRA `Linear` layers run `low_rank_forward` (scalings on rank-r activations,
      the update added inside the matmul)."""
    import types

    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False
            for name, dropout in getattr(module, "lora_dropout", {}).items():
                if isinstance(dropout, torch.nn.Dropout):
                    module.lora_dropout[name] = MaskedDropout(dropout.p)
        if type(module) is LoraLinear:
            module.forward = types.MethodType(low_rank_forward, module)


def _bnb_config(device: torch.device):
    if device.type != "cuda":
        raise ConfigError("train.qlora=true, but this worker has no CUDA device; QLoRA needs a GPU")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("train.qlora=true needs bitsandbytes on the workers: pip install 'selfspec[gpu]'") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16,
    )


def unwrap(model):
    """The PeftModel inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


# -- 3. optimisation -----------------------------------------------------------
def build_optimizer(model, cfg: TrainConfig, total_steps: int):
    """AdamW over adapter weights, with linear warmup then the configured decay."""
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    name = "constant_with_warmup" if cfg.schedule == "constant" else cfg.schedule
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    return optimizer, get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def response_loss_sum(model, batch: dict[str, torch.Tensor], amp: torch.dtype | None) -> torch.Tensor:
    """Summed next-token cross-entropy over response tokens (labels != IGNORE_INDEX).

    The output layer runs only where a token carries loss: for short answers after long
    prompts that is a small share of positions, and the vocabulary projection is about a
    fifth of the model's matmul work (SmolLM2: 28M of 135M weights)."""
    labels = batch["labels"][:, 1:]
    attention_mask = None if right_padded(batch["attention_mask"]) else batch["attention_mask"]
    context = torch.autocast(batch["input_ids"].device.type, dtype=amp) if amp else nullcontext()
    head = loss_positions_head(model)
    with context:
        if head is None:
            logits = model(input_ids=batch["input_ids"], attention_mask=attention_mask).logits[:, :-1]
        else:
            norm, lm_head = head
            captured: list[torch.Tensor] = []
            hook = norm.register_forward_hook(lambda module, args, out: captured.append(out))
            try:  # the model's forward (through DDP when wrapped) computes one logit per row
                model(input_ids=batch["input_ids"], attention_mask=attention_mask, logits_to_keep=1)
            finally:
                hook.remove()
            keep = labels != IGNORE_INDEX
            if not keep.any():  # zero loss that still reaches every adapter weight (DDP)
                return captured[-1].sum() * 0.0
            hidden = captured[-1][:, :-1][keep]
            return HeadCrossEntropy.apply(hidden, lm_head.weight.to(hidden.dtype), labels[keep])
    return F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def right_padded(attention_mask: torch.Tensor) -> bool:
    """True when every row's padding comes after all its tokens. Causal attention then hides
    the padding from every real token already, so the model can run without the mask: the
    same outputs at real positions, on the faster causal attention kernel (12% of a LoRA
    step on 2 cores)."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


class HeadCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(hidden @ weight.T, targets)) for a frozen output layer, with the
    gradient for `hidden` computed in the forward, a block of rows at a time, as Liger's
    fused linear cross-entropy does. The same arithmetic as `F.cross_entropy` on
    `lm_head(hidden).float()` (log-softmax in fp32, its gradient exp(log p) - onehot cast back
    to the matmul dtype), without ever holding the full fp32 logits and their gradient
    (900 x 49152 floats for a SmolLM2 batch; 262144 columns for Gemma). Measured on 2 cores it
    is about as fast as the unfused path (x1.01 on a step); what it saves is memory."""

    BLOCK_FLOATS = 1 << 24  # 64 MB of fp32 logits per block (340 rows of SmolLM2: matmuls near full rate)

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        rows = max(1, HeadCrossEntropy.BLOCK_FLOATS // weight.shape[0])
        grad_hidden = torch.empty_like(hidden)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            block = slice(start, start + rows)
            log_p = torch.log_softmax((hidden[block] @ weight.t()).float(), dim=-1)
            target = targets[block].unsqueeze(1)
            total -= log_p.gather(1, target).sum()
            grad = log_p.exp_()
            grad.scatter_add_(1, target, torch.full(target.shape, -1.0, device=grad.device))
            torch.mm(grad.to(weight.dtype), weight, out=grad_hidden[block])
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None


def loss_positions_head(model) -> tuple[Any, Any] | None:
    """(final norm, output layer) of a decoder whose logits are just lm_head(norm(h)), or
    None (softcapped or scaled logits, other layouts): then the full forward is used."""
    base = unwrap(model).get_base_model()
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    norm, lm_head = getattr(decoder, "norm", None), getattr(base, "lm_head", None)
    if norm is None or not isinstance(lm_head, torch.nn.Linear) or lm_head.weight.requires_grad:
        return None
    return norm, lm_head


def count_tokens(micro_batches: list[list[dict]]) -> tuple[int, int]:
    """(response tokens that carry loss, all tokens) in a step's micro-batches."""
    targets = sum(sum(1 for t in r["labels"][1:] if t != IGNORE_INDEX) for b in micro_batches for r in b)
    tokens = sum(len(r["input_ids"]) for b in micro_batches for r in b)
    return targets, tokens


def train_step(
    model,
    optimizer,
    scheduler,
    micro_batches: list[list[dict]],
    *,
    global_targets: int,
    world_size: int,
    pad_id: int,
    device: torch.device,
    amp: torch.dtype | None,
    max_grad_norm: float,
) -> tuple[float, float]:
    """One optimizer step; -> (this worker's summed response loss, gradient norm).

    Each micro-batch's summed loss is divided by the global batch's response tokens and
    multiplied by the world size, which DDP's gradient averaging divides out again.
    """
    optimizer.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for i, rows in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        # Gradients are all-reduced once per step, on the last micro-batch.
        sync = nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            loss = response_loss_sum(model, collate(rows, pad_id, device), amp)
            (loss * world_size / global_targets).backward()
        loss_sum += loss.item()
    params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    optimizer.step()
    scheduler.step()
    return loss_sum, float(norm)


@dataclass
class StepMetrics:
    step: int
    epoch: float
    loss: float
    lr: float
    grad_norm: float
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def row(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": round(self.epoch, 4),
            "loss": self.loss,
            "lr": self.lr,
            "grad_norm": self.grad_norm,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 4),
            "tokens_per_s": round(self.tokens_per_s, 2),
        }


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """Sum (or min) across data-parallel workers; the identity in a single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.SUM)
    return tensor.tolist()


def worker_node_ids() -> list[str]:
    """The Ray node id of every worker, in rank order (run metadata: where training ran)."""
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [node]
    nodes: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    return [str(n) for n in nodes]


def fit(
    model,
    optimizer,
    scheduler,
    rows: list[dict],
    cfg: TrainConfig,
    plan: StepPlan,
    *,
    pad_id: int,
    device: torch.device,
    amp: torch.dtype | None,
    start_step: int = 0,
    world_size: int = 1,
    on_step: Callable[[StepMetrics], None] = lambda m: None,
) -> None:
    """Run the plan's steps after `start_step`, calling `on_step` after each."""
    model.train()
    for step, micro_batches in planned_steps(rows, plan, cfg.batch_size, cfg.seed, start_step, cfg.group_by_length):
        started = time.perf_counter()
        targets, tokens = all_reduce(list(count_tokens(micro_batches)))
        lr = scheduler.get_last_lr()[0]
        loss_sum, norm = train_step(
            model,
            optimizer,
            scheduler,
            micro_batches,
            global_targets=int(targets),
            world_size=world_size,
            pad_id=pad_id,
            device=device,
            amp=amp,
            max_grad_norm=cfg.max_grad_norm,
        )
        (global_loss,) = all_reduce([loss_sum])
        on_step(
            StepMetrics(
                step=step,
                epoch=step / plan.steps_per_epoch,
                loss=global_loss / targets,
                lr=lr,
                grad_norm=norm,
                tokens=int(tokens),
                seconds=time.perf_counter() - started,
            )
        )


# -- checkpoints ----------------------------------------------------------------
def save_checkpoint(directory: str, model, optimizer, scheduler, state: dict[str, Any]) -> None:
    """Adapter (PEFT files), optimizer + scheduler + RNG state, and the JSON trainer state."""
    # Only LoRA weights: the base's embeddings are frozen, so PEFT need not check them.
    unwrap(model).save_pretrained(directory, save_embedding_layers=False)
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()},
        os.path.join(directory, OPTIMIZER_FILE),
    )
    with open(os.path.join(directory, STATE_FILE), "w") as f:
        json.dump(state, f)


def load_adapter_weights(directory: str, model) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(os.path.join(directory, "adapter_model.safetensors"))
    set_peft_model_state_dict(unwrap(model), weights)


def restore_checkpoint(directory: str, model, optimizer, scheduler) -> dict[str, Any]:
    """Load what `save_checkpoint` wrote; -> the trainer state (step, history, ...)."""
    load_adapter_weights(directory, model)
    saved = torch.load(os.path.join(directory, OPTIMIZER_FILE), weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"])
    with open(os.path.join(directory, STATE_FILE)) as f:
        return json.load(f)


# -- 4. Ray Train ----------------------------------------------------------------
def train_loop_per_worker(loop: dict[str, Any]) -> None:
    """One data-parallel worker: tokenize its shard, restore the latest checkpoint, train.

    `loop` holds the run's `TrainConfig` (as a dict), the model reference, the metrics
    path and an optional `fail_at_step` (fault-injection test).
    """
    import ray.train
    import ray.train.torch
    from tqdm import tqdm

    cfg = TrainConfig(**loop["train"])
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    amp = autocast_dtype(cfg.precision, device)
    model, tokenizer = load_lora_model(loop["model_ref"], cfg, device, amp)
    template = resolve_template(cfg.template, tokenizer)

    examples = list(ray.train.get_dataset_shard("train").iter_rows())
    records, drops = tokenize_examples(examples, tokenizer, template, cfg.max_seq_len)
    rows = pack_examples(records, cfg.max_seq_len) if cfg.packing else records
    plan = plan_for_all_workers(len(rows), cfg)

    optimizer, scheduler = build_optimizer(model, cfg, plan.total_steps)
    state: dict[str, Any] = {"step": 0, "history": [], "restored_from_steps": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = restore_checkpoint(directory, model, optimizer, scheduler)
        state["restored_from_steps"].append(state["step"])
    model = ray.train.torch.prepare_model(model) if world_size > 1 else model
    state.update(
        examples=int(all_reduce([len(examples)])[0]),
        dropped=_sum_counters(drops),
        template=template,
        precision=str(amp or torch.float32).removeprefix("torch."),
        num_workers=world_size,
        node_ids=worker_node_ids(),
        total_steps=plan.total_steps,
        steps_per_epoch=plan.steps_per_epoch,
    )
    progress = tqdm(total=plan.total_steps, initial=state["step"], desc="train", disable=rank != 0, mininterval=2)

    def on_step(metrics: StepMetrics) -> None:
        state["step"] = metrics.step
        state["history"].append(metrics.row())
        progress.update(1)
        progress.set_postfix(loss=f"{metrics.loss:.4f}", tok_s=f"{metrics.tokens_per_s:.0f}")
        if rank == 0:
            write_jsonl(loop["metrics_path"], state["history"])
        if metrics.step % cfg.checkpoint_every == 0 or metrics.step == plan.total_steps:
            _report_checkpoint(model, optimizer, scheduler, state, rank)
        if rank == 0 and metrics.step == loop.get("fail_at_step"):
            _inject_failure(loop["failure_marker"], metrics.step)

    fit(
        model,
        optimizer,
        scheduler,
        rows,
        cfg,
        plan,
        pad_id=tokenizer.pad_token_id,
        device=device,
        amp=amp,
        start_step=state["step"],
        world_size=world_size,
        on_step=on_step,
    )
    progress.close()


def plan_for_all_workers(local_rows: int, cfg: TrainConfig) -> StepPlan:
    """Every worker must take the same number of steps (DDP), so plan on the smallest shard."""
    (smallest,) = all_reduce([math.ceil(local_rows / cfg.batch_size)], op="min")
    if smallest == 0:
        raise ConfigError("a worker has no trainable examples: all were dropped, or there are fewer examples than workers")
    return StepPlan.build(int(smallest), cfg)


def _sum_counters(drops: Counter) -> dict[str, int]:
    """Drop counts summed over workers (same reason keys on every worker)."""
    reasons = ["empty_output", "prompt_too_long"]
    totals = all_reduce([float(drops.get(r, 0)) for r in reasons])
    return {r: int(n) for r, n in zip(reasons, totals) if n}


def _report_checkpoint(model, optimizer, scheduler, state: dict[str, Any], rank: int) -> None:
    """Rank 0 writes the checkpoint (adapter and optimizer are identical on every rank)."""
    import ray.train

    metrics = {"step": state["step"], "loss": state["history"][-1]["loss"]}
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="selfspec-ckpt-") as directory:
        save_checkpoint(directory, model, optimizer, scheduler, state)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(directory),
            checkpoint_dir_name=f"checkpoint-{state['step']:06d}",
        )


def _inject_failure(marker: str, step: int) -> None:
    """Fail once at `step` (fault-tolerance test); the marker keeps the retry from failing."""
    if exists(marker):
        return
    atomic_write_text(marker, f"injected failure at step {step}\n")
    raise RuntimeError(f"injected failure at step {step} (SELFSPEC_FAIL_AT_STEP)")


# -- driver -------------------------------------------------------------------------
def _local_or_uri(path: str) -> str:
    """Ray Train wants an absolute local path or a URI."""
    return path if "://" in path else os.path.abspath(path)


def examples_domain(path: str) -> tuple[str, int]:
    """-> (the examples' domain, number of rows); several domains train one 'mixed' adapter."""
    import pyarrow.parquet as pq

    if not exists(path):
        raise FileNotFoundError(f"no generated examples at {path}; run `selfspec generate` first")
    column = pq.read_table(path, columns=["domain"]).column("domain").to_pylist()
    if not column:
        raise ConfigError(f"{path} holds no examples; generate data before training")
    domains = sorted({d or "general" for d in column})
    return (domains[0] if len(domains) == 1 else "mixed"), len(column)


def resume_fingerprint(config: RunConfig, examples_digest: str) -> dict[str, Any]:
    """What must match between a run and its resume for the step sequence to stay valid."""
    train = {k: v for k, v in config.train.model_dump(mode="json").items() if k not in RESUMABLE_CHANGES}
    return {"model": config.model.ref, "train": train, "examples": examples_digest}


def _prepare_storage(run_path: str, fingerprint: dict[str, Any], resume: bool | str) -> bool:
    """Start the Ray run folder afresh, or check it belongs to this config; -> resuming?

    `resume=True` continues the run folder or fails naming what changed; `"auto"` (the
    pipeline) continues it when nothing changed and starts over otherwise.
    """
    stamp = f"{run_path}/selfspec-train.json"
    if resume and exists(stamp):
        from selfspec.io import read_json

        saved = read_json(stamp)
        if saved == fingerprint:
            return True
        if resume != "auto":
            changed = sorted(
                k for k in fingerprint["train"] if saved.get("train", {}).get(k) != fingerprint["train"][k]
            )
            if saved.get("model") != fingerprint["model"]:
                changed.insert(0, "model.ref")
            if saved.get("examples") != fingerprint["examples"]:
                changed.append("the examples (data/examples.parquet)")
            raise ConfigError(
                f"cannot resume {run_path}: config changed since it started ({', '.join(changed)}); "
                "train without --resume to start over"
            )
    if "://" not in run_path:
        # A fresh run must not pick up old checkpoints (Ray restores a run folder it finds).
        shutil.rmtree(run_path, ignore_errors=True)
        Path(run_path).parent.joinpath("metrics.jsonl").unlink(missing_ok=True)
    write_json(stamp, fingerprint)
    return False


def run_train(
    config: RunConfig,
    run_dir: RunDir,
    resume: bool | str = False,
    round: int = 1,
    fail_at_step: int | None = None,
) -> dict[str, Any]:
    """Fine-tune a LoRA adapter on `run_dir/data/examples.parquet` with Ray Train.

    Checkpoints go to `run_dir/train/<domain>-r<round>/`, metrics to
    `run_dir/train/metrics.jsonl`, the adapter to `run_dir/adapters/<domain>-r<round>/`.
    `resume` continues from the latest checkpoint (`"auto"`: when config and data are
    unchanged, else start over). `fail_at_step` raises once at that
    step (fault-tolerance tests). Needs a running Ray. -> the train summary.
    """
    cfg = config.train
    check_qlora(cfg)
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    examples_path = run_dir.path("data", "examples.parquet")
    domain, _ = examples_domain(examples_path)
    name = f"{domain}-r{round}"
    storage = _local_or_uri(run_dir.path("train"))
    fingerprint = resume_fingerprint(config, file_digest(examples_path))
    resuming = _prepare_storage(f"{storage}/{name}", fingerprint, resume)

    # Read before the workers start: the workers hold the CPUs, so Ray Data tasks
    # scheduled afterwards would wait for them forever.
    dataset = ray.data.read_parquet(examples_path, columns=EXAMPLE_COLUMNS).materialize()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": cfg.model_dump(mode="json"),
            "model_ref": config.model.ref,
            "metrics_path": f"{storage}/metrics.jsonl",
            "fail_at_step": fail_at_step,
            "failure_marker": f"{storage}/{name}/injected-failure-{fail_at_step}",
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": dataset},
    )
    started = time.time()
    result = trainer.fit()
    with result.checkpoint.as_directory() as directory:
        state = json.loads(Path(directory, STATE_FILE).read_text())
        summary = train_summary(state, run_dir.path("adapters", name), time.time() - started, resuming)
        publish_adapter(directory, config, run_dir, name, domain, round, summary, examples_path)
    return summary


def train_summary(state: dict[str, Any], adapter: str, seconds: float, resumed: bool) -> dict[str, Any]:
    history = state["history"]
    tokens = sum(h["tokens"] for h in history)
    busy = sum(h["seconds"] for h in history)
    return {
        "adapter": adapter,
        "steps": state["step"],
        "epochs": history[-1]["epoch"],
        "first_loss": history[0]["loss"],
        "final_loss": history[-1]["loss"],
        "tokens": tokens,
        "tokens_per_s": round(tokens / busy, 2) if busy else 0.0,
        "seconds": round(seconds, 2),
        "examples": state["examples"],
        "dropped": state["dropped"],
        "template": state["template"],
        "precision": state["precision"],
        "num_workers": state["num_workers"],
        "resumed": resumed,
        "restored_from_steps": state["restored_from_steps"],
        "node_ids": state.get("node_ids", []),
    }


def publish_adapter(
    checkpoint_dir: str,
    config: RunConfig,
    run_dir: RunDir,
    name: str,
    domain: str,
    round: int,
    summary: dict[str, Any],
    examples_path: str,
) -> None:
    """Copy the final adapter out of its checkpoint and write the model card and selfspec.json."""
    target = run_dir.path("adapters", name)
    for filename in ADAPTER_FILES:
        atomic_write_bytes(f"{target}/{filename}", Path(checkpoint_dir, filename).read_bytes())
    write_json(
        f"{target}/selfspec.json",
        {
            "domain": domain,
            "base_model": config.model.ref,
            "run": config.name,
            "round": round,
            "adapter": name,
            "config_hash": config.section_hash("model", "train"),
            "train": summary,
        },
    )
    atomic_write_text(f"{target}/README.md", model_card(config, name, domain, round, summary, examples_path))


def model_card(
    config: RunConfig, name: str, domain: str, round: int, summary: dict[str, Any], examples_path: str
) -> str:
    """A Hugging Face style model card: base model, data, config and metrics."""
    cfg = config.train
    settings = "\n".join(f"| {k} | {v} |" for k, v in cfg.model_dump(mode="json").items())
    dropped = ", ".join(f"{k}: {v}" for k, v in summary["dropped"].items()) or "none"
    return f"""---
base_model: {config.model.ref}
library_name: peft
pipeline_tag: text-generation
tags: [lora, self-specialization, selfspec, {domain}]
---

# {name}: a self-specialized LoRA adapter for {domain}

A LoRA adapter over `{config.model.ref}`, trained by selfspec (Self-Specialization,
Kang et al. 2023) on instruction data that the base model generated from {domain} seed
tasks; round {round} of run `{config.name}`.

## Data
- Examples: `{examples_path}` ({summary["examples"]} rows; dropped: {dropped})
- Template: {summary["template"]}; loss on response tokens only

## Training
| setting | value |
|---|---|
{settings}

Precision: {summary["precision"]}; workers: {summary["num_workers"]}.

## Metrics
| metric | value |
|---|---|
| steps | {summary["steps"]} |
| epochs | {summary["epochs"]} |
| first-step loss | {summary["first_loss"]:.4f} |
| final loss | {summary["final_loss"]:.4f} |
| training tokens | {summary["tokens"]} |
| tokens/s | {summary["tokens_per_s"]} |
| wall time (s) | {summary["seconds"]} |

Per-step metrics: `train/metrics.jsonl` in the run directory.

## Use
```python
from peft import PeftModel
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained(BASE_DIR)  # selfspec.models.resolve_model("{config.model.ref}")
model = PeftModel.from_pretrained(base, "{name}")
```
Or merge it into a full model: `selfspec export {name} --merge --out DIR`.
"""


def format_summary(summary: dict[str, Any]) -> str:
    return (
        f"trained {summary['adapter']}: {summary['steps']} steps, loss {summary['first_loss']:.4f} -> "
        f"{summary['final_loss']:.4f}, {summary['tokens_per_s']:.0f} tokens/s, {summary['seconds']:.0f}s"
        + (f", restored from steps {summary['restored_from_steps']}" if summary["restored_from_steps"] else "")
    )


def cli(config: RunConfig, args: argparse.Namespace) -> int:
    """`selfspec train [--resume]`; SELFSPEC_FAIL_AT_STEP=k injects one failure at step k."""
    from selfspec.runtime import init_ray

    check_qlora(config.train)
    init_ray()
    fail_at = os.environ.get("SELFSPEC_FAIL_AT_STEP")
    summary = run_train(
        config, run_dir_for(config), resume=args.resume, fail_at_step=int(fail_at) if fail_at else None
    )
    print(format_summary(summary))
    return 0


# -- export ---------------------------------------------------------------------------
def export_adapter(adapter: str, out: str, merge: bool = False) -> str:
    """Copy an adapter directory to `out`, or (merge) write base + adapter as one full model.

    The base is the adapter's `base_model_name_or_path` (a selfspec model reference or
    any path/hub id). -> the output directory.
    """
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfspec.models import resolve_model

    if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        raise FileNotFoundError(f"{adapter} is not an adapter directory (no adapter_config.json)")
    if not merge:
        shutil.copytree(adapter, out, dirs_exist_ok=True)
        return out
    base_ref = PeftConfig.from_pretrained(adapter).base_model_name_or_path
    base_path = resolve_model(base_ref)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_path).save_pretrained(out)
    card = os.path.join(adapter, "README.md")
    if os.path.isfile(card):
        shutil.copy(card, os.path.join(out, "README.md"))
    return out


def cli_export(config: RunConfig, args: argparse.Namespace) -> int:
    """`selfspec export ADAPTER --out DIR [--merge]`."""
    out = export_adapter(args.adapter, args.out, merge=args.merge)
    print(f"{'merged model' if args.merge else 'adapter'} written to {out}")
    return 0
