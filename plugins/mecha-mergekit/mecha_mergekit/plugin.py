"""Entry point of the mecha-mergekit plugin: only hook implementations live here."""

from mecha_core import hookimpl
from mecha_core.specs import RecipeFormat

from .methods import MERGEKIT_METHODS
from .reader import detect, load_mergekit

MECHA_PLUGIN_API = 1

MERGEKIT = RecipeFormat("mergekit", detect=detect, read=load_mergekit,
                        description="mergekit 0.1.5 YAML merge configs (.yml/.yaml), with mergekit's semantics")


@hookimpl
def mecha_recipe_formats():
    return [MERGEKIT]


@hookimpl
def mecha_merge_methods():
    return list(MERGEKIT_METHODS)
