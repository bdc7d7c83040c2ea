"""The output writer: large writes past the page cache (O_DIRECT), the same bytes as plain writes.

The direct path is checked where the file system of the test's temporary folder takes O_DIRECT
(ext4, xfs, btrfs ...; tmpfs does not): the probe below says which, and the tests that need it
say why they skip. Residency in the page cache is read with mincore(2): the middle of a
direct write is not there, the edges written the ordinary way are."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import random
import threading

import pytest
import torch

import mecha_core as mecha
from mecha_core.engine import direct_write
from mecha_core.engine.direct_write import OutputWriter
from mecha_core.testing import read_tensors, write_checkpoint

MIB = 1 << 20


def _takes_o_direct(folder) -> bool:
    if not hasattr(os, "O_DIRECT"):
        return False
    probe = os.path.join(folder, "probe")
    open(probe, "wb").close()
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_DIRECT))
        return True
    except OSError:
        return False
    finally:
        os.unlink(probe)


@pytest.fixture
def direct_folder(tmp_path):
    if not _takes_o_direct(tmp_path):
        pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT: the direct path cannot be checked here")
    return tmp_path


def _resident_pages(path: str) -> list[bool]:
    """Which of the file's pages are in the page cache: mincore(2) over a read-only map of it."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    size = os.path.getsize(path)
    vec = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
    with open(path, "rb") as f:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
        assert address not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            assert libc.mincore(address, size, vec) == 0, os.strerror(ctypes.get_errno())
        finally:
            libc.munmap(address, size)
    return [bool(v & 1) for v in vec]


def _new_file(path, size: int) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, size)
    return fd


def _chunks(total: int, seed: int) -> list[tuple[int, bytes]]:
    """Consecutive writes covering ``total`` bytes, at positions aligned to nothing."""
    rng = random.Random(seed)
    out, position = [], 0
    while position < total:
        n = min(total - position, rng.choice([7, 4093, MIB + 13, 3 * MIB + 4097, 9 * MIB + 1]))
        out.append((position, rng.randbytes(n)))
        position += n
    return out


def _pool(region: int = MIB, count: int = 64) -> direct_write.RegionPool:
    return direct_write.RegionPool(region, count)


def _expected(total: int, chunks: list[tuple[int, bytes]]) -> bytes:
    expected = bytearray(total)
    for position, data in chunks:
        expected[position:position + len(data)] = data
    return bytes(expected)


def _run_and_check(threads: list[threading.Thread], writer: OutputWriter, fd: int, path: str, expected: bytes) -> None:
    """Run the writing threads, finish the file and compare its bytes with ``expected``."""
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive(), "a writing thread waits for a region forever"
    writer.finish()
    writer.close()
    os.close(fd)
    with open(path, "rb") as f:
        assert f.read() == expected


def test_writes_land_where_asked_in_any_order(direct_folder):
    path = str(direct_folder / "out.bin")
    total = 40 * MIB + 123
    fd = _new_file(path, total)
    writer = OutputWriter(fd, path, (0, total), pool=_pool(count=64))  # every region at once if need be
    assert writer.direct
    chunks = _chunks(total, 1)
    rng = random.Random(2)
    rng.shuffle(chunks)
    threads = [threading.Thread(target=lambda part=chunks[i::3]: [writer.write(d, p) for p, d in part], daemon=True)
               for i in range(3)]
    _run_and_check(threads, writer, fd, path, _expected(total, chunks))


def test_workers_taking_writes_in_order_never_run_out_of_regions(direct_folder):
    # as the engine's workers do: each takes the next unit, three at once, and the pool holds
    # 2 * 3 + 2 regions, fewer than the file has (the module's docstring says why that is enough)
    path = str(direct_folder / "out.bin")
    total = 30 * MIB + 5
    fd = _new_file(path, total)
    writer = OutputWriter(fd, path, (0, total), pool=_pool(count=2 * 3 + 2))
    chunks = _chunks(total, 4)
    todo = iter(chunks)
    lock = threading.Lock()

    def work():
        while True:
            with lock:
                item = next(todo, None)
            if item is None:
                return
            writer.write(item[1], item[0])

    _run_and_check([threading.Thread(target=work, daemon=True) for _ in range(3)], writer, fd, path,
                   _expected(total, chunks))


def test_a_region_is_written_past_the_page_cache_and_the_span_edges_through_it(direct_folder):
    path = str(direct_folder / "out.bin")
    start, n = 4096 * 3 + 100, 5 * MIB  # unaligned start and end
    fd = _new_file(path, start + n + 5000)
    writer = OutputWriter(fd, path, (start, start + n), pool=_pool(8 * MIB, 1))
    writer.write(bytearray(os.urandom(n)), start)  # writable: copied without the GIL
    writer.finish()
    writer.close()
    os.close(fd)
    resident = _resident_pages(path)
    first_page, last_page = start // 4096, (start + n - 1) // 4096
    assert resident[first_page] and resident[last_page]  # the partial blocks: through the page cache
    middle = resident[first_page + 1:last_page]
    assert len(middle) > 1000 and not any(middle)


def test_bytes_written_elsewhere_are_written_around(direct_folder):
    # a key copied file to file lands in the page cache first; its region is written around it
    path = str(direct_folder / "out.bin")
    total = 5 * MIB + 77
    fd = _new_file(path, total)
    writer = OutputWriter(fd, path, (0, total), pool=_pool(2 * MIB, 2))
    chunks = _chunks(total, 6)
    for i, (position, data) in enumerate(chunks):
        if i % 2:
            os.pwrite(fd, data, position)
            writer.written(position, len(data))
        else:
            writer.write(data, position)
    writer.finish()
    writer.close()
    os.close(fd)
    with open(path, "rb") as f:
        assert f.read() == _expected(total, chunks)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_cast_into_the_regions_gives_the_bytes_of_the_cast_tensor(direct_folder, dtype):
    path = str(direct_folder / "out.bin")
    gen = torch.Generator().manual_seed(9)
    parts = [torch.randn(n, generator=gen) * 1e3 for n in (700_001, 1_300_000, 5)]  # across 1 MiB regions
    start = 4096 + 8
    total = start + sum(p.numel() for p in parts) * 2
    fd = _new_file(path, total)
    writer = OutputWriter(fd, path, (start, total), pool=_pool(MIB, 4))
    position = start
    for part in parts:
        assert writer.write_cast(part, dtype, position)
        position += part.numel() * 2
    writer.finish()
    writer.close()
    os.close(fd)
    expected = b"".join(bytes(p.to(dtype).view(torch.uint8).numpy()) for p in parts)  # torch's own cast
    with open(path, "rb") as f:
        assert f.read()[start:] == expected


def test_a_cast_at_a_position_off_the_item_size_is_left_to_the_caller(direct_folder):
    path = str(direct_folder / "out.bin")
    fd = _new_file(path, MIB)
    writer = OutputWriter(fd, path, (0, MIB), pool=_pool())
    assert not writer.write_cast(torch.ones(10), torch.float16, 3)
    writer.write(b"\1" * MIB, 0)  # the caller writes instead: nothing of the refused cast arrived
    writer.finish()
    writer.close()
    os.close(fd)
    with open(path, "rb") as f:
        assert f.read() == b"\1" * MIB


def test_bytes_that_never_arrive_are_an_error(direct_folder):
    path = str(direct_folder / "out.bin")
    fd = _new_file(path, 3 * MIB)
    writer = OutputWriter(fd, path, (0, 3 * MIB), pool=_pool())
    writer.write(b"x" * (2 * MIB + 1), 0)
    with pytest.raises(RuntimeError, match=f"bytes {2 * MIB}..{3 * MIB} were not all written"):
        writer.finish()
    writer.close()
    os.close(fd)


def test_a_write_outside_the_span_is_refused(direct_folder):
    path = str(direct_folder / "out.bin")
    fd = _new_file(path, MIB)
    writer = OutputWriter(fd, path, (100, MIB), pool=_pool())
    with pytest.raises(ValueError, match="outside"):
        writer.write(b"abc", 98)
    writer.close()
    os.close(fd)


def test_regions_take_a_quarter_of_the_budget_at_most():
    pool = direct_write.RegionPool.for_merge(1 << 30, 2)  # the default budget, two workers
    assert (pool.size, pool.count) == (32 * MIB, 6)  # 192 MiB <= 256 MiB
    pool = direct_write.RegionPool.for_merge(1 << 30, 16)
    assert (pool.size, pool.count) == (4 * MIB, 34)  # 8 MiB regions would take 272 MiB
    pool = direct_write.RegionPool.for_merge(64 * MIB, 1)
    assert (pool.size, pool.count, pool.reserved) == (4 * MIB, 4, 16 * MIB)
    assert direct_write.RegionPool.for_merge(20 * MIB, 2) is None  # 6 x 1 MiB > 5 MiB: no staging


def test_a_refused_direct_write_is_written_the_ordinary_way(direct_folder, monkeypatch):
    path = str(direct_folder / "out.bin")
    total = 12 * MIB + 5
    fd = _new_file(path, total)
    writer = OutputWriter(fd, path, (0, total), pool=_pool())
    real = os.pwrite
    refused = []

    def pwrite(target, data, position):
        if target == writer.direct_fd:
            refused.append(position)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(target, data, position)

    monkeypatch.setattr(direct_write.os, "pwrite", pwrite)
    chunks = _chunks(total, 3)
    for position, data in chunks:
        writer.write(data, position)
    writer.finish()
    writer.close()
    os.close(fd)
    assert len(refused) == 1 and not writer.direct  # refused once: never tried again
    with open(path, "rb") as f:
        assert f.read() == b"".join(d for _, d in chunks)


def test_other_write_errors_are_raised(direct_folder, monkeypatch):
    path = str(direct_folder / "out.bin")
    fd = _new_file(path, 8 * MIB)
    writer = OutputWriter(fd, path, (1, 4 * MIB + 1), pool=_pool())
    real = os.pwrite

    def pwrite(target, data, position):
        if target == writer.direct_fd:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(target, data, position)

    monkeypatch.setattr(direct_write.os, "pwrite", pwrite)
    writer.write(bytes(4 * MIB), 1)  # staged: the writer thread meets the error
    with pytest.raises(OSError) as caught:
        writer.finish()
    assert caught.value.errno == errno.ENOSPC
    with pytest.raises(OSError):  # and every later write says so
        writer.write(b"x", 0)
    writer.close()
    os.close(fd)


def test_a_write_after_the_writers_failure_raises_it(direct_folder, monkeypatch):
    path = str(direct_folder / "out.bin")
    fd = _new_file(path, 8 * MIB)
    writer = OutputWriter(fd, path, (5, 3 * MIB + 5), pool=_pool())
    monkeypatch.setattr(direct_write.os, "pwrite", lambda *a: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    writer.write(bytes(3 * MIB), 5)
    writer.close()  # waits for the queue: the error is recorded by then
    with pytest.raises(OSError) as caught:
        writer.finish()
    assert caught.value.errno == errno.EIO
    os.close(fd)


def test_without_a_path_every_write_is_ordinary(tmp_path):
    path = str(tmp_path / "out.bin")
    fd = _new_file(path, 4 * MIB)
    writer = OutputWriter(fd, None, (0, 4 * MIB), pool=_pool())
    assert not writer.direct
    writer.write(b"\1" * (3 * MIB), 17)
    os.close(fd)
    with open(path, "rb") as f:
        data = f.read()
    assert data[17:17 + 3 * MIB] == b"\1" * (3 * MIB) and data.count(0) == 4 * MIB - 3 * MIB


def test_a_float16_merge_cast_into_the_regions_gives_the_reference(direct_folder):
    gen = torch.Generator().manual_seed(6)
    shapes = {"big": (1500, 1100), "small": (7,), "odd": (333_333,)}
    a = {k: torch.randn(s, generator=gen).half() for k, s in shapes.items()}
    b = {k: torch.randn(s, generator=gen).half() for k, s in shapes.items()}
    write_checkpoint(direct_folder / "a.safetensors", a)
    write_checkpoint(direct_folder / "b.safetensors", b)
    out = direct_folder / "out.safetensors"
    mecha.merge(mecha.weighted_sum(mecha.model(str(direct_folder / "a.safetensors")),
                                   mecha.model(str(direct_folder / "b.safetensors")), alpha=0.25),
                str(out), memory_budget=64 * MIB)  # 4 MiB regions: the big key spans several
    merged = read_tensors(out)
    for key in shapes:  # in float32 (the work dtype), rounded once to float16
        expected = (a[key].float() * 0.75 + b[key].float() * 0.25).half()
        assert merged[key].dtype == torch.float16 and torch.equal(merged[key], expected), key


def test_a_merge_with_large_keys_gives_the_reference_bytes(direct_folder):
    gen = torch.Generator().manual_seed(5)
    shapes = {"big": (1031, 1027), "small": (3, 5), "odd": (777_777,)}  # 4.2 MB, 60 B, 3.1 MB in fp32
    a = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    b = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    write_checkpoint(direct_folder / "a.safetensors", a)
    write_checkpoint(direct_folder / "b.safetensors", b)
    out = direct_folder / "out.safetensors"
    mecha.merge(mecha.weighted_sum(mecha.model(str(direct_folder / "a.safetensors")),
                                   mecha.model(str(direct_folder / "b.safetensors")), alpha=0.25), str(out))
    merged = read_tensors(out)
    for key in shapes:  # the method's definition, in float32 as the inputs are
        assert torch.equal(merged[key], a[key] * 0.75 + b[key] * 0.25), key


def test_writers_sharing_one_buffer_write_every_file(direct_folder):
    # a folder's shards share the regions of one pool: one is enough for writers that go in order
    pool = _pool(MIB, 1)
    files = []
    for name, seed in (("a.bin", 11), ("b.bin", 12)):
        path = str(direct_folder / name)
        total = 20 * MIB + seed
        fd = _new_file(path, total)
        files.append((path, fd, OutputWriter(fd, path, (0, total), pool=pool), _chunks(total, seed)))
    threads = [threading.Thread(target=lambda w=w, c=c: [w.write(d, p) for p, d in c]) for _, _, w, c in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive()
    for path, fd, writer, chunks in files:
        writer.finish()
        writer.close()
        os.close(fd)
        with open(path, "rb") as f:
            assert f.read() == b"".join(d for _, d in chunks)


def test_a_failed_region_write_fails_the_merge_and_leaves_nothing(direct_folder, monkeypatch):
    gen = torch.Generator().manual_seed(8)
    for name in "ab":
        write_checkpoint(direct_folder / f"{name}.safetensors", {"big": torch.randn(3000, 1000, generator=gen)})
    out = direct_folder / "out.safetensors"
    real = os.pwrite
    failed = []

    def pwrite(fd, data, position):
        if len(memoryview(data)) >= MIB:  # a region's direct write, on the writer thread
            failed.append(position)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, position)

    monkeypatch.setattr(direct_write.os, "pwrite", pwrite)
    with pytest.raises(mecha.MechaError, match="out.safetensors: writing failed: No space left on device"):
        mecha.merge(mecha.weighted_sum(mecha.model(str(direct_folder / "a.safetensors")),
                                       mecha.model(str(direct_folder / "b.safetensors")), alpha=0.5), str(out))
    assert failed and sorted(os.listdir(direct_folder)) == ["a.safetensors", "b.safetensors"]

