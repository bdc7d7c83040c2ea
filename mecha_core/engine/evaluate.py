"""Evaluating a compiled plan for one key, or one flat slice of an element-wise key.

Only the plan's steps are read here (methods, input indices, bound hyperparameters), never the
recipe. Every method call is checked: a plugin's exception becomes one line naming the plugin,
the method, the key and the files; so does a result that is not a floating-point tensor of the
key's shape on the merge's device, and a call that wrote into one of its inputs.
"""

from __future__ import annotations

import os
from typing import Any

from ..lazy import torch

from ..errors import MechaError, MergeError, PluginCodeError
from ..method import MergeContext
from . import statistics
from .plan import Plan, Step
from .safetensors_io import is_float, torch_dtype


class Evaluator:
    """Evaluates the compiled graph for one key (optionally one flat slice of it)."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.steps = plan.steps
        self.device = torch.device(plan.options.device)
        self.work_dtype = torch_dtype(plan.options.work_dtype)

    def evaluate(self, key: str, start: int = 0, stop: int | None = None,
                 stats: dict[int, dict[str, Any]] | None = None) -> torch.Tensor:
        """The value of the recipe's root for ``key`` (elements ``start:stop`` of it, flattened).

        Steps run in topological order, iteratively (a recipe may be thousands of steps deep);
        each intermediate is dropped as soon as its last consumer has run. ``stats`` holds the
        whole-key statistics of the steps that declare some (step index -> results), computed
        by :meth:`statistics` when the key is evaluated in slices; without them a step computes
        its own from the tensors it is given.
        """
        return self._run(key, start, stop, stats, None)

    def statistics_steps(self, key: str) -> list[Step]:
        """The steps ``key`` goes through whose method declares statistics, in order."""
        return [s for s in self.steps if s.method is not None and s.method.statistics is not None
                and key in s.table and key not in s.take]

    def statistics(self, key: str, ranges: list[tuple[int, int]]) -> dict[int, dict[str, Any]]:
        """The statistics of every step of ``key`` that declares some, over the slices ``ranges``
        (in passes: each pass evaluates the step's inputs slice by slice)."""
        info = self.plan.output[key]
        found: dict[int, dict[str, Any]] = {}
        for step in self.statistics_steps(key):
            assert step.method is not None and step.method.statistics is not None and step.hyper is not None
            hyper = step.hyper.for_key(key)
            whole = self._context(key)
            n_inputs = len(step.inputs)

            def piece(i: int, step: Step = step) -> tuple[MergeContext, Any]:
                a, b = ranges[i]
                return self._context(key, a, b), self._run(key, a, b, found, step)

            def pieces(step: Step = step) -> Any:
                for i in range(len(ranges)):
                    yield piece(i, step)

            try:
                requests = step.method.statistics(whole, n_inputs, **hyper)
                # the last ties kept that the counts place in a run of pieces are found as the
                # evaluation that follows passes them (statistics.TieSearch), not by evaluating
                # those pieces again now
                found[step.index] = statistics.compute(requests, pieces, info.numel, piece=piece, ranges=ranges)
            except MechaError:
                raise
            except (Exception, SystemExit) as exc:
                raise self._plugin_error(step, key, exc) from exc
        return found

    def _context(self, key: str, start: int = 0, stop: int | None = None) -> MergeContext:
        return MergeContext(key, self.plan.output[key], self.plan.architecture, str(self.device), start, stop)

    def _run(self, key: str, start: int, stop: int | None, stats: dict[int, dict[str, Any]] | None,
             target: Step | None) -> Any:
        """The root's value, or with ``target`` the arguments of that step (in the work dtype)."""
        steps = self.steps
        sliced = stop is not None
        # which steps this key needs: pass-through steps need only the input they pass on
        needed = [False] * len(steps)
        needed[-1 if target is None else target.index] = True
        for step in reversed(steps):
            if not needed[step.index] or step.source is not None:
                continue
            if key in step.take:
                needed[step.inputs[step.take[key]]] = True
            else:
                for j in step.inputs:
                    if key in steps[j].table:
                        needed[j] = True
        remaining = [0] * len(steps)
        for step in steps:
            if needed[step.index] and step.source is None:
                for j in (step.inputs if key not in step.take else [step.inputs[step.take[key]]]):
                    if needed[j]:
                        remaining[j] += 1
        shape = (stop - start,) if sliced else self.plan.output[key].shape
        values: list[Any] = [None] * len(steps)
        for step in steps:
            if target is not None and step.index == target.index:
                return self._arguments(step, values, needed, shape)
            if not needed[step.index]:
                continue
            if step.source is not None:
                values[step.index] = self._leaf(step, key, start, stop)
                continue
            if key in step.take:
                consumed = [step.inputs[step.take[key]]]
                out = values[consumed[0]]
            else:
                assert step.method is not None
                consumed = step.inputs
                args = self._arguments(step, values, needed, shape)
                out = self._call(step, args, key, shape, start, stop,
                                 None if stats is None else stats.get(step.index))
            values[step.index] = out
            for j in consumed:
                if needed[j]:
                    remaining[j] -= 1
                    if remaining[j] == 0:
                        values[j] = None
        return values[-1]

    def _leaf(self, step: Step, key: str, start: int, stop: int | None) -> Any:
        # kept in its stored dtype until a method uses it: a key copied through (a recipe that is
        # one model, --allow-missing) must not lose float64 bits to the float32 work dtype
        assert step.source is not None
        t = step.source.read(key)
        if stop is not None:
            t = t.reshape(-1)[start:stop]
        if is_float(step.table[key].dtype):
            return t.to(device=self.device)
        return t

    def _work(self, value: Any) -> Any:
        """A method's float input, in the work dtype."""
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != self.work_dtype:
            return value.to(dtype=self.work_dtype)
        return value

    def _arguments(self, step: Step, values: list[Any], needed: list[bool], shape: tuple[int, ...]) -> list[Any]:
        assert step.method is not None
        args = []
        for j in step.inputs:
            if needed[j]:
                args.append(self._work(values[j]))
            elif step.method.accepts_missing:
                args.append(None)
            else:  # a delta that does not touch this key: zero difference
                args.append(torch.zeros(shape, dtype=self.work_dtype, device=self.device))
        return args

    def _plugin_error(self, step: Step, key: str, exc: BaseException) -> PluginCodeError:
        """A plugin's exception as one line naming the plugin, the method, the key and the files."""
        assert step.method is not None
        plugin = f"plugin '{step.provider}': " if step.provider else ""
        return PluginCodeError(f"{plugin}method '{step.method.name}' failed on key '{key}'{self._files(step, key)}: "
                               f"{type(exc).__name__}: {_one_line(str(exc))}", plugin=step.provider)

    def _call(self, step: Step, args: list[Any], key: str, shape: tuple[int, ...], start: int = 0,
              stop: int | None = None, stats: dict[str, Any] | None = None) -> torch.Tensor:
        method = step.method
        assert method is not None and step.hyper is not None
        kwargs = step.hyper.for_key(key)
        ctx = self._context(key, start, stop)
        versions = [_version(a) for a in args]
        try:
            if method.statistics is not None:
                if stats is None:  # a whole key: its statistics come from the tensors at hand
                    # (a slice's would be wrong: the scheduler computes them first for sliced keys)
                    assert stop is None, f"{method.name}: statistics of key '{key}' were not computed"
                    requests = method.statistics(ctx, len(args), **kwargs)
                    stats = statistics.compute_whole(requests, ctx, args)
                elif any(isinstance(v, statistics.TieSearch) for v in stats.values()):
                    # a selection whose last tie kept is still searched for: this piece's
                    stats = {name: v.for_piece(ctx, args) if isinstance(v, statistics.TieSearch) else v
                             for name, v in stats.items()}
                kwargs["stats"] = stats
            if method.wants_context:
                kwargs["ctx"] = ctx
            out = method.function(*args, **kwargs)
        except MechaError:
            raise
        except (Exception, SystemExit) as exc:  # plugin code: one line, never a traceback
            raise self._plugin_error(step, key, exc) from exc
        for position, (arg, version) in enumerate(zip(args, versions, strict=True)):
            if version is not None and _version(arg) != version:
                raise MergeError(f"key '{key}': method '{method.name}' modified its input "
                                 f"'{_input_name(step, position)}' in place; methods must return a new tensor")
        problem = _wrong_result(out, shape, self.device)
        if problem:
            raise MergeError(f"key '{key}': method '{method.name}' returned {problem}")
        return out

    def _files(self, step: Step, key: str) -> str:
        """`` (files a.safetensors, b.safetensors)``: the inputs below ``step`` that hold ``key``."""
        below: set[int] = set()
        stack = [step.index]
        while stack:
            i = stack.pop()
            if i not in below:
                below.add(i)
                stack.extend(self.steps[i].inputs)
        names = list(dict.fromkeys(os.path.basename(self.steps[i].source.path) for i in sorted(below)
                                   if self.steps[i].source is not None and key in self.steps[i].table))
        if not names:
            return ""
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        return f" ({'file' if len(names) == 1 else 'files'} {shown})"


def _version(value: Any) -> int | None:
    """A tensor's version counter (torch bumps it on every in-place write), ``None`` for others."""
    if not isinstance(value, torch.Tensor):
        return None
    try:
        return value._version
    except RuntimeError:  # an inference-mode tensor keeps no counter
        return None


def _input_name(step: Step, position: int) -> str:
    assert step.method is not None
    spec = step.method.input_for(position)
    if not spec.variadic:
        return spec.name
    return f"{spec.name}[{position - sum(1 for i in step.method.inputs if not i.variadic)}]"


def _wrong_result(out: Any, shape: tuple[int, ...], device: torch.device) -> str:
    """What is wrong with a method's result, or ``""``."""
    if not isinstance(out, torch.Tensor):
        return f"{type(out).__name__}, not a tensor"
    if not out.is_floating_point():
        return (f"a {str(out.dtype).removeprefix('torch.')} tensor; a method must return floating-point "
                f"values")
    if tuple(out.shape) != tuple(shape):
        return f"shape {list(out.shape)}, expected {list(shape)}"
    if out.device.type != device.type or (device.index is not None and out.device.index != device.index):
        return f"a tensor on {out.device}, expected {device}"
    return ""


def _one_line(text: str, limit: int = 300) -> str:
    """A plugin's exception text in one line of bounded length."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."
