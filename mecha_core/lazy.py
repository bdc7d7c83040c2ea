"""``lazy_import``: a module imported on first attribute use, so that importing a plugin (or
running ``mecha --help``) does not pay for torch, which takes seconds to import."""

from __future__ import annotations

import gc
import importlib
import sys
import types
from typing import Any


class _LazyModule(types.ModuleType):
    """Stands for a module until an attribute is read; then imports it (the import system's own
    lock makes that safe from any thread) and caches what was read, so later reads are plain
    attribute lookups."""

    def __getattr__(self, attr: str) -> Any:
        module = sys.modules.get(self.__name__) or _import(self.__name__)
        value = getattr(module, attr)
        setattr(self, attr, value)
        return value

    def __repr__(self) -> str:
        state = "imported" if self.__name__ in sys.modules else "not imported yet"
        return f"<lazy module {self.__name__!r} ({state})>"


def import_without_collections(name: str) -> types.ModuleType:
    """``importlib.import_module(name)`` with Python's cyclic garbage collector paused, then
    every object alive frozen out of its reach (:func:`gc.freeze`).

    Importing torch creates about a million objects, nearly all of them kept for the life of the
    process, and the collector, run every 700 new objects, walks the older ones again and again:
    a third of torch's import time (``import torch``: 1.8-2.1 s, 1.2-1.3 s with the collector
    paused, on this project's 2-core machines). Frozen, they are never walked again; the few
    reference cycles made while importing are kept instead of freed (kilobytes). The lazy
    modules import this way in the ``mecha`` command's process only (:func:`_import`)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return importlib.import_module(name)
    finally:
        if enabled:
            gc.freeze()
            gc.enable()


def _import(name: str) -> types.ModuleType:
    from .exiting import freezes_at_exit

    # the mecha command's process freezes its objects at exit anyway (exiting.py); a program
    # that imports mecha keeps its own collector as it set it
    return import_without_collections(name) if freezes_at_exit() else importlib.import_module(name)


def lazy_import(name: str) -> types.ModuleType:
    """The module ``name`` if it is already imported, else a stand-in that imports it on first
    attribute use. Write ``torch = lazy_import("torch")`` instead of ``import torch``."""
    return sys.modules.get(name) or _LazyModule(name)


#: torch, imported when first used: ``from mecha_core.lazy import torch`` in place of ``import torch``
torch = lazy_import("torch")
