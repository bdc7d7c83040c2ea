"""The installed version of mecha (``mecha --version``, merged files' metadata), read without
importing the engine."""

from __future__ import annotations


def version() -> str:
    """The installed mecha-core version, or ``0.0.0+unknown`` when it is not installed."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("mecha-core")
    except PackageNotFoundError:
        return "0.0.0+unknown"
