"""The flux_family architecture family: small Flux-shaped files (BFL and ComfyUI naming) are
detected without arch=, merged like plain torch, and take block-wise values by their own blocks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import mecha_core
from mecha_core.testing import write_checkpoint
from mecha_flux import family, layout

SHAPE = layout.FluxShape(double_blocks=2, single_blocks=3, hidden=32, mlp_hidden=64, head_dim=16, in_channels=8,
                         context_dim=40, pooled_dim=24, guidance=True)
NAME = "flux-d2s3-h32-m64-hd16-c8-t40-p24"


def _tensors(shape: layout.FluxShape, seed: int, prefix: str = "") -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {prefix + key: torch.randn(size, generator=gen, dtype=torch.float32)
            for key, size in layout.transformer_keys(shape).items()}


def _bfl(merged: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix(layout.PREFIX): v for k, v in merged.items()}


def _inspect(path) -> dict:
    run = subprocess.run([sys.executable, "-m", "mecha_core", "inspect", str(path), "--json"], capture_output=True,
                         text=True, check=True)
    return json.loads(run.stdout)


@pytest.mark.parametrize("prefix", ["", layout.PREFIX], ids=["bfl", "comfyui"])
def test_small_flux_is_a_family_member_and_merges_like_torch(tmp_path, prefix):
    ta, tb = _tensors(SHAPE, 1, prefix), _tensors(SHAPE, 2, prefix)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_checkpoint(a, ta)
    write_checkpoint(b, tb)
    found = _inspect(a)
    assert (found["architecture"], found["family"]) == (NAME, "flux_family")
    assert found["missing"] == [] and found["unexpected"] == []
    out = tmp_path / "out.safetensors"
    mecha_core.merge(mecha_core.weighted_sum(mecha_core.model(str(a)), mecha_core.model(str(b)), alpha=0.25),
                     out, threads=2)
    merged = _bfl(load_file(out))
    ta, tb = _bfl(ta), _bfl(tb)
    assert set(merged) == set(ta)
    for key in ta:
        torch.testing.assert_close(merged[key], ta[key] * 0.75 + tb[key] * 0.25, rtol=1e-6, atol=1e-6, msg=key)


def test_block_map_over_the_family_uses_the_members_blocks(tmp_path):
    ta, tb = _tensors(SHAPE, 3), _tensors(SHAPE, 4)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_checkpoint(a, ta)
    write_checkpoint(b, tb)
    alpha = mecha_core.blocks("flux_family", default=0.5, IN=0.0, double_blocks_01=1.0, single_blocks_02=0.1, OUT=0.9)
    out = tmp_path / "out.safetensors"
    mecha_core.merge(mecha_core.weighted_sum(mecha_core.model(str(a)), mecha_core.model(str(b)), alpha=alpha),
                     out, threads=2)
    merged = _bfl(load_file(out))
    # hand-computed: each key takes its block's alpha
    for key, value in {"img_in.weight": 0.0, "guidance_in.out_layer.bias": 0.0, "txt_in.weight": 0.0,
                       "double_blocks.0.img_attn.qkv.weight": 0.5, "double_blocks.1.txt_mlp.2.weight": 1.0,
                       "single_blocks.0.linear1.weight": 0.5, "single_blocks.2.linear2.bias": 0.1,
                       "single_blocks.2.norm.key_norm.scale": 0.1, "final_layer.linear.weight": 0.9}.items():
        torch.testing.assert_close(merged[key], ta[key] * (1 - value) + tb[key] * value, rtol=1e-6, atol=1e-6,
                                   msg=key)
    torch.testing.assert_close(merged["double_blocks.1.img_mod.lin.bias"], tb["double_blocks.1.img_mod.lin.bias"])
    torch.testing.assert_close(merged["img_in.bias"], ta["img_in.bias"])


def test_member_names_and_non_members():
    assert family.member_name(layout.FluxShape(double_blocks=8)) == "flux-d8s38"
    assert family.member_name(layout.FluxShape(double_blocks=8, guidance=False)) == "flux-d8s38-schnell"
    arch = family.detect({k: mecha_core.specs.TensorInfo(s, "F32") for k, s in
                          layout.transformer_keys(layout.FluxShape(double_blocks=1, single_blocks=2, hidden=16,
                                                                   mlp_hidden=32, head_dim=8, guidance=False)).items()},
                         None)
    assert arch is not None and arch.name == "flux-d1s2-h16-m32-hd8-schnell"
    assert "double_blocks_00" in arch.blocks and "single_blocks_01" in arch.blocks
    assert "double_blocks_01" not in arch.blocks
    assert "guidance_in" not in " ".join(arch.keys)
    keys = layout.transformer_keys(SHAPE)
    header = {k: mecha_core.specs.TensorInfo(s, "F32") for k, s in keys.items()}
    del header["single_blocks.1.linear2.weight"]
    assert family.detect(header, None) is None
    assert family.detect({"model.layers.0.self_attn.q_proj.weight": mecha_core.specs.TensorInfo((4, 4), "F32")},
                         None) is None
