"""Reading recipes written by sd-mecha, so users keep their history (docs/recipe-format.md).

Two generations exist (see ../shared/reference/sd-mecha-recipes.md for their grammar):

- ``version 0.1.0`` files (sd-mecha 1.x): ``dict``, ``literal``, ``model`` and ``merge`` lines,
  ``model_config=``/``merge_space=`` keywords, ``&N`` references to earlier instructions; every
  scalar hyperparameter goes through ``dict key=v`` -> ``literal`` -> ``convert_singleton``.
- unversioned files (sd-mecha 0.0.x): ``model "path" "arch" "type"``, ``parameter "name" "BASE"``,
  ``dict arch_component_block_name=v ...`` and ``merge "method" &0 &1 alpha=0.5``.

Both become ordinary mecha recipe graphs. sd-mecha method names map to mecha's through
:data:`METHODS`; what has no counterpart is a :class:`RecipeError` naming the line.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import attrs

from mecha_core.errors import RecipeError
from mecha_core.kit import CallNode, CoreOnly, Location, ModelNode, Node, RecipeHost, WeightMap, blocks, call, parameter
from mecha_core.specs import DELTA

from .dicts import era_a_dict

ERA_A, ERA_B = "unversioned", "0.1.0"


# -- the method table ---------------------------------------------------------------------------
@attrs.frozen
class MethodMap:
    """How one sd-mecha method becomes a mecha method call."""

    target: str
    """The mecha method's name."""
    positional: tuple[str, ...] = ()
    """sd-mecha 1.x writes these hyperparameters positionally, in this order, after the inputs."""
    defaults: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    """sd-mecha's defaults per generation (written explicitly, since mecha's may differ)."""
    ignore: dict[str, Any] = attrs.field(factory=dict)
    """sd-mecha-only hyperparameters, dropped when they hold this neutral value (else an error)."""
    build: Callable[..., Node] | None = None
    """A custom builder, for methods whose shape differs (``ties_sum``)."""
    node_hypers: tuple[str, ...] = ()
    """1.x hyperparameters that may be a merge result (a param-space tensor), passed to ``build``."""
    inputs: int | None = None
    """How many tensor inputs the 1.x method has, when ``node_hypers`` follow them positionally."""


def _from_deltas(ctx: "_Context", args: list[Node], what: str) -> tuple[Node, list[Node]]:
    """sd-mecha's TIES and Model Stock take deltas; mecha's take the base and the models. Deltas
    written ``subtract(model_i, base)`` with one base for all give that base and the models."""
    bases, models = [], []
    for a in args:
        if not (isinstance(a, CallNode) and a.method.name == "subtract" and len(a.args) == 2):
            raise ctx.fail(f"{what} maps to mecha only when every input is subtract(model, base)")
        models.append(a.args[0])
        bases.append(a.args[1])
    if not bases or any(b != bases[0] for b in bases[1:]):
        raise ctx.fail(f"{what} maps to mecha only when every delta is taken from the same base")
    return bases[0], models


def _ties_sum(ctx: "_Context", args: list[Node], hypers: dict[str, Any]) -> Node:
    """``ties_sum(*deltas, k, vote_sgn)`` -> ``subtract(ties(base, *models, density=k, vote=...), base)``.

    The two generations read ``vote_sgn`` the opposite way round. 1.x (a bool) elects signs by
    the sum of values when it is true and by the count of signs when false (its default). 0.0.x
    (a float, since 0.0.21; before, there was no switch and the vote was by value) elects by the
    sum of values when ``vote_sgn <= 0.0`` (its default 0.0) and by the count of signs otherwise:
    ``torch.sum(deltas if vote_sgn <= 0.0 else signs)`` in 0.0.29's ``ties_sum_deltas``. So
    0.0.29's ``vote_sgn=1.0`` is 1.1.8's ``vote_sgn=false`` (``vote="count"``).
    """
    base, models = _from_deltas(ctx, args, "ties_sum")
    vote_by_value = hypers.pop("vote_sgn", False)
    if ctx.era == ERA_A and isinstance(vote_by_value, (int, float)) and not isinstance(vote_by_value, bool):
        vote_by_value = vote_by_value <= 0  # 0.0.x: a float, and "on" meant the count of signs
    if not isinstance(vote_by_value, bool):
        raise ctx.fail(f"ties_sum: vote_sgn must be true or false, got {vote_by_value!r}")
    merged = {"density": hypers.pop("k"), "vote": "sum" if vote_by_value else "count", "alpha": 1.0,
              "trim": "sd_mecha", **hypers}  # sd-mecha keeps every entry tied with its threshold
    return ctx.call("subtract", [ctx.call("ties", [base, *models], merged), base], {})


def _cast(ctx: "_Context", args: list[Node], hypers: dict[str, Any]) -> Node:
    """sd-mecha's ``cast(a, device, dtype)``: mecha rounds through ``dtype`` on the merge's own
    device (the device argument is dropped); ``dtype=null`` changes nothing."""
    dtype = hypers.get("dtype")
    if dtype is None:
        if len(args) != 1:
            raise ctx.fail(f"cast takes 1 input, got {len(args)}")
        return args[0]
    return ctx.call("cast", args, {"dtype": dtype})


def _add_difference(ctx: "_Context", args: list[Node], hypers: dict[str, Any]) -> Node:
    """``add_difference(a, b, alpha)``; an alpha computed by a mask method (how sd-mecha 1.x
    writes train difference: ``alpha=train_difference_mask(a, b, c)``) multiplies b entry by
    entry, as sd-mecha's ``a.addcmul(b, alpha)`` does."""
    alpha = hypers.get("alpha")
    if isinstance(alpha, Node):
        if len(args) != 2 or set(hypers) != {"alpha"}:
            raise ctx.fail("add_difference with a computed alpha takes a and a delta b")
        return ctx.call("sdmecha_add_difference_masked", [*args, alpha], {})
    return ctx.call("add_difference", args, hypers)


def _dropout(ctx: "_Context", args: list[Node], hypers: dict[str, Any]) -> Node:
    """sd-mecha's ``dropout``: a null seed draws from fresh entropy in sd-mecha (no two runs
    agree), which mecha's reproducible merges cannot give."""
    if hypers.get("seed") is None:
        raise ctx.fail("dropout with seed=null draws new random masks on every sd-mecha run; no "
                       "merge can reproduce it: give the recipe a seed")
    overlap = hypers.get("overlap", 1.0)
    if not isinstance(overlap, (int, float)) or overlap % 2 != 1:
        raise ctx.fail(f"dropout with overlap={overlap!r} fails in sd-mecha 1.1.8 itself (torch.lerp on "
                       f"numpy arrays); only odd integer overlaps are read")
    return ctx.call("sdmecha_dropout", args, hypers)


def _rotate(ctx: "_Context", args: list[Node], hypers: dict[str, Any]) -> Node:
    """``rotate``: with an integer alignment mecha's rotate is sd-mecha's (the Stiefel settings
    only tune sd-mecha's fractional path); a fractional alignment (or one from a block map) takes
    sd-mecha's own eigendecomposition and Stiefel geodesic, which mecha's rotate does not."""
    alignment = hypers.get("alignment", 1.0)
    if isinstance(alignment, (int, float)) and float(alignment).is_integer():
        return ctx.call("rotate", args, {k: v for k, v in hypers.items() if not k.startswith("stiefel_")})
    return ctx.call("sdmecha_rotate", args, hypers)


_TIES_EXTENDED = {"k": 0.2, "vote_sgn": False, "apply_stock": False, "apply_median": False, "cos_eps": 1e-6,
                  "eps": 1e-6, "maxiter": 100, "ftol": 1e-20}
_ROTATE = {"alignment": 1.0, "alpha": 0.0, "centralization": 1.0, "stiefel_eps": 1e-8, "stiefel_max_iters": 100}

#: sd-mecha method name -> how to build it in mecha. A name not listed has no counterpart.
#: Targets starting with ``sdmecha_`` are this plugin's own methods, written from sd-mecha 1.1.8's
#: definitions where mecha's differ (docs/recipe-format.md has the table).
METHODS: dict[str, MethodMap] = {
    "weighted_sum": MethodMap("weighted_sum", ("alpha",), {ERA_A: {"alpha": 0.5}, ERA_B: {"alpha": 0.5}}),
    "slerp": MethodMap("slerp", ("alpha",), {ERA_A: {"alpha": 0.5}, ERA_B: {"alpha": 0.5}}),
    "add_difference": MethodMap("add_difference", ("alpha",), {ERA_A: {"alpha": 0.5}, ERA_B: {"alpha": 1.0}},
                                build=_add_difference, node_hypers=("alpha",), inputs=2),
    "subtract": MethodMap("subtract"),
    "n_average": MethodMap("n_average"),
    "fallback": MethodMap("fallback"),
    "clamp": MethodMap("clamp", (), {ERA_A: {"stiffness": 0.0}, ERA_B: {"stiffness": 0.0}}),
    "cast": MethodMap("cast", ("device", "dtype"), ignore={"device": "*"}, build=_cast),
    "train_difference": MethodMap("train_difference", ("alpha",), {ERA_A: {"alpha": 1.0}}),
    "add_cosine_a": MethodMap("add_cosine_a", ("alpha",), {ERA_A: {"alpha": 1.0}, ERA_B: {"alpha": 1.0}}),
    "add_cosine_b": MethodMap("add_cosine_b", ("alpha",), {ERA_A: {"alpha": 1.0}, ERA_B: {"alpha": 1.0}}),
    # 1.x writes all five positionally: sd-mecha's own definition (fractional powers through its
    # eigendecomposition, its Stiefel iteration on wide keys)
    "rotate": MethodMap("sdmecha_rotate", tuple(_ROTATE), {ERA_B: {"alignment": 1.0, "alpha": 0.0}},
                        ignore={"cache": "*"}, build=_rotate),
    "geometric_median": MethodMap("geometric_median"),
    "pick_component": MethodMap("pick_component", ("component",)),
    "omit_component": MethodMap("omit_component", ("component",)),
    "ties_sum": MethodMap("ties", (), {ERA_A: {"k": 0.2, "vote_sgn": 0.0}, ERA_B: {"k": 1.0, "vote_sgn": False}},
                          build=_ties_sum),
    # sd-mecha 1.1.8's own definitions (1.x names and parameter orders)
    "train_difference_mask": MethodMap("sdmecha_train_difference_mask", ("alpha",), {ERA_B: {"alpha": 1.0}}),
    "add_opposite_mask": MethodMap("sdmecha_add_opposite_mask", ("alpha",), {ERA_B: {"alpha": 1.0}}),
    "add_strict_opposite_mask": MethodMap("sdmecha_add_strict_opposite_mask", ("alpha",), {ERA_B: {"alpha": 1.0}}),
    "perpendicular_component": MethodMap("sdmecha_perpendicular_component"),
    "geometric_sum": MethodMap("sdmecha_geometric_sum", ("alpha",), {ERA_A: {"alpha": 0.5}, ERA_B: {"alpha": 0.5}}),
    "multiply_quotient": MethodMap("sdmecha_multiply_quotient", ("alpha",), {ERA_B: {"alpha": 1.0}}),
    "scale": MethodMap("sdmecha_scale", ("alpha",), {ERA_B: {"alpha": 1.0}}),
    "model_stock": MethodMap("sdmecha_model_stock", (), {ERA_B: {"cos_eps": 1e-6}}),
    "crossover": MethodMap("sdmecha_crossover", ("alpha", "tilt"), {ERA_B: {"alpha": 0.5, "tilt": 0.0}}),
    "dropout": MethodMap("sdmecha_dropout", (), {ERA_B: {"probability": 0.9, "rescale": 1.0, "overlap": 1.0,
                                                        "overlap_emphasis": 0.0, "seed": None}}, build=_dropout),
    "ties_sum_extended": MethodMap("sdmecha_ties_sum_extended", (), {ERA_B: dict(_TIES_EXTENDED)}),
    "ties_sum_with_dropout": MethodMap("sdmecha_ties_sum_with_dropout", (), {ERA_B: {
        **_TIES_EXTENDED, "probability": 0.9, "della_eps": 0.0, "rescale": True, "seed": None}}),
    "tensor_sum": MethodMap("sdmecha_tensor_sum", ("width", "offset"), {ERA_B: {"width": 0.5, "offset": 0.0}}),
    "top_k_tensor_sum": MethodMap("sdmecha_top_k_tensor_sum", ("width", "offset"),
                                  {ERA_B: {"width": 1.0, "offset": 0.0}}),
}

#: Where an unversioned (0.0.x) method of that name is not 1.1.8's: read as before (mecha's own).
METHODS_ERA_A: dict[str, MethodMap] = {
    "rotate": MethodMap("rotate", ("alignment", "alpha"), {ERA_A: {"alignment": 1.0, "alpha": 0.0}},
                        ignore={"cache": "*"}),
}

#: Methods read for 1.x files only: 0.0.29's method of that name computes something else (or,
#: for the masks, does not exist). perpendicular_component and geometric_sum are the same in both.
ERA_B_ONLY = frozenset(name for name, spec in METHODS.items() if spec.target.startswith("sdmecha_")) - {
    "rotate", "perpendicular_component", "geometric_sum"}

#: sd-mecha 1.1.8 builtin methods a recipe can name but mecha does not read, and why.
REFUSED = {
    "exchange_ema": "it swaps a checkpoint's EMA keys for its model keys, which mecha's per-key methods "
                    "cannot do",
    "get_dtype": "it returns a dtype name, not a tensor",
    "get_device": "it returns a device name, not a tensor",
    "stack": "it changes every key's shape, which no merged checkpoint keeps",
    "omit_non_finite": "it drops keys whose values are not finite; mecha refuses non-finite outputs instead",
    "truncate_rank": "its SVD truncation (a randomised basis by default) has no mecha counterpart yet",
    "get_rank_from_ratio": "it computes an integer hyperparameter from a tensor, which mecha's hyperparameters "
                           "cannot be",
    "truncate_kronecker": "its Kronecker-factor truncation has no mecha counterpart",
    "rebasin": "its permutation alignment (git re-basin) needs sd-mecha's per-architecture permutation graphs",
    "randperm": "its random permutations need sd-mecha's per-architecture permutation graphs",
    "balance_attention": "it needs sd-mecha's per-architecture attention tables",
}

#: sd-mecha 1.x block-map conversions: the block naming is the supermerger/MBW one mecha uses.
BLOCK_CONVERSIONS = {
    "convert_sd1_blocks_to_ldm": ("sd1-supermerger_blocks", "sd1-ldm"),
    "convert_sdxl_blocks_to_sgm": ("sdxl-supermerger_blocks", "sdxl-sgm"),
}

#: sd-mecha model configs -> mecha architectures (names not listed are used as they are).
CONFIGS = {"sd1-ldm": "sd1-ldm", "sdxl-sgm": "sdxl-sgm", "sd3-sgm": "sd3-comfyui",
           "sdxl-diffusers_unet_only": "sdxl-diffusers-unet"}


# -- values -------------------------------------------------------------------------------------
class _Dict(dict):
    """sd-mecha's ``dict k=v ...``; remembers its line for error messages."""

    line: int = 0


@attrs.frozen
class _Literal:
    """sd-mecha's ``literal VALUE model_config=... merge_space=...``."""

    value: Any
    config: str | None


@attrs.frozen
class _PendingPick:
    """sd-mecha's ``pick_component(a, c)``/``omit_component(a, c)`` on weights, which keep only
    some keys; sd-mecha writes ``fallback(that, b)`` next to fill the rest. mecha's methods
    cannot drop keys, so the pair becomes ``pick_component(a, b, component=c)``."""

    target: str
    input: Node
    hypers: dict
    line: int

    def build(self, ctx: "_Context") -> Node:
        """The method on its own (an error for weights: it names the pick's line)."""
        here, ctx.line = ctx.line, self.line
        try:
            return ctx.call(self.target, [self.input], self.hypers)
        finally:
            ctx.line = here


_NUMBER = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|[-+]?inf")


def _split(text: str, *, escapes: bool, fail: Callable[[str, int], RecipeError]) -> list[tuple[str, int]]:
    """Space-separated words; a double-quoted word keeps its quotes (and spaces)."""
    words: list[tuple[str, int]] = []
    i, n = 0, len(text)
    while i < n:
        if text[i] in " \t":
            i += 1
            continue
        start = i
        while i < n and text[i] not in " \t":
            if text[i] == '"':
                i += 1
                while i < n and text[i] != '"':
                    i += 2 if escapes and text[i] == "\\" else 1
                if i >= n:
                    raise fail("unterminated string", start + 1)
            i += 1
        words.append((text[start:i], start + 1))
    return words


class _Context:
    def __init__(self, source: str, base_dir: str | None, host: RecipeHost, era: str):
        self.source, self.base_dir, self.host, self.era = source, base_dir, host, era
        self.file = None if source == "<recipe>" else source
        self.values: list[Any] = []
        self.line = 0
        self.column = 1

    def fail(self, message: str, column: int | None = None) -> RecipeError:
        return RecipeError(f"sd-mecha recipe: {message}", source=self.source, line=self.line,
                           column=column or self.column)

    def value(self, word: str, column: int) -> Any:
        if word.startswith("&"):
            if not word[1:].isdigit() or len(word) > 12:
                raise self.fail(f"bad reference {word[:20]!r}", column)
            index = int(word[1:])
            if index >= len(self.values):
                raise self.fail(f"{word} refers to instruction {index}, which is not defined before this "
                                f"line (references go to earlier instructions, counted from 0)", column)
            return self.values[index]
        if word.startswith('"'):
            body = word[1:-1]
            if self.era == ERA_B:
                body = re.sub(r"\\(.)", r"\1", body)
            return body
        if word in ("null", "true", "false"):
            return {"null": None, "true": True, "false": False}[word]
        if _NUMBER.fullmatch(word):
            if any(c in word for c in ".eEn"):
                return float(word)
            try:
                return int(word)
            except ValueError:  # Python refuses to convert integers of over 4300 digits
                raise self.fail(f"number of {len(word)} digits is too long", column) from None
        raise self.fail(f"cannot read {word!r} (expected &N, a \"string\", a number, true, false or null)", column)

    def where(self, column: int | None = None) -> Location:
        """The current instruction's place, for the nodes it builds."""
        return Location(self.file, self.line, column or self.column)

    def call(self, name: str, args: list[Node], hypers: dict[str, Any]) -> Node:
        try:
            method = self.host.method(name)
        except RecipeError:
            raise self.fail(f"needs mecha's '{name}' merge method, which no installed plugin provides "
                            f"(`mecha methods` lists them)") from None
        try:
            return call(method, tuple(args), hypers, where=self.where())
        except RecipeError as exc:
            raise self.fail(f"{exc}") from None


# -- hyperparameter values ----------------------------------------------------------------------
def _hyper(ctx: _Context, name: str, value: Any) -> Any:
    """An sd-mecha hyperparameter value as a mecha one: a scalar, a string or a block map."""
    if isinstance(value, _Literal):
        value = _from_literal(ctx, value)
    if isinstance(value, dict):
        if ctx.era == ERA_A:
            used_at = ctx.line, ctx.column
            ctx.line, ctx.column = getattr(value, "line", ctx.line), 1  # errors name the dict's line
            try:
                return era_a_dict(value, ctx.host, ctx.fail)
            finally:
                ctx.line, ctx.column = used_at
        raise ctx.fail(f"{name}: a dict must go through literal and a convert_* merge")
    if isinstance(value, Node):
        raise ctx.fail(f"{name}: a model or merge result cannot be a hyperparameter in mecha")
    return value


def _from_literal(ctx: _Context, lit: _Literal) -> Any:
    value = lit.value
    if not isinstance(value, dict):
        return value
    config = lit.config
    if config == "singleton-mecha" or (config is None and set(value) == {"key"}):
        return value.get("key")
    for source_config, arch in BLOCK_CONVERSIONS.values():
        if config == source_config:
            return _block_map(ctx, arch, value)
    raise ctx.fail(f"a literal dict in model_config {config!r} has no mecha counterpart "
                   f"(mecha maps singleton-mecha and *-supermerger_blocks dicts)")


def _block_map(ctx: _Context, arch: str, value: dict[str, Any]) -> WeightMap:
    try:
        return blocks(arch, **value)
    except RecipeError as exc:
        raise ctx.fail(str(exc)) from None


# -- instructions -------------------------------------------------------------------------------
def _keywords(ctx: _Context, words: list[tuple[str, int]]) -> tuple[list[Any], list[int], dict[str, Any]]:
    positional: list[Any] = []
    columns: list[int] = []
    keywords: dict[str, Any] = {}
    for word, column in words:
        if "=" in word and not word.startswith(('"', "&")):
            key, _, raw = word.partition("=")
            if key in keywords:
                raise ctx.fail(f"{key}= is given twice", column)
            keywords[key] = ctx.value(raw, column + len(key) + 1)
        else:
            if keywords:
                raise ctx.fail("positional values must come before key=value pairs", column)
            positional.append(ctx.value(word, column))
            columns.append(column)
    return positional, columns, keywords


def _arch(ctx: _Context, name: Any) -> str | None:
    """A model's architecture, when the installed plugins know it; else detected at merge time."""
    if name is None:
        return None
    try:
        return ctx.host.architecture(CONFIGS.get(name, name)).name
    except RecipeError:
        return None


def _model(ctx: _Context, positional: list[Any], keywords: dict[str, Any]) -> ModelNode:
    if not positional or not all(isinstance(p, str) for p in positional) or len(positional) > 3:
        raise ctx.fail('model takes a path: model "file.safetensors" ...')
    path = positional[0]
    if ctx.era == ERA_A:
        arch = _arch(ctx, positional[1]) if len(positional) > 1 else None
        kind = positional[2] if len(positional) > 2 else None
        mtype = "base" if kind in ("base", None) else None  # others (lora): detected at merge time
        return ModelNode(path, arch, mtype, base_dir=ctx.base_dir, where=ctx.where())
    unknown = set(keywords) - {"model_config", "merge_space"}
    if unknown or len(positional) != 1:
        raise ctx.fail(f"model takes a path and model_config=/merge_space= (got {sorted(unknown) or positional})")
    space = keywords.get("merge_space")
    if space not in (None, "weight", "delta"):
        raise ctx.fail(f"a model in merge_space {space!r} has no mecha counterpart (weight or delta)")
    config = keywords.get("model_config")
    arch = _arch(ctx, config)
    # A config mecha has no architecture for (a LoRA layout such as "sd1-kohya_kohya_lora") is a
    # file only a model-type plugin reads: its type is detected, not forced to a plain delta.
    mtype = {"weight": "base", "delta": "delta", None: None}[space] if config is None or arch else None
    return ModelNode(path, arch, mtype, base_dir=ctx.base_dir, where=ctx.where())


def _merge(ctx: _Context, name: Any, positional: list[Any], keywords: dict[str, Any]) -> Any:
    if not isinstance(name, str):
        raise ctx.fail('merge takes a method name first: merge "weighted_sum" &0 &1 ...')
    if name == "convert_singleton":
        if len(positional) != 1 or keywords:
            raise ctx.fail("convert_singleton takes one literal")
        return _hyper(ctx, name, positional[0])
    if name in BLOCK_CONVERSIONS:
        source_config, arch = BLOCK_CONVERSIONS[name]
        lit = positional[0] if len(positional) == 1 else None
        if not (isinstance(lit, _Literal) and isinstance(lit.value, dict)):
            raise ctx.fail(f"{name} takes one literal block dict")
        return _block_map(ctx, arch, lit.value)
    if name == "fallback" and positional and isinstance(positional[0], _PendingPick) and len(positional) == 2 \
            and isinstance(positional[1], Node) and not keywords:
        pending = positional[0]
        return ctx.call(pending.target, [pending.input, positional[1]], pending.hypers)
    positional = [p.build(ctx) if isinstance(p, _PendingPick) else p for p in positional]
    spec = (METHODS_ERA_A.get(name) if ctx.era == ERA_A else None) or METHODS.get(name)
    if ctx.era == ERA_A and name in ERA_B_ONLY:
        raise ctx.fail(f"sd-mecha method '{name}' is read from 1.x recipes only: its 0.0.x definition differs "
                       f"from 1.1.8's, which mecha reproduces; re-save the recipe with sd-mecha 1.x or write "
                       f"this step as a mecha recipe")
    if spec is None:
        why = REFUSED.get(name)
        if why is None and name.startswith("exchange_ema_"):
            why = REFUSED["exchange_ema"]
        readable = {*METHODS, "convert_singleton", *BLOCK_CONVERSIONS} - (ERA_B_ONLY if ctx.era == ERA_A else set())
        generation = "unversioned (0.0.x)" if ctx.era == ERA_A else "1.x"
        raise ctx.fail(f"sd-mecha method '{name}' has no mecha counterpart" + (
            f": {why}; write this step as a mecha recipe" if why else
            f" in {generation} recipes (read: {', '.join(sorted(readable))})"))
    inputs = [p for p in positional if isinstance(p, Node)]
    if ctx.era == ERA_B and spec.node_hypers:  # a result written where a hyperparameter goes
        inputs = inputs[:spec.inputs]
    extra = positional[len(inputs):]
    result_allowed = [ctx.era == ERA_B and i < len(spec.positional) and spec.positional[i] in spec.node_hypers
                      for i in range(len(extra))]
    if any(isinstance(p, Node) and not ok for p, ok in zip(extra, result_allowed)):
        raise ctx.fail("models and results must come before hyperparameter values")
    if len(extra) > len(spec.positional):
        raise ctx.fail(f"{name} takes {len(spec.positional)} hyperparameter(s) after its inputs, got {len(extra)}")
    given = dict(zip(spec.positional, extra))
    for key, value in keywords.items():
        if key in given:
            raise ctx.fail(f"{name}: {key} is given twice")
        given[key] = value
    hypers = dict(spec.defaults.get(ctx.era, {}))
    for key, value in given.items():
        keep = ctx.era == ERA_B and key in spec.node_hypers and isinstance(value, Node)
        hypers[key] = value if keep else _hyper(ctx, f"{name}({key}=...)", value)
    for key, neutral in spec.ignore.items():
        if key in hypers:
            value = hypers.pop(key)
            if neutral != "*" and value != neutral:
                raise ctx.fail(f"{name}: {key}={value!r} has no mecha counterpart (only {neutral!r} maps)")
    if spec.build is not None:
        return spec.build(ctx, inputs, hypers)
    if name in ("pick_component", "omit_component") and len(inputs) == 1 and inputs[0].space != DELTA:
        return _PendingPick(spec.target, inputs[0], hypers, ctx.line)  # see _PendingPick
    return ctx.call(spec.target, inputs, hypers)


def _instruction(ctx: _Context, text: str) -> Any:
    words = _split(text, escapes=ctx.era == ERA_B, fail=lambda msg, col: ctx.fail(msg, col))
    op, op_column = words[0]
    ctx.column = op_column
    positional, columns, keywords = _keywords(ctx, words[1:])
    if op == "dict":
        if positional:
            raise ctx.fail("dict takes only key=value pairs", columns[0])
        out = _Dict(keywords)
        out.line = ctx.line
        return out
    if op == "literal" and ctx.era == ERA_B:
        if len(positional) != 1 or set(keywords) - {"model_config", "merge_space"}:
            raise ctx.fail("literal takes one value and model_config=/merge_space=")
        value = positional[0]
        return _Literal(value.value if isinstance(value, _Literal) else value, keywords.get("model_config"))
    if op == "model":
        return _model(ctx, positional, keywords)
    if op == "merge":
        if not positional:
            raise ctx.fail('merge takes a method name: merge "weighted_sum" &0 &1 ...')
        ctx.column = columns[0]
        return _merge(ctx, positional[0], positional[1:], keywords)
    if op == "parameter" and ctx.era == ERA_A:
        if not positional or not isinstance(positional[0], str):
            raise ctx.fail('parameter takes a name: parameter "name" "BASE"')
        try:  # the space sd-mecha 0.0.x writes is always "BASE", whatever the real one: not kept
            return parameter(positional[0], where=ctx.where())
        except RecipeError as exc:
            raise ctx.fail(str(exc)) from None
    if op in ("lora", "call"):
        raise ctx.fail(f"'{op}' lines come from sd-mecha 0.0.2/0.0.3, which mecha does not read; "
                       f"re-save the recipe with sd-mecha 0.0.23 or write it as a mecha recipe")
    known = "dict, literal, model, merge" if ctx.era == ERA_B else "model, parameter, dict, merge"
    raise ctx.fail(f"unknown instruction '{op}' (sd-mecha {ctx.era} recipes use {known})", op_column)


def load_sd_mecha(text: str, *, source: str = "<recipe>", base_dir: str | None = None,
                  host: RecipeHost | None = None) -> Node:
    """A mecha recipe graph from sd-mecha recipe text of either generation.

    ``host`` resolves method names and architectures (without one only the core's operators
    are known); every node built remembers its :class:`Location`."""
    host = host or CoreOnly()
    lines = [(n, raw.removesuffix("\r")) for n, raw in enumerate(text.split("\n"), 1)]
    body = [(n, ln) for n, ln in lines if ln.strip() and not ln.strip().startswith("#")]
    if not body:
        raise RecipeError("the recipe is empty", source=source, line=1)
    era = ERA_A
    first_line, first = body[0]
    if first.strip().startswith("version "):
        version = first.strip()[len("version "):].strip()
        if version != ERA_B:
            raise RecipeError(f"sd-mecha recipe version {version} is not supported (mecha reads 0.1.0 and the "
                              f"older unversioned form)", source=source, line=first_line, column=9)
        era = ERA_B
        body = body[1:]
    ctx = _Context(source, base_dir, host, era)
    for number, line in body:
        ctx.line = number
        ctx.values.append(_instruction(ctx, line))
    if not ctx.values:
        raise RecipeError("the recipe has no instruction after its version line", source=source, line=first_line)
    root = ctx.values[-1]
    if isinstance(root, _PendingPick):  # never filled by a fallback: the error mecha's method gives
        root = root.build(ctx)
    if not isinstance(root, Node):
        raise RecipeError("the last instruction must be a model or a merge (it is the recipe's result)",
                          source=source, line=ctx.line)
    return root


def detect(text: str, path: str | None) -> bool:
    """Whether ``text`` is an sd-mecha recipe: 1.x files start with ``version``, unversioned ones
    with a ``model "``/``merge "``/``parameter "``/``dict`` instruction (or the 0.0.2 ``lora "``/
    ``call "`` lines, read only to say they are too old)."""
    first = next((ln.strip() for ln in text.split("\n") if ln.strip() and not ln.strip().startswith("#")), "")
    return first == "dict" or first.startswith(("version ", 'model "', 'merge "', 'parameter "', 'lora "', 'call "',
                                                 "dict ", "dict\t"))


__all__ = ["METHODS", "METHODS_ERA_A", "BLOCK_CONVERSIONS", "CONFIGS", "REFUSED", "MethodMap", "detect",
           "load_sd_mecha"]
