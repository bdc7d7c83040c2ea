r"""The strength (alpha / r) of PEFT/diffusers LoRA modules, from the file's ``__metadata__``.

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

The metadata is untrusted: its JSON is parsed with bounded size and depth
(:func:`mecha_core.kit.loads_bounded`), and the ``alpha_pattern`` regular expressions run
on RE2 (``google-re2``), whose matching time is linear in the module path, so a pattern like
``(\w+\.?)+!`` cannot stall a merge (Python's ``re`` took 43 s on a 38-character name).
PEFT's semantics are kept: a pattern matches the whole module path or a dotted suffix of it,
``re.match(rf"(.*\.)?({pattern})$", path)``, and the first pattern in the config's order
wins. Patterns RE2 cannot run (backreferences, lookaround) are refused with an error naming
them, as are more than :data:`MAX_PATTERNS` patterns or one over :data:`MAX_PATTERN_CHARS`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import attrs

from mecha_core.errors import PlanError
from mecha_core.kit import loads_bounded

#: The ``__metadata__`` entry diffusers stores the LoraConfig in (diffusers' LORA_ADAPTER_METADATA_KEY).
METADATA_KEY = "lora_adapter_metadata"

#: Prefix PEFT's own ``get_peft_model_state_dict`` puts before every module path.
PEFT_WRAPPER = "base_model.model."

#: LoraConfig fields that decide the scale; the others (target_modules, dropout, ...) do not.
_SCALE_FIELDS = ("lora_alpha", "use_rslora", "alpha_pattern")

#: Most ``alpha_pattern`` entries one config may hold (real ones: a few, or one per layer).
MAX_PATTERNS = 10_000

#: Longest ``alpha_pattern`` regular expression accepted, in characters.
MAX_PATTERN_CHARS = 1_000


def _re2() -> Any:
    """The RE2 module; a declared dependency, but an environment may still lack it."""
    try:
        import re2
    except ImportError:
        raise PlanError("this LoRA's alpha_pattern needs the google-re2 package (pip install google-re2), "
                        "which matches patterns from files in linear time") from None
    return re2


def _re2_options() -> Any:
    options = _re2().Options()
    options.log_errors = False  # RE2 would print its own line on stderr for a bad pattern
    return options


def _peft_form(pattern: str) -> str:
    """PEFT's get_pattern_key: the pattern matches the whole path or a dotted suffix of it."""
    return rf"(?:.*\.)?(?:{pattern})$"


def pattern_error(pattern: str) -> str | None:
    """Why RE2 cannot run ``pattern`` (in PEFT's form), or ``None`` when it can."""
    re2 = _re2()

    try:
        re2.compile(_peft_form(pattern), _re2_options())
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        return reason.decode("utf-8", "replace") if isinstance(reason, bytes) else str(reason)
    return None


@functools.lru_cache(maxsize=64)
def _pattern_set(patterns: tuple[str, ...]) -> Any:
    """One RE2 set matching every pattern at once: ``Match(path)`` lists the indexes that match,
    in time linear in the path (a loop over compiled patterns would cost one call per pattern)."""
    re2 = _re2()

    matcher = re2.Set.MatchSet(_re2_options())
    try:
        for pattern in patterns:
            matcher.Add(_peft_form(pattern))
        matcher.Compile()
    except re2.error:
        raise ValueError("the patterns together are too large for RE2's memory bound") from None
    return matcher


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
        if self.alpha_pattern:
            # PEFT's get_pattern_key: the first pattern matching the whole path or a dotted suffix
            hits = _pattern_set(tuple(p for p, _ in self.alpha_pattern)).Match(path)
            if hits:
                alpha = self.alpha_pattern[min(hits)][1]
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


def _number(value: Any, field: str, what: str, source: str = METADATA_KEY) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PlanError(f"{what}: {source} field '{field}' must be a finite number, not {value!r}")
    return float(value)


def component_config(fields: Mapping[str, Any], prefix: str, what: str, source: str = METADATA_KEY,
                     default_alpha: float | None = None) -> ComponentConfig:
    """The scale fields of one LoraConfig (``fields``: its JSON object; ``prefix``: its
    component, ``""`` for none); ``source`` names where it was read in errors, and
    ``default_alpha`` is the alpha when the config has no ``lora_alpha`` (``None``: r)."""
    def name(field: str) -> str:
        return f"{prefix}.{field}" if prefix else field

    alpha = fields.get("lora_alpha")
    alpha = default_alpha if alpha is None else _number(alpha, name("lora_alpha"), what, source)
    rslora = fields.get("use_rslora") or False
    if not isinstance(rslora, bool):
        raise PlanError(f"{what}: {source} field '{name('use_rslora')}' must be true or false, not {rslora!r}")
    patterns = fields.get("alpha_pattern") or {}
    if not isinstance(patterns, dict):
        raise PlanError(f"{what}: {source} field '{name('alpha_pattern')}' must map module patterns "
                        f"to alphas, not {patterns!r}")
    if len(patterns) > MAX_PATTERNS:
        raise PlanError(f"{what}: {source} field '{name('alpha_pattern')}' has {len(patterns):,} patterns; "
                        f"at most {MAX_PATTERNS:,} are accepted")
    checked = []
    for pattern, value in patterns.items():
        if len(pattern) > MAX_PATTERN_CHARS:
            raise PlanError(f"{what}: {source} field '{name('alpha_pattern')}' has a pattern of "
                            f"{len(pattern):,} characters; at most {MAX_PATTERN_CHARS:,} are accepted")
        problem = pattern_error(pattern)
        if problem is not None:
            raise PlanError(f"{what}: {source} field '{name('alpha_pattern')}' has the pattern "
                            f"'{pattern}', which is not a valid regular expression for a linear-time "
                            f"matcher ({problem}; backreferences and lookaround are not supported)")
        checked.append((pattern, _number(value, f"{name('alpha_pattern')}[{pattern!r}]", what, source)))
    if checked:
        try:
            _pattern_set(tuple(p for p, _ in checked))
        except ValueError as exc:
            raise PlanError(f"{what}: {source} field '{name('alpha_pattern')}': {exc}") from None
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
        data = loads_bounded(raw)  # bounded size and nesting: the file is not trusted
    except ValueError as exc:  # JSONDecodeError, JSONLimitError
        raise PlanError(f"{what}: __metadata__ entry '{METADATA_KEY}' is not valid JSON ({exc}); "
                        f"fix or remove it (without it alpha = r)") from None
    if not isinstance(data, dict):
        raise PlanError(f"{what}: __metadata__ entry '{METADATA_KEY}' must be a JSON object (a LoraConfig), "
                        f"not {type(data).__name__}")
    grouped: dict[str, dict[str, Any]] = {}
    for key, value in data.items():
        prefix, _, field = key.rpartition(".")  # config fields hold no dots; component names may
        grouped.setdefault(prefix, {})[field] = value
    configs = {prefix: component_config(fields, prefix, what) for prefix, fields in grouped.items()
               if any(f in fields for f in _SCALE_FIELDS) or "r" in fields}
    return AdapterScales(configs)


def describe(metadata: Mapping[str, str] | None) -> str:
    """How error messages name a PEFT file when its path is unknown (a converter's plan)."""
    title = (metadata or {}).get("modelspec.title") or (metadata or {}).get("ss_output_name")
    return f"PEFT/diffusers LoRA '{title}'" if title else "PEFT/diffusers LoRA file"
