"""Property-based fuzzing of the recipe parser: any text gives a recipe or a MechaError (naming
the recipe line where there is one), never another exception. Fixed budget for CI."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import mecha_methods.plugin
from mecha_core import dump_recipe, load_recipe
from mecha_core.errors import MechaError, RecipeError
from mecha_core.recipe.nodes import Node
from mecha_core.testing import host_with
from mecha_core.plugins import use_host

FUZZ = settings(max_examples=200, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

HOST = host_with(mecha_methods.plugin)

VALID = """\
mecha 1
# a comment
a = model("a.safetensors")
b = model("b.safetensors", arch="sd1-ldm", type="base")
d = subtract(a, b)
w = parameter("w", space="weight")
mix = weighted_sum(a, w, alpha=0.25)
out = add_difference(mix, a, b, alpha=-1.5e-3) | n_average(a, b, mix)
final = add(out, scale(d, alpha=2)) | fallback(a, b)
"""

TOKENS = ["mecha", "1", "a", "b", "m", "=", "(", ")", ",", "|", "[", "]", "model", "parameter", "blocks",
          "classes", "weighted_sum", "add_difference", "subtract", "n_average", "fallback", "scale",
          "alpha", "space", "arch", "type", "default", '"a.safetensors"', '"sd1-ldm"', '"weight"', '"delta"',
          "0.5", "-1", "1e308", "1e999", "inf", "-inf", "nan", "true", "false", "null", '"\\u0000"', '"\\q"',
          '"', "#", "\n", "\n", " ", "\t", "\r", "\ufeff", "é", "$", "@"]


def check(text: str) -> None:
    try:
        result = load_recipe(text, host=HOST)
    except MechaError as exc:
        if isinstance(exc, RecipeError) and exc.line is not None:
            assert 1 <= exc.line <= max(1, text.count("\n") + text.count("\r") + 1)
        return
    assert isinstance(result, Node)


@FUZZ
@given(text=st.text(max_size=200))
def test_random_text(text):
    check("\n" + text)  # a newline makes load_recipe read it as text, not as a path


@FUZZ
@given(body=st.text(max_size=200))
def test_random_text_after_the_header(body):
    check("mecha 1\n" + body)


@FUZZ
@given(lines=st.lists(st.lists(st.sampled_from(TOKENS), max_size=14).map(" ".join), min_size=1, max_size=6))
def test_random_token_sequences(lines):
    check("mecha 1\n" + "\n".join(lines) + "\n")


NAMES = ["a", "b", "c", "m"]
PRELUDE = 'mecha 1\na = model("a")\nb = model("b")\nc = model("c", type="delta")\n'
METHODS = ["weighted_sum", "add_difference", "subtract", "n_average", "fallback", "scale", "add", "nope"]
scalars = (st.integers(-3, 3) | st.floats(-2, 2, allow_nan=False) | st.sampled_from(["inf", "-inf", "1e999", "true",
           "null", '"text"', "[0.5, 1]", "[]"]))


def _expression(depth: int) -> st.SearchStrategy[str]:
    leaf = st.sampled_from(NAMES) | st.builds(lambda p, t: f'model("{p}"{t})',
                                              st.sampled_from(["a", "b.safetensors", ""]),
                                              st.sampled_from(["", ', type="delta"', ', type="base"', ', arch="x"',
                                                               ', type="lora"']))
    if depth == 0:
        return leaf
    inner = _expression(depth - 1)
    call = st.builds(
        lambda method, args, kwargs: f"{method}({', '.join([*args, *(f'{k}={v}' for k, v in kwargs)])})",
        st.sampled_from(METHODS), st.lists(inner, max_size=4),
        st.lists(st.tuples(st.sampled_from(["alpha", "alpah", "seconds"]), scalars.map(str)), max_size=2))
    return leaf | call | st.builds(lambda x, y: f"{x} | {y}", inner, inner) | st.builds(
        lambda x: f'parameter("{x}")', st.sampled_from(["p", "q", ""]))


@FUZZ
@given(lines=st.lists(st.tuples(st.sampled_from(["m", "n", None]), _expression(2)), min_size=1, max_size=4))
def test_grammar_shaped_recipes_parse_or_fail_cleanly_and_round_trip(lines):
    """Lines shaped like real ones reach the method, arity, keyword and space checks. Whatever
    parses also prints and parses back to the same graph."""
    text = PRELUDE + "".join(f"{name} = {expr}\n" if name else f"{expr}\n" for name, expr in lines)
    check(text)
    try:
        node = load_recipe(text, host=HOST)
    except MechaError as exc:
        event(type(exc).__name__)
        return
    event("parsed")
    with use_host(HOST):
        printed = dump_recipe(node)
    assert load_recipe(printed, host=HOST) == node, (text, printed)


@FUZZ
@given(edits=st.lists(st.tuples(st.sampled_from(["delete", "insert", "replace", "swap_lines", "drop_line"]),
                                st.integers(0, 10**6), st.integers(0, 10**6),
                                st.sampled_from(TOKENS) | st.text(max_size=3)), min_size=1, max_size=4))
def test_mutated_valid_recipes(edits):
    text = VALID
    for kind, i, j, piece in edits:
        if kind in ("swap_lines", "drop_line"):
            lines = text.split("\n")
            x, y = i % len(lines), j % len(lines)
            if kind == "swap_lines":
                lines[x], lines[y] = lines[y], lines[x]
            else:
                del lines[x]
            text = "\n".join(lines)
            continue
        position = i % (len(text) + 1)
        if kind == "delete":
            text = text[:position] + text[position + 1 + j % 8:]
        elif kind == "insert":
            text = text[:position] + piece + text[position:]
        else:
            text = text[:position] + piece + text[position + len(piece):]
    check(text)


@FUZZ
@given(name=st.text(max_size=60).filter(lambda s: "\n" not in s))
def test_random_single_line_is_read_as_a_path(name, tmp_path_factory):
    """One line without a newline names a recipe file; odd names are errors, not crashes."""
    folder = tmp_path_factory.getbasetemp()
    cwd = os.getcwd()
    os.chdir(folder)  # relative names resolve inside pytest's own temporary folder
    try:
        check(name)
    finally:
        os.chdir(cwd)


def test_the_valid_recipe_parses():
    """The mutations start from a recipe that parses (so most mutants are near-valid)."""
    node = load_recipe(VALID, host=HOST)
    assert node.method.name == "fallback"


@pytest.mark.parametrize("text", ["mecha 1\nm = weighted_sum(\n", "mecha 1\n\x00\n", "\n\n\n"])
def test_known_bad_texts_are_recipe_errors(text):
    with pytest.raises(RecipeError):
        load_recipe(text, host=HOST)


@pytest.mark.parametrize("depth", [50, 5000])
def test_deep_nesting_in_one_line(depth):
    check("mecha 1\na = model(\"a\")\nm = " + "scale(" * depth + "a" + ")" * depth + "\n")


@pytest.mark.parametrize("length", [50, 3000])
def test_long_chains_of_results(length):
    lines = ["mecha 1", 'x0 = model("a")'] + [f"x{i} = scale(x{i - 1})" for i in range(1, length)]
    check("\n".join(lines) + "\n")
