"""Helpers for tests and benchmarks (as `transformers.testing_utils`): untrained LoRA adapters,
written in seconds, as real PEFT files on a model's architecture."""

from __future__ import annotations

from pathlib import Path


def write_random_lora_adapter(model_config, path: Path, seed: int, r: int = 8,
                              target_modules: str | list[str] = "all-linear", b_scale: float = 0.05) -> Path:
    """A PEFT LoRA adapter (alpha 2r) on `model_config`'s architecture, untrained: lora_A drawn
    from N(0, 1/fan_in) and lora_B from N(0, b_scale^2) with `seed` (not the global RNG, which
    earlier tests leave in any state), so it changes the model's outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    # Adapter files depend only on layer shapes: a weightless (meta) model is enough.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    lora = LoraConfig(r=r, lora_alpha=2 * r, target_modules=target_modules)
    peft_model = get_peft_model(model.to_empty(device="cpu"), lora)
    generator = torch.Generator().manual_seed(seed)
    for name, param in peft_model.named_parameters():
        if "lora_A" in name:
            param.data = torch.randn(param.shape, generator=generator) * param.shape[1] ** -0.5
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * b_scale
    peft_model.save_pretrained(path)
    return path
