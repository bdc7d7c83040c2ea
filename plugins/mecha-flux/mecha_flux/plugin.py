"""Entry point of the mecha-flux plugin: only hook implementations live here.

Provides ``flux-dev`` and ``flux-schnell`` (canonical: ComfyUI all-in-one; BFL names as aliases;
:mod:`mecha_flux.layout`) and their diffusers-naming layouts ``flux-dev-diffusers`` and
``flux-schnell-diffusers`` with converters to the canonical ones (:mod:`mecha_flux.diffusers_layout`).
Architectures are built on first call and cached. The ``flux_family`` architecture family
(:mod:`mecha_flux.family`) claims Flux-shaped files of other block counts or widths.
"""

import functools

from mecha_core import hookimpl

from . import diffusers_layout, family, layout

MECHA_PLUGIN_API = 1


@functools.lru_cache(maxsize=None)
def _diffusers():
    return [diffusers_layout.diffusers_architecture(layout.dev(), f"{layout.DEV_NAME}-diffusers"),
            diffusers_layout.diffusers_architecture(layout.schnell(), f"{layout.SCHNELL_NAME}-diffusers")]


@hookimpl
def mecha_architectures():
    return [layout.dev(), layout.schnell(), *_diffusers()]


@hookimpl
def mecha_converters():
    return [c for canonical in (layout.DEV_NAME, layout.SCHNELL_NAME)
            for c in diffusers_layout.converters(f"{canonical}-diffusers", canonical)]


@hookimpl
def mecha_architecture_families():
    return [family.family()]
