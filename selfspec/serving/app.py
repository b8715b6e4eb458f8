"""`selfspec serve`: one base model, many LoRA adapters, behind an OpenAI-compatible API.

The application is two Ray Serve deployments:

- `OpenAIIngress` (FastAPI): authentication, body-size limit, strict request
  validation, adapter lookup in the `AdapterRegistry` (invalid name 400, unknown 404),
  response bodies and server-sent events. It never touches the model.
- `AdapterModel`: each replica loads the base model once. An adapter is loaded on
  demand by a `serve.multiplexed` loader (least-recently-used eviction past
  `serve.max_adapters_per_replica`), and the ingress tags each call with the adapter
  as its multiplexed model id, so Serve routes it to a replica already holding it.
  On the transformers backend, concurrent calls are gathered by `serve.batch`; one batch
  becomes one `ModelBackend.generate` call per distinct sampling setting, with one adapter
  name per row, so different adapters run in one forward pass (PEFT `adapter_names`). On
  vLLM, each call goes straight to vLLM's async engine, whose running batch it joins
  (continuous batching, per-request `LoRARequest`s).

Streaming sends the finished completion as server-sent events in word-sized chunks
(the backend interface returns whole completions), with OpenAI's chunk format; a streamed
request cannot ask for logprobs. Completions take token-id prompts, logprobs and echo as
vLLM's OpenAI server does (see `protocol`), so lm-evaluation-harness's `local-completions`
model can score and generate through the server.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures at runtime.
import asyncio
import dataclasses
import hmac
import json
import os
import sys
import threading
import time
from collections import Counter
from typing import Any, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from selfspec.config import ModelConfig, RunConfig, ServeConfig, load_config
from selfspec.models import Completion, Prompt, SamplingParams, fitting_lora_rank, is_token_ids, lora_rank
from selfspec.serving.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    chat_response,
    completion_response,
    models_list,
    parse_request,
    sampling_params,
    stream_events,
)
from selfspec.serving.registry import (
    BASE_MODEL,
    AdapterNameError,
    AdapterRegistry,
    UnknownAdapterError,
    registry_dir_for,
)

APP_NAME = "selfspec"
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


# -- model replicas ------------------------------------------------------------------
class AdapterPool:
    """The adapters resident in one backend, safe to change while requests run.

    Generation and adapter changes hold one lock (PEFT must not lose an adapter in the
    middle of a forward pass). An adapter the LRU evicts while requests still use it is
    unloaded when the last of them finishes.
    """

    def __init__(self, backend):
        self.backend = backend
        self._backend_lock = threading.Lock()
        self._state = threading.Lock()
        self._users: Counter[str] = Counter()
        self._leased: set[str] = set()  # adapters the multiplexer's LRU currently holds

    def load(self, name: str, path: str) -> None:
        with self._backend_lock:
            with self._state:
                self._leased.add(name)
            self.backend.load_adapter(name, path)

    def evict(self, name: str) -> None:
        with self._state:
            self._leased.discard(name)
        self._unload_if_unused(name)

    def acquire(self, name: str) -> None:
        with self._state:
            self._users[name] += 1

    def release(self, name: str) -> None:
        with self._state:
            self._users[name] -= 1
            if self._users[name]:
                return
            del self._users[name]
        self._unload_if_unused(name)

    def _unload_if_unused(self, name: str) -> None:
        with self._backend_lock:
            with self._state:
                if self._users[name] or name in self._leased:
                    return
            self.backend.unload_adapter(name)

    def generate(
        self, prompts: list[Prompt], params: SamplingParams, names: list[str | None]
    ) -> list[list[Completion]]:
        with self._backend_lock:
            return self.backend.generate(prompts, params, adapters=names)

    def loaded(self) -> list[str]:
        return sorted(self.backend.adapter_paths)


class AdapterLease:
    """What the multiplexed loader returns; Serve calls `__del__` when the LRU evicts it."""

    def __init__(self, pool: AdapterPool, name: str):
        self.pool, self.name, self._released = pool, name, False

    def __del__(self) -> None:
        # Serve calls this on eviction, and the garbage collector calls it again later.
        if not self._released:
            self._released = True
            self.pool.evict(self.name)


@dataclasses.dataclass(frozen=True)
class BatchItem:
    """One request's share of a batch: its prompts, sampling settings and adapter."""

    prompts: tuple
    params: SamplingParams
    adapter: str | None


def group_rows(items: Sequence[BatchItem]) -> dict[SamplingParams, list[tuple[int, int]]]:
    """Rows (item index, prompt index) grouped by sampling settings: one generate call each."""
    groups: dict[SamplingParams, list[tuple[int, int]]] = {}
    for i, item in enumerate(items):
        groups.setdefault(item.params, []).extend((i, j) for j in range(len(item.prompts)))
    return groups


def _share_batches_across_adapters() -> None:
    """Serve splits a batch by multiplexed model id, which would keep adapters apart; clear
    the id in this task's copy of the request context so adapters share forward passes."""
    from ray.serve import context

    current = context._serve_request_context.get()
    if current is not None and current.multiplexed_model_id:
        context._serve_request_context.set(dataclasses.replace(current, multiplexed_model_id=""))


@serve.deployment(name="AdapterModel")
class AdapterModel:
    def __init__(self, model: dict[str, Any], limits: dict[str, Any]):
        from selfspec.models import load_backend

        model_config = ModelConfig.model_validate(model)
        self.limits = ServeConfig.model_validate(limits)
        if model_config.num_threads is None:
            threads = max(1, int(self.limits.num_cpus_per_replica))
            model_config = model_config.model_copy(update={"num_threads": threads})
        if model_config.merge_single_adapter == "auto":
            # Requests for many adapters interleave here: folding would rebuild a weight copy at
            # each switch and hold one more model's worth of memory per replica.
            model_config = model_config.model_copy(update={"merge_single_adapter": False})
        self.pool = AdapterPool(load_backend(model_config, lora=True, serving=True))
        self.paths: dict[str, str] = {}
        self.stats: Counter[str] = Counter()

        # The LRU size comes from config, so the loader is wrapped here rather than decorated;
        # Serve needs a plain function (it keeps its cache as an attribute of the function).
        async def load(name: str) -> AdapterLease:
            return await self._load_adapter(name)

        self.get_adapter = serve.multiplexed(max_num_models_per_replica=self.limits.max_adapters_per_replica)(load)
        self.run_batch.set_max_batch_size(self.limits.max_batch_size)
        self.run_batch.set_batch_wait_timeout_s(self.limits.batch_wait_timeout_s)

    async def _load_adapter(self, name: str) -> AdapterLease:
        await asyncio.to_thread(self.pool.load, name, self.paths[name])
        self.stats["adapter_loads"] += 1
        return AdapterLease(self.pool, name)

    def check_prompts(self, prompts: list[Prompt]) -> dict[str, Any] | None:
        """OpenAI's error body for the first prompt that is empty, too long or holds a token id
        outside the vocabulary; None when all are fine."""
        backend = self.pool.backend
        limit = self.limits.max_prompt_tokens
        for prompt in prompts:
            param = "messages" if isinstance(prompt, list) and not is_token_ids(prompt) else "prompt"
            if is_token_ids(prompt) and max(prompt) >= backend.vocab_size:
                return APIError(
                    400, f"token id {max(prompt)} is out of the vocabulary (0 to {backend.vocab_size - 1})", param=param
                ).body()
            tokens = backend.count_tokens(prompt)
            if tokens == 0:
                return APIError(400, "the prompt is empty", param=param).body()
            if tokens > limit:
                return APIError(
                    400, f"the prompt is {tokens} tokens; this server allows at most {limit}",
                    param=param, code="context_length_exceeded",
                ).body()
        return None

    async def generate(
        self, prompts: list[Prompt], params: SamplingParams, adapter_path: str | None, echo: bool = False
    ) -> dict[str, Any]:
        """`{"completions": [[Completion] per prompt]}`, with `"echoes"` (each prompt as text) when
        `echo`; or `{"error": OpenAI error body, "status"}`."""
        error = self.check_prompts(prompts)
        if error:
            return {"status": 400, **error}
        echoes = {"echoes": [self.pool.backend.render(p) for p in prompts]} if echo else {}
        name = serve.get_multiplexed_model_id() or None
        if name is None:
            return {"completions": await self._complete(BatchItem(tuple(prompts), params, None)), **echoes}
        self.paths[name] = adapter_path
        self.pool.acquire(name)
        try:
            await self.get_adapter(name)
            return {"completions": await self._complete(BatchItem(tuple(prompts), params, name)), **echoes}
        finally:
            await asyncio.to_thread(self.pool.release, name)

    async def _complete(self, item: BatchItem) -> list[list[Completion]]:
        """One request's completions: from vLLM's async engine directly, or from a shared
        `serve.batch` on the transformers backend."""
        backend = self.pool.backend
        if hasattr(backend, "agenerate"):  # vLLM's async engine batches requests itself, continuously
            self.stats["engine_requests"] += 1
            return await backend.agenerate(item.prompts, item.params, [item.adapter] * len(item.prompts))

        async def submit():
            _share_batches_across_adapters()
            return await self.run_batch(item)

        # A task runs in a copy of this context, so the change stays local to it.
        return await asyncio.create_task(submit())

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def run_batch(self, items: list[BatchItem]) -> list[list[list[Completion]]]:
        results: list[list[Any]] = [[None] * len(item.prompts) for item in items]
        for params, rows in group_rows(items).items():
            names = [items[i].adapter for i, _ in rows]
            outputs = await asyncio.to_thread(
                self.pool.generate, [items[i].prompts[j] for i, j in rows], params, names
            )
            for (i, j), completions in zip(rows, outputs):
                results[i][j] = completions
            self.stats["forward_batches"] += 1
            self.stats["rows"] += len(rows)
            self.stats["max_rows_per_batch"] = max(self.stats["max_rows_per_batch"], len(rows))
            distinct = len(set(names))
            self.stats["max_adapters_per_batch"] = max(self.stats["max_adapters_per_batch"], distinct)
            self.stats["mixed_batches"] += distinct > 1
        return results

    def info(self) -> dict[str, Any]:
        """Replica facts for tests and benchmarks: pid, resident memory, adapters, batch counters."""
        import psutil

        return {
            "pid": os.getpid(),
            "rss_bytes": psutil.Process().memory_info().rss,
            "adapters": self.pool.loaded(),
            "folds_adapters": bool(getattr(self.pool.backend, "merge_single_adapter", False)),
            **self.stats,
        }


# -- HTTP ingress --------------------------------------------------------------------
api = FastAPI(title="selfspec", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    error = APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)
    return JSONResponse(error.body(), status_code=exc.status_code)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(APIError(400, str(exc.errors()[:1])).body(), status_code=400)


@api.exception_handler(Exception)
async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
    error = APIError(500, f"internal error: {type(exc).__name__}", type="server_error")
    return JSONResponse(error.body(), status_code=500)


async def read_body(request: Request, limit: int) -> Any:
    """The JSON body, refusing more than `limit` bytes before reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise APIError(400, f"the request body exceeds {limit} bytes", code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(400, f"the request body exceeds {limit} bytes", code="request_too_large")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"could not parse the JSON body: {exc}") from None


@serve.deployment(name="OpenAIIngress")
@serve.ingress(api)
class OpenAIIngress:
    def __init__(self, model_handle, config: dict[str, Any]):
        run_config = RunConfig.model_validate(config)
        self.limits = run_config.serve
        self.model = model_handle
        self.registry = AdapterRegistry.from_config(run_config)
        self.started = int(time.time())

    def authorize(self, request: Request) -> None:
        key = self.limits.api_key
        if not key:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise APIError(
                401, "missing or incorrect API key: send 'Authorization: Bearer KEY'", code="invalid_api_key"
            )

    def adapter_for(self, model: str) -> tuple[str, str | None]:
        """(served model name, adapter path or None for the base)."""
        if model == BASE_MODEL:
            return BASE_MODEL, None
        try:
            adapter = self.registry.resolve(model)
        except AdapterNameError as exc:
            raise APIError(400, str(exc), param="model", code="invalid_model_name") from None
        except UnknownAdapterError as exc:
            raise APIError(404, str(exc), param="model", code="model_not_found") from None
        return adapter.name, adapter.path

    async def run(self, request: Request, kind, default_max_tokens: int) -> tuple[Any, str, dict[str, Any]]:
        """Check and run one request: (the parsed request, the served model name, the replica's result)."""
        self.authorize(request)
        parsed = parse_request(kind, await read_body(request, self.limits.max_body_bytes))
        params = sampling_params(parsed, self.limits, default_max_tokens)
        prompts = parsed.prompts()
        if len(prompts) * parsed.n > self.limits.max_batch_size:
            raise APIError(400, f"at most {self.limits.max_batch_size} completions per request", param="prompt")
        name, path = self.adapter_for(parsed.model)
        handle = self.model.options(multiplexed_model_id=name) if path else self.model
        result = await handle.generate.remote(prompts, params, path, getattr(parsed, "echo", False))
        if "error" in result:
            raise APIError(result["status"], **result["error"])
        return parsed, name, result

    def reply(self, parsed, response: dict[str, Any]) -> Any:
        if not parsed.stream:
            return response
        include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
        return StreamingResponse(stream_events(response, include_usage), media_type="text/event-stream")

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        parsed, name, result = await self.run(request, ChatRequest, self.limits.default_max_tokens)
        return self.reply(parsed, chat_response(name, result["completions"]))

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        parsed, name, result = await self.run(request, CompletionRequest, COMPLETIONS_DEFAULT_MAX_TOKENS)
        return self.reply(parsed, completion_response(name, result["completions"], result.get("echoes")))

    @api.get("/v1/models")
    async def models(self, request: Request):
        self.authorize(request)
        names = await asyncio.to_thread(self.registry.names)
        return models_list([BASE_MODEL, *names], self.started)

    @api.get("/v1/models/{model}")
    async def model(self, model: str, request: Request):
        self.authorize(request)
        name, _ = await asyncio.to_thread(self.adapter_for, model)
        return models_list([name], self.started)["data"][0]

    @api.get("/health")
    async def health(self):
        return {"status": "ok"}


# -- building and running ----------------------------------------------------------------
def absolute_paths(config: RunConfig) -> RunConfig:
    """Adapter globs and the registry as absolute paths: replicas may run elsewhere."""
    serve_config = config.serve.model_copy(
        update={
            "adapter_dirs": [os.path.abspath(os.path.expanduser(p)) for p in config.serve.adapter_dirs],
            "registry_dir": os.path.abspath(registry_dir_for(config)),
        }
    )
    return config.model_copy(update={"serve": serve_config})


def model_deployment_options(limits: ServeConfig) -> dict[str, Any]:
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": limits.num_cpus_per_replica, "num_gpus": limits.num_gpus_per_replica},
        "max_ongoing_requests": limits.max_ongoing_requests,
    }
    if limits.num_replicas == "auto":
        options["autoscaling_config"] = {
            "min_replicas": limits.min_replicas,
            "max_replicas": limits.max_replicas,
            "target_ongoing_requests": limits.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = limits.num_replicas
    return options


def build_app(config: RunConfig):
    """The Serve application for a run config (pass it to `serve.run`)."""
    config = absolute_paths(config)
    limits = config.serve
    model_config = config.model
    if model_config.max_lora_rank is None:  # vLLM: fit the adapters there are now (later ones are checked)
        ranks = [lora_rank(a.path) for a in AdapterRegistry.from_config(config).adapters()]
        model_config = model_config.model_copy(update={"max_lora_rank": fitting_lora_rank(ranks)})
    model = AdapterModel.options(**model_deployment_options(limits)).bind(
        model_config.model_dump(mode="json"), limits.model_dump(mode="json")
    )
    # The ingress only parses and forwards: no CPU reserved, so it fits beside the model.
    ingress = OpenAIIngress.options(
        ray_actor_options={"num_cpus": 0}, max_ongoing_requests=limits.max_ongoing_requests * 4
    )
    return ingress.bind(model, config.model_dump(mode="json"))


def with_env_api_key(config: RunConfig) -> RunConfig:
    key = os.environ.get("SELFSPEC_API_KEY")
    if config.serve.api_key or not key:
        return config
    return config.model_copy(update={"serve": config.serve.model_copy(update={"api_key": key})})


def warn_if_exposed(limits: ServeConfig) -> None:
    """A server reachable beyond loopback without a key is everyone's server: say so."""
    if limits.host not in ("127.0.0.1", "localhost", "::1") and not limits.api_key:
        print(f"selfspec serve: warning: listening on {limits.host} without an API key", file=sys.stderr)


def app_builder(args: dict[str, Any]):
    """Import path for `serve run` and RayService: args `config` (name or file) and
    `overrides` (a list of `key=value`). SELFSPEC_API_KEY sets the key when the config has none."""
    args = dict(args or {})
    config = load_config(args.pop("config", "default"), list(args.pop("overrides", []) or []))
    if args:
        raise ValueError(f"unknown application args: {', '.join(sorted(args))} (use config and overrides)")
    return build_app(with_env_api_key(config))


def cli(config: RunConfig, args) -> int:
    """`selfspec serve`: run the application on serve.host:serve.port until interrupted."""
    import ray

    config = with_env_api_key(config)
    limits = config.serve
    warn_if_exposed(limits)
    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True)
    serve.start(http_options={"host": limits.host, "port": limits.port})
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    names = AdapterRegistry.from_config(absolute_paths(config)).names()
    print(f"serving http://{limits.host}:{limits.port}/v1 : base + {len(names)} adapters ({', '.join(names[:8])})", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
        return 0
