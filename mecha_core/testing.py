"""Helpers for tests of mecha and of third-party plugins.

- :func:`host_with` builds a plugin host from chosen plugin modules (no entry-point discovery),
  and :func:`using` makes it the process-wide host for a ``with`` block.
- :func:`write_checkpoint` writes a small safetensors file.
- :func:`check_plugin` runs the contract checks every plugin should pass.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Mapping

import torch

from .engine.safetensors_io import save
from .method import MergeMethod
from .plugins import PluginHost, use_host


def host_with(*plugins: Any, names: list[str] | None = None, strict: bool = True) -> PluginHost:
    """A host holding exactly ``plugins`` (modules or objects with hook implementations)."""
    names = names or [getattr(p, "__name__", f"plugin{i}").split(".")[-2 if "." in getattr(p, "__name__", "") else -1]
                      for i, p in enumerate(plugins)]
    return PluginHost(list(zip(names, plugins)), autoload=False, strict=strict)


@contextlib.contextmanager
def using(*plugins: Any) -> Iterator[PluginHost]:
    """``with using(mecha_methods.plugin): ...`` — a host of chosen plugins, made current."""
    host = plugins[0] if len(plugins) == 1 and isinstance(plugins[0], PluginHost) else host_with(*plugins)
    with use_host(host):
        yield host


def write_checkpoint(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
                     metadata: Mapping[str, str] | None = None) -> str:
    """Write ``tensors`` as a safetensors file; returns the path."""
    save(tensors, path, metadata)
    return os.fspath(path)


def check_plugin(plugin: Any) -> list[str]:
    """Contract problems of a plugin module (empty when it is fine): it loads alone, its methods
    have documented defaults and docstrings, and its names are unique."""
    problems: list[str] = []
    host = host_with(plugin, strict=False)
    problems += host.problems()
    for method in host.merge_methods.values():
        assert isinstance(method, MergeMethod)
        if not method.doc:
            problems.append(f"merge method '{method.name}' has no docstring")
    return problems
