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
    ("too many stops", {"model": "base", "messages": QUESTION, "stop": ["a", "b", "c", "d", "e"]}),
    ("empty stop", {"model": "base", "messages": QUESTION, "stop": [""]}),
    ("seed negative", {"model": "base", "messages": QUESTION, "seed": -3}),
    ("logprobs", {"model": "base", "messages": QUESTION, "logprobs": True}),
    ("oversized body", {"model": "base", "messages": [{"role": "user", "content": "y" * 20000}]}),
    ("prompt too long", {"model": "base", "messages": [{"role": "user", "content": "word " * 600}]}),
    ("completions: prompt missing", {"model": "base"}),
    ("completions: prompt a number", {"model": "base", "prompt": 5}),
    ("completions: token ids", {"model": "base", "prompt": [1, 2, 3]}),
    ("completions: echo", {"model": "base", "prompt": "hi", "echo": True}),
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
