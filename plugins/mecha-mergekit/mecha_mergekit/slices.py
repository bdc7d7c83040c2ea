"""mergekit's ``slices:`` (layer ranges, layer stacking) and ``modules:``, as mergekit 0.1.5
plans them (``mergekit/plan.py``).

Each slice is one call of the merge method over its sources, every source read as a layer view
(``model(..., layers="a:b", at=..., of=...)``): the slice's layers numbered as the output's, so
the call runs at the output's keys. The slices are joined with ``|`` (each key from the first
slice that has it). Like mergekit, the layers before the stack (embeddings) are merged from the
first slice's sources, the ones after it (final norm, LM head) from the last slice's; a gradient
runs over each slice's own layers (layer ``i`` of a slice of ``n`` at ``t = i / (n - 1)``, a
one-layer slice at 1), and parameters are looked up in a source's own, the slice's, the module's,
then the global ``parameters``.
"""

from __future__ import annotations

from typing import Any

from mecha_core.kit.recipes import LayerView, ModelNode, Node

#: the module every single-module (Llama-family) architecture has in mergekit
DEFAULT_MODULE = "default"
_SLICE_KEYS = ("sources", "base_model", "parameters")
_SOURCE_KEYS = ("model", "layer_range", "parameters")


def _line(mapping: Any, key: str, default: int) -> int:
    return mapping.line_of(key) if hasattr(mapping, "line_of") else default


def _own_line(value: Any, default: int) -> int:
    return getattr(value, "line", default)


def module_body(reader: Any, config: Any, allowed: frozenset[str], method: str) -> tuple[Any, list[dict]]:
    """The mapping that holds the merge's ``models:`` or ``slices:`` (the config itself, or its
    one ``default`` module), and the parameters between the slices' and the global ones (the
    module's)."""
    forms = [k for k in ("models", "slices", "modules") if config.get(k) is not None]
    if len(forms) != 1:
        line = config.line_of(forms[1]) if len(forms) > 1 else config.line
        raise reader.fail("a config has exactly one of models, slices or modules", line)
    if forms[0] != "modules":
        return config, []
    modules = config["modules"]
    line = config.line_of("modules")
    if not isinstance(modules, dict) or not modules:
        raise reader.fail("modules must be a mapping of module name -> {slices: ...} or {models: ...}", line)
    for name in modules:
        if name != DEFAULT_MODULE:
            raise reader.fail(f"module '{name}': mecha's mergekit reader merges the one module of single-module "
                              f"(Llama-family) models, '{DEFAULT_MODULE}'; '{name}' belongs to a multi-module "
                              f"architecture (vision-language or encoder-decoder), which mecha's LLM families "
                              f"do not read", _line(modules, name, line))
    body = modules[DEFAULT_MODULE]
    at = _own_line(body, line)
    if not isinstance(body, dict):
        raise reader.fail(f"module '{DEFAULT_MODULE}' must be a mapping with slices or models", at)
    for key in body:
        if key not in ("slices", "models", "parameters"):
            raise reader.fail(f"unknown key '{key}' in module '{DEFAULT_MODULE}' (slices, models, parameters)",
                              _line(body, key, at))
    if (body.get("slices") is None) == (body.get("models") is None):
        raise reader.fail(f"module '{DEFAULT_MODULE}' has exactly one of slices or models", at)
    params = reader.parameters(body.get("parameters"), _line(body, "parameters", at), allowed, method)
    return body, [params] if params else []


class _Source:
    """One source of a slice: its model, layer range, parameters and lines."""

    def __init__(self, ref: str, start: int, stop: int, params: dict[str, Any], line: int, range_line: int):
        self.ref, self.start, self.stop, self.params = ref, start, stop, params
        self.line, self.range_line = line, range_line


def _sources(reader: Any, item: Any, at: int, allowed: frozenset[str], method: str) -> list[_Source]:
    sources = item.get("sources")
    line = _line(item, "sources", at)
    if not isinstance(sources, list) or not sources:
        raise reader.fail("a slice needs sources: a non-empty list of {model, layer_range, parameters}", line)
    out: list[_Source] = []
    for source in sources:
        where = _own_line(source, line)
        if not isinstance(source, dict) or "model" not in source or "layer_range" not in source:
            raise reader.fail("each source of a slice needs 'model' and 'layer_range'", where)
        for key in source:
            if key not in _SOURCE_KEYS:
                raise reader.fail(f"unknown key '{key}' in a slice's source ({', '.join(_SOURCE_KEYS)})",
                                  _line(source, key, where))
        range_line = _line(source, "layer_range", where)
        bounds = source["layer_range"]
        if not (isinstance(bounds, list) and len(bounds) == 2
                and all(isinstance(b, int) and not isinstance(b, bool) for b in bounds)):
            raise reader.fail(f"layer_range must be [start, end] (whole numbers), got {bounds!r}", range_line)
        start, stop = bounds
        if not 0 <= start < stop:
            raise reader.fail(f"layer_range [{start}, {stop}] is empty or negative (layers start to end - 1, "
                              f"from 0)", range_line)
        params = reader.parameters(source.get("parameters"), _line(source, "parameters", where), allowed, method)
        model_line = _line(source, "model", where)
        ref = source["model"]
        if not isinstance(ref, str) or not ref.strip():
            raise reader.fail(f"a model must be a path or a Hugging Face id, got {ref!r}", model_line)
        if "+" in ref:
            raise reader.fail(f"model '{ref}': base+lora models (PEFT adapters) are not supported in slices by "
                              f"mecha's mergekit reader", model_line)
        if any(s.ref == source["model"] for s in out):
            raise reader.fail(f"model '{source['model']}' is a source of this slice twice (mergekit keys a "
                              f"slice's inputs by model: one of them would be lost)", model_line)
        out.append(_Source(source["model"], start, stop, params, model_line, range_line))
    width = out[0].stop - out[0].start
    for s in out[1:]:
        if s.stop - s.start != width:
            raise reader.fail(f"layer_range [{s.start}, {s.stop}] has {s.stop - s.start} layers, but the slice's "
                              f"first source has {width}: every source of a slice has as many layers",
                              s.range_line)
    return out


def read_slices(reader: Any, body: Any, outer: list[dict], method: str, rules: tuple[frozenset[str], str],
                global_params: dict[str, Any], dtype: str | None) -> Node:
    """The ``slices:`` of ``body`` as one call per slice over layer views, joined with ``|``;
    ``rules``: the parameters the method reads and whether it takes a base (reader.METHODS)."""
    allowed, base_rule = rules
    slices = body.get("slices")
    line = _line(body, "slices", 1)
    if not isinstance(slices, list) or not slices:
        raise reader.fail("slices must be a non-empty list of {sources: [...]}", line)
    config = reader.config
    parsed = []
    for item in slices:
        at = _own_line(item, line)
        if not isinstance(item, dict):
            raise reader.fail("each slice must be a mapping with sources", at)
        for key in item:
            if key not in _SLICE_KEYS:
                why = (" (mergekit 0.1.5 reads it but never uses it)" if key == "residual_weight" else "")
                raise reader.fail(f"unknown key '{key}' in a slice ({', '.join(_SLICE_KEYS)}){why}",
                                  _line(item, key, at))
        sources = _sources(reader, item, at, allowed, method)
        params = reader.parameters(item.get("parameters"), _line(item, "parameters", at), allowed, method)
        if item.get("base_model") is not None:
            base_ref, base_line = item["base_model"], _line(item, "base_model", at)
        else:
            base_ref, base_line = config.get("base_model"), config.line_of("base_model")
        parsed.append((sources, params, base_ref, base_line, at))
    if len(parsed) > 1 and len(parsed[-1][0]) > len(parsed[0][0]):
        # plan_module gives the final norm and head len(first slice's sources) input names: the
        # last slice's other sources are dropped there without a word
        raise reader.fail(f"the last slice has {len(parsed[-1][0])} sources but the first {len(parsed[0][0])}: "
                          f"mergekit 0.1.5 then merges the final norm and LM head from only the first "
                          f"{len(parsed[0][0])} of them; give the last slice at most as many sources",
                          parsed[-1][4])
    total = sum(s[0].stop - s[0].start for s, *_ in parsed)
    first = 0
    merged: list[Node] = []
    for index, (sources, params, base_ref, base_line, at) in enumerate(parsed):
        width = sources[0].stop - sources[0].start
        outside = ("all" if len(parsed) == 1 else "before" if index == 0
                   else "after" if index == len(parsed) - 1 else "none")
        by_ref = {s.ref: s for s in sources}
        if base_rule == "none":
            base_ref = None  # linear takes a slice's sources; a base that is not one of them is not read
        elif base_ref is not None and base_ref not in by_ref:
            raise reader.fail(f"base_model '{base_ref}' is not a source of this slice (mergekit reads the base's "
                              f"layers from the slice's sources)", at)

        def view(ref: str, _line_: int, by_ref: dict[str, _Source] = by_ref, first: int = first,
                 outside: str = outside) -> Node:
            source = by_ref[ref]
            layers = LayerView(source.start, source.stop, first, total, outside)
            node: Node = ModelNode(reader.resolve(ref), vocab=reader.vocab.get(ref), layers=layers,
                                   base_dir=reader.base_dir,
                                   where=reader.where(source.line))
            if dtype is not None:  # mergekit loads every input in the config's dtype
                node = reader.call("cast", [node], {"dtype": dtype}, source.line)
            return node

        entries = [(s.ref, s.params, s.line) for s in sources]
        inputs = [e for e in entries if base_rule == "none" or e[0] != base_ref]
        settings = {"global": global_params, "outer": ([params] if params else []) + outer,
                    "span": [first, width], "shift": [by_ref[ref].start - first for ref, _, _ in inputs]}
        if not any(settings["shift"]):
            del settings["shift"]
        merged.append(reader.merge(method, entries, base_ref, base_line, _line(slices[index], "sources", at),
                                   view, settings))
        first += width
    root = merged[0]
    for part in merged[1:]:
        root = reader.call("fallback", [root, part], {}, line)
    return root
