"""Shared fixtures: the real embedded model, loaded once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("SELFSPEC_SHARED_DATA", REPO.parent / "shared" / "data"))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def fp32_backend():
    """SmolLM2-135M in fp32: exact batch-vs-single equality holds in fp32."""
    from selfspec.config import ModelConfig
    from selfspec.models import load_backend

    return load_backend(ModelConfig(dtype="float32", backend="transformers"))


@pytest.fixture(scope="session")
def backend():
    """SmolLM2-135M in the default dtype (bf16 on CPUs with AVX512-BF16)."""
    from selfspec.config import ModelConfig
    from selfspec.models import load_backend

    return load_backend(ModelConfig(backend="transformers"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared evaluation data not found at {SHARED_DATA} (set SELFSPEC_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray runtime, started once for the session."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
