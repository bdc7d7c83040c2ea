"""Extracting a PEFT adapter folder from a fine-tuned language model and its base.

``extract_lora(tuned, base, "adapter/")`` on models no image architecture's LoRA table fits (a
language model of any family, as files or Hugging Face folders) lands here. As
mergekit-extract-lora does:

* every 2-D weight outside the vocabulary (``embed_tokens``, ``lm_head``: the linear layers of
  attention, MLPs, experts) that differs becomes a LoRA module of rank ``rank`` (at most the
  layer's full rank), ΔW ≈ B @ A by SVD with the singular values split evenly
  (A = √S·Vᵀ, B = U·√S), alpha = rank, so the scale is 1; its bias, if it differs, is written
  whole as the module's ``base_layer.bias``;
* the vocabulary weights: ``embeddings="save"`` (default) writes them whole, as
  ``modules_to_save``; ``"lora"`` extracts ``embed_tokens`` as ``lora_embedding_A/B`` and
  ``lm_head`` as a LoRA module; ``"skip"`` leaves them out;
* other weights that differ (norms) are written whole as ``modules_to_save``, with every
  module of the same last name (PEFT matches ``modules_to_save`` by name and loads them all).

The folder holds ``adapter_model.safetensors`` (PEFT's key names under ``base_model.model.``)
and ``adapter_config.json`` (peft_type LORA, r, lora_alpha = r, rank_pattern/alpha_pattern for
modules of lower rank, target_modules and modules_to_save by their last name, as PEFT matches
them). It is written as a temporary folder beside the target and renamed into place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Any

from mecha_core.lazy import torch

from mecha_core.errors import MechaError, OutputError, PlanError
from mecha_core.kit import is_float, save, torch_dtype

from .adapter_config import PEFT_WRAPPER
from .lowrank import low_rank
from .peft_adapter import CONFIG_NAME, WEIGHTS_NAME

#: Where the vocabulary weights go: whole (modules_to_save), as LoRA modules, or nowhere.
EMBEDDING_MODES = ("save", "lora", "skip")

_VOCAB = re.compile(r"(^|\.)(embed_tokens|lm_head|wte|embed_in|embed_out)$")


def is_vocabulary(module: str) -> bool:
    """Token embeddings and the LM head (their rows are the vocabulary)."""
    return _VOCAB.search(module) is not None


def _embedding(module: str) -> bool:
    return not module.endswith(("lm_head", "embed_out"))


def _last(key: str) -> str:
    """The module's last name (``input_layernorm`` of ``model.layers.0.input_layernorm.weight``)."""
    return key.rsplit(".", 2)[-2] if key.count(".") >= 1 else key


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.equal(a, b))


def plan_modules(tuned: Any, base: Any, embeddings: str) -> tuple[list[str], list[str], list[str]]:
    """(LoRA modules, embedding LoRA modules, whole keys) from the two key tables; the keys
    of every module are in both, with one shape."""
    lora, embed_lora, whole = [], [], []
    for key, info in tuned.keys.items():
        if key not in base.keys:
            raise PlanError(f"key '{key}' is in {tuned.path} but not in {base.path}; extraction needs the "
                            f"same layout")
        if tuple(info.shape) != tuple(base.keys[key].shape):
            raise PlanError(f"key '{key}' has shape {list(info.shape)} in {tuned.path} but "
                            f"{list(base.keys[key].shape)} in {base.path}")
        if not is_float(info.dtype) or key.endswith(".bias"):
            continue  # integer buffers are no parameters; a bias is decided with its weight
        if not key.endswith(".weight"):
            if not _same(tuned.read(key), base.read(key)):
                raise PlanError(f"key '{key}' differs between {tuned.path} and {base.path}, but it is no module "
                                f"weight a PEFT adapter can hold (fused expert tensors are not extracted)")
            continue
        module = key.rsplit(".", 1)[0]
        if is_vocabulary(module):
            if embeddings == "save":
                whole.append(key)
            elif embeddings == "lora":
                (embed_lora if _embedding(module) else lora).append(module)
        elif len(info.shape) == 2:
            lora.append(module)
        else:
            whole.append(key)
    missing = [k for k in base.keys if k not in tuned.keys]
    if missing:
        raise PlanError(f"key '{missing[0]}' is in {base.path} but not in {tuned.path}; extraction needs the "
                        f"same layout")
    return lora, embed_lora, whole


def extract_peft(tuned: Any, base: Any, target: str, *, rank: int, ratio: float | None, dtype: str | None,
                 embeddings: str, seed: int, oversample: int, power_iterations: int) -> str:
    """Write the adapter folder ``target`` from the opened models (see the module doc)."""
    if embeddings not in EMBEDDING_MODES:
        raise MechaError(f"extract_lora: embeddings must be one of {', '.join(EMBEDDING_MODES)}; got {embeddings!r}")
    lora, embed_lora, whole = plan_modules(tuned, base, embeddings)
    out: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    saved: list[str] = []
    svd = dict(rank=rank, ratio=ratio, dtype=dtype, seed=seed, oversample=oversample,
               power_iterations=power_iterations)
    for module in lora:
        _extract_module(tuned, base, module, False, out, ranks, **svd)
    for module in embed_lora:
        _extract_module(tuned, base, module, True, out, ranks, **svd)
    # PEFT's modules_to_save names modules by their last name and expects every module of that
    # name in the file: one that differs puts all of its name there (the others unchanged)
    names = {_last(key) for key in whole if not _same(tuned.read(key), base.read(key))}
    for key in whole:
        if _last(key) not in names:
            continue
        t = tuned.read(key)
        out[PEFT_WRAPPER + key] = (t.to(torch_dtype(dtype)) if dtype else t).contiguous()
        saved.append(key.rsplit(".", 1)[0])
        bias_key = key.removesuffix(".weight") + ".bias"
        if bias_key in tuned.keys:
            out[PEFT_WRAPPER + bias_key] = tuned.read(bias_key).contiguous()
    if not out:
        raise PlanError(f"{tuned.path} and {base.path} do not differ; nothing to extract")
    config = adapter_config(ranks, saved, os.path.basename(os.path.normpath(base.path)))
    return write_folder(target, out, config, {"format": "pt"})


def _extract_module(tuned: Any, base: Any, module: str, embedding: bool, out: dict[str, torch.Tensor],
                    ranks: dict[str, int], *, rank: int, ratio: float | None, dtype: str | None, seed: int,
                    oversample: int, power_iterations: int) -> None:
    """Factorise one module's difference into ``out`` (PEFT names) and its rank into ``ranks``;
    a bias that differs is written whole, as the module's ``base_layer.bias`` (PEFT loads it
    into the wrapped layer; ``lora_bias`` would give every targeted layer a bias, and PEFT cannot
    merge that into the layers that have none)."""
    key = module + ".weight"
    t, b = tuned.read(key), base.read(key)
    out_dtype = torch_dtype(dtype) if dtype else t.dtype
    diff = t.to(torch.float32) - b.to(torch.float32)
    bias_key = module + ".bias"
    bias_diff = None
    if bias_key in tuned.keys and is_float(tuned.keys[bias_key].dtype):
        bias_diff = tuned.read(bias_key).to(torch.float32) - base.read(bias_key).to(torch.float32)
        bias_diff = bias_diff if bool(bias_diff.any()) else None
    if not bool(diff.any()) and bias_diff is None:
        return
    matrix = diff.T if embedding else diff  # PEFT's embedding delta is (B @ A)ᵀ
    full = min(matrix.shape)
    r = max(1, min(full, round(ratio * full))) if ratio is not None else min(full, rank)
    up, down = low_rank(matrix, r, seed=seed, oversample=oversample, power_iterations=power_iterations)
    name = PEFT_WRAPPER + module
    if embedding:
        if bias_diff is not None:
            raise PlanError(f"key '{bias_key}': an embedding has no bias a LoRA can hold")
        out[f"{name}.lora_embedding_A"] = down.to(out_dtype).contiguous()
        out[f"{name}.lora_embedding_B"] = up.to(out_dtype).contiguous()
    else:
        out[f"{name}.lora_A.weight"] = down.to(out_dtype).contiguous()
        out[f"{name}.lora_B.weight"] = up.to(out_dtype).contiguous()
        if bias_diff is not None:
            out[f"{name}.base_layer.bias"] = tuned.read(bias_key).contiguous()
    ranks[module] = r


def adapter_config(ranks: dict[str, int], saved: list[str], base_name: str) -> dict[str, Any]:
    """PEFT's LoraConfig fields for the extracted modules (as mergekit-extract-lora writes them)."""
    top = max(ranks.values(), default=1)
    others = {re.escape(m): r for m, r in ranks.items() if r != top}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": top,
        "lora_alpha": top,
        "rank_pattern": others,
        "alpha_pattern": dict(others),
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in ranks}),
        "modules_to_save": sorted({m.rsplit(".", 1)[-1] for m in saved}) or None,
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "bias": "none",
        "inference_mode": True,
    }


def check_target(target: str, inputs: tuple[str, ...]) -> str:
    """The adapter folder's absolute path, refused (before any work) when it is a file, holds
    other things than an adapter, or is (or holds) an input."""
    target = os.path.abspath(target)
    if target.endswith(".safetensors"):
        raise OutputError(f"{target}: a language-model LoRA is a PEFT adapter folder; give a folder path "
                          f"(it gets {WEIGHTS_NAME} and {CONFIG_NAME})")
    if os.path.exists(target) and not os.path.isdir(target):
        raise OutputError(f"{target}: exists and is not a folder")
    if os.path.isdir(target):
        extra = sorted(set(os.listdir(target)) - {WEIGHTS_NAME, CONFIG_NAME, "README.md"})
        if extra:
            raise OutputError(f"{target}: holds other files than an adapter (e.g. '{extra[0]}'); replacing it "
                              f"would delete them")
    for path in inputs:
        real = os.path.realpath(path)
        if real == os.path.realpath(target) or real.startswith(os.path.realpath(target) + os.sep):
            raise OutputError(f"{target}: is an input of the extraction ({path})")
    return target


def write_folder(target: str, tensors: dict[str, torch.Tensor], config: dict[str, Any],
                 metadata: dict[str, str]) -> str:
    """Write the adapter into a temporary folder beside ``target``, then rename it into place
    (an existing adapter folder there is replaced only then): never a partial folder."""
    parent = os.path.dirname(target) or "."
    os.makedirs(parent, exist_ok=True)
    temp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.mecha-{os.getpid()}-", suffix=".tmp", dir=parent)
    try:
        save(tensors, os.path.join(temp, WEIGHTS_NAME), metadata)
        with open(os.path.join(temp, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
        old = None
        if os.path.isdir(target):
            old = target + f".mecha-old-{os.getpid()}"
            os.replace(target, old)
        os.replace(temp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(temp, ignore_errors=True)
        raise OutputError(f"{target}: writing failed: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return target
