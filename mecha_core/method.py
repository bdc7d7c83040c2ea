"""The ``@merge_method`` decorator: turns a per-key tensor function into a registered method.

Positional parameters are inputs (the same key's tensor from each input model), keyword-only
parameters with defaults are hyperparameters. A parameter named ``ctx`` receives a
:class:`MergeContext` (the key being merged, a seeded random generator, ...).

A method that needs whole-tensor statistics (norms, dot products, the k-th largest magnitude)
but is otherwise element-wise declares them with ``statistics=``: the engine computes them in
passes over slices of the key (:class:`Total` accumulated in float64, :class:`TopK` by an exact
radix selection) and then calls the method on slices with a ``stats`` keyword holding the
results, so such a method runs in bounded memory however large the tensor.
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
import types
import typing
from typing import Any, Callable, Sequence

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
    start: int = 0
    """The flat index (in the key, flattened) of the first element of the tensors the method is
    given: 0 for a whole key."""
    stop: int | None = None
    """One past the flat index of the last element given; ``None``: the whole key, in its shape."""

    @property
    def piece_shape(self) -> tuple[int, ...]:
        """The shape of the tensors the method is given: the key's, or ``(stop - start,)``."""
        return tuple(self.info.shape) if self.stop is None else (self.stop - self.start,)

    def indices(self) -> "Any":
        """The flat index in the key of every element given, shaped like the tensors (int64)."""
        import torch

        n = 1
        for d in self.piece_shape:
            n *= d
        return torch.arange(self.start, self.start + n, device=self.device).reshape(self.piece_shape)

    def uniform(self, seed: int, stream: int = 0) -> "Any":
        """Uniform float32 draws in [0, 1), one per element given, from ``seed``, the key and
        ``stream`` (e.g. the model's position). Element ``i`` of the key always gets the same
        draw, however the key is sliced: the key is drawn in fixed blocks of
        :data:`RANDOM_BLOCK` elements, each from its own seeded generator."""
        import torch

        shape = self.piece_shape
        n = 1
        for d in shape:
            n *= d
        first, last = self.start // RANDOM_BLOCK, (self.start + n + RANDOM_BLOCK - 1) // RANDOM_BLOCK
        total = self.info.numel
        parts = []
        for block in range(first, last):
            lo = block * RANDOM_BLOCK
            length = min(RANDOM_BLOCK, total - lo)
            digest = hashlib.sha256(f"{int(seed)}\0{self.key}\0{int(stream)}\0{block}".encode()).digest()
            gen = torch.Generator(device=self.device)
            gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
            parts.append(torch.rand(length, generator=gen, device=self.device, dtype=torch.float32))
        draws = parts[0] if len(parts) == 1 else torch.cat(parts)
        offset = self.start - first * RANDOM_BLOCK
        return draws[offset:offset + n].reshape(shape)

    def generator(self, seed: int) -> "Any":
        """A torch generator seeded from ``seed`` and the key, so results never depend on key order."""
        import torch

        digest = hashlib.sha256(f"{int(seed)}\0{self.key}".encode()).digest()
        gen = torch.Generator(device=self.device)
        gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        return gen


#: Elements per independently seeded block of :meth:`MergeContext.uniform`.
RANDOM_BLOCK = 1 << 16


@attrs.frozen
class Total:
    """A statistic: the sum over every element of the key of ``of(ctx, *inputs)``, accumulated
    in float64 (one float in ``stats[name]``)."""

    name: str
    """The key of the result in the method's ``stats``."""
    of: Callable[..., Any] = attrs.field(repr=False)
    """``of(ctx, *inputs)``: an element-wise function of the method's inputs (a piece of the
    key, half-precision inputs already upcast to float32), returning a tensor of their shape."""
    per: int = 0
    """0: one float. ``n``: one sum per position modulo ``n`` of the flat index (the key read as
    rows of ``n``: per column of a matrix when ``n`` is its row length), a float64 tensor of
    ``n`` sums."""


@attrs.frozen
class TopK:
    """A statistic: which elements of the key are among the ``k`` largest of
    ``|of(ctx, *inputs)|``, ties broken by the lower flat index (the first ``k`` of a stable
    descending sort). ``stats[name]`` is a :class:`Selection`."""

    name: str
    """The key of the result in the method's ``stats``."""
    of: Callable[..., Any] = attrs.field(repr=False)
    """``of(ctx, *inputs)``: an element-wise function of the inputs; its magnitudes are ranked."""
    k: int
    """How many elements are selected (0: none; the key's size or more: all)."""


@attrs.frozen
class Selection:
    """The exact result of a :class:`TopK`: element ``i`` is selected when ``|v_i| > threshold``,
    or ``|v_i| == threshold`` and ``i <= last_tie``."""

    k: int
    """How many elements were asked for."""
    numel: int
    """The number of elements of the key."""
    threshold: float | None
    """The k-th largest magnitude (exactly, as stored in the values' dtype); ``None`` when
    ``k <= 0`` (nothing selected) or ``k >= numel`` (everything)."""
    last_tie: int
    """The flat index of the last element equal to the threshold that is selected (the key's
    size when every tied element is)."""

    def mask(self, magnitudes: Any, ctx: MergeContext) -> Any:
        """The selected elements among ``magnitudes`` (``|of(ctx, *inputs)|`` for ``ctx``'s piece)."""
        import torch

        if self.threshold is None:
            return torch.full_like(magnitudes, self.k >= self.numel, dtype=torch.bool)
        cut = self.last_tie + 1 - ctx.start  # the piece's elements are in flat order
        if cut >= magnitudes.numel():  # every tie in this piece is kept
            return magnitudes >= self.threshold
        above = magnitudes > self.threshold
        if cut <= 0:  # every tie kept lies before this piece
            return above
        equal = magnitudes == self.threshold
        equal.view(-1)[cut:] = False
        return above.logical_or_(equal)


@attrs.frozen
class Then:
    """Statistics that depend on others: after every request before it in the list is computed,
    ``then(results)`` (the results so far, by name) returns more requests (:class:`Total`,
    :class:`TopK`, :class:`Then`), computed in further passes over the key; their results join
    ``stats``. E.g. the L1 norm of the entries a :class:`TopK` selected, or a top-k whose ``k``
    depends on a :class:`Total`."""

    then: Callable[[dict[str, Any]], Sequence[Any]] = attrs.field(repr=False)
    """``then(results)`` -> the further requests; their ``of`` may use ``results``."""


@attrs.frozen
class CrossTotal:
    """A statistic: the key in flat order laid out as a matrix of ``width`` columns, the float64
    product ``Lᵀ·R`` of the matrices of ``left(ctx, *inputs)`` and ``right(ctx, *inputs)`` (the
    sum over rows of their outer products): ``stats[name]`` is a float64 ``width × width``
    tensor. The engine gives such a method pieces of whole rows only when the method is
    row-wise (``rowwise=True``) and ``width`` divides a row along dim 0."""

    name: str
    """The key of the result in the method's ``stats``."""
    left: Callable[..., Any] = attrs.field(repr=False)
    """``left(ctx, *inputs)``: an element-wise function of the inputs."""
    right: Callable[..., Any] = attrs.field(repr=False)
    """``right(ctx, *inputs)``: an element-wise function of the inputs."""
    width: int
    """Columns of the matrices (elements per row)."""


@attrs.frozen
class RowStack:
    """A statistic: ``of(ctx, *inputs)`` for every piece of the key, its rows (along dim 0) put
    in place among the key's rows: ``stats[name]`` is one tensor whose row ``i`` is what ``of``
    gave for row ``i`` of the key (a transform of each row, such as an FFT along the last dims,
    kept for a later whole-key step). ``of`` returns, for a piece of ``r`` whole rows of the
    key, a tensor of ``r`` rows (any row shape and dtype, the same for every piece); the
    engine gives such a method pieces of whole rows only when it is row-wise (``rowwise=True``)."""

    name: str
    """The key of the result in the method's ``stats``."""
    of: Callable[..., Any] = attrs.field(repr=False)
    """``of(ctx, *inputs)``: the rows of the piece, transformed (its first dim: the piece's rows)."""


@attrs.frozen
class Derived:
    """A value computed once per key from the other statistics, after their passes (an SVD of
    a :class:`CrossTotal`, say), so a method called on many slices computes it only once:
    ``stats[name] = of(stats)``. Derived values are computed in the order requested."""

    name: str
    """The key of the result in the method's ``stats``."""
    of: Callable[[dict[str, Any]], Any] = attrs.field(repr=False)
    """``of(stats)``: the value, from the results of the requests before it."""


Statistic = Total | TopK | Then | CrossTotal | RowStack | Derived


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
    rowwise: bool = False
    """Each output row (an index along dim 0; a tensor of fewer than 2 dims is one row) depends
    only on the same row of the inputs, so the engine may evaluate a large key in slices of
    whole rows (the method is given them flattened; ``ctx.info.shape`` says the row length)."""
    statistics: Callable[..., Sequence[Any]] | None = attrs.field(default=None, repr=False)
    """``statistics(ctx, inputs, **hyperparameters)`` -> the :class:`Total` and :class:`TopK`
    the method needs over the whole key (``inputs``: how many tensors it is given); the function
    then receives their results as ``stats={name: value}``. With ``elementwise``, the engine
    computes them in passes over slices and calls the function on slices."""
    working_set: Callable[[TensorInfo, int, int], int] | None = attrs.field(default=None, repr=False)
    """``working_set(info, inputs, itemsize)`` -> bytes one call holds at its peak for a key
    of ``info``'s shape (``inputs`` tensors of ``itemsize`` bytes per element), for a method
    that cannot be sliced and needs more than its inputs and result (an SVD's factors). The
    scheduler admits the key only within the memory budget (alone when it needs all of it)."""
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
           accepts_missing: bool, check_spaces: Any, formula: str, elementwise: bool,
           statistics: Callable[..., Sequence[Any]] | None = None,
           working_set: Callable[[TensorInfo, int, int], int] | None = None, rowwise: bool = False) -> MergeMethod:
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
    if statistics is not None and "stats" not in sig.parameters:
        raise TypeError(f"{method_name}: a method with statistics takes them as a keyword-only 'stats'")
    for p in sig.parameters.values():
        if p.name == "stats" and statistics is not None:
            if p.kind != p.KEYWORD_ONLY:
                raise TypeError(f"{method_name}: make 'stats' keyword-only (after *)")
            continue
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
        elementwise=elementwise, rowwise=rowwise, statistics=statistics, working_set=working_set,
        check_spaces=check_spaces, formula=formula, doc=inspect.cleandoc(fn.__doc__ or ""),
    )


def merge_method(fn: Callable[..., Any] | None = None, *, name: str | None = None,
                 spaces: dict[str, str] | str | None = None, returns: str | None = None,
                 accepts_missing: bool = False, check_spaces: Callable[[dict[str, Any]], None] | None = None,
                 formula: str = "", elementwise: bool = False,
                 statistics: Callable[..., Sequence[Any]] | None = None,
                 working_set: Callable[[TensorInfo, int, int], int] | None = None, rowwise: bool = False) -> Any:
    """Declare a merge method; use bare (``@merge_method``) or with options.

    Options: ``name`` (default: the function's name); ``spaces``, a merge space for every input
    or a ``{input: space}`` map (inputs not named are generic: they must agree with each other,
    and the result is in their space); ``returns``, the result's space when fixed;
    ``accepts_missing``, pass ``None`` for inputs lacking a key instead of failing;
    ``check_spaces``, an extra check of the input spaces; ``formula``, a one-line definition;
    ``elementwise``, each output element depends only on the same element of each input (lets
    the engine work on slices of large tensors); ``statistics``, a function giving the
    whole-key statistics (:class:`Total`, :class:`TopK`) the method receives as ``stats`` (with
    ``elementwise``: element-wise given them, so large keys still run in slices);
    ``working_set``, ``(info, inputs, itemsize) -> bytes`` a call holds at its peak, for a
    method that cannot be sliced (the scheduler admits it within the memory budget);
    ``rowwise``, each output row depends only on the same row of the inputs (slices of whole
    rows, given flattened).
    """

    def wrap(f: Callable[..., Any]) -> MergeMethod:
        return _build(f, name=name, spaces=spaces, returns=returns, accepts_missing=accepts_missing,
                      check_spaces=check_spaces, formula=formula, elementwise=elementwise,
                      statistics=statistics, working_set=working_set, rowwise=rowwise)

    if fn is not None:
        return wrap(fn)
    return wrap


__all__ = ["MergeContext", "MergeMethod", "merge_method", "Total", "TopK", "Then", "Selection", "RANDOM_BLOCK",
           "CrossTotal", "RowStack", "Derived",
           "WEIGHT", "DELTA", "PARAM"]
