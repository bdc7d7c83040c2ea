"""The one output writer: a checked target, a temporary file beside it, an atomic rename.

Every command that writes a file (``mecha merge``, ``mecha compose``, mecha-lora's writers) goes
through :class:`OutputFile`::

    out = OutputFile(target, protect=[recipe, *models])   # checks the target; nothing written yet
    with out:                                              # the temporary file exists from here
        os.pwrite(out.fd, data, 0)
        out.commit()                                       # mode, close, rename over the target
    # leaving the block without commit() (an error, Ctrl-C, SIGHUP...) removes the temporary file

The temporary file is ``.NAME.mecha-PID-RANDOM.tmp`` beside the target, so a merge killed
where no cleanup can run (SIGKILL, power loss) leaves a file the next merge into that folder
recognises: see :func:`sweep_stale` (which removes the temporary folders of folder outputs,
:mod:`mecha_core.output_folder`, the same way).
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import signal
import stat
import sys
import threading
import time
from typing import Any, Iterable, Mapping, Union

from .errors import OutputError
from .files import os_error_text, special_kind
from .sizes import format_bytes

#: A temporary output: ``.NAME.mecha-PID-RANDOM.tmp`` (NAME cut to 100 bytes).
TEMP_PATTERN = re.compile(r"\.(?P<name>.*)\.mecha-(?P<pid>[0-9]{1,10})-(?P<token>[0-9a-f]{8,32})\.tmp", re.DOTALL)

#: A stale temporary file is removed only when the process that made it is gone from this host
#: and the file was not modified for this long (a merge in flight writes to it all the time; a
#: folder shared with another host may hold that host's merge in progress, whose pid means
#: nothing here).
STALE_AFTER_S = 15 * 60

#: Longest file name most filesystems take (NAME_MAX), in bytes.
NAME_MAX = 255

#: Paths an output must not replace: paths, or {path: how messages name it ("the recipe x.mecha")}.
Protected = Union[Iterable[Union[str, "os.PathLike[str]"]], Mapping[Union[str, "os.PathLike[str]"], str]]


def resolve_output(output: str | os.PathLike[str]) -> str:
    """The absolute path a result is written to: through a symbolic link, as cp does, rather
    than replacing the link."""
    target = os.path.abspath(os.fspath(output))
    return os.path.realpath(target) if os.path.islink(target) else target


def temp_prefix(target: str) -> str:
    """``.NAME.`` for the temporary file beside ``target``, NAME cut to 100 bytes: a legal long
    output name (up to 255 bytes) must not make the temporary name too long to create."""
    name = os.path.basename(target)
    while len(os.fsencode(name)) > 100:
        name = name[:-1]
    return f".{name}."


def output_mode(target: str) -> int:
    """The permission bits for a new output: an existing file's own, else what the umask allows."""
    try:
        return os.stat(target).st_mode & 0o7777
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


def _create_temp(path: str) -> int:
    """A new file at ``path``, readable by its owner only until :meth:`OutputFile.commit`."""
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)


def _same(a: str, b: str) -> bool:
    """Whether two paths name one file (hard links and symbolic links included)."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        try:
            return os.path.realpath(a) == os.path.realpath(b)
        except (OSError, ValueError):
            return False


class OutputFile:
    """A file to write atomically at ``target``; ``protect``: paths it must never replace.

    The constructor checks everything that can be checked before any work (raises
    :class:`~mecha_core.errors.OutputError`, one line naming the path): the target is a new
    name or an existing regular file (or a symbolic link to one, written through); not a
    folder, FIFO, device or socket; its folder exists and can be written; its name fits the
    filesystem; it is none of the ``protect`` paths (compared as files: a hard link or a
    symbolic link to a protected file is refused too; a mapping gives each path the words
    the message names it with, e.g. ``{"t.mecha": "its template t.mecha"}``). ``what`` names the file in messages
    ("output", "composed recipe", ...).

    ``with out:`` creates the temporary file (``fd`` and ``path`` are valid inside);
    :meth:`commit` closes it, gives it the existing output's permission bits (a new output:
    what the umask allows) and renames it over the target. Leaving the block without
    ``commit()`` removes it. While the temporary file exists, signals that would end the
    process without cleanup are turned into :class:`Terminated` (see :class:`TerminateAsInterrupt`).
    """

    def __init__(self, target: str | os.PathLike[str], *, protect: Protected = (),
                 what: str = "output"):
        self.given = os.fspath(target)
        self.what = what
        self.target = self._checked_target(protect)
        self.folder = os.path.dirname(self.target)
        self.fd = -1
        self.path: str | None = None
        self.committed = False
        self._signals: TerminateAsInterrupt | None = None

    # -- checks before any work ------------------------------------------------------------------

    def _fail(self, reason: str) -> OutputError:
        return OutputError(f"{self.given}: {reason}")

    def _checked_target(self, protect: Protected) -> str:
        given = self.given
        if not given or "\0" in given:
            raise OutputError(f"{ascii(given)[:80]}: not a valid {self.what} file name")
        try:
            os.stat(given)
        except FileNotFoundError:
            pass  # a new file, or a symbolic link to a missing one (written through, as cp does)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENAMETOOLONG, errno.ENOTDIR, errno.EACCES):
                raise self._fail(os_error_text(exc)) from None
        target = resolve_output(given)
        name = os.path.basename(target)
        if not name:
            raise self._fail(f"names a folder, not an {self.what} file")
        if len(os.fsencode(name)) > NAME_MAX:
            raise self._fail(f"the file name is {len(os.fsencode(name))} bytes long; at most {NAME_MAX} fit")
        try:
            st = os.stat(target)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise self._fail(os_error_text(exc)) from None
        if st is not None:
            kind = special_kind(st.st_mode)
            if kind == "a folder":
                raise self._fail(f"is a directory; the {self.what} must be a file")
            if kind is not None:
                raise self._fail(f"is {kind}, not a regular file; the {self.what} must be a file")
        folder = os.path.dirname(target)
        try:
            fst = os.stat(folder)
        except FileNotFoundError:
            raise self._fail(f"the folder {folder} does not exist") from None
        except OSError as exc:
            raise self._fail(f"the folder {folder}: {os_error_text(exc)}") from None
        if not stat.S_ISDIR(fst.st_mode):
            raise self._fail(f"{folder} is not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise self._fail(f"cannot write in {folder}: permission denied")
        labels = protect.items() if isinstance(protect, Mapping) else ((p, None) for p in protect)
        for path, label in labels:
            path = os.fspath(path)
            if _same(path, target):
                raise self._fail(f"the {self.what} would overwrite {label or 'the input ' + path}; "
                                 f"choose another path")
        return target

    # -- the temporary file --------------------------------------------------------------------------

    def __enter__(self) -> "OutputFile":
        sweep_stale(self.folder)
        self._signals = TerminateAsInterrupt().__enter__()
        prefix = temp_prefix(self.target)
        try:
            for _ in range(100):
                path = os.path.join(self.folder, f"{prefix}mecha-{os.getpid()}-{secrets.token_hex(6)}.tmp")
                try:
                    self.fd = _create_temp(path)
                except FileExistsError:
                    continue
                self.path = path
                _LIVE.add(path)
                return self
            raise self._fail(f"cannot create a temporary file in {self.folder}")
        except OSError as exc:
            self._signals.__exit__(None, None, None)
            raise self._fail(f"cannot write in {self.folder}: {os_error_text(exc)}") from None
        except BaseException:
            self._signals.__exit__(None, None, None)
            raise

    def commit(self) -> str:
        """Close the temporary file and rename it over the target; returns the target path."""
        if self.path is None or self.committed:
            raise RuntimeError("commit() outside the with block, or twice")
        try:
            closing, self.fd = self.fd, -1  # never closed twice, even when close itself fails
            os.close(closing)
            os.chmod(self.path, output_mode(self.target))
            os.replace(self.path, self.target)
        except OSError as exc:
            raise self._fail(f"writing failed: {os_error_text(exc)}") from None
        _LIVE.discard(self.path)
        self.committed = True
        return self.target

    def __exit__(self, *exc: Any) -> None:
        try:
            if self.fd >= 0:
                closing, self.fd = self.fd, -1
                try:
                    os.close(closing)
                except OSError:
                    pass
            if self.path is not None and not self.committed:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
                _LIVE.discard(self.path)
        finally:
            if self._signals is not None:
                self._signals.__exit__(None, None, None)
                self._signals = None


def write_text_atomically(target: str | os.PathLike[str], text: str, *, protect: Protected = (),
                          what: str = "output") -> str:
    """Write ``text`` (UTF-8, LF line ends) to ``target`` through :class:`OutputFile`; returns the path."""
    out = OutputFile(target, protect=protect, what=what)
    data = text.encode("utf-8")
    with out:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(out.fd, view):]
        except OSError as exc:
            raise OutputError(f"{out.given}: writing failed: {os_error_text(exc)}") from None
        return out.commit()


# -- stale temporary files -------------------------------------------------------------------------

#: Temporary files this process has open: never "stale", whatever their age.
_LIVE: set[str] = set()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    except (OSError, OverflowError):  # no such pid can exist here
        return False
    return True


def sweep_stale(folder: str, *, now: float | None = None) -> list[str]:
    """Remove the temporary files of killed merges from ``folder``; returns the lines it printed.

    A file (or folder) named like a temporary output (:data:`TEMP_PATTERN`) whose process is not running on
    this host and that was not modified for :data:`STALE_AFTER_S` is removed, with one warning
    line on stderr (its name and size). One whose process is gone but that changed recently is
    left alone with a warning (it may be another host's merge into a shared folder). Files of
    running processes are not mentioned. Nothing here stops a merge: errors are ignored.
    """
    now = time.time() if now is None else now
    lines = []
    try:
        names = os.listdir(folder)
    except OSError:
        return lines
    for name in names:
        m = TEMP_PATTERN.fullmatch(name)
        if m is None:
            continue
        path = os.path.join(folder, name)
        if path in _LIVE:
            continue
        pid = int(m.group("pid"))
        if _alive(pid):
            continue
        try:
            st = os.lstat(path)
        except OSError:
            continue
        folder_output = stat.S_ISDIR(st.st_mode)  # the temporary folder of a folder output
        if not (stat.S_ISREG(st.st_mode) or folder_output):
            continue
        shown = ascii(name)[1:-1] if not name.isprintable() else name
        size, mtime = _folder_size(path, st) if folder_output else (st.st_size, st.st_mtime)
        age = now - mtime
        if age >= STALE_AFTER_S:
            try:
                if folder_output:
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
            except OSError:
                continue
            line = (f"warning: removed {os.path.join(folder, shown)} ({format_bytes(size)}), the "
                    f"temporary file of a merge that was killed (process {pid})")
        else:
            line = (f"warning: {os.path.join(folder, shown)} ({format_bytes(size)}) looks like the "
                    f"temporary file of a killed merge (process {pid}); left alone, it changed "
                    f"{age:,.0f} s ago (removed once {STALE_AFTER_S // 60} minutes old)")
        lines.append(line)
        try:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
    return lines


def _folder_size(path: str, st: os.stat_result) -> tuple[int, float]:
    """A temporary folder's size (its files') and latest change (its own or a file's)."""
    size, mtime = 0, st.st_mtime
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                est = entry.stat(follow_symlinks=False)
                size, mtime = size + est.st_size, max(mtime, est.st_mtime)
    except OSError:
        pass
    return size, mtime


# -- signals -------------------------------------------------------------------------------------

def _fatal_signals() -> list[signal.Signals]:
    """Signals whose default action ends the process (without Python's cleanup). SIGPIPE is not
    among them: Python ignores it, and a closed stdout is an EPIPE error on write instead."""
    names = ("SIGHUP", "SIGTERM", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGXCPU", "SIGXFSZ",
             "SIGVTALRM", "SIGPROF")
    return [getattr(signal, n) for n in names if hasattr(signal, n)]


FATAL_SIGNALS = tuple(_fatal_signals())


class Terminated(KeyboardInterrupt):
    """A signal ended the work (SIGTERM, SIGHUP, ...): handled like Ctrl-C (cleanup), reported
    with exit code 128 + the signal number."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class TerminateAsInterrupt:
    """Turns the signals that would end the process without cleanup (:data:`FATAL_SIGNALS`)
    into :class:`Terminated` while the block runs, so ``finally`` blocks remove temporary files.

    Only signals left at their default action (or at the command line's start-up handler, which
    only exits quietly) are taken over (a program embedding mecha keeps its own handlers), only
    in the main thread (Python allows no other), and the previous
    handlers come back on exit. Nested use is fine.
    """

    def __enter__(self) -> "TerminateAsInterrupt":
        self.previous: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return self

        def handler(signum: int, frame: Any) -> None:
            raise Terminated(signum)

        for signum in FATAL_SIGNALS:
            try:
                current = signal.getsignal(signum)
                # the command line's start-up handler (mecha_core.__main__) stands for the default
                if current is signal.SIG_DFL or getattr(current, "mecha_startup", False):
                    self.previous[signum] = signal.signal(signum, handler)
            except (OSError, ValueError):  # not catchable here
                continue
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)
        self.previous = {}
