"""Flux layouts: the computed dev/schnell tables match the shared ComfyUI layout and diffusers'
own model; BFL, ComfyUI and diffusers files are detected; blocks and classes."""

from __future__ import annotations

import gzip
import json
import os
import re

import pytest
import torch

from mecha_core.kit import synthetic
from mecha_core.testing import detect_architecture, host_with
import mecha_flux.plugin
from mecha_flux import diffusers_layout, layout

#: the keys of the shared ComfyUI Flux-dev layout (flux-dev.json, from sd-mecha's catalogue)
DATA = os.path.join(os.path.dirname(__file__), "data", "flux-dev.json.gz")


def _shared_layout() -> dict:
    with gzip.open(DATA, "rt") as f:
        return json.load(f)


def test_dev_matches_the_comfyui_layout():
    shared = _shared_layout()
    arch = layout.dev()
    assert {k: s.shape for k, s in arch.keys.items()} == {k: tuple(v["shape"]) for k, v in shared.items()}
    for key, spec in shared.items():
        assert arch.keys[key].component == spec["component"], key
        assert arch.keys[key].aliases == tuple(spec.get("aliases", ())), key
    # the transformer is required; text encoders and VAE are optional (BFL's file has neither)
    assert {k for k, s in arch.keys.items() if not s.optional} == {
        k for k, s in shared.items() if s["component"] == "diffuser"}


def test_schnell_is_dev_without_guidance():
    dev, schnell = layout.dev(), layout.schnell()
    assert set(dev.keys) - set(schnell.keys) == {
        f"model.diffusion_model.guidance_in.{p}.{w}" for p in ("in_layer", "out_layer") for w in ("weight", "bias")}
    assert set(schnell.keys) < set(dev.keys)


@pytest.mark.parametrize("guidance", [True, False])
def test_diffusers_layout_matches_diffusers_model(guidance):
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(guidance_embeds=guidance)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    arch = diffusers_layout.diffusers_architecture(layout.dev() if guidance else layout.schnell(), "x")
    assert {k: s.shape for k, s in arch.keys.items()} == expected


def _table(arch, rename=lambda k: k, only=None):
    return {rename(k): (s.shape, "bfloat16") for k, s in arch.keys.items() if only is None or s.component == only}


@pytest.fixture(scope="module")
def host():
    return host_with(mecha_flux.plugin)


@pytest.mark.parametrize("variant", ["dev", "schnell"])
@pytest.mark.parametrize("naming", ["bfl", "comfyui", "diffusers"])
def test_detection(tmp_path, host, variant, naming):
    arch = layout.dev() if variant == "dev" else layout.schnell()
    if naming == "bfl":
        table = _table(arch, lambda k: k.removeprefix(layout.PREFIX), only="diffuser")
        wanted = arch.name
    elif naming == "comfyui":
        table = _table(arch)
        wanted = arch.name
    else:
        table = _table(diffusers_layout.diffusers_architecture(arch, "x"))
        wanted = arch.name + "-diffusers"
    path = tmp_path / "m.safetensors"
    synthetic.write_header_only(path, table)
    found = detect_architecture(str(path), frozenset(table), host)
    assert found is not None and found.name == wanted


def test_blocks_and_classes():
    arch = layout.dev()
    assert arch.blocks[:3] == ("CLIP_L", "T5XXL", "IN") and arch.blocks[-2:] == ("OUT", "VAE")
    assert [b for b in arch.blocks if b.startswith("double")] == [f"double_blocks_{i:02d}" for i in range(19)]
    assert [b for b in arch.blocks if b.startswith("single")] == [f"single_blocks_{i:02d}" for i in range(38)]
    for key, spec in arch.keys.items():
        m = re.match(r"model\.diffusion_model\.(double|single)_blocks\.(\d+)\.", key)
        if m:
            assert spec.blocks == (f"{m.group(1)}_blocks_{int(m.group(2)):02d}",), key
        elif key.startswith("model.diffusion_model.final_layer."):
            assert spec.blocks == ("OUT",)
        elif key.startswith("model.diffusion_model."):
            assert spec.blocks == ("IN",), key
        elif key.startswith("vae."):
            assert spec.blocks == ("VAE",)
        else:
            assert spec.blocks == (key.split(".")[1].upper(),), key
    # 2 streams x 6 layers (mod, qkv, query/key norm, proj, 2 mlp), 2 tensors each: 24 keys per double block
    assert sum("double_blocks_18" in s.blocks for s in arch.keys.values()) == 24
    assert sum("single_blocks_37" in s.blocks for s in arch.keys.values()) == 8
    klass = {k: s.klass for k, s in arch.keys.items()}
    assert klass["model.diffusion_model.double_blocks.3.img_attn.qkv.weight"] == "img_attn_qkv"
    assert klass["model.diffusion_model.double_blocks.3.txt_attn.norm.key_norm.scale"] == "txt_attn_norm_key_norm"
    assert klass["model.diffusion_model.single_blocks.30.linear1.bias"] == "linear1"
    assert klass["model.diffusion_model.time_in.in_layer.weight"] == "time_in_in_layer"
    assert klass["text_encoders.clip_l.transformer.text_model.encoder.layers.3.self_attn.q_proj.weight"] == \
        "self_attn_q_proj"
    assert klass["text_encoders.t5xxl.transformer.encoder.block.2.layer.0.SelfAttention.q.weight"] == "SelfAttention_q"
    assert klass["vae.decoder.up.1.block.0.conv1.weight"] == "conv1"


def test_layout_function_follows_the_sizes():
    small = layout.FluxShape(double_blocks=2, single_blocks=3, hidden=32, mlp_hidden=128, head_dim=16,
                             in_channels=8, context_dim=40, pooled_dim=24, guidance=False)
    keys = layout.transformer_keys(small)
    assert sum(k.startswith("double_blocks.") for k in keys) == 2 * 24
    assert sum(k.startswith("single_blocks.") for k in keys) == 3 * 8
    assert keys["single_blocks.2.linear1.weight"] == (3 * 32 + 128, 32)
    assert keys["single_blocks.2.linear2.weight"] == (32, 32 + 128)
    assert keys["txt_in.weight"] == (32, 40) and keys["vector_in.in_layer.weight"] == (32, 24)
    assert keys["final_layer.linear.weight"] == (8, 32)
    assert not any(k.startswith("guidance_in.") for k in keys)
