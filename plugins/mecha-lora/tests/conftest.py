"""Shared pieces for the mecha-lora tests: a plugin host, module picks with real shapes, files.

The host holds mecha-methods, mecha-lora and a stand-in for the sd1-ldm / sdxl-sgm architecture
plugins (another package): just the names and the key shapes the LoRA tables target, so these
tests depend on nothing but this plugin and the core.
"""

from __future__ import annotations

import types

import mecha_methods.plugin
import pytest
import torch
from safetensors.torch import load_file

import mecha_core
import mecha_lora.plugin
from mecha_core.testing import plugin_from_functions
from mecha_core.specs import Architecture, KeySpec
from mecha_core.testing import using, write_checkpoint
from mecha_lora.tables import table


def _architectures():
    archs = []
    for name in ("sd1-ldm", "sdxl-sgm"):
        keys = {m.key: KeySpec(m.key_shape, "float32", "diffuser") for m in table(name).modules}
        archs.append(Architecture(name, keys))
    return archs


ARCH_STUB = plugin_from_functions("arch_stub", mecha_architectures=_architectures)


@pytest.fixture
def host():
    with using(mecha_methods.plugin, mecha_lora.plugin, ARCH_STUB) as h:
        yield h


def module(arch: str, name: str):
    """A module of the table by its kohya name (with or without the ``lora_`` prefix)."""
    return table(arch).by_kohya[name.removeprefix("lora_")]


def make_base(tmp_path, modules, extra=None, dtype=torch.float32, seed=0, name="base.safetensors"):
    """A checkpoint holding the modules' keys (real shapes) plus a few keys no LoRA touches."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for m in modules:
        tensors[m.key] = torch.randn(m.key_shape, generator=gen).to(dtype)
    untouched = {
        "model.diffusion_model.out.2.bias": (4,),
        "model.diffusion_model.time_embed.0.weight": (1280, 320),
        "first_stage_model.decoder.conv_out.weight": (3, 128, 3, 3),
    }
    for key, shape in {**untouched, **(extra or {})}.items():
        tensors.setdefault(key, torch.randn(shape, generator=gen).to(dtype))
    path = tmp_path / name
    write_checkpoint(path, tensors)
    return path, tensors


def merge(recipe, tmp_path, name="out.safetensors", **kwargs):
    path = tmp_path / name
    mecha_core.merge(recipe, path, threads=2, **kwargs)
    return load_file(str(path))


@pytest.fixture
def kit():
    return types.SimpleNamespace(module=module, make_base=make_base, merge=merge, write=write_checkpoint)


SHARED = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"  # same key and shape in SD1 and SDXL


def rnd(gen, *shape, scale=0.05):
    return torch.randn(*shape, generator=gen) * scale


def module_lora_pair(gen, mod, rank=4):
    """A kohya down/up pair of rank ``rank`` for a module of the table."""
    return {f"{mod.kohya_name}.lora_down.weight": rnd(gen, rank, mod.shape[1]),
            f"{mod.kohya_name}.lora_up.weight": rnd(gen, mod.shape[0], rank)}
