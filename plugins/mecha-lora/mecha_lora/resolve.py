"""From a LoRA file's header to the checkpoint keys it changes, for one architecture.

A file is matched against every module table this plugin knows; it belongs to the architecture
where the most modules resolve to a layer with matching shapes (ties go to the earlier entry of
:data:`~mecha_lora.tables.ARCHITECTURES`). Modules that match nothing there are an error listing a
few of them, unless the merge runs with ``--allow-missing`` (or the environment variable
``MECHA_LORA_ALLOW_UNKNOWN=1`` is set), in which case they are skipped with a warning.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any, Mapping

import attrs
from mecha_core.lazy import torch

from mecha_core.errors import PlanError
from mecha_core.specs import ConvertedKey, TensorInfo

from . import flux
from . import keys as keynames
from .adapter_config import AdapterScales
from .algorithms import ModuleChange, ShapeMismatch, module_change
from .operators import RowSlices, WeightOperator
from .tables import ARCHITECTURES, Module, table

ALLOW_UNKNOWN_ENV = "MECHA_LORA_ALLOW_UNKNOWN"


@attrs.frozen
class Resolution:
    arch: str
    changes: list[ModuleChange]
    unknown: list[tuple[str, str]]
    """(module name as in the file, why it was not used)."""
    duplicates: list[tuple[str, str]] = attrs.field(factory=list)
    """Pairs of file modules that change the same layer."""


def modules_of(header: Mapping[str, Any], style: str) -> tuple[list[keynames.ModuleKeys], list[str]]:
    if style == "kohya":
        return keynames.group_kohya(header), []
    return keynames.group_peft(header)


def resolve(header: Mapping[str, TensorInfo], style: str, arch: str,
            scales: AdapterScales | None = None) -> Resolution:
    """Match every module of the file against ``arch``'s table; ``scales``: a PEFT file's
    LoraConfig strengths (see :mod:`~mecha_lora.adapter_config`)."""
    tab = table(arch)
    groups, stray = modules_of(header, style)
    changes: list[ModuleChange] = []
    unknown = [(k, "not a LoRA parameter") for k in stray]
    seen: dict[Module, str] = {}
    duplicates = []
    shapes = {k: tuple(info.shape) for k, info in header.items()}
    for group in groups:
        module = tab.kohya(group.name) if style == "kohya" else tab.peft(group.name)
        if module is None:
            unknown.append((group.name, f"no {arch} layer has this name"))
            continue
        try:
            rule = None if scales is None else functools.partial(scales.scale, group.name)
            change = module_change(group, module, shapes, rule)
        except ShapeMismatch as exc:
            unknown.append((group.name, str(exc)))
            continue
        except ValueError as exc:
            unknown.append((group.name, str(exc)))
            continue
        if module in seen:
            duplicates.append((seen[module], group.name))
            continue
        seen[module] = group.name
        changes.append(change)
    return Resolution(arch, changes, unknown, duplicates)


def _fit(r: Resolution) -> tuple[int, int]:
    return len(r.changes), -len(r.unknown)


def _claims(r: Resolution) -> bool:
    """Whether a resolution may win a tie for its architecture: a Flux file changes the
    transformer (its CLIP-L modules alone fit SD1 and SDXL as well, and those come first)."""
    return r.arch not in flux.SIZES or any(c.module.key.startswith(flux.PREFIX) for c in r.changes)


def best_resolution(header: Mapping[str, TensorInfo], style: str,
                    scales: AdapterScales | None = None, prefer: str | None = None) -> Resolution | None:
    """The architecture the file fits best, or ``None`` when no module resolves anywhere. Ties
    go to ``prefer`` when it is among them (a text-encoder-only LoRA fits SD1 and SDXL's CLIP-L
    alike), else to the earlier architecture."""
    found = [resolve(header, style, arch, scales) for arch in ARCHITECTURES]
    best = max(found, key=_fit)  # max keeps the first of ties
    preferred = next((r for r in found if r.arch == prefer and _fit(r) == _fit(best) and _claims(r)), None)
    best = preferred or best
    return best if best.changes else None


def _allow_unknown() -> bool:
    return os.environ.get(ALLOW_UNKNOWN_ENV, "").strip().lower() in ("1", "true", "yes")


def checked_resolution(header: Mapping[str, TensorInfo], style: str, arch: str | None = None,
                       what: str = "this LoRA", scales: AdapterScales | None = None,
                       allow_unknown: bool = False) -> Resolution:
    """The resolution for ``arch`` (default: the best fit); raises ValueError when the file is
    for another architecture, PlanError for unknown modules (see the module doc)."""
    best = best_resolution(header, style, scales, prefer=arch)
    if best is None:
        raise ValueError("no module matches a known architecture")
    if arch is not None and best.arch != arch:
        raise ValueError(f"the file is for {best.arch}, not {arch}")
    if best.duplicates:
        a, b = best.duplicates[0]
        raise PlanError(f"{what}: modules '{a}' and '{b}' both change the same {best.arch} layer; "
                        f"remove one of them")
    if best.unknown:
        sample = "; ".join(f"'{n}' ({why})" for n, why in best.unknown[:3])
        message = (f"{what} has {len(best.unknown)} module(s) that change no {best.arch} weight, "
                   f"e.g. {sample}")
        if not (allow_unknown or _allow_unknown()):
            raise PlanError(message + "; use --allow-missing to skip them")
        warnings.warn(message + "; skipped", stacklevel=2)
    return best


# -- converted keys ---------------------------------------------------------------------------------

def _dtype(header: Mapping[str, TensorInfo], change: ModuleChange) -> str:
    for name in ("lora_up.weight", "hada_w1_a", "lokr_w2", "lokr_w2_a", "diff", "oft_blocks", "weight", "b1.weight"):
        if name in change.sources:
            return header[change.sources[name]].dtype
    return "float32"


def _assemble(key: str, shape: tuple[int, ...], parts: list[tuple[tuple[int, int] | None, Any]]) -> Any:
    if len(parts) == 1 and parts[0][0] is None:
        value = parts[0][1]
        return value if isinstance(value, WeightOperator) else value.reshape(shape)
    parts = [((0, shape[0]) if rows is None else rows, value) for rows, value in parts]
    if all(isinstance(v, torch.Tensor) for _, v in parts):
        out = torch.zeros(shape, dtype=torch.float32)  # rows no module changes stay zero
        for (start, end), value in parts:  # added: a whole-weight module and a slice of it both count
            out[start:end] += value.reshape(out[start:end].shape)
        return out
    slices = []
    for (start, end), value in parts:
        if isinstance(value, torch.Tensor):
            value = value.reshape((end - start,) + tuple(shape[1:]))
        slices.append((start, end, value))
    return RowSlices(key, slices)


def converted_keys(header: Mapping[str, TensorInfo], res: Resolution) -> dict[str, ConvertedKey]:
    """{checkpoint key: ConvertedKey} computing each key's ΔW (or operator) from the file."""
    weights: dict[str, list[ModuleChange]] = {}
    biases: dict[str, list[ModuleChange]] = {}
    for change in res.changes:
        if change.build is not None:
            weights.setdefault(change.module.key, []).append(change)
        if change.bias_build is not None:
            biases.setdefault(change.module.bias_key, []).append(change)
    out: dict[str, ConvertedKey] = {}
    for key, changes in weights.items():
        out[key] = _converted(header, key, changes, bias=False)
    for key, changes in biases.items():
        out[key] = _converted(header, key, changes, bias=True)
    return out


def _converted(header: Mapping[str, TensorInfo], key: str, changes: list[ModuleChange], bias: bool) -> ConvertedKey:
    first = changes[0].module
    shape = (first.key_shape[0],) if bias else first.key_shape
    sources = tuple(dict.fromkeys(k for c in changes for k in c.sources.values()))

    def compute(tensors: Mapping[str, torch.Tensor]) -> Any:
        parts = []
        for c in changes:
            t = {name: tensors[k] for name, k in c.sources.items()}
            value = c.bias_build(t) if bias else c.build(t, key)
            parts.append((c.module.rows, value))
        return _assemble(key, shape, parts)

    return ConvertedKey(TensorInfo(shape, _dtype(header, changes[0])), sources, compute)
