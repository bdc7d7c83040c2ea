"""Lazy architecture tables (:class:`mecha_core.specs.LazyArchitecture`, issue 16's start-up):
a table is built only when a merge needs it, and detection, which skips the tables a file cannot
match, chooses exactly what it chose with every table built."""

from __future__ import annotations

import pytest

from mecha_core.errors import MechaError, PluginCodeError, PluginError
from mecha_core.specs import Architecture, KeySpec, LazyArchitecture
from mecha_core.testing import check_plugin, detect_architecture, host_with, plugin_from_functions

BUILTIN = ("mecha_sd1.plugin", "mecha_sdxl.plugin", "mecha_sd3.plugin", "mecha_flux.plugin")


def _builtin_host():
    import importlib

    return host_with(*[importlib.import_module(m) for m in BUILTIN], names=["sd1", "sdxl", "sd3", "flux"])


def _table(keys: dict[str, KeySpec], name: str = "toy", **fields) -> Architecture:
    return Architecture(name=name, keys=keys, **fields)


def _counting(arch: Architecture, builds: list[str]):
    def build() -> Architecture:
        builds.append(arch.name)
        return arch
    return build


def test_the_builtin_lazy_tables_match_what_they_declare():
    # plugins check builds each table and checks it against its LazyArchitecture (count, prefixes)
    import importlib

    for module in BUILTIN:
        plugin = importlib.import_module(module)
        assert any(isinstance(a, LazyArchitecture) for a in plugin.mecha_architectures())
        assert check_plugin(plugin) == [], module


def _key_sets(host) -> dict[str, frozenset[str]]:
    """Files to detect: each table's required keys, its keys under their aliases (BFL names,
    kohya's ``te.``), 90% and 89% of them, SD1's keys with other tables' keys added, an LLM."""
    out = {}
    for arch in host.architectures.values():
        required = sorted(arch.required_keys)
        out[arch.name] = frozenset(required)
        aliased = [next(iter(arch.keys[k].aliases), k) for k in required]
        out[arch.name + " aliased"] = frozenset(aliased)
        for fraction in (0.9, 0.89):
            out[f"{arch.name} {fraction}"] = frozenset(required[:int(len(required) * fraction + 0.999)])
    sd1 = out["sd1-ldm"]
    for other in ("sdxl-sgm", "sd3-comfyui", "flux-dev", "sd1-diffusers"):
        out["sd1-ldm + " + other] = sd1 | out[other]
    out["llm"] = frozenset({"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                            *(f"model.layers.{i}.mlp.up_proj.weight" for i in range(40))})
    return out


def _detected(host, keys: frozenset[str]) -> str | None:
    try:
        found = detect_architecture("f.safetensors", keys, host)
    except MechaError as exc:  # an ambiguity is an answer too
        return f"error: {exc}"
    return found.name if found else None


def test_detection_chooses_what_it_chose_with_every_table_built():
    eager = _builtin_host()
    files = _key_sets(eager)  # builds every table: this host detects as before lazy tables
    assert len(eager.architectures.built()) == 14
    expected = {name: _detected(eager, keys) for name, keys in files.items()}
    assert expected["sd1-ldm"] == "sd1-ldm" and expected["flux-dev aliased"] == "flux-dev"
    assert expected["llm"] is None and expected["sdxl-sgm 0.89"] is None  # the cases mean something
    for name, keys in files.items():
        lazy = _builtin_host()
        assert _detected(lazy, keys) == expected[name], name
        found = expected[name]
        if found is not None and not found.startswith("error"):
            assert found in lazy.architectures.built(), name


def test_a_file_builds_only_the_tables_it_can_match():
    host = _builtin_host()
    sd1 = host.architecture("sd1-ldm")  # builds sd1-ldm alone
    assert host.architectures.built() == ["sd1-ldm"]
    fresh = _builtin_host()
    assert detect_architecture("a.safetensors", frozenset(sd1.keys), fresh).name == "sd1-ldm"
    assert fresh.architectures.built() == ["sd1-ldm"]
    llm = frozenset({"model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "lm_head.weight"})
    assert detect_architecture("b.safetensors", llm, fresh) is None
    assert fresh.architectures.built() == ["sd1-ldm"]


def test_a_lazy_table_is_built_once_and_found_by_its_aliases():
    builds: list[str] = []
    arch = _table({"a.w": KeySpec((2,), "float32", "c")}, aliases=("t",))
    plugin = plugin_from_functions("p", mecha_architectures=lambda: [
        LazyArchitecture("toy", _counting(arch, builds), key_prefixes=("a.",), required_keys=1, aliases=("t",))])
    host = host_with(plugin)
    assert builds == [] and host.architectures.names() == ["toy"]
    assert host.architecture("t") is arch and host.architecture("toy") is arch
    assert builds == ["toy"]


def test_the_bound_is_exact_at_min_match():
    # 10 required keys, min_match 0.9: 9 present keys under the prefix are a match, 8 are not
    keys = {f"a.{i}": KeySpec((1,), "float32", "c") for i in range(10)}
    builds: list[str] = []
    plugin = plugin_from_functions("p", mecha_architectures=lambda: [
        LazyArchitecture("toy", _counting(_table(keys), builds), key_prefixes=("a.",), required_keys=10)])
    host = host_with(plugin)
    assert detect_architecture("f", frozenset([f"a.{i}" for i in range(8)] + ["b.0", "b.1"]), host) is None
    assert builds == []  # 8 of 10 under "a.": the table cannot match, so it is not built
    assert detect_architecture("f", frozenset(f"a.{i}" for i in range(9)), host).name == "toy"
    assert builds == ["toy"]


def test_a_table_that_breaks_its_declaration_is_refused_when_built():
    keys = {"a.w": KeySpec((1,), "float32", "c"), "b.w": KeySpec((1,), "float32", "c")}
    wrong_prefix = LazyArchitecture("toy", lambda: _table(keys), key_prefixes=("a.",), required_keys=2)
    host = host_with(plugin_from_functions("p", mecha_architectures=lambda: [wrong_prefix]))
    with pytest.raises(PluginError, match=r"^plugin 'p': architecture 'toy': required key 'b.w' has name 'b.w', "
                                          r"which starts with none of key_prefixes \('a.',\)"):
        host.architecture("toy")
    wrong_count = LazyArchitecture("toy", lambda: _table(keys), key_prefixes=("a.", "b."), required_keys=3)
    assert check_plugin(plugin_from_functions("p", mecha_architectures=lambda: [wrong_count])) == [
        "architecture 'toy': the table has 2 required keys, but the LazyArchitecture says required_keys=3"]
    wrong_alias = LazyArchitecture("toy", lambda: _table(keys), key_prefixes=("a.", "b."), required_keys=2,
                                   aliases=("t",))
    assert check_plugin(plugin_from_functions("p", mecha_architectures=lambda: [wrong_alias])) == [
        "architecture 'toy': build() gave aliases (), but the LazyArchitecture says ('t',)"]


def test_a_build_that_raises_names_the_plugin():
    def broken() -> Architecture:
        raise KeyError("missing table")

    lazy = LazyArchitecture("toy", broken, key_prefixes=("a.",), required_keys=1)
    host = host_with(plugin_from_functions("p", mecha_architectures=lambda: [lazy]))
    assert host.records[0].status == "ok"  # loading does not build
    with pytest.raises(PluginCodeError, match=r"^plugin 'p': architecture 'toy': build\(\) raised KeyError: "
                                              r"'missing table'$"):
        host.architecture("toy")
    assert check_plugin(plugin_from_functions("p", mecha_architectures=lambda: [lazy])) == [
        "architecture 'toy': build() raised KeyError: 'missing table'"]


def test_a_malformed_lazy_spec_fails_its_plugin_at_load():
    bad = LazyArchitecture("toy", "not callable", key_prefixes=["a."], required_keys=-1)  # type: ignore[arg-type]
    host = host_with(plugin_from_functions("p", mecha_architectures=lambda: [bad]), strict=False)
    assert host.records[0].status == "error"
    assert host.records[0].error.startswith("architecture 'toy': build must be callable, got str (and 2 more")
