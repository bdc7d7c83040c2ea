"""Helpers for tests of mecha and of third-party plugins.

- :func:`host_with` builds a plugin host from chosen plugin modules (no entry-point discovery),
  and :func:`using` makes it the process-wide host for a ``with`` block::

      from mecha_core.testing import using, check_plugin
      import my_plugin.plugin

      def test_contract():
          assert check_plugin(my_plugin.plugin) == []

      def test_merge(tmp_path):
          with using(my_plugin.plugin):
              ...  # mecha_core.<method> and mecha_core.merge see exactly this plugin

- :func:`write_checkpoint` writes a small safetensors file.
- :func:`check_plugin` runs the contract checks every plugin should pass.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any, Iterator, Mapping

import torch

from .engine.safetensors_io import save
from .plugins import PluginHost, PluginRecord, plugin_from_functions, use_host  # noqa: F401 (re-exported)


def _record_for(plugin: Any, index: int, name: str | None) -> PluginRecord:
    """The record a plugin would get if discovered: the entry-point name, distribution and version
    when an installed ``mecha`` entry point names this module; else a name from the module."""
    module = getattr(plugin, "__name__", None)
    if module:
        from importlib_metadata import entry_points

        for ep in entry_points(group="mecha"):
            if ep.value == module:
                dist = getattr(ep, "dist", None)
                return PluginRecord(name or ep.name, dist.name if dist else None,
                                    dist.version if dist else None, module=module)
    if name is None:
        parts = (module or f"plugin{index}").split(".")
        # ``my_pkg.plugin`` is named after its package, a lone module after itself
        name = parts[-2] if len(parts) > 1 and parts[-1] == "plugin" else parts[-1]
    return PluginRecord(name, None, None, module=module)


def host_with(*plugins: Any, names: list[str] | None = None, strict: bool = True) -> PluginHost:
    """A host holding exactly ``plugins`` (modules or objects with hook implementations).

    Nothing is discovered through entry points, and environment variables do not filter the list.
    ``names`` overrides the plugin names; ``strict`` (default on) raises on any plugin problem.
    """
    if names is not None and len(names) != len(plugins):
        raise ValueError(f"host_with: {len(plugins)} plugins but {len(names)} names")
    entries = []
    for i, plugin in enumerate(plugins):
        record = _record_for(plugin, i, names[i] if names else None)
        entries.append((record.name, plugin, record))
    return PluginHost(entries, autoload=False, strict=strict)


@contextlib.contextmanager
def using(*plugins: Any) -> Iterator[PluginHost]:
    """``with using(mecha_methods.plugin): ...`` — a host of chosen plugins, made current.

    A single :class:`PluginHost` argument is used as it is.
    """
    host = plugins[0] if len(plugins) == 1 and isinstance(plugins[0], PluginHost) else host_with(*plugins)
    with use_host(host):
        yield host


def write_checkpoint(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
                     metadata: Mapping[str, str] | None = None) -> str:
    """Write ``tensors`` as a safetensors file; returns the path."""
    save(tensors, path, metadata)
    return os.fspath(path)


# -- contract checks ----------------------------------------------------------------------------
def detect_architecture(path: str, keys: frozenset[str], host: PluginHost) -> Any:
    """The architecture ``host`` detects for a file holding ``keys`` (``None`` when none fits);
    ``path`` only names the file in errors. The engine's own detection, for layout tests."""
    from .engine.sources import detect_architecture as detect

    return detect(path, keys, host)


def open_model(path: str | os.PathLike[str], host: PluginHost, *, arch: str | None = None,
               type: str | None = None) -> Any:
    """A model file as the engine sees it once planned: its keys in the canonical layout
    (``.keys``: name -> TensorInfo), ``.arch``, ``.type``, ``.read(key)``; close it with ``.close()``.
    For tests of layouts and converters."""
    from .engine.sources import open_source
    from .recipe.nodes import ModelNode

    path = os.fspath(path)
    return open_source(ModelNode(path, arch, type), path, host)


def read_tensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, copied out of the file (tests compare merges with it)."""
    from .engine.safetensors_io import SafetensorsFile

    f = SafetensorsFile(path)
    try:
        return {k: f.read(k).clone() for k in f.keys}
    finally:
        f.close()


def install_plugin(site: str | os.PathLike[str], module_file: str | os.PathLike[str], *, entry: str,
                   dist: str, version: str = "0.1") -> None:
    """Install a one-module plugin into the folder ``site`` as pip would: the module, and a
    ``.dist-info`` declaring its ``mecha`` entry point ``entry``. With ``site`` on ``sys.path``
    (and ``PYTHONPATH``, for subprocesses), discovery finds it like any installed plugin."""
    import shutil
    from pathlib import Path

    module_file = Path(module_file)
    shutil.copy(module_file, Path(site) / module_file.name)
    info = Path(site) / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[mecha]\n{entry} = {module_file.stem}\n")


def check_plugin(plugin: Any) -> list[str]:
    """Contract problems of a plugin module, as one-line messages (empty when it is fine).

    The plugin is loaded alone, and checked exactly as ``mecha plugins check`` checks installed
    plugins (:mod:`mecha_core.validate`): it imports and declares a supported
    ``MECHA_PLUGIN_API``; every hook returns a list of the right spec type; it provides no name
    twice; every spec passes the load-time contract (field types, known dtypes, blocks and
    classes, aliases, merge spaces, callables, CLI command names); and the check-only rules: each
    merge method has a docstring that mentions every hyperparameter, a name recipes can use, and
    defaults that are recipe values of the annotated type; architectures have keys and block and
    class names recipes can write; model types never detect an empty file.

    Problems of the plugin as a whole are prefixed ``plugin 'NAME': ``; problems of one spec
    start with the spec (``architecture 'tiny': ...``).
    """
    import mecha_core

    host = host_with(plugin, strict=False)
    record = host.records[0]
    if record.status != "ok" and not record.specs:  # it failed before its specs could be read
        return host.problems()
    errors, warnings = host.contract_problems(record, mecha_core.__all__)
    return errors + host._duplicate_problems() + warnings


# -- memory ---------------------------------------------------------------------------------------
def private_bytes(pid: int | str = "self") -> int:
    """A process's private memory, RssAnon + RssShmem from ``/proc/PID/status``, in bytes: file
    pages mapped from the page cache (which the kernel can drop) are not counted."""
    total = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssShmem:")):
                total += int(line.split()[1]) * 1024
    return total


class PeakPrivateMemory:
    """``with PeakPrivateMemory() as memory: ...``: a thread samples this process's private memory
    every ``interval`` seconds while the block runs (and once more as it ends); ``memory.start``
    is the value on entry, ``memory.peak`` the largest seen."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.start = self.peak = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.wait(self.interval):
            self.peak = max(self.peak, private_bytes())

    def __enter__(self) -> "PeakPrivateMemory":
        self.start = self.peak = private_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, private_bytes())


#: on a virtual machine that hands freed memory back to its host (Linux free page reporting),
#: the kilobytes handed back so far
_REPORTED_KIB = "/sys/module/page_reporting/parameters/reported_kib"


def settle_memory(quiet: float = 3.0, limit: float = 60.0) -> float:
    """Wait until the machine has stopped handing freed memory back to its host; returns the
    seconds waited (0 where the kernel does not report free pages).

    Benchmarks call this before each timed run. A virtual machine with free page reporting
    gives the memory a process or a deleted file freed back to its host in bursts, for seconds
    afterwards, on the guest's CPUs: a run started meanwhile competes with that work, and the
    time of a short merge on a 2-core machine varied by half. ``quiet``: seconds without a change
    that count as settled; ``limit``: the longest wait.

    It first writes every dirty page to disk (``sync``): the bench's freshly built inputs, or
    the last run's output, would otherwise be written back during the next timed run and take
    the disk from it (a merge's output goes to the disk directly; engine/direct_write.py)."""
    import os
    import time

    os.sync()
    try:
        with open(_REPORTED_KIB) as f:
            last = f.read()
    except OSError:
        return 0.0
    start = changed = time.monotonic()
    while time.monotonic() - changed < quiet and time.monotonic() - start < limit:
        time.sleep(0.25)
        with open(_REPORTED_KIB) as f:
            now = f.read()
        if now != last:
            last, changed = now, time.monotonic()
    return time.monotonic() - start
