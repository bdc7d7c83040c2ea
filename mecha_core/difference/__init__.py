"""``mecha diff``: how models differ, block by block (see docs/diff.md).

:func:`diff` streams the models through their compiled plans and returns a
:class:`DiffResult`; :mod:`.table` renders it for the terminal, :mod:`.plot` as a figure.
"""

from __future__ import annotations

from .compute import diff, merge_report
from .result import SCHEMA, DiffResult, Measures, PairDiff

__all__ = ["SCHEMA", "DiffResult", "Measures", "PairDiff", "diff", "merge_report"]
