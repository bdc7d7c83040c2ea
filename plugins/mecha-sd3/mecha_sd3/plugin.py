"""Entry point of the mecha-sd3 plugin: only hook implementations live here.

Provides ``sd3-comfyui`` (blocks and classes: :mod:`mecha_sd3.layout`), built on first call and
cached.
"""

from mecha_core import hookimpl

from . import layout

MECHA_PLUGIN_API = 1


@hookimpl
def mecha_architectures():
    return [layout.architecture()]
