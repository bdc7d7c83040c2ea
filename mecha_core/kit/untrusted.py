"""Reading data that comes from files (re-exported from :mod:`mecha_core.files`).

``loads_bounded(text)`` is ``json.loads`` for JSON found inside a file (a LoRA's metadata, an
adapter config): too long or too deeply nested is a one-line :class:`JSONLimitError` (a
``ValueError``), never a ``RecursionError``.
"""

from __future__ import annotations

from ..files import JSONLimitError, loads_bounded

__all__ = ["JSONLimitError", "loads_bounded"]
