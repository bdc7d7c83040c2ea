"""TIES's merge of one slice as one C loop (``mecha_core.kit.native``), bit for bit the eager
path of :func:`mecha_methods.sparse._ties_in_place` followed by ``* alpha`` and ``+ base``.

Eager torch makes about twenty passes over a slice's memory for it (the deltas, the trims, the
vote, its sign, the agreeing parts, their sum and count, the mean, the scale, the sum with the
base): 7.5 ms for 699,050 elements of base + 3 on the bench machine, against 0.9 ms for this
loop, which works through the slice in blocks that stay in the L1 cache. Every float operation
is the eager path's, in its order, rounded as it rounds (``-ffp-contract=off``): the trim keeps x
unless ``-lam <= x <= lam`` (torch's ``hardshrink``), the vote adds the trimmed deltas left to
right (or their signs), the agreeing part is ``max(t·s, 0)``, the mean ``(Σ + 0.0) / max(n, 1)``.
A slice where some vote is not finite is left to the caller (``None``), as the eager path
leaves it to the definition.
"""

from __future__ import annotations

import ctypes
from typing import Any

from mecha_core.lazy import torch

from mecha_core.kit import native

#: the most models one call takes (the block's trimmed deltas live on the stack: 16 × 4 KiB)
MAX_MODELS = 16

SOURCE = r"""
#include <stdint.h>

#define BLOCK 1024
#define MAX_MODELS 16

/* torch's hardshrink: x unless -lam <= x <= lam (NaN kept), else +0.0 */
static void trim(int64_t n, const float *restrict m, const float *restrict b, float lam, float *restrict t) {
    for (int64_t j = 0; j < n; j++) {
        float d = m[j] - b[j];
        t[j] = (d >= -lam && d <= lam) ? 0.0f : d;
    }
}

static inline float sign_of(float x) { return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f); }

/* TIES of one flat slice of n elements, models m[0..count-1] over base b, into out:
   each delta m[i] - b trimmed with lam_before[i] before element cut[i] and lam_after[i] from it,
   the sign elected by the sum of the trimmed deltas (count_vote = 0) or of their signs (1),
   the agreeing deltas' mean, times alpha when scale, plus b. Returns 1 (out unspecified) when
   some element's vote (count_vote = 0) or trimmed delta (count_vote = 1) is not finite. */
int mecha_ties(int64_t n, int64_t count, const float *b, const float *const *m,
               const float *lam_before, const float *lam_after, const int64_t *cut,
               int count_vote, int scale, float alpha, float *out) {
    float t[MAX_MODELS][BLOCK];
    float s[BLOCK], total[BLOCK], agreeing[BLOCK];
    int bad = 0;
    if (count < 1 || count > MAX_MODELS) return 1;
    for (int64_t lo = 0; lo < n; lo += BLOCK) {
        int64_t len = n - lo < BLOCK ? n - lo : BLOCK;
        const float *bb = b + lo;
        for (int64_t i = 0; i < count; i++) {
            int64_t c = cut[i] - lo;  /* the first element of the block past the cut */
            c = c < 0 ? 0 : (c > len ? len : c);
            trim(c, m[i] + lo, bb, lam_before[i], t[i]);
            trim(len - c, m[i] + lo + c, bb + c, lam_after[i], t[i] + c);
        }
        /* the vote, added left to right as the eager path adds it */
        if (!count_vote) {
            for (int64_t j = 0; j < len; j++) s[j] = t[0][j];
            for (int64_t i = 1; i < count; i++)
                for (int64_t j = 0; j < len; j++) s[j] += t[i][j];
            for (int64_t j = 0; j < len; j++) {
                bad |= !(s[j] - s[j] == 0.0f);  /* inf - inf and NaN are NaN */
                s[j] = sign_of(s[j]);
            }
        } else {
            for (int64_t j = 0; j < len; j++) s[j] = sign_of(t[0][j]);
            for (int64_t i = 0; i < count; i++)
                for (int64_t j = 0; j < len; j++) bad |= !(t[i][j] - t[i][j] == 0.0f);
            for (int64_t i = 1; i < count; i++)
                for (int64_t j = 0; j < len; j++) s[j] += sign_of(t[i][j]);
            for (int64_t j = 0; j < len; j++) s[j] = sign_of(s[j]);
        }
        /* the agreeing deltas max(t·s, 0): their sum and how many */
        for (int64_t j = 0; j < len; j++) {
            float p = t[0][j] * s[j];
            p = p > 0.0f ? p : 0.0f;
            total[j] = p;
            agreeing[j] = sign_of(p);
        }
        for (int64_t i = 1; i < count; i++)
            for (int64_t j = 0; j < len; j++) {
                float p = t[i][j] * s[j];
                p = p > 0.0f ? p : 0.0f;
                total[j] += p;
                agreeing[j] += sign_of(p);
            }
        float *o = out + lo;
        for (int64_t j = 0; j < len; j++) {
            float mean = (total[j] * s[j] + 0.0f) / (agreeing[j] < 1.0f ? 1.0f : agreeing[j]);
            if (scale) mean = mean * alpha;
            o[j] = mean + bb[j];
        }
    }
    return bad;
}
"""

_TIES_ARGUMENTS = [ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_void_p]


def _ties_function() -> Any:
    """The compiled ``mecha_ties``, or ``None`` where native kernels are off or cannot be built."""
    return native.function("mecha_ties", SOURCE, "mecha_ties", ctypes.c_int, _TIES_ARGUMENTS)


def available() -> bool:
    """Whether the compiled TIES loop is in use (``native.why_not("mecha_ties")`` says why not)."""
    return _ties_function() is not None


def ties(base: torch.Tensor, models: list[torch.Tensor], selections: list[Any], start: int, vote: str,
         alpha: float) -> torch.Tensor | None:
    """``base + alpha · merged`` of TIES (trim top-k, no weights) for one flat slice starting at
    flat index ``start``, bit for bit the eager path; ``None`` where it does not apply (the
    kernel is unavailable, an input is not a contiguous float32 CPU tensor of the base's shape, a
    selection has no threshold, more than :data:`MAX_MODELS` models, or a vote is not finite)."""
    fn = _ties_function()
    if fn is None or not 1 <= len(models) <= MAX_MODELS:
        return None
    if not plain_float32(base, *models):
        return None
    if any(s.threshold is None for s in selections):
        return None
    count = len(models)
    before, after = (ctypes.c_float * count)(), (ctypes.c_float * count)()
    cuts = (ctypes.c_int64 * count)()
    for i, s in enumerate(selections):
        # up to the last tie kept: |x| >= threshold, i.e. |x| above the float32 just below it
        # (a threshold of 0 or NaN keeps everything there); after it |x| > threshold
        before[i] = _float32_below(s.threshold) if s.threshold > 0 else float("-inf")
        after[i] = s.threshold
        cuts[i] = s.last_tie + 1 - start
    pointers = (ctypes.c_void_p * count)(*[m.data_ptr() for m in models])
    out = torch.empty_like(base)
    scale = alpha != 1
    bad = fn(base.numel(), count, base.data_ptr(), pointers, before, after, cuts, int(vote == "count"),
             int(scale), float(alpha) if scale else 1.0, out.data_ptr())
    return None if bad else out


def _float32_below(value: float) -> float:
    """The largest float32 below the positive float32 ``value``: its bit pattern minus one."""
    bits = torch.tensor([value], dtype=torch.float32).view(torch.int32) - 1
    return float(bits.view(torch.float32)[0])


def plain_float32(*tensors: Any) -> bool:
    """Every one a contiguous float32 CPU tensor of the first's shape: what a kernel here reads
    and writes by pointer."""
    first = tensors[0]
    return all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type == "cpu"
               and t.is_contiguous() and t.shape == first.shape for t in tensors)
