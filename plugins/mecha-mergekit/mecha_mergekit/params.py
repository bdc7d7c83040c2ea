"""mergekit's parameter settings, resolved per tensor as mergekit 0.1.5 resolves them
(``mergekit/config.py: evaluate_setting`` and ``parameter_resolver.py``).

The reader stores a call's settings as one JSON text hyperparameter (``settings=``): the global
``parameters`` and each input model's own, exactly as the YAML wrote them. A method resolves them
for the key it merges: a filter entry applies when its ``filter`` is a substring of the tensor
name (or is ``*`` / absent), a list of numbers is a gradient over the layers (layer ``i`` of ``n``
at ``t = i / (n - 1)``, one layer at 1, tensors outside the layers at 0), and an input's own
setting takes precedence over the global one.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_t(key: str, ctx: Any) -> float:
    """mergekit's ``t`` for a tensor: its layer's place in the stack, 0 outside the layers."""
    found = _LAYER.search(key)
    arch = getattr(ctx, "architecture", None)
    count = len(getattr(arch, "layers", ()) or ())
    if found is None or count == 0:
        return 0.0
    return int(found.group(1)) / (count - 1) if count > 1 else 1.0


def as_float(value: Any) -> float:
    return float(value)


def as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes", "on")
    return bool(value)


def evaluate(name: str, setting: Any, t: float, validate: Callable[[Any], Any]) -> Any:
    """``evaluate_setting``: a scalar, a gradient list, or a list of ``{filter, value}`` entries."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return validate(setting)
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            values = [validate(e) for e in setting]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                return values[int(t * (len(values) - 1))]
            scaled = t * (len(values) - 1)
            i0 = int(scaled)
            i1 = min(len(values) - 1, i0 + 1)
            frac = scaled - i0
            return validate((1 - frac) * values[i0] + frac * values[i1])
        for cond in setting:
            flt = cond.get("filter")
            if flt is None or flt == "*" or (name and flt in name):
                return evaluate(name, cond["value"], t, validate)
        return None
    raise ValueError(f"unexpected parameter setting {setting!r}")


def slice_t(key: str, span: list[int]) -> float:
    """mergekit's ``t`` for a tensor of a slice whose layers are the output's ``first`` to
    ``first + count - 1`` (``span``): the layer's place in the slice, 0 outside the layers."""
    found = _LAYER.search(key)
    first, count = span
    if found is None:
        return 0.0
    return (int(found.group(1)) - first) / (count - 1) if count > 1 else 1.0


def shifted(key: str, by: int) -> str:
    """``key`` with its layer number moved by ``by`` (the name an input's tensor has in its file)."""
    if not by:
        return key
    return _LAYER.sub(lambda m: m.group(0).replace(m.group(1), str(int(m.group(1)) + by)), key, count=1)


class Settings:
    """A call's mergekit parameters, decoded from the ``settings`` JSON text.

    Besides ``global`` and each input's own parameters (``inputs``), a call of a slice carries
    ``outer`` (the slice's and the module's parameters, in mergekit's order of precedence, between
    an input's own and the global ones), ``span`` (the output layers of the slice: the first and
    the count, for ``t``) and ``shift`` (per input, its file's layer number minus the output's:
    mergekit matches an input's filters against the input's own tensor name)."""

    def __init__(self, text: str, key: str, ctx: Any) -> None:
        data = json.loads(text or "{}")
        self.global_ = data.get("global") or {}
        self.outer = data.get("outer") or []
        self.inputs = data.get("inputs") or []
        self.shift = data.get("shift") or []
        self.key = key
        span = data.get("span")
        self.t = slice_t(key, span) if span else layer_t(key, ctx)

    def _resolve(self, scopes: list[dict], name: str, validate: Callable[[Any], Any], default: Any,
                 key: str | None = None) -> Any:
        for scope in scopes:
            if name in scope:
                value = evaluate(key or self.key, scope[name], self.t, validate)
                if value is not None:
                    return value
        if default is None:
            raise ValueError(f"missing required parameter '{name}' for {key or self.key}")
        return validate(default)

    def shared(self, name: str, validate: Callable[[Any], Any], default: Any = None) -> Any:
        """A parameter of the whole call (``normalize``, ``lambda``, ``t``): the slice's, the
        module's, else the global settings."""
        return self._resolve([*self.outer, self.global_], name, validate, default)

    def input_key(self, index: int) -> str:
        """The name of input ``index``'s tensor in its own file."""
        return shifted(self.key, self.shift[index] if index < len(self.shift) else 0)

    def per_input(self, index: int, name: str, validate: Callable[[Any], Any], default: Any = None) -> Any:
        """A parameter of input ``index`` (``weight``, ``density``): its own, else the slice's,
        the module's, the global one."""
        own = self.inputs[index] if index < len(self.inputs) else {}
        return self._resolve([own or {}, *self.outer, self.global_], name, validate, default,
                             self.input_key(index))
