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
from ..builtin_plugins import install_hint
from .host import CoreOnly, RecipeHost, disabled_note
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
    """A recipe from ``.mecha`` text or a file path: mecha's own format, or one a plugin's
    recipe format reads (sd-mecha's, through mecha-sdmecha).

    ``host`` resolves method names and architecture aliases and holds the installed recipe
    formats (``mecha_core.load_recipe`` passes the process-wide plugin host); without one only
    the core's operators and format are known. Relative model paths in a file are also looked up
    in the file's folder (after the models directory) when the recipe is merged.
    """
    source, base_dir, path = "<recipe>", None, None
    if isinstance(text_or_path, os.PathLike) or not _looks_like_text(text_or_path):
        path = os.fspath(text_or_path)
        # checked before it is read: not a FIFO or device, at most 64 MiB, not a model file
        text = read_text_file(path, what="recipe")
        source, base_dir = path, os.path.dirname(os.path.abspath(path))
    else:
        text = text_or_path
    text = text.removeprefix("\ufeff")
    if _first_instruction(text).split(None, 1)[:1] != [HEADER.split()[0]]:
        fmt = _other_format(text, path, host)
        if fmt is not None:
            return fmt.read(text, source=source, base_dir=base_dir, host=host or CoreOnly())
        if _looks_like_sd_mecha(text):
            raise RecipeError("this is an sd-mecha recipe; reading it needs the recipe format 'sd-mecha'"
                              + (install_hint("recipe format", "sd-mecha") or
                                 " (from the mecha-sdmecha plugin, which is not loaded)") + disabled_note(host)
                              if host is not None else
                              "this is an sd-mecha recipe; reading it needs the mecha-sdmecha plugin's "
                              "recipe format (give a plugin host: mecha_core.load_recipe does)",
                              source=source, line=1)
    return load_v1(text, source=source, base_dir=base_dir, host=host)


def _first_instruction(text: str) -> str:
    return next((ln.strip() for ln in text.split("\n") if ln.strip() and not ln.strip().startswith("#")), "")


def _other_format(text: str, path: str | None, host: RecipeHost | None) -> Any:
    """The installed recipe format that detects ``text`` (None when none does; an error naming
    both when two do). A detector that raises is skipped: it must not break other formats."""
    registry = getattr(host, "recipe_formats", None)
    if registry is None:
        return None
    claimed = []
    for fmt in registry.values():
        try:
            if fmt.detect(text, path) is True:
                claimed.append(fmt)
        except (Exception, SystemExit):  # noqa: S112 (plugins check reports a raising detector)
            continue
    if len(claimed) > 1:
        names = " and ".join(f"'{f.name}'" for f in claimed)
        raise RecipeError(f"recipe formats {names} both claim this recipe; disable one plugin with "
                          f"MECHA_DISABLE_PLUGINS", source=path or "<recipe>", line=1)
    return claimed[0] if claimed else None


# The first instruction of an sd-mecha recipe: 1.x writes a version line, 0.0.x starts with one
# of these (only used for the hint when no installed format reads it)
_SD_MECHA_STARTS = ('version ', 'model "', 'merge "', 'parameter "', 'lora "', 'call "', 'dict ', 'dict\t')


def _looks_like_sd_mecha(text: str) -> bool:
    first = _first_instruction(text)
    return first == "dict" or first.startswith(_SD_MECHA_STARTS)


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
