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

from typing import Any

from .api import merge
from .errors import MechaError
from .method import MergeContext, MergeMethod, merge_method
from .plugins import PLUGIN_API_VERSION, discovering, get_host, hookimpl
from .recipe import blocks, classes, compose, dump_recipe, load_recipe
from .recipe.nodes import literal, model, parameter
from .specs import DELTA, PARAM, WEIGHT

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
