"""The vLLM engine (GPU): continuous batching, LoRA adapters through `LoRARequest`.

Imported only when configuration picks vllm, so the CPU path never needs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from selfspec.models import AdapterSpec, Completion, ModelBackend, Prompt, SamplingParams
from selfspec.models.resolve import resolve_model


@dataclass
class VLLMBackend(ModelBackend):
    llm: Any = None
    _lora_ids: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config) -> "VLLMBackend":
        from vllm import LLM

        path = resolve_model(config.ref)
        llm = LLM(
            model=path,
            dtype="auto" if config.dtype == "auto" else config.dtype,
            gpu_memory_utilization=config.gpu_memory_utilization,
            max_model_len=config.max_model_len,
            tensor_parallel_size=config.tensor_parallel_size,
            enable_lora=True,
            max_loras=config.max_loras,
            max_lora_rank=config.max_lora_rank,
        )
        tokenizer = llm.get_tokenizer()
        chat = config.prompt_format == "chat" or (
            config.prompt_format == "auto" and bool(getattr(tokenizer, "chat_template", None))
        )
        return cls(model_ref=config.ref, chat=chat, llm=llm, tokenizer=tokenizer)

    def load_adapter(self, name: str, path: str) -> None:
        self.adapter_paths[name] = path
        self._lora_ids.setdefault(name, len(self._lora_ids) + 1)

    def _lora(self, name: str | None):
        if name is None:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest(name, self._lora_ids[name], self.adapter_paths[name])

    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams, adapters: AdapterSpec = None
    ) -> list[list[Completion]]:
        from vllm import SamplingParams as VSamplingParams

        names = self.per_prompt_adapters(adapters, len(prompts))
        sampling = VSamplingParams(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p if params.temperature > 0 else 1.0,
            max_tokens=params.max_new_tokens,
            stop=list(params.stop) or None,
            seed=params.seed,
        )
        texts = [self.render(p) for p in prompts]
        outputs = self.llm.generate(
            [{"prompt": t} for t in texts],
            sampling,
            lora_request=[self._lora(n) for n in names],
            use_tqdm=False,
        )
        return [
            [
                Completion(
                    text=o.text,
                    prompt_tokens=len(out.prompt_token_ids),
                    completion_tokens=len(o.token_ids),
                    finish_reason="length" if o.finish_reason == "length" else "stop",
                )
                for o in out.outputs
            ]
            for out in outputs
        ]

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
        outputs = self.llm.generate(prompts, sampling, lora_request=[self._lora(n) for n in names], use_tqdm=False)
        scores = []
        for out, (start, cont_ids) in zip(outputs, spans):
            positions = out.prompt_logprobs[start : start + len(cont_ids)]
            scores.append(sum(pos[token].logprob for pos, token in zip(positions, cont_ids)))
        return scores
