"""Recipes: the graph (nodes), hyperparameter maps (values), the .mecha text format, compose.

Recipes are plain data: nothing in this package consults the process-wide plugin host. The
readers take a host (:class:`~.host.RecipeHost`) to resolve method names and architecture
aliases; ``mecha_core.load_recipe`` and ``mecha_core.compose`` pass the process-wide one.
"""

from __future__ import annotations

import difflib
import os
from typing import Any, Mapping

from ..errors import RecipeError
from ..files import read_text_file
from .format import HEADER, dump, load_v1
from .host import CoreOnly, RecipeHost
from .nodes import (CallNode, LiteralNode, Location, ModelNode, Node, ParameterNode, as_literal, check_parameters,
                    parameters, relocate, substitute, walk)
from .values import WeightMap, blocks, classes, layers


def dump_recipe(recipe: Node) -> str:
    """The recipe as ``.mecha`` text (version 1)."""
    return dump(recipe)


def _looks_like_text(value: str) -> bool:
    if "\n" in value:
        return True
    try:  # an existing file is a path even when its name starts like a recipe ("mecha runs/x.mecha")
        if os.path.isfile(value):
            return False
    except ValueError:  # a NUL byte: not a path
        pass
    return value.lstrip("\ufeff \t").startswith(("mecha ", "version ", "#"))


def load_recipe(text_or_path: str | os.PathLike[str], *, host: RecipeHost | None = None) -> Node:
    """A recipe from ``.mecha`` text or a file path (mecha v1, or either sd-mecha generation).

    ``host`` resolves method names and architecture aliases (``mecha_core.load_recipe`` passes
    the process-wide plugin host); without one only the core's operators are known. Relative
    model paths in a file are also looked up in the file's folder (after the models directory)
    when the recipe is merged.
    """
    source, base_dir = "<recipe>", None
    if isinstance(text_or_path, os.PathLike) or not _looks_like_text(text_or_path):
        path = os.fspath(text_or_path)
        # checked before it is read: not a FIFO or device, at most 64 MiB, not a model file
        text = read_text_file(path, what="recipe")
        source, base_dir = path, os.path.dirname(os.path.abspath(path))
    else:
        text = text_or_path
    text = text.removeprefix("\ufeff")
    first = next((ln.strip() for ln in text.split("\n") if ln.strip() and not ln.strip().startswith("#")), "")
    if first.startswith("version ") or first.startswith(_SD_MECHA_ERA_A) or first in ("dict",) \
            or first.startswith(("dict ", "dict\t")):
        from .sdmecha import load_sd_mecha

        return load_sd_mecha(text, source=source, base_dir=base_dir, host=host)
    return load_v1(text, source=source, base_dir=base_dir, host=host)


# The first instruction of an unversioned sd-mecha recipe (its 0.0.x releases).
_SD_MECHA_ERA_A = ('model "', 'merge "', 'parameter "', 'lora "', 'call "')


def as_fill(value: Any, base_dir: str | None = None, *, host: RecipeHost | None = None) -> Node:
    """A parameter's fill as a node: a node as it is, a value as a literal, a ``.mecha`` path
    as the recipe in it (read with ``host``), any other path as a model."""
    if isinstance(value, Node):
        return value
    if isinstance(value, (bool, int, float, WeightMap, tuple)):
        return as_literal(value)
    if not isinstance(value, (str, os.PathLike)):
        raise RecipeError(f"cannot fill a parameter with {value!r}; give a recipe, a model, a path or a value")
    path = os.fspath(value)
    if path.endswith(".mecha"):
        return load_recipe(path, host=host)
    return ModelNode(path, base_dir=base_dir)  # base_dir: where a relative path was given


def compose(template: Node | str | os.PathLike[str], fills: Mapping[str, Any] | None = None, /, *,
            host: RecipeHost | None = None, **more_fills: Any) -> Node:
    """Fill a template's parameters by name; returns the new recipe (the template is unchanged).

    Fills are given as keywords (``compose(t, alpha=0.5)``) or as a mapping (``compose(t,
    {"host": "x.safetensors"})`` fills a parameter named like a keyword of this function). A
    fill is a recipe (a node, or the path of a ``.mecha`` file), a model (a node, or a path;
    relative paths are resolved like any model path), or, for a parameter used as a
    hyperparameter, a value. Naming a parameter the template does not have is an error;
    parameters not filled stay parameters. ``host`` reads ``.mecha`` files (the template's, or a
    fill's); building needs no host otherwise (``mecha_core.compose`` passes the plugin host).
    """
    fills = {**(fills or {}), **more_fills}
    if not isinstance(template, Node):
        template = load_recipe(template, host=host)
    known = {p.name for p in parameters(template)}
    unknown = set(fills) - known
    if unknown:
        name = sorted(unknown)[0]
        hint = difflib.get_close_matches(name, sorted(known), n=1)
        raise RecipeError(f"the template has no parameter '{name}'" +
                          (f"; did you mean '{hint[0]}'?" if hint else
                           f"; its parameters are {', '.join(sorted(known)) or 'none'}"))
    # A relative path means a file beside the recipe it came from; fills from other folders are
    # rewritten relative to the template's folder, so equal paths in the result name one file.
    folder = next((n.base_dir for n in walk(template) if isinstance(n, ModelNode) and n.base_dir), None)
    composed = substitute(template, {k: relocate(as_fill(v, host=host), folder or os.getcwd())
                                     for k, v in fills.items()})
    check_parameters(composed)
    return composed


__all__ = [
    "CallNode", "CoreOnly", "LiteralNode", "Location", "ModelNode", "Node", "ParameterNode", "RecipeHost", "WeightMap",
    "as_fill", "blocks", "classes", "compose", "dump_recipe", "layers", "load_recipe", "parameters", "relocate",
    "substitute", "walk", "HEADER",
]
