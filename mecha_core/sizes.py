"""Byte counts for people: progress lines, ``mecha inspect``, warnings about leftover files."""

from __future__ import annotations


def format_bytes(n: float) -> str:
    """``512 B``, ``12 kB``, ``2.1 GB``: a byte count for people (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit in ("B", "kB") else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} GB"
