"""Per-module LoRA-family algorithms: detect from the parameter names, check shapes, build ΔW.

Formulas follow the network's forward pass (LyCORIS 4.x, sd-scripts, PEFT), not LyCORIS's own
``get_diff_weight`` (which applies alpha/r twice for LoHa and LoKr). Deltas are computed in
float32. A module is described by :class:`ModuleChange`: the file keys it reads and a ``build``
function returning ΔW (shaped like the layer's weight) or a base-dependent operator.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Mapping

import attrs
from mecha_core.lazy import torch

from .keys import ModuleKeys
from .operators import BOFT, OFT, DoRA, GLoRA, IA3, WeightOperator, cayley
from .tables import Module

Tensors = Mapping[str, "torch.Tensor"]

#: Base-independent algorithms: their ΔW can be summed, scaled and merged like any delta.
ADDITIVE = ("lora", "loha", "lokr", "full")


def detect(params: Mapping[str, object]) -> str | None:
    """The algorithm of a module from its parameter names (ComfyUI/A1111/sd-mecha's rule)."""
    if "lora_up.weight" in params and "lora_down.weight" in params:
        return "lora"
    if "hada_w1_a" in params:
        return "loha"
    if "lokr_w1" in params or "lokr_w1_a" in params:
        return "lokr"
    if "oft_blocks" in params:
        return "oft"
    if "weight" in params and "on_input" in params:
        return "ia3"
    if "a1.weight" in params:
        return "glora"
    if "diff" in params or "diff_b" in params:
        return "full"
    return None


class ShapeMismatch(ValueError):
    """The module's tensors do not fit the layer the name points at."""


@attrs.frozen
class ModuleChange:
    """What one LoRA module does to its layer."""

    module: Module
    algorithm: str
    """``lora``, ``loha``, ``lokr``, ``full``, ``oft``, ``boft``, ``ia3`` or ``glora`` (+ ``dora``)."""
    sources: dict[str, str]
    """Canonical parameter name -> file key, for the tensors ``build`` reads."""
    build: Callable[[Tensors, str], torch.Tensor | WeightOperator] | None
    """From ``{canonical name: tensor}`` and the output key: ΔW or an operator (None: bias only)."""
    bias_build: Callable[[Tensors], torch.Tensor] | None = None
    """Full/diff modules with ``diff_b``: the bias delta."""
    scale: float | None = None
    """alpha / r set by the file's metadata (PEFT LoraConfig) for a LoRA module without an alpha
    tensor; ``None``: from the alpha tensor, or alpha = r."""

    @property
    def additive(self) -> bool:
        return self.algorithm in ADDITIVE


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _alpha(t: Tensors, rank: int) -> float:
    return float(t["alpha"].float().item()) if "alpha" in t else float(rank)


def lora_scale(t: Tensors, rank: int, fixed: float | None = None) -> float:
    """alpha / r of a LoRA module: an alpha tensor wins, then ``fixed`` (the file's metadata),
    else alpha = r."""
    if "alpha" in t or fixed is None:
        return _alpha(t, rank) / rank
    return fixed


def _shape_of(shapes: Mapping[str, tuple[int, ...]], name: str) -> tuple[int, ...]:
    return tuple(shapes[name])


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


# -- ΔW builders (un-multiplied; shaped like the layer) -------------------------------------------

def lora_delta(t: Tensors, shape: tuple[int, ...], fixed_scale: float | None = None) -> torch.Tensor:
    down, up = t["lora_down.weight"].float(), t["lora_up.weight"].float()
    rank = down.shape[0]
    scale = lora_scale(t, rank, fixed_scale)
    if "lora_mid.weight" in t:  # Tucker: ΔW[o,i,y,x] = Σ up[o,a] mid[a,b,y,x] down[b,i]
        mid = t["lora_mid.weight"].float()
        delta = torch.einsum("oa,abyx,bi->oiyx", _flat(up), mid, _flat(down))
    else:
        delta = _flat(up) @ _flat(down)
    return (scale * delta).reshape(shape)


def _tucker(core: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Σ_{p,q} core[p,q,...]·left[p,o]·right[q,i] -> [o, i, ...] (rank-first factors)."""
    return torch.einsum("pq...,po,qi->oi...", core, _flat(left), _flat(right))


def loha_delta(t: Tensors, shape: tuple[int, ...]) -> torch.Tensor:
    w1a, w1b = t["hada_w1_a"].float(), t["hada_w1_b"].float()
    w2a, w2b = t["hada_w2_a"].float(), t["hada_w2_b"].float()
    if "hada_t1" in t:  # Tucker: factors are rank-first [r, out] / [r, in]
        rank = w1a.shape[0]
        delta = _tucker(t["hada_t1"].float(), w1a, w1b) * _tucker(t["hada_t2"].float(), w2a, w2b)
    else:
        rank = w1b.shape[0]
        delta = (w1a @ _flat(w1b)) * (w2a @ _flat(w2b))
    return (_alpha(t, rank) / rank * delta).reshape(shape)


def _lokr_factors(t: Tensors, out: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    if "lokr_w1" in t:
        w1 = t["lokr_w1"].float()
    else:
        w1 = t["lokr_w1_a"].float() @ t["lokr_w1_b"].float()
    b = out // w1.shape[0]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"].float()
    elif "lokr_t2" in t:
        w2 = _tucker(t["lokr_t2"].float(), t["lokr_w2_a"].float(), t["lokr_w2_b"].float())
    else:
        w2 = t["lokr_w2_a"].float() @ _flat(t["lokr_w2_b"].float())
    if "lokr_w1_b" in t:
        rank = t["lokr_w1_b"].shape[0]
    elif "lokr_w2_b" in t:
        rank = t["lokr_w2_b"].shape[0]
    else:
        rank = None  # both full matrices: LyCORIS forces alpha = rank, i.e. scale 1
    scale = 1.0 if rank is None else _alpha(t, rank) / rank
    return w1, w2.reshape(b, -1), scale


def lokr_delta(t: Tensors, shape: tuple[int, ...]) -> torch.Tensor:
    # kron of W1 [a, c] with W2 flattened to [b, d·k·k] has the column order of [ab, cd, k, k]
    w1, w2, scale = _lokr_factors(t, shape[0])
    return (scale * torch.kron(w1, w2)).reshape(shape)


def full_delta(t: Tensors, shape: tuple[int, ...]) -> torch.Tensor:
    return t["diff"].float().reshape(shape)


_DELTAS = {"lora": lora_delta, "loha": loha_delta, "lokr": lokr_delta, "full": full_delta}


# -- shapes: (output features, flattened input features) each algorithm implies ---------------

def implied(algorithm: str, s: Mapping[str, tuple[int, ...]]) -> tuple[int | None, int | None]:
    """(out, in·k·k) the module's tensors imply; ``None`` where they do not say."""
    if algorithm == "lora":
        down, up = s["lora_down.weight"], s["lora_up.weight"]
        if "lora_mid.weight" in s:
            mid = s["lora_mid.weight"]
            return up[0], down[1] * _numel(mid[2:])
        return up[0], _numel(down[1:])
    if algorithm == "loha":
        if "hada_t1" in s:
            return s["hada_w1_a"][1], s["hada_w1_b"][1] * _numel(s["hada_t1"][2:])
        return s["hada_w1_a"][0], _numel(s["hada_w1_b"][1:])
    if algorithm == "lokr":
        a, c = (s["lokr_w1"] if "lokr_w1" in s else (s["lokr_w1_a"][0], s["lokr_w1_b"][1]))[:2]
        if "lokr_w2" in s:
            b, dkk = s["lokr_w2"][0], _numel(s["lokr_w2"][1:])
        elif "lokr_t2" in s:
            b, dkk = s["lokr_w2_a"][1], s["lokr_w2_b"][1] * _numel(s["lokr_t2"][2:])
        else:
            b, dkk = s["lokr_w2_a"][0], _numel(s["lokr_w2_b"][1:])
        return a * b, c * dkk
    if algorithm == "full":
        if "diff" in s:
            d = s["diff"]
            return d[0], _numel(d[1:])
        return s["diff_b"][0], None
    if algorithm in ("oft", "boft"):
        blocks = s["oft_blocks"]
        return blocks[-3] * blocks[-2], None
    if algorithm == "ia3":
        return None, None  # checked against the layer in _ia3
    if algorithm == "glora":
        b1, b2 = s["b1.weight"], s["b2.weight"]
        return b1[0], _numel(b2[1:])
    raise AssertionError(algorithm)


# -- building a module's change --------------------------------------------------------------------

def module_change(keys: ModuleKeys, module: Module, shapes: Mapping[str, tuple[int, ...]],
                  scale_of_rank: Callable[[int], float | None] | None = None) -> ModuleChange:
    """The change a module makes to ``module``; raises ShapeMismatch or ValueError (unknown algorithm).

    ``scale_of_rank`` gives alpha / r from the file's metadata for a LoRA module without an alpha
    tensor (PEFT files; ``None`` from it or no function: alpha = r).
    """
    params = keys.params
    algorithm = detect(params)
    if algorithm is None:
        raise ValueError(f"no known LoRA algorithm has the parameters {', '.join(sorted(params))}")
    s = {name: _shape_of(shapes, key) for name, key in params.items()}
    if algorithm == "oft" and len(s["oft_blocks"]) == 4:
        algorithm = "boft"
    out, in_flat = implied(algorithm, s)
    if (out is not None and out != module.out_features) or (in_flat is not None and in_flat != module.in_flat):
        raise ShapeMismatch(f"{keys.name}: its tensors make a [{out}, {in_flat}] change, the layer "
                            f"{module.key} is {list(module.shape)}")
    sources = dict(params)
    shape = module.shape

    if algorithm in _DELTAS:
        delta_fn = _DELTAS[algorithm]
        fixed = None
        if algorithm == "lora" and "alpha" not in params and scale_of_rank is not None:
            fixed = scale_of_rank(s["lora_down.weight"][0])
            if fixed is not None:
                delta_fn = functools.partial(lora_delta, fixed_scale=fixed)
        bias_build = None
        if algorithm == "full" and "diff_b" in params:
            bias_build = lambda t: t["diff_b"].float().reshape(-1)  # noqa: E731
        if algorithm == "full" and "diff" not in params:
            return ModuleChange(module, algorithm, sources, None, bias_build)
        if "dora_scale" in params:
            axis = _dora_axis(s["dora_scale"], module, keys.style)

            def build(t: Tensors, key: str) -> torch.Tensor | WeightOperator:
                return DoRA(key, delta_fn(t, shape), t["dora_scale"].float(), axis)

            return ModuleChange(module, algorithm + "+dora", sources, build, bias_build, fixed)
        return ModuleChange(module, algorithm, sources, lambda t, key: delta_fn(t, shape), bias_build, fixed)

    if algorithm in ("oft", "boft"):
        kohya_clamp = keys.style == "kohya-oft"
        if "rescale" in s and _numel(s["rescale"]) != module.out_features:
            raise ShapeMismatch(f"{keys.name}: rescale has {_numel(s['rescale'])} values for "
                                f"{module.out_features} rows")
        if algorithm == "boft":
            b = s["oft_blocks"][-1]
            if b % 2 or s["oft_blocks"][0] != int(math.log2(s["oft_blocks"][1])) + 1:
                raise ShapeMismatch(f"{keys.name}: oft_blocks {list(s['oft_blocks'])} is not a butterfly "
                                    f"layout [log2(n)+1, n, b, b] with b even")

        def build(t: Tensors, key: str) -> torch.Tensor | WeightOperator:
            alpha = float(t["alpha"].float().item()) if "alpha" in t else 0.0
            rotations = cayley(t["oft_blocks"].float(), alpha * module.out_features, kohya_clamp)
            rescale = t["rescale"].float() if "rescale" in t else None
            return (BOFT if algorithm == "boft" else OFT)(key, rotations, rescale)

        return ModuleChange(module, algorithm, sources, build)

    if algorithm == "ia3":
        n = _numel(s["weight"])
        if n not in (module.out_features, module.shape[1] if len(module.shape) > 1 else -1):
            raise ShapeMismatch(f"{keys.name}: {n} (IA)^3 scales fit neither the rows nor the columns of "
                                f"{list(module.shape)}")

        def build(t: Tensors, key: str) -> torch.Tensor | WeightOperator:
            on_input = bool(int(t["on_input"].item()))
            return IA3(key, t["weight"].float().reshape(-1), on_input)

        return ModuleChange(module, algorithm, sources, build)

    if algorithm == "glora":
        def build(t: Tensors, key: str) -> torch.Tensor | WeightOperator:
            a1, a2 = _flat(t["a1.weight"].float()), _flat(t["a2.weight"].float())
            rank = a2.shape[0]
            b_term = (_flat(t["b1.weight"].float()) @ _flat(t["b2.weight"].float())).reshape(shape)
            return GLoRA(key, a1 @ a2, b_term, _alpha(t, rank) / rank)

        return ModuleChange(module, algorithm, sources, build)
    raise AssertionError(algorithm)


def _dora_axis(scale_shape: tuple[int, ...], module: Module, style: str) -> int:
    """DoRA's norm axis from the magnitude's shape: 0 (per output row) or 1 (per input column)."""
    n = _numel(scale_shape)
    if style == "peft" or len(scale_shape) < 2:  # PEFT: [out] or [1, out, 1, 1], always per output
        axis = 0
    else:
        axis = 1 if scale_shape[0] == 1 and scale_shape[1] != 1 else 0
    expected = module.shape[axis] if axis < len(module.shape) else -1
    if n != expected:
        raise ShapeMismatch(f"dora_scale {list(scale_shape)} does not fit the layer {list(module.shape)}")
    return axis

