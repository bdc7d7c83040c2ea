"""Modules whose effect depends on the base weight (OFT, BOFT, DoRA, (IA)^3, GLoRA).

They cannot be a plain delta: a converter returns one of these "operators" in place of a tensor,
the engine passes it through untouched (it only calls ``.to(device=..., dtype=...)``), and
``apply_lora(base, lora)`` calls ``.apply(weight, strength)``. Any other use, e.g. arithmetic in
``add_difference`` or ``weighted_sum``, raises a :class:`MergeError` that says what to do.

Every operator computes in float32 whatever the work dtype (a Cayley inverse or a norm in fp16
loses too much) and returns the weight's dtype. ``strength`` (m) semantics, chosen so that m = 0
always leaves the weight unchanged and m = 1 is the trained result:

* OFT/BOFT: each rotation R becomes m·R + (1 − m)·I (LyCORIS and kohya do the same); a
  LyCORIS ``rescale`` becomes 1 + m·(rescale − 1).
* DoRA: W + m·(W_dora − W), with W_dora = dora_scale · V / ||V||, V = W + ΔW (LyCORIS's norm of
  V, not ComfyUI's norm of W). LyCORIS itself only interpolates the rescale and keeps V at full
  strength, so its m = 0 result is W + ΔW, which is surprising for a "strength" knob.
* (IA)^3: W ⊙ (1 + m·w).  GLoRA: W + m·ΔW(W).
"""

from __future__ import annotations

from typing import Any

from mecha_core.lazy import torch

from mecha_core.errors import MergeError


class WeightOperator:
    """Base class: a module's change that needs the weight it is applied to."""

    kind = "operator"
    key = "?"

    # -- what the engine and apply_lora use ------------------------------------------------
    def to(self, device: Any = None, dtype: Any = None) -> "WeightOperator":
        """Move the operator's tensors to ``device`` (they stay float32, see the module doc)."""
        moved = object.__new__(type(self))
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor) and device is not None:
                value = value.to(device=device)
            elif isinstance(value, WeightOperator):
                value = value.to(device=device)
            elif isinstance(value, list):
                value = [(a, b, v.to(device=device) if device is not None and hasattr(v, "to") else v)
                         for a, b, v in value]
            setattr(moved, name, value)
        return moved

    def apply(self, weight: torch.Tensor, strength: float) -> torch.Tensor:
        out = self._apply(weight.to(torch.float32), float(strength))
        return out.to(weight.dtype)

    def _apply(self, weight: torch.Tensor, m: float) -> torch.Tensor:
        raise NotImplementedError

    # -- every other use is a mistake: say so clearly ------------------------------------
    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise MergeError(f"key '{self.key}': the LoRA's {self.kind} module depends on the base weight, so "
                         f"it is not a plain delta; apply it with apply_lora(base, lora, strength=...)")

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _refuse
    __truediv__ = __rtruediv__ = __neg__ = __pow__ = __matmul__ = __rmatmul__ = _refuse

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        for a in list(args) + list((kwargs or {}).values()):
            if isinstance(a, WeightOperator):
                a._refuse()
        return NotImplemented

    def __getattr__(self, name: str) -> Any:
        # Tensor methods called on an operator (``lora.abs()``) get the same clear error.
        if name.startswith("_"):
            raise AttributeError(name)
        self._refuse()


def _broadcast(vector: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return vector.reshape(shape)


def cayley(blocks: torch.Tensor, constraint: float, always_clamp: bool) -> torch.Tensor:
    """Orthogonal blocks (I + Q)(I − Q)^-1 from Q = B − Bᵀ, with the COFT norm constraint."""
    q = blocks - blocks.transpose(-1, -2)
    norm = torch.linalg.vector_norm(q)
    if always_clamp:  # sd-scripts: the norm is clamped to the constraint, 0 means no rotation
        q = q * ((torch.clamp(norm, max=constraint) + 1e-8) / (norm + 1e-8))
    elif constraint > 0 and norm > constraint:  # LyCORIS: 0 means unconstrained
        q = q * (constraint / norm)
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    return (eye + q) @ torch.linalg.inv(eye - q)


def _towards_identity(r: torch.Tensor, m: float) -> torch.Tensor:
    eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
    return m * r + (1 - m) * eye


def _rescaled(out: torch.Tensor, rescale: torch.Tensor | None, m: float) -> torch.Tensor:
    if rescale is None:
        return out
    factor = 1 + m * (rescale.reshape(-1) - 1)
    return out * _broadcast(factor, out.dim(), 0)


class OFT(WeightOperator):
    """Block-diagonal orthogonal rotation of the output channels: W_k' = R_kᵀ W_k."""

    kind = "OFT"

    def __init__(self, key: str, rotations: torch.Tensor, rescale: torch.Tensor | None):
        self.key, self.rotations, self.rescale = key, rotations, rescale

    def _apply(self, weight: torch.Tensor, m: float) -> torch.Tensor:
        r = _towards_identity(self.rotations, m)
        n, b, _ = r.shape
        blocks = weight.reshape(n, b, -1)
        out = torch.einsum("knm,knc->kmc", r, blocks).reshape(weight.shape)
        return _rescaled(out, self.rescale, m)


class BOFT(WeightOperator):
    """Butterfly OFT: log2(n) + 1 stages of block rotations on regrouped output channels."""

    kind = "BOFT"

    def __init__(self, key: str, rotations: torch.Tensor, rescale: torch.Tensor | None):
        self.key, self.rotations, self.rescale = key, rotations, rescale

    def _apply(self, weight: torch.Tensor, m: float) -> torch.Tensor:
        stages, _, b, _ = self.rotations.shape
        half = b // 2
        x = weight.reshape(weight.shape[0], -1)
        cols = x.shape[1]
        for i in range(stages):
            r = _towards_identity(self.rotations[i], m)
            h = (2 ** i) * half
            # pair rows that are h apart, rotate each group of b rows, undo the pairing
            x = x.reshape(-1, 2, h, cols).transpose(1, 2).reshape(-1, b, cols)
            x = torch.einsum("kij,kjc->kic", r, x)
            x = x.reshape(-1, h, 2, cols).transpose(1, 2).reshape(-1, cols)
        return _rescaled(x.reshape(weight.shape), self.rescale, m)


class DoRA(WeightOperator):
    """Weight decomposition: magnitude · (W + ΔW) / ||W + ΔW|| along the output or input axis."""

    kind = "DoRA"

    def __init__(self, key: str, delta: torch.Tensor, magnitude: torch.Tensor, axis: int):
        self.key, self.delta, self.magnitude, self.axis = key, delta, magnitude, axis

    #: Added to the norm: LyCORIS's guard against a zero row (PEFT adds none).
    guarded = True

    def _apply(self, weight: torch.Tensor, m: float) -> torch.Tensor:
        v = weight + self.delta.reshape(weight.shape)
        dims = [d for d in range(v.dim()) if d != self.axis]
        norm = torch.linalg.vector_norm(v, dim=dims, keepdim=True)
        if self.guarded:
            norm = norm + torch.finfo(torch.float32).eps
        decomposed = _broadcast(self.magnitude.reshape(-1), v.dim(), self.axis) * v / norm
        return weight + m * (decomposed - weight)


class PeftDoRA(DoRA):
    """DoRA as PEFT merges an adapter folder's modules (``merge_and_unload``): the norm of
    W + ΔW without LyCORIS's epsilon."""

    guarded = False


class Replace(WeightOperator):
    """A whole weight a PEFT adapter carries (``modules_to_save``, or an embedding's saved
    ``base_layer``), plus the LoRA change of that module when it has one: the weight becomes
    ``new + ΔW``; strength m gives W + m·(new + ΔW − W)."""

    kind = "full-weight (modules_to_save)"

    def __init__(self, key: str, new: torch.Tensor, delta: torch.Tensor | None):
        self.key, self.new, self.delta = key, new, delta

    def _apply(self, weight: torch.Tensor, m: float) -> torch.Tensor:
        target = self.new.to(torch.float32).reshape(weight.shape)
        if self.delta is not None:
            target = target + self.delta.reshape(weight.shape)
        return target if m == 1 else weight + m * (target - weight)


class IA3(WeightOperator):
    """(IA)^3: scale output rows (or input columns) by 1 + w."""

    kind = "(IA)^3"

    def __init__(self, key: str, scale: torch.Tensor, on_input: bool):
        self.key, self.scale, self.on_input = key, scale, on_input

    def _apply(self, weight: torch.Tensor, m: float) -> torch.Tensor:
        axis = 1 if self.on_input else 0
        return weight * (1 + m * _broadcast(self.scale.reshape(-1), weight.dim(), axis))


class GLoRA(WeightOperator):
    """GLoRA: ΔW = scale · (W ×_in (A1 A2) + B1 B2); the first term depends on W."""

    kind = "GLoRA"

    def __init__(self, key: str, a: torch.Tensor, b_term: torch.Tensor, scale: float):
        self.key, self.a, self.b_term, self.scale = key, a, b_term, scale

    def _apply(self, weight: torch.Tensor, m: float) -> torch.Tensor:
        mixed = torch.einsum("oi...,ij->oj...", weight, self.a)
        return weight + m * self.scale * (mixed + self.b_term.reshape(weight.shape))


class RowSlices(WeightOperator):
    """A fused weight (SDXL CLIP-G ``in_proj_weight``) whose row slices are changed separately.

    ``parts`` holds (start, end, change); a change is a delta tensor or another operator.
    """

    kind = "fused"

    def __init__(self, key: str, parts: list[tuple[int, int, Any]]):
        self.key, self.parts = key, parts
        self.kind = "/".join(sorted({p.kind for _, _, p in parts if isinstance(p, WeightOperator)}))

    def _apply(self, weight: torch.Tensor, m: float) -> torch.Tensor:
        out = weight.clone()
        for start, end, change in self.parts:
            rows = weight[start:end]
            if isinstance(change, WeightOperator):
                out[start:end] = change._apply(rows, m)
            else:
                out[start:end] = rows + m * change.reshape(rows.shape)
        return out
