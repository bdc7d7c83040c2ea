"""Architecture families (layouts computed from a file's header and config.json), layer gradients
and keep_vocab, with a synthetic family: a toy stack of N layers."""

from __future__ import annotations

import json
import re

import pytest
import torch

import mecha_core
from mecha_core.engine.plan import make_plan
from mecha_core.errors import MechaError, PlanError, PluginCodeError, PluginError, RecipeError
from mecha_core.plugins import plugin_from_functions
from mecha_core.recipe.format import dump, load_v1
from mecha_core.specs import Architecture, ArchitectureFamily, KeySpec
from mecha_core.testing import check_plugin, host_with, open_model, read_tensors, using, write_checkpoint

_LAYER = re.compile(r"stack\.(\d+)\.(attn|ff)\.w")


def toy_layout(header, config):
    """Members: config.json says model_type "toy"; one block per stack layer."""
    if not config or config.get("model_type") != "toy":
        return None
    layers = sorted({int(m.group(1)) for k in header if (m := _LAYER.fullmatch(k))})
    if not layers:
        return None
    blocks = tuple(f"layer_{i}" for i in range(len(layers)))
    keys = {"embed.w": KeySpec(header["embed.w"].shape, "float32", "text", blocks=("embed",), klass="embed")}
    for key in header:
        if m := _LAYER.fullmatch(key):
            keys[key] = KeySpec(header[key].shape, "float32", "text", blocks=(f"layer_{m.group(1)}",),
                                klass=f"{m.group(2)}_w")
    keys["head.w"] = KeySpec(header["embed.w"].shape, "float32", "text", optional=True, blocks=("head",),
                             klass="head")
    return Architecture(f"toy-{len(layers)}l", keys, blocks=("embed", *blocks, "head"),
                        classes=("attn_w", "embed", "ff_w", "head"), layers=blocks,
                        vocab_keys=("embed.w", "head.w"), description=f"toy family: {len(layers)} layers")


TOY = ArchitectureFamily("toy", detect=toy_layout, description="a toy stack")


def toy_plugin(*families):
    return plugin_from_functions("toyplug", mecha_architecture_families=lambda: list(families or (TOY,)))


def write_toy(folder, layers=3, vocab=5, seed=0, config=None, head=True):
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {"embed.w": torch.randn(vocab, 4, generator=g)}
    for i in range(layers):
        tensors[f"stack.{i}.attn.w"] = torch.randn(4, 4, generator=g)
        tensors[f"stack.{i}.ff.w"] = torch.randn(4, 4, generator=g)
    if head:
        tensors["head.w"] = torch.randn(vocab, 4, generator=g)
    (folder / "config.json").write_text(json.dumps(config if config is not None else {"model_type": "toy"}))
    return write_checkpoint(folder / "model.safetensors", tensors)


# -- detection -----------------------------------------------------------------------------------
def test_a_member_is_detected_with_its_own_layer_count(tmp_path):
    host = host_with(toy_plugin())
    for layers in (2, 5):
        source = open_model(write_toy(tmp_path / f"m{layers}", layers), host)
        assert source.arch == f"toy-{layers}l"
        assert host.family_of(source.arch) == "toy"
        assert host.architecture(source.arch).layers == tuple(f"layer_{i}" for i in range(layers))
        source.close()


def test_no_config_json_is_no_member_of_a_family_that_needs_one(tmp_path):
    path = write_toy(tmp_path / "m")
    (tmp_path / "m" / "config.json").unlink()
    source = open_model(path, host_with(toy_plugin()))
    assert source.arch is None
    source.close()


def test_fixed_architectures_are_tried_first(tmp_path):
    offered = []

    def detect(header, config):
        offered.append(set(header))
        return toy_layout(header, config)

    path = write_toy(tmp_path / "m", layers=1)
    fixed = Architecture("fixed", {k: KeySpec((4, 4) if "stack" in k else (5, 4), "float32", "x")
                                   for k in ("embed.w", "stack.0.attn.w", "stack.0.ff.w", "head.w")})
    host = host_with(plugin_from_functions("fix", mecha_architectures=lambda: [fixed]),
                     toy_plugin(ArchitectureFamily("toy", detect=detect)))
    source = open_model(path, host)
    assert source.arch == "fixed" and offered == []
    source.close()


def test_two_families_claiming_a_file_is_an_ambiguity_error(tmp_path):
    other = ArchitectureFamily("toy2", detect=lambda h, c: attrs_renamed(toy_layout(h, c), "toy2-3l"))
    host = host_with(toy_plugin(TOY, other))
    with pytest.raises(PlanError, match=r"model.safetensors: the architecture is ambiguous \(candidates: toy, toy2\)"):
        open_model(write_toy(tmp_path / "m"), host)


def attrs_renamed(arch, name):
    import attrs

    return attrs.evolve(arch, name=name) if arch is not None else None


def test_arch_names_a_family_for_a_file(tmp_path):
    path = write_toy(tmp_path / "m", config={})  # no model_type: only arch="toy" makes it a member
    host = host_with(toy_plugin(ArchitectureFamily("toy", detect=lambda h, c: toy_layout(h, {"model_type": "toy"}))))
    source = open_model(path, host, arch="toy")
    assert source.arch == "toy-3l"
    source.close()
    refused = host_with(toy_plugin())
    with pytest.raises(PlanError, match='names the toy family, but the file is not one of its members'):
        open_model(path, refused, arch="toy")


def test_a_raising_family_is_no_member_and_warns_once(tmp_path, capsys):
    def broken(header, config):
        raise KeyError("oops")

    host = host_with(toy_plugin(ArchitectureFamily("bad", detect=broken)))
    for name in ("a", "b"):
        source = open_model(write_toy(tmp_path / name), host)
        assert source.arch is None
        source.close()
    err = capsys.readouterr().err
    assert err.count("architecture family 'bad': detect raised KeyError") == 1


def test_a_family_returning_no_architecture_is_a_plugin_error(tmp_path):
    host = host_with(toy_plugin(ArchitectureFamily("bad", detect=lambda h, c: {"not": "an arch"})))
    with pytest.raises(PluginCodeError, match="plugin 'toyplug': architecture family 'bad' returned dict"):
        open_model(write_toy(tmp_path / "m"), host)


def test_an_invalid_computed_layout_is_a_plugin_error(tmp_path):
    bad = ArchitectureFamily("bad", detect=lambda h, c: Architecture("bad-1l", {"k": KeySpec((1,), "float32", "x")},
                                                                      layers=("nope",)))
    with pytest.raises(PluginCodeError, match=r"invalid layout .*layers \['nope'\] are not in its blocks"):
        open_model(write_toy(tmp_path / "m"), host_with(toy_plugin(bad)))


def test_a_broken_config_json_names_the_file(tmp_path):
    path = write_toy(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(PlanError, match=r"m/config.json: cannot read the model's config \(JSONDecodeError"):
        open_model(path, host_with(toy_plugin()))


def test_family_specs_are_validated_when_loaded():
    bad = ArchitectureFamily("bad", detect="not callable")
    with pytest.raises(PluginError, match="architecture family 'bad': detect must be callable, got str"):
        host_with(toy_plugin(bad))


def test_plugins_check_runs_a_family_on_an_empty_file():
    claims = ArchitectureFamily("greedy", detect=lambda h, c: Architecture("g", {}))
    problems = check_plugin(toy_plugin(claims))
    assert any("detect({}, None) must be None" in p for p in problems)
    assert not check_plugin(toy_plugin())


def test_two_layouts_given_one_name_stay_apart(tmp_path):
    sloppy = ArchitectureFamily("toy", detect=lambda h, c: attrs_renamed(toy_layout(h, c), "toy"))
    host = host_with(toy_plugin(sloppy))
    first = open_model(write_toy(tmp_path / "a", layers=2), host)
    second = open_model(write_toy(tmp_path / "b", layers=3), host)
    again = open_model(write_toy(tmp_path / "c", layers=3, seed=4), host)
    assert first.arch == "toy" and re.fullmatch(r"toy~[0-9a-f]{8}", second.arch) and again.arch == second.arch
    assert len(host.architecture(second.arch).layers) == 3 and len(host.architecture("toy").layers) == 2
    for s in (first, second, again):
        s.close()


def test_a_layout_may_not_take_a_fixed_architectures_name(tmp_path):
    fixed = Architecture("toy-3l", {"other": KeySpec((1,), "float32", "x")})
    host = host_with(plugin_from_functions("fix", mecha_architectures=lambda: [fixed]), toy_plugin())
    with pytest.raises(PluginError, match="named a file's layout 'toy-3l', which is a fixed architecture's name"):
        open_model(write_toy(tmp_path / "a"), host)


# -- maps and layer gradients --------------------------------------------------------------------
def _scaled(tmp_path, alpha, layers=5):
    path = write_toy(tmp_path / "m", layers)
    with using(toy_plugin()):
        mecha_core.merge(mecha_core.scale(mecha_core.model(path), alpha=alpha), tmp_path / "o.safetensors")
    return read_tensors(path), read_tensors(tmp_path / "o.safetensors")


def test_a_gradient_is_spread_evenly_over_the_layers(tmp_path):
    # five layers at t = 0, 1/4, 1/2, 3/4, 1 on anchors [0, 1, 0.5] (at t = 0, 1/2, 1)
    source, out = _scaled(tmp_path, mecha_core.layers("toy", [0.0, 1.0, 0.5]))
    expected = {0: 0.0, 1: 0.5, 2: 1.0, 3: 0.75, 4: 0.5}
    for i, alpha in expected.items():
        for part in ("attn", "ff"):
            key = f"stack.{i}.{part}.w"
            torch.testing.assert_close(out[key], source[key] * alpha)
    # keys outside the layers sit at the gradient's start (mergekit's t = 0)
    torch.testing.assert_close(out["embed.w"], source["embed.w"] * 0.0)


def test_class_filters_and_default(tmp_path):
    alpha = mecha_core.layers("toy", attn=[1.0, 3.0], default=2.0)
    source, out = _scaled(tmp_path, alpha, layers=3)
    for i, t in enumerate((0.0, 0.5, 1.0)):
        torch.testing.assert_close(out[f"stack.{i}.attn.w"], source[f"stack.{i}.attn.w"] * (1.0 + 2.0 * t))
        torch.testing.assert_close(out[f"stack.{i}.ff.w"], source[f"stack.{i}.ff.w"] * 2.0)
    torch.testing.assert_close(out["head.w"], source["head.w"] * 2.0)


def test_a_single_layer_sits_at_the_gradient_end(tmp_path):
    source, out = _scaled(tmp_path, mecha_core.layers("toy", [2.0, 4.0]), layers=1)
    torch.testing.assert_close(out["stack.0.ff.w"], source["stack.0.ff.w"] * 4.0)
    torch.testing.assert_close(out["embed.w"], source["embed.w"] * 2.0)


def test_a_gradient_joined_with_a_block_map(tmp_path):
    alpha = mecha_core.blocks("toy", layer_1=7.0) | mecha_core.layers("toy", [0.0, 1.0])
    source, out = _scaled(tmp_path, alpha, layers=3)
    torch.testing.assert_close(out["stack.1.ff.w"], source["stack.1.ff.w"] * 7.0)
    torch.testing.assert_close(out["stack.2.ff.w"], source["stack.2.ff.w"] * 1.0)


def test_layers_text_round_trips():
    text = ('mecha 1\nm = model("m.safetensors")\n'
            'scale = scale(m, alpha=layers("toy", [0, 0.5, 1], attn=[1, 0], ff=0.25))\n')
    recipe = load_v1(text)
    assert dump(recipe) == text
    assert load_v1(dump(recipe)) == recipe
    both = text.replace('[0, 0.5, 1], attn', '[0, 0.5, 1], default=0.5, attn')
    assert dump(load_v1(both)) == both
    assert load_v1(both) != recipe


@pytest.mark.parametrize("text,message", [
    ('layers([0, 1])', "layers takes an architecture"),
    ('layers("toy", [])', "must be a number or a non-empty list of numbers"),
    ('layers("toy", [0, 1], [1, 0])', "layers takes an architecture"),
    ('layers("toy", attn="x")', "must be a number"),
])
def test_bad_layers_are_recipe_errors(text, message):
    with pytest.raises(RecipeError, match=message):
        load_v1(f'mecha 1\nm = model("m")\nout = scale(m, alpha={text})\n')


def test_a_gradient_on_an_architecture_without_layers_is_refused(tmp_path):
    fixed = Architecture("flat", {"w": KeySpec((2,), "float32", "x", blocks=("B",), klass="c")}, blocks=("B",),
                         classes=("c",))
    path = write_checkpoint(tmp_path / "f.safetensors", {"w": torch.ones(2)})
    with using(plugin_from_functions("f", mecha_architectures=lambda: [fixed])):
        with pytest.raises(RecipeError, match="flat has no layers for a layer gradient"):
            mecha_core.merge(mecha_core.scale(mecha_core.model(path), alpha=mecha_core.layers("flat", [0, 1])),
                             tmp_path / "o.safetensors")


# -- vocabularies --------------------------------------------------------------------------------
def test_keep_vocab_is_recorded_in_the_plan(tmp_path):
    a, b = write_toy(tmp_path / "a", vocab=5), write_toy(tmp_path / "b", vocab=7, seed=1)
    recipe = mecha_core.add(mecha_core.model(a), mecha_core.subtract(mecha_core.model(b, keep_vocab=True),
                                                                     mecha_core.model(a)))
    host = host_with(toy_plugin())
    with make_plan(recipe, host=host) as plan:
        assert plan.vocab_from == b
        assert plan.output["embed.w"].shape == (7, 4)
    with make_plan(mecha_core.add(mecha_core.model(a), mecha_core.subtract(mecha_core.model(a), mecha_core.model(a))),
                   host=host) as plan:
        assert plan.vocab_from is None


def test_keep_vocab_fills_and_cuts_rows(tmp_path):
    a, b = write_toy(tmp_path / "a", vocab=5), write_toy(tmp_path / "b", vocab=7, seed=1)
    ta, tb = read_tensors(a), read_tensors(b)
    with using(toy_plugin()):
        # a + (b - a) with a's vocabulary: b's rows 5 and 6 are dropped
        mecha_core.merge(mecha_core.add(mecha_core.model(a, keep_vocab=True),
                                        mecha_core.subtract(mecha_core.model(b), mecha_core.model(a, keep_vocab=True))),
                         tmp_path / "o.safetensors")
    out = read_tensors(tmp_path / "o.safetensors")
    torch.testing.assert_close(out["embed.w"], tb["embed.w"][:5])
    torch.testing.assert_close(out["stack.0.ff.w"], tb["stack.0.ff.w"])
    with using(toy_plugin()):  # with b's: a lacks rows 5 and 6, so they are b's own
        mecha_core.merge(mecha_core.add(mecha_core.model(a), mecha_core.subtract(
            mecha_core.model(b, keep_vocab=True), mecha_core.model(a))), tmp_path / "o2.safetensors")
    out = read_tensors(tmp_path / "o2.safetensors")
    # rows 0-4: a + (b - a); rows 5, 6: a lacks them, so both of its places hold b's rows
    expected = tb["head.w"].clone()
    expected[:5] = ta["head.w"] + (tb["head.w"][:5] - ta["head.w"])
    torch.testing.assert_close(out["head.w"], expected)
    assert out["head.w"].shape == (7, 4)


def test_two_models_keeping_their_vocabulary_is_an_error(tmp_path):
    a, b = write_toy(tmp_path / "a"), write_toy(tmp_path / "b", seed=1)
    recipe = mecha_core.add(mecha_core.model(a, keep_vocab=True),
                            mecha_core.subtract(mecha_core.model(b, keep_vocab=True), mecha_core.model(a)))
    with pytest.raises(RecipeError, match="keep_vocab is given to 2 models"):
        make_plan(recipe, host=host_with(toy_plugin()))


def test_keep_vocab_needs_an_architecture_with_vocabulary_keys(tmp_path):
    path = write_checkpoint(tmp_path / "x.safetensors", {"w": torch.ones(2)})
    with pytest.raises(MechaError, match="x.safetensors is of no known architecture, which names no vocabulary keys"):
        make_plan(mecha_core.model(path, keep_vocab=True), host=host_with(toy_plugin()))


def test_vocabulary_mismatch_without_keep_vocab_names_key_and_sizes(tmp_path):
    a, b = write_toy(tmp_path / "a", vocab=5), write_toy(tmp_path / "b", vocab=7, seed=1)
    with pytest.raises(PlanError, match=r"key 'embed.w' has a vocabulary of 5 rows in model.safetensors but 7"):
        make_plan(mecha_core.subtract(mecha_core.model(a), mecha_core.model(b)), host=host_with(toy_plugin()))


def test_keep_vocab_text_round_trips():
    text = 'mecha 1\nm = model("m.safetensors", keep_vocab=true)\n'
    assert dump(load_v1(text)) == text
    with pytest.raises(RecipeError, match="model takes a path"):
        load_v1('mecha 1\nm = model("m.safetensors", keep_vocab=1)\n')


def test_filters_name_whole_parts_of_classes_and_the_longest_wins():
    from mecha_core.recipe.values import layers

    m = layers("x", self_attn=1.0, q_proj=2.0, self_attn_q_proj=3.0, mlp=[4.0, 6.0], default=0.0)
    assert m.resolve((), "self_attn_q_proj", None) == 3.0
    assert m.resolve((), "self_attn_k_proj", None) == 1.0
    assert m.resolve((), "cross_q_proj", None) == 2.0
    assert m.resolve((), "mlp_up_proj", None, 0.5) == 5.0
    assert m.resolve((), "mlpx", None) == 0.0  # a part, not a prefix of one
    tie = layers("x", ab=1.0, cd=2.0)
    assert tie.resolve((), "ab_cd", None) == 1.0


def test_a_gradient_and_a_default_cover_the_layers_and_the_rest(tmp_path):
    # the gradient covers the layers' keys no filter matches; default the keys outside the layers
    source, out = _scaled(tmp_path, mecha_core.layers("toy", [1.0, 3.0], default=10.0, attn=5.0), layers=3)
    for i, t in enumerate((0.0, 0.5, 1.0)):
        torch.testing.assert_close(out[f"stack.{i}.ff.w"], source[f"stack.{i}.ff.w"] * (1.0 + 2.0 * t))
        torch.testing.assert_close(out[f"stack.{i}.attn.w"], source[f"stack.{i}.attn.w"] * 5.0)
    torch.testing.assert_close(out["embed.w"], source["embed.w"] * 10.0)
    torch.testing.assert_close(out["head.w"], source["head.w"] * 10.0)


def test_an_int_hyperparameter_refuses_a_fractional_gradient(tmp_path):
    from mecha_core.method import merge_method

    @merge_method(elementwise=True)
    def repeat(a, *, times: int = 1):
        """Scale a by times."""
        return a * times

    path = write_toy(tmp_path / "m")
    with using(toy_plugin(), plugin_from_functions("rep", mecha_merge_methods=lambda: [repeat])):
        with pytest.raises(RecipeError, match="hyperparameter 'times' must be int"):
            mecha_core.merge(repeat(mecha_core.model(path), times=mecha_core.layers("toy", [1, 2.5])),
                             tmp_path / "o.safetensors")
