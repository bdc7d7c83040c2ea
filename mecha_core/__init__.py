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

import os
from typing import Any, Mapping

from . import operators  # noqa: F401  (hands the core's operators to the recipe nodes)
from . import recipe as _recipe
from .api import merge
from .errors import MechaError
from .method import MergeContext, MergeMethod, merge_method
from .plugins import PLUGIN_API_VERSION, PluginHost, discovering, get_host, hookimpl
from .recipe import blocks, classes, dump_recipe
from .recipe.nodes import Node, literal, model, parameter
from .specs import DELTA, PARAM, WEIGHT


def load_recipe(text_or_path: str | os.PathLike[str], *, host: PluginHost | None = None) -> Node:
    """A recipe from ``.mecha`` text or a file path (mecha v1, or either sd-mecha generation).

    Method names and architecture aliases are resolved through ``host`` (default: the
    process-wide plugin host). Relative model paths in a file are also looked up in the file's
    folder (after the models directory) when the recipe is merged.
    """
    return _recipe.load_recipe(text_or_path, host=host or get_host())


def compose(template: Node | str | os.PathLike[str], fills: Mapping[str, Any] | None = None, /, *,
            host: PluginHost | None = None, **more_fills: Any) -> Node:
    """Fill a template's parameters by name (see :func:`mecha_core.recipe.compose`); ``.mecha``
    files (the template's or a fill's) are read with ``host`` (default: the process-wide one)."""
    return _recipe.compose(template, fills, host=host or get_host(), **more_fills)


__all__ = [
    "DELTA", "MechaError", "MergeContext", "MergeMethod", "PARAM", "PLUGIN_API_VERSION", "WEIGHT",
    "blocks", "classes", "compose", "dump_recipe", "get_host", "hookimpl", "literal",
    "load_recipe", "merge", "merge_method", "model", "parameter",
]


def __getattr__(name: str) -> Any:
    """``mecha_core.<method>``: any registered merge method, looked up on first use."""
    if name.startswith("__"):
        raise AttributeError(name)
    if discovering():
        # a plugin being imported asked for a name mecha_core lacks: let it fail as an ImportError
        raise AttributeError(f"module 'mecha_core' has no attribute '{name}' (merge methods cannot "
                             f"be looked up while plugins are being loaded)")
    host = get_host()
    if name in host.merge_methods:
        return host.method(name)
    raise AttributeError(f"module 'mecha_core' has no attribute '{name}' (and no merge method of that name)")


def __dir__() -> list[str]:
    return sorted(set(__all__) | set(get_host().merge_methods.names()))


__version__ = "0.1.0"
