"""Bad recipes, end to end through ``mecha merge``: exit 2, one line naming the recipe line (and
column where there is one), the output folder untouched. The parser itself is tested in depth
by the recipe tests; these check what the user sees."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import mecha_methods.plugin
from mecha_core.cli import app
from mecha_core.engine.safetensors_io import SafetensorsFile
from mecha_core.testing import using, write_checkpoint
from mecha_core.testing_corpus import check_clean_failure, snapshot

runner = CliRunner()
HEAD = 'mecha 1\na = model("a.safetensors")\nb = model("b.safetensors")\n'


@pytest.fixture
def work(tmp_path):
    write_checkpoint(tmp_path / "a.safetensors", {"w": torch.tensor([1.0, 2.0])})
    write_checkpoint(tmp_path / "b.safetensors", {"w": torch.tensor([3.0, 6.0])})
    (tmp_path / "merged.safetensors").write_bytes(b"keep me")
    with using(mecha_methods.plugin):
        yield tmp_path


def run(folder, text: str, *options: str, raw: bytes | None = None):
    path = folder / "recipe.mecha"
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text(text)
    before = snapshot(folder)
    result = runner.invoke(app, ["merge", str(path), "-o", str(folder / "merged.safetensors"), "-q", *options])
    return result, before


CASES = [
    # (id, recipe text, (line, the text before the offending token on that line, or None when
    #  only the line is checked), fragments the message must hold)
    ("syntax_missing_comma", HEAD + "m = weighted_sum(a, b alpha=0.5)\n", (4, "m = weighted_sum(a, b "),
     ("expected ',' or ')'",)),
    ("syntax_unclosed", HEAD + "m = weighted_sum(a, b\n", (4, None), ("end of line",)),
    ("syntax_bad_character", HEAD + "m = weighted_sum(a, b, alpha=$0.5)\n", (4, "m = weighted_sum(a, b, alpha="),
     ("unexpected character",)),
    ("syntax_trailing", HEAD + "m = weighted_sum(a, b) b\n", (4, "m = weighted_sum(a, b) "),
     ("after the expression",)),
    ("unknown_method", HEAD + "m = weighted_sun(a, b)\n", (4, "m = "), ("did you mean 'weighted_sum'",)),
    ("unknown_hyperparameter", HEAD + "m = weighted_sum(a, b, alpah=0.5)\n", (4, "m = weighted_sum(a, b, "),
     ("no hyperparameter 'alpah'", "did you mean 'alpha'")),
    ("too_few_inputs", HEAD + "m = weighted_sum(a)\n", (4, "m = "), ("takes 2 input(s), got 1",)),
    ("too_many_inputs", HEAD + "m = subtract(a, b, a)\n", (4, "m = "), ("takes 2 input(s), got 3",)),
    ("input_is_a_number", HEAD + "m = weighted_sum(a, 0.5)\n", (4, "m = weighted_sum(a, "), ("input 2",)),
    ("forward_reference", 'mecha 1\na = model("a.safetensors")\nm = weighted_sum(a, later)\n'
     'later = model("b.safetensors")\n', (3, "m = weighted_sum(a, "), ("'later'", "line 4")),
    ("self_reference_cycle", HEAD + "m = weighted_sum(a, m)\n", (4, "m = weighted_sum(a, "), ("'m'",)),
    ("redefined_name", HEAD + 'a = model("b.safetensors")\n', (4, ""), ("already defined on line 2",)),
    ("wrong_space_declared", 'mecha 1\nd = model("a.safetensors", type="delta")\nb = model("b.safetensors")\n'
     "m = add_difference(d, b, b)\n", (4, None), ("add_difference", "weight", "delta")),
    ("no_header", 'a = model("a.safetensors")\n', (1, None), ("mecha 1",)),
    ("empty_after_header", "mecha 1\n# only a comment\n", (1, None), ("empty",)),
    ("line_is_a_literal", HEAD + "0.5\n", (4, None), ("each line defines",)),
    ("bad_string_escape", 'mecha 1\na = model("a\\q.safetensors")\n', (2, 'a = model("a'), ("escape",)),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_recipe_error_names_line_and_column(work, case):
    _, text, (line_no, before_token), fragments = case
    result, before = run(work, text)
    location = f"recipe.mecha:{line_no}:" + (f"{len(before_token) + 1}:" if before_token is not None else "")
    check_clean_failure(result.exit_code, result.stderr, fragments=(location, *fragments),
                        folder=work, before=before)


def test_wrong_merge_space_found_when_planning(work):
    """Spaces unknown when parsing (plain files) are checked from the headers, before writing."""
    result, before = run(work, HEAD + "m = add_difference(a, b)\n")
    check_clean_failure(result.exit_code, result.stderr, folder=work, before=before,
                        fragments=("add_difference", "delta"))


def test_unfilled_input_parameter(work):
    text = HEAD + 'other = parameter("other")\nm = weighted_sum(a, other)\n'
    result, before = run(work, text)
    check_clean_failure(result.exit_code, result.stderr, folder=work, before=before,
                        fragments=("'other'", "not filled", "-p other="))


def test_unfilled_hyperparameter_then_filled_with_p(work):
    text = HEAD + 'm = weighted_sum(a, b, alpha=parameter("strength"))\n'
    result, before = run(work, text)
    check_clean_failure(result.exit_code, result.stderr, folder=work, before=before,
                        fragments=("'strength'", "not filled"))

    result, before = run(work, text, "-p", "strenght=0.25")
    check_clean_failure(result.exit_code, result.stderr, folder=work, before=before,
                        fragments=("'strenght'", "did you mean 'strength'"))

    result, _ = run(work, text, "-p", "strength=0.25")
    assert result.exit_code == 0, result.output
    f = SafetensorsFile(work / "merged.safetensors")
    try:
        assert f.read("w").tolist() == [1.5, 3.0]  # 0.75 * [1, 2] + 0.25 * [3, 6]
    finally:
        f.close()


def test_malformed_p_option(work):
    result, before = run(work, HEAD + "m = weighted_sum(a, b)\n", "-p", "no-equals-sign")
    check_clean_failure(result.exit_code, result.stderr, folder=work, before=before,
                        fragments=("NAME=VALUE", "no-equals-sign"))


def test_missing_recipe_file(work):
    before = snapshot(work)
    result = runner.invoke(app, ["merge", str(work / "nope.mecha"), "-o", str(work / "merged.safetensors")])
    check_clean_failure(result.exit_code, result.stderr, folder=work, before=before,
                        fragments=("nope.mecha", "no such recipe file"))


def test_recipe_that_is_not_text(work):
    result, before = run(work, "", raw=b"mecha 1\n\xff\xfe\x00binary")
    message = check_clean_failure(result.exit_code, result.stderr, folder=work, before=before,
                                  fragments=("recipe.mecha",))
    assert "utf-8" in message.lower()


def test_recipe_referring_to_a_missing_model(work):
    result, before = run(work, HEAD + 'c = model("gone.safetensors")\nm = weighted_sum(a, c)\n')
    check_clean_failure(result.exit_code, result.stderr, folder=work, before=before,
                        fragments=("gone.safetensors", "not found"))
