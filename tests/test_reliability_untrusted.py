"""Data from files is untrusted: bounded JSON, linear-time regular expressions, and text that
reaches the terminal escaped, on one line and cut to a sane length."""

from __future__ import annotations

import json
import random
import re
import time

import pytest
import torch
from typer.testing import CliRunner

import mecha_core as mecha
import mecha_methods.plugin
from mecha_core.cli import app
from mecha_core.cli.common import MESSAGE_LIMIT, printable
from mecha_core.errors import PlanError
from mecha_core.files import JSON_MAX_DEPTH, JSONLimitError, json_depth, loads_bounded
from mecha_core.testing import using, write_checkpoint

runner = CliRunner()


# -- JSON -------------------------------------------------------------------------------------------

def _depth(value) -> int:
    """Nesting depth of a Python value, computed on the value (not on its text)."""
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


def _random_value(rng: random.Random, depth: int):
    kind = rng.randrange(5 if depth < 8 else 3)
    if kind == 0:
        return rng.choice([0, -1.5, True, None])
    if kind == 1:  # strings full of the characters a naive counter would trip on
        return "".join(rng.choice(['[', ']', '{', '}', '"', '\\', 'a', ',', ':']) for _ in range(rng.randrange(6)))
    if kind == 2:
        return rng.randrange(100)
    if kind == 3:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {f"k{i}[{{\"": _random_value(rng, depth + 1) for i in range(rng.randrange(4))}


def test_json_depth_agrees_with_the_values_own_depth():
    rng = random.Random(7)
    for _ in range(500):
        value = _random_value(rng, 0)
        text = json.dumps(value)
        assert json_depth(text) == _depth(value), text
        assert loads_bounded(text) == value


def test_a_100000_deep_array_is_a_one_line_error():
    text = "[" * 100_000 + "]" * 100_000
    with pytest.raises(JSONLimitError) as err:
        loads_bounded(text)
    assert "100,000 levels" in str(err.value) and "\n" not in str(err.value)
    assert loads_bounded("[" * JSON_MAX_DEPTH + "]" * JSON_MAX_DEPTH) is not None  # the bound itself passes


def test_json_longer_than_the_bound_is_refused():
    with pytest.raises(JSONLimitError, match="more than the 100"):
        loads_bounded('"' + "a" * 200 + '"', max_chars=100)


def test_deep_peft_metadata_is_a_plan_error_not_a_recursion_error():
    """Today json.loads raises RecursionError out of the merge."""
    from mecha_lora.adapter_config import adapter_scales

    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(PlanError) as err:
        adapter_scales({"lora_adapter_metadata": '{"lora_alpha": 8, "x": ' + deep + "}"}, "style.safetensors")
    assert "style.safetensors" in str(err.value) and "nested" in str(err.value)


# -- regular expressions from files ----------------------------------------------------------------

def _peft_alpha(patterns: dict[str, float], path: str, default: float) -> float:
    """PEFT's get_pattern_key with Python's re: the first pattern matching the path or a dotted
    suffix of it (the reference the RE2 matcher must agree with, on patterns re runs fast)."""
    for pattern, alpha in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return alpha
    return default


PATHS = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
    "mid_block.attentions.0.proj_in",
    "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2",
    "text_model.encoder.layers.11.self_attn.q_proj",
    "xto_k",
]
PATTERNS = [
    {"to_k": 2.0},
    {"attn1.to_k": 2.0, "to_k": 3.0},
    {"^down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": 1.0},
    {r"down_blocks\.\d+\..*to_k": 5.0, "to_k": 6.0},
    {"blocks.1": 7.0, "proj_in|q_proj": 9.0},
    {"2.to_k": 4.0, "attentions.2": 8.0},
]


@pytest.mark.parametrize("patterns", PATTERNS)
def test_alpha_pattern_keeps_peft_semantics(patterns):
    from mecha_lora.adapter_config import ComponentConfig

    config = ComponentConfig(16.0, False, tuple(patterns.items()))
    for path in PATHS:
        assert config.scale(path, 4) == _peft_alpha(patterns, path, 16.0) / 4, (patterns, path)


def test_a_catastrophic_pattern_takes_no_time():
    """``(\\w+\\.?)+!`` on a 38-character name took Python's re 43 s."""
    from mecha_lora.adapter_config import adapter_scales

    raw = json.dumps({"lora_alpha": 8, "alpha_pattern": {r"(\w+\.?)+!": 2, "to_k": 4}})
    scales = adapter_scales({"lora_adapter_metadata": raw}, "x.safetensors")
    name = "a" * 30 + ".b.c.d.e"  # 38 characters, no "!": every split fails
    started = time.monotonic()
    assert scales.scale(name, 8) == 1.0  # no pattern matches: lora_alpha / r = 8 / 8
    assert scales.scale("unet.x.to_k", 8) == 0.5  # the second pattern: 4 / 8
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("pattern", [r"(a)\1", r"(?=to_k)to", r"a{1000}{1000}"])
def test_patterns_a_linear_matcher_cannot_run_are_refused_by_name(pattern):
    from mecha_lora.adapter_config import adapter_scales

    raw = json.dumps({"lora_alpha": 8, "alpha_pattern": {pattern: 2}})
    with pytest.raises(PlanError) as err:
        adapter_scales({"lora_adapter_metadata": raw}, "x.safetensors")
    message = str(err.value)
    assert pattern in message and "x.safetensors" in message and "\n" not in message


# -- text printed to the terminal ------------------------------------------------------------------

def test_printable_escapes_every_control_character_and_keeps_one_line():
    text = printable("key 'a\nb\x1b[31mred\x07' in \x9bfile\tx")
    assert text == "key 'a\\nb\\x1b[31mred\\x07' in \\x9bfile\\tx"


def test_printable_cuts_long_values_and_long_messages():
    value = "v" * 5000
    text = printable(f"hyperparameter 'alpha' got '{value}'; give a number")
    assert len(text) < 300 and text.endswith("'; give a number") and " ... " in text
    huge = printable("values: " + ", ".join(["0.5"] * 10**6) + "; fix line 3")
    assert len(huge) <= MESSAGE_LIMIT and huge.startswith("values: 0.5, ") and huge.endswith("; fix line 3")


@pytest.fixture
def work(tmp_path):
    write_checkpoint(tmp_path / "a.safetensors", {"k": torch.ones(2)})
    with using(mecha_methods.plugin):
        yield tmp_path


def test_a_model_path_with_a_newline_and_escape_codes_stays_one_escaped_line(work):
    (work / "r.mecha").write_text('mecha 1\na = model("x\\n\\u001b[2Jy.safetensors")\na\n')
    result = runner.invoke(app, ["merge", str(work / "r.mecha"), "-o", str(work / "o.safetensors")])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "\x1b" not in result.stderr, result.stderr
    assert "x\\n\\x1b[2Jy" in lines[0]


def test_an_error_about_a_megabyte_path_is_cut(work):
    (work / "r.mecha").write_text('mecha 1\na = model("' + "p" * 1_000_000 + '.safetensors")\na\n')
    result = runner.invoke(app, ["merge", str(work / "r.mecha"), "-o", str(work / "o.safetensors")])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and len(lines[0]) <= len("error: ") + MESSAGE_LIMIT, len(result.stderr)


def test_recipe_show_escapes_the_stored_text(work):
    stored = 'mecha 1\n# \x1b]0;owned\x07 \x9b31m\na = model("a.safetensors")\na\n'
    write_checkpoint(work / "m.safetensors", {"k": torch.ones(2)}, {"mecha_recipe": stored})
    result = runner.invoke(app, ["recipe", "show", str(work / "m.safetensors")])
    assert result.exit_code == 0, result.output
    assert not any(c in result.stdout for c in "\x1b\x07\x9b")
    assert result.stdout == 'mecha 1\n# \\x1b]0;owned\\x07 \\x9b31m\na = model("a.safetensors")\na\n'


# -- safetensors headers (the `methods` fixture: conftest.py)


def _raw_safetensors(path, header_json: str, data: bytes) -> None:
    import struct

    raw = header_json.encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("header", [
    '{"\\ud800x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
    '{"__metadata__":{"note":"\\udfff"},"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
])
def test_header_with_a_lone_surrogate_is_a_one_line_error_not_a_crash(tmp_path, methods, header):
    # JSON accepts "\ud800" escapes, but no UTF-8 text holds them: writing the output header
    # crashed with UnicodeEncodeError after planning
    path = tmp_path / "bad.safetensors"
    _raw_safetensors(path, header, b"\x00\x00\x80\x3f")
    with pytest.raises(mecha.errors.SafetensorsError, match="bad.safetensors"):
        mecha.merge(mecha.scale(mecha.model(path), alpha=2.0), tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()
