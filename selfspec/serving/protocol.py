"""The OpenAI wire format as plain Python: request schemas, limits, response bodies.

Requests are validated strictly (no "5" for 5, no "true" for true) and every
failure becomes an `APIError` that renders as OpenAI's error body
`{"error": {"message", "type", "param", "code"}}`. Nothing here imports Ray or torch.

Completions follow vLLM's OpenAI server, which evaluation clients (lm-evaluation-harness's
`local-completions`) rely on: prompts as text or token ids (used as given), `logprobs` k with
the legacy `{tokens, token_logprobs, top_logprobs, text_offset}` object, `echo` (the prompt
before the text, its tokens' logprobs first, the first one null) and `max_tokens` 0, which
with echo scores the prompt alone and without it returns empty text. Chat takes `logprobs`
with `top_logprobs`. `text_offset` counts characters of the returned text, as vLLM's.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Annotated, Any, Iterator, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from selfspec.models import Completion, SamplingParams, TokenLogprob

# OpenAI allows 4; lm-evaluation-harness sends a task's stop strings plus the eos token, and
# vLLM sets no bound.
MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 256
MIN_LOGPROB = -9999.0  # what OpenAI sends for -inf, which JSON cannot hold
PROMPT_SHAPES = "prompt must be a string, a list of strings, a list of token ids or a list of token-id lists, none empty"


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
        if self.stream and self.top_logprob_count() is not None:
            raise APIError(400, "logprobs are not supported with stream", param="stream")

    def top_logprob_count(self) -> int | None:
        """k alternatives per token when the request asks for logprobs, else None."""
        return None

    def logprobs_param(self) -> str:
        """The request field that sets k."""
        return "logprobs"


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)  # OpenAI's bound

    def unsupported(self) -> None:
        super().unsupported()
        if self.tools:
            raise APIError(400, "tools are not supported", param="tools")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")

    def top_logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def logprobs_param(self) -> str:
        return "top_logprobs"

    def prompts(self) -> list[list[dict[str, str]]]:
        # "developer" is OpenAI's newer name for the system role.
        return [[{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]]


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
Texts = Annotated[list[str], Field(min_length=1)]


class CompletionRequest(SamplingRequest):
    prompt: Union[str, Texts, TokenIds, Annotated[list[TokenIds], Field(min_length=1)]]
    max_tokens: int | None = Field(None, ge=0)  # 0: no new tokens (with echo: the prompt's logprobs alone)
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    def unsupported(self) -> None:
        super().unsupported()
        if self.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if (self.best_of or 1) > 1:
            raise APIError(400, "best_of is not supported", param="best_of")

    def top_logprob_count(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """Each prompt: a string, or a list of token ids."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)


def parse_request(kind: type[SamplingRequest], body: Any) -> SamplingRequest:
    """Validate a decoded JSON body; any problem becomes APIError 400 naming the field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        request = kind.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["loc"][:1] == ("prompt",):  # the union's own errors name its members, not the problem
            raise APIError(400, PROMPT_SHAPES, param="prompt") from None
        param = ".".join(str(p) for p in first["loc"]) or None
        raise APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param) from None
    request.unsupported()
    return request


def sampling_params(request: SamplingRequest, limits, default_max_tokens: int) -> SamplingParams:
    """SamplingParams from a request, within the server's limits (a ServeConfig). Echo asks for
    the prompt's logprobs with the same k as the generated tokens' (as vLLM)."""
    wanted = getattr(request, "max_completion_tokens", None)
    wanted = request.max_tokens if wanted is None else wanted
    max_tokens = min(default_max_tokens, limits.max_tokens_limit) if wanted is None else wanted
    if max_tokens > limits.max_tokens_limit:
        raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most {limits.max_tokens_limit}", param="max_tokens")
    if request.n > limits.max_n:
        raise APIError(400, f"n is {request.n}; this server allows at most {limits.max_n}", param="n")
    logprobs = request.top_logprob_count()
    if logprobs is not None and logprobs > limits.max_logprobs:
        param = request.logprobs_param()
        raise APIError(400, f"{param} is {logprobs}; this server allows at most {limits.max_logprobs}", param=param)
    echo = getattr(request, "echo", False)
    return SamplingParams(
        temperature=request.temperature,
        top_p=request.top_p,
        max_new_tokens=max_tokens,
        stop=request.stops(),
        seed=request.seed,
        n=request.n,
        logprobs=logprobs,
        prompt_logprobs=logprobs if echo else None,
    )


# -- responses ---------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(completions: list[list[Completion]]) -> dict[str, int]:
    prompt = sum(c[0].prompt_tokens for c in completions if c)
    generated = sum(x.completion_tokens for c in completions for x in c)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def logprob_value(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


def chat_logprobs(positions: tuple[TokenLogprob, ...]) -> dict[str, Any]:
    """OpenAI's chat logprobs: per generated token its text, logprob, UTF-8 bytes and top k."""

    def entry(t: TokenLogprob) -> dict[str, Any]:
        return {"token": t.token, "logprob": logprob_value(t.logprob), "bytes": list(t.token.encode())}

    return {"content": [{**entry(p), "top_logprobs": [entry(t) for t in p.top]} for p in positions]}


def completion_logprobs(positions: tuple[TokenLogprob, ...]) -> dict[str, Any]:
    """OpenAI's legacy logprobs: per token its text, logprob (null for the first prompt token),
    the top k plus the token itself, and its character offset in the returned text."""
    offsets, offset = [], 0
    for p in positions:
        offsets.append(offset)
        offset += len(p.token)
    return {
        "tokens": [p.token for p in positions],
        "token_logprobs": [None if p.logprob is None else logprob_value(p.logprob) for p in positions],
        "top_logprobs": [
            None if p.logprob is None else {t.token: logprob_value(t.logprob) for t in (*p.top, p)} for p in positions
        ],
        "text_offset": offsets,
    }


def chat_response(model: str, completions: list[list[Completion]]) -> dict[str, Any]:
    choices = [
        {
            "index": k,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": None if c.logprobs is None else chat_logprobs(c.logprobs),
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


def completion_choice(index: int, completion: Completion, echo: str | None) -> dict[str, Any]:
    """One choice; `echo`: the prompt as text, put before the generated text (its tokens'
    logprobs before the generated tokens')."""
    text, positions = completion.text, completion.logprobs
    if echo is not None:
        text = echo + text
        if positions is not None:
            positions = (completion.prompt_logprobs or ()) + positions
    logprobs = None if positions is None else completion_logprobs(positions)
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": completion.finish_reason}


def completion_response(
    model: str, completions: list[list[Completion]], echoes: list[str] | None = None
) -> dict[str, Any]:
    """`echoes`: each prompt as text, when the request asks for echo."""
    # Choice i * n + k is prompt i's k-th completion, as OpenAI numbers them.
    choices = [
        completion_choice(i * len(per) + k, c, None if echoes is None else echoes[i])
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
