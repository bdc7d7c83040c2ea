"""Tiny Llama-shaped models built with transformers (random weights, no hub): a base and three
fine-tunes (the base plus small random changes), each a save_pretrained folder."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LAYERS = 3  # test_mergekit.LAYERS
_CONFIG = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=LAYERS, num_attention_heads=4,
               num_key_value_heads=2, head_dim=4, max_position_embeddings=32, pad_token_id=0, bos_token_id=1,
               eos_token_id=2)


@pytest.fixture(scope="session")
def llamas(tmp_path_factory):
    """{"base", "a", "b", "c"} -> folder; a, b, c are the base plus random deltas of several sizes."""
    root = tmp_path_factory.mktemp("llamas")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_CONFIG))
    model.save_pretrained(str(root / "base"))
    base = load_file(str(root / "base" / "model.safetensors"))
    folders = {"base": str(root / "base")}
    for i, name in enumerate(["a", "b", "c"]):
        shutil.copytree(root / "base", root / name)
        gen = torch.Generator().manual_seed(100 + i)
        tuned = {k: (v + torch.randn(v.shape, generator=gen) * 0.02 * (i + 1)).contiguous() for k, v in base.items()}
        save_file(tuned, str(root / name / "model.safetensors"), metadata={"format": "pt"})
        folders[name] = str(root / name)
    return folders
