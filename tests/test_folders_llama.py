"""End to end: two tiny Llamas saved sharded by transformers, merged into a folder by mecha, loaded
back with AutoModelForCausalLM offline; logits match a model holding the plain-torch weighted sum."""

from __future__ import annotations

import json
import os

import torch

import mecha_core as mecha


def _tiny_llama(folder, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder, max_shard_size="6KB")  # several shards
    return model


def test_two_sharded_llamas_merge_into_a_folder_transformers_loads(tmp_path, methods, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    a, b = _tiny_llama(tmp_path / "a", 0), _tiny_llama(tmp_path / "b", 1)
    assert len([n for n in os.listdir(tmp_path / "a") if n.endswith(".safetensors")]) > 2
    out = mecha.merge(mecha.weighted_sum(mecha.model(str(tmp_path / "a")), mecha.model(str(tmp_path / "b")),
                                         alpha=0.3), str(tmp_path / "merged") + "/", shard_size="8KB")
    assert out == str(tmp_path / "merged")
    names = sorted(os.listdir(out))
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) > 1 and all(n.startswith("model-0000") for n in shards)
    assert {"config.json", "generation_config.json", "recipe.mecha", "model.safetensors.index.json"} <= set(names)

    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    sa, sb = a.state_dict(), b.state_dict()
    reference = type(a)(a.config).eval()
    reference.load_state_dict({k: 0.7 * sa[k] + 0.3 * sb[k] for k in sa})
    ids = torch.tensor([[1, 5, 9, 2, 40, 7]])
    with torch.no_grad():
        got, want = merged(ids).logits, reference(ids).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    # the copied config is the first model's, unchanged
    with open(os.path.join(out, "config.json")) as f, open(tmp_path / "a" / "config.json") as g:
        assert json.load(f) == json.load(g)
