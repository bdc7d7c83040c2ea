"""Reading and writing safetensors files: the engine's reader and writer helpers, for plugins.

Re-exported from the engine so a plugin that reads or writes files of its own (a LoRA extractor,
a converter tool) uses the same checks and byte layout as a merge, through a public name:

- :class:`SafetensorsFile`: a file opened by its header (``keys``: key -> ``TensorInfo``,
  ``metadata``), tensors read one at a time; a malformed file is a one-line error naming it.
- :func:`read_header`: ``(keys, metadata)`` of a file, without reading tensors.
- :func:`save`: write ``{key: tensor}`` (and string metadata) as a safetensors file, in the
  reference writer's key order.
- :data:`FLOAT_DTYPES`, :func:`is_float`, :func:`check_float_dtype`: the floating-point dtype
  names safetensors stores, and a one-line refusal of any other (for a ``--dtype`` option).
- :func:`torch_dtype`, :func:`dtype_name`: between a dtype name (``float16``) and ``torch.float16``.
- :func:`open_weights`: a model given as a file, a Hugging Face folder (sharded or not) or an
  index file, opened as one key table (``keys``, ``metadata``, ``read``, ``close``; ``path`` is
  the folder for a folder model).
"""

from __future__ import annotations

from ..engine.safetensors_io import (
    FLOAT_DTYPES,
    SafetensorsFile,
    check_float_dtype,
    dtype_name,
    is_float,
    read_header,
    save,
    torch_dtype,
)
from ..engine.folders import open_weights

__all__ = ["FLOAT_DTYPES", "SafetensorsFile", "check_float_dtype", "dtype_name", "is_float", "open_weights",
           "read_header", "save", "torch_dtype"]
