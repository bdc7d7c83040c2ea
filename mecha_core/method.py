"""The ``@merge_method`` decorator: turns a per-key tensor function into a registered method.

Positional parameters are inputs (the same key's tensor from each input model), keyword-only
parameters with defaults are hyperparameters. A parameter named ``ctx`` receives a
:class:`MergeContext` (the key being merged, a seeded random generator, ...).
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
import types
import typing
from typing import Any, Callable

import attrs

from .errors import MergeSpaceError, RecipeError
from .specs import DELTA, MERGE_SPACES, PARAM, WEIGHT, Architecture, Hyperparameter, MethodInput, TensorInfo

_SCALAR_KINDS = (bool, int, float, str)


@attrs.frozen
class MergeContext:
    """What a method may know about the key it is merging, besides the tensors."""

    key: str
    """The output key (state-dict name) being merged."""
    info: TensorInfo
    """Shape and output dtype of the key."""
    architecture: Architecture | None = None
    """The architecture of the merge's keys (its components, blocks and key specs), when one
    was detected or named."""
    device: str = "cpu"
    """The device tensors are on."""

    def generator(self, seed: int) -> "Any":
        """A torch generator seeded from ``seed`` and the key, so results never depend on key order."""
        import torch

        digest = hashlib.sha256(f"{int(seed)}\0{self.key}".encode()).digest()
        gen = torch.Generator(device=self.device)
        gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        return gen


@attrs.frozen(eq=False)
class MergeMethod:
    """A merge method: a named per-key operator with typed inputs and hyperparameters."""

    name: str
    """The name recipes use (``weighted_sum``)."""
    function: Callable[..., Any] = attrs.field(repr=False)
    """The per-key function: tensors in, tensor out."""
    inputs: tuple[MethodInput, ...]
    """Positional (tensor) parameters, in order."""
    hyperparameters: tuple[Hyperparameter, ...]
    """Keyword-only parameters, each with its default."""
    returns: str | None = None
    """The merge space of the result; ``None``: the space of the generic inputs."""
    accepts_missing: bool = False
    """The method is given ``None`` for an input that lacks the key (``fallback``)."""
    wants_context: bool = False
    """The function takes a ``ctx`` keyword (a :class:`MergeContext`)."""
    elementwise: bool = False
    """Each output element depends only on the same element of the inputs, so the engine may
    evaluate a large key in slices (bounded memory, more parallelism)."""
    check_spaces: Callable[[dict[str, Any]], None] | None = attrs.field(default=None, repr=False)
    """Optional extra check of the inputs' merge spaces; raises ``ValueError`` with a reason."""
    formula: str = ""
    """A one-line definition shown in the docs."""
    doc: str = ""
    """The function's docstring."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MergeMethod) and other.name == self.name

    def __hash__(self) -> int:
        return hash(("MergeMethod", self.name))

    @property
    def variadic(self) -> MethodInput | None:
        return next((i for i in self.inputs if i.variadic), None)

    def hyperparameter(self, name: str) -> Hyperparameter:
        for h in self.hyperparameters:
            if h.name == name:
                return h
        raise KeyError(name)

    def __call__(self, *args: Any, **kwargs: Any):
        """Build a recipe node calling this method (no I/O happens)."""
        from .recipe.nodes import call

        return call(self, args, kwargs)

    # -- used when recipes are built -------------------------------------------------------
    def bind(self, n_args: int, kwarg_names: list[str]) -> None:
        """Check the number of inputs and the keyword names; raise RecipeError otherwise."""
        fixed = [i for i in self.inputs if not i.variadic]
        required = [i for i in fixed if not i.optional]
        if n_args < len(required) or (self.variadic is None and n_args > len(fixed)):
            if self.variadic is not None:
                expected = f"at least {len(required)}"
            elif len(required) == len(fixed):
                expected = str(len(fixed))
            else:
                expected = f"{len(required)} to {len(fixed)}"
            raise RecipeError(f"{self.name} takes {expected} input(s), got {n_args}")
        known = [h.name for h in self.hyperparameters]
        for name in kwarg_names:
            if name not in known:
                hint = difflib.get_close_matches(name, known, n=1)
                suffix = f"; did you mean '{hint[0]}'?" if hint else (
                    f"; it takes {', '.join(known)}" if known else "; it takes none")
                raise RecipeError(f"{self.name} has no hyperparameter '{name}'{suffix}")

    def input_for(self, position: int) -> MethodInput:
        fixed = [i for i in self.inputs if not i.variadic]
        if position < len(fixed):
            return fixed[position]
        assert self.variadic is not None
        return self.variadic

    def result_space(self, spaces: list[str | None], *, where: str = "",
                     origins: list[str] | None = None) -> str | None:
        """Check the inputs' merge spaces (``None``: not known yet) and return the result's.

        ``origins`` says where each input comes from (``subtract``, ``a.safetensors``) for the
        error message. Raises :class:`MergeSpaceError` when a known space does not fit.
        """
        generic: str | None = None
        generic_from = ""
        named: dict[str, Any] = {}
        fixed = [i for i in self.inputs if not i.variadic]
        variadic = self.variadic

        def got(pos: int, space: str) -> str:
            return _SPACE_WORDS.get(space, space) + (f" from {origins[pos]}" if origins and origins[pos] else "")

        for pos, space in enumerate(spaces):
            spec = fixed[pos] if pos < len(fixed) else variadic
            assert spec is not None
            label = spec.name if not spec.variadic else f"{spec.name}[{pos - len(self.inputs) + 1}]"
            named[label] = space
            if space is None:
                continue
            if spec.space is not None:
                if space != spec.space:
                    raise MergeSpaceError(f"{where}{self.name} expects {spec.name} in {spec.space} space; "
                                          f"got {got(pos, space)}")
            elif generic is None:
                generic, generic_from = space, spec.name if not spec.variadic else label
            elif space != generic:
                raise MergeSpaceError(
                    f"{where}{self.name} expects {spec.name} in the same space as {generic_from} "
                    f"({generic}); got {got(pos, space)}")
        if self.check_spaces is not None:
            try:
                self.check_spaces(named)
            except ValueError as exc:
                raise MergeSpaceError(f"{where}{self.name}: {exc}") from None
        if self.returns is not None:
            return self.returns
        if any(i.space is None for i in self.inputs):
            return generic
        return None


_SPACE_WORDS = {"weight": "weights", "delta": "a delta", "param": "a parameter"}


def _resolve_hints(fn: Callable[..., Any]) -> dict[str, Any]:
    # only the hyperparameters' hints are used: resolving a tensor input's "torch.Tensor" would
    # import torch while plugins load, which `mecha --help` and `mecha methods` must not pay for
    sig = inspect.signature(fn)
    wanted = {p.name for p in sig.parameters.values() if p.kind == p.KEYWORD_ONLY}
    subset = types.SimpleNamespace(
        __annotations__={k: v for k, v in getattr(fn, "__annotations__", {}).items() if k in wanted},
        __globals__=getattr(inspect.unwrap(fn), "__globals__", {}))
    try:
        return typing.get_type_hints(subset)
    except Exception:  # unresolvable annotations only lose the type check
        return {}


def _kind_and_choices(hint: Any) -> tuple[type | None, tuple | None]:
    """A hyperparameter's kind from its annotation; ``Literal["sum", "count"]`` also gives its
    choices (the kind is the choices' common type: ``str`` there)."""
    if hint in _SCALAR_KINDS:
        return hint, None
    if typing.get_origin(hint) is typing.Literal:
        choices = typing.get_args(hint)
        kinds = {type(c) for c in choices}
        kind = kinds.pop() if len(kinds) == 1 else None
        return (kind if kind in _SCALAR_KINDS else None), tuple(choices)
    return None, None


def _build(fn: Callable[..., Any], *, name: str | None, spaces: Any, returns: str | None,
           accepts_missing: bool, check_spaces: Any, formula: str, elementwise: bool) -> MergeMethod:
    sig = inspect.signature(fn)
    hints = _resolve_hints(fn)
    if isinstance(spaces, str):  # one space for every input (not for hyperparameters or ctx)
        spaces = {p.name: spaces for p in sig.parameters.values()
                  if p.name != "ctx" and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)}
    spaces = dict(spaces or {})
    for space in [*spaces.values(), returns]:
        if space is not None and space not in MERGE_SPACES:
            raise ValueError(f"unknown merge space {space!r}; use one of {', '.join(MERGE_SPACES)}")
    inputs: list[MethodInput] = []
    hypers: list[Hyperparameter] = []
    wants_context = False
    method_name = name or fn.__name__
    for p in sig.parameters.values():
        if p.name == "ctx":
            if p.kind != p.KEYWORD_ONLY:  # the engine passes it by keyword, after the tensors
                raise TypeError(f"{method_name}: make 'ctx' keyword-only (after *)")
            wants_context = True
            continue
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            if p.default is not p.empty and p.default is not None:
                raise TypeError(f"{method_name}: input '{p.name}' may only default to None; "
                                "make hyperparameters keyword-only (after *)")
            inputs.append(MethodInput(p.name, spaces.get(p.name), optional=p.default is None))
        elif p.kind == p.VAR_POSITIONAL:
            inputs.append(MethodInput(p.name, spaces.get(p.name), variadic=True))
        elif p.kind == p.KEYWORD_ONLY:
            if p.default is p.empty:
                raise TypeError(f"{method_name}: hyperparameter '{p.name}' needs a default")
            kind, choices = _kind_and_choices(hints.get(p.name))
            if choices is not None and p.default not in choices and p.default is not None:
                raise TypeError(f"{method_name}: hyperparameter '{p.name}' defaults to {p.default!r}, "
                                f"which is not one of its choices {choices!r}")
            hypers.append(Hyperparameter(p.name, p.default, kind, choices))
        else:
            raise TypeError(f"{method_name}: **{p.name} is not supported")
    unknown = set(spaces) - {i.name for i in inputs}
    if unknown:
        raise TypeError(f"{method_name}: spaces given for unknown inputs {sorted(unknown)}")
    return MergeMethod(
        name=method_name, function=fn, inputs=tuple(inputs), hyperparameters=tuple(hypers),
        returns=returns, accepts_missing=accepts_missing, wants_context=wants_context,
        elementwise=elementwise,
        check_spaces=check_spaces, formula=formula, doc=inspect.cleandoc(fn.__doc__ or ""),
    )


def merge_method(fn: Callable[..., Any] | None = None, *, name: str | None = None,
                 spaces: dict[str, str] | str | None = None, returns: str | None = None,
                 accepts_missing: bool = False, check_spaces: Callable[[dict[str, Any]], None] | None = None,
                 formula: str = "", elementwise: bool = False) -> Any:
    """Declare a merge method; use bare (``@merge_method``) or with options.

    Options: ``name`` (default: the function's name); ``spaces``, a merge space for every input
    or a ``{input: space}`` map (inputs not named are generic: they must agree with each other,
    and the result is in their space); ``returns``, the result's space when fixed;
    ``accepts_missing``, pass ``None`` for inputs lacking a key instead of failing;
    ``check_spaces``, an extra check of the input spaces; ``formula``, a one-line definition;
    ``elementwise``, each output element depends only on the same element of each input (lets
    the engine work on slices of large tensors).
    """

    def wrap(f: Callable[..., Any]) -> MergeMethod:
        return _build(f, name=name, spaces=spaces, returns=returns, accepts_missing=accepts_missing,
                      check_spaces=check_spaces, formula=formula, elementwise=elementwise)

    if fn is not None:
        return wrap(fn)
    return wrap


__all__ = ["MergeContext", "MergeMethod", "merge_method", "WEIGHT", "DELTA", "PARAM"]
