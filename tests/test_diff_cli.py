"""`mecha diff` on the command line (table, --json schema, --plot PNG/SVG, one-line errors) and
`mecha merge --report` (values of the written output against each input, by plain torch)."""

from __future__ import annotations

import io
import json
import math
import re
import struct
import sys

import mecha_methods.plugin
import mecha_sd1.plugin
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mecha_core.cli import app
from mecha_core.difference import plot as plotting
from mecha_core.testing import host_with, using
from mecha_core.testing_corpus import check_clean_failure, snapshot

runner = CliRunner()
ARCH = host_with(mecha_sd1.plugin).architecture("sd1-ldm")
MEASURES = {"keys", "elements", "cosine", "relative_l2", "max_abs_change", "task_cosine", "sign_agreement"}


@pytest.fixture
def work(tmp_path, monkeypatch):
    """a, b, c and a base in the current folder: two keys, no detected architecture."""
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(64, generator=g), "v": torch.randn(8, 8, generator=g)}
    for name, scale in (("base", 0.0), ("a", 0.1), ("b", 0.2), ("c", 1.0)):
        save_file({k: v + torch.randn(v.shape, generator=g) * scale for k, v in base.items()},
                  tmp_path / f"{name}.safetensors")
    monkeypatch.chdir(tmp_path)
    with using(mecha_methods.plugin, mecha_sd1.plugin):
        yield tmp_path


def _values(name):
    return {k: v.double() for k, v in load_file(f"{name}.safetensors").items()}


def _flat(values):
    return torch.cat([values[k].reshape(-1) for k in sorted(values)])


def test_table_lists_each_pair_with_aligned_columns(work):
    result = runner.invoke(app, ["diff", "a.safetensors", "b.safetensors", "c.safetensors", "-q"])
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    sections = re.findall(r"^(\S+) \(A\) vs (\S+) \(B\)", out, re.M)
    assert sections == [("a.safetensors", "b.safetensors"), ("a.safetensors", "c.safetensors"),
                        ("b.safetensors", "c.safetensors")]
    x, y = _flat(_values("a")), _flat(_values("b"))
    cos = torch.nn.functional.cosine_similarity(x, y, dim=0).item()
    total = [ln for ln in out.splitlines() if ln.startswith("total")][0]
    assert total.split()[:3] == ["total", "2", f"{cos:.6f}"]
    header = [ln for ln in out.splitlines() if ln.startswith("block")][0]
    # right-aligned numbers end where their header ends
    assert header.index("cosine") + len("cosine") == total.index(f"{cos:.6f}") + len(f"{cos:.6f}")


def test_json_schema_and_values(work):
    result = runner.invoke(app, ["diff", "a.safetensors", "b.safetensors", "--base", "base.safetensors",
                                 "--keys", "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)  # stdout holds the JSON alone
    assert set(data) == {"schema", "models", "base", "architecture", "grouping", "groups", "pairs"}
    assert data["schema"] == "mecha-diff/1" and data["grouping"] == "key" and data["architecture"] is None
    assert data["models"] == ["a.safetensors", "b.safetensors"] and data["base"] == "base.safetensors"
    (pair,) = data["pairs"]
    assert set(pair) == {"first", "second", "first_index", "second_index", "unmatched_keys", "total", "groups"}
    assert set(pair["total"]) == MEASURES
    assert [g["name"] for g in pair["groups"]] == data["groups"] and set(data["groups"]) == {"w", "v"}
    a, b, base = _values("a"), _values("b"), _values("base")
    for group in pair["groups"]:
        assert set(group) == MEASURES | {"name"}
        k = group["name"]
        u, v = (a[k] - base[k]).reshape(-1), (b[k] - base[k]).reshape(-1)
        assert group["task_cosine"] == pytest.approx(torch.nn.functional.cosine_similarity(u, v, dim=0).item(),
                                                     rel=1e-9)
        agree = (torch.sign(u) == torch.sign(v)).double().mean().item()  # no zeros in these task vectors
        assert group["sign_agreement"] == pytest.approx(agree, rel=1e-12)
        assert group["max_abs_change"] == pytest.approx((b[k] - a[k]).abs().max().item(), rel=1e-12)


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


def test_plot_png_is_a_valid_image_labelled_with_the_blocks(tmp_path):
    from PIL import Image

    import mecha_core
    from mecha_core.difference import DiffResult, Measures, PairDiff

    def result(groups):
        m = [Measures(keys=1, elements=4, cosine=0.9 + i / 1000, relative_l2=0.1 * (i + 1), max_abs_change=1.0)
             for i, _ in enumerate(groups)]
        return DiffResult(models=("x/a.safetensors", "b.safetensors", "c.safetensors"), base=None,
                          architecture="sd1-ldm", grouping="block", groups=tuple(groups),
                          pairs=(PairDiff(0, 1, tuple(m), m[0], 0), PairDiff(1, 2, tuple(m), m[0], 0)))

    few, many = result(ARCH.blocks[:3]), result(ARCH.blocks)
    figure = plotting.write_plot(many, tmp_path / "many.png")
    data = (tmp_path / "many.png").read_bytes()
    assert _png_size(data) == figure.size_pixels
    with Image.open(io.BytesIO(data)) as image:
        image.verify()
    assert figure.group_labels == ARCH.blocks  # every block, in order, on the x axis
    assert figure.pair_labels == ("a.safetensors vs b.safetensors", "b.safetensors vs c.safetensors")
    small = plotting.draw(few, "png")
    assert _png_size(small.data)[0] < _png_size(data)[0]  # more blocks, a wider figure
    assert mecha_core.DiffResult is DiffResult


def test_plot_svg_keeps_block_names_as_text(work):
    result = runner.invoke(app, ["diff", "a.safetensors", "b.safetensors", "--plot", "out.svg", "-q"])
    assert result.exit_code == 0, result.stderr
    svg = (work / "out.svg").read_text()
    texts = re.findall(r"<text[^>]*>([^<]*)</text>", svg)
    assert "(all keys)" in texts and "a.safetensors vs b.safetensors" in texts


def test_without_matplotlib_plot_names_what_to_install_before_opening_anything(work, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    before = snapshot(work)
    result = runner.invoke(app, ["diff", "missing.safetensors", "b.safetensors", "--plot", "out.png"])
    check_clean_failure(result.exit_code, result.stderr, folder=work, before=before, max_lines=1,
                        fragments=("--plot needs matplotlib", "pip install 'mecha-core[plot]'"))


@pytest.mark.parametrize(("args", "fragments"), [
    (["a.safetensors"], ("at least two models",)),
    (["a.safetensors", "nothere.safetensors"], ("nothere",)),
    (["a.safetensors", "b.safetensors", "--plot", "out.jpg"], ("--plot out.jpg", ".png or .svg")),
    (["a.safetensors", "b.safetensors", "--threads", "0"], ("threads",)),
])
def test_errors_are_one_line_with_exit_2(work, args, fragments):
    before = snapshot(work)
    result = runner.invoke(app, ["diff", *args])
    check_clean_failure(result.exit_code, result.stderr, folder=work, before=before, max_lines=1,
                        fragments=fragments)


def test_json_error_object_on_stdout(work):
    result = runner.invoke(app, ["diff", "a.safetensors", "--json"])
    assert result.exit_code == 2
    assert json.loads(result.stdout)["error"].startswith("mecha diff needs at least two models")


def test_merge_report_json_says_how_far_the_output_moved_from_each_input(work):
    (work / "r.mecha").write_text('mecha 1\nweighted_sum(model("a.safetensors"), model("c.safetensors"), '
                                  'alpha=0.3)\n')
    result = runner.invoke(app, ["merge", "r.mecha", "-o", "m.safetensors", "--report", "report.json", "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["report"] == str(work / "report.json")
    report = json.loads((work / "report.json").read_text())
    assert report["models"] == ["a.safetensors", "c.safetensors", str(work / "m.safetensors")]
    assert [(p["first_index"], p["second_index"]) for p in report["pairs"]] == [(0, 2), (1, 2)]
    out = _flat(_values("m"))
    for pair, name in zip(report["pairs"], "ac"):
        x = _flat(_values(name))
        assert pair["total"]["relative_l2"] == pytest.approx(
            (torch.linalg.vector_norm(out - x) / torch.linalg.vector_norm(x)).item(), rel=1e-9)
        assert pair["total"]["cosine"] == pytest.approx(
            torch.nn.functional.cosine_similarity(x, out, dim=0).item(), rel=1e-9)
    # the output is 70% a: it moved less from a than from c
    assert report["pairs"][0]["total"]["relative_l2"] < report["pairs"][1]["total"]["relative_l2"]
    assert math.isfinite(report["pairs"][0]["total"]["max_abs_change"])


def test_merge_report_png(work):
    (work / "r.mecha").write_text('mecha 1\nweighted_sum(model("a.safetensors"), model("b.safetensors"))\n')
    result = runner.invoke(app, ["merge", "r.mecha", "-o", "m.safetensors", "--report", "report.png", "-q"])
    assert result.exit_code == 0, result.stderr
    width, height = _png_size((work / "report.png").read_bytes())
    assert width >= 800 and height >= 450


def test_merge_report_of_an_unknown_kind_is_refused_before_merging(work):
    (work / "r.mecha").write_text('mecha 1\nweighted_sum(model("a.safetensors"), model("b.safetensors"))\n')
    before = snapshot(work)
    result = runner.invoke(app, ["merge", "r.mecha", "-o", "m.safetensors", "--report", "report.txt"])
    check_clean_failure(result.exit_code, result.stderr, folder=work, before=before, max_lines=1,
                        fragments=("--report report.txt", ".json"))


def test_a_sharded_folder_is_compared_like_a_file_and_a_folder_output_reported(work):
    """Folders go through the same planning code: a folder diffs like the file of its keys."""
    import os

    g = torch.Generator().manual_seed(3)
    tensors = {"w": torch.randn(64, generator=g), "v": torch.randn(8, 8, generator=g)}
    os.makedirs("sharded")
    save_file({"w": tensors["w"]}, "sharded/model-00001-of-00002.safetensors")
    save_file({"v": tensors["v"]}, "sharded/model-00002-of-00002.safetensors")
    (work / "sharded" / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"w": "model-00001-of-00002.safetensors",
                                        "v": "model-00002-of-00002.safetensors"}}))
    result = runner.invoke(app, ["diff", "a.safetensors", "sharded", "--json"])
    assert result.exit_code == 0, result.stderr
    total = json.loads(result.stdout)["pairs"][0]["total"]
    x, y = _flat(_values("a")), _flat({k: v.double() for k, v in tensors.items()})
    assert total["cosine"] == pytest.approx(torch.nn.functional.cosine_similarity(x, y, dim=0).item(), rel=1e-9)
    (work / "r.mecha").write_text('mecha 1\nweighted_sum(model("a.safetensors"), model("sharded"), alpha=0.5)\n')
    result = runner.invoke(app, ["merge", "r.mecha", "-o", "out/", "--report", "report.json", "-q"])
    assert result.exit_code == 0, result.stderr
    report = json.loads((work / "report.json").read_text())
    assert report["models"][:2] == ["a.safetensors", "sharded"] and len(report["pairs"]) == 2
    half = (x + y) / 2  # the output is the midpoint: it moved as far from each input
    for pair, source in zip(report["pairs"], (x, y)):
        expected = (torch.linalg.vector_norm(half - source) / torch.linalg.vector_norm(source)).item()
        assert pair["total"]["relative_l2"] == pytest.approx(expected, rel=1e-6)
