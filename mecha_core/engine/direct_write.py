"""Writing the output's large tensors past the page cache (``O_DIRECT``), from one writer thread.

A merge's output is written once and not read back by the merge: keeping it in the page cache
only evicts what is worth keeping there (the inputs, on a merge of many large models) and makes
the kernel find a free page for every 4 KiB written. On virtual machines that hand freed memory
back to their host (free page reporting), every such page is a fresh page for the host too, and
the first write to it costs several times the copy: writing a 2.1 GB file through the page cache
took 5.4-8.2 s on this project's machines when its pages were fresh, 0.5-1.0 s when they had just
been used, and 1.4 s through ``O_DIRECT`` either way (docs/benchmarks.md).

Direct I/O wants the file position, the length and the memory address aligned to the file
system's block. A unit's bytes start and end anywhere, so the aligned middle of each write goes
through ``O_DIRECT`` from page-aligned buffers, and the unaligned edges (less than one block at
each end) go through the ordinary descriptor. The two never share a block, so the kernel keeps
them coherent. Where ``O_DIRECT`` is refused (tmpfs, some network file systems, other
platforms) everything goes through the ordinary descriptor. The bytes in the file are the same
either way. ``MECHA_DIRECT_WRITE=0`` in the environment keeps every write in the page cache
(a slow disk then finishes the writes after the merge returns, as it always did).

One thread writes: a worker copies its bytes into one of a few reused buffers and goes back to
computing. A file system serialises writes that allocate blocks (ext4 holds the file's lock
through a direct write into new blocks, the device's time included), so workers writing for
themselves mostly waited for each other; the copy costs what the page cache's copy did. The
unaligned edges go through the same thread for the same reason: written from the workers, each
waited for the file's lock behind a direct write (a weighted sum of two SD1 files: 2.3 s -> 2.9 s).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import queue
import threading
from typing import Any

#: the bytes of one buffer: the largest single direct write (a multiple of any block size used)
_BUFFER = 8 << 20
#: buffers in flight: workers wait for a free one when the device is slower than the merge
_BUFFERS = 4
#: shorter middles go through the page cache (each direct write is a request to the device of
#: its own); a merge's slices are larger: 840 KB of float16 for each slice of a mean of 8 models
_MIN_DIRECT = 64 << 10
_ALIGN = 4096


def pwrite_all(fd: int, data: Any, position: int) -> None:
    """Write all of ``data`` (a bytes-like object) at ``position``: a pwrite may write less
    than asked (a direct one too: it then stops on a block boundary)."""
    view = memoryview(data).cast("B")
    while len(view):
        written = os.pwrite(fd, view, position)
        view, position = view[written:], position + written


class BufferPool:
    """The page-aligned buffers direct writes are copied into, shared by the writers of one
    merge: a folder's shard files are all open at once, and buffers of their own would stay
    resident for each (32 MiB a shard)."""

    def __init__(self, count: int = _BUFFERS):
        self._free: queue.Queue[tuple[mmap.mmap, int]] = queue.Queue()
        for _ in range(count):  # anonymous maps: page-aligned, their pages made on first use
            buffer = mmap.mmap(-1, _BUFFER)
            self._free.put((buffer, ctypes.addressof(ctypes.c_char.from_buffer(buffer))))

    def get(self) -> tuple[mmap.mmap, int]:
        """A free buffer and its address (waits for one)."""
        return self._free.get()

    def put(self, buffer: tuple[mmap.mmap, int]) -> None:
        """Hand a buffer back."""
        self._free.put(buffer)


class OutputWriter:
    """Writes byte ranges of one output file: large ones through ``O_DIRECT`` where the file
    system takes it, from a writer thread of its own; else each caller writes to ``fd``.

    :meth:`write` may be called from any thread; an error of the writer thread is raised by the
    next :meth:`write` or by :meth:`finish`. ``fd`` stays the caller's (it writes the header and
    closes it); :meth:`close` stops the thread and closes the direct descriptor."""

    def __init__(self, fd: int, path: str | None, *, direct: bool = True, pool: BufferPool | None = None):
        self.fd = fd
        self.direct_fd = -1
        self.block = _ALIGN
        self.refused = False  # the kernel refused a direct write: every later one goes through fd
        if direct and path is not None and hasattr(os, "O_DIRECT") and os.environ.get("MECHA_DIRECT_WRITE") != "0":
            try:
                self.block = max(_ALIGN, os.statvfs(path).f_bsize)
                self.direct_fd = os.open(path, os.O_WRONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                self.direct_fd = -1
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if self.direct_fd >= 0:
            self._free = pool if pool is not None else BufferPool()
            self._todo: queue.Queue[tuple[Any, int, int, bool] | None] = queue.Queue()
            self._thread = threading.Thread(target=self._write_forever, name="mecha-writer", daemon=True)
            self._thread.start()

    @property
    def direct(self) -> bool:
        """Whether large writes go past the page cache."""
        return self.direct_fd >= 0 and not self.refused

    def write(self, data: Any, position: int) -> None:
        """Write all of ``data`` (a bytes-like object) at ``position``: done when :meth:`finish`
        returns (at once without a writer thread)."""
        self._raise_failure()
        view = memoryview(data).cast("B")
        if self._thread is None:
            pwrite_all(self.fd, view, position)
            return
        first = min(-(-position // self.block) * self.block, position + len(view))
        last = max((position + len(view)) // self.block * self.block, first)
        direct = last - first >= _MIN_DIRECT
        if not direct:
            first = last = position + len(view)
        if first > position:
            self._queue_copy(view[:first - position], position, False)
        if last > first:
            self._queue_copy(view[first - position:last - position], first, True)
        if position + len(view) > last:
            self._queue_copy(view[last - position:], last, False)

    def _queue_copy(self, view: memoryview, position: int, direct: bool) -> None:
        if len(view) < _ALIGN:  # an edge: a copy of its own
            self._todo.put((bytes(view), len(view), position, False))
            return
        source = _address(view)
        done = 0
        while done < len(view):
            n = min(_BUFFER, len(view) - done)
            buffer, address = self._free.get()
            if source is not None:
                ctypes.memmove(address, source + done, n)  # without the GIL
            else:
                memoryview(buffer)[:n] = view[done:done + n]
            self._todo.put(((buffer, address), n, position + done, direct))
            done += n

    def _write_forever(self) -> None:
        while True:
            item = self._todo.get()
            if item is None:
                return
            data, n, position, direct = item
            pooled = isinstance(data, tuple)
            try:
                if self._error is None:
                    self._write(memoryview(data[0] if pooled else data)[:n], position, direct)
            except BaseException as exc:  # raised in the workers' threads, by write() or finish()
                self._error = exc
            finally:
                if pooled:
                    self._free.put(data)

    def _write(self, view: memoryview, position: int, direct: bool) -> None:
        if direct and not self.refused:
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
        """Wait until everything written so far is in the file; raise the writer's error if any."""
        self._stop()
        self._raise_failure()

    def _stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._todo.put(None)
            thread.join()

    def close(self) -> None:
        """Stop the writer thread (after what was queued) and close the direct descriptor (not ``fd``)."""
        self._stop()
        fd, self.direct_fd = self.direct_fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


def _address(view: memoryview) -> int | None:
    """The address of a contiguous writable buffer's first byte (None for a read-only one)."""
    if view.readonly or not view.c_contiguous or not len(view):
        return None
    return ctypes.addressof(ctypes.c_char.from_buffer(view))
