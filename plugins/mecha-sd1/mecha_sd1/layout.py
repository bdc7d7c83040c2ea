"""The ``sd1-ldm`` architecture: SD 1.x checkpoints in the original (ldm) layout.

Keys, shapes, dtypes, components, optional keys and old key spellings come from the packed layout
``data/sd1-ldm.json.gz`` (made by ``python -m mecha_core.kit.layouts`` from the shared
``sd1-ldm.json``); each key's block comes from the MBW block map ``sd1-ldm-blocks.json`` packed in
the same file.

Blocks (26, the supermerger/MBW convention): ``BASE`` (text encoder, VAE, time embedding, EMA and
scheduler buffers), ``IN00``-``IN11`` (``input_blocks.N``), ``M00`` (``middle_block``),
``OUT00``-``OUT11`` (``output_blocks.N``; the final norm and conv ``out.*`` are in ``OUT11``).

Classes name the layer type of a key: the key without its ``.weight``/``.bias`` suffix and without
the prefix that locates its repeated unit (text encoder layer, U-Net block and transformer block,
VAE up/down/mid block), dots turned into ``_``. For example
``cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc1.weight`` -> ``mlp_fc1``,
``model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight`` -> ``attn1_to_k``,
``model.diffusion_model.output_blocks.4.0.in_layers.2.bias`` -> ``in_layers_2``,
``first_stage_model.decoder.up.1.block.0.conv1.weight`` -> ``conv1``. One name may occur in
several components (``norm1`` is a transformer LayerNorm in the U-Net and a resnet GroupNorm in
the VAE): a class-wise value applies to all of them. EMA copies and scheduler buffers have no
class. (sd-mecha kept the transformer-block index in class names, ``transformer_blocks_0_attn1_to_k``;
SD1 has one transformer block per attention, so ``attn1_to_k`` names the same keys.)
"""

from __future__ import annotations

import functools
import re

from mecha_core.kit import packed_architecture
from mecha_core.specs import Architecture

NAME = "sd1-ldm"
#: sd-mecha's component names for SD1 (old recipes name them).
COMPONENT_ALIASES = {"txt": "clip_l", "unet": "diffuser"}

#: Prefixes that locate a key's repeated unit; what follows is its class. Optional groups are
#: greedy, so the longest prefix wins.
_UNIT = re.compile(
    r"cond_stage_model\.transformer\.text_model\.(?:encoder\.layers\.\d+\.)?"
    r"|model\.diffusion_model\.(?:(?:input_blocks|output_blocks)\.\d+\.\d+\.|middle_block\.\d+\.)?"
    r"(?:transformer_blocks\.\d+\.)?"
    r"|first_stage_model\.(?:(?:encoder|decoder)\.(?:(?:down|up)\.\d+\.(?:block\.\d+\.)?|mid\.(?:block_\d+\.)?)?)?"
)
_PARAM = re.compile(r"(?:^|\.)(?:weight|bias)$")
#: Keys whose rule above leaves no name (the U-Net's first conv sits directly in input_blocks.0.0).
_NAMED = {"model.diffusion_model.input_blocks.0.0.weight": "conv_in",
          "model.diffusion_model.input_blocks.0.0.bias": "conv_in"}


def layer_class(key: str) -> str | None:
    """The class (layer type) of an sd1-ldm key; ``None`` for EMA copies and scheduler buffers."""
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
        "mecha_sd1", "sd1-ldm.json.gz", name=NAME, layer_class=layer_class,
        description="Stable Diffusion 1.x, original (ldm) checkpoint layout",
        aliases=("sd1", "sd1.5", "sd15"), component_aliases=COMPONENT_ALIASES)
