"""The per-key register the variables API promises, and one recorded operation on it.

Each key is an independent register that is either absent (``None``) or holds a string.
The four calls and their definite answers:

========  ==========================================  ==============================
call      success                                     refusal
========  ==========================================  ==============================
set v     201: was absent, now holds v                409: was present, unchanged
get       200 v: holds v                              404: absent
edit v    200: was present, now holds v               404: absent, unchanged
delete    204: was present, now absent                404: absent, unchanged
========  ==========================================  ==============================

An operation whose answer never came, or whose answer does not say whether the write
happened (a timeout, a reset connection, a 504 on a write), has ``status=None``: it may
have taken effect at any moment after its invocation, or never.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypeAlias

Kind: TypeAlias = Literal["set", "get", "edit", "delete"]
State: TypeAlias = str | None
"""A register's state: its value, or None when the key is absent."""

KINDS: tuple[Kind, ...] = ("set", "get", "edit", "delete")
WRITES: frozenset[Kind] = frozenset({"set", "edit", "delete"})

#: The definite answers of each call: (success, refusal).
STATUSES: dict[Kind, tuple[int, int]] = {
    "set": (201, 409),
    "get": (200, 404),
    "edit": (200, 404),
    "delete": (204, 404),
}


class Illegal(Exception):
    """The register cannot give this answer from this state."""


@dataclass(frozen=True, slots=True)
class Op:
    """One call as a client saw it.

    ``value`` is the value written (set, edit) or the value read (get answered 200);
    ``status`` is the definite HTTP answer, or None when the outcome is unknown.
    ``invoke``/``complete`` are ``time.monotonic()`` readings taken just before the request
    left and just after the answer arrived; ``complete`` is ignored when the outcome is
    unknown, because such a write may take effect arbitrarily late.
    """

    key: str
    kind: Kind
    value: str | None
    status: int | None
    invoke: float
    complete: float | None
    process: int = 0

    @property
    def unknown(self) -> bool:
        return self.status is None

    @property
    def is_write(self) -> bool:
        return self.kind in WRITES

    @property
    def succeeded(self) -> bool:
        """A definite success (201, 200 or 204): for a write, an acknowledged write."""
        return self.status is not None and self.status == STATUSES[self.kind][0]

    def validate(self) -> None:
        """Raise ValueError for an op the register could never be asked about."""
        if self.kind not in STATUSES:
            raise ValueError(f"unknown kind {self.kind!r} in {self}")
        if self.kind in ("set", "edit") and self.value is None:
            raise ValueError(f"{self.kind} without a value: {self}")
        if self.status is None:
            return
        if self.status not in STATUSES[self.kind]:
            raise ValueError(f"{self.status} is not a definite answer to {self.kind}: {self}")
        if self.complete is None:
            raise ValueError(f"a definite answer needs a completion time: {self}")
        if self.complete < self.invoke:
            raise ValueError(f"completes before it is invoked: {self}")
        if self.kind == "get" and (self.status == 200) != (self.value is not None):
            raise ValueError(f"a get answered 200 carries the value read, a 404 none: {self}")

    def describe(self) -> str:
        """``set('k', 'a') -> 201`` style, as a person reads a history."""
        if self.kind == "get":
            call = f"get({self.key!r})"
            answer = "?" if self.status is None else (
                f"200 {self.value!r}" if self.status == 200 else str(self.status)
            )
        elif self.kind == "delete":
            call = f"delete({self.key!r})"
            answer = "?" if self.status is None else str(self.status)
        else:
            call = f"{self.kind}({self.key!r}, {self.value!r})"
            answer = "?" if self.status is None else str(self.status)
        end = "…" if self.status is None or self.complete is None else f"{self.complete:.6f}"
        return f"{call} -> {answer}  [{self.invoke:.6f}, {end}] p{self.process}"


def apply(state: State, op: Op) -> State:
    """The state after ``op``; raise Illegal if its definite answer contradicts ``state``.

    An unknown-outcome op cannot be contradicted: it does what the register would do.
    """
    present = state is not None
    kind = op.kind
    if op.status is None:
        if kind == "set":
            return op.value if not present else state
        if kind == "edit":
            return op.value if present else state
        if kind == "delete":
            return None
        return state
    ok = op.status == STATUSES[kind][0]
    if kind == "get":
        if ok != present or (ok and state != op.value):
            raise Illegal(f"the key holds {state!r}")
        return state
    if kind == "set":
        if ok == present:
            raise Illegal(f"the key holds {state!r}, so set answers {409 if present else 201}")
        return op.value if ok else state
    if ok != present:
        expected = STATUSES[kind][0] if present else 404
        raise Illegal(f"the key holds {state!r}, so {kind} answers {expected}")
    if kind == "edit":
        return op.value if ok else state
    return None
