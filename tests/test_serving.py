"""Serving: the OpenAI client against a real Ray Serve app on 127.0.0.1, plus the adapter
registry and eval-gated promotion.

The server fixture serves the embedded SmolLM2-135M in fp32 (mixed-adapter batches are
then bit-exact) with four LoRA adapters made with peft in seconds (random `lora_B`, so
each adapter visibly changes the greedy answer), at most three adapters per replica (so
a fourth makes the LRU evict while requests run), and an API key.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from selfspec.config import RunConfig
from selfspec.models import SamplingParams
from selfspec.serving.registry import (
    MIN_RESCAN_S,
    AdapterNameError,
    AdapterRegistry,
    PromotionError,
    UnknownAdapterError,
    check_name,
    decide_promotion,
    promote,
    read_index,
    set_current,
)
from selfspec.testing import write_random_lora_adapter

REPO = Path(__file__).resolve().parent.parent
API_KEY = "test-key-123"
ADAPTERS = {"bio": ("alpha", 1), "fin": ("alpha", 2), "law": ("beta", 3), "tax": ("beta", 4)}  # name -> (run, seed)
QUESTION = [{"role": "user", "content": "What is insulin?"}]


# -- adapters and eval results built for the tests --------------------------------------
def make_adapters(runs: Path, specs: dict[str, tuple[str, int]]) -> dict[str, Path]:
    """LoRA adapters (r=4 on q_proj and v_proj, large lora_B so answers change) on the embedded
    model's architecture, at runs/<run>/adapters/<name>, each drawn from its own seed."""
    from transformers import AutoConfig

    from selfspec.models.resolve import resolve_model

    config = AutoConfig.from_pretrained(resolve_model("embedded:smollm2-135m-instruct"))
    return {
        name: write_random_lora_adapter(config, runs / run / "adapters" / name, seed, r=4,
                                        target_modules=["q_proj", "v_proj"], b_scale=0.5)
        for name, (run, seed) in specs.items()
    }


def metrics_doc(adapter: str, adapter_path: str, ours: float, base: float, ci_low: float | None = 0.01) -> dict:
    """A metrics.json in the shape `selfspec eval` writes (one biomedical task, 0-shot)."""
    cell = lambda v: {"n": 20, "accuracy": {"value": v, "ci_low": v - 0.1, "ci_high": v + 0.1}}  # noqa: E731
    domain = lambda v: {"biomedical": {"0": {"tasks": 1, "primary": v, "accuracy": v}}}  # noqa: E731
    return {
        "run": "alpha",
        "models": {"base": None, adapter: adapter_path},
        "reference": "base",
        "shots": [0],
        "tasks": {"bio_yesno": {"domain": "biomedical", "metrics": ["accuracy"], "n": 20}},
        "results": {"base": {"bio_yesno": {"0": cell(base)}}, adapter: {"bio_yesno": {"0": cell(ours)}}},
        "deltas": {adapter: {"bio_yesno": {"0": {"accuracy": {"value": ours - base, "ci_low": ci_low, "ci_high": 0.3}}}}},
        "domains": {"base": domain(base), adapter: domain(ours)},
    }


def write_eval(run_root: Path, adapter: Path, ours: float, base: float, domain: str = "biomedical") -> None:
    (run_root / "eval").mkdir(parents=True, exist_ok=True)
    doc = metrics_doc(adapter.name, str(adapter.resolve()), ours, base)
    (run_root / "eval" / "metrics.json").write_text(json.dumps(doc))
    (run_root / "config.yaml").write_text(yaml.safe_dump({"generate": {"domain": domain}}))


@pytest.fixture(scope="module")
def adapter_paths(tmp_path_factory) -> dict[str, Path]:
    return make_adapters(tmp_path_factory.mktemp("serving") / "runs", ADAPTERS)


def serve_config(runs: Path, **serve) -> RunConfig:
    return RunConfig.model_validate(
        {
            "runs_dir": str(runs),
            "model": {"dtype": "float32", "backend": "transformers"},
            "serve": {
                "adapter_dirs": [str(runs / "*" / "adapters")],
                "api_key": API_KEY,
                "max_adapters_per_replica": 3,
                "max_body_bytes": 16384,
                "max_prompt_tokens": 256,
                "max_tokens_limit": 64,
                "batch_wait_timeout_s": 0.25,
                "num_cpus_per_replica": 2,
                "registry_refresh_s": 0,
                **serve,
            },
        }
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_local, adapter_paths):
    from ray import serve

    from selfspec.serving.app import build_app

    runs = adapter_paths["bio"].parents[2]
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(serve_config(runs)), name="selfspec-test", route_prefix="/")
    yield {"url": f"http://127.0.0.1:{port}", "runs": runs, "adapters": adapter_paths}
    serve.shutdown()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server["url"] + "/v1", api_key=API_KEY, max_retries=0, timeout=300)


def chat(client, model: str, messages=QUESTION, **kwargs) -> str:
    kwargs = {"max_tokens": 8, "temperature": 0, **kwargs}
    return client.chat.completions.create(model=model, messages=messages, **kwargs).choices[0].message.content


def replica_info() -> dict:
    from ray import serve

    return serve.get_deployment_handle("AdapterModel", "selfspec-test").info.remote().result()


PROMPTS = [QUESTION, [{"role": "user", "content": "Name a planet."}]]
MODELS = ["base", "bio", "fin", "law"]


@pytest.fixture(scope="module")
def alone(client) -> dict[tuple[str, int], str]:
    """Greedy answers, one request at a time: the reference other tests compare with."""
    return {(name, i): chat(client, name, p) for i, p in enumerate(PROMPTS) for name in MODELS}


# -- the running server ------------------------------------------------------------------
def test_lists_base_and_adapters(client):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "base"
    assert set(ADAPTERS) <= set(ids)


def test_adapters_change_the_greedy_answer(client, alone):
    response = client.chat.completions.create(model="base", messages=QUESTION, max_tokens=8, temperature=0)
    assert response.model == "base" and response.choices[0].message.content == alone[("base", 0)]
    assert response.usage.completion_tokens == 8 and response.usage.prompt_tokens > 10
    assert response.usage.total_tokens == response.usage.prompt_tokens + 8
    assert response.choices[0].finish_reason == "length"
    base, bio, fin = alone[("base", 0)], alone[("bio", 0)], alone[("fin", 0)]
    assert base.strip() and bio != base and fin != base and bio != fin


def test_streaming_matches_the_whole_answer(client, alone):
    stream = client.chat.completions.create(
        model="fin", messages=QUESTION, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == alone[("fin", 0)]
    assert len([c for c in chunks if c.choices]) > 2
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8


def test_completions_with_stop_and_n(client):
    response = client.completions.create(
        model="law", prompt=["The capital of France is", "One, two, three,"], max_tokens=12,
        temperature=0.8, seed=7, n=2, stop=["\n", "."],
    )
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert all("\n" not in c.text and "." not in c.text for c in response.choices)
    assert response.model == "law" and response.usage.prompt_tokens > 5
    assert 0 < response.usage.completion_tokens <= 4 * 12


def test_wrong_or_missing_key_is_401(server):
    import openai
    import requests

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["url"] + "/v1", api_key="wrong", max_retries=0).models.list()
    reply = requests.post(server["url"] + "/v1/chat/completions", json={"model": "base", "messages": QUESTION})
    assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"


def test_unknown_adapter_404_and_traversal_400(client):
    import openai

    with pytest.raises(openai.NotFoundError) as missing:
        chat(client, "no-such-adapter")
    assert missing.value.body["code"] == "model_not_found"
    for name in ["../alpha/adapters/bio", "/etc/passwd", "bio/../fin", "..", "~root"]:
        with pytest.raises(openai.BadRequestError) as bad:
            chat(client, name)
        assert bad.value.body["param"] == "model"


def test_limits_give_400(client):
    import openai

    with pytest.raises(openai.BadRequestError) as big_body:
        chat(client, "base", messages=[{"role": "user", "content": "x " * 20000}])
    assert big_body.value.body["code"] == "request_too_large"
    with pytest.raises(openai.BadRequestError) as long_prompt:
        chat(client, "base", messages=[{"role": "user", "content": "insulin " * 400}])
    assert long_prompt.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as many_tokens:
        chat(client, "base", max_tokens=65)
    assert many_tokens.value.body["param"] == "max_tokens"


MALFORMED: list[tuple[str, object]] = [
    ("invalid json", b"{not json"),
    ("truncated json", b'{"model": "base", "messages": ['),
    ("not utf-8", b"\xff\xfe\x00"),
    ("empty body", b""),
    ("json array", []),
    ("json string", "hello"),
    ("json number", 42),
    ("missing model", {"messages": QUESTION}),
    ("missing messages", {"model": "base"}),
    ("empty messages", {"model": "base", "messages": []}),
    ("messages not a list", {"model": "base", "messages": "hi"}),
    ("message without role", {"model": "base", "messages": [{"content": "hi"}]}),
    ("unknown role", {"model": "base", "messages": [{"role": "wizard", "content": "hi"}]}),
    ("content a number", {"model": "base", "messages": [{"role": "user", "content": 5}]}),
    ("image content part", {"model": "base", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
    ("model a number", {"model": 7, "messages": QUESTION}),
    ("model empty", {"model": "", "messages": QUESTION}),
    ("model null", {"model": None, "messages": QUESTION}),
    ("traversal model", {"model": "../../etc/passwd", "messages": QUESTION}),
    ("absolute model", {"model": "/root/.ssh", "messages": QUESTION}),
    ("unknown model", {"model": "nope", "messages": QUESTION}),
    ("huge model name", {"model": "a" * 5000, "messages": QUESTION}),
    ("max_tokens a string", {"model": "base", "messages": QUESTION, "max_tokens": "8"}),
    ("max_tokens negative", {"model": "base", "messages": QUESTION, "max_tokens": -1}),
    ("max_tokens zero", {"model": "base", "messages": QUESTION, "max_tokens": 0}),
    ("max_tokens huge", {"model": "base", "messages": QUESTION, "max_tokens": 10**12}),
    ("max_tokens float", {"model": "base", "messages": QUESTION, "max_tokens": 8.5}),
    ("temperature negative", {"model": "base", "messages": QUESTION, "temperature": -0.5}),
    ("temperature huge", {"model": "base", "messages": QUESTION, "temperature": 1e9}),
    ("temperature a string", {"model": "base", "messages": QUESTION, "temperature": "hot"}),
    ("top_p zero", {"model": "base", "messages": QUESTION, "top_p": 0}),
    ("top_p above 1", {"model": "base", "messages": QUESTION, "top_p": 1.5}),
    ("n zero", {"model": "base", "messages": QUESTION, "n": 0}),
    ("n huge", {"model": "base", "messages": QUESTION, "n": 1000}),
    ("stream a string", {"model": "base", "messages": QUESTION, "stream": "yes"}),
    ("stop a number", {"model": "base", "messages": QUESTION, "stop": 3}),
    ("too many stops", {"model": "base", "messages": QUESTION, "stop": [str(i) for i in range(17)]}),
    ("empty stop", {"model": "base", "messages": QUESTION, "stop": [""]}),
    ("seed negative", {"model": "base", "messages": QUESTION, "seed": -3}),
    ("logprobs a string", {"model": "base", "messages": QUESTION, "logprobs": "yes"}),
    ("top_logprobs without logprobs", {"model": "base", "messages": QUESTION, "top_logprobs": 2}),
    ("oversized body", {"model": "base", "messages": [{"role": "user", "content": "y" * 20000}]}),
    ("prompt too long", {"model": "base", "messages": [{"role": "user", "content": "word " * 600}]}),
    ("completions: prompt missing", {"model": "base"}),
    ("completions: prompt a number", {"model": "base", "prompt": 5}),
    ("completions: token id out of vocabulary", {"model": "base", "prompt": [1, 2, 10**9]}),
    ("completions: negative token id", {"model": "base", "prompt": [[1, -2]]}),
    ("completions: empty token list", {"model": "base", "prompt": [[]]}),
    ("completions: suffix", {"model": "base", "prompt": "hi", "suffix": "bye"}),
    ("completions: logprobs over the limit", {"model": "base", "prompt": "hi", "logprobs": 6}),
    ("completions: too many prompts", {"model": "base", "prompt": ["hi"] * 20}),
]


def test_malformed_requests_get_openai_errors_and_the_server_keeps_answering(server, client):
    import requests

    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    statuses = {}
    for label, body in MALFORMED:
        path = "/v1/completions" if label.startswith("completions:") else "/v1/chat/completions"
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        reply = requests.post(server["url"] + path, data=data, headers=headers, timeout=120)
        statuses[label] = reply.status_code
        assert 400 <= reply.status_code < 500, (label, reply.status_code, reply.text[:200])
        error = reply.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], label
    # A chunked body past the limit, and requests to routes and methods that do not exist.
    chunked = requests.post(
        server["url"] + "/v1/chat/completions", data=iter([b"{" + b" " * 8192] * 3), headers=headers, timeout=60
    )
    assert chunked.status_code == 400 and chunked.json()["error"]["code"] == "request_too_large"
    assert requests.get(server["url"] + "/v1/nothing", headers=headers).json()["error"]["code"] == "not_found"
    assert requests.delete(server["url"] + "/v1/models", headers=headers).status_code == 405
    assert len(MALFORMED) >= 30 and statuses["unknown model"] == 404
    assert chat(client, "base").strip()


def burst(client, jobs: list[tuple[str, int]]) -> dict[tuple[str, int], str]:
    """Send greedy chat requests all at once (threads released together)."""
    start = threading.Barrier(len(jobs))

    def send(job):
        start.wait()
        return chat(client, job[0], PROMPTS[job[1]])

    with ThreadPoolExecutor(len(jobs)) as pool:
        return dict(zip(jobs, pool.map(send, jobs)))


def test_interleaved_adapters_match_one_at_a_time(client, alone):
    jobs = [(name, i) for i in range(len(PROMPTS)) for name in MODELS]
    before = replica_info()
    together = burst(client, jobs)
    assert together == {job: alone[job] for job in jobs}
    after = replica_info()
    # Evidence that adapters shared forward passes (how many share one depends on arrival times).
    assert after["mixed_batches"] > before["mixed_batches"], (before, after)
    assert not after["folds_adapters"]  # model.merge_single_adapter=auto never folds in serve


def test_lru_eviction_while_requests_run(client, alone):
    tax = chat(client, "tax")  # a fourth adapter: the least recently used one goes
    assert tax not in {alone[(name, 0)] for name in MODELS}
    before = replica_info()
    jobs = [(name, 0) for name in ["bio", "fin", "law", "tax"]]
    assert burst(client, jobs) == {**{job: alone[job] for job in jobs[:3]}, ("tax", 0): tax}
    after = replica_info()
    assert after["adapter_loads"] > before["adapter_loads"]
    assert len(after["adapters"]) <= 3, after  # the bound holds once requests finish


def test_promoted_adapter_is_served_without_restart(server, client, alone):
    bio = server["adapters"]["bio"]
    write_eval(bio.parents[1], bio, ours=0.8, base=0.6)
    config = serve_config(server["runs"])
    decision, record = promote(str(bio), config)
    assert decision.passed and record["model"] == "biomedical@v1"
    ids = [m.id for m in client.models.list().data]
    assert {"biomedical", "biomedical@v1"} <= set(ids)
    response = client.chat.completions.create(model="biomedical", messages=QUESTION, max_tokens=8, temperature=0)
    assert response.model == "biomedical@v1"
    assert response.choices[0].message.content == alone[("bio", 0)]


# -- what evaluation clients send: lm-evaluation-harness's `local-completions` ------------
# Request bodies as lm_eval/models/openai_completions.py `_create_payload` builds them, and
# responses read as its `parse_logprobs` and `parse_generations` read them.
def lm_eval_parse_logprobs(response: dict, ctxlens: list[int]) -> list[tuple[float, bool]]:
    """(sum of the continuation's logprobs, whether each continuation token is the argmax)."""
    results = []
    for choice, ctxlen in zip(sorted(response["choices"], key=lambda c: c["index"]), ctxlens):
        token_logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]
        top_logprobs = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        is_greedy = all(token == max(top.values()) for token, top in zip(token_logprobs, top_logprobs))
        results.append((sum(token_logprobs), is_greedy))
    return results


def lm_eval_parse_generations(response: dict) -> list[str]:
    texts = [None] * len(response["choices"])
    for choice in response["choices"]:
        texts[choice["index"]] = choice["text"]
    return texts


def post(server, body: dict, path: str = "/v1/completions"):
    import requests

    headers = {"Authorization": f"Bearer {API_KEY}"}
    return requests.post(server["url"] + path, json=body, headers=headers, timeout=300)


@pytest.fixture(scope="module")
def reference(server):
    """The engine in this process, fp32 as the server's replica, with the server's 'bio' adapter."""
    from selfspec.config import ModelConfig
    from selfspec.models import load_backend

    backend = load_backend(ModelConfig(dtype="float32", backend="transformers"))
    backend.load_adapter("bio", str(server["adapters"]["bio"]))
    return backend


CONTEXT = "Question: Is aspirin a nonsteroidal anti-inflammatory drug?\nAnswer:"
LOGLIKELIHOOD = [(CONTEXT, " yes"), (CONTEXT, " no"), ("The capital of France is", " Paris, the city of light"),
                 ("The capital of France is", " banana bread")]


def test_lm_eval_loglikelihood_requests_give_the_engines_loglikelihood(server, reference):
    """The loglikelihood request (token ids of context + continuation, echo, max_tokens 1,
    logprobs 1), parsed as lm-evaluation-harness does, sums to `TransformersBackend.loglikelihood`
    for the base and for an adapter, which changes the echoed logprobs."""
    # A greedy continuation, for is_greedy: the engine's own next three tokens.
    greedy = reference.generate([LOGLIKELIHOOD[2][0]], SamplingParams(max_new_tokens=3))[0][0].text
    requests = [*LOGLIKELIHOOD, (LOGLIKELIHOOD[2][0], greedy)]
    split = [reference.split_request(context, continuation) for context, continuation in requests]
    prompts = [ctx + cont for ctx, cont in split]
    sums = {}
    for model in ("base", "bio"):
        body = {"model": model, "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
                "echo": True}
        reply = post(server, body)
        assert reply.status_code == 200, reply.text
        response = reply.json()
        parsed = lm_eval_parse_logprobs(response, [len(ctx) for ctx, _ in split])
        expected = reference.loglikelihood(requests, None if model == "base" else "bio")
        assert [value for value, _ in parsed] == pytest.approx(expected, abs=1e-3), model
        sums[model] = [value for value, _ in parsed]
        if model == "base":
            assert [is_greedy for _, is_greedy in parsed][3:] == [False, True]  # banana bread; the greedy tokens
        for choice, prompt in zip(response["choices"], prompts):
            logprobs = choice["logprobs"]
            assert len(logprobs["tokens"]) == len(prompt) + 1 == len(logprobs["token_logprobs"])
            assert len(logprobs["top_logprobs"]) == len(logprobs["text_offset"]) == len(prompt) + 1
            assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
            assert choice["text"].startswith(reference.tokenizer.decode(prompt))
            assert logprobs["text_offset"][1] == len(logprobs["tokens"][0])
            assert all(1 <= len(top) <= 2 for top in logprobs["top_logprobs"][1:])
        assert response["usage"]["prompt_tokens"] == sum(map(len, prompts))
        assert response["usage"]["completion_tokens"] == len(prompts)
    assert all(abs(b - a) > 1e-2 for a, b in zip(sums["base"], sums["bio"]))


def test_lm_eval_generation_requests_with_token_ids_and_text(server, reference):
    """generate_until sends token ids (tokenized requests) or text, with the task's stop strings
    plus the eos token: both give the engine's greedy texts."""
    texts = ["Question: What organ pumps blood?\nAnswer:", "1. Apple\n2. Banana\n3."]
    stop = ["\n\n", "Question:", "\n", reference.tokenizer.eos_token]
    params = SamplingParams(max_new_tokens=16, stop=tuple(stop))
    expected = [c[0].text for c in reference.generate(texts, params)]
    for prompt in ([reference.encode(t) for t in texts], texts):
        body = {"prompt": prompt, "model": "base", "max_tokens": 16, "temperature": 0, "stop": stop, "seed": 1234}
        reply = post(server, body)
        assert reply.status_code == 200, reply.text
        assert lm_eval_parse_generations(reply.json()) == expected
    one = post(server, {"prompt": texts[0], "model": "base", "max_tokens": 16, "temperature": 0, "stop": stop,
                        "seed": 1234})
    assert lm_eval_parse_generations(one.json()) == expected[:1]


def test_echo_max_tokens_zero_n_and_seed_with_the_openai_client(client, reference):
    ids = reference.encode("The capital of France is")
    scored = client.completions.create(model="base", prompt=[ids], max_tokens=0, echo=True, logprobs=2)
    (choice,) = scored.choices
    assert choice.text == "The capital of France is" and choice.finish_reason == "length"
    assert scored.usage.completion_tokens == 0 and scored.usage.prompt_tokens == len(ids)
    assert len(choice.logprobs.tokens) == len(ids) and "".join(choice.logprobs.tokens) == choice.text
    assert all(len(top) in (2, 3) for top in choice.logprobs.top_logprobs[1:])
    empty = client.completions.create(model="base", prompt=[ids], max_tokens=0)
    assert empty.choices[0].text == "" and empty.usage.completion_tokens == 0

    sampled = [
        client.completions.create(model="law", prompt=[ids, ids[:3]], max_tokens=6, temperature=0.9, seed=7, n=2,
                                  echo=True, logprobs=0)
        for _ in range(2)
    ]
    assert [c.text for c in sampled[0].choices] == [c.text for c in sampled[1].choices]
    assert [c.index for c in sampled[0].choices] == [0, 1, 2, 3]
    assert all(c.text.startswith("The capital of France is") for c in sampled[0].choices[:2])
    for c in sampled[0].choices:
        assert len(c.logprobs.tokens) > (len(ids) if c.index < 2 else 3)
        assert c.logprobs.token_logprobs[0] is None and None not in c.logprobs.token_logprobs[1:]

    generated = client.completions.create(model="base", prompt="The capital of France is", max_tokens=4,
                                          temperature=0, logprobs=2)
    logprobs = generated.choices[0].logprobs
    assert "".join(logprobs.tokens) == generated.choices[0].text and len(logprobs.tokens) == 4
    assert logprobs.text_offset[0] == 0
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert top[token] == logprob == max(top.values())


def test_chat_logprobs(client, alone):
    response = client.chat.completions.create(model="bio", messages=QUESTION, max_tokens=8, temperature=0,
                                              logprobs=True, top_logprobs=2)
    choice = response.choices[0]
    assert choice.message.content == alone[("bio", 0)]
    content = choice.logprobs.content
    assert len(content) == response.usage.completion_tokens  # an eos token too, where the answer ends
    assert "".join(t.token for t in content).startswith(choice.message.content)
    for entry in content:
        assert entry.bytes == list(entry.token.encode()) and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob
        assert entry.top_logprobs[1].logprob <= entry.logprob <= 0
    plain = client.chat.completions.create(model="bio", messages=QUESTION, max_tokens=8, temperature=0)
    assert plain.choices[0].logprobs is None


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "hi", "logprobs": 6}, "logprobs"),
        ({"prompt": [[1, 2, 10**6]], "logprobs": 1, "echo": True}, "prompt"),
        ({"prompt": "hi", "suffix": "bye"}, "suffix"),
        ({"prompt": "hi", "best_of": 2}, "best_of"),
        ({"prompt": "hi", "logprobs": 1, "stream": True}, "stream"),
        ({"prompt": [[]]}, "prompt"),
        ({"prompt": [[1, 2], "three"]}, "prompt"),
        ({"prompt": [7] * 300, "max_tokens": 0, "echo": True, "logprobs": 1}, "prompt"),
        ({"messages": QUESTION, "logprobs": True, "top_logprobs": 6}, "top_logprobs"),
        ({"messages": QUESTION, "logprobs": True, "stream": True}, "stream"),
    ],
)
def test_bad_logprob_requests_give_400_naming_the_param(server, body, param):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    reply = post(server, {"model": "base", **body}, path)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    if len(body.get("prompt", [])) == 300:
        assert error["code"] == "context_length_exceeded"


# -- registry and promotion (no server) ------------------------------------------------
@pytest.mark.parametrize("name", ["bio", "bio-v2", "Fin_1.0", "biomedical@v3", "a" * 64])
def test_valid_names(name):
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "../x", "..", ".hidden", "a/b", "/etc/passwd", "a\\b", "bio@v0", "bio@3", "a b", "a" * 65, 5, None, "bio@v1@v2"]
)
def test_invalid_names(name):
    with pytest.raises(AdapterNameError):
        check_name(name)


def test_registry_scan_conflicts_checkpoints_and_rescan(tmp_path):
    for folder in ["r1/adapters/bio", "r2/adapters/bio", "r1/adapters/fin", "r1/adapters/checkpoint-10", "r1/adapters/base"]:
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "adapter_config.json").write_text("{}")
    registry = AdapterRegistry([str(tmp_path / "*" / "adapters")], str(tmp_path / "registry"), refresh_s=3600)
    assert registry.names() == ["fin"]
    with pytest.raises(UnknownAdapterError, match="ambiguous"):
        registry.resolve("bio")
    with pytest.raises(AdapterNameError):
        registry.resolve("../r1/adapters/fin")
    (tmp_path / "r3/adapters/law").mkdir(parents=True)
    (tmp_path / "r3/adapters/law/adapter_config.json").write_text("{}")
    time.sleep(MIN_RESCAN_S)  # unknown names rescan at most this often
    assert registry.resolve("law").path == str((tmp_path / "r3/adapters/law").resolve())


def test_stream_events_for_text_completions():
    from selfspec.models import Completion
    from selfspec.serving.protocol import completion_response, stream_events

    response = completion_response("law", [[Completion("Paris is big.", 5, 4, "stop")]])
    events = list(stream_events(response, include_usage=True))
    assert events[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "Paris is big."
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}


def test_promotion_rule(tmp_path):
    config = serve_config(tmp_path)
    passing = metrics_doc("bio", "/x/bio", ours=0.7, base=0.6)
    assert decide_promotion(passing, "bio", "biomedical", config.serve).passed
    assert not decide_promotion(passing, "bio", "finance", config.serve).passed
    strict = serve_config(tmp_path, promote_min_delta=0.2).serve
    assert "needs >" in decide_promotion(passing, "bio", "biomedical", strict).reasons[0]
    equal = metrics_doc("bio", "/x/bio", ours=0.6, base=0.6)
    assert not decide_promotion(equal, "bio", "biomedical", config.serve).passed
    with_ci = serve_config(tmp_path, promote_require_ci=True).serve
    assert decide_promotion(passing, "bio", "biomedical", with_ci).passed
    unsure = metrics_doc("bio", "/x/bio", ours=0.7, base=0.6, ci_low=-0.05)
    assert not decide_promotion(unsure, "bio", "biomedical", with_ci).passed
    no_base = {**passing, "reference": "bio"}
    assert "no base" in decide_promotion(no_base, "bio", "biomedical", config.serve).reasons[0]


def test_promote_versions_rollback_and_rejection(tmp_path, adapter_paths):
    import shutil

    from selfspec.cli import main

    runs = tmp_path / "runs"
    adapter = runs / "alpha" / "adapters" / "bio"
    shutil.copytree(adapter_paths["bio"], adapter)
    config = serve_config(runs)
    write_eval(runs / "alpha", adapter, ours=0.5, base=0.6)
    decision, record = promote(str(adapter), config)
    assert record is None and not decision.passed
    assert not (runs / "registry" / "biomedical").exists()
    assert main(["promote", f"runs_dir={runs}", str(adapter)]) == 1

    # The domain recorded by `selfspec train` beats the run config's.
    write_eval(runs / "alpha", adapter, ours=0.8, base=0.6, domain="finance")
    (adapter / "selfspec.json").write_text(json.dumps({"domain": "biomedical"}))
    assert main(["promote", f"runs_dir={runs}", str(adapter)]) == 0
    _, second = promote(str(adapter), config)
    assert second["model"] == "biomedical@v2"
    v1 = runs / "registry" / "biomedical" / "v1"
    assert (v1 / "adapter_model.safetensors").read_bytes() == (adapter / "adapter_model.safetensors").read_bytes()
    assert json.loads((v1 / "promotion.json").read_text())["checks"][0]["delta"] == pytest.approx(0.2)
    assert read_index(runs / "registry")["adapters"]["biomedical"]["current"] == 2
    registry = AdapterRegistry.from_config(config)
    assert registry.resolve("biomedical").name == "biomedical@v2"
    set_current(runs / "registry", "biomedical", 1)
    registry.scan()
    assert registry.resolve("biomedical").name == "biomedical@v1"
    assert registry.resolve("biomedical@v2").path.endswith("biomedical/v2")
    with pytest.raises(PromotionError):
        set_current(runs / "registry", "biomedical", 7)
    _, named = promote(str(adapter), config, name="bio-prod")
    assert named["model"] == "bio-prod@v1"
    with pytest.raises(PromotionError):
        promote(str(adapter), config, name="../evil")


# -- deployment config -------------------------------------------------------------------
def test_serve_config_yaml_builds_the_app():
    from ray.serve.schema import ServeDeploySchema

    from selfspec.serving.app import app_builder

    document = yaml.safe_load((REPO / "cluster" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(document)
    app = schema.applications[0]
    module, attr = app.import_path.split(":")
    builder = getattr(__import__(module, fromlist=[attr]), attr)
    assert builder is app_builder
    assert builder(dict(app.args)) is not None
    with pytest.raises(ValueError, match="unknown application args"):
        app_builder({"confg": "default"})
