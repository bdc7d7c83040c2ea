"""SD1 in diffusers naming: the derived layout matches diffusers' own models and kohya's key list,
and a diffusers-layout file merges with an ldm file key for key (names mapped, VAE attention
reshaped)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mecha_core
import mecha_methods.plugin
import mecha_sd1.plugin
from mecha_core.testing import using, write_checkpoint
from mecha_sd1 import diffusers_layout, layout

DATA = Path(__file__).parent / "data"
CONFIGS = DATA / "diffusers-configs" / "sd15"


def _strip_text_model(key: str) -> str:
    # transformers 5 drops the text_model. level from CLIPTextModel.state_dict()
    return key.replace("text_encoder.text_model.", "text_encoder.", 1)


def test_layout_matches_kohyas_key_list():
    with gzip.open(DATA / "sd1-diffusers-kohya.json.gz") as f:
        kohya = json.load(f)["keys"]
    mine = diffusers_layout.architecture().keys
    as_kohya = {("te." + k[len("text_encoder."):] if k.startswith("text_encoder.") else k): s for k, s in mine.items()}
    assert set(kohya) == set(as_kohya) - {"te.text_model.embeddings.position_ids"}
    for key, spec in kohya.items():
        assert as_kohya[key].shape == tuple(spec["shape"]), key
        assert as_kohya[key].component == spec["component"], key
        assert key in mine or key in mine["text_encoder." + key[3:]].aliases


def test_layout_matches_diffusers_models():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    expected = {}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIGS / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIGS / "vae"))
        text = CLIPTextModel(CLIPTextConfig.from_json_file(CONFIGS / "text_encoder" / "config.json"))
    for prefix, model in (("unet.", unet), ("vae.", vae), ("text_encoder.", text)):
        expected.update({prefix + k: tuple(v.shape) for k, v in model.state_dict().items()})
    mine = {_strip_text_model(k): s.shape for k, s in diffusers_layout.architecture().keys.items()
            if not k.endswith("position_ids")}
    assert mine == expected


def test_every_ldm_key_but_ema_and_scheduler_has_a_diffusers_name():
    arch = layout.architecture()
    names = {k: diffusers_layout.diffusers_name(k) for k in arch.keys}
    assert {k for k, n in names.items() if n is None} == {
        k for k, s in arch.keys.items() if s.component in ("ema", "scheduler")}
    assert len(set(n for n in names.values() if n)) == 1131  # one-to-one
    assert names["model.diffusion_model.output_blocks.2.1.conv.weight"] == "unet.up_blocks.0.upsamplers.0.conv.weight"
    assert names["model.diffusion_model.output_blocks.5.2.conv.bias"] == "unet.up_blocks.1.upsamplers.0.conv.bias"
    assert (names["first_stage_model.decoder.up.3.block.0.conv1.weight"]
            == "vae.decoder.up_blocks.0.resnets.0.conv1.weight")
    assert (names["first_stage_model.encoder.mid.attn_1.proj_out.weight"]
            == "vae.encoder.mid_block.attentions.0.to_out.0.weight")


# ldm key -> diffusers key, including every kind of change: U-Net renames, a resnet inner name,
# the VAE attention (Linear in diffusers, 1x1 conv in ldm), the text encoder under kohya's te. prefix.
PAIRS = {
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": "unet.down_blocks.0.attentions.0.proj_in.weight",
    "model.diffusion_model.input_blocks.4.0.emb_layers.1.bias": "unet.down_blocks.1.resnets.0.time_emb_proj.bias",
    "model.diffusion_model.middle_block.2.out_layers.3.bias": "unet.mid_block.resnets.1.conv2.bias",
    "model.diffusion_model.out.2.bias": "unet.conv_out.bias",
    "first_stage_model.decoder.mid.attn_1.q.weight": "vae.decoder.mid_block.attentions.0.to_q.weight",
    "first_stage_model.decoder.up.0.block.2.norm1.bias": "vae.decoder.up_blocks.3.resnets.2.norm1.bias",
    "cond_stage_model.transformer.text_model.encoder.layers.5.mlp.fc2.bias":
        "te.text_model.encoder.layers.5.mlp.fc2.bias",
}


def test_a_diffusers_file_merges_with_an_ldm_file(tmp_path):
    arch = layout.architecture()
    gen = torch.Generator().manual_seed(0)
    ldm = {k: torch.randn(arch.keys[k].shape, generator=gen) for k in PAIRS}
    diff = {}
    for k, dk in PAIRS.items():
        t = torch.randn(arch.keys[k].shape, generator=gen)
        diff[dk] = t.reshape(t.shape[:2]) if dk.startswith("vae.") and ".to_q." in dk else t
    write_checkpoint(tmp_path / "ldm.safetensors", ldm)
    write_checkpoint(tmp_path / "diff.safetensors", diff)
    assert diff["vae.decoder.mid_block.attentions.0.to_q.weight"].shape == (512, 512)
    with using(mecha_methods.plugin, mecha_sd1.plugin):
        recipe = mecha_core.weighted_sum(mecha_core.model(str(tmp_path / "ldm.safetensors"), arch="sd1-ldm"),
                                         mecha_core.model(str(tmp_path / "diff.safetensors"), arch="sd1-diffusers"),
                                         alpha=0.25)
        out = mecha_core.merge(recipe, tmp_path / "out.safetensors")
    merged = load_file(out)
    assert set(merged) == set(PAIRS)
    for k, dk in PAIRS.items():
        expected = 0.75 * ldm[k] + 0.25 * diff[dk].reshape(arch.keys[k].shape)
        assert merged[k].shape == arch.keys[k].shape
        torch.testing.assert_close(merged[k], expected, rtol=1e-6, atol=1e-6)


def test_a_file_without_diffusers_keys_is_not_converted():
    with pytest.raises(ValueError):
        diffusers_layout.plan_to_ldm({"model.diffusion_model.out.2.bias": mecha_core.specs.TensorInfo((4,), "float32")})


def test_a_full_kohya_named_header_opens_as_sd1_ldm(tmp_path):
    from mecha_core.testing import open_model
    from mecha_core.kit import synthetic

    diff = diffusers_layout.architecture()
    table = synthetic.key_table(diff, dtype="float16")
    # kohya's te. prefix, as sd-scripts writes it
    table = {("te." + k[len("text_encoder."):] if k.startswith("text_encoder.") else k): v for k, v in table.items()}
    path = synthetic.write_header_only(tmp_path / "kohya.safetensors", table)
    with using(mecha_sd1.plugin) as host:
        source = open_model(path, host)
        try:
            ldm = layout.architecture()
            assert source.arch == "sd1-ldm"
            assert set(source.keys) == ldm.required_keys
            for key, info in source.keys.items():
                assert info.shape == ldm.keys[key].shape and info.dtype == "float16", key
        finally:
            source.close()


def test_a_unet_saved_alone_by_diffusers_is_detected_and_merges_into_an_ldm_checkpoint(tmp_path):
    # unet/diffusion_pytorch_model.safetensors: the U-Net's diffusers names without "unet."
    from mecha_core.testing import detect_architecture
    from mecha_core.kit import synthetic

    table = synthetic.key_table(diffusers_layout.architecture(), dtype="float16")
    bare = {k.removeprefix("unet."): v for k, v in table.items()
            if k.startswith("unet.")}
    header = synthetic.write_header_only(tmp_path / "header.safetensors", bare)
    with using(mecha_sd1.plugin) as host:
        assert detect_architecture(header, frozenset(bare), host).name == "sd1-diffusers-unet"
    arch = layout.architecture()
    unet_pairs = {k: v.removeprefix("unet.") for k, v in PAIRS.items() if v.startswith("unet.")}
    gen = torch.Generator().manual_seed(1)
    ldm = {k: torch.randn(arch.keys[k].shape, generator=gen) for k in PAIRS}
    unet = {dk: torch.randn(arch.keys[k].shape, generator=gen) for k, dk in unet_pairs.items()}
    write_checkpoint(tmp_path / "ldm.safetensors", ldm)
    write_checkpoint(tmp_path / "unet.safetensors", unet)
    with using(mecha_methods.plugin, mecha_sd1.plugin):
        recipe = mecha_core.weighted_sum(
            mecha_core.model(str(tmp_path / "ldm.safetensors"), arch="sd1-ldm"),
            mecha_core.model(str(tmp_path / "unet.safetensors"), arch="sd1-diffusers-unet"),
            alpha=0.25)
        merged = load_file(mecha_core.merge(recipe, tmp_path / "out.safetensors", allow_missing=True))
    assert set(merged) == set(PAIRS)
    for k in PAIRS:  # the U-Net keys mixed, the others (text encoder, VAE) kept from the checkpoint
        expected = 0.75 * ldm[k] + 0.25 * unet[unet_pairs[k]] if k in unet_pairs else ldm[k]
        torch.testing.assert_close(merged[k], expected, rtol=1e-6, atol=1e-6)
