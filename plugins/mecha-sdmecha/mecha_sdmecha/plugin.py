"""Entry point of the mecha-sdmecha plugin: only hook implementations live here."""

from typing import Any

from mecha_core import hookimpl
from mecha_core.specs import RecipeFormat

from .methods import SDMECHA_METHODS

MECHA_PLUGIN_API = 1


# The reader is imported when a recipe that is not mecha's own is read, not on every start.
def detect(text: str, path: str | None) -> bool:
    from .reader import detect

    return detect(text, path)


def load_sd_mecha(text: str, **options: Any) -> Any:
    from .reader import load_sd_mecha

    return load_sd_mecha(text, **options)


SD_MECHA = RecipeFormat("sd-mecha", detect=detect, read=load_sd_mecha,
                        description="sd-mecha's .mecha recipes: 'version 0.1.0' (1.x) and unversioned (0.0.x)")


@hookimpl
def mecha_recipe_formats():
    return [SD_MECHA]


@hookimpl
def mecha_merge_methods():
    return list(SDMECHA_METHODS)
