"""Entry point of the mecha-sd1 plugin: only hook implementations live here.

Provides the architectures ``sd1-ldm`` (see :mod:`mecha_sd1.layout` for blocks and classes) and
``sd1-diffusers`` with a converter to ``sd1-ldm`` (see :mod:`mecha_sd1.diffusers_layout`).
Architectures are built on first call and cached, so command start-up stays fast.
"""

from mecha_core import hookimpl

from . import diffusers_layout, layout

MECHA_PLUGIN_API = 1


@hookimpl
def mecha_architectures():
    return [layout.architecture(), diffusers_layout.architecture(), diffusers_layout.unet_architecture()]


@hookimpl
def mecha_converters():
    return diffusers_layout.converters()
