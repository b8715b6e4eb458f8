"""The transformers engine: batched generation and scoring on CPU or a small GPU.

Requests are sorted by length and cut into batches (less padding), left-padded,
and decoded with the KV cache in short segments: rows that ended leave the batch
between segments, so the others no longer carry them. Adapters are PEFT LoRA
adapters on one shared base; a batch may mix adapters (`adapter_names`), which
PEFT applies row by row.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from selfspec.models import (
    BASE_ADAPTER,
    AdapterSpec,
    Completion,
    ModelBackend,
    Prompt,
    SamplingParams,
)
from selfspec.models.resolve import resolve_model



def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX makes bf16 matmuls several times faster than fp32 on CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(requested: str, device: str) -> torch.dtype:
    if requested != "auto":
        return getattr(torch, requested)
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@dataclass
class TransformersBackend(ModelBackend):
    model: Any = None
    device: str = "cpu"
    max_batch_size: int = 64
    decode_segment: int = 8  # tokens per generate call between dropping finished rows
    _peft: bool = field(default=False, repr=False)

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
        )

    # -- adapters ------------------------------------------------------------
    def load_adapter(self, name: str, path: str) -> None:
        from peft import PeftModel

        if name in self.adapter_paths:
            return
        if not self._peft:
            self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
            self._peft = True
        else:
            self.model.load_adapter(path, adapter_name=name)
        self.model.eval()
        self.adapter_paths[name] = path

    def unload_adapter(self, name: str) -> None:
        if name in self.adapter_paths:
            self.model.delete_adapter(name)
            super().unload_adapter(name)

    def _adapter_kwargs(self, names: list[str | None]) -> dict[str, Any]:
        # With PEFT, always pass adapter_names: a plain call after a mixed batch fails.
        if not self._peft:
            return {}
        return {"adapter_names": [n or BASE_ADAPTER for n in names]}

    # -- generation ----------------------------------------------------------
    def _encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return {k: v.to(self.device) for k, v in batch.items()}

    @torch.inference_mode()
    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams, adapters: AdapterSpec = None
    ) -> list[list[Completion]]:
        names = self.per_prompt_adapters(adapters, len(prompts))
        texts = [self.render(p) for p in prompts]
        lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        # One row per completion; longest first so batches hold similar lengths.
        rows = [(i, k) for i in range(len(texts)) for k in range(params.n)]
        rows.sort(key=lambda row: -lengths[row[0]])
        results: list[list[Completion | None]] = [[None] * params.n for _ in texts]
        for start in range(0, len(rows), self.max_batch_size):
            chunk = rows[start : start + self.max_batch_size]
            outputs = self._generate_batch(
                [texts[i] for i, _ in chunk],
                [names[i] for i, _ in chunk],
                params,
                None if params.seed is None else params.seed + start,
            )
            for (i, k), out in zip(chunk, outputs):
                results[i][k] = out
        return results  # type: ignore[return-value]

    def _generate_batch(
        self, texts: list[str], names: list[str | None], params: SamplingParams, seed: int | None
    ) -> list[Completion]:
        batch = self._encode(texts)
        sample = params.temperature > 0
        kwargs: dict[str, Any] = dict(
            do_sample=sample,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            return_dict_in_generate=True,
        )
        if sample:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        if seed is not None:
            torch.manual_seed(seed)
        generated = self._decode_dropping_finished(batch, names, params, kwargs)
        prompt_tokens = batch["attention_mask"].sum(dim=1).tolist()
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        completions = []
        for row, n_prompt in zip(generated, prompt_tokens):
            hit_eos = eos in row
            body = row[: row.index(eos)] if hit_eos else row
            while body and body[-1] == pad:  # generate pads a row that ended on a stop string
                body = body[:-1]
            text, hit_stop = cut_at_stop(self.tokenizer.decode(body, skip_special_tokens=True), params.stop)
            # An eos after a stop string is padding (pad = eos), not a generated token.
            counted_eos = hit_eos and not hit_stop
            completions.append(
                Completion(
                    text=text,
                    prompt_tokens=int(n_prompt),
                    completion_tokens=len(body) + counted_eos,
                    finish_reason="stop" if hit_eos or hit_stop else "length",
                )
            )
        return completions

    def _decode_dropping_finished(
        self, batch: dict[str, torch.Tensor], names: list[str | None], params: SamplingParams, kwargs: dict[str, Any]
    ) -> list[list[int]]:
        """Generated token ids per row. `generate` runs in segments of `decode_segment` tokens;
        between segments, rows that ended leave the batch and the KV cache, so the rest decode
        without carrying them (a third of the slots at batch 128 on short answers). Greedy
        outputs are the same as one `generate` call."""
        seq, mask = batch["input_ids"], batch["attention_mask"]
        live = list(range(len(seq)))
        generated: list[list[int]] = [[] for _ in live]
        cache = None
        while live and len(generated[live[0]]) < params.max_new_tokens:
            steps = min(self.decode_segment, params.max_new_tokens - len(generated[live[0]]))
            out = self.model.generate(
                input_ids=seq,
                attention_mask=mask,
                max_new_tokens=steps,
                **({"cache": cache} if cache is not None else {}),
                **kwargs,
                **self._adapter_kwargs([names[r] for r in live]),
            )
            new = out.sequences[:, seq.shape[1] :]
            keep = []
            for j, row in enumerate(new.tolist()):
                generated[live[j]] += row
                if not self._finished(generated[live[j]], params.stop):
                    keep.append(j)
            cache = out.cache
            if not keep:
                break
            # A cache that cannot drop rows keeps them: their tokens past the end are cut below.
            if len(keep) < len(live) and hasattr(cache, "batch_select_indices"):
                index = torch.tensor(keep, device=seq.device)
                cache.batch_select_indices(index)
                seq, mask, new = out.sequences[index], mask[index], new[index]
                live = [live[j] for j in keep]
            else:
                seq = out.sequences
            mask = torch.cat([mask, torch.ones_like(new)], dim=1)
        return generated

    def _finished(self, ids: list[int], stop: Sequence[str]) -> bool:
        # generate pads a row that ended (eos or a stop string) until the batch ends.
        ended = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}
        if ended.intersection(ids):
            return True
        return bool(stop) and cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), stop)[1]

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
        keys = sorted(groups, key=lambda k: -len(k[0]))
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
        width = max(map(len, contexts))
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(c)) + c for c in contexts], device=self.device)
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in contexts], device=self.device)
        # Left padding: positions must count real tokens only.
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **self._adapter_kwargs(names),
        )
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        rows = [(b, cont) for b, conts in enumerate(continuations) for cont in conts]
        scores = [float(first[b, cont[0]]) for b, cont in rows]
        longest = max(len(cont) for _, cont in rows)
        if longest > 1:
            # Every continuation after its context's cache: tokens 1.. are scored here.
            index = torch.tensor([b for b, _ in rows], device=self.device)
            cache = out.cache
            cache.batch_select_indices(index)
            steps = longest - 1
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
                cache=cache,
                use_cache=True,
                **self._adapter_kwargs([names[b] for b, _ in rows]),
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
