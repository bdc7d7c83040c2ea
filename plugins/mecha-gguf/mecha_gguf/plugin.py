"""Entry point of the mecha-gguf plugin: only hook implementations live here.

Provides the file format ``gguf`` (:mod:`mecha_gguf.reader`): ``.gguf`` model paths open as a key
table whose quantised tensors read as float32 (:mod:`mecha_gguf.dequant`).
"""

from mecha_core import hookimpl
from mecha_core.specs import FileFormat

MECHA_PLUGIN_API = 1


def _open(path: str):
    from .reader import GGUFFile  # numpy and gguf load only when a GGUF file is opened

    return GGUFFile(path)


@hookimpl
def mecha_file_formats():
    return [FileFormat("gguf", (".gguf",), open=_open,
                       description="GGUF (llama.cpp, city96 Flux): F32/F16/BF16, Q4_0..Q8_0, Q2_K..Q6_K, "
                                   "dequantised on read")]
