"""What an executor plugin (:class:`mecha_core.specs.Executor`) is built on: the jobs it is given,
the plan of a job and its units, one unit's bytes, one shard of a folder, and the core's atomic
output writers. See :mod:`mecha_core.executors` for how they fit together."""

from __future__ import annotations

from ..executors import (MergeJob, Plan, Progress, Shard, Unit, merge_metadata, open_plan, plan_fingerprint, portable,
                         progress_line, run_locally, single_threaded, unit_output_bytes, unit_writer, work_units,
                         write_file, write_folder, write_shard_file)

__all__ = ["MergeJob", "Plan", "Progress", "Shard", "Unit", "merge_metadata", "open_plan", "plan_fingerprint",
           "portable", "progress_line", "run_locally", "single_threaded", "unit_output_bytes", "unit_writer",
           "work_units", "write_file", "write_folder", "write_shard_file"]
