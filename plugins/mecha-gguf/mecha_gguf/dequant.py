"""GGML block formats turned into float32, in torch.

Each function takes the raw blocks of one tensor (a uint8 tensor ``[n_blocks, block_bytes]``) and
returns ``[n_blocks, block_elements]`` float32, following ggml's block layouts (the same ones
``gguf.quants`` and ``ggml-quants.c`` read): a float16 scale ``d`` (and minimum ``m`` or ``dmin``)
per block, 4/5/8-bit codes, and for the K-quants (256 elements per super-block) 16 or 8
sub-block scales packed in 4 or 6 bits.
"""

from __future__ import annotations

from typing import Callable

import torch

QK_K = 256


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """Little-endian float16 fields ``[n, 2]`` -> float32 ``[n, 1]``."""
    return raw.contiguous().view(torch.float16).float()


def _shifted(x: torch.Tensor, shifts: list[int], dim: int) -> torch.Tensor:
    """``x >> s`` for each shift, stacked as a new axis at ``dim``."""
    return torch.stack([x >> s for s in shifts], dim=dim)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Low nibbles of a block's bytes first, then the high ones: ``[n, bytes] -> [n, 2 * bytes]``."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def q8_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, :2]) * b[:, 2:].contiguous().view(torch.int8).float()


def q4_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, :2]) * (_nibbles(b[:, 2:]).to(torch.int16) - 8).float()


def q4_1(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, :2]) * _nibbles(b[:, 4:]).float() + _f16(b[:, 2:4])


def _high_bits(qh: torch.Tensor) -> torch.Tensor:
    """The 32 fifth bits of a Q5 block (a little-endian uint32) as 0/1 ``[n, 32]``."""
    bits = _shifted(qh, list(range(8)), dim=-1) & 1  # [n, 4 bytes, 8 bits], bit i of byte j is element 8j+i
    return bits.reshape(qh.shape[0], 32)


def q5_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 6:]) | (_high_bits(b[:, 2:6]) << 4)
    return _f16(b[:, :2]) * (q.to(torch.int16) - 16).float()


def q5_1(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 8:]) | (_high_bits(b[:, 4:8]) << 4)
    return _f16(b[:, :2]) * q.float() + _f16(b[:, 2:4])


def q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales, qs = b[:, :QK_K // 16], b[:, QK_K // 16:QK_K // 16 + QK_K // 4]
    d, dmin = _f16(b[:, -4:-2]), _f16(b[:, -2:])
    dl = (d * (scales & 0xF).float()).reshape(n, QK_K // 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, QK_K // 16, 1)
    q = _shifted(qs.reshape(n, -1, 32), [0, 2, 4, 6], dim=-2) & 3  # [n, 2, 4, 32]
    return (dl * q.reshape(n, QK_K // 16, 16).float() - ml).reshape(n, QK_K)


def q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs = b[:, :QK_K // 8], b[:, QK_K // 8:QK_K // 8 + QK_K // 4]
    scales, d = b[:, -14:-2], _f16(b[:, -2:])
    low = _shifted(scales[:, :8], [0, 4], dim=1).reshape(n, 16)
    high = _shifted(scales[:, 8:], [0, 2, 4, 6], dim=1).reshape(n, 16)
    sc = ((low & 0x0F) | ((high & 0x03) << 4)).to(torch.int16) - 32
    dl = (d * sc.float()).reshape(n, 16, 1)
    ql = (_shifted(qs.reshape(n, -1, 32), [0, 2, 4, 6], dim=-2).reshape(n, 16, 16) & 3).to(torch.int16)
    qh = (_shifted(hmask.reshape(n, -1, 32), list(range(8)), dim=-2).reshape(n, 16, 16) & 1) ^ 1
    return (dl * (ql - (qh.to(torch.int16) << 2)).float()).reshape(n, QK_K)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and mins packed in 12 bytes (Q4_K, Q5_K)."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float(), mn.float()


def q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    q = _shifted(b[:, 16:].reshape(n, -1, 32), [0, 4], dim=-2) & 0x0F  # [n, 4, 2, 32]
    return ((d * sc).reshape(n, 8, 1) * q.reshape(n, 8, 32).float() - (dmin * mn).reshape(n, 8, 1)).reshape(n, QK_K)


def q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    qh, qs = b[:, 16:16 + QK_K // 8], b[:, 16 + QK_K // 8:]
    ql = (_shifted(qs.reshape(n, -1, 32), [0, 4], dim=-2) & 0x0F).reshape(n, 8, 32)
    high = (_shifted(qh.reshape(n, -1, 32), list(range(8)), dim=-2) & 1).reshape(n, 8, 32)
    q = (ql | (high << 4)).float()
    return ((d * sc).reshape(n, 8, 1) * q - (dmin * mn).reshape(n, 8, 1)).reshape(n, QK_K)


def q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh = b[:, :QK_K // 2], b[:, QK_K // 2:QK_K // 2 + QK_K // 4]
    scales = b[:, QK_K // 2 + QK_K // 4:-2].contiguous().view(torch.int8).float()
    d = (_f16(b[:, -2:]) * scales).reshape(n, QK_K // 16, 1)
    low = (_shifted(ql.reshape(n, -1, 64), [0, 4], dim=-2) & 0x0F).reshape(n, -1, 32)
    high = (_shifted(qh.reshape(n, -1, 32), [0, 2, 4, 6], dim=-2) & 0x03).reshape(n, -1, 32)
    q = ((low | (high << 4)).to(torch.int16) - 32).reshape(n, QK_K // 16, -1).float()
    return (d * q).reshape(n, QK_K)


#: GGML type name -> (elements per block, bytes per block, dequantiser)
BLOCK_TYPES: dict[str, tuple[int, int, Callable[[torch.Tensor], torch.Tensor]]] = {
    "Q4_0": (32, 18, q4_0), "Q4_1": (32, 20, q4_1), "Q5_0": (32, 22, q5_0), "Q5_1": (32, 24, q5_1),
    "Q8_0": (32, 34, q8_0), "Q2_K": (QK_K, 84, q2_k), "Q3_K": (QK_K, 110, q3_k), "Q4_K": (QK_K, 144, q4_k),
    "Q5_K": (QK_K, 176, q5_k), "Q6_K": (QK_K, 210, q6_k),
}
#: GGML type name -> the torch dtype the bytes already are
PLAIN_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
#: rows dequantised at once: bounds the float32 working memory of one read
CHUNK_BLOCKS = 1 << 16


def dequantize(raw: torch.Tensor, type_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor of ``shape`` from its raw GGUF bytes (a flat uint8 tensor)."""
    if type_name in PLAIN_TYPES:
        return raw.view(PLAIN_TYPES[type_name]).reshape(shape)
    elements, size, fn = BLOCK_TYPES[type_name]
    blocks = raw.reshape(-1, size)
    out = torch.empty(blocks.shape[0], elements, dtype=torch.float32)
    for start in range(0, blocks.shape[0], CHUNK_BLOCKS):  # the file's pages are touched a slice at a time
        out[start:start + CHUNK_BLOCKS] = fn(blocks[start:start + CHUNK_BLOCKS])
    return out.reshape(shape)
