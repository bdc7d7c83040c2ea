"""Entry point of the mecha-sd1 plugin: only hook implementations live here.

Provides the architectures ``sd1-ldm`` (see :mod:`mecha_sd1.layout` for blocks and classes) and
``sd1-diffusers`` with a converter to ``sd1-ldm`` (see :mod:`mecha_sd1.diffusers_layout`).
Architectures are lazy (:class:`~mecha_core.specs.LazyArchitecture`): a table is built the first
time a merge needs it, so command start-up and merges of other models never build them.
"""

from mecha_core import hookimpl
from mecha_core.specs import LazyArchitecture

from . import diffusers_layout, layout

MECHA_PLUGIN_API = 1

_UNET_PARTS = ("conv_in.", "conv_norm_out.", "conv_out.", "down_blocks.", "mid_block.", "time_embedding.", "up_blocks.")


@hookimpl
def mecha_architectures():
    return [
        LazyArchitecture(layout.NAME, layout.architecture, required_keys=1130, aliases=("sd1", "sd1.5", "sd15"),
                         key_prefixes=("cond_stage_model.", "first_stage_model.", "model.diffusion_model.input_blocks.",
                                       "model.diffusion_model.middle_block.", "model.diffusion_model.out.",
                                       "model.diffusion_model.output_blocks.", "model.diffusion_model.time_embed.")),
        LazyArchitecture(diffusers_layout.NAME, diffusers_layout.architecture, required_keys=1130,
                         aliases=("sd1-kohya",), key_prefixes=("te.", "text_encoder.", "unet.", "vae.")),
        LazyArchitecture(diffusers_layout.UNET_NAME, diffusers_layout.unet_architecture, required_keys=686,
                         key_prefixes=_UNET_PARTS),
    ]


@hookimpl
def mecha_converters():
    return diffusers_layout.converters()
