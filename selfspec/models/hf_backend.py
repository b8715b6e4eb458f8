"""The transformers engine: batched generation and scoring on CPU or a small GPU.

Requests are grouped by adapter, sorted by length and cut into batches (less padding),
left-padded, and decoded by our own loop over the model's forward pass. The prompt tokens
all rows of a batch share (a chat preamble, a task template) are prefilled once; under
`decode_attention` their KV cache is stored once for all rows, elsewhere repeated to each.
On CPU, decode attention is two batched matmuls per key/value head (`decode_attention`,
registered with transformers), over a KV cache whose new tokens go to a short tail that is
merged once a segment (no whole-cache copy per step); greedy picks take the max of the
logits in the model's dtype; every few tokens the rows that ended (eos or a stop string)
leave the batch and the cache, so the others no longer carry them. Greedy outputs equal
those of `model.generate` with SDPA (fp32 test). Adapters are PEFT LoRA adapters on one shared base: a batch on one
adapter runs with it folded into a copy of the weights it changes (`FoldedAdapter`); a
batch that mixes adapters passes `adapter_names`, which PEFT applies row by row.
Prompts may be token ids, used as given. Generated tokens' logprobs come from each step's
logits; prompt logprobs (OpenAI's echo) from a prefill that keeps the logits at every position,
so it prefills each row whole (no shared prefix) in batches bounded by `PROMPT_LOGITS_BUDGET`.
Long prompts prefill one row at a time (`ROW_PREFILL_MIN_TOKENS`): a row alone needs no padding
mask, so attention takes SDPA's causal path, which skips the masked half that a padded batch's
explicit mask makes it compute (`benchmarks/prefill_rows.py`); its cache joins the batch's.
Rows prefilled alone (and log-likelihood's contexts, prefilled the same way) keep their KV
caches in `PromptCache`, and a later row under the same adapter prefills only past the longest
prefix an entry shares with it: the header and seed demos of generation prompts, a prompt just
scored (an evaluation's two scorings) whole, as vLLM's automatic prefix caching does.
"""

from __future__ import annotations

import functools
import os
import warnings
from contextlib import contextmanager
from collections import OrderedDict
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from transformers import AttentionInterface
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from selfspec.models import (
    BASE_ADAPTER,
    AdapterSpec,
    Completion,
    ModelBackend,
    Prompt,
    SamplingParams,
    TokenLogprob,
    cpu_flags,
)
from selfspec.models.resolve import resolve_model



def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX makes bf16 matmuls several times faster than fp32 on CPU."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def pick_dtype(requested: str, device: str) -> torch.dtype:
    if requested != "auto":
        return getattr(torch, requested)
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class TailedLayer(DynamicLayer):
    """A full-attention KV cache layer kept as contiguous parts: an optional prefix that every
    row shares, stored once (`share_prefix`); `keys`/`values` per row up to the last segment
    boundary (prefills go there); and a tail of the tokens decoded since. A decode step
    appends to the short tail (where one growing tensor would copy the whole cache every
    step) and `decode_attention` reads all parts; `merge` folds the tail in, once a segment."""

    prefix_keys: torch.Tensor | None = None
    prefix_values: torch.Tensor | None = None
    tail_keys: torch.Tensor | None = None
    tail_values: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if self.tail_keys is None or key_states.shape[-2] > 1:  # a prefill: into the per-row part
            self.merge()
            keys, values = super().update(key_states, value_states)
            self.tail_keys, self.tail_values = keys[:, :, :0], values[:, :, :0]
            if self.prefix_keys is None:
                return keys, values
        else:
            self.tail_keys = torch.cat([self.tail_keys, key_states], dim=-2)
            self.tail_values = torch.cat([self.tail_values, value_states], dim=-2)
        parts = [(self.keys, self.values), (self.tail_keys, self.tail_values)]
        if self.prefix_keys is not None:
            parts.insert(0, (self.prefix_keys, self.prefix_values))
        _PENDING_PARTS.set((self.keys, [part for part in parts if part[0].shape[-2]]))
        return self.keys, self.values

    def share_prefix(self, batch: int) -> None:
        """Make the tokens cached so far, for one row, the prefix all `batch` rows share."""
        self.merge()
        self.prefix_keys, self.prefix_values = self.keys, self.values
        self.keys = self.keys.new_empty((batch, *self.keys.shape[1:2], 0, self.keys.shape[-1]))
        self.values = self.values.new_empty((batch, *self.values.shape[1:2], 0, self.values.shape[-1]))
        self.tail_keys, self.tail_values = self.keys, self.values

    def get_seq_length(self) -> int:
        own = super().get_seq_length() + (0 if self.tail_keys is None else self.tail_keys.shape[-2])
        return own + (0 if self.prefix_keys is None else self.prefix_keys.shape[-2])

    def merge(self) -> None:
        if self.tail_keys is not None and self.tail_keys.shape[-2]:
            self.keys = torch.cat([self.keys, self.tail_keys], dim=-2)
            self.values = torch.cat([self.values, self.tail_values], dim=-2)
            self.tail_keys, self.tail_values = self.keys[:, :, :0], self.values[:, :, :0]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.merge()
        if self.tail_keys is not None:  # the shared prefix stays as it is
            self.keys, self.values = self.keys[indices], self.values[indices]
            self.tail_keys, self.tail_values = self.keys[:, :, :0], self.values[:, :, :0]


# The layer that updated last, as (its per-row keys, its non-empty (keys, values) parts in
# sequence order): its attention call, which comes right after, reads the parts from here
# (as vLLM's forward context carries state).
_PENDING_PARTS: ContextVar[tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]] | None] = ContextVar(
    "selfspec_pending_parts", default=None
)
DECODE_ATTENTION = "selfspec_decode"


def decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention for one new token per row as batched matmuls per key/value head (each serves
    its group of query heads without repeating the cache), over the cache and, for a
    `TailedLayer`, its tail; softmax in fp32, as transformers' eager attention computes it.
    2-3x faster than the CPU SDPA kernel at batch 256 on 2 cores. Anything else (prefill,
    softcap, sinks, position bias, strided caches) goes to transformers' SDPA."""
    pending = _PENDING_PARTS.get()
    _PENDING_PARTS.set(None)
    parts = pending[1] if pending is not None and pending[0] is key else [(key, value)]
    batch, heads, _, dim = query.shape
    plain = query.shape[2] != 1 or dropout or kwargs.get("softcap") or kwargs.get("s_aux") is not None
    if plain or kwargs.get("position_bias") is not None or not all(k.is_contiguous() for k, _ in parts):
        if len(parts) > 1:
            key, value = (torch.cat([t.expand(batch, -1, -1, -1) for t in p], dim=-2) for p in zip(*parts))
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    kv_heads = key.shape[1]
    group = heads // kv_heads
    q = query.reshape(batch * kv_heads, group, dim)
    # A part stored once for all rows (the shared prefix): one matmul per key/value head.
    shared = [len(k) == 1 < batch for k, _ in parts]
    q_by_head = query.view(batch, kv_heads, group, dim).transpose(0, 1).reshape(kv_heads, batch * group, dim) if any(shared) else None
    scale = dim**-0.5 if scaling is None else scaling
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill_(
            ~attention_mask, float("-inf")
        )
    scores, start = [], 0
    for (k, _), once in zip(parts, shared):
        n = k.shape[2]
        bias = None if attention_mask is None else attention_mask[..., start : start + n]
        if once:
            s = torch.matmul(q_by_head, k[0].transpose(1, 2)).view(kv_heads, batch, group, n).transpose(0, 1)
            s = s.mul(scale) if bias is None else torch.add(bias, s, alpha=scale)
            scores.append(s.reshape(batch * kv_heads, group, n))
        else:
            k = k.view(batch * kv_heads, n, dim).transpose(1, 2)
            if bias is None:
                scores.append(torch.bmm(q, k).mul_(scale))
            else:
                bias = bias.expand(batch, kv_heads, 1, n).reshape(batch * kv_heads, 1, n)
                scores.append(torch.baddbmm(bias, q, k, alpha=scale))
        start += n
    probs = torch.cat(scores, dim=-1).softmax(dim=-1, dtype=torch.float32).to(value.dtype)
    out, start = None, 0
    for (k, v), once in zip(parts, shared):
        n = k.shape[2]
        p = probs if len(parts) == 1 else probs[..., start : start + n]
        if once:
            p = p.reshape(batch, kv_heads, group, n).transpose(0, 1).reshape(kv_heads, batch * group, n)
            o = torch.bmm(p, v[0]).view(kv_heads, batch, group, dim).transpose(0, 1).reshape(batch * kv_heads, group, dim)
        else:
            o = torch.bmm(p.contiguous(), v.view(batch * kv_heads, n, dim))
        out = o if out is None else out.add_(o)
        start += n
    return out.view(batch, 1, heads, dim), None


AttentionInterface.register(DECODE_ATTENTION, decode_attention)
AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)


@contextmanager
def attention_implementation(model: Any, name: str) -> Iterator[None]:
    """Run `model` with another registered attention (e.g. "sdpa", to compare against plain
    transformers), then restore its own."""
    ours = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(ours)


def decode_cache(config: Any) -> DynamicCache:
    """The model's DynamicCache with every attention layer holding all of its tokens, the
    sliding-window ones too (the model builds their masks from its config, so the window
    still applies): a prompt's cache can then be kept and reused (`PromptCache`) on Gemma 3
    as on full-attention models, for the KV memory of full attention. Under
    `decode_attention` these layers are `TailedLayer`s; other layer kinds keep transformers' own."""
    cache = DynamicCache(config=config)
    whole = TailedLayer if config._attn_implementation == DECODE_ATTENTION else DynamicLayer
    cache.layers = [whole() if type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) else layer for layer in cache.layers]
    return cache


def full_attention(cache: DynamicCache) -> bool:
    """Whether every layer of `cache` holds all of its tokens (no other layer kind)."""
    return all(type(layer) in (DynamicLayer, TailedLayer) for layer in cache.layers)


def sliding_window(config: Any) -> int | None:
    """The smallest sliding window among the model's layers; None when it has none."""
    layers = DynamicCache(config=config).layers
    return min((layer.sliding_window for layer in layers if type(layer) is DynamicSlidingWindowLayer), default=None)


def prefix_fits(config: Any, length: int) -> bool:
    """Whether a shared prefix may be cached once and followed by each row's padding: always
    under full attention; under a sliding window (which counts cache slots, so padding after
    the prefix would push real tokens out) only when all `length` slots fit in the window."""
    window = sliding_window(config)
    return window is None or length < window


def share_prefix(cache: DynamicCache, batch: int) -> None:
    """Make the one row cached so far the prefix of `batch` rows: stored once in a
    `TailedLayer`, repeated per row in other layers."""
    for layer in cache.layers:
        if isinstance(layer, TailedLayer):
            layer.share_prefix(batch)
        else:
            layer.batch_repeat_interleave(batch)


def merge_tails(cache: DynamicCache) -> None:
    for layer in cache.layers:
        if isinstance(layer, TailedLayer):
            layer.merge()


def shared_prefix_length(input_ids: torch.Tensor, mask: torch.Tensor) -> int:
    """How many leading prompt tokens every row of a left-padded batch shares, leaving each
    row at least one token of its own (whose logits pick its first new token)."""
    lengths = mask.sum(dim=1)
    shortest = int(lengths.min())
    columns = (input_ids.shape[1] - lengths)[:, None] + torch.arange(shortest, device=input_ids.device)
    heads = input_ids.gather(1, columns)
    same = (heads == heads[:1]).all(dim=0)
    return min(int(same.int().cumprod(dim=0).sum()), shortest - 1)


def pick_next(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Next token per row. Greedy: the first maximum of the logits, as generate's argmax
    over an fp32 copy picks, without the copy. Sampling: temperature, then top-p (nucleus)
    as transformers' TopPLogitsWarper keeps it, then one multinomial draw."""
    if params.temperature <= 0:
        return logits.max(dim=-1).indices
    scores = logits.float() / params.temperature
    if params.top_p < 1.0:
        ascending, order = torch.sort(scores, dim=-1)
        drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - params.top_p
        drop[:, -1] = False  # keep at least the most likely token
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(scores.softmax(dim=-1), num_samples=1).squeeze(1)


# Logits the prefill may hold for prompt logprobs (rows x prompt tokens x vocabulary), ~256 MB in fp32.
PROMPT_LOGITS_BUDGET = 1 << 26
# Prompts at least this long prefill row by row (causal attention, no padding mask); at
# this length a row alone fills the matmuls, and attention is a large share of the prefill.
ROW_PREFILL_MIN_TOKENS = 512
# Prompts' KV caches kept for later rows that share a prefix with them (`PromptCache`): a
# 400-token prompt of SmolLM2-135M takes about 9 MB in bf16.
PROMPT_CACHE_BYTES = 512 << 20
# Batches with prompts this long prefill row by row into the cache (row prefill costs what a
# padded batch does from about 350 tokens, benchmarks/prefill_rows.py); shorter ones only
# when the cache already holds most of their tokens.
PROMPT_CACHE_MIN_TOKENS = 256

# One position's (token id, logprob, top-k ids, top-k logprobs); TokenLogprob once texts are decoded.
RawLogprob = tuple[int, float | None, list[int], list[float]]


@dataclass
class Decoded:
    """A batch's generated ids per row, and per row its RawLogprobs when asked: one per
    generated token (`logprobs`), one per prompt token (`prompt_logprobs`)."""

    ids: list[list[int]]
    logprobs: list[list[RawLogprob]] | None
    prompt_logprobs: list[list[RawLogprob]] | None


# A prompt under an adapter, and its prefill: per-layer (keys, values) and the last logits.
PromptKey = tuple[str | None, tuple[int, ...]]
PrefilledPrompt = tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]


def common_prefix_length(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """How many leading tokens `a` and `b` share (binary search over C-speed tuple compares)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


class PromptCache:
    """Prompts prefilled row by row (each alone, under one adapter): their per-layer KV cache
    and last logits, least recently used evicted past `max_bytes`. A later prompt under the
    same adapter starts from the entry that shares its longest prefix and prefills only the
    rest: a prompt header and seed demos that many rows share, or a whole prompt just scored
    (an evaluation that scores a task both ways), as vLLM's automatic prefix caching does
    (by whole prompts here, not by blocks)."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.entries: OrderedDict[PromptKey, PrefilledPrompt] = OrderedDict()

    @staticmethod
    def size(entry: PrefilledPrompt) -> int:
        layers, logits = entry
        return logits.nbytes + sum(k.nbytes + v.nbytes for k, v in layers)

    def put(self, key: PromptKey, layers: list[tuple[torch.Tensor, torch.Tensor]], logits: torch.Tensor) -> None:
        entry = (layers, logits)
        if self.max_bytes <= 0 or self.size(entry) > self.max_bytes:
            return
        if key in self.entries:
            self.bytes -= self.size(self.entries.pop(key))
        self.entries[key] = entry
        self.bytes += self.size(entry)
        while self.bytes > self.max_bytes:
            self.bytes -= self.size(self.entries.popitem(last=False)[1])

    def longest_prefix(self, adapter: str | None, ids: tuple[int, ...]) -> tuple[int, PromptKey | None]:
        """(tokens shared, key) of the entry under `adapter` sharing the most leading tokens
        with `ids`; (0, None) when none shares any."""
        best, best_key = 0, None
        for key in self.entries:
            if key[0] == adapter and (shared := common_prefix_length(key[1], ids)) > best:
                best, best_key = shared, key
        return best, best_key

    def use(self, key: PromptKey) -> PrefilledPrompt:
        """The entry of `key`, now the most recently used."""
        self.entries.move_to_end(key)
        return self.entries[key]

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> list[RawLogprob]:
    """Per row of `logits` (rows x vocabulary): the log-probability of `tokens`' entry and the k
    most likely tokens, from the model's distribution (before temperature and top-p)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, tokens[:, None]).squeeze(1).tolist()
    top = logprobs.topk(k, dim=-1)
    return [
        (token, lp, ids, lps)
        for token, lp, ids, lps in zip(tokens.tolist(), chosen, top.indices.tolist(), top.values.tolist())
    ]


def prompt_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor, k: int
) -> list[list[RawLogprob]]:
    """Each left-padded row's prompt tokens with their log-probabilities given the tokens before
    (the first has none), from the prefill's logits at every position; one row at a time, so
    only one row's fp32 copy exists at once."""
    width = input_ids.shape[1]
    rows = []
    for logits_row, ids, length in zip(logits, input_ids, mask.sum(dim=1).tolist()):
        first = width - length
        scored = token_logprobs(logits_row[first : width - 1], ids[first + 1 :], k)
        rows.append([(int(ids[first]), None, [], []), *scored])
    return rows


def foldable_layers(model: Any, adapter: str) -> list[Any] | None:
    """The PEFT LoRA layers `adapter` changes, or None when it cannot be folded into plain linear
    weights (DoRA and other variants, LoRA bias, fully trained or token-trained modules)."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora import Linear as LoraLinear

    config = model.peft_config[adapter]
    if getattr(config, "modules_to_save", None) or getattr(config, "trainable_token_indices", None):
        return None
    layers = []
    for module in model.modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            if type(module) is not LoraLinear or adapter in module.lora_variant or module.lora_bias.get(adapter):
                return None
            layers.append(module)
    return layers


@dataclass
class FoldedAdapter:
    """One LoRA adapter folded into a copy of each weight it changes (W + scale * B @ A), swapped
    in by reference for batches that use only that adapter: one plain matmul per linear layer
    instead of PEFT's base, A and B per layer. The base tensors are never written, so swapping
    back is exact and nothing drifts however often adapters change."""

    name: str
    layers: list[tuple[Any, torch.nn.Parameter, torch.nn.Parameter]]  # (LoRA layer, base, folded)

    @classmethod
    def build(cls, name: str, layers: list[Any]) -> "FoldedAdapter":
        folded = []
        with torch.inference_mode(False), torch.no_grad():
            for layer in layers:
                base = layer.base_layer.weight
                weight = (base.float() + layer.get_delta_weight(name).float()).to(base.dtype)
                folded.append((layer, base, torch.nn.Parameter(weight, requires_grad=False)))
        return cls(name, folded)

    def swap_in(self) -> None:
        for layer, _, weight in self.layers:
            layer.base_layer.weight = weight

    def swap_out(self) -> None:
        for layer, base, _ in self.layers:
            layer.base_layer.weight = base


def low_rank_update(layer: Any, a: torch.Tensor, b: torch.Tensor, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A LoRA layer's output for one adapter: the base layer's, plus (x a) b added inside addmm."""
    result = layer.base_layer(x, *args, **kwargs)
    flat = torch.addmm(result.reshape(-1, result.shape[-1]), x.reshape(-1, x.shape[-1]) @ a, b)
    return flat.view(result.shape)


@dataclass
class LowRankAdapter:
    """One LoRA adapter as two small matmuls a layer in the weights' own dtype (x A^T, then that
    times scale * B^T added inside addmm), swapped in for batches that use only that adapter where
    folding would round its delta away (bf16 weights). PEFT's per-row path gathers the rows,
    copies them to fp32, runs A, B and the scale, and scatters the sum back: at one token a row
    while decoding, those small ops cost more than the layer itself (a round-2 generation batch
    ran about 5x slower than the base's)."""

    name: str
    layers: list[tuple[Any, torch.Tensor, torch.Tensor]]  # (LoRA layer, A^T [in, r], scale * B^T [r, out])

    @classmethod
    def build(cls, name: str, layers: list[Any], dtype: torch.dtype) -> "LowRankAdapter":
        parts = []
        with torch.no_grad():
            for layer in layers:
                a = layer.lora_A[name].weight.t().to(dtype).contiguous()
                b = (layer.lora_B[name].weight.float() * layer.scaling[name]).t().to(dtype).contiguous()
                parts.append((layer, a, b))
        return cls(name, parts)

    def swap_in(self) -> None:
        for layer, a, b in self.layers:
            layer.forward = functools.partial(low_rank_update, layer, a, b)

    def swap_out(self) -> None:
        for layer, _, _ in self.layers:
            layer.__dict__.pop("forward", None)


@dataclass
class TransformersBackend(ModelBackend):
    model: Any = None
    device: str = "cpu"
    max_batch_size: int = 64
    max_batch_tokens: int = 16384  # rows x (longest prompt + max_new_tokens) per batch
    decode_segment: int = 8  # decode steps between dropping the rows that ended
    # A batch whose rows all use one adapter runs on that adapter folded into the weights (one
    # extra copy of the weights it changes, kept for the adapter used last). "auto": only when
    # the weights are fp32, since rounding W + delta to bf16 drops deltas under half a bf16 step;
    # otherwise such a batch runs the adapter as two small matmuls a layer (`LowRankAdapter`).
    merge_single_adapter: bool | str = "auto"
    _peft: bool = field(default=False, repr=False)
    _single: FoldedAdapter | LowRankAdapter | None = field(default=None, repr=False)
    prompt_cache: PromptCache = field(default_factory=lambda: PromptCache(PROMPT_CACHE_BYTES), repr=False)

    @classmethod
    def from_config(cls, config) -> "TransformersBackend":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        path = resolve_model(config.ref)
        tokenizer = AutoTokenizer.from_pretrained(path)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(path, dtype=pick_dtype(config.dtype, device))
        model.to(device).eval()
        if device == "cpu" and model.config._attn_implementation == "sdpa":
            model.set_attn_implementation(DECODE_ATTENTION)
        chat = config.prompt_format == "chat" or (
            config.prompt_format == "auto" and bool(tokenizer.chat_template)
        )
        return cls(
            model_ref=config.ref,
            chat=chat,
            model=model,
            tokenizer=tokenizer,
            device=device,
            max_batch_size=config.max_batch_size,
            max_batch_tokens=config.max_batch_tokens,
            merge_single_adapter=config.merge_single_adapter,
        )

    # -- adapters ------------------------------------------------------------
    def load_adapter(self, name: str, path: str) -> None:
        from peft import PeftModel

        if name in self.adapter_paths:
            return
        self.prompt_cache.clear()  # entries are keyed by adapter name
        if not self._peft:
            self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
            self._peft = True
        else:
            self.model.load_adapter(path, adapter_name=name)
        self.model.eval()
        self.adapter_paths[name] = path

    def unload_adapter(self, name: str) -> None:
        if name in self.adapter_paths:
            self.prompt_cache.clear()
            if self._single is not None and self._single.name == name:
                self._single = None
            with warnings.catch_warnings():  # PEFT warns when the adapter it calls active goes
                warnings.filterwarnings("ignore", message=".*was active which is now deleted")
                self.model.delete_adapter(name)
            super().unload_adapter(name)
            if not self.adapter_paths:  # PEFT's wrapper cannot run without an adapter: unwrap it
                self.model = self.model.unload()
                self._peft = False

    @contextmanager
    def _weights_for(self, names: list[str | None]) -> Iterator[list[str | None] | None]:
        """Put one batch's weights in place. -> the adapter per row that PEFT must apply, or None
        for a plain forward pass: no adapters loaded, the base alone, or one adapter folded in."""
        distinct = set(names)
        if not self._peft:
            yield None
        elif distinct == {None}:
            with self.model.disable_adapter():
                yield None
        elif len(distinct) == 1 and self._one_adapter(names[0]):
            self._single.swap_in()
            try:
                with self.model.disable_adapter():
                    yield None
            finally:
                self._single.swap_out()
        else:
            yield names

    def _folds(self) -> bool:
        if self.merge_single_adapter == "auto":
            return self.dtype == torch.float32
        return bool(self.merge_single_adapter)

    def _one_adapter(self, name: str) -> bool:
        """Whether a batch on `name` alone runs it folded or as low-rank matmuls (built now, or
        kept from its last batch); False if PEFT must apply it (DoRA, LoRA bias, ...)."""
        kind = FoldedAdapter if self._folds() else LowRankAdapter
        if not isinstance(self._single, kind) or self._single.name != name:
            self._single = None  # free the previous copy before building the next
            layers = foldable_layers(self.model, name)
            if layers is None:
                return False
            self._single = FoldedAdapter.build(name, layers) if kind is FoldedAdapter else LowRankAdapter.build(name, layers, self.dtype)
        return True

    def _adapter_kwargs(self, names: list[str | None] | None, rows: Sequence[int] | None = None) -> dict[str, Any]:
        """PEFT's adapter_names for `rows` (all when None) of a batch; nothing for a plain
        forward (names None). A plain call after a mixed batch fails in peft 0.21, so a PEFT
        model gets adapter_names unless adapters are disabled for the batch."""
        if names is None:
            return {}
        picked = names if rows is None else [names[r] for r in rows]
        return {"adapter_names": [n or BASE_ADAPTER for n in picked]}

    # -- generation ----------------------------------------------------------
    def _encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self._pad(self.tokenizer(texts, add_special_tokens=False)["input_ids"])

    def _pad(self, ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """A left-padded batch (input_ids, attention_mask) of token id lists."""
        width = max(map(len, ids))
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in ids], device=self.device)
        mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids], device=self.device)
        return {"input_ids": input_ids, "attention_mask": mask}

    @torch.inference_mode()
    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams, adapters: AdapterSpec = None
    ) -> list[list[Completion]]:
        names = self.per_prompt_adapters(adapters, len(prompts))
        ids = [self.encode(p) for p in prompts]
        # One row per completion; rows of one adapter together (such a batch runs with the adapter
        # folded in), longest first within, so batches hold similar lengths.
        order = {name: k for k, name in enumerate(dict.fromkeys(names))}
        rows = [(i, k) for i in range(len(ids)) for k in range(params.n)]
        rows.sort(key=lambda row: (order[names[row[0]]], -len(ids[row[0]])))
        results: list[list[Completion | None]] = [[None] * params.n for _ in ids]
        for start, chunk in self._chunks(rows, [len(i) for i in ids], params):
            outputs = self._generate_batch(
                [ids[i] for i, _ in chunk],
                [names[i] for i, _ in chunk],
                params,
                None if params.seed is None else params.seed + start,
            )
            for (i, k), out in zip(chunk, outputs):
                results[i][k] = out
        return results  # type: ignore[return-value]

    def _chunks(
        self, rows: list[tuple[int, int]], lengths: list[int], params: SamplingParams
    ) -> Iterator[tuple[int, list[tuple[int, int]]]]:
        """(start, rows) batches of `rows` (sorted longest first within an adapter) of at most
        max_batch_size rows and max_batch_tokens tokens (padding and new tokens included); with
        prompt logprobs also at most PROMPT_LOGITS_BUDGET logits (rows x longest prompt x
        vocabulary), which the prefill keeps."""
        start = 0
        while start < len(rows):
            end, longest = start, 0
            while end < len(rows) and end - start < self.max_batch_size:
                longest = max(longest, lengths[rows[end][0]])
                count = end - start + 1
                too_many_tokens = count * (longest + params.max_new_tokens) > self.max_batch_tokens
                too_many_logits = params.prompt_logprobs is not None and count * longest * self.vocab_size > PROMPT_LOGITS_BUDGET
                if end > start and (too_many_tokens or too_many_logits):
                    break
                end += 1
            yield start, rows[start:end]
            start = end

    def _generate_batch(
        self, ids: list[list[int]], names: list[str | None], params: SamplingParams, seed: int | None
    ) -> list[Completion]:
        batch = self._pad(ids)
        if seed is not None:
            torch.manual_seed(seed)
        decoded = self._decode(batch, names, params)
        eos = self.tokenizer.eos_token_id
        completions = []
        for r, (row, prompt) in enumerate(zip(decoded.ids, ids)):
            hit_eos = eos in row
            body = row[: row.index(eos)] if hit_eos else row
            text, hit_stop = cut_at_stop(self.tokenizer.decode(body, skip_special_tokens=True), params.stop)
            completions.append(
                Completion(
                    text=text,
                    prompt_tokens=len(prompt),
                    completion_tokens=len(row),
                    finish_reason="stop" if hit_eos or hit_stop else "length",
                    logprobs=None if decoded.logprobs is None else self._token_logprobs(decoded.logprobs[r]),
                    prompt_logprobs=(
                        None if decoded.prompt_logprobs is None else self._token_logprobs(decoded.prompt_logprobs[r])
                    ),
                )
            )
        return completions

    def _token_logprobs(self, positions: list[RawLogprob]) -> tuple[TokenLogprob, ...]:
        """TokenLogprobs, with each token's text, from (token id, logprob, top ids, top logprobs)."""
        ids = sorted({t for token, _, top, _ in positions for t in (token, *top)})
        text = dict(zip(ids, self.tokenizer.batch_decode([[t] for t in ids])))
        return tuple(
            TokenLogprob(
                token, text[token], logprob,
                tuple(TokenLogprob(t, text[t], lp) for t, lp in zip(top_ids, top_lps)),
            )
            for token, logprob, top_ids, top_lps in positions
        )

    def _decode(self, batch: dict[str, torch.Tensor], names: list[str | None], params: SamplingParams) -> Decoded:
        with self._weights_for(names) as peft_names:
            return self._decode_rows(batch, peft_names, params, names)

    def _decode_rows(
        self,
        batch: dict[str, torch.Tensor],
        names: list[str | None] | None,
        params: SamplingParams,
        adapters: list[str | None] | None = None,
    ) -> Decoded:
        """Generated token ids per row, ending with eos, with the token that completes a stop
        string, or at max_new_tokens; their logprobs and the prompt's when `params` asks.
        Every `decode_segment` tokens, rows that ended leave the batch and the KV cache (a third
        of the slots at batch 128 on short answers). `names`: the adapter per row for PEFT, None
        for a plain forward; `adapters`: the adapter per row (keys of `prompt_cache`)."""
        mask = batch["attention_mask"]
        inputs = batch["input_ids"]
        generated: list[list[int]] = [[] for _ in inputs]
        scored = params.prompt_logprobs is not None
        decoded = Decoded(generated, None if params.logprobs is None else [[] for _ in inputs], None)
        if not params.max_new_tokens and not scored:
            return decoded
        cache = decode_cache(self.model.config)
        one_model = names is None or len(set(names)) == 1
        live = list(range(len(inputs)))
        # Rows that repeat a prompt under the same adapter (n samples of one prompt) prefill
        # once; the cache and the first logits are copied to the repeats after the prefill.
        repeats = None
        if len(inputs) > 1 and not scored:
            keys = [(None if names is None else names[r], tuple(row)) for r, row in enumerate(inputs.tolist())]
            first: dict[tuple[str | None, tuple[int, ...]], int] = {}  # key -> its first row
            for r, key in enumerate(keys):
                first.setdefault(key, r)
            if len(first) < len(inputs):
                live = list(first.values())
                unique = {key: u for u, key in enumerate(first)}
                repeats = torch.tensor([unique[key] for key in keys], device=inputs.device)
                inputs, mask = inputs[live], mask[live]
        first_logits = None
        cached_as = None if scored or adapters is None or not self._caches_prompts(cache) else [adapters[r] for r in live]
        if self._prefills_by_row(inputs, mask, cache, scored, cached_as):
            first_logits = self._prefill_rows(inputs, mask, cache, names, live, cached_as)
        # The shared prefix is prefilled without logits, so prompt logprobs prefill every token per row.
        elif len(inputs) > 1 and one_model and not scored and prefix_fits(self.model.config, inputs.shape[1] + params.max_new_tokens):
            inputs, mask = self._prefill_shared_prefix(inputs, mask, cache, names)
        # Left padding: positions count real tokens only.
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, -inputs.shape[1] :]
        for step in range(max(params.max_new_tokens, 1)):  # max_new_tokens 0: the prefill alone
            if step == 0 and first_logits is not None:
                logits = first_logits
            else:
                logits = self.model(
                    input_ids=inputs,
                    attention_mask=mask,
                    position_ids=positions,
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=0 if scored and step == 0 else 1,  # 0: at every position
                    **self._adapter_kwargs(names, live),
                ).logits
            if scored and step == 0:
                decoded.prompt_logprobs = prompt_logprobs(logits, inputs, mask, params.prompt_logprobs)
            if not params.max_new_tokens:
                break
            if repeats is not None:
                cache.batch_select_indices(repeats)
                logits, mask, positions = logits[repeats], mask[repeats], positions[repeats]
                live, repeats = list(range(len(repeats))), None
            picked = pick_next(logits[:, -1], params)
            for r, token in zip(live, picked.tolist()):
                generated[r].append(token)
            if decoded.logprobs is not None:
                for r, position in zip(live, token_logprobs(logits[:, -1], picked, params.logprobs)):
                    decoded.logprobs[r].append(position)
            inputs, positions = picked[:, None], positions[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(inputs)], dim=1)
            if (step + 1) % self.decode_segment and step + 1 < params.max_new_tokens:
                continue
            keep = [j for j, r in enumerate(live) if not self._end_row(generated[r], params.stop)]
            if not keep:
                break
            if len(keep) == len(live):
                merge_tails(cache)
                continue
            index = torch.tensor(keep, device=inputs.device)
            cache.batch_select_indices(index)  # merges the tails too
            inputs, positions, mask = inputs[index], positions[index], mask[index]
            live = [live[j] for j in keep]
        if decoded.logprobs is not None:  # _end_row cut the ids after each row's end
            for row, positions_of_row in zip(generated, decoded.logprobs):
                del positions_of_row[len(row) :]
        return decoded

    def _prefills_by_row(
        self, inputs: torch.Tensor, mask: torch.Tensor, cache: DynamicCache, scored: bool, cached_as: list[str | None] | None
    ) -> bool:
        """Whether to prefill row by row: no prompt logprobs (their prefill keeps every
        position's logits), a cache whose layers hold every token, and long prompts of
        different lengths (they would pad in a batch), or, with `cached_as` (the adapter per
        row, when rows may use `prompt_cache`), prompts of PROMPT_CACHE_MIN_TOKENS or more
        (kept there) or mostly cached there already."""
        if scored or not full_attention(cache):
            return False
        lengths = mask.sum(dim=1)
        longest = int(lengths.max())
        if longest >= ROW_PREFILL_MIN_TOKENS and len(inputs) > 1 and bool((lengths != lengths[0]).any()):
            return True
        return cached_as is not None and (longest >= PROMPT_CACHE_MIN_TOKENS or self._mostly_cached(inputs, mask, cached_as))

    def _caches_prompts(self, cache: DynamicCache) -> bool:
        """Whether row prefills go through `prompt_cache`: a budget, and layers that hold
        every token of a prompt (`decode_cache`)."""
        return self.prompt_cache.max_bytes > 0 and full_attention(cache)

    def _mostly_cached(self, inputs: torch.Tensor, mask: torch.Tensor, adapters: list[str | None]) -> bool:
        """Whether `prompt_cache` holds at least half of a left-padded batch's prompt tokens
        (then rows prefill one by one, each only past its cached prefix)."""
        if not self.prompt_cache.entries:
            return False
        lengths = mask.sum(dim=1).tolist()
        width = inputs.shape[1]
        rows = [tuple(inputs[r, width - n :].tolist()) for r, n in enumerate(lengths)]
        cached = sum(self.prompt_cache.longest_prefix(a, ids)[0] for a, ids in zip(adapters, rows))
        return 2 * cached >= sum(lengths)

    def _prefill_rows(
        self,
        inputs: torch.Tensor,
        mask: torch.Tensor,
        cache: DynamicCache,
        names: list[str | None] | None,
        live: list[int],
        adapters: list[str | None] | None = None,
    ) -> torch.Tensor:
        """Prefill each row of a left-padded batch alone, without padding (so without a mask:
        SDPA's causal path), then put the rows' KV caches into `cache`, left-padded with
        zeros that the batch's mask hides. With `adapters` (the adapter per row), each row
        starts from the `prompt_cache` entry sharing its longest prefix under its adapter
        (a whole prompt: no prefill) and is kept there in turn. -> each row's last logits,
        (rows, 1, vocabulary)."""
        width = inputs.shape[1]
        lengths = mask.sum(dim=1).tolist()
        logits, row_layers = [], []
        for r, length in enumerate(lengths):
            row_ids = inputs[r, width - length :]
            key = None if adapters is None else (adapters[r], tuple(row_ids.tolist()))
            start, entry = 0, None
            if key is not None:
                start, cached_key = self.prompt_cache.longest_prefix(*key)
                entry = None if cached_key is None else self.prompt_cache.use(cached_key)
            if entry is not None and start == length:
                layers, last = entry
                logits.append(last)
                row_layers.append(layers)
                continue
            start = min(start, length - 1)  # the last token's logits pick the first new token
            row_cache = decode_cache(self.model.config)
            if start:
                for layer, (k, v) in zip(row_cache.layers, entry[0]):
                    layer.update(k[:, :, :start], v[:, :, :start])
            out = self.model(
                input_ids=row_ids[None, start:],
                position_ids=torch.arange(start, length, device=inputs.device)[None],
                past_key_values=row_cache,
                use_cache=True,
                logits_to_keep=1,
                **self._adapter_kwargs(names, [live[r]]),
            )
            layers = [(layer.keys, layer.values) for layer in row_cache.layers]
            logits.append(out.logits)
            row_layers.append(layers)
            if key is not None:
                self.prompt_cache.put(key, layers, out.logits)
        for index, layer in enumerate(cache.layers):
            parts = [row[index] for row in row_layers]
            keys, values = (
                torch.cat([torch.nn.functional.pad(t, (0, 0, width - t.shape[-2], 0)) for t in column])
                for column in zip(*parts)
            )
            layer.update(keys, values)
        return torch.cat(logits)

    def _prefill_shared_prefix(
        self, inputs: torch.Tensor, mask: torch.Tensor, cache: DynamicCache, names: list[str | None] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill the prompt tokens all rows share (a chat preamble, a task template) once, at
        batch 1, and give its KV cache to every row (`share_prefix`), as vLLM's prefix caching
        reuses a shared prefix. `names`: the adapter per row for PEFT (one for all), or None.
        -> each row's remaining tokens (left-padded) and the attention mask over prefix and
        remainder; the batch unchanged when the rows share nothing."""
        shared = shared_prefix_length(inputs, mask)
        if shared == 0:
            return inputs, mask
        width = inputs.shape[1]
        first = width - int(mask[0].sum())
        self.model(
            input_ids=inputs[:1, first : first + shared],
            position_ids=torch.arange(shared, device=inputs.device)[None],
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
            **self._adapter_kwargs(names, [0]),
        )
        share_prefix(cache, len(inputs))
        own = mask.sum(dim=1) - shared
        columns = int(own.max())
        own_mask = (torch.arange(columns, device=inputs.device)[None] >= columns - own[:, None]).to(mask.dtype)
        return inputs[:, width - columns :], torch.cat([mask.new_ones(len(inputs), shared), own_mask], dim=1)

    def _end_row(self, ids: list[int], stop: Sequence[str]) -> bool:
        """Whether the row ended; if so, cut `ids` (in place) just after its end: the eos, or
        the token that completes the first stop string, whichever comes first."""
        eos = self.tokenizer.eos_token_id
        end = ids.index(eos) + 1 if eos in ids else None
        if stop and self._holds_stop(ids[:end], stop):
            # The stop string ends in the last segment: find the shortest prefix that holds it.
            end = len(ids) if end is None else end
            while end > 1 and self._holds_stop(ids[: end - 1], stop):
                end -= 1
        if end is None:
            return False
        del ids[end:]
        return True

    def _holds_stop(self, ids: list[int], stop: Sequence[str]) -> bool:
        return cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), stop)[1]

    # -- scoring -------------------------------------------------------------
    @torch.inference_mode()
    def loglikelihood(
        self, requests: Sequence[tuple[Prompt, str]], adapters: AdapterSpec = None
    ) -> list[float]:
        """Requests with the same context and adapter (the labels of one question) share
        one forward pass over the context; each continuation then runs on its KV cache."""
        names = self.per_prompt_adapters(adapters, len(requests))
        encoded = [self.split_request(ctx, cont) for ctx, cont in requests]
        groups: dict[tuple[tuple[int, ...], str | None], list[int]] = {}
        for i, (ctx_ids, _) in enumerate(encoded):
            groups.setdefault((tuple(ctx_ids), names[i]), []).append(i)
        order = {name: k for k, name in enumerate(dict.fromkeys(names))}
        keys = sorted(groups, key=lambda k: (order[k[1]], -len(k[0])))  # one adapter per chunk where possible
        scores = [0.0] * len(encoded)
        chunk: list[tuple[tuple[int, ...], str | None]] = []
        rows = 0
        for key in keys + [None]:
            # A chunk holds whole groups and at most max_batch_size continuations.
            if chunk and (key is None or rows + len(groups[key]) > self.max_batch_size):
                members = [groups[k] for k in chunk]
                values = self._score_shared(
                    [list(k[0]) for k in chunk], [[encoded[i][1] for i in m] for m in members], [k[1] for k in chunk]
                )
                for m, vals in zip(members, values):
                    for i, value in zip(m, vals):
                        scores[i] = value
                chunk, rows = [], 0
            if key is not None:
                chunk.append(key)
                rows += len(groups[key])
        return scores

    def _score_shared(
        self, contexts: list[list[int]], continuations: list[list[list[int]]], names: list[str | None]
    ) -> list[list[float]]:
        """Score continuations[b][j] after contexts[b]; -> the same nesting of log-probabilities."""
        with self._weights_for(names) as peft_names:
            return self._score_rows(contexts, continuations, peft_names, names)

    def _score_rows(
        self,
        contexts: list[list[int]],
        continuations: list[list[list[int]]],
        names: list[str | None] | None,
        adapters: list[str | None] | None = None,
    ) -> list[list[float]]:
        """`names`: the adapter per context for PEFT, None for a plain forward; `adapters`: the
        adapter per context, given to keep each context's KV cache in `prompt_cache`, which
        prefills the contexts row by row."""
        batch = self._pad(contexts)
        input_ids, mask = batch["input_ids"], batch["attention_mask"]
        cache = decode_cache(self.model.config)
        if adapters is not None and self._caches_prompts(cache):
            last = self._prefill_rows(input_ids, mask, cache, names, list(range(len(contexts))), adapters)
        else:
            last = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=(mask.cumsum(dim=1) - 1).clamp(min=0),  # left padding: count real tokens only
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
                **self._adapter_kwargs(names),
            ).logits
        first = torch.log_softmax(last[:, -1].float(), dim=-1)
        rows = [(b, cont) for b, conts in enumerate(continuations) for cont in conts]
        scores = [float(first[b, cont[0]]) for b, cont in rows]
        longest = max(len(cont) for _, cont in rows)
        if longest > 1:
            # Every continuation after its context's cache: tokens 1.. are scored here.
            index = torch.tensor([b for b, _ in rows], device=self.device)
            cache.batch_select_indices(index)
            steps = longest - 1
            pad = self.tokenizer.pad_token_id
            cont_ids = torch.tensor([cont[:-1] + [pad] * (longest - len(cont)) for _, cont in rows], device=self.device)
            cont_mask = torch.tensor(
                [[1] * (len(cont) - 1) + [0] * (longest - len(cont)) for _, cont in rows], device=self.device
            )
            lengths = mask.sum(dim=1)[index]
            cont_positions = lengths[:, None] + torch.arange(steps, device=self.device)[None, :]
            logits = self.model(
                input_ids=cont_ids,
                attention_mask=torch.cat([mask[index], cont_mask], dim=1),
                position_ids=cont_positions,
                past_key_values=cache,
                use_cache=True,
                **self._adapter_kwargs(names, [b for b, _ in rows]),
            ).logits.float()
            logprobs = torch.log_softmax(logits, dim=-1)
            for r, (_, cont) in enumerate(rows):
                if len(cont) > 1:
                    target = torch.tensor(cont[1:], device=self.device)
                    scores[r] += float(logprobs[r, : len(cont) - 1].gather(1, target[:, None]).sum())
        grouped, k = [], 0
        for conts in continuations:
            grouped.append(scores[k : k + len(conts)])
            k += len(conts)
        return grouped

    @property
    def num_parameters(self) -> int:
        base = self.model.get_base_model() if self._peft else self.model
        return sum(p.numel() for p in base.parameters())

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
