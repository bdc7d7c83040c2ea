"""Flux.1 key layouts, computed from a few sizes: ``flux-dev`` and ``flux-schnell``.

The canonical layout is ComfyUI's all-in-one file: the transformer under
``model.diffusion_model.`` (Black Forest Labs' module names), ``text_encoders.clip_l.`` and
``text_encoders.t5xxl.`` (Hugging Face naming) and ``vae.`` (ldm naming, 16 latent channels).
Black Forest Labs' own file (``flux1-dev.safetensors``) holds the transformer alone without the
prefix: those names are aliases of the canonical keys, so such files are detected and renamed;
the text encoders and VAE are optional (most released files have neither).

The transformer's keys are a function of :class:`FluxShape` (:func:`transformer_keys`), so a
Flux-shaped model with other block counts or widths (a pruned "Flux Lite", a small test model)
has a layout too: :func:`flux_architecture` builds it. The text encoders and the VAE come from
``data/flux-encoders-vae.json.gz`` (packed from the shared ``flux-dev.json``).

Blocks: ``CLIP_L``, ``T5XXL``, ``IN`` (``img_in``, ``txt_in``, ``time_in``, ``vector_in``,
``guidance_in``), ``double_blocks_00``... (``double_blocks.N``), ``single_blocks_00``...
(``single_blocks.N``), ``OUT`` (``final_layer``) and ``VAE``.

Classes: the key without ``.weight``/``.bias``/``.scale`` and without the prefix of its repeated
unit, dots as ``_`` (the rule of ``sd1-ldm`` and ``sd3-comfyui``): ``img_attn_qkv``,
``txt_mlp_0``, ``img_attn_norm_query_norm``, ``linear1``, ``modulation_lin``, ``time_in_in_layer``,
``final_layer_linear``; CLIP ``self_attn_q_proj``; T5 ``SelfAttention_q``; VAE ``conv1``.
"""

from __future__ import annotations

import functools
import re

import attrs
from mecha_core.kit import load_packed, no_gc, packed_keys
from mecha_core.specs import Architecture, KeySpec

PREFIX = "model.diffusion_model."
TEXT_ENCODERS = ("clip_l", "t5xxl")
EXTRA_COMPONENTS = (*TEXT_ENCODERS, "vae")
COMPONENT_ALIASES = {"unet": "diffuser", "transformer": "diffuser", "txt": "clip_l", "t5": "t5xxl"}


@attrs.frozen
class FluxShape:
    """The sizes a Flux transformer's key table follows from (defaults: Flux.1 dev)."""

    double_blocks: int = 19
    """Number of ``double_blocks.N`` (separate image and text streams)."""
    single_blocks: int = 38
    """Number of ``single_blocks.N`` (one joint stream)."""
    hidden: int = 3072
    """Width of the streams (heads x head size)."""
    mlp_hidden: int = 12288
    """Width of the MLPs (``mlp_ratio`` x hidden)."""
    head_dim: int = 128
    """Size of one attention head (the q/k RMSNorm scales have this many entries)."""
    in_channels: int = 64
    """Packed latent channels in and out (2x2 patches of 16 channels)."""
    context_dim: int = 4096
    """Width of the text tokens (T5-XXL)."""
    pooled_dim: int = 768
    """Width of the pooled text vector (CLIP-L)."""
    guidance: bool = True
    """Whether the model has ``guidance_in`` (dev: yes, schnell: no)."""


DEV = FluxShape()
SCHNELL = FluxShape(guidance=False)


def transformer_keys(shape: FluxShape) -> dict[str, tuple[int, ...]]:
    """Every key of a Flux transformer in Black Forest Labs' naming (no prefix), with its shape,
    in module order."""
    h, m = shape.hidden, shape.mlp_hidden
    keys: dict[str, tuple[int, ...]] = {}

    def linear(name: str, out: int, inp: int) -> None:
        keys[f"{name}.weight"] = (out, inp)
        keys[f"{name}.bias"] = (out,)

    linear("img_in", h, shape.in_channels)
    embedders = [("time_in", 256), ("vector_in", shape.pooled_dim)] + ([("guidance_in", 256)] if shape.guidance else [])
    for name, width in embedders:
        linear(f"{name}.in_layer", h, width)
        linear(f"{name}.out_layer", h, h)
    linear("txt_in", h, shape.context_dim)
    for i in range(shape.double_blocks):
        for stream in ("img", "txt"):
            b = f"double_blocks.{i}.{stream}"
            linear(f"{b}_mod.lin", 6 * h, h)
            linear(f"{b}_attn.qkv", 3 * h, h)
            keys[f"{b}_attn.norm.query_norm.scale"] = (shape.head_dim,)
            keys[f"{b}_attn.norm.key_norm.scale"] = (shape.head_dim,)
            linear(f"{b}_attn.proj", h, h)
            linear(f"{b}_mlp.0", m, h)
            linear(f"{b}_mlp.2", h, m)
    for i in range(shape.single_blocks):
        b = f"single_blocks.{i}"
        linear(f"{b}.linear1", 3 * h + m, h)
        linear(f"{b}.linear2", h, h + m)
        keys[f"{b}.norm.query_norm.scale"] = (shape.head_dim,)
        keys[f"{b}.norm.key_norm.scale"] = (shape.head_dim,)
        linear(f"{b}.modulation.lin", 3 * h, h)
    linear("final_layer.linear", shape.in_channels, h)
    linear("final_layer.adaLN_modulation.1", 2 * h, h)
    return keys


_UNIT = re.compile(
    r"text_encoders\.clip_l\.transformer\.text_model\.(?:encoder\.layers\.\d+\.)?"
    r"|text_encoders\.clip_l\.transformer\."
    r"|text_encoders\.t5xxl\.transformer\.(?:encoder\.(?:block\.\d+\.layer\.\d+\.)?)?"
    r"|text_encoders\.\w+\."
    r"|model\.diffusion_model\.(?:(?:double|single)_blocks\.\d+\.)?"
    r"|vae\.(?:(?:encoder|decoder)\.(?:(?:down|up)\.\d+\.(?:block\.\d+\.)?|mid\.(?:block_\d+\.)?)?)?"
)
_PARAM = re.compile(r"(?:^|\.)(?:weight|bias|scale)$")
_BLOCK = re.compile(r"model\.diffusion_model\.(double|single)_blocks\.(\d+)\.")


def layer_class(key: str) -> str | None:
    """The class (layer type) of a canonical Flux key (see the module docstring)."""
    m = _UNIT.match(key)
    if m is None:
        return None
    return _PARAM.sub("", key[m.end():]).replace(".", "_") or None


def block(key: str) -> str | None:
    """The block of a canonical Flux key (see the module docstring)."""
    if key.startswith("text_encoders."):
        return key.split(".", 2)[1].upper()
    if key.startswith("vae."):
        return "VAE"
    m = _BLOCK.match(key)
    if m:
        return f"{m.group(1)}_blocks_{int(m.group(2)):02d}"
    if key.startswith(PREFIX + "final_layer."):
        return "OUT"
    if key.startswith(PREFIX):
        return "IN"
    return None


def block_names(shape: FluxShape) -> tuple[str, ...]:
    return ("CLIP_L", "T5XXL", "IN", *(f"double_blocks_{i:02d}" for i in range(shape.double_blocks)),
            *(f"single_blocks_{i:02d}" for i in range(shape.single_blocks)), "OUT", "VAE")


@functools.lru_cache(maxsize=None)
def _encoders_and_vae() -> dict[str, KeySpec]:
    with no_gc():
        packed = load_packed("mecha_flux", "flux-encoders-vae.json.gz")
    return packed_keys(packed, layer_class=layer_class, block=block, optional_components=EXTRA_COMPONENTS)


def flux_architecture(name: str, shape: FluxShape, *, description: str = "", aliases: tuple[str, ...] = (),
                      dtype: str = "bfloat16") -> Architecture:
    """A Flux architecture of any size in the canonical (ComfyUI all-in-one) layout: the
    transformer of ``shape`` (BFL names as aliases), plus the optional CLIP-L, T5-XXL and VAE of
    Flux.1. A clean function of the sizes, for fixed releases and for families alike."""
    keys: dict[str, KeySpec] = {}
    with no_gc():
        for bfl, key_shape in transformer_keys(shape).items():
            key = PREFIX + bfl
            found = block(key)
            keys[key] = KeySpec(key_shape, dtype, "diffuser", False, (bfl,), (found,) if found else (),
                                layer_class(key))
        keys.update(_encoders_and_vae())
    classes = tuple(sorted({s.klass for s in keys.values() if s.klass}))
    return Architecture(name=name, keys=keys, blocks=block_names(shape), classes=classes,
                        description=description, aliases=aliases, component_aliases=COMPONENT_ALIASES)


DEV_NAME = "flux-dev"
SCHNELL_NAME = "flux-schnell"


@functools.lru_cache(maxsize=None)
def dev() -> Architecture:
    return flux_architecture(DEV_NAME, DEV, aliases=("flux", "flux-1-dev", "flux_dev"),
                             description="Flux.1 dev: BFL transformer (19 double, 38 single blocks) alone or "
                                         "in ComfyUI's all-in-one file with CLIP-L, T5-XXL and VAE")


@functools.lru_cache(maxsize=None)
def schnell() -> Architecture:
    return flux_architecture(SCHNELL_NAME, SCHNELL, aliases=("flux-1-schnell", "flux_schnell"),
                             description="Flux.1 schnell: Flux.1 dev without guidance_in (BFL alone or "
                                         "ComfyUI all-in-one)")
