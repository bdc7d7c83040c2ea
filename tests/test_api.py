"""The plugin-author surface, end to end: a method declared exactly as docs/plugins.md shows it,
registered through a hook, called as ``mecha_core.<name>`` and merged with ``mecha_core.merge``.
Expected values are computed here, by hand or with plain torch, never by the code under test."""

from __future__ import annotations

import hashlib
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import mecha_core
from mecha_core import hookimpl, merge_method
from mecha_core.errors import PluginCodeError
from mecha_core.plugins import plugin_from_functions
from mecha_core.recipe.nodes import CallNode, ModelNode
from mecha_core.testing import host_with, using, write_checkpoint


@merge_method
def scale_sum(a, b, *, factor: float = 3.0):   # per key: tensors in, tensor out
    """(a + b) * factor."""
    return (a + b) * factor


@hookimpl
def mecha_merge_methods():
    return [scale_sum]


THIS_PLUGIN = sys.modules[__name__]


@pytest.fixture
def author():
    """This test module is the plugin, and the only one loaded."""
    with using(host_with(THIS_PLUGIN, names=["author"])) as host:
        yield host


@pytest.fixture
def pair(tmp_path):
    gen = torch.Generator().manual_seed(1)
    a = {"layer.weight": torch.randn(3, 4, generator=gen), "layer.bias": torch.randn(3, generator=gen)}
    b = {"layer.weight": torch.randn(3, 4, generator=gen), "layer.bias": torch.randn(3, generator=gen)}
    return (write_checkpoint(tmp_path / "a.safetensors", a), write_checkpoint(tmp_path / "b.safetensors", b), a, b)


def test_the_author_surface_is_public():
    assert mecha_core.hookimpl is mecha_core.plugins.hookimpl
    assert mecha_core.merge_method is mecha_core.method.merge_method
    for name in ("model", "merge", "merge_method", "hookimpl", "load_recipe", "dump_recipe", "literal",
                 "parameter", "compose", "blocks", "classes", "MechaError"):
        assert name in mecha_core.__all__ and getattr(mecha_core, name) is not None


def test_a_registered_method_builds_a_recipe_node(author, tmp_path):
    node = mecha_core.scale_sum(mecha_core.model(tmp_path / "x.safetensors"), "y.safetensors", factor=0.5)
    assert isinstance(node, CallNode) and node.method is scale_sum
    assert node.args == (ModelNode(str(tmp_path / "x.safetensors")), ModelNode("y.safetensors"))
    assert not (tmp_path / "x.safetensors").exists()  # building does no I/O
    assert "scale_sum" in dir(mecha_core)
    text = mecha_core.dump_recipe(node)
    assert "scale_sum(" in text and "factor=0.5" in text
    assert mecha_core.load_recipe(text) == node


def test_merge_writes_the_methods_values_with_the_default(author, pair, tmp_path):
    pa, pb, a, b = pair
    out = mecha_core.merge(mecha_core.scale_sum(mecha_core.model(pa), mecha_core.model(pb)),
                           output=tmp_path / "out.safetensors")
    merged = load_file(out)
    assert sorted(merged) == sorted(a)
    for key in a:
        expected = (a[key].double() + b[key].double()) * 3.0
        assert merged[key].dtype == torch.float32
        torch.testing.assert_close(merged[key].double(), expected, rtol=1e-6, atol=1e-6)


def test_merge_uses_the_given_hyperparameter_and_records_the_recipe(author, pair, tmp_path):
    pa, pb, a, b = pair
    recipe = mecha_core.scale_sum(mecha_core.model(pa), mecha_core.model(pb), factor=-0.5)
    out = mecha_core.merge(recipe, output=tmp_path / "out.safetensors")
    merged = load_file(out)
    expected = (a["layer.bias"].double() + b["layer.bias"].double()) * -0.5
    torch.testing.assert_close(merged["layer.bias"].double(), expected, rtol=1e-6, atol=1e-6)
    with safe_open(out, "pt") as f:
        stored = f.metadata()["mecha_recipe"]
    assert mecha_core.load_recipe(stored) == recipe


def test_a_recipe_text_using_the_method_merges(author, pair, tmp_path):
    pa, pb, a, b = pair
    text = f'mecha 1\na = model("{pa}")\nb = model("{pb}")\nout = scale_sum(a, b, factor=2)\n'
    merged = load_file(mecha_core.merge(text, output=tmp_path / "out.safetensors"))
    torch.testing.assert_close(merged["layer.weight"].double(),
                               (a["layer.weight"].double() + b["layer.weight"].double()) * 2,
                               rtol=1e-6, atol=1e-6)


def test_half_precision_inputs_are_computed_in_float32_and_written_as_the_first_inputs_dtype(author, tmp_path):
    a = torch.tensor([1.0, 2.5, -3.0, 0.1], dtype=torch.float16)
    b = torch.tensor([0.5, 0.25, 8.0, 0.2], dtype=torch.float16)
    pa = write_checkpoint(tmp_path / "a.safetensors", {"k": a})
    pb = write_checkpoint(tmp_path / "b.safetensors", {"k": b})
    merged = load_file(mecha_core.merge(mecha_core.scale_sum(pa, pb), output=tmp_path / "o.safetensors"))
    assert merged["k"].dtype == torch.float16
    # by hand: (1 + 0.5) * 3 = 4.5, (2.5 + 0.25) * 3 = 8.25, (-3 + 8) * 3 = 15; 0.1 and 0.2 round in half
    assert merged["k"][:3].tolist() == [4.5, 8.25, 15.0]
    assert merged["k"][3].item() == torch.tensor((a[3].item() + b[3].item()) * 3.0, dtype=torch.float16).item()


def test_a_method_may_ask_for_the_context(tmp_path):
    @merge_method
    def key_noise(a, *, seed: int = 0, ctx):
        """a plus uniform noise drawn from a generator seeded by seed and the key."""
        return a + torch.rand(ctx.info.shape, generator=ctx.generator(seed))

    seen = []

    @merge_method
    def spy(a, *, ctx):
        """a, recording the context."""
        seen.append((ctx.key, ctx.info.shape, ctx.info.dtype))
        return a

    tensors = {"one": torch.zeros(5), "two": torch.zeros(2, 3)}
    pa = write_checkpoint(tmp_path / "a.safetensors", tensors)
    with using(plugin_from_functions("ctx", mecha_merge_methods=lambda: [key_noise, spy])):
        merged = load_file(mecha_core.merge(mecha_core.key_noise(pa, seed=11), output=tmp_path / "o.safetensors"))
        mecha_core.merge(mecha_core.spy(pa), output=tmp_path / "spy.safetensors", threads=1)
    assert sorted(seen) == [("one", (5,), "float32"), ("two", (2, 3), "float32")]
    for key, zeros in tensors.items():
        # the documented seeding, written out independently: sha256("<seed>\0<key>"), first 8 bytes
        digest = hashlib.sha256(f"11\0{key}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        assert torch.equal(merged[key], zeros + torch.rand(zeros.shape, generator=gen))
    assert not torch.equal(merged["one"][:2], merged["two"][0, :2])


def test_accepts_missing_passes_none_for_an_input_lacking_a_key(tmp_path):
    @merge_method(accepts_missing=True)
    def first_present(a, b):
        """a where a has the key, else b."""
        return a if a is not None else b * 10

    pa = write_checkpoint(tmp_path / "a.safetensors", {"shared": torch.tensor([1.0, 2.0])})
    pb = write_checkpoint(tmp_path / "b.safetensors", {"shared": torch.tensor([5.0, 6.0]),
                                                       "only_b": torch.tensor([7.0])})
    with using(plugin_from_functions("missing", mecha_merge_methods=lambda: [first_present])):
        merged = load_file(mecha_core.merge(mecha_core.first_present(pa, pb), output=tmp_path / "o.safetensors"))
    assert merged["shared"].tolist() == [1.0, 2.0]
    assert merged["only_b"].tolist() == [70.0]


def test_a_raising_method_is_a_plugin_code_error_naming_plugin_key_and_method_and_writes_nothing(tmp_path):
    @merge_method
    def explode(a):
        """Always fails."""
        raise ValueError("bad value")

    pa = write_checkpoint(tmp_path / "a.safetensors", {"k": torch.ones(2)})
    out = tmp_path / "o.safetensors"
    with using(plugin_from_functions("explode", mecha_merge_methods=lambda: [explode])):
        with pytest.raises(PluginCodeError, match=r"^plugin 'explode': method 'explode' failed on key 'k' "
                                                  r"\(file a\.safetensors\): ValueError: bad value$"):
            mecha_core.merge(mecha_core.explode(pa), output=out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_unknown_names_on_mecha_core_are_attribute_errors(author):
    with pytest.raises(AttributeError, match="'weighted_sum'.*no merge method of that name"):
        mecha_core.weighted_sum  # noqa: B018
    assert not hasattr(mecha_core, "no_such_method")
    with pytest.raises(ImportError):
        from mecha_core import no_such_method  # noqa: F401
