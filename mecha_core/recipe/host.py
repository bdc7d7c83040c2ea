"""What the recipe readers need from a plugin host, and the stand-in used when none is given.

The recipe package never imports the plugin host (mecha_core.plugins): the readers take a
host-like object, and ``mecha_core.load_recipe`` passes the process-wide one in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from ..errors import RecipeError
from .nodes import core_operators

if TYPE_CHECKING:
    from ..method import MergeMethod


class RecipeHost(Protocol):
    """Name lookups a recipe reader makes (``mecha_core.plugins.PluginHost`` is one).

    A host may also have ``merge_methods`` (supporting ``in`` and ``names()``) and
    ``disabled_note()``; the readers use them, when present, for better "unknown method" hints.
    """

    def method(self, name: str) -> "MergeMethod":
        """The merge method of that name; raises RecipeError when there is none."""
        ...

    def architecture(self, name: str) -> Any:
        """The architecture of that name or alias (it has ``.name``, ``.components``,
        ``.component_aliases``, ``.blocks``, ``.classes``, ``.keys``); raises RecipeError when
        there is none."""
        ...


class CoreOnly:
    """The host readers use when given none: the core's operators, and no architecture (map
    and model architectures stay as written, for the planner to resolve)."""

    def method(self, name: str) -> "MergeMethod":
        found = core_operators().get(name)
        if found is None:
            raise RecipeError(f"unknown merge method '{name}' (no plugin host was given to read this "
                              f"recipe: only the core's {', '.join(sorted(core_operators()))} are known)")
        return found

    def architecture(self, name: str) -> Any:
        raise RecipeError(f"unknown architecture '{name}' (no plugin host was given)")


def method_names(host: RecipeHost) -> list[str]:
    """Every method name ``host`` knows, for "did you mean" hints."""
    registry = getattr(host, "merge_methods", None)
    if registry is not None and hasattr(registry, "names"):
        return list(registry.names())
    return sorted(core_operators())


def disabled_note(host: RecipeHost) -> str:
    note = getattr(host, "disabled_note", None)
    return note() if callable(note) else ""


def canonical_arch(host: RecipeHost, name: str) -> str:
    """An installed architecture's own name for an alias (sd-mecha's ``sd1`` is ``sd1-ldm``), so
    maps written with either spelling are one value; unknown names stay as written (checked when
    the merge is planned)."""
    try:
        return host.architecture(name).name
    except RecipeError:
        return name


__all__ = ["CoreOnly", "RecipeHost", "canonical_arch", "disabled_note", "method_names"]
