"""Linearizable histories made up on purpose: for testing and timing the checker.

Every operation gets a linearization point inside its [invoke, complete] window; the
register model is run in that order to fill in the answers, so the history is
linearizable by construction, however much the windows overlap.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from chaos.model import KINDS, STATUSES, Kind, Op, State, apply


@dataclass(frozen=True)
class Planned:
    """An operation before the model has answered it.

    ``at`` is when it takes effect (``invoke <= at <= complete``).  With ``unknown`` the
    client never learns the outcome; ``applied`` says whether it took effect at all.
    """

    key: str
    kind: Kind
    value: str | None
    invoke: float
    at: float
    complete: float
    process: int = 0
    unknown: bool = False
    applied: bool = True


def realize(plan: Iterable[Planned], initial: Mapping[str, State] | None = None) -> list[Op]:
    """The history the plan produces, in invocation order."""
    states: dict[str, State] = dict(initial or {})
    ops: list[Op] = []
    # A stable sort: equal linearization points take effect in plan order.
    for p in sorted(plan, key=lambda p: p.at):
        if not p.invoke <= p.at <= p.complete:
            raise ValueError(f"takes effect outside its window: {p}")
        state = states.get(p.key)
        if p.unknown:
            if p.applied:
                states[p.key] = apply(state, _as_op(p, None, p.value if p.kind != "get" else None))
            ops.append(_as_op(p, None, None if p.kind == "get" else p.value))
            continue
        status, value, new = _answer(state, p)
        states[p.key] = new
        ops.append(_as_op(p, status, value))
    ops.sort(key=lambda op: op.invoke)
    return ops


def _answer(state: State, p: Planned) -> tuple[int, State, State]:
    ok, refused = STATUSES[p.kind]
    present = state is not None
    if p.kind == "get":
        return (ok, state, state) if present else (refused, None, state)
    if p.kind == "set":
        return (refused, p.value, state) if present else (ok, p.value, p.value)
    if not present:
        return refused, p.value, state
    return ok, p.value, (p.value if p.kind == "edit" else None)


def _as_op(p: Planned, status: int | None, value: str | None) -> Op:
    return Op(p.key, p.kind, value, status, p.invoke, p.complete, p.process)


def simulate(
    *,
    ops: int,
    keys: Sequence[str],
    processes: int,
    seed: int,
    unknown_rate: float = 0.0,
    weights: Sequence[float] = (3, 4, 2, 1),
) -> list[Op]:
    """A random linearizable history of ``ops`` operations by ``processes`` clients, each
    doing one call at a time with random latency; written values are unique.

    ``weights`` are for set, get, edit and delete.  A fraction ``unknown_rate`` of calls
    lose their answer (half of those still take effect); their client carries on as a
    new process, as a client that gave up on a request would.
    """
    rng = random.Random(seed)
    clock = [rng.random() for _ in range(processes)]
    names = list(range(processes))
    next_name = processes
    plan: list[Planned] = []
    for n in range(ops):
        p = n % processes
        invoke = clock[p] + rng.expovariate(20)
        at = invoke + rng.expovariate(10)
        complete = at + rng.expovariate(10)
        kind = rng.choices(KINDS, weights)[0]
        value = f"v{n}" if kind in ("set", "edit") else None
        lost = rng.random() < unknown_rate
        plan.append(Planned(rng.choice(keys), kind, value, invoke, at, complete, names[p],
                            unknown=lost, applied=rng.random() < 0.5))
        clock[p] = complete
        if lost:
            names[p] = next_name
            next_name += 1
    return realize(plan)
