"""The sdxl-sgm architecture (keys, blocks against the MBW rules and block map, classes, names for
old recipes) and header-only detection of the sgm, kohya and diffusers layouts (that the other
builtin architectures do not claim these files: tests/test_architectures_cli.py)."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

import mecha_sdxl.plugin
from mecha_core.testing import detect_architecture, open_model
from mecha_core.kit import synthetic
from mecha_core.testing import using
from mecha_sdxl import layout

DATA = Path(__file__).parent / "data"


def mbw_block(key: str) -> str:
    """The SDXL MBW rules, written out independently of the plugin's data."""
    if key.startswith("first_stage_model."):
        return "VAE"
    if not key.startswith("model.diffusion_model.") or ".time_embed" in key or ".label_emb" in key:
        return "BASE"
    if ".out." in key:
        return "OUT08"
    for pattern, name in ((r"\.input_blocks\.(\d+)\.", "IN"), (r"\.output_blocks\.(\d+)\.", "OUT")):
        m = re.search(pattern, key)
        if m:
            return f"{name}{int(m.group(1)):02d}"
    return "M00" if ".middle_block." in key else "OUT08"


@pytest.fixture(scope="module")
def arch():
    return layout.architecture()


def test_counts_and_components(arch):
    assert len(arch.keys) == 2531 and len(arch.required_keys) == 2480
    assert arch.components == ("clip_l", "clip_g", "vae", "diffuser", "scheduler")
    g = "conditioner.embedders.1.model."
    assert arch.keys[g + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3840, 1280)
    assert arch.keys[g + "text_projection"].optional


def test_blocks_follow_the_mbw_rules_and_the_block_map(arch):
    with gzip.open(DATA / "sdxl-sgm-blocks.json.gz") as f:
        block_map = json.load(f)
    assert arch.blocks == tuple(block_map["blocks"]) and len(arch.blocks) == 21
    for key, spec in arch.keys.items():
        assert spec.blocks == (mbw_block(key),) == (block_map["key_to_block"][key],), key


@pytest.mark.parametrize("key, klass", [
    ("conditioner.embedders.0.transformer.text_model.encoder.layers.4.mlp.fc1.weight", "mlp_fc1"),
    ("conditioner.embedders.0.transformer.text_model.final_layer_norm.bias", "final_layer_norm"),
    ("conditioner.embedders.1.model.transformer.resblocks.30.attn.in_proj_weight", "attn_in_proj"),
    ("conditioner.embedders.1.model.transformer.resblocks.30.attn.in_proj_bias", "attn_in_proj"),
    ("conditioner.embedders.1.model.transformer.resblocks.2.ln_1.weight", "ln_1"),
    ("conditioner.embedders.1.model.text_projection", "text_projection"),
    ("model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn1.to_k.weight", "attn1_to_k"),
    ("model.diffusion_model.label_emb.0.0.weight", "label_emb_0_0"),
    ("model.diffusion_model.output_blocks.2.2.conv.weight", "conv"),
    ("first_stage_model.decoder.mid.attn_1.proj_out.bias", "attn_1_proj_out"),
    ("v_pred", None),
    ("betas", None),
])
def test_classes_name_the_layer_type(arch, key, klass):
    assert arch.keys[key].klass == klass


def test_classes_are_listed_and_count_layers(arch):
    assert set(arch.classes) == {s.klass for s in arch.keys.values() if s.klass}
    # SDXL has 70 transformer blocks (2x2 + 2x10 down, 10 mid, 3x2 + 3x10 up), one attn1.to_k each
    assert sum(s.klass == "attn1_to_k" for s in arch.keys.values()) == 70


def test_names_for_old_recipes():
    with using(mecha_sdxl.plugin) as host:
        arch = host.architecture("sdxl")
    assert arch.name == "sdxl-sgm"
    assert {arch.component_aliases[c] for c in ("txt", "txt2", "unet")} == {"clip_l", "clip_g", "diffuser"}


def _required_table(arch, dtype="float16"):
    return synthetic.key_table(arch, dtype=dtype)


@pytest.mark.parametrize("name", ["sdxl-sgm", "sdxl-kohya", "sdxl-diffusers"])
def test_each_layout_is_detected_and_opened_as_sgm(tmp_path, name):
    with using(mecha_sdxl.plugin) as host:
        arch = host.architecture(name)
        path = synthetic.write_header_only(tmp_path / f"{name}.safetensors", _required_table(arch))
        keys = frozenset(synthetic.key_table(arch))
        assert detect_architecture(path, keys, host).name == name
        source = open_model(path, host)
        try:
            assert source.arch == "sdxl-sgm"
            sgm = layout.architecture()
            assert sgm.required_keys <= set(source.keys)
            assert not set(source.keys) - set(sgm.keys)  # every key got its sgm name
            g = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
            assert source.keys[g].shape == (3840, 1280)
            assert source.keys["first_stage_model.encoder.mid.attn_1.k.weight"].shape == (512, 512, 1, 1)
        finally:
            source.close()


def test_a_unet_saved_alone_by_diffusers_opens_as_sdxl_sgm(tmp_path):
    # unet/diffusion_pytorch_model.safetensors: the diffusers names without "unet."
    from mecha_sdxl import conversions

    bare = {k.removeprefix("unet."): v for k, v in synthetic.key_table(conversions.diffusers_architecture(),
                                                                     dtype="float16").items()
            if k.startswith("unet.")}
    path = synthetic.write_header_only(tmp_path / "unet.safetensors", bare)
    with using(mecha_sdxl.plugin) as host:
        assert detect_architecture(path, frozenset(bare), host).name == "sdxl-diffusers-unet"
        source = open_model(path, host)
        try:
            sgm = layout.architecture()
            unet_keys = {k for k in sgm.required_keys if k.startswith("model.diffusion_model.")}
            assert source.arch == "sdxl-sgm" and set(source.keys) == unet_keys
            for key, info in source.keys.items():
                assert info.shape == sgm.keys[key].shape and info.dtype == "float16", key
        finally:
            source.close()
