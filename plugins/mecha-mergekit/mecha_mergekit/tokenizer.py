"""mergekit 0.1.5's ``tokenizer_source``, ``tokenizer:`` section and ``chat_template``, as
vocabulary maps (:mod:`mecha_core.engine.vocab_map`) and a folder of tokenizer files.

The output tokenizer is built as mergekit builds it (``mergekit/tokenizer/build.py``), with
transformers' fast tokenizers, so its files are the ones mergekit writes: ``base`` is the base
model's tokenizer less the tokens past its config's ``vocab_size``; ``union`` adds every other
model's tokens the base lacks (ordinary tokens first, then added tokens, as mergekit does); a
model takes that model's tokenizer; the ``tokenizer:`` section's tokens are added last. Each
model's rows are then gathered into that vocabulary, and the rows a model lacks filled as
mergekit's ``PermutedVocabulary`` fills them (``mergekit/tokenizer/embed.py``): a token only one
model has takes that model's row; one no model has is zeros; else the base model's row when
the base has it, else the mean over the models that have it; a ``tokens:`` entry names its own
source (a model, ``{kind: zero}``, ``{kind: model_token, model:, token: | token_id:}``) and
``force`` replaces even the rows models have.

Everything is decided here, when the config is read, from the tokenizer files and config.json
of each model (no tensor is read): the maps and the tokenizer files go to a folder in mecha's
cache named by a hash of its contents, which the recipe's ``model(..., vocab=...)`` names.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections import Counter
from typing import Any, Callable

import attrs

#: the tokenizer files mergekit's output takes from its tokenizer (``save_pretrained``), never
#: copied from the donor model when the output has its own tokenizer
TOKENIZER_FILES = frozenset({
    "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
    "added_tokens.json", "merges.txt", "vocab.json", "vocab.txt", "chat_template.jinja", "chat_template.json",
})
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx",
                    ".index.json")
_NOT_COPIED = {"recipe.mecha", "README.md", ".gitattributes", "mergekit_config.yml"}


class TokenizerConfigError(ValueError):
    """A tokenizer setting that cannot be honoured: ``line`` is the YAML line at fault."""

    def __init__(self, message: str, line: int | None):
        super().__init__(message)
        self.line = line


@attrs.frozen
class TokenSource:
    """Where a ``tokens:`` entry's row comes from."""

    kind: str
    """``model`` (the token's row in that model), ``zero``, or ``model_token`` (another token's row)."""
    model: str | None = None
    """The model, as the config writes it (``model`` and ``model_token``)."""
    token: str | None = None
    """``model_token``: the token whose row is taken, by text."""
    token_id: int | None = None
    """``model_token``: the row taken, by index in the model's own vocabulary."""


@attrs.frozen
class TokenSetting:
    """One entry of the ``tokenizer:`` section's ``tokens:``."""

    source: TokenSource | None
    """Its row's source; ``None``: the default (an error when some model lacks the token)."""
    force: bool
    """Whether the source replaces the rows of models that have the token."""
    line: int
    """The YAML line of the entry."""


@attrs.frozen
class TokenizerPlan:
    """What a config asks of the output tokenizer."""

    source: str | None
    """``base``, ``union`` or a model as written; ``None``: the vocabulary is left alone
    (``chat_template`` only)."""
    tokens: dict[str, TokenSetting]
    """The ``tokens:`` entries, by token."""
    pad_to_multiple_of: int | None
    """The output vocabulary's rows rounded up to a multiple of this."""
    chat_template: str | None
    """A builtin template name, ``auto``, or Jinja text."""
    source_line: int
    """The line of ``tokenizer_source`` / ``tokenizer:``."""
    template_line: int
    """The line of ``chat_template``."""


@attrs.frozen
class ModelInput:
    """A model of the merge, as the tokenizer code sees it."""

    ref: str
    """As the config writes it."""
    folder: str
    """Its folder (absolute)."""
    line: int
    """The YAML line that names it."""


def cache_root() -> str:
    """``$XDG_CACHE_HOME/mecha/mergekit-vocab`` (``~/.cache`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mecha", "mergekit-vocab")


# -- reading the config ------------------------------------------------------------------------
def parse_token_source(value: Any, line: int) -> TokenSource | None:
    """A ``tokens:`` entry's ``source`` as mergekit 0.1.5's schema reads it: a text is a model
    (``zero`` too: zeros are ``{kind: zero}``)."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip():
        return TokenSource("model", model=value)
    if isinstance(value, dict):
        kind = value.get("kind")
        if kind == "zero":
            if set(value) != {"kind"}:
                raise TokenizerConfigError(f"a {{kind: zero}} source takes no other key (got "
                                           f"{', '.join(sorted(map(str, value)))})", line)
            return TokenSource("zero")
        if kind == "model_token":
            extra = set(value) - {"kind", "model", "token", "token_id"}
            if extra:
                raise TokenizerConfigError(f"a model_token source takes model and token or token_id "
                                           f"(not {', '.join(sorted(map(str, extra)))})", line)
            model, token, token_id = value.get("model"), value.get("token"), value.get("token_id")
            if not isinstance(model, str) or not model.strip():
                raise TokenizerConfigError("a model_token source needs a model", line)
            if (token is None) == (token_id is None):
                raise TokenizerConfigError("a model_token source takes exactly one of token and token_id", line)
            if token is not None and not isinstance(token, str):
                raise TokenizerConfigError(f"a model_token source's token must be text, got {token!r}", line)
            if token_id is not None and (not isinstance(token_id, int) or isinstance(token_id, bool)):
                raise TokenizerConfigError(f"a model_token source's token_id must be an integer, got {token_id!r}",
                                           line)
            return TokenSource("model_token", model=model, token=token, token_id=token_id)
    raise TokenizerConfigError(f"a token's source must be a model, {{kind: zero}} or {{kind: model_token, "
                               f"model: ..., token: ...}}, got {value!r}", line)


# -- building the tokenizer (mergekit/tokenizer/build.py) ----------------------------------------
def _transformers():
    import transformers  # noqa: PLC0415 (heavy: only configs with a tokenizer setting need it)

    return transformers


def _config_vocab_size(folder: str) -> int | None:
    """``vocab_size`` of the model's config.json (or its ``text_config``'s), as mergekit reads it."""
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    size = config.get("vocab_size")
    if size is None and isinstance(config.get("text_config"), dict):
        size = config["text_config"].get("vocab_size")
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def _load(model: ModelInput) -> Any:
    try:
        tok = _transformers().AutoTokenizer.from_pretrained(model.folder, use_fast=True, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 (transformers raises anything on a bad folder)
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TokenizerConfigError(f"the tokenizer of model '{model.ref}' cannot be read ({why[:200]})",
                                   model.line) from None
    if not getattr(tok, "is_fast", False):
        raise TokenizerConfigError(f"model '{model.ref}' has no fast tokenizer (tokenizer.json)", model.line)
    return tok


def _stripped(model: ModelInput) -> Any:
    """The model's tokenizer without the tokens at or past its config's ``vocab_size``
    (``get_stripped_tokenizer``)."""
    tok = _load(model)
    vocab = tok.get_vocab()
    size = _config_vocab_size(model.folder) or len(vocab)
    unused = {t for t, i in vocab.items() if i >= size}
    if not unused:
        return tok
    data = json.loads(tok._tokenizer.to_str())
    if data["model"]["type"] != "BPE":
        raise TokenizerConfigError(f"model '{model.ref}' has tokens past its vocab_size and a "
                                   f"{data['model']['type']} tokenizer; only BPE ones can be cut "
                                   f"(as in mergekit)", model.line)
    data["added_tokens"] = [e for e in data["added_tokens"] if e["id"] < size]
    for t in unused:
        data["model"]["vocab"].pop(t, None)

    def keep(merge: Any) -> bool:
        parts = merge.split(" ") if isinstance(merge, str) else list(merge)
        return not any(p in unused for p in parts)

    data["model"]["merges"] = [m for m in data["model"]["merges"] if keep(m)]
    import tokenizers  # noqa: PLC0415

    tok._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    return tok


def _union(base: Any, tokenizers: list[tuple[ModelInput, Any]]) -> Any:
    """``build_union_tokenizer``: the base's tokenizer plus every other token, ordinary first."""
    out_vocab: dict[str, int] = {}
    out_added: dict[str, Any] = {}
    for model, tok in tokenizers:
        size = _config_vocab_size(model.folder) or tok.vocab_size
        added = tok.added_tokens_decoder
        added_text = {info.content for info in added.values()}
        # by id: get_vocab()'s order is a Rust hash map's, which changes from process to process
        # (mergekit takes it as it comes, so its order of such tokens varies between runs)
        for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i >= size or t in added_text:
                continue
            out_vocab.setdefault(t, len(out_vocab))
        for i, info in added.items():
            if i < size:
                out_added.setdefault(info.content, info)
    with tempfile.TemporaryDirectory() as folder:  # a copy: the base tokenizer stays as it was
        base.save_pretrained(folder, legacy_format=False, safe_serialization=True)
        res = _transformers().AutoTokenizer.from_pretrained(folder, use_fast=True, local_files_only=True)
    base_vocab = base.get_vocab()
    for t in out_vocab:
        if t not in out_added and t not in base_vocab:
            res.add_tokens(t)
    for info in out_added.values():
        res.add_tokens(info)
    return res


@attrs.frozen
class BuiltVocabulary:
    """The output tokenizer and each model's vocabulary map."""

    tokenizer: Any
    """The transformers tokenizer the output folder gets."""
    maps: dict[str, dict]
    """Model ref -> its vocabulary map (the JSON of :mod:`mecha_core.engine.vocab_map`)."""
    rows: int
    """The output vocabulary's rows (padding included): config.json's new ``vocab_size``."""


def build_vocabulary(plan: TokenizerPlan, models: list[ModelInput], base: ModelInput | None,
                     dtype: str | None, source_model: ModelInput | None = None) -> BuiltVocabulary:
    """The output tokenizer and the maps; ``models`` in mergekit's order for a tensor (the
    config's models, then the base when it is not one of them)."""
    assert plan.source is not None
    base = base or models[0]
    by_ref = {m.ref: m for m in models}
    base_tok = _stripped(base)
    toks: dict[str, Any] = {base.ref: base_tok}
    for m in models:
        if m.ref not in toks:
            toks[m.ref] = _load(m)
    if plan.source == "base":
        out = base_tok
    elif plan.source == "union":
        out = _union(base_tok, [(base, base_tok)] + [(m, toks[m.ref]) for m in models if m.ref != base.ref])
    else:
        assert source_model is not None
        out = _load(attrs.evolve(source_model, line=plan.source_line))
    have = set(out.get_vocab())
    for t in plan.tokens:
        if t not in have:
            out.add_tokens(t)
            have.add(t)
    vocab = out.get_vocab()
    tokens = len(vocab)
    if max(vocab.values(), default=-1) >= tokens:
        raise TokenizerConfigError(f"the output tokenizer's ids are not 0..{tokens - 1} (its largest is "
                                   f"{max(vocab.values())})", plan.source_line)
    rows = tokens
    if plan.pad_to_multiple_of and rows % plan.pad_to_multiple_of:
        rows = (rows // plan.pad_to_multiple_of + 1) * plan.pad_to_multiple_of

    perms: dict[str, dict[int, int]] = {}
    for m in models:
        mine = toks[m.ref].get_vocab()
        size = _config_vocab_size(m.folder) or len(mine)
        p = {}
        for t, i in vocab.items():
            j = mine.get(t, -1)
            if j >= size:
                raise TokenizerConfigError(f"token {t!r} has id {j} in model '{m.ref}', past its vocab_size "
                                           f"{size} (mergekit 0.1.5 fails on it too)", m.line)
            p[i] = j
        perms[m.ref] = p

    sources = _fill_sources(plan, models, base, vocab, perms, toks)
    maps = {}
    for m in models:
        p = perms[m.ref]
        own: list[list[int]] = []
        fill: list[list[Any]] = []
        for t, i in sorted(vocab.items(), key=lambda kv: kv[1]):
            setting = plan.tokens.get(t)
            if p[i] >= 0 and not (setting is not None and setting.force):
                if own and own[-1][0] + own[-1][2] == i and own[-1][1] + own[-1][2] == p[i]:
                    own[-1][2] += 1
                else:
                    own.append([i, p[i], 1])
            elif t in sources:
                fill.append([i, [[by_ref[r].folder, row] for r, row in sources[t]]])
        maps[m.ref] = {"mecha_vocab_map": 1, "rows": rows, "tokens": tokens, "own": own, "fill": fill,
                       "dtype": dtype}
    return BuiltVocabulary(out, maps, rows)


def _fill_sources(plan: TokenizerPlan, models: list[ModelInput], base: ModelInput, vocab: dict[str, int],
                  perms: dict[str, dict[int, int]], toks: dict[str, Any]) -> dict[str, list[tuple[str, int]]]:
    """Token -> the ``(model ref, row)`` whose mean fills it, for every token some model lacks
    or a forced one (``assign_embedding_sources`` and ``compute_default_embedding``)."""
    refs = [m.ref for m in models]
    out: dict[str, list[tuple[str, int]]] = {}
    for t, i in vocab.items():
        present = [r for r in refs if perms[r][i] >= 0]
        setting = plan.tokens.get(t)
        if not (setting is not None and setting.force) and len(present) == len(refs):
            continue
        if setting is None:
            if len(present) == 1:
                out[t] = [(present[0], perms[present[0]][i])]
            elif not present:
                out[t] = []
            elif base.ref in refs and perms[base.ref][i] >= 0:
                out[t] = [(base.ref, perms[base.ref][i])]
            else:
                out[t] = [(r, perms[r][i]) for r in present]
            continue
        source = setting.source
        if source is None:
            raise TokenizerConfigError(f"token {t!r} needs a source: not every model has it", setting.line)
        if source.kind == "zero":
            out[t] = []
            continue
        assert source.model is not None
        if source.model not in refs:
            raise TokenizerConfigError(f"token {t!r} takes a row from model '{source.model}', which is not one "
                                       f"of the merge's models ({', '.join(refs)})", setting.line)
        if source.kind == "model_token":
            row = source.token_id
            if row is None:
                row = toks[source.model].get_vocab().get(source.token, -1)
                if row < 0:
                    raise TokenizerConfigError(f"token {source.token!r} is not in the tokenizer of model "
                                               f"'{source.model}'", setting.line)
            if row < 0:
                raise TokenizerConfigError(f"token_id {row} is negative", setting.line)
            out[t] = [(source.model, row)]
        else:
            row = perms[source.model][i]
            if row < 0:
                raise TokenizerConfigError(f"token {t!r} is not in the tokenizer of model '{source.model}'",
                                           setting.line)
            out[t] = [(source.model, row)]
    return out


# -- chat templates (mergekit/merge.py's _set_chat_template) ---------------------------------------
def builtin_template(name: str) -> str | None:
    """The text of a template mergekit ships (``chatml``, ``llama3`` ...), read from an installed
    mergekit package; ``None`` when there is none of that name."""
    spec = importlib.util.find_spec("mergekit")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = os.path.join(root, "_data", "chat_templates", name + ".jinja")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return f.read()
    return None


def resolve_template(template: str, models: list[ModelInput], line: int) -> str | None:
    """The Jinja text mergekit writes for ``chat_template``; ``None`` (``auto`` with no model
    template) writes none."""
    if template == "auto":
        found = []
        for m in models:
            tok = _load(m)
            text = tok.chat_template
            if isinstance(text, dict):
                text = text.get("default")
            if text:
                found.append(text.strip())
        return Counter(found).most_common(1)[0][0] if found else None
    if len(template) < 256 and "\n" not in template and "{" not in template:
        text = builtin_template(template)
        if text is not None:
            return text
        raise TokenizerConfigError(f"chat_template {template!r} is not a template mergekit ships (those are "
                                   f"read from an installed mergekit package) nor Jinja text", line)
    if len(template) < 20 or "{" not in template:
        raise TokenizerConfigError(f"chat_template {template[:40]!r} is not valid Jinja text", line)
    return template


# -- the folder of tokenizer files ------------------------------------------------------------------
def _copy_other_files(donor: str, folder: str, skip: frozenset[str] | set[str]) -> None:
    for name in sorted(os.listdir(donor)):
        full = os.path.join(donor, name)
        if (name.startswith(".") or name in _NOT_COPIED or name in skip
                or name.lower().endswith(_WEIGHT_SUFFIXES) or not os.path.isfile(full)):
            continue
        shutil.copyfile(full, os.path.join(folder, name))


def _set_vocab_size(path: str, rows: int) -> None:
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if "vocab_size" not in config and isinstance(config.get("text_config"), dict):
        config["text_config"]["vocab_size"] = rows
    else:
        config["vocab_size"] = rows
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_vocab_folder(plan: TokenizerPlan, models: list[ModelInput], base: ModelInput | None,
                       dtype: str | None, fail: Callable[[str, int | None], Exception],
                       source_model: ModelInput | None = None) -> dict[str, str]:
    """Build the output tokenizer and the maps into a cache folder; model ref -> its map file
    (absolute). ``fail(message, line)`` makes the error raised."""
    donor = base or models[0]
    try:
        with tempfile.TemporaryDirectory(prefix="mecha-vocab-") as work:
            files = os.path.join(work, "files")
            os.mkdir(files)
            built = None
            if plan.source is not None:
                built = build_vocabulary(plan, models, base, dtype, source_model)
                tok = built.tokenizer
            else:  # chat_template alone: the donor's tokenizer, written again with the template
                tok = _load(donor)
            if plan.chat_template:
                text = resolve_template(plan.chat_template, ([base] if base else []) +
                                        [m for m in models if base is None or m.ref != base.ref], plan.template_line)
                if text is not None:
                    tok.chat_template = text
            tok.save_pretrained(files, safe_serialization=True)
            _copy_other_files(donor.folder, files, set(TOKENIZER_FILES) | set(os.listdir(files)))
            if built is not None and os.path.isfile(os.path.join(files, "config.json")):
                _set_vocab_size(os.path.join(files, "config.json"), built.rows)
            maps = built.maps if built is not None else {donor.ref: {"mecha_vocab_map": 1}}
            digest = hashlib.sha256()
            for name in sorted(os.listdir(files)):
                with open(os.path.join(files, name), "rb") as f:
                    digest.update(name.encode() + b"\0" + hashlib.sha256(f.read()).digest())
            names = {ref: f"map-{i}.json" for i, ref in enumerate(m.ref for m in models if m.ref in maps)}
            for ref, name in names.items():  # each file's name and content: two configs listing the
                # same models in another order have the same maps under other names
                digest.update(name.encode() + b"\0" + json.dumps(maps[ref], sort_keys=True).encode())
            final = os.path.join(cache_root(), digest.hexdigest()[:24])
            if not os.path.isdir(final):
                stage = os.path.join(work, "stage")
                os.mkdir(stage)
                shutil.move(files, os.path.join(stage, "files"))
                for ref, name in names.items():
                    with open(os.path.join(stage, name), "w", encoding="utf-8") as f:
                        json.dump({**maps[ref], "files": "files"}, f, indent=1)
                os.makedirs(cache_root(), exist_ok=True)
                try:
                    os.rename(stage, final)
                except OSError:
                    if not os.path.isdir(final):  # another process put the same folder there first
                        raise
    except TokenizerConfigError as exc:
        raise fail(str(exc), exc.line) from None
    except OSError as exc:
        raise fail(f"cannot write the tokenizer files to {cache_root()}: {exc.strerror or exc}",
                   plan.source_line) from None
    return {ref: os.path.join(final, name) for ref, name in names.items()}


# -- the config's keys --------------------------------------------------------------------------
def _line(mapping: Any, key: str, default: int) -> int:
    line_of = getattr(mapping, "line_of", None)
    return line_of(key) if line_of is not None else default


def plan_from_config(config: Any) -> TokenizerPlan | None:
    """The tokenizer settings of a config (``tokenizer_source``, ``tokenizer:``,
    ``chat_template``); ``None`` when it has none."""
    source_given = config.get("tokenizer_source")
    section = config.get("tokenizer")
    template = config.get("chat_template")
    if source_given is None and section is None and template is None:
        return None
    source_line = _line(config, "tokenizer" if section is not None else "tokenizer_source", 1)
    template_line = _line(config, "chat_template", 1)
    if source_given is not None and section is not None:
        raise TokenizerConfigError("give tokenizer_source or a tokenizer section, not both (as in mergekit)",
                                   _line(config, "tokenizer", 1))
    if template is not None and (not isinstance(template, str) or not template):
        raise TokenizerConfigError(f"chat_template must be a template name, auto or Jinja text, got {template!r}",
                                   template_line)
    tokens: dict[str, TokenSetting] = {}
    pad = None
    source = source_given
    if section is not None:
        if not isinstance(section, dict):
            raise TokenizerConfigError(f"the tokenizer section must be a mapping, got {section!r}", source_line)
        for key in section:
            if key not in ("source", "tokens", "pad_to_multiple_of"):
                raise TokenizerConfigError(f"unknown key '{key}' in the tokenizer section (source, tokens, "
                                           f"pad_to_multiple_of)", _line(section, key, source_line))
        source = section.get("source", "union")
        pad = section.get("pad_to_multiple_of")
        if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
            raise TokenizerConfigError(f"pad_to_multiple_of must be a positive integer, got {pad!r}",
                                       _line(section, "pad_to_multiple_of", source_line))
        entries = section.get("tokens") or {}
        if not isinstance(entries, dict):
            raise TokenizerConfigError("tokens must map each token to {source: ..., force: ...}",
                                       _line(section, "tokens", source_line))
        for token, entry in entries.items():
            at = _line(entries, token, source_line)
            if not isinstance(token, str):
                raise TokenizerConfigError(f"a token must be text, got {token!r}", at)
            entry = {} if entry is None else entry
            if not isinstance(entry, dict) or set(entry) - {"source", "force"}:
                raise TokenizerConfigError(f"token {token!r} takes source and force", at)
            force = entry.get("force", False)
            if not isinstance(force, bool):
                raise TokenizerConfigError(f"token {token!r}: force must be true or false, got {force!r}", at)
            tokens[token] = TokenSetting(parse_token_source(entry.get("source"), at), force, at)
    if source is not None and (not isinstance(source, str) or not source.strip()):
        raise TokenizerConfigError(f"a tokenizer source must be base, union or a model, got {source!r}",
                                   source_line)
    return TokenizerPlan(source, tokens, pad, template, source_line, template_line)
