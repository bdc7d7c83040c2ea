"""Entry point of the mecha-sd3 plugin: only hook implementations live here.

Provides ``sd3-comfyui`` (blocks and classes: :mod:`mecha_sd3.layout`) and SD3.5 ``sd3.5-medium``
and ``sd3.5-large`` (layouts computed from their sizes: :mod:`mecha_sd3.sd35`), built on first
call and cached.
"""

from mecha_core import hookimpl

from . import layout, sd35

MECHA_PLUGIN_API = 1


@hookimpl
def mecha_architectures():
    return [layout.architecture(), sd35.medium(), sd35.large()]
