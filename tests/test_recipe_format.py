"""The .mecha v1 format: what it prints, what it reads, and the errors it gives (line, column)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import mecha_core as mecha
import mecha_methods.plugin
import mecha_sdmecha.plugin
from mecha_core import merge_method
from mecha_core.cli import app
from mecha_core.errors import MergeSpaceError, RecipeError
from mecha_core.plugins import plugin_from_functions
from mecha_core import load_recipe  # the plugin host's methods
from mecha_core.recipe import CallNode, LiteralNode, ModelNode, ParameterNode, WeightMap, dump_recipe
from mecha_core.testing import using, write_checkpoint
from mecha_core.testing_corpus import check_clean_failure, snapshot


@merge_method
def weigh(*models, weights=None):
    """Test method with an unannotated hyperparameter (any value kind)."""
    return models[0]


LISTS = plugin_from_functions("lists", mecha_merge_methods=lambda: [weigh])


@pytest.fixture(autouse=True)
def host():
    with using(mecha_methods.plugin, LISTS) as h:
        yield h


HEAD = 'mecha 1\na = model("a.safetensors")\nb = model("b.safetensors")\n'


def test_weighted_sum_prints_as_three_lines_with_inline_scalars():
    r = mecha.weighted_sum(mecha.model("models/a.safetensors"), mecha.model("b", arch="sd1-ldm"), alpha=0.3)
    assert dump_recipe(r) == (
        'mecha 1\n'
        'a = model("models/a.safetensors")\n'
        'b = model("b", arch="sd1-ldm")\n'
        'weighted_sum = weighted_sum(a, b, alpha=0.3)\n')


def test_shared_sub_result_is_written_once_and_referenced():
    a, b, c = (mecha.model(f"{n}.safetensors") for n in "abc")
    d = a - c
    r = mecha.weighted_sum(mecha.add(b, d), mecha.add(c, d, ), alpha=0.5)
    text = dump_recipe(r)
    assert text.count("subtract(") == 1
    assert "add = add(b, subtract)" in text and "add_2 = add(c, subtract)" in text
    assert load_recipe(text) == r


def test_name_clashes_and_reserved_words_get_distinct_names():
    r = mecha.weighted_sum(mecha.model("x/true.safetensors"), mecha.model("y/true.safetensors"))
    text = dump_recipe(r)
    assert '_true = model("x/true.safetensors")' in text
    assert '_true_2 = model("y/true.safetensors")' in text
    assert load_recipe(text) == r


def test_comments_blank_lines_crlf_and_bom_are_accepted():
    text = ("\ufeff# a recipe\r\nmecha 1\r\n\r\n  # indented comment\r\n"
            'a = model("a.safetensors")   # trailing comment\r\n'
            'b = model("b.safetensors")\r\n'
            "m = weighted_sum(a, b, alpha=0.25)\r\n")
    r = load_recipe(text)
    assert isinstance(r, CallNode) and r.method.name == "weighted_sum"
    assert r.args == (ModelNode("a.safetensors"), ModelNode("b.safetensors"))
    assert r.kwargs == (("alpha", LiteralNode(0.25)),)


def test_string_escapes_and_characters_python_treats_as_line_breaks():
    path = 'dir "q"\\x\u2028y\u0085z\tw.safetensors'
    r = mecha.scale(mecha.model(path), alpha=2.0)
    text = dump_recipe(r)
    assert len(text.split("\n")) == 4  # header, model, scale, final newline
    assert "\\u2028" in text and "\\u0085" in text and '\\"q\\"' in text and "\\\\x" in text
    assert load_recipe(text) == r and load_recipe(text).args[0].path == path


def test_numbers_ints_floats_exponents_and_infinity():
    text = HEAD + "c = weighted_sum(a, b, alpha=-inf)\nm = weighted_sum(c, b, alpha=1e-3)\n"
    r = load_recipe(text)
    assert r.kwargs[0][1].value == pytest.approx(0.001)
    assert math.isinf(r.args[0].kwargs[0][1].value) and r.args[0].kwargs[0][1].value < 0
    out = dump_recipe(r)
    assert "alpha=-inf" in out and "alpha=0.001" in out
    one = load_recipe(HEAD + "m = weighted_sum(a, b, alpha=1)\n")
    one_float = load_recipe(HEAD + "m = weighted_sum(a, b, alpha=1.0)\n")
    assert type(one.kwargs[0][1].value) is int and type(one_float.kwargs[0][1].value) is float
    # 1 and 1.0 are equal in Python but print differently, so they are different literals
    assert one != one_float and dump_recipe(one) != dump_recipe(one_float)


def test_block_maps_combine_with_bar_and_round_trip():
    text = (HEAD + 'weighted_sum = weighted_sum(a, b, alpha=blocks("sd1-ldm", default=0.3, IN02=0.75) '
            '| classes("sd1-ldm", proj_in=1))\n')
    r = load_recipe(text)
    value = r.kwargs[0][1].value
    assert isinstance(value, WeightMap)
    assert [(m.kind, m.entries, m.default) for m in value.chain()] == [
        ("blocks", (("IN02", 0.75),), 0.3), ("classes", (("proj_in", 1),), None)]
    assert dump_recipe(r) == text and load_recipe(dump_recipe(r)) == r


def test_block_map_resolution_rules():
    m = mecha.blocks("x", default=0.3, IN02=0.75, IN03=0.25) | mecha.classes("x", default=0.9, proj_in=1.0)
    assert m.resolve(("IN02",), "proj_in", 0.5) == 0.75          # a block entry wins over classes
    assert m.resolve(("IN02", "IN03"), None, 0.5) == 0.5         # several blocks of one map: the mean
    assert m.resolve(("OUT00",), "proj_in", 0.5) == 1.0          # then the class entries
    assert m.resolve(("OUT00",), "conv", 0.5) == 0.3             # then the first default
    assert mecha.classes("x", proj_in=1.0).resolve((), "conv", 0.5) == 0.5  # then the method's


def test_lists_of_numbers_round_trip():
    text = HEAD + "weigh = weigh(a, b, weights=[0.25, 1, -inf, 2e-08])\n"
    r = load_recipe(text)
    assert r.kwargs[0][1].value == (0.25, 1, float("-inf"), 2e-08)
    assert dump_recipe(r) == text and load_recipe(dump_recipe(r)) == r
    assert mecha.literal([0.5, 2]).value == (0.5, 2)
    err = error(HEAD + 'm = weigh(a, b, weights=[0.5, "x"])\n')
    assert (err.line, err.column) == (4, 31) and "a list holds numbers" in str(err)


def test_bar_between_models_is_fallback():
    r = load_recipe(HEAD + "m = a | b\n")
    assert r == mecha.fallback(ModelNode("a.safetensors"), ModelNode("b.safetensors"))
    assert (ModelNode("a.safetensors") | ModelNode("b.safetensors")) == r


def test_parameters_as_inputs_and_hyperparameters():
    text = ('mecha 1\nbase = parameter("base", space="weight")\nb = model("b.safetensors")\n'
            'k = parameter("k")\nweighted_sum = weighted_sum(base, b, alpha=k)\n')
    r = load_recipe(text)
    assert r.args[0] == ParameterNode("base", "weight") and r.kwargs == (("alpha", ParameterNode("k")),)
    assert dump_recipe(r) == text


def test_python_operators_build_method_calls():
    a, b = mecha.model("a.safetensors"), mecha.model("b.safetensors")
    assert (a - b) == mecha.subtract(a, b)
    assert (a + (a - b)) == mecha.add(a, mecha.subtract(a, b))
    assert ((a - b) * 0.5) == mecha.scale(mecha.subtract(a, b), alpha=0.5)
    assert (0.5 * (a - b)) == mecha.scale(mecha.subtract(a, b), alpha=0.5)
    assert (a | b) == mecha.fallback(a, b)
    with pytest.raises(MergeSpaceError):
        (a - b) - a  # subtract takes weights; a delta is refused when the recipe is built


def test_unnamed_last_line_is_the_result():
    r = load_recipe(HEAD + "weighted_sum(a, b)\n")
    assert isinstance(r, CallNode) and r.method.name == "weighted_sum"


def test_printing_is_deterministic_for_equal_graphs_built_differently():
    a1, a2 = mecha.model("a.safetensors"), mecha.model("a.safetensors")
    b = mecha.model("b.safetensors")
    shared = mecha.weighted_sum(a1 - b, a1 - b)
    copies = mecha.weighted_sum(a1 - b, a2 - b)
    assert shared == copies and dump_recipe(shared) == dump_recipe(copies)
    assert dump_recipe(shared).count("subtract(") == 1


# -- errors: every one names the line and column ---------------------------------------------
def error(text: str) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        load_recipe(text)
    return info.value


@pytest.mark.parametrize("text, line, column, fragments", [
    (HEAD + "m = weighted_sun(a, b)\n", 4, 5, ["unknown merge method 'weighted_sun'", "did you mean 'weighted_sum'"]),
    (HEAD + "m = weighted_sum(a, b, alpah=0.5)\n", 4, 24, ["no hyperparameter 'alpah'", "did you mean 'alpha'"]),
    (HEAD + "m = weighted_sum(a, bb)\n", 4, 21, ["'bb' is not defined", "did you mean 'b'"]),
    (HEAD + "m = weighted_sum(a, c)\nc = model(\"c\")\n", 4, 21, ["'c' is used before its definition on line 5"]),
    (HEAD + "m = weighted_sum(a, m)\n", 4, 21, ["'m' is used in its own definition"]),
    (HEAD + 'a = model("c.safetensors")\n', 4, 1, ["'a' is already defined on line 2"]),
    (HEAD + "m = weighted_sum(a)\n", 4, 5, ["weighted_sum takes 2 input(s), got 1"]),
    (HEAD + "m = subtract(a, b, a)\n", 4, 5, ["subtract takes 2 input(s), got 3"]),
    (HEAD + 'm = weighted_sum(a, b, alpha="x")\n', 4, 24, ["expects a number", '"x"']),
    (HEAD + "m = weighted_sum(a, b, alpha=true)\n", 4, 24, ["expects a number"]),
    (HEAD + "m = weighted_sum(a, 0.5)\n", 4, 21, ["input 2 must be a model or a result"]),
    (HEAD + "m = weighted_sum(a, b, alpha=a)\n", 4, 24, ["hyperparameter must be a number"]),
    (HEAD + "m = weighted_sum(a, b, alpha=0.5, alpha=0.2)\n", 4, 35, ["'alpha' is given twice"]),
    (HEAD + "m = weighted_sum(a, b alpha=0.5)\n", 4, 23, ["expected ',' or ')'"]),
    (HEAD + 'm = weighted_sum(a, b, alpha="oops)\n', 4, 30, ["unterminated string"]),
    (HEAD + 'm = scale(model("a\\q"))\n', 4, 19, ["invalid string"]),
    (HEAD + "m = weighted_sum(a, b, alpha=nan)\n", 4, 30, ["'nan' is not defined"]),
    (HEAD + "weighted_sum(a, b)\nn = subtract(a, b)\n", 4, 1, ["only the last line"]),
    (HEAD + "m = 0.5\n", 4, 5, ["not a bare value"]),
    (HEAD + "true = model(\"c\")\n", 4, 1, ["reserved word"]),
    (HEAD + 'm = weighted_sum(a, b, alpha=blocks("sd1-ldm", IN02="x"))\n', 4, 48, ["must be a number"]),
    (HEAD + 'm = weighted_sum(a, b, alpha=blocks(0.5))\n', 4, 30, ["architecture name first"]),
    (HEAD + "m = weighted_sum(a, b, alpha=0.5 | 0.2)\n", 4, 30, ["'|' joins"]),
    (HEAD + 'm = weighted_sum(a, b, alpha=blocks("x") | blocks("y"))\n', 4, 42, ["maps of one architecture"]),
    (HEAD + 'p = parameter("p", space="weights")\n', 4, 5, ["unknown merge space 'weights'"]),
    ('mecha 1\nb = model("b")\nd = subtract(b, b)\nm = subtract(d, b)\n', 4, 5,
     ["subtract expects a in weight space; got a delta from subtract"]),
    ("mecha 2\na = model(\"a\")\n", 1, 7, ["version 1", "version 2"]),
    ("mecha 1\n# nothing\n", 1, None, ["empty"]),
])
def test_errors_name_line_and_column(text, line, column, fragments):
    err = error(text)
    assert err.line == line, str(err)
    assert err.column == column, str(err)
    for fragment in fragments:
        assert fragment in str(err), str(err)
    assert str(err).startswith(f"<recipe>:{line}:")


def test_file_errors_name_the_file(tmp_path):
    path = tmp_path / "r.mecha"
    path.write_text(HEAD + "m = weighted_sun(a, b)\n")
    with pytest.raises(RecipeError, match=rf"^{path}:4:5: unknown merge method"):
        load_recipe(path)
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "missing.mecha")
    (tmp_path / "m.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00\xff\xfe{}      ")
    with pytest.raises(RecipeError, match="not UTF-8"):
        load_recipe(tmp_path / "m.safetensors")


def test_model_paths_remember_the_recipe_folder(tmp_path):
    path = tmp_path / "sub" / "r.mecha"
    path.parent.mkdir()
    path.write_text(HEAD + "m = weighted_sum(a, b)\n")
    r = load_recipe(path)
    assert r.args[0].base_dir == str(path.parent)
    assert load_recipe(HEAD + "m = weighted_sum(a, b)\n").args[0].base_dir is None


def test_parameter_names_must_be_names():
    with pytest.raises(RecipeError, match="must be a name"):
        mecha.parameter("two words")
    with pytest.raises(RecipeError, match=r"^<recipe>:2:5: parameter name"):
        load_recipe('mecha 1\np = parameter("1x")\n')


def test_a_method_two_plugins_claim_is_reported_at_its_line():
    twin = plugin_from_functions("twin", mecha_merge_methods=lambda: [weigh])
    from mecha_core.testing import host_with

    with using(host_with(mecha_methods.plugin, LISTS, twin, strict=False)):
        err = error(HEAD + "m = weigh(a, b)\n")
    assert (err.line, err.column) == (4, 5) and "provided by both" in str(err)


# -- recipes merged through the CLI (the `work` fixture: conftest.py)
runner = CliRunner()


def merge(folder, text: str, *options: str, output: str = "merged.safetensors"):
    (folder / "recipe.mecha").write_bytes(text.encode())
    before = snapshot(folder)
    result = runner.invoke(app, ["merge", str(folder / "recipe.mecha"), "-o", output, "-q", *options])
    return result, before


def test_a_parameter_declared_with_two_spaces_is_refused_at_its_line(work):
    text = ('mecha 1\nk = parameter("k")\nj = parameter("k", space="delta")\na = model("a.safetensors")\n'
            'b = model("b.safetensors")\nc = add(a, j)\nweighted_sum(c, b, alpha=k)\n')
    result, before = merge(work, text)
    check_clean_failure(result.exit_code, result.stderr, folder=work, before=before,
                        fragments=("recipe.mecha:3:5", "parameter 'k'", "different merge spaces"))


def test_a_parameter_used_as_input_and_hyperparameter_is_refused(work):
    text = 'mecha 1\nk = parameter("k")\na = model("a.safetensors")\nweighted_sum(a, k, alpha=k)\n'
    result, before = merge(work, text)
    check_clean_failure(result.exit_code, result.stderr, folder=work, before=before,
                        fragments=("recipe.mecha:2:5", "both a method's input and a hyperparameter"))


@pytest.mark.parametrize("header", ["mecha\t1", "mecha  1", "mecha 1 "])
def test_header_with_any_spaces_or_tabs_is_read(work, header):
    result, _ = merge(work, header + "\n" + HEAD.split("\n", 1)[1] + "weighted_sum(a, b, alpha=0.25)\n")
    assert result.exit_code == 0, result.output
    assert load_file(work / "merged.safetensors")["w"].tolist() == [1.5, 3.0]


@pytest.mark.parametrize("text", [
    HEAD + "weighted_sum(a, b, alpha=1" + "0" * 5000 + ")\n",
    'version 0.1.0\nmodel "a.safetensors"\nmodel "b.safetensors"\nmerge "weighted_sum" &0 &1 alpha=1'
    + "0" * 5000 + "\n",
    'model "a.safetensors" "sd1" "base"\nmodel "b.safetensors" "sd1" "base"\nmerge "weighted_sum" &0 &1 alpha=1'
    + "0" * 5000 + "\n",
])
def test_a_number_too_long_for_python_is_a_recipe_error(work, text):
    with using(mecha_methods.plugin, mecha_sdmecha.plugin):  # the sd-mecha texts need its reader
        result, before = merge(work, text)
    check_clean_failure(result.exit_code, result.stderr, folder=work, before=before,
                        fragments=("recipe.mecha:", "digits"))


def test_a_lone_cr_in_a_comment_does_not_split_the_line(work):
    # the format ends lines at LF only: reading the file must agree with reading its text
    text = (HEAD.replace('b = model("b.safetensors")', 'b = model("b.safetensors")  # old\rnote')
            + "weighted_sum(a, b)\n")
    result, _ = merge(work, text)
    assert result.exit_code == 0, result.output
    assert load_file(work / "merged.safetensors")["w"].tolist() == [2.0, 4.0]


@pytest.mark.parametrize("line,fragment", [
    ('b = model("bb")', "model file 'bb' not found"),
    ('b = model("b.safetensors", arch="sd9")', "unknown architecture 'sd9'"),
    ('b = model("b.safetensors", type="lora")', "unknown model type 'lora'"),
])
def test_errors_found_when_a_model_is_opened_name_its_recipe_line(work, line, fragment):
    text = f'mecha 1\na = model("a.safetensors")\n{line}\nweighted_sum(a, b)\n'
    result, before = merge(work, text)
    check_clean_failure(result.exit_code, result.stderr, folder=work, before=before,
                        fragments=("recipe.mecha:3:5: ", fragment))


def test_recipe_string_with_a_lone_surrogate_is_a_recipe_error_not_a_crash(tmp_path, methods):
    a = write_checkpoint(tmp_path / "a.safetensors", {"w": torch.ones(1)})
    text = 'mecha 1\na = model("a.safetensors")\nb = cast(a, dtype="\\udc80")\n'
    with pytest.raises(mecha.errors.RecipeError, match=r"<recipe>:3:.*surrogate"):
        mecha.load_recipe(text)
    # built in Python, a free-form string fails when the recipe is printed (before any file is
    # written); one with fixed choices (cast's dtype) already when the call is built
    with pytest.raises(mecha.errors.RecipeError, match=r"^cast\(dtype='\\udc80'\): use one of"):
        mecha.cast(mecha.model(a), dtype="\udc80")
    recipe = mecha.pick_component(mecha.model(a), component="\udc80")
    with pytest.raises(mecha.errors.RecipeError, match="surrogate"):
        mecha.merge(recipe, tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()
