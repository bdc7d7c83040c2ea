"""Writing the output past the page cache (``O_DIRECT``): whole regions, from one writer thread.

A merge's output is written once and not read back by the merge: keeping it in the page cache
only evicts what is worth keeping there (the inputs, on a merge of many large models) and makes
the kernel find a free page for every 4 KiB written. On virtual machines that hand freed memory
back to their host (free page reporting), every such page is a fresh page for the host too, and
the first write to it costs several times the copy: writing a 2.1 GB file through the page cache
took 5.4-8.2 s on this project's machines when its pages were fresh, 0.5-1.0 s when they had just
been used, and 1.4 s through ``O_DIRECT`` either way (docs/benchmarks.md).

Direct I/O wants the file position, the length and the memory address aligned to the file
system's block, and it is cheaper the larger each write: 2.1 GB written in 2 MiB pieces took
1.9-2.3 s with both CPUs busy, in 32 MiB pieces 1.1-1.5 s. A unit's bytes start and end
anywhere and a slice is a few MiB, so the writer stages the file in *regions*: aligned stretches
of up to 32 MiB, each a buffer in memory. Workers copy their bytes into the regions they fall in;
a region whose every byte has arrived is written with one direct write (the file's first and
last partial blocks, and blocks shared with bytes written some other way, go through the
ordinary descriptor; the two never share a block, so the kernel keeps them coherent). Every
byte of the writer's span must be written once, by :meth:`OutputWriter.write` or, for bytes the
caller put in the file itself (a key copied file to file), announced with
:meth:`OutputWriter.written`; :meth:`OutputWriter.finish` says so when some were not.

Units run in output order, so few regions are ever unfinished: at most two for each unit in
flight (its first and its last) and one where the next unit starts; the pool holds
``2 * threads + 2`` buffers, so a worker waiting for a buffer always waits for one the writer
thread is about to free, never for one that only a waiting worker could complete. The buffers
are made on first need and count against the memory budget (:attr:`RegionPool.reserved`).

One thread writes. A file system serialises writes that allocate blocks (ext4 holds the file's
lock through a direct write into new blocks, the device's time included), so workers writing for
themselves mostly waited for each other.

Where ``O_DIRECT`` is refused (tmpfs, some network file systems, other platforms) every write
goes through the ordinary descriptor at once. The bytes in the file are the same either way.
``MECHA_DIRECT_WRITE=0`` in the environment keeps every write in the page cache (a slow disk
then finishes the writes after the merge returns, as it always did).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import queue
import threading
from typing import Any, Iterator

from ..lazy import torch

#: the largest region: the largest single direct write
_REGION = 32 << 20
#: smaller regions than this are not worth staging: every write then goes through the page cache
_MIN_REGION = 1 << 20
#: the share of the memory budget the regions may take at most (the units get the rest)
_BUDGET_SHARE = 4
_ALIGN = 4096


def pwrite_all(fd: int, data: Any, position: int) -> None:
    """Write all of ``data`` (a bytes-like object) at ``position``: a pwrite may write less
    than asked (a direct one too: it then stops on a block boundary)."""
    view = memoryview(data).cast("B")
    while len(view):
        written = os.pwrite(fd, view, position)
        view, position = view[written:], position + written


class RegionPool:
    """The page-aligned buffers regions are staged in, shared by every writer of one merge (a
    folder's shard files are all open at once), made on first need, ``count`` at most."""

    def __init__(self, size: int, count: int):
        self.size = size
        """Bytes of one region (a power of two, a multiple of any file system block)."""
        self.count = count
        """Buffers at most."""
        self._free: list[tuple[mmap.mmap, int]] = []
        self._made = 0
        self._cond = threading.Condition()

    @classmethod
    def for_merge(cls, memory_budget: int, threads: int) -> RegionPool | None:
        """The pool for a merge run by ``threads`` workers: ``2 * threads + 2`` regions (see the
        module's docstring), as large as fits in a quarter of ``memory_budget`` up to 32 MiB;
        ``None`` when even 1 MiB regions do not fit (every write then goes through the page cache)."""
        count = 2 * max(1, threads) + 2
        size = _REGION
        while size >= _MIN_REGION and count * size > memory_budget // _BUDGET_SHARE:
            size //= 2
        return cls(size, count) if size >= _MIN_REGION else None

    @property
    def reserved(self) -> int:
        """The most memory the buffers hold."""
        return self.size * self.count

    def get(self) -> tuple[mmap.mmap, int]:
        """A free buffer and its address (made when fewer than ``count`` exist, else waits for one)."""
        with self._cond:
            while not self._free and self._made >= self.count:
                self._cond.wait()
            if self._free:
                return self._free.pop()
            self._made += 1
        buffer = mmap.mmap(-1, self.size)  # anonymous: page-aligned, its pages made on first use
        return buffer, ctypes.addressof(ctypes.c_char.from_buffer(buffer))

    def put(self, buffer: tuple[mmap.mmap, int]) -> None:
        """Hand a buffer back."""
        with self._cond:
            self._free.append(buffer)
            self._cond.notify()


def staging_memory(pool: RegionPool | None, writers: list[OutputWriter]) -> int:
    """The memory budget the regions take from the units (none when no writer stages)."""
    return pool.reserved if pool is not None and any(w.direct for w in writers) else 0


class _Region:
    """One region being filled: its buffer (none while only bytes written elsewhere arrived),
    the bytes that arrived, and the stretches the caller wrote itself."""

    __slots__ = ("buffer", "filled", "elsewhere")

    def __init__(self) -> None:
        self.buffer: tuple[mmap.mmap, int] | None = None
        self.filled = 0
        self.elsewhere: list[tuple[int, int]] = []


class OutputWriter:
    """Writes the bytes ``span`` (start, end) of one output file, each byte once, from any
    thread: staged in the regions of ``pool`` and written past the page cache from a writer
    thread of its own where the file system takes ``O_DIRECT``; else each caller writes to ``fd``.

    The file is done when :meth:`finish` returns; an error of the writer thread is raised by the
    next :meth:`write` or by :meth:`finish`. ``fd`` stays the caller's (it writes the header and
    closes it); :meth:`close` stops the thread and closes the direct descriptor."""

    def __init__(self, fd: int, path: str | None, span: tuple[int, int], *, pool: RegionPool | None):
        self.fd = fd
        self.direct_fd = -1
        self.block = _ALIGN
        self.span = span
        self.refused = False  # the kernel refused a direct write: every later one goes through fd
        if (pool is not None and path is not None and hasattr(os, "O_DIRECT")
                and os.environ.get("MECHA_DIRECT_WRITE") != "0"):
            try:
                self.block = max(_ALIGN, os.statvfs(path).f_bsize)
                if pool.size % self.block == 0:
                    self.direct_fd = os.open(path, os.O_WRONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                self.direct_fd = -1
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if self.direct_fd >= 0:
            assert pool is not None
            self._pool = pool
            self._regions: dict[int, _Region] = {}
            self._lock = threading.Lock()
            self._todo: queue.Queue[tuple[int, _Region] | None] = queue.Queue()
            self._thread = threading.Thread(target=self._write_forever, name="mecha-writer", daemon=True)
            self._thread.start()

    @property
    def direct(self) -> bool:
        """Whether the writes are staged and go past the page cache."""
        return self.direct_fd >= 0 and not self.refused

    def write(self, data: Any, position: int) -> None:
        """Write all of ``data`` (a bytes-like object) at ``position``: in the file when
        :meth:`finish` returns (at once without a writer thread)."""
        self._raise_failure()
        view = memoryview(data).cast("B")
        if self._thread is None:
            pwrite_all(self.fd, view, position)
            return
        source = _address(view)
        for index, at, done, n in self._stretches(position, len(view)):
            region = self._region(index, True)
            assert region.buffer is not None
            buffer, address = region.buffer
            offset = done - position
            if source is not None:
                ctypes.memmove(address + at, source + offset, n)  # without the GIL
            else:
                memoryview(buffer)[at:at + n] = view[offset:offset + n]
            self._arrived(index, region, n, None)

    def write_cast(self, value: Any, dtype: Any, position: int) -> bool:
        """Write the elements of the tensor ``value`` cast to the torch ``dtype`` at ``position``,
        the cast writing straight into the regions (one pass over the bytes fewer than casting,
        then copying); ``False`` (nothing written) without regions, or at a position that is not a
        multiple of the item size: the caller casts and calls :meth:`write` then."""
        itemsize = dtype.itemsize
        if self._thread is None or position % itemsize:
            return False
        self._raise_failure()
        flat = value.reshape(-1)
        # regions are a power of two of at least 1 MiB: no element straddles two of them
        for index, at, done, n in self._stretches(position, flat.numel() * itemsize):
            region = self._region(index, True)
            assert region.buffer is not None
            first = (done - position) // itemsize
            into = torch.frombuffer(region.buffer[0], dtype=dtype, count=n // itemsize, offset=at)
            into.copy_(flat[first:first + n // itemsize])
            self._arrived(index, region, n, None)
        return True

    def written(self, position: int, n: int) -> None:
        """Say that the caller wrote bytes ``position .. position + n`` to ``fd`` itself (a key
        copied file to file): the regions they fall in are written around them."""
        if self._thread is None:
            return
        for index, _, done, part in self._stretches(position, n):
            self._arrived(index, self._region(index, False), part, (done, done + part))

    def _stretches(self, position: int, n: int) -> Iterator[tuple[int, int, int, int]]:
        """Bytes ``position .. position + n`` (within the span) cut at region boundaries: for
        each part its region, its offset in the region, its position in the file and its length."""
        if position < self.span[0] or position + n > self.span[1]:
            raise ValueError(f"bytes {position}..{position + n} are outside the writer's span {self.span}")
        size = self._pool.size
        end, done = position + n, position
        while done < end:
            index = done // size
            part = min(end, (index + 1) * size) - done
            yield index, done - index * size, done, part
            done += part

    def _bounds(self, index: int) -> tuple[int, int]:
        """The bytes of the span region ``index`` holds (first, end)."""
        begin = index * self._pool.size
        return max(begin, self.span[0]), min(begin + self._pool.size, self.span[1])

    def _region(self, index: int, buffered: bool) -> _Region:
        with self._lock:
            region = self._regions.get(index)
            if region is None:
                region = self._regions[index] = _Region()
            if region.buffer is not None or not buffered:
                return region
        buffer: tuple[mmap.mmap, int] | None = self._pool.get()  # outside the lock: it may wait
        with self._lock:
            if region.buffer is None:
                region.buffer, buffer = buffer, None
        if buffer is not None:  # another worker gave the region one meanwhile
            self._pool.put(buffer)
        return region

    def _arrived(self, index: int, region: _Region, n: int, elsewhere: tuple[int, int] | None) -> None:
        lo, hi = self._bounds(index)
        with self._lock:
            region.filled += n
            if elsewhere is not None:
                region.elsewhere.append(elsewhere)
            if region.filled < hi - lo:
                return
            del self._regions[index]
        self._todo.put((index, region))

    def _write_forever(self) -> None:
        while True:
            item = self._todo.get()
            if item is None:
                return
            index, region = item
            try:
                if self._error is None:
                    self._write_region(index, region)
            except BaseException as exc:  # raised in the workers' threads, by write() or finish()
                self._error = exc
            finally:
                if region.buffer is not None:
                    self._pool.put(region.buffer)

    def _write_region(self, index: int, region: _Region) -> None:
        begin = index * self._pool.size
        lo, hi = self._bounds(index)
        runs, at = [], lo  # the stretches staged in the buffer: the region less what came elsewhere
        for a, b in sorted(region.elsewhere):
            if a > at:
                runs.append((at, a))
            at = max(at, b)
        if hi > at:
            runs.append((at, hi))
        if not runs:
            return
        assert region.buffer is not None
        buffer = memoryview(region.buffer[0])
        for a, b in runs:
            first = min(-(-a // self.block) * self.block, b)
            last = max(b // self.block * self.block, first)
            if first > a:  # a partial block: through the page cache
                pwrite_all(self.fd, buffer[a - begin:first - begin], a)
            if last > first:
                self._write_direct(buffer[first - begin:last - begin], first)
            if b > last:
                pwrite_all(self.fd, buffer[last - begin:b - begin], last)

    def _write_direct(self, view: memoryview, position: int) -> None:
        if not self.refused:
            try:
                pwrite_all(self.direct_fd, view, position)
                return
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                    raise
                self.refused = True  # rewritten the ordinary way below: the same bytes
        pwrite_all(self.fd, view, position)

    def _raise_failure(self) -> None:
        if self._error is not None:
            raise self._error

    def finish(self) -> None:
        """Wait until everything written so far is in the file; raise the writer's error if
        any, and say so when bytes of the span never arrived (a caller's mistake)."""
        self._stop()
        self._raise_failure()
        if self.direct_fd >= 0 and self._regions:
            lo, hi = self._bounds(min(self._regions))
            raise RuntimeError(f"the output's bytes {lo}..{hi} were not all written")

    def _stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._todo.put(None)
            thread.join()

    def close(self) -> None:
        """Stop the writer thread (after what was queued), hand back the buffers of regions
        left unfinished (a failed merge) and close the direct descriptor (not ``fd``)."""
        self._stop()
        fd, self.direct_fd = self.direct_fd, -1
        if fd >= 0:
            with self._lock:
                left, self._regions = list(self._regions.values()), {}
            for region in left:
                if region.buffer is not None:
                    self._pool.put(region.buffer)
            try:
                os.close(fd)
            except OSError:
                pass


def _address(view: memoryview) -> int | None:
    """The address of a contiguous writable buffer's first byte (None for a read-only one)."""
    if view.readonly or not view.c_contiguous or not len(view):
        return None
    return ctypes.addressof(ctypes.c_char.from_buffer(view))
