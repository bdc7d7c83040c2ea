"""A corpus of damaged and hostile model files, for tests of everything that opens inputs.

Each :class:`Damaged` case is a file (or a folder, or a path that does not exist) together with
a fragment the error message must contain. :func:`write_corpus` writes them all into a folder.
The files are built byte by byte here, never with the writer under test, so a writer bug cannot
hide a reader bug. Plugin authors can run their own readers over the same corpus.

The pickles in the corpus are hostile on purpose: unpickling one creates the file
``UNPICKLED_MARKER`` beside it, so a test can prove that nothing was unpickled.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zipfile
from typing import Any

import attrs

#: the file a corpus pickle creates (in the corpus folder) if anything ever unpickles it
UNPICKLED_MARKER = "UNPICKLED"

#: the data area of the valid base file: eight float32 values 1.0 .. 8.0 (32 bytes)
BASE_DATA = struct.pack("<8f", *range(1, 9))


def base_header() -> dict[str, Any]:
    """The header of a small valid file: 'a' F32 [2, 2] then 'b' F32 [4], tiling 32 bytes."""
    return {
        "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]},
    }


def safetensors_bytes(header: dict[str, Any] | bytes | str, data: bytes = BASE_DATA, *,
                      length: int | None = None) -> bytes:
    """A file: 8-byte little-endian header length, the header, the data. Nothing is checked.

    ``header`` may be raw bytes (or text) to write malformed JSON; ``length`` overrides the
    declared header length (to declare more than the file holds).
    """
    if isinstance(header, dict):
        raw = json.dumps(header).encode()
    elif isinstance(header, str):
        raw = header.encode()
    else:
        raw = header
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


class _CreatesMarker:
    """Pickles to 'open(<marker>, "w")': harmless, but visible if anything unpickles it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def hostile_pickle(marker: str) -> bytes:
    """A plain pickle (protocol 4) whose unpickling creates ``marker``."""
    return pickle.dumps({"state_dict": _CreatesMarker(marker)}, protocol=4)


def hostile_zip_checkpoint(marker: str) -> bytes:
    """A zip in the layout of ``torch.save`` holding a hostile ``data.pkl``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("archive/data.pkl", hostile_pickle(marker))
        zf.writestr("archive/version", "3\n")
    return buffer.getvalue()


@attrs.frozen
class Damaged:
    """One corpus entry."""

    name: str
    """The file name inside the corpus folder (also the test id)."""
    what: str
    """What is wrong with it, in words."""
    expect: str
    """A fragment the error message must contain (besides the file's name)."""
    content: bytes | None = None
    """The bytes of the file; ``None`` for a folder or a missing path."""
    kind: str = "file"
    """``file``, ``folder`` (a directory with this name) or ``missing`` (nothing is written)."""
    hostile: bool = False
    """The content would run code if unpickled (creates :data:`UNPICKLED_MARKER`)."""


def _with(change: dict[str, Any]) -> dict[str, Any]:
    header = base_header()
    for key, fields in change.items():
        if fields is None:
            header.pop(key, None)
        elif isinstance(fields, dict) and key in header:
            header[key] = {**header[key], **fields}
            header[key] = {k: v for k, v in header[key].items() if v is not _DROP}
        else:
            header[key] = fields
    return header


_DROP = object()


def damaged_cases(marker: str = UNPICKLED_MARKER) -> list[Damaged]:
    """Every case of the corpus. ``marker`` is the path hostile pickles would create."""
    valid = safetensors_bytes(base_header())
    duplicate = ('{"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}, '
                 '"a": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}')
    huge_number = '{"a": {"dtype": "F32", "shape": [' + "9" * 5000 + '], "data_offsets": [0, 32]}}'
    long_key = "k" * 5000 + "\n\x1b[2J"
    cases = [
        Damaged("empty.safetensors", "an empty file", "too short for a header", b""),
        Damaged("short.safetensors", "fewer than 8 bytes", "too short for a header", b"\x05\x00\x00"),
        Damaged("text.safetensors", "a text file named .safetensors", "starts with text",
                b"this is a text file, not a model\n" * 4),
        Damaged("header_beyond_file.safetensors", "a header length larger than the file",
                "exceeds the file", safetensors_bytes(base_header(), length=4096)),
        Damaged("header_length_huge.safetensors", "a header length of 2**63",
                "exceeds the file", safetensors_bytes(base_header(), length=1 << 63)),
        Damaged("header_not_json.safetensors", "a header cut in the middle of the JSON", "not JSON",
                safetensors_bytes('{"a": {"dtype": "F32", "shape": [2, ')),
        Damaged("header_not_utf8.safetensors", "a header that is not UTF-8", "not JSON",
                safetensors_bytes(b"\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8")),
        Damaged("header_empty.safetensors", "a header length of zero", "not JSON",
                safetensors_bytes(b"")),
        Damaged("header_list.safetensors", "a header that is a JSON list", "not an object",
                safetensors_bytes(b"[1, 2, 3]")),
        Damaged("header_string.safetensors", "a header that is a JSON string", "not an object",
                safetensors_bytes(b'"tensors"')),
        Damaged("header_deep.safetensors", "a header nested 100000 levels deep",
                "damaged safetensors header", safetensors_bytes(b"[" * 100_000)),
        Damaged("header_huge_number.safetensors", "a 5000-digit number in the header",
                "damaged safetensors header", safetensors_bytes(huge_number)),
        Damaged("duplicate_key.safetensors", "the same key twice", "appears twice",
                safetensors_bytes(duplicate)),
        Damaged("entry_not_object.safetensors", "a key whose entry is a list",
                "header entry is not an object", safetensors_bytes(_with({"a": [0, 16]}))),
        Damaged("unknown_dtype.safetensors", "dtype F33", "unknown dtype 'F33'",
                safetensors_bytes(_with({"a": {"dtype": "F33"}}))),
        Damaged("dtype_not_string.safetensors", "dtype given as a list", "unknown dtype",
                safetensors_bytes(_with({"a": {"dtype": ["F32"]}}))),
        Damaged("dtype_missing.safetensors", "no dtype", "unknown dtype None",
                safetensors_bytes(_with({"a": {"dtype": _DROP}}))),
        Damaged("shape_negative.safetensors", "a negative dimension", "invalid shape",
                safetensors_bytes(_with({"a": {"shape": [-2, -2]}}))),
        Damaged("shape_not_list.safetensors", "shape written as text", "invalid shape",
                safetensors_bytes(_with({"a": {"shape": "2x2"}}))),
        Damaged("shape_bool.safetensors", "a dimension 'true'", "invalid shape",
                safetensors_bytes(_with({"b": {"shape": [True, 4]}}))),
        Damaged("shape_huge.safetensors", "a dimension of 2**64 (beyond int64)", "invalid shape",
                safetensors_bytes(_with({"a": {"shape": [1 << 64, 0], "data_offsets": [0, 0]},
                                         "b": {"data_offsets": [0, 16]}}), BASE_DATA[:16])),
        Damaged("offsets_missing.safetensors", "no data_offsets", "invalid data_offsets",
                safetensors_bytes(_with({"b": {"data_offsets": _DROP}}))),
        Damaged("offsets_three.safetensors", "three data_offsets", "invalid data_offsets",
                safetensors_bytes(_with({"b": {"data_offsets": [16, 24, 32]}}))),
        Damaged("offsets_float.safetensors", "data_offsets as floats", "invalid data_offsets",
                safetensors_bytes(_with({"a": {"data_offsets": [0.0, 16.0]}}))),
        Damaged("offsets_out_of_range.safetensors", "data_offsets past the end of the file",
                "outside the data area", safetensors_bytes(
                    _with({"b": {"shape": [8], "data_offsets": [16, 48]}}))),
        Damaged("offsets_negative.safetensors", "a negative offset", "outside the data area",
                safetensors_bytes(_with({"a": {"data_offsets": [-16, 0]}}))),
        Damaged("offsets_reversed.safetensors", "begin after end", "outside the data area",
                safetensors_bytes(_with({"b": {"data_offsets": [32, 16]}}))),
        Damaged("offsets_overlap.safetensors", "two tensors sharing bytes", "overlaps",
                safetensors_bytes(_with({"b": {"data_offsets": [8, 24]}}))),
        Damaged("offsets_hole.safetensors", "bytes no tensor covers", "leaves a hole",
                safetensors_bytes(_with({"b": {"data_offsets": [24, 40]}}), BASE_DATA + bytes(8))),
        Damaged("trailing_bytes.safetensors", "bytes after the last tensor", "after the last tensor",
                valid + b"\x00" * 8),
        Damaged("truncated.safetensors", "a valid header whose data was cut short", "truncated",
                valid[:-12]),
        Damaged("shape_mismatch.safetensors", "shape x dtype not matching the byte range",
                "needs 36 bytes, data_offsets give 16",
                safetensors_bytes(_with({"a": {"shape": [3, 3]}}))),
        Damaged("dtype_size_mismatch.safetensors", "F64 where the bytes hold F32",
                "needs 32 bytes, data_offsets give 16",
                safetensors_bytes(_with({"a": {"dtype": "F64"}}))),
        Damaged("metadata_not_strings.safetensors", "metadata values that are numbers", "__metadata__",
                safetensors_bytes({"__metadata__": {"steps": 1000}, **base_header()})),
        Damaged("metadata_list.safetensors", "metadata that is a list", "__metadata__",
                safetensors_bytes({"__metadata__": ["a"], **base_header()})),
        Damaged("hostile_key.safetensors", "a 5000-character key with escape codes and a bad dtype",
                "unknown dtype", safetensors_bytes(
                    {long_key: {"dtype": "X", "shape": [], "data_offsets": [0, 0]}}, b"")),
        Damaged("zip.safetensors", "a torch.save zip named .safetensors", "zip file",
                hostile_zip_checkpoint(marker), hostile=True),
        Damaged("pickle.safetensors", "a plain pickle named .safetensors", "pickle checkpoint",
                hostile_pickle(marker), hostile=True),
        Damaged("folder.safetensors", "a directory", "is a directory", kind="folder"),
        Damaged("missing.safetensors", "a file that does not exist", "no such file", kind="missing"),
    ]
    for suffix in (".ckpt", ".pt", ".pth", ".bin", ".CKPT"):
        content = hostile_zip_checkpoint(marker) if suffix == ".pt" else hostile_pickle(marker)
        cases.append(Damaged("model" + suffix, f"a pickle checkpoint ({suffix})",
                             "pickle checkpoints are not loaded", content, hostile=True))
    return cases


def write_corpus(folder: str | os.PathLike[str]) -> dict[str, tuple[str, Damaged]]:
    """Write every case into ``folder``; returns name -> (path, case). Missing cases get a path
    that does not exist."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    marker = os.path.join(folder, UNPICKLED_MARKER)
    out: dict[str, tuple[str, Damaged]] = {}
    for case in damaged_cases(marker):
        path = os.path.join(folder, case.name)
        if case.kind == "folder":
            os.makedirs(path, exist_ok=True)
        elif case.kind == "file":
            assert case.content is not None
            with open(path, "wb") as f:
                f.write(case.content)
        out[case.name] = (path, case)
    return out


# -- what a clean failure looks like -------------------------------------------------------------
def snapshot(folder: str | os.PathLike[str]) -> dict[str, bytes | None]:
    """Every entry of ``folder`` (recursively) with its bytes (``None`` for folders)."""
    folder = os.fspath(folder)
    out: dict[str, bytes | None] = {}
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), folder)] = None
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def leftover_temp_files(folder: str | os.PathLike[str]) -> list[str]:
    """Temporary outputs (``.<name>.*.tmp``) left in ``folder``."""
    return sorted(n for n in os.listdir(folder) if n.startswith(".") and n.endswith(".tmp"))


def check_clean_failure(exit_code: int, stderr: str, *, fragments: tuple[str, ...] = (),
                        folder: str | os.PathLike[str] | None = None,
                        before: dict[str, bytes | None] | None = None, max_lines: int = 3,
                        code: int = 2) -> str:
    """Assert a command failed the way every expected failure must; returns the error message.

    Exit code ``code`` (2: found before any tensor was read; 1: the merge failed while running);
    one to ``max_lines`` lines on stderr starting with ``error:``; no traceback;
    every fragment present; and, when ``folder`` and its ``before`` snapshot are given, the
    folder exactly as it was (no temporary or partial file, existing files byte-for-byte equal).
    """
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert exit_code == code, f"exit code {exit_code}, expected {code}, stderr:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    assert 1 <= len(lines) <= max_lines, f"{len(lines)} lines on stderr:\n{stderr}"
    assert lines[0].startswith("error: "), stderr
    for fragment in fragments:
        assert fragment in stderr, f"{fragment!r} not in the message:\n{stderr}"
    if folder is not None:
        assert leftover_temp_files(folder) == [], leftover_temp_files(folder)
        if before is not None:
            after = snapshot(folder)
            assert sorted(after) == sorted(before), (sorted(before), sorted(after))
            changed = [name for name in after if after[name] != before[name]]
            assert changed == [], f"files changed: {changed}"
    return stderr.strip()
