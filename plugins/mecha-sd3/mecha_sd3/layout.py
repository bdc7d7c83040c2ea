"""The ``sd3-comfyui`` architecture: SD3 medium in the ComfyUI all-in-one layout.

Keys, shapes, dtypes and components come from ``data/sd3-comfyui.json.gz`` (packed by
``python -m mecha_core.kit.layouts`` from the shared ``sd3-comfyui.json``):
``model.diffusion_model.`` (the MMDiT), ``first_stage_model.`` (16-channel VAE) and
``text_encoders.{clip_l,clip_g,t5xxl}.`` (Hugging Face naming).

Optional keys: the three text encoders. Released files exist with and without them
(``sd3_medium.safetensors`` holds the MMDiT and the VAE only), so detection asks for the MMDiT and
VAE keys alone and a merge of files without text encoders is complete.

Blocks (30): ``CLIP_L``, ``CLIP_G``, ``T5XXL`` (the text encoders), ``IN`` (patch, position,
time, pooled-text and context embedders), ``J00``-``J23`` (``joint_blocks.N``, both the image
``x_block`` and the text ``context_block``), ``OUT`` (``final_layer``) and ``VAE``. The
``model.model_sampling.sigmas`` buffer belongs to no block.

Classes: the key without ``.weight``/``.bias`` and without the prefix of its repeated unit, dots as
``_`` (the rule of ``sd1-ldm``): ``x_block_attn_qkv``, ``context_block_mlp_fc1``,
``x_block_adaLN_modulation_1``, ``pos_embed``; CLIP ``layer_norm1``, ``mlp_fc1``,
``self_attn_q_proj``, ``text_projection``; T5 ``SelfAttention_q``, ``DenseReluDense_wi_0``,
``layer_norm``; VAE ``conv1``, ``attn_1_q``. CLIP-L and CLIP-G share class names.
"""

from __future__ import annotations

import functools
import re

from mecha_core.kit import packed_architecture
from mecha_core.specs import Architecture

NAME = "sd3-comfyui"
JOINT_BLOCKS = 24
BLOCKS = ("CLIP_L", "CLIP_G", "T5XXL", "IN", *(f"J{i:02d}" for i in range(JOINT_BLOCKS)), "OUT", "VAE")
TEXT_ENCODERS = ("clip_l", "clip_g", "t5xxl")

_UNIT = re.compile(
    r"text_encoders\.(?:clip_l|clip_g)\.transformer\.text_model\.(?:encoder\.layers\.\d+\.)?"
    r"|text_encoders\.(?:clip_l|clip_g)\.transformer\."
    r"|text_encoders\.t5xxl\.transformer\.(?:encoder\.(?:block\.\d+\.layer\.\d+\.)?)?"
    r"|text_encoders\.\w+\."
    r"|model\.diffusion_model\.(?:joint_blocks\.\d+\.)?"
    r"|first_stage_model\.(?:(?:encoder|decoder)\.(?:(?:down|up)\.\d+\.(?:block\.\d+\.)?|mid\.(?:block_\d+\.)?)?)?"
)
_PARAM = re.compile(r"(?:^|\.)(?:weight|bias)$")
_JOINT = re.compile(r"model\.diffusion_model\.joint_blocks\.(\d+)\.")


def layer_class(key: str) -> str | None:
    """The class (layer type) of an sd3-comfyui key; ``None`` for the sigmas buffer."""
    m = _UNIT.match(key)
    if m is None:
        return None
    return _PARAM.sub("", key[m.end():]).replace(".", "_") or None


def block(key: str) -> str | None:
    """The block of an sd3-comfyui key (see the module docstring)."""
    if key.startswith("text_encoders."):
        return key.split(".", 2)[1].upper()
    if key.startswith("first_stage_model."):
        return "VAE"
    m = _JOINT.match(key)
    if m:
        return f"J{int(m.group(1)):02d}"
    if key.startswith("model.diffusion_model.final_layer."):
        return "OUT"
    if key.startswith("model.diffusion_model."):
        return "IN"
    return None


@functools.lru_cache(maxsize=None)
def architecture() -> Architecture:
    return packed_architecture(
        "mecha_sd3", "sd3-comfyui.json.gz", name=NAME, layer_class=layer_class, block=block, blocks=BLOCKS,
        optional_components=TEXT_ENCODERS,
        description="Stable Diffusion 3 medium, ComfyUI all-in-one layout (MMDiT, VAE, CLIP-L/G, T5-XXL)",
        aliases=("sd3", "sd3-sgm"),
        component_aliases={"txt": "clip_l", "txt2": "clip_g", "unet": "diffuser"},  # sd-mecha's names
    )
