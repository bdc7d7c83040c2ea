"""``mecha_core.testing.check_plugin``: every contract violation is reported, a good plugin passes."""

from __future__ import annotations

import pytest

from mecha_core.method import merge_method
from mecha_core.plugins import plugin_from_functions
from mecha_core.specs import Architecture, Converter, KeySpec, ModelType
from mecha_core.testing import check_plugin


@merge_method
def good(a, b, *, alpha: float = 1, mode: str = "mean", on: bool = False, count: int = 2, extra=None):
    """Good: alpha, mode, on, count and extra are all explained here."""
    return a


def methods(*items):
    return plugin_from_functions("p", mecha_merge_methods=lambda: list(items))


def key(**kw):
    return KeySpec((2, 3), "float16", "unet", **kw)


def arch(**kw):
    fields = dict(name="tiny", keys={"a.w": key(blocks=("IN00",), klass="proj")}, blocks=("IN00",),
                  classes=("proj",))
    fields.update(kw)
    return Architecture(**fields)


def test_a_plugin_that_keeps_the_contract_passes():
    plugin = plugin_from_functions(
        "fine", mecha_merge_methods=lambda: [good], mecha_architectures=lambda: [arch()],
        mecha_model_types=lambda: [ModelType("tiny-lora", "delta", detect=lambda keys: "lora" in keys)],
        mecha_converters=lambda: [Converter("c", "tiny", "tiny-lora", None, "delta", plan=lambda h: {})])
    assert check_plugin(plugin) == []


def test_a_plugin_that_fails_to_load_reports_only_that():
    def boom():
        raise ImportError("no such thing")

    assert check_plugin(plugin_from_functions("p", mecha_merge_methods=boom)) == [
        "plugin 'p': mecha_merge_methods() raised ImportError: no such thing"]


@pytest.mark.parametrize("make, problem", [
    (lambda: merge_method(lambda a: a), "merge method '<lambda>': the name must be a Python identifier"),
    (lambda: merge_method(name="class")(lambda a: a), "merge method 'class': the name must be a Python identifier"),
    (lambda: merge_method(name="merge")(lambda a: a), "merge method 'merge': the name hides mecha_core.merge"),
    (lambda: merge_method(name="undocumented")(lambda a: a), "merge method 'undocumented' has no docstring"),
])
def test_method_names_and_docstrings(make, problem):
    problems = check_plugin(methods(make()))
    assert any(p.startswith(problem) for p in problems), problems


def test_hyperparameters_must_be_documented_and_typed_defaults():
    @merge_method
    def sloppy(a, *, alpha: float = "0.5", beta: int = 0.5, flag: bool = 1, table=(1, 2), strength: float = 1.0):
        """Mentions alpha, beta, flag and table, but not the fifth one."""
        return a

    assert check_plugin(methods(sloppy)) == [
        "merge method 'sloppy': hyperparameter 'alpha' is annotated float but defaults to '0.5'",
        "merge method 'sloppy': hyperparameter 'beta' is annotated int but defaults to 0.5",
        "merge method 'sloppy': hyperparameter 'flag' is annotated bool but defaults to 1",
        "merge method 'sloppy': hyperparameter 'table' defaults to (1, 2); a default must be a number, string, "
        "bool or None",
        "merge method 'sloppy': the docstring does not mention hyperparameter 'strength'",
    ]


def test_a_name_provided_twice_by_one_plugin_is_reported():
    twin = merge_method(name="good")(lambda a: a)
    # both copies are still checked: the second one has no docstring
    assert check_plugin(methods(good, twin)) == ["merge method 'good' is provided by plugin 'p' and plugin 'p'",
                                                 "merge method 'good' has no docstring"]


def test_a_hook_returning_the_wrong_type_is_reported():
    assert check_plugin(plugin_from_functions("p", mecha_architectures=lambda: [good])) == [
        "plugin 'p': mecha_architectures() returned MergeMethod, expected Architecture"]


@pytest.mark.parametrize("make, problem", [
    (lambda: arch(keys={}), "architecture 'tiny' has no keys"),
    (lambda: arch(blocks=("IN00", "IN00")), "architecture 'tiny': blocks list ['IN00'] more than once"),
    (lambda: arch(classes=("proj", "attn-1")), "architecture 'tiny': classes ['attn-1'] are not names"),
    (lambda: arch(min_match=0), "architecture 'tiny': min_match must be a number in (0, 1], got 0"),
    (lambda: arch(keys={"a.w": key(blocks=("OUT05",))}),
     "architecture 'tiny': key 'a.w' is in blocks ['OUT05'] that the architecture does not list"),
    (lambda: arch(keys={"a.w": key(klass="mlp")}),
     "architecture 'tiny': key 'a.w' has class 'mlp' that the architecture does not list"),
    (lambda: arch(keys={"a.w": KeySpec((2, "3"), "float16", "unet")}),
     "architecture 'tiny': key 'a.w' has shape (2, '3')"),
    (lambda: arch(keys={"a.w": KeySpec((2,), "F16", "unet")}),
     "architecture 'tiny': key 'a.w' has dtype 'F16', not a torch dtype name"),
    (lambda: arch(keys={"a.w": key(), "b.w": key(aliases=("a.w",))}),
     "architecture 'tiny': alias 'a.w' of key 'b.w' is also a key of the architecture"),
])
def test_architecture_contract(make, problem):
    problems = check_plugin(plugin_from_functions("p", mecha_architectures=lambda: [make()]))
    assert len(problems) == 1 and problems[0].startswith(problem), problems


def _raises(keys):
    raise KeyError("x")


@pytest.mark.parametrize("model_type, problem", [
    (ModelType("t", "param", detect=lambda keys: False),
     "model type 't': space must be 'weight' or 'delta', got 'param'"),
    (ModelType("t", "delta", detect=_raises), "model type 't': detect(frozenset()) raised KeyError: 'x'"),
    (ModelType("t", "delta", detect=lambda keys: True), "model type 't': detect(frozenset()) must be False"),
    (ModelType("t", "delta", detect=lambda keys: None), "model type 't': detect(frozenset()) must be False"),
])
def test_model_type_contract(model_type, problem):
    problems = check_plugin(plugin_from_functions("p", mecha_model_types=lambda: [model_type]))
    assert len(problems) == 1 and problems[0].startswith(problem), problems


def test_converter_contract():
    loop = Converter("loop", "tiny", "base", "tiny", "base", plan=lambda h: {})
    assert check_plugin(plugin_from_functions("p", mecha_converters=lambda: [loop])) == [
        "converter 'loop' converts (tiny, base) to itself"]
    not_callable = Converter("nc", None, "a", None, "delta", plan="nope")
    assert check_plugin(plugin_from_functions("p", mecha_converters=lambda: [not_callable])) == [
        "converter 'nc': plan must be callable, got str"]
