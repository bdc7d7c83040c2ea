"""Methods that choose per key rather than compute: component selection, dtype rounding.

A method cannot remove keys from a merge (the output's keys are planned from the inputs'
headers before any method runs), so pick_component / omit_component choose, per key, between
two inputs; with a single delta input the keys left out become a zero delta, which adds nothing.
"""

from __future__ import annotations

from typing import Literal, get_args

from mecha_core.lazy import torch

from mecha_core import DELTA, merge_method
from mecha_core.errors import MergeError


def _component_of(method: str, component, ctx) -> tuple[str, str | None]:
    """The canonical component asked for and the component of ``ctx.key`` (``None`` when the
    architecture does not list the key)."""
    if not isinstance(component, str) or not component:
        raise MergeError(f"{method}: give component=\"NAME\" (e.g. component=\"vae\")")
    if ctx.architecture is None:
        raise MergeError(f"{method}(component={component!r}) needs to know which component each key "
                         f"is in, but no architecture was detected for the inputs; name it with "
                         f"model(\"file.safetensors\", arch=\"...\")")
    arch = ctx.architecture
    wanted = arch.component_aliases.get(component, component)
    if wanted not in arch.components:
        raise MergeError(f"{method}: {arch.name} has no component {component!r}; it has "
                         f"{', '.join(arch.components)}")
    spec = arch.keys.get(ctx.key)
    return wanted, (spec.component if spec is not None else None)


def _rest_or_zero(method: str, a, rest):
    return rest if rest is not None else torch.zeros_like(a)


def _rest_must_exist_for_weights(method: str):
    def check(spaces: dict) -> None:
        if spaces.get("rest", "absent") == "absent" and spaces.get("a") not in (None, DELTA):
            raise ValueError(f"without a second input, a must be a delta (the keys not chosen "
                             f"become a zero delta); for weights give the input the other keys "
                             f"come from: {method}(a, other, component=...)")
    return check


@merge_method(elementwise=True, check_spaces=_rest_must_exist_for_weights("pick_component"),
              formula="a for keys of component, else rest (a zero delta without rest)")
def pick_component(a, rest=None, *, component: str = "", ctx=None):
    """a's keys of one component (clip_l, vae, ...), every other key from rest.

    component is named as the architecture names it (aliases accepted).

    Without rest, a must be a delta and the other keys become a zero delta (they change
    nothing when added to weights). component has no useful default: leaving it empty is an
    error. Needs a known architecture (detected, or model(..., arch=...)); keys the architecture
    does not list belong to no component.
    """
    wanted, actual = _component_of("pick_component", component, ctx)
    return a if actual == wanted else _rest_or_zero("pick_component", a, rest)


@merge_method(elementwise=True, check_spaces=_rest_must_exist_for_weights("omit_component"),
              formula="rest (a zero delta without rest) for keys of component, else a")
def omit_component(a, rest=None, *, component: str = "", ctx=None):
    """a's keys except those of one component, which come from rest (pick_component reversed).

    Without rest the component's keys become a zero delta (a must then be a delta).

    component: the component's name or alias in the architecture (required in practice: the
    empty default is an error). Needs a known architecture.
    """
    wanted, actual = _component_of("omit_component", component, ctx)
    return _rest_or_zero("omit_component", a, rest) if actual == wanted else a


Rounding = Literal["float64", "float32", "bfloat16", "float16", "float8_e4m3fn", "float8_e5m2"]
_ROUNDING = get_args(Rounding)


@merge_method(elementwise=True, formula="a rounded to dtype and back")
def cast(a, *, dtype: Rounding = "float16"):
    """Round a's values through another dtype (the output dtype is set elsewhere).

    dtype: float16 (the default), bfloat16, float32, float64, float8_e4m3fn or float8_e5m2.

    The engine computes in the work dtype and writes every key in the output dtype, so a cast
    cannot change the dtype of the file (use the output dtype for that). What it does is round:
    cast(a, dtype="float16") gives the values a float16 release of a would hold, e.g. to merge
    exactly what a half-precision model would give, or to take the precision loss early.
    """
    if dtype not in _ROUNDING:
        raise MergeError(f"cast(dtype={dtype!r}): use one of {', '.join(_ROUNDING)}")
    target = getattr(torch, dtype, None)
    if target is None:
        raise MergeError(f"cast(dtype={dtype!r}): this torch has no {dtype}")
    return a.to(target).to(a.dtype)


KEYS = [pick_component, omit_component, cast]
