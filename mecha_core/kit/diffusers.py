"""Names of the diffusers models for keys of the original (ldm/sgm) Stable Diffusion layouts.

A diffusers pipeline stores a ``UNet2DConditionModel``, an ``AutoencoderKL`` and Hugging Face CLIP
text models; the original checkpoints (SD1 ``ldm``, SDXL ``sgm``) name the same tensors after the
ldm module tree. These helpers turn the ldm name of a U-Net or VAE key into the diffusers name, so
a plugin can describe a diffusers layout and convert it to its canonical one.

The names follow the module structure both libraries use (``layers_per_block = 2``):
``input_blocks.{3i+j+1}`` is ``down_blocks.i`` (resnet or attention ``j``; ``j = 2`` is the
downsampler), ``output_blocks.{3i+j}`` is ``up_blocks.i``, ``middle_block.{0,1,2}`` is
``mid_block.{resnets.0, attentions.0, resnets.1}``; the VAE decoder's ``up.i`` is
``up_blocks.{3-i}``. The same rules hold for any number of U-Net levels (SD1 has 4, SDXL 3).
The only values that change besides names are the VAE mid-block attention projections: Linear
``[out, in]`` in diffusers, 1x1 conv ``[out, in, 1, 1]`` in ldm (a reshape, same numbers; see
:func:`is_vae_linear`).
"""

from __future__ import annotations

import re

_RESNET = (("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
           ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut."))
_UNET_SIMPLE = (("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
                ("label_emb.0.0.", "add_embedding.linear_1."), ("label_emb.0.2.", "add_embedding.linear_2."),
                ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out."))
_UNET_BLOCK = re.compile(r"(input_blocks|middle_block|output_blocks)\.(\d+)\.(?:(\d+)\.)?(.*)$")
_VAE_ATTN = {"norm.": "group_norm.", "q.": "to_q.", "k.": "to_k.", "v.": "to_v.", "proj_out.": "to_out.0."}
_VAE_UP_BLOCKS = 4
_VAE_LINEAR = re.compile(r"(?:encoder|decoder)\.mid_block\.attentions\.0\.to_(?:q|k|v|out\.0)\.weight")


def _resnet(tail: str) -> str:
    for old, new in _RESNET:
        if tail.startswith(old):
            return new + tail[len(old):]
    raise KeyError(tail)


def unet_name(rest: str) -> str:
    """The diffusers ``UNet2DConditionModel`` name of an ldm U-Net key given without its
    ``model.diffusion_model.`` prefix; ``KeyError`` for a name the U-Net does not have."""
    for old, new in _UNET_SIMPLE:
        if rest.startswith(old):
            return new + rest[len(old):]
    m = _UNET_BLOCK.match(rest)
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
    """The diffusers ``AutoencoderKL`` name of an ldm VAE key given without its
    ``first_stage_model.`` prefix; ``KeyError`` for a name the VAE does not have."""
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


def is_vae_linear(diffusers_vae_name: str) -> bool:
    """Whether a diffusers VAE weight (a :func:`vae_name` result) is a Linear ``[out, in]`` where
    ldm stores a 1x1 conv ``[out, in, 1, 1]``: the mid-block attention projections."""
    return _VAE_LINEAR.fullmatch(diffusers_vae_name) is not None


def text_encoder_aliases(name: str, prefix: str, kohya_prefix: str | None) -> tuple[str, ...]:
    """Other spellings of the text-encoder key ``name`` stored under ``prefix``: the same key under
    kohya's short prefix (``te.`` for ``text_encoder.``; none when ``kohya_prefix`` is ``None``),
    and the name transformers 5 uses in ``state_dict()`` (no ``text_model.`` level). Empty for
    keys outside ``prefix``."""
    if not name.startswith(prefix):
        return ()
    rest = name[len(prefix):]
    out = [kohya_prefix + rest] if kohya_prefix else []
    if rest.startswith("text_model."):
        out.append(prefix + rest[len("text_model."):])
    return tuple(out)
