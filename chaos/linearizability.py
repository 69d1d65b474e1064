"""A linearizability checker for the variables API: one register per key.

Keys are independent registers, and linearizability is compositional (Herlihy & Wing's
locality), so a history is linearizable iff each key's sub-history is: every key is
checked alone, which keeps each search small.

Per key the search is Wing & Gong's, with Lowe's memoisation (as in Knossos and
Porcupine): a depth-first walk over the order in which operations take effect.  At each
step the candidates are the operations already invoked but not yet placed, up to the
earliest response still outstanding — that response's operation must take effect before
anything invoked after it.  A candidate is placed if the register could have given its
answer from the current state; when no candidate fits, the search backtracks.

Operations with an unknown outcome (timeouts, resets, 504 on a write) have no response:
they may take effect at any moment after their invocation, or never.  They are never
required, and they are placed only right before a definite operation that could not take
effect without them (one or two at a time, which is enough; see ``chains``), so a history
whose uncertain writes did not happen is accepted without ever trying them.

Pruning: a configuration is (definite ops placed, unknown ops placed, state); one whose
definite set and state were already reached with a *subset* of its unknown ops is skipped,
since the earlier one had every option this one has.  Values that no read returned are all
one value to the search (only reads tell values apart), and the key may not leave a value
for good while reads of it are still to be placed.

Work is bounded by ``max_steps`` candidate placements per key; past it the key's verdict
is UNKNOWN (neither proven nor refuted), never a guess.
"""

from __future__ import annotations

import bisect
import enum
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from chaos.model import STATUSES, Op, State, apply

DEFAULT_MAX_STEPS = 2_000_000
"""Candidate placements allowed per key: a few seconds of search on a busy core."""


class Verdict(enum.Enum):
    LINEARIZABLE = "linearizable"
    NOT_LINEARIZABLE = "not linearizable"
    UNKNOWN = "unknown: the work bound was reached before a proof either way"


@dataclass(frozen=True)
class Explanation:
    """Where the deepest attempt at a linearization got stuck.

    After ``placed`` (in that order) the key held ``state``; ``blocked`` had to take effect
    before its response, but neither it nor any other open operation could take effect
    next (``candidates`` says why for each definite one).
    """

    key: str
    placed: tuple[Op, ...]
    state: State
    blocked: Op
    candidates: tuple[tuple[Op, str], ...]
    open_unknown: int
    writers: tuple[Op, ...] = ()
    """When ``blocked`` is a read of a value: every write of that value in the history."""

    def __str__(self) -> str:
        lines = [f"key {self.key!r}: no linearization places this operation:",
                 f"  {self.blocked.describe()}"]
        shown = self.placed[-8:]
        skipped = len(self.placed) - len(shown)
        lines.append(
            f"after {len(self.placed)} operations took effect"
            + (f" (the last {len(shown)} shown)" if skipped else "")
            + f", the key holds {show_state(self.state)}:"
        )
        lines += [f"  {op.describe()}" for op in shown]
        lines.append("and no open operation can take effect next:")
        lines += [f"  {op.describe()}: {why}" for op, why in self.candidates]
        if self.open_unknown:
            lines.append(f"  (plus {self.open_unknown} unknown-outcome writes, tried too)")
        if self.blocked.kind == "get" and self.blocked.value is not None:
            lines.append(f"the writes of {self.blocked.value!r}:"
                         if self.writers else f"no operation writes {self.blocked.value!r}")
            lines += [f"  {op.describe()}" for op in self.writers]
        return "\n".join(lines)


@dataclass(frozen=True)
class KeyResult:
    key: str
    verdict: Verdict
    definite_ops: int
    unknown_ops: int
    steps: int
    explanation: Explanation | None = None
    linearization: tuple[Op, ...] | None = None
    """One order in which the ops took effect (unknown ops that never did are left out)."""


@dataclass(frozen=True)
class CheckResult:
    verdict: Verdict
    keys: dict[str, KeyResult] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.verdict is Verdict.LINEARIZABLE

    @property
    def failures(self) -> list[KeyResult]:
        return [r for r in self.keys.values() if r.verdict is not Verdict.LINEARIZABLE]

    @property
    def steps(self) -> int:
        return sum(r.steps for r in self.keys.values())

    def __str__(self) -> str:
        head = f"{self.verdict.value} ({len(self.keys)} keys, {self.steps} search steps)"
        parts = [head]
        for r in self.failures:
            if r.explanation is not None:
                parts.append(str(r.explanation))
            else:
                parts.append(f"key {r.key!r}: {r.verdict.value} after {r.steps} steps "
                             f"({r.definite_ops} definite, {r.unknown_ops} unknown ops)")
        return "\n".join(parts)


def check(
    history: Iterable[Op],
    initial: Mapping[str, State] | None = None,
    *,
    max_steps: int = DEFAULT_MAX_STEPS,
) -> CheckResult:
    """Is ``history`` linearizable, every key starting from ``initial`` (absent if not named)?

    Raises ValueError for an op that is malformed (a status that is not a definite answer
    to its call, a definite op without a completion time, …).
    """
    by_key: dict[str, list[Op]] = defaultdict(list)
    for op in history:
        op.validate()
        by_key[op.key].append(op)
    initial = initial or {}
    results = {
        key: check_key(key, ops, initial.get(key), max_steps=max_steps)
        for key, ops in sorted(by_key.items())
    }
    verdicts = {r.verdict for r in results.values()}
    if Verdict.NOT_LINEARIZABLE in verdicts:
        verdict = Verdict.NOT_LINEARIZABLE
    elif Verdict.UNKNOWN in verdicts:
        verdict = Verdict.UNKNOWN
    else:
        verdict = Verdict.LINEARIZABLE
    return CheckResult(verdict, results)


# Compact op encoding for the search loop: kind codes and answer flags.
_SET, _GET, _EDIT, _DELETE = range(4)
_KIND_CODE = {"set": _SET, "get": _GET, "edit": _EDIT, "delete": _DELETE}
_UNKNOWN = -1
UNREAD = "\x00a value no read returned"
"""Stands for every value no read returned (NUL cannot be in a real value)."""
_FAIL = object()


def _step(state: State, kind: int, ok: int, value: State) -> object:
    """The state after the op, or _FAIL; a fast twin of ``model.apply``."""
    present = state is not None
    if ok == _UNKNOWN:
        if kind == _SET:
            return state if present else value
        if kind == _EDIT:
            return value if present else state
        return None  # delete; unknown gets never reach the search
    if kind == _GET:
        if ok:
            return state if present and state == value else _FAIL
        return _FAIL if present else state
    if kind == _SET:
        if ok == present:
            return _FAIL
        return value if ok else state
    if ok != present:
        return _FAIL
    if kind == _EDIT:
        return value if ok else state
    return None if ok else state


class _Frame:
    """One configuration on the search path, and the moves from it still to try."""

    __slots__ = ("applied", "blocker", "chained", "depth", "horizon", "i", "moves", "placed",
                 "state", "unknown_set")

    def __init__(
        self, moves: list[tuple[int, ...]], blocker: int, horizon: int, state: State,
        placed: int, unknown_set: int, applied: tuple[int, ...], depth: int,
    ) -> None:
        self.moves = moves
        self.chained = False
        self.blocker = blocker
        self.horizon = horizon
        self.i = 0
        self.state = state
        self.placed = placed
        self.unknown_set = unknown_set
        self.applied = applied
        self.depth = depth


def check_key(
    key: str, ops: Sequence[Op], initial: State = None, *, max_steps: int = DEFAULT_MAX_STEPS
) -> KeyResult:
    """The search for one key's sub-history (all ``ops`` must be on ``key``)."""
    definite = [op for op in ops if op.status is not None]
    # A read whose answer never came constrains nothing and changes nothing.
    unknown = sorted((op for op in ops if op.status is None and op.kind != "get"),
                     key=lambda op: op.invoke)
    nd, nu = len(definite), len(unknown)
    if nd == 0:
        return KeyResult(key, Verdict.LINEARIZABLE, 0, nu, 0, linearization=())

    # Candidate ids: definite ops are 0..nd-1, unknown ops nd..nd+nu-1.
    all_ops = definite + unknown
    kinds = [_KIND_CODE[op.kind] for op in all_ops]
    oks = [_UNKNOWN if op.status is None else int(op.status == STATUSES[op.kind][0])
           for op in all_ops]
    # Only reads see values; writes see presence.  So every value no definite read returned
    # can be one and the same value, which makes writes of such values interchangeable: this
    # is what keeps many pending unknown-outcome writes from multiplying the search.
    read = {op.value for op in definite if op.kind == "get" and op.value is not None}
    values = [op.value if op.value is None or op.value in read else UNREAD for op in all_ops]
    real_initial = initial
    if initial is not None and initial not in read:
        initial = UNREAD

    # Who reads and who writes each read value.  Once the key leaves value v, v can only
    # come back through a write of v not yet placed; when there is none, every read of v
    # must already be placed.  Values are usually written once, so this cuts off at once the
    # branches that let a write be overwritten before the reads that saw it.
    readers: dict[State, int] = defaultdict(int)
    writers: dict[State, int] = defaultdict(int)
    for c, op in enumerate(all_ops):
        if op.kind == "get" and op.value is not None:
            readers[op.value] |= 1 << c
        elif op.kind in ("set", "edit") and op.value in read:
            writers[op.value] |= 1 << c

    # Definite ops' calls and responses, in time order, as a doubly linked list (entry 0 is
    # the head, entry 2*nd+1 the tail).  At equal times calls come first: an op invoked at
    # the instant another completed is taken as concurrent with it, the lenient reading.
    events: list[tuple[float, int, int]] = []
    for j, op in enumerate(definite):
        assert op.complete is not None  # Op.validate() holds definite ops to it
        events += [(op.invoke, 0, j), (op.complete, 1, j)]
    events.sort()
    n_entries = 2 * nd + 2
    tail = n_entries - 1
    nxt = list(range(1, n_entries + 1))
    prv = list(range(-1, n_entries - 1))
    entry_op = [-1] * n_entries
    entry_is_return = [False] * n_entries
    entry_time = [0.0] * n_entries
    call_entry = [0] * nd
    return_entry = [0] * nd
    for pos, (t, is_return, j) in enumerate(events, start=1):
        entry_op[pos] = j
        entry_time[pos] = t
        entry_is_return[pos] = bool(is_return)
        if is_return:
            return_entry[j] = pos
        else:
            call_entry[j] = pos
    entry_is_return[tail] = True
    entry_time[tail] = float("inf")
    unknown_invokes = [op.invoke for op in unknown]

    def lift(j: int) -> None:
        for e in (call_entry[j], return_entry[j]):
            nxt[prv[e]] = nxt[e]
            prv[nxt[e]] = prv[e]

    def unlift(j: int) -> None:
        for e in (return_entry[j], call_entry[j]):
            nxt[prv[e]] = e
            prv[nxt[e]] = e

    def open_definite() -> tuple[list[tuple[int, ...]], int, int]:
        """Moves placing one open definite op; the op whose response is the earliest still
        outstanding; how many unknown ops were invoked by then (they may go first)."""
        moves: list[tuple[int, ...]] = []
        e = nxt[0]
        while not entry_is_return[e]:
            moves.append((entry_op[e],))
            e = nxt[e]
        return moves, entry_op[e], bisect.bisect_right(unknown_invokes, entry_time[e])

    def chains(frame: _Frame) -> list[tuple[int, ...]]:
        """Moves placing one or two unknown ops right before an open definite op that could
        not take effect without them.

        Enough for completeness: in any linearization, unknown ops placed before a definite
        op that would succeed anyway can move past it (they have no deadline, and it leaves
        the state alike), and unknown ops before one that needs them can be cut down to at
        most two of them with the same net effect (delete then set v, set x then edit v),
        the rest left unplaced.  Of pending ops with the same effect the earliest stands
        for all: both are invoked, so either can go wherever the other could.
        """
        state, taken = frame.state, frame.unknown_set
        delete = -1
        sets: dict[State, int] = {}
        edits: dict[State, int] = {}
        for u in range(frame.horizon):
            if (taken >> u) & 1:
                continue
            c = nd + u
            if kinds[c] == _DELETE:
                if delete < 0:
                    delete = c
            else:
                sets_or_edits = sets if kinds[c] == _SET else edits
                sets_or_edits.setdefault(values[c], c)
        if delete < 0 and not sets and not edits:
            return []
        moves: list[tuple[int, ...]] = []
        present = state is not None
        for (d,) in frame.moves[: frame.i]:
            if _step(state, kinds[d], oks[d], values[d]) is not _FAIL:
                continue
            kind, ok = kinds[d], oks[d]
            if kind == _GET and ok:
                v = values[d]
                if present:
                    if v in edits:
                        moves.append((edits[v], d))
                    if delete >= 0 and v in sets:
                        moves.append((delete, sets[v], d))
                else:
                    if v in sets:
                        moves.append((sets[v], d))
                    if v in edits:
                        moves += [(x, edits[v], d) for value, x in sets.items() if value != v]
            elif (kind == _GET or (kind == _SET) == bool(ok)) and present:
                if delete >= 0:  # it needs the key absent
                    moves.append((delete, d))
            elif not present:  # it needs the key present
                moves += [(x, d) for x in sets.values()]
        return moves

    seen: dict[tuple[int, State], list[int]] = {(0, initial): [0]}
    moves, blocker, horizon = open_definite()
    stack = [_Frame(moves, blocker, horizon, initial, 0, 0, (), 0)]
    steps = 0
    deepest: Explanation | None = None
    deepest_depth = -1

    while stack:
        frame = stack[-1]
        if frame.i == len(frame.moves):
            if not frame.chained:
                frame.chained = True
                frame.moves += chains(frame)
                continue
            if frame.depth > deepest_depth:
                deepest_depth = frame.depth
                deepest = _explain(key, stack, all_ops, nd, oks, values, readers, writers,
                                   real_initial)
            stack.pop()
            if frame.applied:
                unlift(frame.applied[-1])
            continue
        move = frame.moves[frame.i]
        frame.i += 1
        steps += 1
        if steps > max_steps:
            return KeyResult(key, Verdict.UNKNOWN, nd, nu, steps - 1)
        placed, unknown_set = frame.placed, frame.unknown_set
        state: object = frame.state
        for c in move:
            new = _step(state, kinds[c], oks[c], values[c])  # type: ignore[arg-type]
            if new is _FAIL:
                break
            if c < nd:
                placed |= 1 << c
            else:
                unknown_set |= 1 << (c - nd)
            if new != state and state in readers:
                done = placed | (unknown_set << nd)
                if readers[state] & ~done and not writers[state] & ~done:
                    new = _FAIL
                    break
            state = new
        if new is _FAIL:
            continue
        assert state is None or isinstance(state, str)
        config = (placed, state)
        subsets = seen.get(config)
        if subsets is None:
            seen[config] = [unknown_set]
        else:
            if any(s & ~unknown_set == 0 for s in subsets):
                continue
            subsets[:] = [s for s in subsets if unknown_set & ~s != 0]
            subsets.append(unknown_set)
        lift(move[-1])
        depth = frame.depth + 1
        if depth == nd:
            order = [c for f in stack[1:] for c in f.applied] + list(move)
            return KeyResult(key, Verdict.LINEARIZABLE, nd, nu, steps,
                             linearization=tuple(all_ops[c] for c in order))
        moves, blocker, horizon = open_definite()
        stack.append(_Frame(moves, blocker, horizon, state, placed, unknown_set, move, depth))

    return KeyResult(key, Verdict.NOT_LINEARIZABLE, nd, nu, steps, explanation=deepest)


def _explain(
    key: str, stack: list[_Frame], all_ops: list[Op], nd: int, oks: list[int],
    values: list[State], readers: Mapping[State, int], writes: Mapping[State, int],
    initial: State,
) -> Explanation:
    frame = stack[-1]
    placed = tuple(all_ops[c] for f in stack[1:] for c in f.applied)
    # The search may stand one token for all unread values; replaying the placed ops with
    # their real values names the value the key really held.
    real_state = initial
    for op in placed:
        real_state = apply(real_state, op)
    done = frame.placed | (frame.unknown_set << nd)
    reasons: list[tuple[Op, str]] = []
    for move in frame.moves:
        if len(move) > 1:
            continue
        c = move[0]
        op = all_ops[c]
        new = _step(frame.state, _KIND_CODE[op.kind], oks[c], values[c])
        stranded = readers.get(frame.state, 0) & ~(done | 1 << c)
        if new is _FAIL:
            reasons.append((op, _why(real_state, op)))
        elif new != frame.state and stranded and not writes.get(frame.state, 0) & ~done:
            first = all_ops[(stranded & -stranded).bit_length() - 1]
            reasons.append((op, f"it would overwrite {show_state(real_state)} for good, "
                                f"yet {first.describe()} still has to read it"))
        else:
            reasons.append((op, "could take effect here, but every way on from it fails"))
    open_unknown = sum(1 for u in range(frame.horizon) if not (frame.unknown_set >> u) & 1)
    blocked = all_ops[frame.blocker]
    writers: tuple[Op, ...] = ()
    if blocked.kind == "get" and blocked.value is not None:
        writers = tuple(op for op in all_ops
                        if op.kind in ("set", "edit") and op.value == blocked.value)
    return Explanation(key, placed, real_state, blocked, tuple(reasons), open_unknown, writers)


def show_state(state: State) -> str:
    return "nothing (absent)" if state is None else repr(state)


def _why(state: State, op: Op) -> str:
    holds = f"the key holds {show_state(state)}"
    if op.kind == "get":
        return holds
    answer = STATUSES[op.kind][0] if state is not None else 404
    if op.kind == "set":
        answer = 409 if state is not None else 201
    return f"{holds}, so {op.kind} would answer {answer}"
