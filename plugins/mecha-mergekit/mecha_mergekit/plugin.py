"""Entry point of the mecha-mergekit plugin: only hook implementations live here."""

from typing import Any

from mecha_core import hookimpl
from mecha_core.specs import RecipeFormat

from .methods import MERGEKIT_METHODS

MECHA_PLUGIN_API = 1


# The reader (and YAML, the hub and tokenizer code it imports) is imported when a recipe that is
# not mecha's own is read, not on every start: merges of .mecha recipes never ask for it.
def detect(text: str, path: str | None) -> bool:
    from .reader import detect

    return detect(text, path)


def load_mergekit(text: str, **options: Any) -> Any:
    from .reader import load_mergekit

    return load_mergekit(text, **options)


MERGEKIT = RecipeFormat("mergekit", detect=detect, read=load_mergekit,
                        description="mergekit 0.1.5 YAML merge configs (.yml/.yaml), with mergekit's semantics")


@hookimpl
def mecha_recipe_formats():
    return [MERGEKIT]


@hookimpl
def mecha_merge_methods():
    return list(MERGEKIT_METHODS)
