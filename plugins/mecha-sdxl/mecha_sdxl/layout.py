"""The ``sdxl-sgm`` architecture: SDXL checkpoints in the original (sgm) layout.

Keys, shapes, dtypes, components and optional keys come from ``data/sdxl-sgm.json.gz`` (packed by
``python -m mecha_core.kit.layouts`` from the shared ``sdxl-sgm.json``), each key's block
from the MBW block map ``sdxl-sgm-blocks.json`` packed in the same file.

Blocks (21): ``BASE`` (both text encoders, time and label embeddings, scheduler buffers and flags),
``IN00``-``IN08`` (``input_blocks.N``), ``M00``, ``OUT00``-``OUT08`` (``output_blocks.N``; the
final ``out.*`` in ``OUT08``) and ``VAE`` (every ``first_stage_model.`` key).

Classes follow the same rule as ``sd1-ldm`` (the mecha-sd1 plugin): the key without
``.weight``/``.bias`` and without the prefix of its repeated unit, dots as ``_``. CLIP-L keys give
HF names (``layer_norm1``, ``mlp_fc1``, ``self_attn_q_proj``), CLIP-G keys OpenCLIP names
(``ln_1``, ``mlp_c_fc``, ``attn_in_proj`` for the fused q/k/v ``in_proj_weight``/``in_proj_bias``),
U-Net keys ldm names (``attn1_to_k``, ``proj_in``, ``in_layers_2``), VAE keys ``conv1``,
``norm1``, ``attn_1_q`` and so on. Scheduler buffers and the ``v_pred``/``ztsnr``/``edm_vpred``
flags have no class.
"""

from __future__ import annotations

import functools
import re

from mecha_core.kit import packed_architecture
from mecha_core.specs import Architecture

NAME = "sdxl-sgm"

_UNIT = re.compile(
    r"conditioner\.embedders\.0\.transformer\.text_model\.(?:encoder\.layers\.\d+\.)?"
    r"|conditioner\.embedders\.1\.model\.(?:transformer\.resblocks\.\d+\.)?"
    r"|model\.diffusion_model\.(?:(?:input_blocks|output_blocks)\.\d+\.\d+\.|middle_block\.\d+\.)?"
    r"(?:transformer_blocks\.\d+\.)?"
    r"|first_stage_model\.(?:(?:encoder|decoder)\.(?:(?:down|up)\.\d+\.(?:block\.\d+\.)?|mid\.(?:block_\d+\.)?)?)?"
)
_PARAM = re.compile(r"(?:^|\.)(?:weight|bias)$|(?<=in_proj)_(?:weight|bias)$")
_NAMED = {"model.diffusion_model.input_blocks.0.0.weight": "conv_in",
          "model.diffusion_model.input_blocks.0.0.bias": "conv_in"}

#: sd-mecha's component names for SDXL.
COMPONENT_ALIASES = {"txt": "clip_l", "txt2": "clip_g", "unet": "diffuser"}


def layer_class(key: str) -> str | None:
    """The class (layer type) of an sdxl-sgm key; ``None`` for buffers and flags."""
    if key in _NAMED:
        return _NAMED[key]
    m = _UNIT.match(key)
    if m is None:
        return None
    rest = _PARAM.sub("", key[m.end():])
    return rest.replace(".", "_") or None


@functools.lru_cache(maxsize=None)
def architecture() -> Architecture:
    return packed_architecture(
        "mecha_sdxl", "sdxl-sgm.json.gz", name=NAME, layer_class=layer_class,
        description="Stable Diffusion XL, original (sgm) checkpoint layout",
        aliases=("sdxl",), component_aliases=COMPONENT_ALIASES)
