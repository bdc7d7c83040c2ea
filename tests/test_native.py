"""mecha_core.kit.native: C kernels built once per machine, cached, and refused cleanly."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest
import torch

from mecha_core.kit import native

_ADD = """
#include <stdint.h>
int64_t add(int64_t a, int64_t b) { return a + b + %d; }
"""


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("MECHA_NATIVE", raising=False)
    return tmp_path / "mecha" / "kernels"


def _add(library) -> int:
    library.add.restype = ctypes.c_int64
    library.add.argtypes = [ctypes.c_int64, ctypes.c_int64]
    return library.add(40, 2)


def test_a_kernel_is_built_once_into_the_cache_and_called(cache):
    library = native.load("t_add", _ADD % 0)
    assert library is not None, native.why_not("t_add")
    assert _add(library) == 42
    built = sorted(os.listdir(cache))
    assert len(built) == 1 and built[0].startswith("t_add-") and built[0].endswith(".so")
    stamp = os.stat(cache / built[0]).st_mtime_ns
    # another process finds the build and does not compile again
    code = ("from mecha_core.kit import native; import ctypes; lib = native.load('t_add', %r); "
            "lib.add.restype = ctypes.c_int64; print(lib.add(ctypes.c_int64(1), ctypes.c_int64(2)))" % (_ADD % 0))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, check=True)
    assert done.stdout.strip() == "3"
    assert sorted(os.listdir(cache)) == built and os.stat(cache / built[0]).st_mtime_ns == stamp


def test_another_source_is_another_library(cache):
    one, two = native.load("t_two", _ADD % 1), native.load("t_two", _ADD % 2)
    assert _add(one) == 43 and _add(two) == 44
    assert len(os.listdir(cache)) == 2


def test_a_source_that_does_not_compile_is_refused_with_the_compilers_words(cache):
    assert native.load("t_broken", "int broken( {") is None
    reason = native.why_not("t_broken")
    assert reason is not None and "could not build it" in reason and "error" in reason
    # no library, and no build folder left behind
    assert os.listdir(cache) == []


def test_a_function_comes_typed_and_is_looked_up_once(cache, monkeypatch):
    """``native.function`` sets the ctypes signature (an int64 sum past 2**31 comes back whole,
    which ctypes' default int result would cut) and hands the same object on every later call."""
    monkeypatch.setattr("mecha_core.native._functions", {})  # the kit re-exports; the memo lives there
    add = native.function("t_fn", _ADD % 5, "add", ctypes.c_int64, [ctypes.c_int64, ctypes.c_int64])
    assert add is not None, native.why_not("t_fn")
    assert add(2**40, 1) == 2**40 + 6
    assert native.function("t_fn", _ADD % 5, "add", ctypes.c_int64, [ctypes.c_int64, ctypes.c_int64]) is add
    monkeypatch.setenv("MECHA_NATIVE", "0")
    assert native.function("t_fn_off", _ADD % 6, "add", ctypes.c_int64, [ctypes.c_int64, ctypes.c_int64]) is None


def test_no_compiler_means_no_kernel(cache, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert native.load("t_nocc", _ADD % 3) is None
    assert native.why_not("t_nocc") == "no C compiler (/nonexistent/cc not found)"
    assert not cache.exists()


def test_native_kernels_can_be_turned_off(cache, monkeypatch):
    monkeypatch.setenv("MECHA_NATIVE", "0")
    assert native.load("t_off", _ADD % 4) is None
    assert native.why_not("t_off") == "MECHA_NATIVE=0 is set"
    assert not cache.exists()


def test_float_arithmetic_rounds_op_by_op_as_torch_does(cache):
    """No fused multiply-add (``-march=native`` offers one here): ``a * b + c`` rounds the product
    first, as torch's two operations do. With a = b = 1 + 2**-12 the product 1 + 2**-11 + 2**-24
    rounds to 1 + 2**-11, so adding c = -(1 + 2**-11) gives 0; fused it would give 2**-24."""
    library = native.load("t_muladd", "float muladd(float a, float b, float c) { return a * b + c; }")
    assert library is not None, native.why_not("t_muladd")
    library.muladd.restype = ctypes.c_float
    library.muladd.argtypes = [ctypes.c_float] * 3
    a, c = 1 + 2.0 ** -12, -(1 + 2.0 ** -11)
    want = float(torch.tensor(a) * torch.tensor(a) + torch.tensor(c))
    assert want == 0.0
    assert library.muladd(a, a, c) == want
