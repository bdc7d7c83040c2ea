"""The ``ray`` executor. Light on purpose: Ray is imported only when a merge runs on it."""

from __future__ import annotations

from typing import Any, Sequence

from mecha_core import hookimpl
from mecha_core.specs import Executor

MECHA_PLUGIN_API = 1


def run(jobs: Sequence[Any]) -> list[str]:
    from .executor import run_jobs

    return run_jobs(jobs)


@hookimpl
def mecha_executors() -> list:
    return [Executor("ray", run=run, settings=("address",),
                     description="Ray tasks on a cluster (--ray-address; inputs on storage every node sees)")]
