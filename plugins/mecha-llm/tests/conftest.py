"""Tiny language models built with transformers (random weights, no hub), saved with save_pretrained."""

from __future__ import annotations

import os

import pytest
import torch
import transformers

os.environ.setdefault("HF_HUB_OFFLINE", "1")

_BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)

#: family -> (config class, extra config fields)
CONFIGS = {
    "llama": (transformers.LlamaConfig, {}),
    "mistral": (transformers.MistralConfig, {}),
    "qwen2": (transformers.Qwen2Config, {}),
    "qwen3": (transformers.Qwen3Config, {}),
    "gemma2": (transformers.Gemma2Config, {}),
    "gemma3": (transformers.Gemma3TextConfig, {}),
    "phi3": (transformers.Phi3Config, {"head_dim": None}),
    "mixtral": (transformers.MixtralConfig, {"num_local_experts": 4, "num_experts_per_tok": 2}),
}


def build(folder, family: str = "llama", seed: int = 0, **overrides) -> str:
    """Save a random tiny ``family`` model into ``folder``; returns its model.safetensors path."""
    cls, extra = CONFIGS[family]
    fields = {**_BASE, **extra, **overrides}
    config = cls(**{k: v for k, v in fields.items() if v is not None})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norms start at exactly 1 (or 0): give them values a merge can get wrong
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(folder))
    return os.path.join(str(folder), "model.safetensors")


@pytest.fixture
def tiny(tmp_path):
    """``tiny("a", family, seed, **config)``: a model saved under tmp_path/a."""
    def make(name: str, family: str = "llama", seed: int = 0, **overrides) -> str:
        return build(tmp_path / name, family, seed, **overrides)

    return make
