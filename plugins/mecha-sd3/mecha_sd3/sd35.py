"""SD3.5 medium and large: MMDiT layouts computed from their sizes, in the ComfyUI all-in-one
layout of ``sd3-comfyui``.

The MMDiT's keys follow from :class:`MMDiTShape` (:func:`mmdit_keys`): ``depth`` joint blocks of
width ``64 * depth``; SD3.5 adds RMSNorm q/k scales to every attention (``attn.ln_q``,
``attn.ln_k``, 64 entries) and SD3.5 medium (MMDiT-X) a second image self-attention
(``x_block.attn2``, with a 9-way ``adaLN_modulation``) in its first 13 blocks. The text encoders,
the VAE and the scheduler buffer are those of ``sd3-comfyui`` (text encoders optional), and so
are the block (``J00``...) and class rules (:mod:`mecha_sd3.layout`).

SD3 medium itself is ``MMDiTShape(depth=24)``: the function reproduces the packed ``sd3-comfyui``
MMDiT exactly (checked by the tests).
"""

from __future__ import annotations

import functools

import attrs
from mecha_core.specs import Architecture, KeySpec

from . import layout

PREFIX = "model.diffusion_model."


@attrs.frozen
class MMDiTShape:
    """The sizes an SD3-family MMDiT's key table follows from."""

    depth: int
    """Number of joint blocks (the width is ``64 * depth``)."""
    pos_embed_max: int = 192
    """Side of the learned position-embedding grid (``pos_embed`` holds its square)."""
    dual_attention_blocks: tuple[int, ...] = ()
    """Blocks whose image stream has a second self-attention (``attn2``, MMDiT-X)."""
    qk_norm: bool = False
    """Whether attentions have RMSNorm q/k scales (``ln_q``, ``ln_k``)."""
    head_dim: int = 64
    """Size of one attention head."""
    context_dim: int = 4096
    """Width of the T5 tokens."""
    pooled_dim: int = 2048
    """Width of the pooled CLIP-L + CLIP-G vector."""
    in_channels: int = 16
    """Latent channels."""


SD3_MEDIUM = MMDiTShape(depth=24)
SD35_MEDIUM = MMDiTShape(depth=24, pos_embed_max=384, dual_attention_blocks=tuple(range(13)), qk_norm=True)
SD35_LARGE = MMDiTShape(depth=38, qk_norm=True)


def mmdit_keys(shape: MMDiTShape) -> dict[str, tuple[int, ...]]:
    """Every MMDiT key (with the ``model.diffusion_model.`` prefix) and its shape."""
    h = 64 * shape.depth
    keys: dict[str, tuple[int, ...]] = {}

    def linear(name: str, out: int, inp: int) -> None:
        keys[f"{PREFIX}{name}.weight"] = (out, inp)
        keys[f"{PREFIX}{name}.bias"] = (out,)

    def attention(name: str, proj: bool) -> None:
        linear(f"{name}.qkv", 3 * h, h)
        if shape.qk_norm:
            keys[f"{PREFIX}{name}.ln_q.weight"] = (shape.head_dim,)
            keys[f"{PREFIX}{name}.ln_k.weight"] = (shape.head_dim,)
        if proj:
            linear(f"{name}.proj", h, h)

    linear("context_embedder", h, shape.context_dim)
    linear("final_layer.adaLN_modulation.1", 2 * h, h)
    linear("final_layer.linear", 4 * shape.in_channels, h)
    for i in range(shape.depth):
        last = i == shape.depth - 1
        for stream in ("context_block", "x_block"):
            b = f"joint_blocks.{i}.{stream}"
            pre_only = last and stream == "context_block"  # the last text stream feeds nothing after it
            dual = stream == "x_block" and i in shape.dual_attention_blocks
            linear(f"{b}.adaLN_modulation.1", (2 if pre_only else 9 if dual else 6) * h, h)
            attention(f"{b}.attn", proj=not pre_only)
            if dual:
                attention(f"{b}.attn2", proj=True)
            if not pre_only:
                linear(f"{b}.mlp.fc1", 4 * h, h)
                linear(f"{b}.mlp.fc2", h, 4 * h)
    keys[PREFIX + "pos_embed"] = (1, shape.pos_embed_max ** 2, h)
    linear("t_embedder.mlp.0", h, 256)
    linear("t_embedder.mlp.2", h, h)
    keys[PREFIX + "x_embedder.proj.weight"] = (h, shape.in_channels, 2, 2)
    keys[PREFIX + "x_embedder.proj.bias"] = (h,)
    linear("y_embedder.mlp.0", h, shape.pooled_dim)
    linear("y_embedder.mlp.2", h, h)
    return dict(sorted(keys.items()))


def sd3_architecture(name: str, shape: MMDiTShape, *, description: str = "", aliases: tuple[str, ...] = (),
                     dtype: str = "bfloat16") -> Architecture:
    """An SD3-family architecture of any size: the MMDiT of ``shape`` in ComfyUI naming, plus
    ``sd3-comfyui``'s text encoders (optional), VAE and sigmas. A clean function of the sizes, for
    fixed releases and for families alike."""
    base = layout.architecture()
    keys: dict[str, KeySpec] = {}
    for key, key_shape in mmdit_keys(shape).items():
        found = layout.block(key)
        keys[key] = KeySpec(key_shape, dtype, "diffuser", False, (), (found,) if found else (), layout.layer_class(key))
    keys.update({k: s for k, s in base.keys.items() if not k.startswith(PREFIX)})
    blocks = ("CLIP_L", "CLIP_G", "T5XXL", "IN", *(f"J{i:02d}" for i in range(shape.depth)), "OUT", "VAE")
    classes = tuple(sorted({s.klass for s in keys.values() if s.klass}))
    return Architecture(name=name, keys=keys, blocks=blocks, classes=classes, description=description,
                        aliases=aliases, component_aliases=dict(base.component_aliases))


@functools.lru_cache(maxsize=None)
def medium() -> Architecture:
    return sd3_architecture("sd3.5-medium", SD35_MEDIUM, aliases=("sd35-medium", "sd3.5m"),
                            description="Stable Diffusion 3.5 medium (MMDiT-X, 24 blocks), ComfyUI all-in-one layout")


@functools.lru_cache(maxsize=None)
def large() -> Architecture:
    return sd3_architecture("sd3.5-large", SD35_LARGE, aliases=("sd35-large", "sd3.5l"),
                            description="Stable Diffusion 3.5 large (38 blocks), ComfyUI all-in-one layout")
