"""Keys that pass through a merge unchanged are copied file to file.

A key whose output is a stored input tensor in the same dtype (integer buffers taken from the
first input, keys a recipe passes on with ``fallback`` or ``--allow-missing``, a recipe that is
one model) is written with ``copy_file_range`` from the input file to the output: the bytes are
not read into tensors, converted or written by the process. The output's bytes are the same as
when the engine writes them (they are the stored bytes either way). A float key is still checked
for NaN/Inf first (one ``aminmax`` over the mapped input, no copy), as every written key is.
"""

from __future__ import annotations

from typing import Any

from .plan import Plan
from .safetensors_io import SafetensorsFile


class PassThrough:
    """Which output keys are a stored input tensor in the output's dtype, and copying them."""

    def __init__(self, plan: Plan):
        self.stored: dict[str, tuple[SafetensorsFile, str, Any]] = {}
        steps = plan.steps
        for key, info in plan.output.items():
            step = steps[-1]
            while step.source is None and key in step.take:
                step = steps[step.inputs[step.take[key]]]
            source = step.source
            if source is None or not source.direct or not hasattr(source, "stored"):
                continue
            if key not in source.keys or source.keys[key].dtype != info.dtype:
                continue
            file, name = source.stored(key)
            self.stored[key] = (file, name, source)

    def __contains__(self, key: str) -> bool:
        return key in self.stored

    def tensor(self, key: str) -> Any:
        """The input tensor (a view of the mapped file), for the checks before copying."""
        return self.stored[key][2].read(key)

    def copy(self, key: str, fd: int, position: int, start: int = 0, stop: int | None = None) -> bool:
        """Copy the key's (or its slice's) bytes to ``fd`` at ``position``; ``False`` when the
        kernel cannot, and the caller writes them itself."""
        file, name, _ = self.stored[key]
        return file.copy_to(name, fd, position, start, stop)
