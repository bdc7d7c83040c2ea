"""Entry point of the mecha-sdmecha plugin: only hook implementations live here."""

from mecha_core import hookimpl
from mecha_core.specs import RecipeFormat

from .methods import SDMECHA_METHODS
from .reader import detect, load_sd_mecha

MECHA_PLUGIN_API = 1

SD_MECHA = RecipeFormat("sd-mecha", detect=detect, read=load_sd_mecha,
                        description="sd-mecha's .mecha recipes: 'version 0.1.0' (1.x) and unversioned (0.0.x)")


@hookimpl
def mecha_recipe_formats():
    return [SD_MECHA]


@hookimpl
def mecha_merge_methods():
    return list(SDMECHA_METHODS)
