"""The sd3-comfyui architecture: keys and components, joint blocks, classes, optional text
encoders, names for old recipes; a block-wise merge over the joint blocks."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file

import mecha_core
import mecha_methods.plugin
import mecha_sd3.plugin
from mecha_core.kit import synthetic
from mecha_core.testing import using
from mecha_sd3 import layout


@pytest.fixture(scope="module")
def arch():
    return layout.architecture()


def test_counts_and_components(arch):
    assert len(arch.keys) == 1672
    counts = {}
    for s in arch.keys.values():
        counts[s.component] = counts.get(s.component, 0) + 1
    assert counts == {"vae": 244, "diffuser": 492, "clip_g": 518, "clip_l": 198, "t5xxl": 220}
    # text encoders are optional (sd3_medium.safetensors has none); everything else is required
    assert {k for k, s in arch.keys.items() if s.optional} == {
        k for k, s in arch.keys.items() if s.component in ("clip_l", "clip_g", "t5xxl")}
    assert arch.keys["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"].shape == (4608, 1536)


def expected_block(key: str) -> str | None:
    prefix = {"text_encoders.clip_l.": "CLIP_L", "text_encoders.clip_g.": "CLIP_G", "text_encoders.t5xxl.": "T5XXL",
              "first_stage_model.": "VAE", "model.diffusion_model.final_layer.": "OUT"}
    for p, name in prefix.items():
        if key.startswith(p):
            return name
    m = re.match(r"model\.diffusion_model\.joint_blocks\.(\d+)\.", key)
    if m:
        return "J%02d" % int(m.group(1))
    return "IN" if key.startswith("model.diffusion_model.") else None


def test_blocks(arch):
    assert arch.blocks[:4] == ("CLIP_L", "CLIP_G", "T5XXL", "IN") and arch.blocks[-2:] == ("OUT", "VAE")
    assert [b for b in arch.blocks if b.startswith("J")] == ["J%02d" % i for i in range(24)]
    for key, spec in arch.keys.items():
        wanted = expected_block(key)
        assert spec.blocks == ((wanted,) if wanted else ()), key
    # the last joint block's context stream is pre-only: no attn.proj, no mlp
    assert sum("J23" in s.blocks for s in arch.keys.values()) == 14
    assert sum("J00" in s.blocks for s in arch.keys.values()) == 20
    assert arch.keys["model.model_sampling.sigmas"].blocks == ()


@pytest.mark.parametrize("key, klass", [
    ("model.diffusion_model.joint_blocks.5.x_block.attn.qkv.weight", "x_block_attn_qkv"),
    ("model.diffusion_model.joint_blocks.5.context_block.mlp.fc1.bias", "context_block_mlp_fc1"),
    ("model.diffusion_model.joint_blocks.0.x_block.adaLN_modulation.1.weight", "x_block_adaLN_modulation_1"),
    ("model.diffusion_model.pos_embed", "pos_embed"),
    ("model.diffusion_model.final_layer.linear.weight", "final_layer_linear"),
    ("text_encoders.clip_g.transformer.text_model.encoder.layers.30.mlp.fc1.weight", "mlp_fc1"),
    ("text_encoders.clip_l.transformer.text_model.final_layer_norm.weight", "final_layer_norm"),
    ("text_encoders.clip_l.transformer.text_projection.weight", "text_projection"),
    ("text_encoders.t5xxl.transformer.encoder.block.3.layer.1.DenseReluDense.wi_0.weight", "DenseReluDense_wi_0"),
    ("text_encoders.t5xxl.transformer.encoder.final_layer_norm.weight", "final_layer_norm"),
    ("text_encoders.t5xxl.transformer.shared.weight", "shared"),
    ("first_stage_model.encoder.mid.attn_1.v.weight", "attn_1_v"),
    ("model.model_sampling.sigmas", None),
])
def test_classes(arch, key, klass):
    assert arch.keys[key].klass == klass


def test_names_for_old_recipes():
    with using(mecha_sd3.plugin) as host:
        arch = host.architecture("sd3")
    assert arch.name == "sd3-comfyui"
    assert arch.component_aliases == {"txt": "clip_l", "txt2": "clip_g", "unet": "diffuser"}


def test_joint_block_values_reach_their_keys(tmp_path, arch):
    # the 1-D keys of the MMDiT: every joint block plus IN and OUT, a few KB each
    keys = [k for k, s in arch.keys.items() if s.component == "diffuser" and len(s.shape) == 1]
    table = synthetic.key_table(arch, keys, "float32")
    a = synthetic.write_layout(tmp_path / "a.safetensors", table, seed=1)
    b = synthetic.write_layout(tmp_path / "b.safetensors", table, seed=2)
    values = {"J%02d" % i: i / 24 for i in range(24)}
    with using(mecha_methods.plugin, mecha_sd3.plugin):
        alpha = mecha_core.blocks("sd3", default=0.5, OUT=1.0, **values)
        mecha_core.merge(mecha_core.weighted_sum(mecha_core.model(a), mecha_core.model(b), alpha=alpha),
                         tmp_path / "out.safetensors")
    ta, tb, out = load_file(a), load_file(b), load_file(tmp_path / "out.safetensors")
    for key in keys:
        block = expected_block(key)
        alpha_k = values.get(block, 1.0 if block == "OUT" else 0.5) if block else 0.5
        torch.testing.assert_close(out[key], ta[key] * (1 - alpha_k) + tb[key] * alpha_k, rtol=1e-6, atol=1e-7,
                                   msg=lambda m, key=key: f"{key}: {m}")
