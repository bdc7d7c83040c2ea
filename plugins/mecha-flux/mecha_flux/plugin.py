"""Entry point of the mecha-flux plugin: only hook implementations live here.

Provides ``flux-dev`` and ``flux-schnell`` (canonical: ComfyUI all-in-one; BFL names as aliases;
:mod:`mecha_flux.layout`) and their diffusers-naming layouts ``flux-dev-diffusers`` and
``flux-schnell-diffusers`` with converters to the canonical ones (:mod:`mecha_flux.diffusers_layout`).
Architectures are lazy (:class:`~mecha_core.specs.LazyArchitecture`): a table is built the first
time a merge needs it. The ``flux_family`` architecture family (:mod:`mecha_flux.family`) claims
Flux-shaped files of other block counts or widths.
"""

import functools

from mecha_core import hookimpl
from mecha_core.specs import LazyArchitecture

from . import diffusers_layout, family, layout

MECHA_PLUGIN_API = 1

#: the transformer's modules: bare (BFL names, the aliases) and under ComfyUI's prefix (the keys)
_BFL = ("double_blocks.", "final_layer.", "img_in.", "single_blocks.", "time_in.", "txt_in.", "vector_in.")
_CANONICAL = (*_BFL, *(f"model.diffusion_model.{part}" for part in _BFL))
_DIFFUSERS = ("context_embedder.", "norm_out.", "proj_out.", "single_transformer_blocks.", "time_text_embed.",
              "transformer_blocks.", "x_embedder.")


@functools.lru_cache(maxsize=None)
def dev_diffusers():
    return diffusers_layout.diffusers_architecture(layout.dev(), f"{layout.DEV_NAME}-diffusers")


@functools.lru_cache(maxsize=None)
def schnell_diffusers():
    return diffusers_layout.diffusers_architecture(layout.schnell(), f"{layout.SCHNELL_NAME}-diffusers")


@hookimpl
def mecha_architectures():
    guidance = ("guidance_in.", "model.diffusion_model.guidance_in.")
    return [LazyArchitecture(layout.DEV_NAME, layout.dev, required_keys=780, aliases=("flux", "flux-1-dev", "flux_dev"),
                             key_prefixes=(*_CANONICAL, *guidance)),
            LazyArchitecture(layout.SCHNELL_NAME, layout.schnell, required_keys=776,
                             aliases=("flux-1-schnell", "flux_schnell"), key_prefixes=_CANONICAL),
            LazyArchitecture(f"{layout.DEV_NAME}-diffusers", dev_diffusers, required_keys=1160,
                             key_prefixes=_DIFFUSERS),
            LazyArchitecture(f"{layout.SCHNELL_NAME}-diffusers", schnell_diffusers, required_keys=1156,
                             key_prefixes=_DIFFUSERS)]


@hookimpl
def mecha_converters():
    return [c for canonical in (layout.DEV_NAME, layout.SCHNELL_NAME)
            for c in diffusers_layout.converters(f"{canonical}-diffusers", canonical)]


@hookimpl
def mecha_architecture_families():
    return [family.family()]
