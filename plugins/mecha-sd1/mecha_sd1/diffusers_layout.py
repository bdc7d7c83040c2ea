"""SD1 checkpoints in diffusers naming, and their conversion to ``sd1-ldm``.

A single-file checkpoint in diffusers naming holds the three diffusers models under the prefixes
``unet.`` (``UNet2DConditionModel``), ``text_encoder.`` (``CLIPTextModel``; kohya sd-scripts
writes ``te.``, accepted as an alias) and ``vae.`` (``AutoencoderKL``). The architecture
``sd1-diffusers`` describes that layout, so such files are detected; the converter registered by
this plugin renames every key to its ``sd1-ldm`` name, so recipes may mix both layouts and
block-/class-wise values apply to diffusers files as well.

The names follow the module structure both libraries use (layers_per_block = 2):
``input_blocks.{3i+j+1}`` is ``down_blocks.i`` (resnet or attention ``j``; ``j = 2`` is the
downsampler), ``output_blocks.{3i+j}`` is ``up_blocks.i``, ``middle_block.{0,1,2}`` is
``mid_block.{resnets.0, attentions.0, resnets.1}``; the VAE decoder's ``up.i`` is ``up_blocks.{3-i}``.
The only values that change besides names are the VAE mid-block attention projections: Linear
``[out, in]`` in diffusers, 1x1 conv ``[out, in, 1, 1]`` in ldm (a reshape, same numbers).
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Mapping

from mecha_core.specs import Architecture, ConvertedKey, Converter, KeySpec, TensorInfo

from . import layout

NAME = "sd1-diffusers"

_RESNET = (("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
           ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut."))
_VAE_ATTN = {"norm.": "group_norm.", "q.": "to_q.", "k.": "to_k.", "v.": "to_v.", "proj_out.": "to_out.0."}
_VAE_UP_BLOCKS = 4


def _resnet(tail: str) -> str:
    for old, new in _RESNET:
        if tail.startswith(old):
            return new + tail[len(old):]
    raise KeyError(tail)


def unet_name(rest: str) -> str:
    """The diffusers UNet name of an ldm U-Net key (without ``model.diffusion_model.``)."""
    simple = (("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
              ("label_emb.0.0.", "add_embedding.linear_1."), ("label_emb.0.2.", "add_embedding.linear_2."),
              ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out."))
    for old, new in simple:
        if rest.startswith(old):
            return new + rest[len(old):]
    m = re.match(r"(input_blocks|middle_block|output_blocks)\.(\d+)\.(?:(\d+)\.)?(.*)$", rest)
    if m is None:
        raise KeyError(rest)
    kind, n, sub, tail = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    if kind == "middle_block":  # middle_block.N.<tail>: 0 and 2 resnets, 1 the attention
        return f"mid_block.attentions.0.{tail}" if n == 1 else f"mid_block.resnets.{n // 2}.{_resnet(tail)}"
    s = int(sub)
    if kind == "input_blocks":
        i, j = divmod(n - 1, 3)
        if j == 2:
            return f"down_blocks.{i}.downsamplers.0.conv.{tail.removeprefix('op.')}"
        return f"down_blocks.{i}.resnets.{j}.{_resnet(tail)}" if s == 0 else f"down_blocks.{i}.attentions.{j}.{tail}"
    i, j = divmod(n, 3)
    if s == 0:
        return f"up_blocks.{i}.resnets.{j}.{_resnet(tail)}"
    if tail.startswith("conv."):
        return f"up_blocks.{i}.upsamplers.0.{tail}"
    return f"up_blocks.{i}.attentions.{j}.{tail}"


def vae_name(rest: str) -> str:
    """The diffusers AutoencoderKL name of an ldm VAE key (without ``first_stage_model.``)."""
    if rest.startswith(("quant_conv.", "post_quant_conv.")):
        return rest
    part, rest = rest.split(".", 1)
    if rest.startswith("norm_out."):
        return f"{part}.conv_norm_out.{rest[len('norm_out.'):]}"
    if rest.startswith(("conv_in.", "conv_out.")):
        return f"{part}.{rest}"
    m = re.match(r"(down|up)\.(\d+)\.(?:block\.(\d+)\.|(downsample|upsample)\.)(.*)$", rest)
    if m:
        direction, i, j, sampler, tail = m.groups()
        index = int(i) if direction == "down" else _VAE_UP_BLOCKS - 1 - int(i)
        if sampler:
            return f"{part}.{direction}_blocks.{index}.{sampler}rs.0.{tail}"
        return f"{part}.{direction}_blocks.{index}.resnets.{j}.{tail.replace('nin_shortcut.', 'conv_shortcut.')}"
    m = re.match(r"mid\.block_(\d)\.(.*)$", rest)
    if m:
        return f"{part}.mid_block.resnets.{int(m.group(1)) - 1}.{m.group(2)}"
    if rest.startswith("mid.attn_1."):
        tail = rest[len("mid.attn_1."):]
        for old, new in _VAE_ATTN.items():
            if tail.startswith(old):
                return f"{part}.mid_block.attentions.0.{new}{tail[len(old):]}"
    raise KeyError(rest)


def diffusers_name(ldm_key: str) -> str | None:
    """The ``sd1-diffusers`` name of an ``sd1-ldm`` key; ``None`` for keys diffusers does not store
    (EMA copies, scheduler buffers)."""
    for prefix, convert, new_prefix in (("model.diffusion_model.", unet_name, "unet."),
                                        ("first_stage_model.", vae_name, "vae."),
                                        ("cond_stage_model.transformer.", str, "text_encoder.")):
        if ldm_key.startswith(prefix):
            return new_prefix + convert(ldm_key[len(prefix):])
    return None


def text_encoder_aliases(name: str, prefix: str, kohya_prefix: str | None) -> tuple[str, ...]:
    """Other spellings of a text-encoder key: kohya's short prefix, and the names transformers 5
    uses in ``state_dict()`` (no ``text_model.`` level)."""
    if not name.startswith(prefix):
        return ()
    rest = name[len(prefix):]
    out = [kohya_prefix + rest] if kohya_prefix else []
    if rest.startswith("text_model."):
        out.append(prefix + rest[len("text_model."):])
    return tuple(out)


def _is_linear_in_diffusers(ldm_key: str) -> bool:
    return bool(re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", ldm_key))


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
    for name, (ldm_key, spec) in _table().items():
        shape = spec.shape[:2] if _is_linear_in_diffusers(ldm_key) else spec.shape
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
        if info.shape != spec.shape and info.numel == _numel(spec.shape):
            out[ldm_key] = ConvertedKey(TensorInfo(spec.shape, info.dtype), (key,), _take_reshaped(key, spec.shape))
        else:  # same shape, or a wrong one that the plan reports against the other inputs
            out[ldm_key] = ConvertedKey(info, (key,), _take(key))
    if not converted:
        raise ValueError("no diffusers-layout SD1 key")
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


UNET_NAME = "sd1-diffusers-unet"


@functools.lru_cache(maxsize=None)
def unet_architecture() -> Architecture:
    from . import unet_only

    return unet_only.architecture(architecture(), UNET_NAME, "an SD1 U-Net saved alone by diffusers "
                                  "(unet/diffusion_pytorch_model.safetensors); converted to sd1-ldm")


def converters() -> list[Converter]:
    from . import unet_only

    # One edge per model type the engine keeps in a canonical layout: weights and deltas.
    return [Converter(f"{source}-to-ldm-{t}", source, t, layout.NAME, t, planner,
                      description=f"{what} -> sd1-ldm ({t})")
            for source, planner, what in ((NAME, plan_to_ldm, "SD1 diffusers naming"),
                                          (UNET_NAME, unet_only.plan(plan_to_ldm), "SD1 diffusers U-Net alone"))
            for t in ("base", "delta")]
