"""The ``.mecha`` text format, version 1 (specified in docs/recipe-format.md).

    mecha 1
    # comments and blank lines are allowed
    a = model("a.safetensors")
    b = model("b.safetensors", arch="sd1-ldm")
    merged = weighted_sum(a, b, alpha=blocks("sd1-ldm", default=0.3, IN02=0.75))

Printing is deterministic (the same graph gives the same bytes) and ``load(dump(r)) == r``.
"""

from __future__ import annotations

import difflib
import gc
import json
import os
import re
from typing import Any, NamedTuple

from ..builtin_plugins import install_hint
from ..errors import MechaError, RecipeError
from .host import CoreOnly, RecipeHost, canonical_arch, disabled_note, method_names
from .nodes import (CallNode, LiteralNode, Location, ModelNode, Node, ParameterNode, call, layer_view, parameter,
                    parameter_clash, walk)
from .values import WeightMap, blocks, classes, format_string, format_value, join_maps, layers

HEADER = "mecha 1"
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BUILTINS = ("model", "parameter", "blocks", "classes", "layers")

#: Calls and lists nested in one line deeper than this are refused (the parser descends one
#: level of Python's stack per level; results meant to nest deeper go on lines of their own).
MAX_NESTING = 100


# -- printing ---------------------------------------------------------------------------------
_RESERVED = (*_BUILTINS, "true", "false", "null", "inf", "nan")


def _base_name(node: Node) -> str:
    if isinstance(node, ModelNode):
        stem = os.path.splitext(os.path.basename(node.path.rstrip("/\\")))[0]
    elif isinstance(node, ParameterNode):
        stem = node.name
    else:
        assert isinstance(node, CallNode)
        stem = node.method.name
    name = re.sub(r"[^A-Za-z0-9_]", "_", stem) or "model"
    if not _IDENT.fullmatch(name) or name in _RESERVED:
        name = "_" + name
    return name


def dump(root: Node) -> str:
    """The recipe as ``.mecha`` text (deterministic; ends with a newline).

    Each model, parameter and method call gets one line, inputs before their users, in the
    order a depth-first walk from the result meets them; literals are written inline. Names
    come from file stems, parameter names and method names, with ``_2``, ``_3`` ... on clashes.
    """
    if not isinstance(root, Node) or isinstance(root, LiteralNode):
        raise RecipeError("a recipe must be a model, a parameter or a method call, not a bare value")
    names: dict[Node, str] = {}
    used: set[str] = set()
    # The suffix each base name reached: names are only ever added to ``used``, so the next
    # free one is never below it (the same names as trying _2, _3 ... from the start each
    # time, in linear rather than quadratic time).
    next_suffix: dict[str, int] = {}
    lines = [HEADER]
    for node in walk(root):
        if isinstance(node, LiteralNode):
            continue
        base = _base_name(node)
        n = next_suffix.get(base, 1)
        name = base if n == 1 else f"{base}_{n}"
        while name in used:
            n += 1
            name = f"{base}_{n}"
        next_suffix[base] = n
        used.add(name)
        names[node] = name
        lines.append(f"{name} = {_expr(node, names)}")
    return "\n".join(lines) + "\n"


def _expr(node: Node, names: dict[Node, str]) -> str:
    if isinstance(node, ModelNode):
        args = [format_string(node.path)]
        if node.arch is not None:
            args.append(f"arch={format_string(node.arch)}")
        if node.type is not None:
            args.append(f"type={format_string(node.type)}")
        if node.keep_vocab:
            args.append("keep_vocab=true")
        if node.vocab is not None:
            args.append(f"vocab={format_string(node.vocab)}")
        view = node.layers
        if view is not None:
            args.append(f"layers={format_string(view.text())}")
            if view.at:
                args.append(f"at={view.at}")
            if view.total is not None:
                args.append(f"of={view.total}")
            if view.outside != "all":
                args.append(f"outside={format_string(view.outside)}")
        return f"model({', '.join(args)})"
    if isinstance(node, ParameterNode):
        args = [format_string(node.name)]
        if node.space is not None:
            args.append(f"space={format_string(node.space)}")
        return f"parameter({', '.join(args)})"
    assert isinstance(node, CallNode)
    args = [names[a] for a in node.args]
    for key, value in node.kwargs:
        args.append(f"{key}={names[value] if isinstance(value, ParameterNode) else format_value(value.value)}")
    return f"{node.method.name}({', '.join(args)})"


# -- parsing ----------------------------------------------------------------------------------
class Token(NamedTuple):  # a tuple: a 10^5-line recipe makes millions of tokens
    kind: str  # name, number, string, op, end
    text: str
    value: Any
    column: int


_TOKEN = re.compile(r"""
    (?P<space>[ \t]+)
  | (?P<comment>\#.*)
  | (?P<number>-?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][-+]?[0-9]+)?(?![A-Za-z0-9_])|-?inf(?![A-Za-z0-9_]))
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<op>[(),=|\[\]])
""", re.VERBOSE)


def _is_unicode(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


_FLOAT_MARK = re.compile(r"[.eEn]")
_PLAIN_STRING = re.compile(r'"[^\\\x00-\x1f]*"')  # no escape, no control character: its own text


def _tokenize(text: str, line: int, source: str) -> list[Token]:
    tokens: list[Token] = []
    append, match, end = tokens.append, _TOKEN.match, len(text)
    pos = 0
    while pos < end:
        m = match(text, pos)
        if m is None:
            what = "an unterminated string" if text[pos] == '"' else f"unexpected character {text[pos]!r}"
            raise RecipeError(what, source=source, line=line, column=pos + 1)
        kind = m.lastgroup
        raw = m.group()
        if kind == "name" or kind == "op":
            append(Token(kind, raw, raw, pos + 1))
        elif kind == "number":
            try:
                value: Any = float(raw) if _FLOAT_MARK.search(raw) else int(raw)
            except ValueError:  # Python refuses to convert integers of over 4300 digits
                raise RecipeError(f"number of {len(raw)} digits is too long", source=source, line=line,
                                  column=pos + 1) from None
            append(Token("number", raw, value, pos + 1))
        elif kind == "string":
            if _PLAIN_STRING.fullmatch(raw):
                value = raw[1:-1]
            else:
                try:
                    value = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise RecipeError(f"invalid string ({exc.msg})", source=source, line=line,
                                      column=pos + 1 + exc.pos) from None
            if not _is_unicode(value):  # "\udc80": valid JSON, but no file or metadata can hold it
                raise RecipeError("invalid string (a lone UTF-16 surrogate escape)", source=source,
                                  line=line, column=pos + 1)
            append(Token("string", raw, value, pos + 1))
        pos = m.end()
    append(Token("end", "", None, end + 1))
    return tokens


_DEFINITION = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=(?!=)")


def _check_nesting(tokens: list[Token], source: str, line: int) -> None:
    """Refuse a line nesting calls or lists deeper than :data:`MAX_NESTING`, in one line."""
    depth, deepest, first_too_deep = 0, 0, None
    for tok in tokens:
        if tok.kind != "op":
            continue
        if tok.text in "([":
            depth += 1
            if depth > MAX_NESTING and first_too_deep is None:
                first_too_deep = tok
            deepest = max(deepest, depth)
        elif tok.text in ")]":
            depth -= 1
    if first_too_deep is not None:
        raise RecipeError(f"nested too deeply, {deepest} levels; at most {MAX_NESTING} (give inner results "
                          f"names of their own, on lines before)", source=source, line=line,
                          column=first_too_deep.column)


class _Parser:
    def __init__(self, source: str, base_dir: str | None, host: RecipeHost, defined_at: dict[str, int]):
        self.source, self.base_dir, self.host = source, base_dir, host
        self.file = None if source == "<recipe>" else source
        self.names: dict[str, tuple[Any, int]] = {}
        self.defined_at = defined_at  # name -> first line defining it (for forward references)
        self.line = 0

    def fail(self, message: str, token: Token, cls: type[RecipeError] = RecipeError) -> RecipeError:
        return cls(message, source=self.source, line=self.line, column=token.column)

    def at_token(self, token: Token) -> Location:
        return Location(self.file, self.line, token.column)

    def parse_line(self, text: str, line: int) -> tuple[str | None, Any, Token]:
        self.line = line
        self.tokens = _tokenize(text, line, self.source)
        _check_nesting(self.tokens, self.source, line)
        self.pos = 0
        name = None
        if len(self.tokens) > 2 and self.tokens[0].kind == "name" and self.tokens[1].text == "=":
            name = self.tokens[0].text
            if name in self.names:
                raise self.fail(f"'{name}' is already defined on line {self.names[name][1]}; "
                                f"each name is defined once", self.tokens[0])
            if name in _RESERVED:
                raise self.fail(f"'{name}' is a reserved word and cannot be a name", self.tokens[0])
            self.pos = 2
        start = self.peek()
        value = self.expr()
        tok = self.peek()
        if tok.kind != "end":
            raise self.fail(f"unexpected {tok.text!r} after the expression", tok)
        return name, value, start

    def peek(self) -> Token:
        return self.tokens[self.pos]

    def next(self) -> Token:
        tok = self.tokens[self.pos]
        self.pos += 1
        return tok

    def at(self, text: str) -> bool:
        tok = self.peek()
        return tok.kind == "op" and tok.text == text

    def expect(self, text: str) -> Token:
        tok = self.next()
        if tok.text != text or tok.kind != "op":
            raise self.fail(f"expected {text!r}, found {tok.text or 'end of line'!r}", tok)
        return tok

    def expr(self) -> Any:
        first_tok = self.peek()
        value = self.term()
        maps = [value] if isinstance(value, WeightMap) else None  # joined once, at the end
        while self.at("|"):
            op = self.next()
            right_tok = self.peek()
            right = self.term()
            if maps is not None and isinstance(right, WeightMap):
                try:
                    join_maps([maps[0], right])  # the architecture check, before the next term
                except RecipeError as exc:
                    raise self.fail(str(exc), op) from None
                maps.append(right)
            elif isinstance(value, Node) and isinstance(right, Node):
                value = self._call_method("fallback", [value, right], {}, op)
            else:
                bad = first_tok if not isinstance(value, (Node, WeightMap)) else right_tok
                raise self.fail("'|' joins two block/class maps, or two models or results (fallback)", bad)
        return join_maps(maps) if maps is not None and len(maps) > 1 else value

    def term(self) -> Any:
        tok = self.next()
        if tok.kind in ("number", "string"):
            return tok.value
        if tok.kind == "op" and tok.text == "[":
            items: list[Any] = []
            while not self.at("]"):
                item = self.next()
                if item.kind != "number":
                    raise self.fail(f"a list holds numbers, found {item.text or 'end of line'!r}", item)
                items.append(item.value)
                if self.at(","):
                    self.next()
                elif not self.at("]"):
                    raise self.fail(f"expected ',' or ']', found {self.peek().text or 'end of line'!r}",
                                    self.peek())
            self.next()
            return tuple(items)
        if tok.kind == "name":
            if tok.text in ("true", "false", "null"):
                return {"true": True, "false": False, "null": None}[tok.text]
            if self.at("("):
                return self.call(tok)
            if tok.text in self.names:
                return self.names[tok.text][0]
            raise self.fail(self._undefined(tok.text), tok)
        raise self.fail(f"expected a value, found {tok.text or 'end of line'!r}", tok)

    def _undefined(self, name: str) -> str:
        where = self.defined_at.get(name)
        if where == self.line:
            return f"'{name}' is used in its own definition (a recipe cannot refer to itself)"
        if where is not None:
            return (f"'{name}' is used before its definition on line {where}; define names before "
                    f"using them (this also rules out cycles)")
        hint = difflib.get_close_matches(name, list(self.names), n=1)
        return f"'{name}' is not defined" + (f"; did you mean '{hint[0]}'?" if hint else "")

    def call(self, name_tok: Token) -> Any:
        self.expect("(")
        args: list[Any] = []
        arg_tokens: list[Token] = []
        kwargs: dict[str, Any] = {}
        kw_tokens: dict[str, Token] = {}
        value_tokens: dict[str, Token] = {}
        if not self.at(")"):
            while True:
                tok = self.peek()
                if tok.kind == "name" and self.tokens[self.pos + 1].text == "=" \
                        and self.tokens[self.pos + 1].kind == "op":
                    self.pos += 2
                    if tok.text in kwargs:
                        raise self.fail(f"'{tok.text}' is given twice", tok)
                    value_tokens[tok.text] = self.peek()
                    kwargs[tok.text] = self.expr()
                    kw_tokens[tok.text] = tok
                else:
                    if kwargs:
                        raise self.fail("positional inputs must come before keyword arguments", tok)
                    arg_tokens.append(tok)
                    args.append(self.expr())
                sep = self.next()
                if sep.text == ")" and sep.kind == "op":
                    break
                if sep.text != "," or sep.kind != "op":
                    raise self.fail(f"expected ',' or ')', found {sep.text or 'end of line'!r}", sep)
        else:
            self.next()
        name = name_tok.text
        try:
            if name == "model":
                return self._model(args, kwargs, name_tok)
            if name == "parameter":
                if len(args) != 1 or not isinstance(args[0], str) or set(kwargs) - {"space"}:
                    raise self.fail('parameter takes a name: parameter("name", space="delta")', name_tok)
                return parameter(args[0], kwargs.get("space"), where=self.at_token(name_tok))
            if name in ("blocks", "classes"):
                if len(args) != 1 or not isinstance(args[0], str):
                    raise self.fail(f'{name} takes an architecture name first: '
                                    f'{name}("sd1-ldm", default=0.5, ...)', name_tok)
                arch = canonical_arch(self.host, args[0])  # an alias and its name are one value
                return (blocks if name == "blocks" else classes)(arch, **kwargs)
            if name == "layers":
                if not 1 <= len(args) <= 2 or not isinstance(args[0], str):
                    raise self.fail('layers takes an architecture (or family) name, then a gradient: '
                                    'layers("llama", [0, 0.5, 1], self_attn=[0, 1], mlp=0.5)', name_tok)
                return layers(canonical_arch(self.host, args[0]), *args[1:], **kwargs)
        except RecipeError as exc:
            if exc.line is not None:
                raise
            bad = next((t for k, t in kw_tokens.items() if f"'{k}'" in str(exc)), name_tok)
            raise self.fail(str(exc), bad) from None
        # a value parsed here remembers where it was written, so an error about the value
        # itself (not in the choices, too large) points at it
        for key, value in kwargs.items():
            if isinstance(value, (bool, int, float, str, type(None), tuple, WeightMap)):
                kwargs[key] = LiteralNode(value, where=self.at_token(value_tokens[key]))
        return self._call_method(name, args, kwargs, name_tok, kw_tokens, arg_tokens)

    def _model(self, args: list[Any], kwargs: dict[str, Any], tok: Token) -> ModelNode:
        keep_vocab = kwargs.pop("keep_vocab", False)
        view_args = {k: kwargs.pop(k) for k in ("layers", "at", "of", "outside") if k in kwargs}
        if len(args) != 1 or not isinstance(args[0], str) or set(kwargs) - {"arch", "type", "vocab"} \
                or any(not isinstance(v, str) for v in kwargs.values()) or not isinstance(keep_vocab, bool):
            raise self.fail('model takes a path: model("file.safetensors", arch="...", type="...", '
                            'keep_vocab=true, vocab="map.json", layers="START:STOP", at=N, of=N, outside="...")', tok)
        view = None
        if view_args:
            try:
                view = layer_view(view_args.get("layers"), view_args.get("at", 0), view_args.get("of"),
                                  view_args.get("outside", "all"))
            except RecipeError as exc:
                raise self.fail(str(exc), tok) from None
        return ModelNode(args[0], kwargs.get("arch"), kwargs.get("type"), keep_vocab, kwargs.get("vocab"), view,
                         base_dir=self.base_dir, where=self.at_token(tok))

    def _call_method(self, name: str, args: list[Any], kwargs: dict[str, Any], tok: Token,
                     kw_tokens: dict[str, Token] | None = None, arg_tokens: list[Token] | None = None) -> Node:
        try:
            found = self.host.method(name)
        except RecipeError as exc:  # no such method
            if getattr(self.host, "merge_methods", None) is None:
                raise self.fail(str(exc), tok) from None
            hint = difflib.get_close_matches(name, [*method_names(self.host), *_BUILTINS], n=1)
            raise self.fail(f"unknown merge method '{name}'" + (install_hint("merge method", name) or (
                            f"; did you mean '{hint[0]}'?" if hint else "; `mecha methods` lists them"))
                            + disabled_note(self.host), tok) from None
        except MechaError as exc:  # two plugins claim the name
            raise self.fail(str(exc), tok) from None
        for i, a in enumerate(args):
            if not isinstance(a, Node):
                where = arg_tokens[i] if arg_tokens and i < len(arg_tokens) else tok
                raise self.fail(f"{name}: input {i + 1} must be a model or a result, got {format_value(a)}",
                                where)
        try:
            return call(found, tuple(args), kwargs, where=self.at_token(tok))
        except RecipeError as exc:
            if exc.line is not None:  # already placed (at a value written on this line)
                raise
            message = str(exc)
            bad = next((t for k, t in (kw_tokens or {}).items()
                        if f"'{k}'" in message or f"({k}=" in message), tok)
            raise self.fail(message, bad, type(exc)) from None


def _lines(text: str) -> list[tuple[int, str]]:
    """Numbered lines holding an instruction: blank lines and comment lines are dropped.

    Lines end at LF only (a CR before it is dropped), so a character that Python would also
    treat as a line break, inside a string, cannot shift line numbers.
    """
    out = []
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw[:-1] if raw.endswith("\r") else raw
        stripped = line.strip(" \t")
        if stripped and not stripped.startswith("#"):
            out.append((number, line))
    return out


def load_v1(text: str, *, source: str = "<recipe>", base_dir: str | None = None,
            host: RecipeHost | None = None) -> Node:
    """Parse ``.mecha`` version 1 text; the last line is the recipe's result.

    ``host`` resolves method names and architecture aliases; without one only the core's
    operators are known. Every node built remembers its :class:`Location`.
    """
    host = host or CoreOnly()
    # Parsing builds many objects and no reference cycles: the cyclic collector would only
    # rescan the growing graph again and again (a third of the time on a 10^5-line recipe).
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _load_v1(text, source, base_dir, host)
    finally:
        if collecting:
            gc.enable()


def _load_v1(text: str, source: str, base_dir: str | None, host: RecipeHost) -> Node:
    if text.startswith("\ufeff"):
        text = text[1:]  # a byte-order mark some editors add
    lines = _lines(text)
    header = lines[0][1].strip(" \t") if lines else ""
    if not re.fullmatch(r"mecha[ \t]+1", header):  # the grammar's ws: any run of spaces and tabs
        line = lines[0][0] if lines else 1
        m = re.fullmatch(r"mecha\s+(\S+)", header)
        if m:
            raise RecipeError(f"this mecha reads recipe format version 1; the file says version {m.group(1)}",
                              source=source, line=line, column=7)
        raise RecipeError(f"a mecha recipe starts with the line '{HEADER}'", source=source, line=line, column=1)
    defined_at: dict[str, int] = {}
    for number, line in lines[1:]:
        m = _DEFINITION.match(line)
        if m:
            defined_at.setdefault(m.group(1), number)
    parser = _Parser(source, base_dir, host, defined_at)
    result = None
    for index, (number, line) in enumerate(lines[1:], 2):
        try:
            name, value, start = parser.parse_line(line, number)
        except RecursionError:  # nesting (or a chain of results) deeper than Python's stack
            raise RecipeError("the recipe nests too deeply here (beyond Python's recursion limit)", source=source,
                              line=number, column=1) from None
        if not isinstance(value, Node):
            raise RecipeError("each line defines a model, a parameter or a method call, not a bare value",
                              source=source, line=number, column=start.column)
        if name is None and index < len(lines):
            raise RecipeError("only the last line (the result) may be left unnamed; write 'name = ...'",
                              source=source, line=number, column=start.column)
        if name is not None:
            parser.names[name] = (value, number)
        result = value
    if result is None:
        raise RecipeError("the recipe is empty (no line after the header)", source=source, line=lines[0][0])
    clash = parameter_clash(result)
    if clash is not None:  # point at the last line that declares the parameter
        name, why = clash
        where = [(n, m.start() + 1) for n, ln in lines for m in re.finditer(r'parameter\(\s*"' + name + '"', ln)]
        number, column = where[-1] if where else (None, None)
        raise RecipeError(why, source=source, line=number, column=column)
    return result
