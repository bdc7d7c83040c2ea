"""SD3.5 medium and large: the computed MMDiT tables are what diffusers' own converter turns into
SD3Transformer2DModel's keys (no key left over, none missing), SD3 medium's is the packed table,
and the three SD3 layouts are told apart by their keys."""

from __future__ import annotations

import pytest
import torch

import mecha_sd3.plugin
from mecha_core.kit import synthetic
from mecha_core.testing import detect_architecture, host_with
from mecha_sd3 import layout, sd35

CONFIGS = {
    "medium": (sd35.SD35_MEDIUM, dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                                      pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
                                      qk_norm="rms_norm")),
    "large": (sd35.SD35_LARGE, dict(num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                                    pos_embed_max_size=192, qk_norm="rms_norm")),
}


def test_sd3_medium_is_the_packed_table():
    packed = {k: s.shape for k, s in layout.architecture().keys.items() if k.startswith(sd35.PREFIX)}
    assert sd35.mmdit_keys(sd35.SD3_MEDIUM) == packed


@pytest.mark.parametrize("size", sorted(CONFIGS))
def test_the_table_is_what_diffusers_converts(size):
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    shape, config = CONFIGS[size]
    with torch.device("meta"):
        model = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, attention_head_dim=64,
                                      joint_attention_dim=4096, pooled_projection_dim=2048, out_channels=16, **config)
        checkpoint = {k: torch.empty(s) for k, s in sd35.mmdit_keys(shape).items()}
        converted = convert_sd3_transformer_checkpoint_to_diffusers(checkpoint)
    assert checkpoint == {}  # the converter used every key of the table
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == want


def test_counts_blocks_and_mmdit_x():
    medium, large = sd35.medium(), sd35.large()
    assert [b for b in large.blocks if b.startswith("J")] == [f"J{i:02d}" for i in range(38)]
    assert large.keys["model.diffusion_model.joint_blocks.37.x_block.attn.qkv.weight"].shape == (3 * 2432, 2432)
    assert large.keys["model.diffusion_model.joint_blocks.37.x_block.attn.qkv.weight"].blocks == ("J37",)
    ada = "model.diffusion_model.joint_blocks.{}.x_block.adaLN_modulation.1.weight"
    assert medium.keys[ada.format(12)].shape == (9 * 1536, 1536)  # MMDiT-X: 3 more modulations for attn2
    assert medium.keys[ada.format(13)].shape == (6 * 1536, 1536)
    assert "model.diffusion_model.joint_blocks.13.x_block.attn2.qkv.weight" not in medium.keys
    assert medium.keys["model.diffusion_model.joint_blocks.0.x_block.attn2.ln_q.weight"].klass == "x_block_attn2_ln_q"
    assert medium.keys["model.diffusion_model.pos_embed"].shape == (1, 384 * 384, 1536)
    # text encoders, VAE and sigmas are sd3-comfyui's
    base = layout.architecture()
    shared = {k: s for k, s in base.keys.items() if not k.startswith(sd35.PREFIX)}
    assert all(large.keys[k] == s and medium.keys[k] == s for k, s in shared.items())


@pytest.mark.parametrize("name", ["sd3-comfyui", "sd3.5-medium", "sd3.5-large"])
@pytest.mark.parametrize("with_text_encoders", [True, False])
def test_detection(tmp_path, name, with_text_encoders):
    host = host_with(mecha_sd3.plugin)
    arch = host.architecture(name)
    table = {k: (s.shape, "float16") for k, s in arch.keys.items()
             if with_text_encoders or not k.startswith("text_encoders.")}
    path = tmp_path / "m.safetensors"
    synthetic.write_header_only(path, table)
    assert detect_architecture(str(path), frozenset(table), host).name == name
