"""GPU path (marker `gpu`): the vLLM backend and the generation pipeline on it.

Run on a machine with a CUDA GPU and the gpu extra: `pytest -m gpu`.
"""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def vllm_backend():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None:
        pytest.skip("needs a CUDA GPU and vllm (pip install -e '.[gpu]')")
    from selfspec.config import ModelConfig
    from selfspec.models import load_backend

    return load_backend(ModelConfig(backend="vllm", gpu_memory_utilization=0.5, max_model_len=2048))


def test_vllm_greedy_matches_itself_and_answers(vllm_backend):
    from selfspec.models import SamplingParams

    messages = [[{"role": "user", "content": "What is the main function of insulin?"}]] * 2
    out = vllm_backend.generate(messages, SamplingParams(max_new_tokens=32))
    assert out[0][0].text == out[1][0].text
    assert "blood" in out[0][0].text.lower()


def test_vllm_loglikelihood_prefers_the_right_continuation(vllm_backend):
    right, wrong = vllm_backend.loglikelihood([("The capital of France is", " Paris"), ("The capital of France is", " banana")])
    assert right > wrong


def test_generation_pipeline_on_vllm(tmp_path, vllm_backend):
    from selfspec.config import load_config
    from selfspec.io import RunDir, read_parquet
    from selfspec.stages.generate import run_generate

    config = load_config("default", [f"runs_dir={tmp_path}", "name=gpu", "model.backend=vllm", "generate.target=40",
                                     "generate.num_gpus_per_replica=1", "model.gpu_memory_utilization=0.3"])
    summary = run_generate(config, RunDir(str(tmp_path / "gpu")), executor="local")
    assert summary["counts"]["final_examples"] == 40
    assert len(read_parquet(tmp_path / "gpu" / "data" / "examples.parquet")) == 40
