"""``lazy_import``: a module imported on first attribute use, so that importing a plugin (or
running ``mecha --help``) does not pay for torch, which takes seconds to import."""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any


class _LazyModule(types.ModuleType):
    """Stands for a module until an attribute is read; then imports it (the import system's own
    lock makes that safe from any thread) and caches what was read, so later reads are plain
    attribute lookups."""

    def __getattr__(self, attr: str) -> Any:
        value = getattr(importlib.import_module(self.__name__), attr)
        setattr(self, attr, value)
        return value

    def __repr__(self) -> str:
        state = "imported" if self.__name__ in sys.modules else "not imported yet"
        return f"<lazy module {self.__name__!r} ({state})>"


def lazy_import(name: str) -> types.ModuleType:
    """The module ``name`` if it is already imported, else a stand-in that imports it on first
    attribute use. Write ``torch = lazy_import("torch")`` instead of ``import torch``."""
    return sys.modules.get(name) or _LazyModule(name)


#: torch, imported when first used: ``from mecha_core.lazy import torch`` in place of ``import torch``
torch = lazy_import("torch")
