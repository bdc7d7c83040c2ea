"""Entry point of the mecha-sd3 plugin: only hook implementations live here.

Provides ``sd3-comfyui`` (blocks and classes: :mod:`mecha_sd3.layout`) and SD3.5 ``sd3.5-medium``
and ``sd3.5-large`` (layouts computed from their sizes: :mod:`mecha_sd3.sd35`). Architectures are
lazy (:class:`~mecha_core.specs.LazyArchitecture`): a table is built the first time a merge needs it.
"""

from mecha_core import hookimpl
from mecha_core.specs import LazyArchitecture

from . import layout, sd35

MECHA_PLUGIN_API = 1

#: where every required key (and alias) of the three layouts lies
_PREFIXES = ("first_stage_model.", "model.model_sampling.sigmas", "model.diffusion_model.pos_embed",
             *(f"model.diffusion_model.{part}." for part in ("context_embedder", "final_layer", "joint_blocks",
                                                            "t_embedder", "x_embedder", "y_embedder")))


@hookimpl
def mecha_architectures():
    return [LazyArchitecture(layout.NAME, layout.architecture, required_keys=736, aliases=("sd3", "sd3-sgm"),
                             key_prefixes=_PREFIXES),
            LazyArchitecture("sd3.5-medium", sd35.medium, required_keys=910, aliases=("sd35-medium", "sd3.5m"),
                             key_prefixes=_PREFIXES),
            LazyArchitecture("sd3.5-large", sd35.large, required_keys=1168, aliases=("sd35-large", "sd3.5l"),
                             key_prefixes=_PREFIXES)]
