"""Pausing the garbage collector while long-lived objects are built (plugin modules, key tables).

With torch imported, every full collection walks its ~170,000 objects; building thousands of
small objects that live as long as the process triggers such collections for nothing.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Iterator


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """No garbage collection inside the block; a collector the caller had paused stays paused."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
