"""Run a whole-tensor algorithm over slices of a key: the algorithm is written once, element-wise
on whatever piece it is given, and asks :class:`Scalars` for the whole-key reductions it needs
(sums, per-column sums, exact top-k selections). Its statistics are found by replaying it:

1. replayed on an empty piece with the results known so far, it stops at the first reductions
   it lacks (:class:`Missing`): those become the next statistics (``mecha_core.Total``/``TopK``),
   computed by the engine in a pass over the key's slices, each slice replaying the algorithm up
   to that point to produce the values to reduce;
2. a ``mecha_core.Then`` repeats this with the new results, until the replay runs through;
3. the method itself replays it on each slice with every result known, and returns its value.

Which reductions come next may depend only on the results so far (a tolerance test, an
iteration count), never on a piece's values: the empty replay must take the real one's path.
Sums are float64 over the whole key; an algorithm rounds them to its own dtype (mergekit
reduces in float32, so its scalars can differ from these in the last bit).
"""

from __future__ import annotations

from typing import Any, Callable

import attrs
from mecha_core.lazy import torch

from mecha_core import Then, TopK, Total

Algorithm = Callable[..., Any]  # (tensors, hyper, ctx, scalars) -> tensor


class Missing(Exception):
    """A replay reached whole-key reductions not known yet: name -> (kind, values, k or per)."""

    def __init__(self, wanted: dict[str, tuple[str, Callable[[], Any], int]]) -> None:
        super().__init__(", ".join(wanted))
        self.wanted = wanted


class Scalars:
    """The whole-key reductions an algorithm asks for, by name (a name is one value for the key)."""

    def __init__(self, known: dict[str, Any]) -> None:
        self.known = known

    def sums(self, **values: Callable[[], Any]) -> list[float]:
        """The float64 sums over the key of each ``values()`` (a tensor of the piece)."""
        return self._get({name: ("sum", fn, 0) for name, fn in values.items()})

    def sums_per(self, per: int, **values: Callable[[], Any]) -> list[Any]:
        """The float64 sums of each ``values()`` per flat index modulo ``per`` (per column)."""
        return self._get({name: ("per", fn, per) for name, fn in values.items()})

    def top(self, name: str, k: int, values: Callable[[], Any]) -> Any:
        """The exact selection (``mecha_core.Selection``) of the ``k`` largest ``|values()|``,
        equal magnitudes by the lower flat index."""
        return self._get({name: ("top", values, k)})[0]

    def _get(self, wanted: dict[str, tuple[str, Callable[[], Any], int]]) -> list[Any]:
        missing = {name: what for name, what in wanted.items() if name not in self.known}
        if missing:
            raise Missing(missing)
        return [self.known[name] for name in wanted]


def replay(algorithm: Algorithm, tensors: tuple, hyper: dict[str, Any], ctx: Any, known: dict[str, Any]) -> Any:
    return algorithm(tensors, hyper, ctx, Scalars(known))


def statistics_of(algorithm: Algorithm):
    """The ``statistics=`` function of a method running ``algorithm`` over slices."""

    def statistics(ctx, inputs, **hyper):
        return _stage(algorithm, ctx, inputs, hyper, {})

    return statistics


def _stage(algorithm: Algorithm, ctx: Any, count: int, hyper: dict[str, Any], known: dict[str, Any]) -> list:
    empty = tuple(torch.zeros(0) for _ in range(count))
    try:
        replay(algorithm, empty, hyper, attrs.evolve(ctx, start=0, stop=0), known)
        return []
    except Missing as missing:
        wanted = missing.wanted
    last: dict[str, Any] = {}  # the last piece's replay: one per piece for every request of the stage

    def values(name: str, ctx: Any, inputs: tuple) -> Any:
        where = (ctx.start, ctx.stop)
        if last.get("where") != where:
            last.clear()
            try:
                replay(algorithm, tuple(inputs), hyper, ctx, known)
                raise AssertionError("the replay of a piece ran past a reduction the empty one needed")
            except Missing as found:
                last.update(where=where, wanted=found.wanted)
        return last["wanted"][name][1]()

    requests: list[Any] = []
    for name, (kind, _, n) in wanted.items():
        def of(ctx, *inputs, name=name):
            return values(name, ctx, inputs)

        if kind == "top":
            requests.append(TopK(name, of, n))
        else:
            requests.append(Total(name, of, per=n if kind == "per" else 0))
    requests.append(Then(lambda got: _stage(algorithm, ctx, count, hyper, {**known, **got})))
    return requests
