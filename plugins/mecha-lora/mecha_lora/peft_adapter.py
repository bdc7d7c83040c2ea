"""PEFT adapters on any model (a language model of any family, a generic decoder ...).

A PEFT adapter folder holds ``adapter_model.safetensors`` and ``adapter_config.json`` (the
LoraConfig). Its keys name the adapted model's own modules under PEFT's wrapper prefix
``base_model.model.``: ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``
changes the model key ``model.layers.0.self_attn.q_proj.weight``. So the target of each module
is the model key of that path: no table is needed, and a module that is not in the model is
refused when the merge is planned (the delta has a key the weights do not have, named).

What a file may hold, per module path ``P`` (with PEFT's adapter name, ``lora_A.default.weight``,
or without it, as ``save_pretrained`` writes):

* ``P.lora_A.weight`` [r, in] / ``P.lora_B.weight`` [out, r]: ΔW = scale · B @ A (transposed
  with ``fan_in_fan_out``, GPT-2's Conv1D layout); ``P.lora_B.bias`` (``lora_bias``) changes
  ``P.bias`` by scale · bias;
* ``P.lora_embedding_A`` [r, vocab] / ``P.lora_embedding_B`` [dim, r]: ΔW = scale · (B @ A)ᵀ;
* ``P.lora_magnitude_vector`` (DoRA, ``use_dora``): the weight becomes
  m / ||W + ΔW||_row · (W + ΔW), as PEFT's ``merge_and_unload`` computes it (per output row;
  per column of the stored weight with ``fan_in_fan_out``). DoRA on embeddings is refused;
* whole weights: ``P.weight`` / ``P.bias`` (``modules_to_save``), ``P.base_layer.weight`` (the
  embedding PEFT saves beside an embedding LoRA) and ``P.modules_to_save.weight``: the model's
  weight is replaced (plus the module's LoRA change, when it has one).

scale = lora_alpha / r (``use_rslora``: lora_alpha / sqrt(r)); ``alpha_pattern`` gives matching
modules their own alpha and r is the module's rank from its tensors (what ``rank_pattern``
sets), see :mod:`~mecha_lora.adapter_config`. The config is ``adapter_config.json`` beside the
weights; without one, a diffusers ``lora_adapter_metadata`` entry in the file's metadata; with
neither, alpha = r (scale 1). A config without ``lora_alpha`` has PEFT's default, 8.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from typing import Any, Callable, Mapping

import attrs
from mecha_core.lazy import torch

from mecha_core.errors import PlanError
from mecha_core.kit import loads_bounded
from mecha_core.specs import ConvertedKey, TensorInfo

from .adapter_config import METADATA_KEY, PEFT_WRAPPER, ComponentConfig, adapter_scales, component_config
from .operators import PeftDoRA, Replace
from .resolve import best_resolution

#: The files of a PEFT adapter folder (``PeftModel.save_pretrained``).
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

#: LoraConfig's default ``lora_alpha`` (PEFT 0.21), used when adapter_config.json has none.
PEFT_DEFAULT_ALPHA = 8.0

#: Largest adapter_config.json read (real ones are a few KB; rank/alpha patterns per layer stay small).
CONFIG_SIZE_LIMIT = 16 * 1024 * 1024

_ADAPTER = r"(?:\.[A-Za-z0-9_\-]+)?"  # PEFT's adapter name inside a key, dropped by save_pretrained
_PATTERNS = (
    ("linear", re.compile(rf"^(?P<module>.+)\.lora_(?P<ab>[AB]){_ADAPTER}\.(?P<param>weight|bias)$")),
    ("embedding", re.compile(rf"^(?P<module>.+)\.lora_embedding_(?P<ab>[AB]){_ADAPTER}$")),
    ("magnitude", re.compile(rf"^(?P<module>.+)\.lora_magnitude_vector{_ADAPTER}(?:\.weight)?$")),
    ("whole", re.compile(rf"^(?P<module>.+)\.(?:base_layer|modules_to_save{_ADAPTER})\.(?P<param>weight|bias)$")),
    ("whole", re.compile(r"^(?P<module>.+)\.(?P<param>weight|bias)$")),
)


@attrs.frozen
class AdapterSettings:
    """What of an adapter's LoraConfig the change of its modules depends on."""

    scales: ComponentConfig
    """lora_alpha, use_rslora and alpha_pattern."""
    fan_in_fan_out: bool = False
    """The adapted layers store their weight as [in, out] (GPT-2's Conv1D)."""
    source: str = "no config (alpha = r)"
    """Where the settings were read, for messages."""


def config_file(path: str) -> str:
    """Where an adapter's ``adapter_config.json`` is: in its folder, or beside its file."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    return os.path.join(folder, CONFIG_NAME)


def read_settings(path: str | None, metadata: Mapping[str, str] | None, what: str) -> AdapterSettings:
    """The adapter's settings from ``adapter_config.json`` beside ``path``, else the file's
    ``lora_adapter_metadata``, else alpha = r. A malformed config is a one-line PlanError."""
    where = config_file(path) if path else None
    if where is not None and os.path.isfile(where):
        fields = _read_config(where)
        peft_type = fields.get("peft_type")
        if peft_type not in (None, "LORA"):
            raise PlanError(f"{where}: peft_type {peft_type!r} is not a LoRA; only LoRA adapters are applied")
        fan = fields.get("fan_in_fan_out") or False
        if not isinstance(fan, bool):
            raise PlanError(f"{where}: field 'fan_in_fan_out' must be true or false, not {fan!r}")
        scales = component_config(fields, "", where, source=CONFIG_NAME, default_alpha=PEFT_DEFAULT_ALPHA)
        return AdapterSettings(scales, fan, where)
    found = adapter_scales(metadata, what)
    if found is not None and "" in found.configs:
        return AdapterSettings(found.configs[""], False, f"{what}: {METADATA_KEY}")
    return AdapterSettings(ComponentConfig(None))


def _read_config(where: str) -> dict[str, Any]:
    try:
        size = os.path.getsize(where)
        if size > CONFIG_SIZE_LIMIT:
            raise PlanError(f"{where}: {size:,} bytes; too large for an adapter config "
                            f"(at most {CONFIG_SIZE_LIMIT:,})")
        with open(where, "rb") as f:
            data = loads_bounded(f.read().decode("utf-8"))
    except OSError as exc:
        raise PlanError(f"{where}: cannot read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise PlanError(f"{where}: not valid JSON ({' '.join(str(exc).splitlines())[:120]})") from None
    if not isinstance(data, dict):
        raise PlanError(f"{where}: an adapter config must be a JSON object (a LoraConfig), not {type(data).__name__}")
    return data


# -- grouping keys into modules ----------------------------------------------------------------------

@attrs.define
class AdapterModule:
    """The tensors of one adapted module, by role."""

    path: str
    """The module's path in the model (``model.layers.0.self_attn.q_proj``)."""
    kind: str | None = None
    """``linear`` or ``embedding`` once a LoRA pair is seen."""
    a: str | None = None
    """The file key of lora_A / lora_embedding_A."""
    b: str | None = None
    """The file key of lora_B / lora_embedding_B."""
    b_bias: str | None = None
    """The file key of lora_B's bias (``lora_bias``)."""
    magnitude: str | None = None
    """The file key of DoRA's magnitude vector."""
    whole: dict[str, str] = attrs.field(factory=dict)
    """``weight``/``bias`` -> the file key of a whole replacement tensor."""


def _set(module: AdapterModule, field: str, key: str, what: str) -> None:
    if getattr(module, field) is not None:
        raise PlanError(f"{what}: keys '{getattr(module, field)}' and '{key}' are both the {field} "
                        f"of module '{module.path}' (two adapters in one file?); keep one")
    setattr(module, field, key)


def _role(name: str) -> tuple[str, re.Match[str]] | None:
    """What a key (without PEFT's wrapper prefix) is: the first pattern that matches it."""
    for role, pattern in _PATTERNS:
        m = pattern.match(name)
        if m is not None:
            return role, m
    return None


def group(keys: Mapping[str, Any], what: str = "PEFT adapter") -> tuple[dict[str, AdapterModule], list[str]]:
    """The file's modules by path, and the keys that are no PEFT LoRA tensor."""
    modules: dict[str, AdapterModule] = {}
    stray = []
    for key in keys:
        found = _role(key.removeprefix(PEFT_WRAPPER))
        if found is None:
            stray.append(key)
            continue
        role, m = found
        module = modules.setdefault(m["module"], AdapterModule(m["module"]))
        if role in ("linear", "embedding"):
            if module.kind not in (None, role):
                raise PlanError(f"{what}: module '{module.path}' has both lora_A/B and lora_embedding_A/B")
            module.kind = role
            if m["ab"] == "A" and role == "linear" and m["param"] == "bias":
                stray.append(key)  # lora_A has no bias in PEFT
            elif m["ab"] == "A":
                _set(module, "a", key, what)
            elif role == "linear" and m["param"] == "bias":
                _set(module, "b_bias", key, what)
            else:
                _set(module, "b", key, what)
        elif role == "magnitude":
            _set(module, "magnitude", key, what)
        else:
            if m["param"] in module.whole:
                raise PlanError(f"{what}: keys '{module.whole[m['param']]}' and '{key}' both replace "
                                f"'{module.path}.{m['param']}'; keep one")
            module.whole[m["param"]] = key
    return modules, stray


# -- the converter ------------------------------------------------------------------------------------

def _shape(header: Mapping[str, TensorInfo], key: str) -> tuple[int, ...]:
    return tuple(header[key].shape)


def _lora_delta(module: AdapterModule, header: Mapping[str, TensorInfo], settings: AdapterSettings,
                what: str) -> tuple[tuple[int, ...], Callable[[Mapping[str, Any]], torch.Tensor]]:
    """The module's weight shape and ΔW (float32) from its A and B."""
    if module.a is None or module.b is None:
        have = module.a or module.b
        raise PlanError(f"{what}: module '{module.path}' has '{have}' but not its "
                        f"{'lora_B' if module.b is None else 'lora_A'} partner")
    sa, sb = _shape(header, module.a), _shape(header, module.b)
    if len(sa) != 2 or len(sb) != 2 or sa[0] != sb[1]:
        raise PlanError(f"{what}: module '{module.path}': lora_A {list(sa)} and lora_B {list(sb)} are not "
                        f"a rank-r pair [r, in] / [out, r] (convolution adapters are not read here)")
    rank = sa[0]
    scale = settings.scales.scale(module.path, rank)
    a_key, b_key = module.a, module.b
    if module.kind == "embedding":  # PEFT: (B @ A)ᵀ, A [r, vocab], B [dim, r]
        shape = (sa[1], sb[0])

        def delta(t: Mapping[str, Any]) -> torch.Tensor:
            return (t[b_key].float() @ t[a_key].float()).T * scale
    else:
        shape = (sa[1], sb[0]) if settings.fan_in_fan_out else (sb[0], sa[1])
        transpose = settings.fan_in_fan_out

        def delta(t: Mapping[str, Any]) -> torch.Tensor:
            d = (t[b_key].float() @ t[a_key].float()) * scale
            return d.T if transpose else d
    return shape, delta


def _weight_key(module: AdapterModule, header: Mapping[str, TensorInfo], settings: AdapterSettings,
                what: str) -> ConvertedKey | None:
    key = f"{module.path}.weight"
    has_lora = module.a is not None or module.b is not None
    whole = module.whole.get("weight")
    if not has_lora and whole is None:
        if module.magnitude is not None:
            raise PlanError(f"{what}: module '{module.path}' has a DoRA magnitude but no lora_A/lora_B")
        return None
    if not has_lora:
        info = header[whole]
        return ConvertedKey(TensorInfo(tuple(info.shape), info.dtype), (whole,),
                            lambda t: Replace(key, t[whole], None))
    if module.magnitude is not None and module.kind == "embedding":
        raise PlanError(f"{what}: module '{module.path}' is a DoRA embedding, which mecha does not apply; "
                        f"merge it with PEFT (merge_and_unload) first")
    shape, delta = _lora_delta(module, header, settings, what)
    dtype = header[module.b].dtype
    sources = (module.a, module.b)
    if whole is not None:
        if _shape(header, whole) != shape:
            raise PlanError(f"{what}: module '{module.path}': its whole weight '{whole}' is "
                            f"{list(_shape(header, whole))}, its LoRA changes {list(shape)}")
        if module.magnitude is not None:
            raise PlanError(f"{what}: module '{module.path}' has both a whole weight and DoRA; not supported")
        return ConvertedKey(TensorInfo(shape, header[whole].dtype), sources + (whole,),
                            lambda t: Replace(key, t[whole], delta(t)))
    if module.magnitude is None:
        return ConvertedKey(TensorInfo(shape, dtype), sources, delta)
    axis = 1 if settings.fan_in_fan_out else 0  # PEFT's norm is per output feature
    magnitude = module.magnitude
    if math.prod(_shape(header, magnitude)) != shape[axis]:
        raise PlanError(f"{what}: module '{module.path}': DoRA magnitude {list(_shape(header, magnitude))} does "
                        f"not fit its {list(shape)} weight")
    return ConvertedKey(TensorInfo(shape, dtype), sources + (magnitude,),
                        lambda t: PeftDoRA(key, delta(t), t[magnitude].float(), axis))


def _bias_key(module: AdapterModule, header: Mapping[str, TensorInfo], settings: AdapterSettings,
              what: str) -> ConvertedKey | None:
    key = f"{module.path}.bias"
    whole, lora_bias = module.whole.get("bias"), module.b_bias
    if whole is None and lora_bias is None:
        return None
    if lora_bias is not None and module.magnitude is not None:
        raise PlanError(f"{what}: module '{module.path}' has DoRA and a LoRA bias (lora_bias); not supported")
    if lora_bias is not None and module.a is None:
        raise PlanError(f"{what}: module '{module.path}' has a LoRA bias '{lora_bias}' but no lora_A/lora_B")
    scale = settings.scales.scale(module.path, _shape(header, module.a)[0]) if module.a else 1.0
    if whole is None:
        info = header[lora_bias]
        return ConvertedKey(TensorInfo(tuple(info.shape), info.dtype), (lora_bias,),
                            lambda t: t[lora_bias].float() * scale)
    sources = (whole,) + ((lora_bias,) if lora_bias else ())

    def replaced(t: Mapping[str, Any]) -> Replace:
        return Replace(key, t[whole], t[lora_bias].float() * scale if lora_bias else None)

    info = header[whole]
    return ConvertedKey(TensorInfo(tuple(info.shape), info.dtype), sources, replaced)


def describe(path: str | None, metadata: Mapping[str, str] | None) -> str:
    """How messages name the adapter."""
    if path:
        return path
    title = (metadata or {}).get("modelspec.title")
    return f"PEFT adapter '{title}'" if title else "PEFT adapter"


def plan(header: Mapping[str, TensorInfo], metadata: Mapping[str, str] | None = None,
         allow_missing: bool = False, path: str | None = None) -> dict[str, ConvertedKey]:
    """The converter's plan: {model key: ConvertedKey} of a PEFT adapter (see the module doc)."""
    fits = best_resolution(header, "peft")
    if fits is not None:  # an image model's LoRA: its architecture's converter reads it (tables, slices)
        raise ValueError(f"the file is a LoRA of {fits.arch}")
    what = describe(path, metadata)
    settings = read_settings(path, metadata, what)
    modules, stray = group(header, what)
    if stray:
        message = (f"{what}: {len(stray)} key(s) are no PEFT LoRA tensor mecha applies, e.g. '{stray[0]}' "
                   f"(LoRA A/B, embedding A/B, DoRA magnitude, modules_to_save weights are)")
        if not allow_missing:
            raise PlanError(message + "; use --allow-missing to skip them")
        warnings.warn(message + "; skipped", stacklevel=2)
    out: dict[str, ConvertedKey] = {}
    for module in modules.values():
        for converted, key in ((_weight_key(module, header, settings, what), f"{module.path}.weight"),
                               (_bias_key(module, header, settings, what), f"{module.path}.bias")):
            if converted is not None:
                out[key] = converted
    if not out:
        raise ValueError("no PEFT LoRA module in the file")
    return out
