"""mergekit YAML configs read into mecha recipe nodes (the ``mergekit`` recipe format).

The YAML is read with PyYAML's safe loader, keeping each mapping key's line, so every error
names the line of the key at fault. Every key of mergekit 0.1.5's config schema is either
translated or refused with a one-line error: nothing is silently ignored.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable

import yaml
from mecha_core.errors import RecipeError
from mecha_core.kit.recipes import CoreOnly, Location, ModelNode, Node, RecipeHost, call

from . import lora
from .hub import cached_snapshot, hub_cache
from .slices import module_body, read_slices
from .vocabulary import TOKENIZER_KEYS, referenced_models, vocab_maps

_TOP = re.compile(r"^(merge_method|slices|models)\s*:", re.MULTILINE)

# what the reader does not translate (yet): refused, naming the key's line
_UNSUPPORTED_TOP = {
}
_TOP_KEYS = {"merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype", "out_dtype",
             *_UNSUPPORTED_TOP, *TOKENIZER_KEYS}
_DTYPES = {"float32", "float16", "bfloat16", "float64"}

# method -> (parameter names it reads, base: "required" / "optional" / "none", input count rule)
_GTA_PARAMS = {"weight", "density", "normalize", "rescale", "lambda", "int8_mask"}
METHODS: dict[str, tuple[frozenset[str], str]] = {
    "linear": (frozenset({"weight", "normalize"}), "none"),
    "task_arithmetic": (frozenset(_GTA_PARAMS), "required"),
    "ties": (frozenset(_GTA_PARAMS), "required"),
    "dare_ties": (frozenset(_GTA_PARAMS), "required"),
    "dare_linear": (frozenset(_GTA_PARAMS), "required"),
    "breadcrumbs": (frozenset(_GTA_PARAMS | {"gamma"}), "required"),
    "breadcrumbs_ties": (frozenset(_GTA_PARAMS | {"gamma"}), "required"),
    "della": (frozenset(_GTA_PARAMS | {"epsilon"}), "required"),
    "della_linear": (frozenset(_GTA_PARAMS | {"epsilon"}), "required"),
    "slerp": (frozenset({"t"}), "required"),
    "nearswap": (frozenset({"t"}), "required"),
    "nuslerp": (frozenset({"weight", "nuslerp_row_wise", "nuslerp_flatten"}), "optional"),
    "model_stock": (frozenset({"filter_wise"}), "required"),
    "passthrough": (frozenset({"scale"}), "none"),
    "multislerp": (frozenset({"weight", "normalize_weights", "eps"}), "optional"),
    "karcher": (frozenset({"max_iter", "tol"}), "none"),
    "sce": (frozenset({"select_topk", "int8_mask"}), "required"),
    "arcee_fusion": (frozenset(), "required"),
}
_NOT_YET = ("ram", "ramplus_tl")


class _Map(dict):
    """A YAML mapping that remembers its own line and each key's line."""

    line: int = 1
    lines: dict

    def line_of(self, key: str) -> int:
        return self.lines.get(key, self.line)


class _List(list):
    line: int = 1


class _Loader(yaml.SafeLoader):
    """The safe loader, with line numbers kept on mappings and sequences."""


def _mapping(loader: _Loader, node: yaml.MappingNode) -> _Map:
    loader.flatten_mapping(node)
    out = _Map()
    out.line, out.lines = node.start_mark.line + 1, {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        out[key] = loader.construct_object(value_node, deep=True)
        out.lines[key] = key_node.start_mark.line + 1
    return out


def _sequence(loader: _Loader, node: yaml.SequenceNode) -> _List:
    out = _List(loader.construct_object(child, deep=True) for child in node.value)
    out.line = node.start_mark.line + 1
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _sequence)


def detect(text: str, path: str | None) -> bool:
    """A mergekit config: a ``.yml``/``.yaml`` file (or text given directly) with a top-level
    ``merge_method:``, ``slices:`` or ``models:`` key."""
    if path is not None and not path.lower().endswith((".yml", ".yaml")):
        return False
    return _TOP.search(text) is not None


class _Reader:
    def __init__(self, source: str, base_dir: str | None, host: RecipeHost) -> None:
        self.source, self.base_dir, self.host = source, base_dir, host
        self.models: dict[str, Node] = {}
        self.config: _Map = _Map()
        self.vocab: dict[str, str] = {}  # model ref -> its vocabulary map (tokenizer settings)

    def fail(self, message: str, line: int | None) -> RecipeError:
        return RecipeError(f"mergekit config: {message}", source=self.source, line=line)

    def where(self, line: int) -> Location:
        return Location(self.source, line, 1)

    def method(self, name: str, line: int):
        try:
            return self.host.method(name)
        except RecipeError as exc:
            raise self.fail(f"{exc}", line) from None

    def call(self, name: str, args: list[Node], kwargs: dict[str, Any], line: int) -> Node:
        try:
            return call(self.method(name, line), tuple(args), kwargs, where=self.where(line))
        except RecipeError as exc:
            raise self.fail(str(exc), line) from None

    def model(self, ref: Any, line: int, dtype: str | None) -> Node:
        if not isinstance(ref, str) or not ref.strip():
            raise self.fail(f"a model must be a path or a Hugging Face id, got {ref!r}", line)
        try:
            with_lora = lora.split(ref)
        except ValueError as exc:
            raise self.fail(str(exc), line) from None
        if ref not in self.models:
            node: Node = ModelNode(self.resolve(ref), vocab=self.vocab.get(ref), base_dir=self.base_dir,
                                   where=self.where(line)) \
                if with_lora is None else lora.base_plus_lora(
                    *with_lora, resolve=self.resolve, base_dir=self.base_dir, where=self.where(line),
                    call=lambda name, args, kwargs: self.call(name, args, kwargs, line))
            if dtype is not None:  # mergekit loads every input in the config's dtype
                node = self.call("cast", [node], {"dtype": dtype}, line)
            self.models[ref] = node
        return self.models[ref]

    def resolve(self, ref: str) -> str:
        """A path as written when it exists (absolute, or next to the config), else the hub
        cache's snapshot of a Hugging Face id; else as written, for ``--models-dir`` (the merge
        then names every folder it looked in)."""
        name, _, revision = ref.partition("@")
        if os.path.isabs(name) or os.path.exists(os.path.join(self.base_dir or ".", name)):
            return name
        snapshot = cached_snapshot(name, revision or None)
        return snapshot if snapshot is not None else name

    def parameters(self, params: Any, line: int, allowed: frozenset[str], method: str) -> dict[str, Any]:
        if params is None:
            return {}
        if not isinstance(params, dict):
            raise self.fail(f"parameters must be a mapping, got {params!r}", line)
        for name, setting in params.items():
            at = params.line_of(name) if isinstance(params, _Map) else line
            if name not in allowed:
                raise self.fail(f"parameter '{name}' is not one merge_method {method} reads "
                                f"(it reads {', '.join(sorted(allowed))})", at)
            self.check_setting(name, setting, at)
        return {name: _plain(value) for name, value in params.items()}

    def check_setting(self, name: str, setting: Any, line: int) -> None:
        scalar = (bool, int, float, str)
        if isinstance(setting, scalar):
            return
        entries = [setting] if isinstance(setting, dict) else setting
        if isinstance(entries, list) and entries and all(isinstance(e, scalar) for e in entries):
            return
        if isinstance(entries, list) and entries and all(isinstance(e, dict) for e in entries):
            for entry in entries:
                at = entry.line if isinstance(entry, _Map) else line
                extra = set(entry) - {"filter", "value"}
                if extra or "value" not in entry:
                    raise self.fail(f"parameter '{name}': a filter entry takes 'filter' and 'value' "
                                    f"(got {', '.join(sorted(map(str, entry)))})", at)
                if entry.get("filter") is not None and not isinstance(entry["filter"], str):
                    raise self.fail(f"parameter '{name}': filter must be text", at)
                self.check_setting(name, entry["value"], at)
            return
        raise self.fail(f"parameter '{name}' must be a number, a list of numbers or a list of "
                        f"filter/value entries, got {setting!r}", line)

    def read(self, config: Any) -> Node:
        if not isinstance(config, _Map):
            raise self.fail("the config must be a YAML mapping", 1)
        self.config = config
        for key in config:
            if key not in _TOP_KEYS:
                raise self.fail(f"unknown key '{key}' (mergekit 0.1.5's keys: "
                                f"{', '.join(sorted(_TOP_KEYS))})", config.line_of(key))
            if key in _UNSUPPORTED_TOP and config[key] is not None:
                raise self.fail(_UNSUPPORTED_TOP[key], config.line_of(key))
        if "merge_method" not in config:
            raise self.fail("merge_method is missing", config.line)
        method = config["merge_method"]
        method_line = config.line_of("merge_method")
        if method in _NOT_YET:
            raise self.fail(f"merge_method {method} is not supported by mecha's mergekit reader yet", method_line)
        if method not in METHODS:
            raise self.fail(f"unknown merge_method {method!r} (supported: {', '.join(METHODS)})", method_line)
        allowed, base_rule = METHODS[method]
        dtype = self.dtype(config, "dtype")
        out_dtype = self.dtype(config, "out_dtype")
        global_params = self.parameters(config.get("parameters"), config.line_of("parameters"), allowed, method)
        body, outer = module_body(self, config, allowed, method)
        # tokenizer settings: mergekit builds one tokenizer over every model the config names
        self.vocab = vocab_maps(self, config, referenced_models(body), config.get("base_model"),
                                config.line_of("base_model"), dtype)
        if body.get("slices") is not None:
            root = read_slices(self, body, outer, method, METHODS[method], global_params, dtype)
        else:
            root = self.read_models(body, outer, method, global_params, dtype)
        final = out_dtype or dtype
        if final is not None:
            root = self.call("cast", [root], {"dtype": final},
                             config.line_of("out_dtype" if out_dtype else "dtype"))
        return root

    def read_models(self, body: _Map, outer: list[dict[str, Any]], method: str, global_params: dict[str, Any],
                    dtype: str | None) -> Node:
        """A ``models:`` list (the config's, or a module's) as one call over whole models."""
        allowed, base_rule = METHODS[method]
        models = body.get("models")
        models_line = body.line_of("models")
        if not isinstance(models, list) or not models:
            raise self.fail("models must be a non-empty list of {model: ..., parameters: ...}", models_line)
        entries: list[tuple[str, dict[str, Any], int]] = []
        for item in models:
            at = item.line if isinstance(item, (_Map, _List)) else models_line
            if not isinstance(item, dict) or "model" not in item:
                raise self.fail("each entry of models needs a 'model' key", at)
            for key in item:
                if key not in ("model", "parameters"):
                    raise self.fail(f"unknown key '{key}' in a models entry (model, parameters)",
                                    item.line_of(key) if isinstance(item, _Map) else at)
            line = item.line_of("model") if isinstance(item, _Map) else at
            params_line = item.line_of("parameters") if isinstance(item, _Map) else at
            params = self.parameters(item.get("parameters"), params_line, allowed, method)
            entries.append((item["model"], params, line))
        base_ref = self.config.get("base_model")
        base_line = self.config.line_of("base_model")
        if base_ref is not None and base_rule == "none" and not any(e[0] == base_ref for e in entries):
            entries.append((base_ref, {}, base_line))  # linear: the base is an input like the others
        return self.merge(method, entries, base_ref, base_line, models_line,
                          lambda ref, line: self.model(ref, line, dtype), {"global": global_params, "outer": outer})

    def merge(self, method: str, entries: list[tuple[str, dict[str, Any], int]], base_ref: str | None,
              base_line: int, models_line: int, node_for: Callable[[str, int], Node],
              settings: dict[str, Any]) -> Node:
        """One ``mergekit_<method>`` call over ``entries`` (model, its parameters, its line), the
        base first where the method takes one; ``settings``: what the call's settings hold besides
        each input's own parameters."""
        _, base_rule = METHODS[method]
        method_line = self.config.line_of("merge_method")
        if base_ref is None and base_rule == "required":
            raise self.fail(f"merge_method {method} needs a base_model", method_line)
        if base_ref is not None and base_rule == "none" and method == "passthrough":
            raise self.fail("passthrough takes one model and no base_model", base_line)
        others = [e for e in entries if e[0] != base_ref]
        settings_inputs: list[dict[str, Any]]
        if base_rule == "none":  # linear, passthrough: every model is an input (linear: the base too)
            inputs = entries
            if method == "passthrough" and len(inputs) != 1:
                raise self.fail("passthrough takes exactly one model", models_line)
        else:
            inputs = others
            if method in ("slerp", "nearswap", "arcee_fusion") and len(inputs) != 1:
                raise self.fail(f"{method} takes the base_model and exactly one other model", models_line)
            if method == "nuslerp" and len(inputs) != 2:
                raise self.fail("nuslerp takes exactly two models besides the base_model", models_line)
            if method == "model_stock" and len(inputs) < 2:
                raise self.fail("model_stock takes the base_model and at least two other models", models_line)
        args = [node_for(ref, line) for ref, _, line in inputs]
        settings_inputs = [params for _, params, _ in inputs]
        if base_rule != "none":
            base = node_for(base_ref, base_line) if base_ref is not None else None
            if method == "nuslerp":
                args = args + ([base] if base is not None else [])
            elif method == "multislerp":
                args = ([base] if base is not None else []) + args
            else:
                args = [base, *args]
        extra = {k: v for k, v in settings.items() if v}
        text = json.dumps({**extra, "global": settings.get("global") or {}, "inputs": settings_inputs},
                          sort_keys=True, separators=(",", ":"))
        kwargs: dict[str, Any] = {"settings": text}
        if method == "multislerp" and base_ref is not None:
            kwargs["with_base"] = True
        return self.call(f"mergekit_{method}", args, kwargs, method_line)

    def dtype(self, config: _Map, key: str) -> str | None:
        value = config.get(key)
        if value is not None and value not in _DTYPES:
            raise self.fail(f"{key} must be one of {', '.join(sorted(_DTYPES))}, got {value!r}", config.line_of(key))
        return value


def _plain(value: Any) -> Any:
    """Plain dicts and lists, for JSON."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def load_mergekit(text: str, *, source: str = "<recipe>", base_dir: str | None = None,
                  host: RecipeHost | None = None) -> Node:
    """A mecha recipe graph from a mergekit YAML config."""
    try:
        config = yaml.load(text, Loader=_Loader)  # noqa: S506 (_Loader is a SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"mergekit config: not valid YAML: {problem}", source=source,
                          line=mark.line + 1 if mark is not None else None) from None
    return _Reader(source, base_dir, host or CoreOnly()).read(config)


__all__ = ["detect", "hub_cache", "load_mergekit"]
