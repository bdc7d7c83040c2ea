"""Entry point of the mecha-sdxl plugin: only hook implementations live here.

Provides ``sdxl-sgm`` (blocks and classes: :mod:`mecha_sdxl.layout`) and the ``sdxl-kohya`` and
``sdxl-diffusers`` layouts with converters to ``sdxl-sgm`` (:mod:`mecha_sdxl.conversions`).
Architectures are lazy (:class:`~mecha_core.specs.LazyArchitecture`): a table is built the first
time a merge needs it.
"""

from mecha_core import hookimpl
from mecha_core.specs import LazyArchitecture

from . import conversions, layout

MECHA_PLUGIN_API = 1

#: the U-Net's parts in the sgm layout (an SD1 file shares the prefix model.diffusion_model., not these)
_UNET = tuple(f"model.diffusion_model.{part}." for part in ("input_blocks", "label_emb", "middle_block", "out",
                                                             "output_blocks", "time_embed"))


@hookimpl
def mecha_architectures():
    return [
        LazyArchitecture(layout.NAME, layout.architecture, required_keys=2480, aliases=("sdxl",),
                         key_prefixes=("conditioner.", "first_stage_model.", *_UNET)),
        LazyArchitecture("sdxl-kohya", conversions.kohya_architecture, required_keys=2609,
                         key_prefixes=("first_stage_model.", "te1.", "te2.", "unet.")),
        LazyArchitecture("sdxl-diffusers", conversions.diffusers_architecture, required_keys=2609,
                         key_prefixes=("text_encoder.", "text_encoder_2.", "unet.", "vae.")),
        LazyArchitecture("sdxl-diffusers-unet", conversions.diffusers_unet_architecture, required_keys=1680,
                         key_prefixes=("add_embedding.", "conv_in.", "conv_norm_out.", "conv_out.", "down_blocks.",
                                       "mid_block.", "time_embedding.", "up_blocks.")),
    ]


@hookimpl
def mecha_converters():
    return conversions.converters()
