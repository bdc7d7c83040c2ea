"""SD1 checkpoints in diffusers naming, and their conversion to ``sd1-ldm``.

A single-file checkpoint in diffusers naming holds the three diffusers models under the prefixes
``unet.`` (``UNet2DConditionModel``), ``text_encoder.`` (``CLIPTextModel``; kohya sd-scripts
writes ``te.``, accepted as an alias) and ``vae.`` (``AutoencoderKL``). The architecture
``sd1-diffusers`` describes that layout, so such files are detected; the converter registered by
this plugin renames every key to its ``sd1-ldm`` name, so recipes may mix both layouts and
block-/class-wise values apply to diffusers files as well.

U-Net and VAE names map by the rules of :mod:`mecha_core.kit.diffusers`. The only values that
change besides names are the VAE mid-block attention projections: Linear ``[out, in]`` in
diffusers, 1x1 conv ``[out, in, 1, 1]`` in ldm (a reshape, same numbers). A U-Net saved alone by
diffusers is ``sd1-diffusers-unet`` (:mod:`mecha_core.kit.unet_only`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping

from mecha_core.kit import (is_vae_linear, text_encoder_aliases, unet_name, unet_only_architecture, unet_only_plan,
                            vae_name)
from mecha_core.specs import Architecture, ConvertedKey, Converter, KeySpec, TensorInfo

from . import layout

NAME = "sd1-diffusers"


def diffusers_name(ldm_key: str) -> str | None:
    """The ``sd1-diffusers`` name of an ``sd1-ldm`` key; ``None`` for keys diffusers does not store
    (EMA copies, scheduler buffers)."""
    for prefix, convert, new_prefix in (("model.diffusion_model.", unet_name, "unet."),
                                        ("first_stage_model.", vae_name, "vae."),
                                        ("cond_stage_model.transformer.", str, "text_encoder.")):
        if ldm_key.startswith(prefix):
            return new_prefix + convert(ldm_key[len(prefix):])
    return None


@functools.lru_cache(maxsize=None)
def _table() -> dict[str, tuple[str, KeySpec]]:
    """diffusers key -> (ldm key, the ldm key's spec)."""
    out: dict[str, tuple[str, KeySpec]] = {}
    for key, spec in layout.architecture().keys.items():
        name = diffusers_name(key)
        if name is not None:
            out[name] = (key, spec)
    return out


@functools.lru_cache(maxsize=None)
def architecture() -> Architecture:
    keys: dict[str, KeySpec] = {}
    for name, (_, spec) in _table().items():
        linear = name.startswith("vae.") and is_vae_linear(name[len("vae."):])
        shape = spec.shape[:2] if linear else spec.shape
        aliases = text_encoder_aliases(name, "text_encoder.", "te.")
        keys[name] = KeySpec(shape, spec.dtype, spec.component, spec.optional, aliases)
    return Architecture(
        name=NAME, keys=keys,
        description="Stable Diffusion 1.x in diffusers naming (unet./text_encoder./vae.); converted to sd1-ldm",
        aliases=("sd1-kohya",),
        component_aliases=layout.COMPONENT_ALIASES,
    )


def _take(source: str) -> Callable[[Mapping[str, Any]], Any]:
    return lambda tensors: tensors[source]


def _take_reshaped(source: str, shape: tuple[int, ...]) -> Callable[[Mapping[str, Any]], Any]:
    return lambda tensors: tensors[source].reshape(shape)


def plan_to_ldm(header: Mapping[str, TensorInfo]) -> dict[str, ConvertedKey]:
    """Rename a diffusers-layout header to ldm names. Keys this layout does not know pass through
    unchanged; a header with no diffusers key is not this layout (``ValueError``)."""
    table = _table()
    out: dict[str, ConvertedKey] = {}
    converted = 0
    for key, info in header.items():
        if key not in table:
            out[key] = ConvertedKey(info, (key,), _take(key))
            continue
        ldm_key, spec = table[key]
        converted += 1
        if info.shape != spec.shape and info.numel == math.prod(spec.shape):
            out[ldm_key] = ConvertedKey(TensorInfo(spec.shape, info.dtype), (key,), _take_reshaped(key, spec.shape))
        else:  # same shape, or a wrong one that the plan reports against the other inputs
            out[ldm_key] = ConvertedKey(info, (key,), _take(key))
    if not converted:
        raise ValueError("no diffusers-layout SD1 key")
    return out


UNET_NAME = "sd1-diffusers-unet"


@functools.lru_cache(maxsize=None)
def unet_architecture() -> Architecture:
    return unet_only_architecture(architecture(), UNET_NAME, "an SD1 U-Net saved alone by diffusers "
                                  "(unet/diffusion_pytorch_model.safetensors); converted to sd1-ldm")


def converters() -> list[Converter]:
    # One edge per model type the engine keeps in a canonical layout: weights and deltas.
    return [Converter(f"{source}-to-ldm-{t}", source, t, layout.NAME, t, planner,
                      description=f"{what} -> sd1-ldm ({t})")
            for source, planner, what in ((NAME, plan_to_ldm, "SD1 diffusers naming"),
                                          (UNET_NAME, unet_only_plan(plan_to_ldm), "SD1 diffusers U-Net alone"))
            for t in ("base", "delta")]
