"""The ``@merge_method`` decorator: what a function's signature and the options declare."""

from __future__ import annotations

from typing import Literal

import pytest
import torch

from mecha_core import DELTA, PARAM, WEIGHT, MergeContext, MergeMethod, merge_method
from mecha_core.errors import MergeSpaceError, RecipeError
from mecha_core.specs import Architecture, Hyperparameter, MethodInput, TensorInfo


@merge_method
def scale_sum(a, b, *, factor: float = 3.0):
    """(a + b) * factor."""
    return (a + b) * factor


def test_bare_decorator_reads_inputs_and_hyperparameters_from_the_signature():
    assert isinstance(scale_sum, MergeMethod)
    assert scale_sum.name == "scale_sum"
    assert scale_sum.inputs == (MethodInput("a", None), MethodInput("b", None))
    assert scale_sum.hyperparameters == (Hyperparameter("factor", 3.0, float),)
    assert scale_sum.doc == "(a + b) * factor."
    assert (scale_sum.returns, scale_sum.accepts_missing, scale_sum.wants_context, scale_sum.elementwise) == (
        None, False, False, False)
    # the function itself is kept unchanged, for the engine to call per key
    assert scale_sum.function(torch.tensor([1.0]), torch.tensor([2.0]), factor=2.0).item() == 6.0


def test_options_are_recorded():
    def check(spaces):
        pass

    @merge_method(name="renamed", spaces={"a": WEIGHT}, returns=WEIGHT, accepts_missing=True,
                  check_spaces=check, formula="a + b", elementwise=True)
    def f(a, b=None, *, alpha: float = 0.5, steps: int = 2, mode: str = "x", on: bool = True, ctx):
        """
        Indented docstring,
            kept relative.
        """
        return a

    assert f.name == "renamed"
    assert f.inputs == (MethodInput("a", WEIGHT), MethodInput("b", None, optional=True))
    assert f.hyperparameters == (Hyperparameter("alpha", 0.5, float), Hyperparameter("steps", 2, int),
                                 Hyperparameter("mode", "x", str), Hyperparameter("on", True, bool))
    assert (f.returns, f.accepts_missing, f.wants_context, f.elementwise, f.formula) == (
        WEIGHT, True, True, True, "a + b")
    assert f.check_spaces is check
    assert f.doc == "Indented docstring,\n    kept relative."


def test_one_space_for_every_input_leaves_hyperparameters_alone():
    @merge_method(spaces=DELTA, returns=DELTA)
    def f(a, b, *models, alpha: float = 1.0, ctx):
        """Deltas only."""
        return a

    assert [(i.name, i.space, i.variadic) for i in f.inputs] == [
        ("a", DELTA, False), ("b", DELTA, False), ("models", DELTA, True)]
    assert f.variadic == MethodInput("models", DELTA, variadic=True)


def test_unannotated_or_non_scalar_annotations_accept_any_scalar():
    @merge_method
    def f(a, *, x=1, y: "float | None" = None, z: list = None):  # noqa: B006
        """x y z."""
        return a

    assert [h.kind for h in f.hyperparameters] == [None, None, None]


@pytest.mark.parametrize("source, message", [
    ("def f(a, *, alpha): return a", "f: hyperparameter 'alpha' needs a default"),
    ("def f(a, alpha=0.5): return a", "f: input 'alpha' may only default to None; make hyperparameters "
                                      "keyword-only (after *)"),
    ("def f(a, **extra): return a", "f: **extra is not supported"),
    ("def f(ctx, a): return a", "f: make 'ctx' keyword-only (after *)"),
])
def test_signatures_that_cannot_be_methods_are_refused(source, message):
    namespace: dict = {}
    exec(source, namespace)
    with pytest.raises(TypeError) as err:
        merge_method(namespace["f"])
    assert str(err.value) == message


def test_bad_spaces_are_refused():
    with pytest.raises(ValueError, match="unknown merge space 'weights'; use one of weight, delta, param"):
        merge_method(spaces={"a": "weights"})(lambda a: a)
    with pytest.raises(ValueError, match="unknown merge space 'x'"):
        merge_method(returns="x")(lambda a: a)
    with pytest.raises(TypeError, match=r"spaces given for unknown inputs \['c'\]"):
        merge_method(spaces={"c": WEIGHT})(lambda a, b: a)


def test_methods_compare_by_name():
    other = merge_method(name="scale_sum")(lambda a, b: a)
    assert other == scale_sum and hash(other) == hash(scale_sum)
    assert scale_sum != merge_method(lambda a, b: a)


# -- building recipe nodes -------------------------------------------------------------------------
def test_calling_a_method_builds_a_recipe_node_without_io(tmp_path):
    from mecha_core.recipe.nodes import CallNode, LiteralNode, ModelNode

    node = scale_sum(str(tmp_path / "missing-a.safetensors"), tmp_path / "missing-b.safetensors", factor=0.5)
    assert isinstance(node, CallNode)
    assert node.method is scale_sum
    assert node.args == (ModelNode(str(tmp_path / "missing-a.safetensors")),
                         ModelNode(str(tmp_path / "missing-b.safetensors")))
    assert node.kwargs == (("factor", LiteralNode(0.5)),)


@pytest.mark.parametrize("args, kwargs, message", [
    (("a",), {}, "scale_sum takes 2 input(s), got 1"),
    (("a", "b", "c"), {}, "scale_sum takes 2 input(s), got 3"),
    (("a", "b"), {"factr": 1.0}, "scale_sum has no hyperparameter 'factr'; did you mean 'factor'?"),
    (("a", "b"), {"zzz": 1.0}, "scale_sum has no hyperparameter 'zzz'; it takes factor"),
    (("a", 0.5), {}, "scale_sum: input 2 must be a model or a recipe, got 0.5"),
])
def test_wrong_calls_are_recipe_errors(args, kwargs, message):
    with pytest.raises(RecipeError) as err:
        scale_sum(*args, **kwargs)
    assert str(err.value) == message


def test_optional_and_variadic_arity():
    @merge_method
    def opt(a, b, c=None):
        """a, b and maybe c."""
        return a

    @merge_method
    def many(a, *rest):
        """one or more."""
        return a

    opt("a", "b")
    opt("a", "b", "c")
    with pytest.raises(RecipeError, match=r"opt takes 2 to 3 input\(s\), got 4"):
        opt("a", "b", "c", "d")
    many("a", "b", "c", "d")
    with pytest.raises(RecipeError, match=r"many takes at least 1 input\(s\), got 0"):
        many()


def test_merge_spaces_are_checked_when_the_node_is_built():
    @merge_method(spaces=WEIGHT, returns=DELTA)
    def diff(a, b):
        """a - b."""
        return a - b

    @merge_method(spaces={"a": WEIGHT})
    def needs_weight(a, b):
        """a with b."""
        return a

    @merge_method
    def same(a, b):
        """generic."""
        return a

    delta = diff("x", "y")
    assert delta.space == DELTA
    with pytest.raises(MergeSpaceError, match="needs_weight expects a in weight space; got a delta from diff"):
        needs_weight(delta, "z")
    assert needs_weight("z", delta).space == DELTA  # generic result: the space of b
    with pytest.raises(MergeSpaceError, match=r"same expects b in the same space as a \(delta\); got weights"):
        same(delta, _weight_node())


def _weight_node():
    from mecha_core.recipe.nodes import ModelNode

    return ModelNode("w.safetensors", type="base")


def test_check_spaces_reasons_become_merge_space_errors():
    def only_deltas(spaces):
        if spaces.get("b") == WEIGHT:
            raise ValueError("b must be a delta here")

    @merge_method(check_spaces=only_deltas)
    def picky(a, b):
        """a and b."""
        return a

    with pytest.raises(MergeSpaceError, match="picky: b must be a delta here"):
        picky(_weight_node(), _weight_node())


def test_result_space_of_fixed_and_generic_methods():
    @merge_method(spaces=PARAM)
    def fixed(a):
        """param in, nothing known about the result."""
        return a

    assert fixed.result_space([PARAM]) is None
    assert scale_sum.result_space([DELTA, DELTA]) == DELTA
    assert scale_sum.result_space([None, WEIGHT]) == WEIGHT


# -- the context ------------------------------------------------------------------------------------
def test_context_generator_depends_on_seed_and_key_only():
    info = TensorInfo((4,), "float32")
    a1 = torch.rand(4, generator=MergeContext("k1", info).generator(7))
    ctx = MergeContext("k1", TensorInfo((8,), "float16"), Architecture("sd1-ldm", {}))
    a2 = torch.rand(4, generator=ctx.generator(7))
    b = torch.rand(4, generator=MergeContext("k2", info).generator(7))
    c = torch.rand(4, generator=MergeContext("k1", info).generator(8))
    assert torch.equal(a1, a2)
    assert not torch.equal(a1, b) and not torch.equal(a1, c)


Mode = Literal["fast", "exact"]


@merge_method
def choosy(a, *, mode: Mode = "fast", level: Literal[1, 2, 3] = 1, mixed: Literal["x", 2] = "x"):
    """mode, level and mixed have fixed choices."""
    return a


def test_literal_annotations_give_a_kind_and_choices():
    assert choosy.hyperparameters == (Hyperparameter("mode", "fast", str, ("fast", "exact")),
                                      Hyperparameter("level", 1, int, (1, 2, 3)),
                                      Hyperparameter("mixed", "x", None, ("x", 2)))


def test_a_value_outside_the_choices_is_refused_when_the_call_is_built():
    from mecha_core.recipe.nodes import LiteralNode, ModelNode

    a = ModelNode("a.safetensors")
    assert choosy(a, mode="exact", level=3).kwargs == (("level", LiteralNode(3)), ("mode", LiteralNode("exact")))
    with pytest.raises(RecipeError, match=r'^choosy\(mode="Fast"\): use one of "fast", "exact"$'):
        choosy(a, mode="Fast")
    with pytest.raises(RecipeError, match=r"^choosy\(level=4\): use one of 1, 2, 3$"):
        choosy(a, level=4)
    with pytest.raises(RecipeError, match="expects an integer"):  # the kind is checked first
        choosy(a, level="1")


def test_a_default_outside_the_choices_is_a_declaration_error():
    with pytest.raises(TypeError, match=r"bad: hyperparameter 'mode' defaults to 'slow', which is not one of"):
        @merge_method
        def bad(a, *, mode: Mode = "slow"):
            return a
