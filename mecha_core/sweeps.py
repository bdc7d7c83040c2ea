"""Sweeps: one merge per combination of parameter values, each written to its own output.

The combinations are the product of the swept values, in a fixed order: parameters in the order
given, the last one varying fastest (``alpha=[1, 2], beta=[3, 4]`` gives (1, 3), (1, 4), (2, 3),
(2, 4)). The output name holds a ``{name}`` placeholder for every swept parameter, replaced by
the value as written (a number as Python prints it, a model path by its file name without the
extension); every name is checked before any merge starts.
"""

from __future__ import annotations

import itertools
import os
import re
from typing import Any, Mapping, Sequence

import attrs

from .errors import MechaError, OutputError
from .recipe.nodes import LiteralNode, Node

#: ``{name}`` in an output name
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


@attrs.frozen
class SweepPoint:
    """One combination of a sweep."""

    values: Mapping[str, Any]
    """Parameter -> the value that fills it (in the order the parameters were given)."""
    labels: Mapping[str, str]
    """Parameter -> the text that replaces ``{name}`` in the output name."""


def label(value: Any, name: str) -> str:
    """How ``value`` is written into an output name."""
    if isinstance(value, LiteralNode):
        value = value.value
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (str, os.PathLike)):
        text = os.fspath(value)
        if os.sep in text or "/" in text or os.path.splitext(text)[1].lower() in (".safetensors", ".mecha"):
            return os.path.splitext(os.path.basename(text.rstrip("/" + os.sep)))[0]
        return text
    if isinstance(value, Node):
        raise MechaError(f"sweep {name}: a recipe node cannot be written into an output name; "
                         f"sweep over paths or numbers")
    return str(value)


def sweep_points(params: Mapping[str, Sequence[Any]]) -> list[SweepPoint]:
    """Every combination of ``params`` (name -> its values), in the sweep's order."""
    if not params:
        raise MechaError("a sweep needs at least one parameter with values")
    for name, values in params.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise MechaError(f"sweep {name}: give a non-empty list of values, got {values!r}")
    names = list(params)
    return [SweepPoint(dict(zip(names, combo)), {n: label(v, n) for n, v in zip(names, combo)})
            for combo in itertools.product(*(params[n] for n in names))]


def check_template(output: str, swept: Sequence[str], known: Sequence[str] = ()) -> None:
    """Refuse an output name that lacks a swept parameter's ``{name}``, or holds a ``{name}``
    that is neither swept nor in ``known`` (the other parameters given)."""
    found = _PLACEHOLDER.findall(output)
    missing = [n for n in swept if n not in found]
    if missing:
        raise OutputError(f"{output}: a sweep writes one output per value; put {{{missing[0]}}} in the "
                          f"output's name (e.g. -o \"out-{{{missing[0]}}}.safetensors\")")
    unknown = [n for n in found if n not in swept and n not in known]
    if unknown:
        raise OutputError(f"{output}: {{{unknown[0]}}} names no parameter of the sweep "
                          f"(swept: {', '.join(swept)})")


def output_name(output: str, labels: Mapping[str, str]) -> str:
    """``output`` with each ``{name}`` replaced by its label."""
    return _PLACEHOLDER.sub(lambda m: labels.get(m.group(1), m.group(0)), output)


def sweep_outputs(output: str, points: Sequence[SweepPoint], known: Mapping[str, str] | None = None) -> list[str]:
    """The output name of every point; refuses a name without every swept ``{name}`` and two
    points that would write the same output. ``known``: other parameters' labels a
    placeholder may also name."""
    swept = [n for n in points[0].values] if points else []
    check_template(output, swept, list(known or {}))
    names = [output_name(output, {**(known or {}), **p.labels}) for p in points]
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        path = os.path.normpath(os.path.abspath(name))
        if path in seen:
            first = points[seen[path]].labels
            raise OutputError(f"{name}: the sweep writes this output twice (for {_show(first)} and "
                              f"{_show(points[i].labels)}); give distinct values")
        seen[path] = i
    return names


def _show(labels: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in labels.items())
