"""mecha: merge model checkpoints from readable recipes, in bounded memory.

The public Python API::

    import mecha_core as mecha
    a, b = mecha.model("a.safetensors"), mecha.model("b.safetensors")
    mecha.merge(mecha.weighted_sum(a, b, alpha=0.3), output="out.safetensors")

Every registered merge method is available as ``mecha_core.<name>``. Plugin authors use
``hookimpl`` and ``merge_method`` from here (see docs/plugins.md). Importing this package loads
no plugin: they are discovered on first use.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from typing import TYPE_CHECKING, Any, Mapping

# torch warns at import when numpy is missing; numpy is not a dependency of mecha (nothing here
# uses it), so the warning would only alarm users
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)

# The names below are imported on first use (PEP 562), not here: `mecha --help` and plugins
# importing `hookimpl` must not pay for the engine and torch, which take seconds to import.
_EXPORTS = {
    "merge": ".api", "sweep": ".api", "MechaError": ".errors", "MergeContext": ".method", "MergeMethod": ".method",
    "merge_method": ".method", "Total": ".method", "TopK": ".method", "Then": ".method", "Selection": ".method",
    "CrossTotal": ".method", "Derived": ".method", "RowStack": ".method",
    "PLUGIN_API_VERSION": ".plugins", "discovering": ".plugins",
    "get_host": ".plugins", "hookimpl": ".plugins", "blocks": ".recipe", "classes": ".recipe",
    "dump_recipe": ".recipe", "layers": ".recipe",
    "literal": ".recipe.nodes", "model": ".recipe.nodes", "parameter": ".recipe.nodes",
    "DELTA": ".specs", "PARAM": ".specs", "WEIGHT": ".specs", "lazy_import": ".lazy",
    "diff": ".difference", "DiffResult": ".difference",
}

from . import operators  # noqa: F401,E402  (hands the core's operators -, +, *, | to the recipe nodes)

if TYPE_CHECKING:
    from .api import merge, sweep
    from .difference import DiffResult, diff
    from .errors import MechaError
    from .lazy import lazy_import
    from .method import (CrossTotal, Derived, MergeContext, MergeMethod, RowStack, Selection, Then,
                         TopK, Total, merge_method)
    from .plugins import PLUGIN_API_VERSION, get_host, hookimpl
    from .recipe import blocks, classes, dump_recipe, layers
    from .recipe.nodes import literal, model, parameter
    from .specs import DELTA, PARAM, WEIGHT

    from .plugins import PluginHost
    from .recipe.nodes import Node


def load_recipe(text_or_path: str | os.PathLike[str], *, host: PluginHost | None = None) -> Node:
    """A recipe from ``.mecha`` text or a file path: mecha's own format, or one an installed
    plugin's recipe format reads (sd-mecha's, with mecha-sdmecha).

    Method names, architecture aliases and recipe formats come from ``host`` (default: the
    process-wide plugin host). Relative model paths in a file are also looked up in the file's
    folder (after the models directory) when the recipe is merged.
    """
    from . import recipe
    from .plugins import get_host

    return recipe.load_recipe(text_or_path, host=host or get_host())


def compose(template: Node | str | os.PathLike[str], fills: Mapping[str, Any] | None = None, /, *,
            host: PluginHost | None = None, **more_fills: Any) -> Node:
    """Fill a template's parameters by name (see :func:`mecha_core.recipe.compose`); ``.mecha``
    files (the template's or a fill's) are read with ``host`` (default: the process-wide one)."""
    from . import recipe
    from .plugins import get_host

    return recipe.compose(template, fills, host=host or get_host(), **more_fills)


__all__ = [
    "CrossTotal", "DELTA", "Derived", "DiffResult", "MechaError", "MergeContext", "MergeMethod",
    "PARAM", "PLUGIN_API_VERSION", "RowStack", "WEIGHT",
    "blocks", "classes", "compose", "diff", "dump_recipe", "get_host", "hookimpl", "layers", "lazy_import",
    "literal", "load_recipe", "merge", "merge_method", "model", "parameter", "Selection", "sweep", "Then", "TopK",
    "Total",
]


def __getattr__(name: str) -> Any:
    """``mecha_core.<method>``: any registered merge method, looked up on first use."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value  # later reads are plain lookups
        return value
    if name.startswith("__") or importlib.util.find_spec(f"{__name__}.{name}") is not None:
        # a submodule not imported yet (`from . import hookspecs`): the import system imports it
        raise AttributeError(name)
    from .plugins import discovering, get_host

    if discovering():
        # a plugin being imported asked for a name mecha_core lacks: let it fail as an ImportError
        raise AttributeError(f"module 'mecha_core' has no attribute '{name}' (merge methods cannot "
                             f"be looked up while plugins are being loaded)")
    host = get_host()
    if name in host.merge_methods:
        return host.method(name)
    raise AttributeError(f"module 'mecha_core' has no attribute '{name}' (and no merge method of that name)")


def __dir__() -> list[str]:
    from .plugins import get_host

    return sorted(set(__all__) | set(get_host().merge_methods.names()))


__version__ = "0.1.0"
