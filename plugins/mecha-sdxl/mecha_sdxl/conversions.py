"""SDXL checkpoints in kohya or diffusers naming, and their conversion to ``sdxl-sgm``.

Two layouts are detected and converted (for weights and deltas alike), so a recipe may mix them
with sgm files and block-/class-wise values apply to them:

- ``sdxl-kohya`` (kohya sd-scripts' internal naming, from the shared ``sdxl-kohya.json``): the
  U-Net keeps its sgm names under ``unet.``, the VAE stays ``first_stage_model.``, the text
  encoders are Hugging Face CLIP models under ``te1.`` and ``te2.``.
- ``sdxl-diffusers``: the diffusers models under ``unet.`` (``UNet2DConditionModel`` names),
  ``vae.`` (``AutoencoderKL``), ``text_encoder.`` (``CLIPTextModel``) and ``text_encoder_2.``
  (``CLIPTextModelWithProjection``). U-Net and VAE names map by the same rules as for SD1
  (:mod:`mecha_core.kit.diffusers`; SDXL has 3 U-Net levels and the same VAE).
- ``sdxl-diffusers-unet``: a diffusers U-Net saved alone (:mod:`mecha_core.kit.unet_only`).

What changes besides names: sgm stores CLIP-G in OpenCLIP form, where ``attn.in_proj_weight`` is
q, k and v stacked on dim 0 (HF keeps ``q_proj``, ``k_proj``, ``v_proj`` apart) and
``text_projection`` is used as ``x @ P`` (the transpose of HF's Linear ``text_projection.weight``);
the VAE mid-block attention projections are Linear in diffusers and 1x1 convs in sgm.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping

from mecha_core.lazy import torch
from mecha_core.kit import (is_vae_linear, no_gc, packed_architecture, text_encoder_aliases, unet_name,
                            unet_only_architecture, unet_only_plan, vae_name)
from mecha_core.specs import Architecture, ConvertedKey, Converter, KeySpec, TensorInfo

from . import layout

KOHYA = "sdxl-kohya"
DIFFUSERS = "sdxl-diffusers"

_CLIP_G = "conditioner.embedders.1.model."
_OPENCLIP_LAYER = (("attn.out_proj.", "self_attn.out_proj."), ("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."),
                   ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2."))


def _clip_g_sources(rest: str, te: str) -> tuple[tuple[str, ...], str] | None:
    """HF source keys of an OpenCLIP (sgm) CLIP-G key and how to combine them:
    ``rename``, ``cat`` (stack on dim 0) or ``transpose``. ``None``: HF has no such tensor."""
    fixed = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
             "positional_embedding": "text_model.embeddings.position_embedding.weight",
             "ln_final.weight": "text_model.final_layer_norm.weight",
             "ln_final.bias": "text_model.final_layer_norm.bias"}
    if rest in fixed:
        return (te + fixed[rest],), "rename"
    if rest == "text_projection":
        return (te + "text_projection.weight",), "transpose"
    if not rest.startswith("transformer.resblocks."):
        return None  # logit_scale: HF text models do not store it
    layer, tail = rest[len("transformer.resblocks."):].split(".", 1)
    base = f"{te}text_model.encoder.layers.{layer}."
    if tail in ("attn.in_proj_weight", "attn.in_proj_bias"):
        param = tail.rsplit("_", 1)[1]
        return tuple(f"{base}self_attn.{p}_proj.{param}" for p in "qkv"), "cat"
    for old, new in _OPENCLIP_LAYER:
        if tail.startswith(old):
            return (base + new + tail[len(old):],), "rename"
    raise KeyError(rest)


def _sources(sgm_key: str, naming: str) -> tuple[tuple[str, ...], str] | None:
    kohya = naming == KOHYA
    if sgm_key.startswith("model.diffusion_model."):
        rest = sgm_key[len("model.diffusion_model."):]
        return ("unet." + (rest if kohya else unet_name(rest)),), "rename"
    if sgm_key.startswith("first_stage_model."):
        rest = sgm_key[len("first_stage_model."):]
        return ((sgm_key if kohya else "vae." + vae_name(rest)),), "rename"
    if sgm_key.startswith("conditioner.embedders.0.transformer."):
        rest = sgm_key[len("conditioner.embedders.0.transformer."):]
        return (("te1." if kohya else "text_encoder.") + rest,), "rename"
    if sgm_key.startswith(_CLIP_G):
        return _clip_g_sources(sgm_key[len(_CLIP_G):], "te2." if kohya else "text_encoder_2.")
    return None  # scheduler buffers and prediction flags have no counterpart


@functools.lru_cache(maxsize=None)
def table(naming: str) -> dict[str, tuple[tuple[str, ...], str, KeySpec]]:
    """sgm key -> (source keys in ``naming``, how to combine them, the sgm key's spec)."""
    out = {}
    for key, spec in layout.architecture().keys.items():
        found = _sources(key, naming)
        if found is not None:
            out[key] = (*found, spec)
    return out


@functools.lru_cache(maxsize=None)
def _source_keys(naming: str) -> frozenset[str]:
    return frozenset(s for sources, _, _ in table(naming).values() for s in sources)


@functools.lru_cache(maxsize=None)
def kohya_architecture() -> Architecture:
    return packed_architecture("mecha_sdxl", "sdxl-kohya.json.gz", name=KOHYA,
                               description="SDXL in kohya sd-scripts naming (unet./te1./te2.); converted to sdxl-sgm",
                               component_aliases=layout.COMPONENT_ALIASES)


def _diffusers_name(kohya_key: str) -> str:
    for old, new, convert in (("unet.", "unet.", unet_name), ("first_stage_model.", "vae.", vae_name),
                              ("te1.", "text_encoder.", str), ("te2.", "text_encoder_2.", str)):
        if kohya_key.startswith(old):
            return new + convert(kohya_key[len(old):])
    raise KeyError(kohya_key)


@functools.lru_cache(maxsize=None)
def diffusers_architecture() -> Architecture:
    keys = {}
    with no_gc():
        for key, spec in kohya_architecture().keys.items():
            name = _diffusers_name(key)
            linear = name.startswith("vae.") and is_vae_linear(name[len("vae."):])
            aliases = (text_encoder_aliases(name, "text_encoder.", None)
                       + text_encoder_aliases(name, "text_encoder_2.", None))
            keys[name] = KeySpec(spec.shape[:2] if linear else spec.shape, spec.dtype, spec.component, spec.optional,
                                 aliases)
    return Architecture(name=DIFFUSERS, keys=keys,
                        description="SDXL in diffusers naming (unet./vae./text_encoder./text_encoder_2.); "
                                    "converted to sdxl-sgm",
                        component_aliases=layout.COMPONENT_ALIASES)


def _compute(sources: tuple[str, ...], how: str, shape: tuple[int, ...]) -> Callable[[Mapping[str, Any]], Any]:
    if how == "cat":
        return lambda t: torch.cat([t[s] for s in sources], dim=0)
    if how == "transpose":
        return lambda t: t[sources[0]].t().contiguous()
    return lambda t: t[sources[0]].reshape(shape)


def planner(naming: str) -> Callable[[Mapping[str, TensorInfo]], dict[str, ConvertedKey]]:
    def plan(header: Mapping[str, TensorInfo]) -> dict[str, ConvertedKey]:
        """sgm keys computed from a ``naming`` header. Header keys that no sgm key reads pass
        through under their own name; a header with none of the layout's keys is not this layout."""
        out: dict[str, ConvertedKey] = {}
        used: set[str] = set()
        for key, (sources, how, spec) in table(naming).items():
            if not all(s in header for s in sources):
                continue  # absent (or partly absent q/k/v): the plan reports missing keys
            used.update(sources)
            first = header[sources[0]]
            if how == "cat":
                shape = (sum(header[s].shape[0] for s in sources), *first.shape[1:])
            elif how == "transpose":
                shape = tuple(reversed(first.shape))
            else:
                shape = spec.shape if math.prod(first.shape) == math.prod(spec.shape) else first.shape
            out[key] = ConvertedKey(TensorInfo(shape, first.dtype), sources, _compute(sources, how, shape))
        if not used and not any(k in _source_keys(naming) for k in header):
            raise ValueError(f"no {naming} key")
        for key, info in header.items():
            if key not in used:
                out[key] = ConvertedKey(info, (key,), _compute((key,), "rename", info.shape))
        return out
    return plan


DIFFUSERS_UNET = "sdxl-diffusers-unet"


@functools.lru_cache(maxsize=None)
def diffusers_unet_architecture() -> Architecture:
    return unet_only_architecture(diffusers_architecture(), DIFFUSERS_UNET, "an SDXL U-Net saved alone by "
                                  "diffusers (unet/diffusion_pytorch_model.safetensors); converted to sdxl-sgm")


def converters() -> list[Converter]:
    edges = [(naming, planner(naming), f"{naming} naming") for naming in (KOHYA, DIFFUSERS)]
    edges.append((DIFFUSERS_UNET, unet_only_plan(planner(DIFFUSERS)), "SDXL diffusers U-Net alone"))
    return [Converter(f"{source}-to-sgm-{t}", source, t, layout.NAME, t, plan, description=f"{what} -> sdxl-sgm ({t})")
            for source, plan, what in edges for t in ("base", "delta")]
