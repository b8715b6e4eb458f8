"""The OpenAI wire format as plain Python: request schemas, limits, response bodies.

Requests are validated strictly (no "5" for 5, no "true" for true) and every
failure becomes an `APIError` that renders as OpenAI's error body
`{"error": {"message", "type", "param", "code"}}`. Nothing here imports Ray or torch.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, Iterator, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from selfspec.models import Completion, SamplingParams

MAX_STOP_SEQUENCES = 4  # as OpenAI
MAX_STOP_CHARS = 256


class APIError(Exception):
    """An error answered with an HTTP status and OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(status, message, type, param, code)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# -- request schemas ---------------------------------------------------------------
class Strict(BaseModel):
    # Unknown fields are ignored, as most OpenAI-compatible servers do, so clients that
    # send extra options keep working; fields we cannot honour are rejected below.
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(Strict):
    include_usage: bool = False


class SamplingRequest(Strict):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logprobs: Union[bool, int, None] = None
    user: str | None = None

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise APIError(400, f"at most {MAX_STOP_SEQUENCES} stop sequences", param="stop")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise APIError(400, f"stop sequences must be 1 to {MAX_STOP_CHARS} characters", param="stop")
        return tuple(stops)

    def unsupported(self) -> None:
        if self.presence_penalty or self.frequency_penalty:
            raise APIError(400, "presence_penalty and frequency_penalty are not supported", param="presence_penalty")
        if self.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Any] | None = None

    def unsupported(self) -> None:
        super().unsupported()
        if self.tools:
            raise APIError(400, "tools are not supported", param="tools")

    def prompts(self) -> list[list[dict[str, str]]]:
        # "developer" is OpenAI's newer name for the system role.
        return [[{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]]


class CompletionRequest(SamplingRequest):
    prompt: Union[str, list[str]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    def unsupported(self) -> None:
        super().unsupported()
        if self.echo or self.suffix or (self.best_of or 1) > 1:
            raise APIError(400, "echo, suffix and best_of are not supported", param="echo")

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


def parse_request(kind: type[SamplingRequest], body: Any) -> SamplingRequest:
    """Validate a decoded JSON body; any problem becomes APIError 400 naming the field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        request = kind.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param) from None
    request.unsupported()
    return request


def sampling_params(request: SamplingRequest, limits, default_max_tokens: int) -> SamplingParams:
    """SamplingParams from a request, within the server's limits (a ServeConfig)."""
    wanted = getattr(request, "max_completion_tokens", None) or request.max_tokens
    max_tokens = wanted or min(default_max_tokens, limits.max_tokens_limit)
    if max_tokens > limits.max_tokens_limit:
        raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most {limits.max_tokens_limit}", param="max_tokens")
    if request.n > limits.max_n:
        raise APIError(400, f"n is {request.n}; this server allows at most {limits.max_n}", param="n")
    return SamplingParams(
        temperature=request.temperature,
        top_p=request.top_p,
        max_new_tokens=max_tokens,
        stop=request.stops(),
        seed=request.seed,
        n=request.n,
    )


# -- responses ---------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(completions: list[list[Completion]]) -> dict[str, int]:
    prompt = sum(c[0].prompt_tokens for c in completions if c)
    generated = sum(x.completion_tokens for c in completions for x in c)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def chat_response(model: str, completions: list[list[Completion]]) -> dict[str, Any]:
    choices = [
        {
            "index": k,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": None,
            "finish_reason": c.finish_reason,
        }
        for k, c in enumerate(completions[0])
    ]
    return {
        "id": new_id("chatcmpl"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(completions),
    }


def completion_response(model: str, completions: list[list[Completion]]) -> dict[str, Any]:
    # Choice i * n + k is prompt i's k-th completion, as OpenAI numbers them.
    choices = [
        {"index": i * len(per) + k, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
        for i, per in enumerate(completions)
        for k, c in enumerate(per)
    ]
    return {
        "id": new_id("cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(completions),
    }


def text_pieces(text: str) -> list[str]:
    """Word-sized pieces (each word with its trailing space) for streaming."""
    return [p for p in re.findall(r"\s*\S+\s*|\s+", text) if p]


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def stream_events(response: dict[str, Any], include_usage: bool) -> Iterator[str]:
    """Server-sent events for a finished chat or text completion: the text in word-sized
    chunks per choice, a final chunk with the finish reason, optionally usage, then [DONE]."""
    chat = response["object"] == "chat.completion"
    head = {
        "id": response["id"],
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": response["created"],
        "model": response["model"],
    }

    def chunk(index: int, text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**head, "choices": [choice], **({"usage": None} if include_usage else {})}

    for choice in response["choices"]:
        index = choice["index"]
        text = choice["message"]["content"] if chat else choice["text"]
        if chat:
            yield sse(chunk(index, None, None, first=True))
        for piece in text_pieces(text):
            yield sse(chunk(index, piece, None))
        yield sse(chunk(index, None, choice["finish_reason"]))
    if include_usage:
        yield sse({**head, "choices": [], "usage": response["usage"]})
    yield "data: [DONE]\n\n"


def models_list(names: list[str], created: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": name, "object": "model", "created": created, "owned_by": "selfspec"} for name in names],
    }
