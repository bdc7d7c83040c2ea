"""Reading recipes written by sd-mecha (``version 0.1.0`` and the older unversioned form)."""

from __future__ import annotations

from typing import Any

from ..errors import RecipeError


def load_sd_mecha(text: str, *, source: str = "<recipe>", base_dir: str | None = None, host: Any = None):
    raise RecipeError("sd-mecha recipes are not supported yet", source=source)
