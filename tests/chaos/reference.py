"""A brute-force linearizability check: every order, no cleverness.  Exponential, so only
for tiny histories, where it is the reference the real checker is compared with."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

from chaos.model import Illegal, Op, State, apply


def brute_force(history: Iterable[Op], initial: Mapping[str, State] | None = None) -> bool:
    by_key: dict[str, list[Op]] = defaultdict(list)
    for op in history:
        by_key[op.key].append(op)
    return all(_key_ok(ops, (initial or {}).get(key)) for key, ops in by_key.items())


def _key_ok(ops: list[Op], initial: State) -> bool:
    # Unknown reads change nothing and promise nothing; unknown writes may be left out.
    ops = [op for op in ops if not (op.unknown and op.kind == "get")]

    def must_precede(a: Op, b: Op) -> bool:
        return not a.unknown and a.complete is not None and a.complete < b.invoke

    def search(remaining: frozenset[int], state: State) -> bool:
        if all(ops[i].unknown for i in remaining):
            return True
        for i in remaining:
            if any(must_precede(ops[j], ops[i]) for j in remaining if j != i):
                continue
            try:
                after = apply(state, ops[i])
            except Illegal:
                continue
            if search(remaining - {i}, after):
                return True
        return False

    return search(frozenset(range(len(ops))), initial)
