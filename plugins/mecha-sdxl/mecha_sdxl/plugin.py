"""Entry point of the mecha-sdxl plugin: only hook implementations live here.

Provides ``sdxl-sgm`` (blocks and classes: :mod:`mecha_sdxl.layout`) and the ``sdxl-kohya`` and
``sdxl-diffusers`` layouts with converters to ``sdxl-sgm`` (:mod:`mecha_sdxl.conversions`).
Architectures are built on first call and cached.
"""

from mecha_core import hookimpl

from . import conversions, layout

MECHA_PLUGIN_API = 1


@hookimpl
def mecha_architectures():
    return [layout.architecture(), conversions.kohya_architecture(), conversions.diffusers_architecture(),
            conversions.diffusers_unet_architecture()]


@hookimpl
def mecha_converters():
    return conversions.converters()
