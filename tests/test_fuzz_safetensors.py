"""Property-based fuzzing of the safetensors header reader: whatever the bytes, opening a file
either gives a file whose every tensor reads back as its header says, or a MechaError naming the
file. Never another exception, never a tensor outside the file. Fixed budget for CI."""

from __future__ import annotations

import json
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mecha_core.engine.safetensors_io import DTYPES, SafetensorsFile
from mecha_core.errors import MechaError
from mecha_core.testing_corpus import BASE_DATA, base_header, safetensors_bytes

FUZZ = settings(max_examples=200, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return str(tmp_path_factory.mktemp("fuzz") / "fuzzed.safetensors")


def check(path: str, content: bytes) -> None:
    """The property: a MechaError naming the file, or a file that is exactly what it claims."""
    with open(path, "wb") as f:
        f.write(content)
    try:
        opened = SafetensorsFile(path)
    except MechaError as exc:
        assert path in str(exc)
        assert len(str(exc)) < 600
        return
    try:
        data_area = len(content) - opened.data_start
        assert sum(opened.nbytes(k) for k in opened.keys) == data_area
        for key, info in opened.keys.items():
            tensor = opened.read(key)
            assert tuple(tensor.shape) == info.shape
            assert str(tensor.dtype) == "torch." + info.dtype
            assert tensor.numel() * tensor.element_size() == opened.nbytes(key)
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in opened.metadata.items())
    finally:
        opened.close()


json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True)
                | st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)
small_ints = st.integers(-2, 40)
entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(sorted(DTYPES)) | json_values,
        "shape": st.lists(small_ints, max_size=3) | json_values,
        "data_offsets": st.lists(small_ints, min_size=2, max_size=2) | json_values,
    },
)


@FUZZ
@given(content=st.binary(max_size=300))
def test_random_bytes(target, content):
    check(target, content)


@FUZZ
@given(length=st.integers(0, 2**64 - 1) | st.integers(0, 400), body=st.binary(max_size=300))
def test_random_bytes_behind_any_header_length(target, length, body):
    check(target, struct.pack("<Q", length) + body)


@FUZZ
@given(header=st.dictionaries(st.text(max_size=6), entries | json_values, max_size=5),
       metadata=st.none() | json_values | st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
       data=st.binary(max_size=64))
def test_random_json_headers(target, header, metadata, data):
    if metadata is not None:
        header = {"__metadata__": metadata, **header}
    check(target, safetensors_bytes(json.dumps(header).encode(), data))


@FUZZ
@given(key=st.sampled_from(["a", "b"]), field=st.sampled_from(["dtype", "shape", "data_offsets"]),
       value=json_values | st.lists(small_ints, max_size=3) | st.sampled_from(sorted(DTYPES)),
       cut=st.integers(0, 40), extra=st.binary(max_size=16))
def test_mutated_valid_headers(target, key, field, value, cut, extra):
    header = base_header()
    header[key][field] = value
    data = BASE_DATA[: len(BASE_DATA) - cut] + extra if cut <= len(BASE_DATA) else extra
    check(target, safetensors_bytes(header, data))


@FUZZ
@given(edits=st.lists(st.tuples(st.sampled_from(["flip", "insert", "delete"]), st.integers(0, 10**6),
                                st.integers(0, 255)), min_size=1, max_size=4))
def test_byte_mutations_of_a_valid_file(target, edits):
    content = bytearray(safetensors_bytes(base_header()))
    for kind, where, byte in edits:
        position = where % (len(content) + 1)
        if kind == "insert":
            content[position:position] = bytes([byte])
        elif position < len(content):
            if kind == "flip":
                content[position] ^= byte or 1
            else:
                del content[position]
    check(target, bytes(content))


def test_the_property_accepts_valid_files_and_reads_them(target):
    """The fuzz property is not vacuous: a valid file passes through the reading branch."""
    content = safetensors_bytes({"__metadata__": {"k": "v"}, **base_header()})
    check(target, content)
    f = SafetensorsFile(target)
    try:
        assert f.read("b").tolist() == [5.0, 6.0, 7.0, 8.0]
        assert f.metadata == {"k": "v"}
    finally:
        f.close()
    os.unlink(target)
