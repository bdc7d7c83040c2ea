"""The strength (alpha / r) of PEFT/diffusers LoRA modules, from the file's ``__metadata__``.

PEFT-named files hold no ``.alpha`` tensors: the LoraConfig does. Recent diffusers write it as
a JSON string under ``__metadata__["lora_adapter_metadata"]``, in one of two layouts:

* a model's ``save_lora_adapter``: the config itself, ``{"r": 4, "lora_alpha": 8, ...}``;
* a pipeline's ``save_lora_weights``: each component's config with its fields prefixed by the
  component, ``{"unet.r": 4, "unet.lora_alpha": 8, "text_encoder.lora_alpha": 16, ...}``,
  matching tensor keys ``unet.<module>.lora_A.weight``, ``text_encoder.<module>...``.

Both may appear in one file: a component's own config wins over the unprefixed one. A module
whose component has no config keeps alpha = r (scale 1), as diffusers does without metadata.

The scale is ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), where
``alpha_pattern`` may give a module its own alpha. r is the module's rank read from its tensors:
PEFT builds each layer with its ``rank_pattern`` rank, so a file whose tensors disagree with the
config could not be loaded there, and the tensors are what the layer actually computes with.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Mapping

import attrs

from mecha_core.errors import PlanError

#: The ``__metadata__`` entry diffusers stores the LoraConfig in (diffusers' LORA_ADAPTER_METADATA_KEY).
METADATA_KEY = "lora_adapter_metadata"

#: Prefix PEFT's own ``get_peft_model_state_dict`` puts before every module path.
PEFT_WRAPPER = "base_model.model."

#: LoraConfig fields that decide the scale; the others (target_modules, dropout, ...) do not.
_SCALE_FIELDS = ("lora_alpha", "use_rslora", "alpha_pattern")


@attrs.frozen
class ComponentConfig:
    """The scale-relevant part of one LoraConfig."""

    lora_alpha: float | None
    """``None``: the config does not say, alpha = r."""
    use_rslora: bool = False
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    """(regex on the module path, alpha) in the config's order; the first match wins."""

    def scale(self, path: str, rank: int) -> float:
        alpha = self.lora_alpha
        for pattern, value in self.alpha_pattern:
            # PEFT's get_pattern_key: the pattern must match the whole path or a dotted suffix of it
            if re.match(rf"(.*\.)?({pattern})$", path):
                alpha = value
                break
        if alpha is None:
            alpha = float(rank)
        return alpha / (math.sqrt(rank) if self.use_rslora else rank)


@attrs.frozen
class AdapterScales:
    """Per-module scales of one file: its configs by component prefix (``""``: unprefixed)."""

    configs: dict[str, ComponentConfig]

    def scale(self, module: str, rank: int) -> float | None:
        """alpha / r for the module named ``module`` in the file; ``None`` when no config covers it."""
        module = module.removeprefix(PEFT_WRAPPER)
        components = sorted((c for c in self.configs if c and module.startswith(c + ".")), key=len, reverse=True)
        if components:
            component = components[0]
            return self.configs[component].scale(module[len(component) + 1:], rank)
        if "" in self.configs:
            return self.configs[""].scale(module, rank)
        return None


def _number(value: Any, field: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PlanError(f"{what}: {METADATA_KEY} field '{field}' must be a finite number, not {value!r}")
    return float(value)


def _component(fields: Mapping[str, Any], prefix: str, what: str) -> ComponentConfig:
    def name(field: str) -> str:
        return f"{prefix}.{field}" if prefix else field

    alpha = fields.get("lora_alpha")
    alpha = None if alpha is None else _number(alpha, name("lora_alpha"), what)
    rslora = fields.get("use_rslora") or False
    if not isinstance(rslora, bool):
        raise PlanError(f"{what}: {METADATA_KEY} field '{name('use_rslora')}' must be true or false, not {rslora!r}")
    patterns = fields.get("alpha_pattern") or {}
    if not isinstance(patterns, dict):
        raise PlanError(f"{what}: {METADATA_KEY} field '{name('alpha_pattern')}' must map module patterns "
                        f"to alphas, not {patterns!r}")
    checked = []
    for pattern, value in patterns.items():
        try:
            re.compile(pattern)
        except re.error as exc:
            raise PlanError(f"{what}: {METADATA_KEY} field '{name('alpha_pattern')}' has the pattern "
                            f"'{pattern}', which is not a valid regular expression ({exc})") from None
        checked.append((pattern, _number(value, f"{name('alpha_pattern')}[{pattern!r}]", what)))
    return ComponentConfig(alpha, rslora, tuple(checked))


def adapter_scales(metadata: Mapping[str, str] | None, what: str) -> AdapterScales | None:
    """The file's LoRA configs, or ``None`` when its metadata holds none (then alpha = r).

    ``what`` names the file in error messages. Raises PlanError for JSON that does not parse or
    fields of the wrong type.
    """
    raw = (metadata or {}).get(METADATA_KEY)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise PlanError(f"{what}: __metadata__ entry '{METADATA_KEY}' is not valid JSON ({exc}); "
                        f"fix or remove it (without it alpha = r)") from None
    if not isinstance(data, dict):
        raise PlanError(f"{what}: __metadata__ entry '{METADATA_KEY}' must be a JSON object (a LoraConfig), "
                        f"not {type(data).__name__}")
    grouped: dict[str, dict[str, Any]] = {}
    for key, value in data.items():
        prefix, _, field = key.rpartition(".")  # config fields hold no dots; component names may
        grouped.setdefault(prefix, {})[field] = value
    configs = {prefix: _component(fields, prefix, what) for prefix, fields in grouped.items()
               if any(f in fields for f in _SCALE_FIELDS) or "r" in fields}
    return AdapterScales(configs)


def describe(metadata: Mapping[str, str] | None) -> str:
    """How error messages name a PEFT file when its path is unknown (a converter's plan)."""
    title = (metadata or {}).get("modelspec.title") or (metadata or {}).get("ss_output_name")
    return f"PEFT/diffusers LoRA '{title}'" if title else "PEFT/diffusers LoRA file"
