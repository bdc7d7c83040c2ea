"""The one output writer, for plugins that write files (re-exported from :mod:`mecha_core.output`).

``OutputFile(target, protect=..., what=...)`` checks the target before any work, writes to a
temporary file beside it and renames it into place on ``commit()``; ``write_text_atomically``
does the same for a text file. Every file mecha writes goes through these.
"""

from __future__ import annotations

from ..output import OutputFile, write_text_atomically

__all__ = ["OutputFile", "write_text_atomically"]
