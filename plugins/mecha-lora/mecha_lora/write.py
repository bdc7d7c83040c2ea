"""Writing kohya-format LoRA files: extracted from two checkpoints, or merged from several LoRAs.

Both stream their inputs key by key through memory-mapped :class:`SafetensorsFile` readers; the
output (a LoRA is small) is collected and written through :class:`mecha_core.output.OutputFile`
(a temporary file beside the target, renamed into place), so a failure never leaves a partial
file, and the output is checked (not an input, not a folder or device) before any work.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from mecha_core.lazy import torch

from mecha_core.errors import MechaError, OutputError, PlanError
from mecha_core.kit import OutputFile, SafetensorsFile, check_float_dtype, is_float, open_weights, save, torch_dtype

from . import extract_peft, flux
from . import keys as keynames
from .adapter_config import adapter_scales
from .algorithms import ModuleChange
from .lowrank import OVERSAMPLE, POWER_ITERATIONS, low_rank
from .resolve import Resolution, checked_resolution
from .tables import ARCHITECTURES, MODELSPEC_IDS, Module, table

#: Rank used by merge_loras for modules that cannot be concatenated exactly (LoHa, LoKr, full,
#: Tucker LoCon) when ``rank`` is not given.
FALLBACK_RANK = 32


def _is_conv_kernel(module: Module) -> bool:
    return len(module.shape) == 4 and module.shape[2] * module.shape[3] > 1


def _factor_tensors(module: Module, up: torch.Tensor, down: torch.Tensor,
                    dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """kohya tensors for up [out, r] @ down [r, in·k·k] with alpha = r (scale 1)."""
    rank = down.shape[0]
    conv = len(module.shape) == 4
    name = module.kohya_name
    return {
        f"{name}.lora_down.weight": down.reshape((rank,) + module.shape[1:]).to(dtype).contiguous(),
        f"{name}.lora_up.weight": (up.reshape(up.shape[0], rank, 1, 1) if conv else up).to(dtype).contiguous(),
        f"{name}.alpha": torch.tensor(float(rank), dtype=dtype),
    }


def _write(tensors: dict[str, torch.Tensor], out: OutputFile, metadata: dict[str, str]) -> str:
    """Write through mecha's one output writer (checked target, temporary file, rename)."""
    with out:
        try:
            save(tensors, out.path, metadata)
        except OSError as exc:
            raise OutputError(f"{out.given}: writing failed: {exc.strerror or exc}") from None
        return out.commit()


def _metadata(arch: str, rank: str, extra: dict) -> dict[str, str]:
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": rank,
        "ss_network_alpha": rank,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_IDS[arch],
        "mecha_lora": json.dumps(extra, sort_keys=True),
    }


# -- extract ----------------------------------------------------------------------------------------

def _stored_key(file: SafetensorsFile, key: str) -> str | None:
    if key in file.keys:
        return key
    legacy = key.replace(".transformer.text_model.", ".transformer.", 1)  # old SD1 text encoder names
    bfl = key.removeprefix(flux.PREFIX)  # a Flux transformer saved alone by Black Forest Labs: no prefix
    return next((k for k in (legacy, bfl) if k in file.keys), None)


def _detect_arch(tuned: SafetensorsFile, base: SafetensorsFile) -> str | None:
    """The image architecture whose LoRA table fits both models best; ``None`` when no layer of
    any fits (a language model: extracted as a PEFT adapter folder)."""
    counts = {}
    for arch in ARCHITECTURES:
        counts[arch] = sum(1 for m in table(arch).modules
                           if _stored_key(tuned, m.key) and _stored_key(base, m.key)
                           and tuple(tuned.keys[_stored_key(tuned, m.key)].shape) == m.key_shape)
    best = max(ARCHITECTURES, key=lambda a: counts[a])
    return best if counts[best] else None


def _rank_for(module: Module, rank: int, ratio: float | None, conv_rank: int | None) -> int:
    full = min(module.out_features, module.in_flat)
    if _is_conv_kernel(module) and conv_rank is not None:  # 0: no convs, with --ratio too
        return min(full, conv_rank)
    if ratio is not None:
        return max(1, min(full, round(ratio * full)))
    return min(full, rank)


def extract_lora(tuned: str | os.PathLike[str], base: str | os.PathLike[str], output: str | os.PathLike[str], *,
                 rank: int = 16, ratio: float | None = None, conv_rank: int | None = None,
                 dtype: str | None = None, seed: int = 0, oversample: int = OVERSAMPLE,
                 power_iterations: int = POWER_ITERATIONS, embeddings: str = "save") -> str:
    """Write a kohya LoRA approximating ``tuned − base``; returns the output path.

    Language models (files or Hugging Face folders no image architecture's table fits) give a
    PEFT adapter folder at ``output`` instead (:mod:`mecha_lora.extract_peft`): LoRA modules
    for the linear layers, and the vocabulary weights by ``embeddings``: ``"save"`` (whole, as
    ``modules_to_save``), ``"lora"`` (LoRA modules) or ``"skip"``.

    Every layer of the detected architecture's LoRA table (LoRA, LoCon convs, text encoders;
    SDXL CLIP-G q/k/v as row slices of ``in_proj_weight``) gets a rank-``rank`` factorisation of
    its difference by randomized SVD, written with alpha = rank. Layers with no difference are
    left out. Defaults: ``rank=16``; ``ratio`` (when given, overrides ``rank``): the fraction of
    each layer's full rank min(out, in·k·k) to keep; ``conv_rank``: the rank of 3x3 convs
    (default: ``rank``, or ``ratio`` when given; 0 leaves convs out); ``dtype``: the dtype of ``tuned``'s weights;
    ``seed``, ``oversample`` (10) and ``power_iterations`` (4) tune the randomized SVD.
    Applying the result to ``base`` with strength 1 gives ≈ ``tuned``.
    """
    tuned, base = os.fspath(tuned), os.fspath(base)
    if ratio is not None and not 0 < ratio <= 1:
        raise MechaError(f"extract_lora: ratio must be in (0, 1]; got {ratio}")
    if ratio is None and rank < 1:
        raise MechaError(f"extract_lora: rank must be at least 1; got {rank}")
    if conv_rank is not None and conv_rank < 0:
        raise MechaError(f"extract_lora: conv_rank must be 0 (no convs) or more; got {conv_rank}")
    if dtype is not None:  # a LoRA's factors are floats: int8 would round them all to 0
        check_float_dtype(dtype, "extract_lora: dtype")
    # the output is checked before any input is read: a file for an image model's kohya LoRA,
    # a folder (any other name) for a language model's PEFT adapter
    as_folder = not os.fspath(output).endswith(".safetensors") and not os.path.isfile(output)
    target = extract_peft.check_target(os.fspath(output), (tuned, base)) if as_folder else None
    out_file = None if as_folder and os.path.isdir(output) else OutputFile(output, protect=(tuned, base))
    a = open_weights(tuned)
    try:
        b = open_weights(base)
    except BaseException:
        a.close()
        raise
    try:
        arch = _detect_arch(a, b)
        if arch is None:  # a language model: a PEFT adapter folder
            if target is None:
                raise PlanError(f"{tuned} and {base} share no layer of {' or '.join(ARCHITECTURES)} that a kohya "
                                f"LoRA can target; for a language model the LoRA is a PEFT adapter folder: "
                                f"name a folder, not {os.fspath(output)}")
            return extract_peft.extract_peft(a, b, target, rank=rank, ratio=ratio, dtype=dtype,
                                             embeddings=embeddings, seed=seed, oversample=oversample,
                                             power_iterations=power_iterations)
        out_file = out_file or OutputFile(output, protect=(tuned, base))  # an existing folder: refused here
        out: dict[str, torch.Tensor] = {}
        for module in table(arch).modules:
            ka, kb = _stored_key(a, module.key), _stored_key(b, module.key)
            if ka is None or kb is None:
                continue
            if a.keys[ka].shape != b.keys[kb].shape:
                raise PlanError(f"key '{module.key}' has shape {list(a.keys[ka].shape)} in {tuned} but "
                                f"{list(b.keys[kb].shape)} in {base}")
            if tuple(a.keys[ka].shape) != module.key_shape:
                raise PlanError(f"{tuned}: key '{module.key}' has shape {list(a.keys[ka].shape)}, "
                                f"{arch} expects {list(module.key_shape)}")
            r = _rank_for(module, rank, ratio, conv_rank)
            if r == 0:
                continue
            diff = a.read(ka).to(torch.float32) - b.read(kb).to(torch.float32)
            if module.rows is not None:
                diff = diff[module.rows[0]:module.rows[1]]
            diff = diff.reshape(module.out_features, module.in_flat)
            if not bool(diff.any()):
                continue
            up, down = low_rank(diff, r, seed=seed, oversample=oversample, power_iterations=power_iterations)
            out_dtype = torch_dtype(dtype) if dtype else a.read(ka).dtype
            out.update(_factor_tensors(module, up, down, out_dtype))
        if not out:
            raise PlanError(f"{tuned} and {base} do not differ in any layer a LoRA can target; nothing to extract")
        extra = {"extracted_from": [os.path.basename(tuned), os.path.basename(base)],
                 "rank": rank if ratio is None else None, "ratio": ratio, "conv_rank": conv_rank}
        used = max(t.shape[0] for k, t in out.items() if k.endswith(".lora_down.weight"))
        return _write(out, out_file, _metadata(arch, str(used), extra))
    finally:
        a.close()
        b.close()


# -- merge ------------------------------------------------------------------------------------------

def _open_lora(path: str) -> tuple[SafetensorsFile, Resolution, str]:
    file = SafetensorsFile(path)
    try:
        keys = list(file.keys)
        if keynames.is_kohya(keys):
            style = "kohya"
        elif keynames.is_peft(keys):
            style = "peft"
        else:
            raise PlanError(f"{path}: not a LoRA file (neither kohya/LyCORIS nor PEFT key names)")
        try:
            scales = adapter_scales(file.metadata, path) if style == "peft" else None
            res = checked_resolution(file.keys, style, what=path, scales=scales)
        except ValueError as exc:
            raise PlanError(f"{path}: {exc}") from None
        return file, res, style
    except BaseException:
        file.close()
        raise


def _plain(change: ModuleChange) -> bool:
    return change.algorithm == "lora" and "lora_mid.weight" not in change.sources


def _tensors(file: SafetensorsFile, change: ModuleChange) -> dict[str, torch.Tensor]:
    return {name: file.read(key) for name, key in change.sources.items()}


def merge_loras(inputs: Sequence[str | os.PathLike[str]], output: str | os.PathLike[str], *,
                weights: Sequence[float] | None = None, rank: int | None = None,
                fallback_rank: int = FALLBACK_RANK, dtype: str | None = None, seed: int = 0) -> str:
    """Merge LoRA files into one kohya LoRA whose ΔW = Σ weights[i] · ΔW_i; returns the path.

    Defaults: ``weights`` all 1; ``rank=None`` concatenates the factors of plain LoRA/LoCon
    modules (exact; the ranks add up) and re-factorises other additive modules (LoHa, LoKr,
    Tucker LoCon, full) to ``fallback_rank`` (32) by SVD; a ``rank`` re-factorises every module
    to that rank. ``dtype``: the first input's. Base-dependent modules (OFT, BOFT, DoRA, (IA)^3,
    GLoRA) have no delta and raise an error: apply those with apply_lora instead.
    """
    paths = [os.fspath(p) for p in inputs]
    if not paths:
        raise MechaError("merge_loras: give at least one LoRA file")
    weights = [1.0] * len(paths) if weights is None else [float(w) for w in weights]
    if len(weights) != len(paths):
        raise MechaError(f"merge_loras: {len(weights)} weight(s) for {len(paths)} LoRA file(s)")
    if rank is not None and rank < 1:
        raise MechaError(f"merge_loras: rank must be at least 1; got {rank}")
    if dtype is not None:
        check_float_dtype(dtype, "merge_loras: dtype")
    out_file = OutputFile(output, protect=paths)  # checked before any work
    opened = []
    try:
        for p in paths:
            opened.append(_open_lora(p))
        arch = opened[0][1].arch
        for (_file, res, _), p in zip(opened, paths):
            if res.arch != arch:
                raise PlanError(f"{p} is a LoRA for {res.arch}, {paths[0]} for {arch}; they cannot be merged")
        by_module: dict[Module, list[tuple[int, ModuleChange]]] = {}
        for i, (_, res, _) in enumerate(opened):
            for change in res.changes:
                if not change.additive:
                    raise PlanError(f"{paths[i]}: module '{change.module.kohya_name}' is {change.algorithm.upper()}, "
                                    f"which depends on the base weight and has no delta; apply it with apply_lora")
                if change.bias_build is not None:
                    raise PlanError(f"{paths[i]}: module '{change.module.kohya_name}' changes a bias (diff_b), "
                                    f"which a LoRA file cannot hold")
                by_module.setdefault(change.module, []).append((i, change))
        first_file = opened[0][0]
        first_key = next(iter(first_file.keys))
        out_dtype = torch_dtype(dtype) if dtype else (
            torch_dtype(first_file.keys[first_key].dtype) if is_float(first_file.keys[first_key].dtype)
            else torch.float16)
        out: dict[str, torch.Tensor] = {}
        ranks = []
        order = {m: n for n, m in enumerate(table(arch).all_modules)}
        for module in sorted(by_module, key=order.__getitem__):
            changes = by_module[module]
            if rank is None and all(_plain(c) for _, c in changes):
                ups, downs = [], []
                for i, change in changes:
                    t = _tensors(opened[i][0], change)
                    down = t["lora_down.weight"].to(torch.float32)
                    r = down.shape[0]
                    if "alpha" in t or change.scale is None:
                        alpha = float(t["alpha"].float().item()) if "alpha" in t else float(r)
                        factor = weights[i] * alpha / r
                    else:  # a PEFT file's metadata fixed alpha / r
                        factor = weights[i] * change.scale
                    ups.append(t["lora_up.weight"].to(torch.float32).reshape(module.out_features, r) * factor)
                    downs.append(down.reshape(r, module.in_flat))
                up, down = torch.cat(ups, dim=1), torch.cat(downs, dim=0)
            else:
                delta = torch.zeros(module.out_features, module.in_flat)
                for i, change in changes:
                    t = _tensors(opened[i][0], change)
                    delta += weights[i] * change.build(t, module.key).reshape(delta.shape)
                up, down = low_rank(delta, rank or fallback_rank, seed=seed)
            ranks.append(down.shape[0])
            out.update(_factor_tensors(module, up, down, out_dtype))
        if not out:
            raise PlanError(f"{', '.join(paths)}: no module to merge")
        extra = {"merged_from": [os.path.basename(p) for p in paths], "weights": weights, "rank": rank}
        return _write(out, out_file, _metadata(arch, str(max(ranks)), extra))
    finally:
        for file, _, _ in opened:
            file.close()
