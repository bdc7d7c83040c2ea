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
import json
import math
import os
import re
from typing import Any

import attrs

from ..errors import RecipeError
from .nodes import CallNode, LiteralNode, ModelNode, Node, ParameterNode, walk
from .values import WeightMap

HEADER = "mecha 1"
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BUILTINS = ("model", "parameter", "blocks", "classes")


# -- printing ---------------------------------------------------------------------------------
def format_value(value: Any) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        text = repr(value)
        return text
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, tuple):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, WeightMap):
        parts = []
        for m in value.chain():
            args = [format_value(m.arch)]
            if m.default is not None:
                args.append(f"default={format_value(m.default)}")
            args += [f"{name}={format_value(v)}" for name, v in m.entries]
            parts.append(f"{m.kind}({', '.join(args)})")
        return " | ".join(parts)
    raise RecipeError(f"cannot write {value!r} in a recipe")


def _base_name(node: Node) -> str:
    if isinstance(node, ModelNode):
        stem = os.path.splitext(os.path.basename(node.path.rstrip("/\\")))[0]
        name = re.sub(r"[^A-Za-z0-9_]", "_", stem) or "model"
    elif isinstance(node, ParameterNode):
        name = node.name
    else:
        assert isinstance(node, CallNode)
        name = node.method.name
    if not _IDENT.fullmatch(name) or name in _BUILTINS or name in ("true", "false", "null", "inf"):
        name = "_" + name
    return name


def dump(root: Node) -> str:
    """The recipe as ``.mecha`` text (deterministic; ends with a newline)."""
    names: dict[Node, str] = {}
    used: set[str] = set()
    lines = [HEADER]
    for node in walk(root):
        if isinstance(node, LiteralNode):
            continue
        base = _base_name(node)
        name, n = base, 1
        while name in used:
            n += 1
            name = f"{base}_{n}"
        used.add(name)
        names[node] = name
        lines.append(f"{name} = {_expr(node, names)}")
    if isinstance(root, LiteralNode):
        raise RecipeError("a recipe cannot be a bare literal")
    return "\n".join(lines) + "\n"


def _expr(node: Node, names: dict[Node, str]) -> str:
    if isinstance(node, ModelNode):
        args = [format_value(node.path)]
        if node.arch is not None:
            args.append(f"arch={format_value(node.arch)}")
        if node.type is not None:
            args.append(f"type={format_value(node.type)}")
        return f"model({', '.join(args)})"
    if isinstance(node, ParameterNode):
        args = [format_value(node.name)]
        if node.space is not None:
            args.append(f"space={format_value(node.space)}")
        return f"parameter({', '.join(args)})"
    assert isinstance(node, CallNode)
    args = [names[a] for a in node.args]
    for key, value in node.kwargs:
        args.append(f"{key}={names[value] if isinstance(value, ParameterNode) else format_value(value.value)}")
    return f"{node.method.name}({', '.join(args)})"


# -- parsing ----------------------------------------------------------------------------------
@attrs.frozen
class Token:
    kind: str  # name, number, string, op, end
    text: str
    value: Any
    column: int


_TOKEN = re.compile(r"""
    (?P<space>[ \t]+)
  | (?P<comment>\#.*)
  | (?P<number>-?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?|-?inf\b)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<op>[(),=|\[\]])
""", re.VERBOSE)


def _tokenize(text: str, line: int, source: str) -> list[Token]:
    tokens, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise RecipeError(f"unexpected character {text[pos]!r}", source=source, line=line, column=pos + 1)
        kind = m.lastgroup
        raw = m.group()
        if kind == "number":
            value: Any = float(raw) if re.search(r"[.eEn]", raw) else int(raw)
            tokens.append(Token("number", raw, value, pos + 1))
        elif kind == "string":
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                raise RecipeError("invalid string escape", source=source, line=line, column=pos + 1) from None
            tokens.append(Token("string", raw, value, pos + 1))
        elif kind in ("name", "op"):
            tokens.append(Token(kind, raw, raw, pos + 1))
        pos = m.end()
    tokens.append(Token("end", "", None, len(text) + 1))
    return tokens


class _Parser:
    def __init__(self, source: str, base_dir: str | None, host: Any):
        self.source, self.base_dir, self.host = source, base_dir, host
        self.names: dict[str, tuple[Any, int]] = {}
        self.later: dict[str, int] = {}

    def fail(self, message: str, token: Token) -> RecipeError:
        return RecipeError(message, source=self.source, line=self.line, column=token.column)

    def parse_line(self, text: str, line: int) -> tuple[str | None, Any]:
        self.line = line
        self.tokens = _tokenize(text, line, self.source)
        self.pos = 0
        name = None
        if (len(self.tokens) > 2 and self.tokens[0].kind == "name" and self.tokens[1].text == "="):
            name = self.tokens[0].text
            if name in self.names:
                raise self.fail(f"'{name}' is already defined on line {self.names[name][1]}", self.tokens[0])
            self.pos = 2
        value = self.expr()
        tok = self.peek()
        if tok.kind != "end":
            raise self.fail(f"unexpected {tok.text!r} after the expression", tok)
        return name, value

    def peek(self) -> Token:
        return self.tokens[self.pos]

    def next(self) -> Token:
        tok = self.tokens[self.pos]
        self.pos += 1
        return tok

    def expect(self, text: str) -> Token:
        tok = self.next()
        if tok.text != text or tok.kind not in ("op",):
            raise self.fail(f"expected {text!r}, found {tok.text or 'end of line'!r}", tok)
        return tok

    def expr(self) -> Any:
        first_tok = self.peek()
        value = self.term()
        while self.peek().text == "|" and self.peek().kind == "op":
            op = self.next()
            right = self.term()
            if isinstance(value, WeightMap) and isinstance(right, WeightMap):
                value = value | right
            elif isinstance(value, Node) and isinstance(right, Node) and not isinstance(value, LiteralNode):
                value = self._call_method("fallback", [value, right], {}, op)
            else:
                raise self.fail("'|' combines two block/class maps or two models", first_tok)
        return value

    def term(self) -> Any:
        tok = self.next()
        if tok.kind in ("number", "string"):
            return tok.value
        if tok.kind == "op" and tok.text == "[":
            items: list[Any] = []
            while not (self.peek().kind == "op" and self.peek().text == "]"):
                item = self.next()
                if item.kind != "number":
                    raise self.fail(f"a list holds numbers, found {item.text or 'end of line'!r}", item)
                items.append(item.value)
                if self.peek().kind == "op" and self.peek().text == ",":
                    self.next()
                elif not (self.peek().kind == "op" and self.peek().text == "]"):
                    raise self.fail("expected ',' or ']'", self.peek())
            self.next()
            return tuple(items)
        if tok.kind == "name":
            if tok.text in ("true", "false", "null"):
                return {"true": True, "false": False, "null": None}[tok.text]
            if self.peek().text == "(" and self.peek().kind == "op":
                return self.call(tok)
            if tok.text in self.names:
                return self.names[tok.text][0]
            hint = difflib.get_close_matches(tok.text, list(self.names), n=1)
            raise self.fail(f"'{tok.text}' is not defined" + (f"; did you mean '{hint[0]}'?" if hint else
                            " (names must be defined on an earlier line)"), tok)
        raise self.fail(f"expected a value, found {tok.text or 'end of line'!r}", tok)

    def call(self, name_tok: Token) -> Any:
        self.expect("(")
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        kw_tokens: dict[str, Token] = {}
        if not (self.peek().text == ")" and self.peek().kind == "op"):
            while True:
                tok = self.peek()
                if tok.kind == "name" and self.tokens[self.pos + 1].text == "=":
                    self.pos += 2
                    if tok.text in kwargs:
                        raise self.fail(f"'{tok.text}' is given twice", tok)
                    kwargs[tok.text] = self.expr()
                    kw_tokens[tok.text] = tok
                else:
                    if kwargs:
                        raise self.fail("positional inputs must come before keyword arguments", tok)
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
                from .nodes import parameter

                return parameter(args[0], kwargs.get("space"))
            if name in ("blocks", "classes"):
                if len(args) != 1 or not isinstance(args[0], str):
                    raise self.fail(f'{name} takes an architecture name first: {name}("sd1-ldm", default=0.5, ...)', name_tok)
                from .values import blocks, classes

                return (blocks if name == "blocks" else classes)(args[0], **kwargs)
        except RecipeError as exc:
            if exc.line is not None:
                raise
            raise self.fail(str(exc), name_tok) from None
        return self._call_method(name, args, kwargs, name_tok, kw_tokens)

    def _model(self, args: list[Any], kwargs: dict[str, Any], tok: Token) -> ModelNode:
        if len(args) != 1 or not isinstance(args[0], str) or set(kwargs) - {"arch", "type"}:
            raise self.fail('model takes a path: model("file.safetensors", arch=..., type=...)', tok)
        return ModelNode(args[0], kwargs.get("arch"), kwargs.get("type"), base_dir=self.base_dir)

    def _call_method(self, name: str, args: list[Any], kwargs: dict[str, Any], tok: Token,
                     kw_tokens: dict[str, Token] | None = None) -> Node:
        found = self.host.merge_methods.get(name) if name in self.host.merge_methods else None
        if found is None:
            hint = difflib.get_close_matches(name, [*self.host.merge_methods.names(), *_BUILTINS], n=1)
            raise self.fail(f"unknown merge method '{name}'" + (f"; did you mean '{hint[0]}'?" if hint
                            else "; `mecha methods` lists them"), tok)
        for i, a in enumerate(args):
            if not isinstance(a, Node):
                raise self.fail(f"{name}: input {i + 1} must be a model or a result, got {format_value(a)}", tok)
        try:
            return found(*args, **kwargs)
        except RecipeError as exc:
            bad = next((t for k, t in (kw_tokens or {}).items() if f"'{k}'" in str(exc)), tok)
            raise self.fail(str(exc), bad) from None


def _meaningful(lines: list[str]) -> list[tuple[int, str]]:
    out = []
    for number, raw in enumerate(lines, 1):
        stripped = raw.strip()
        if stripped and not stripped.startswith("#"):
            out.append((number, raw.rstrip("\r\n")))
    return out


def load_v1(text: str, *, source: str = "<recipe>", base_dir: str | None = None, host: Any = None) -> Node:
    from ..plugins import get_host

    host = host or get_host()
    lines = _meaningful(text.splitlines())
    if not lines or lines[0][1].strip() != HEADER:
        line = lines[0][0] if lines else 1
        raise RecipeError(f"a mecha recipe starts with '{HEADER}'", source=source, line=line, column=1)
    parser = _Parser(source, base_dir, host)
    result = None
    for number, text_line in lines[1:]:
        name, value = parser.parse_line(text_line, number)
        if not isinstance(value, Node) or isinstance(value, LiteralNode):
            raise RecipeError("each line defines a model, a parameter or a method call", source=source,
                              line=number, column=1)
        if name is not None:
            parser.names[name] = (value, number)
        result = value
    if result is None:
        raise RecipeError("the recipe is empty (no line after the header)", source=source, line=lines[0][0])
    return result
