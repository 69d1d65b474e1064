"""The checker on histories whose verdict is known: hand-written ones, a brute-force
reference on tiny random ones, and histories linearizable by construction."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chaos.linearizability import Verdict, check, check_key
from chaos.model import KINDS, STATUSES, Kind, Op, State
from chaos.simulate import Planned, realize, simulate
from tests.chaos.reference import brute_force

UNKNOWN = None


def op(
    kind: Kind, value: str | None, status: int | None, invoke: float,
    complete: float | None = None, *, key: str = "k", p: int = 0,
) -> Op:
    return Op(key, kind, value, status, invoke, complete, p)


def linearizable(*ops: Op, initial: dict[str, State] | None = None) -> bool:
    result = check(ops, initial)
    assert result.verdict is not Verdict.UNKNOWN, result
    return result.ok


# -- hand-written histories ------------------------------------------------------


def test_a_sequential_history_is_accepted_in_its_own_order() -> None:
    history = [
        op("get", None, 404, 0, 1),
        op("set", "a", 201, 2, 3),
        op("set", "x", 409, 4, 5),
        op("get", "a", 200, 6, 7),
        op("edit", "b", 200, 8, 9),
        op("get", "b", 200, 10, 11),
        op("delete", None, 204, 12, 13),
        op("edit", "c", 404, 14, 15),
        op("delete", None, 404, 16, 17),
        op("set", "d", 201, 18, 19),
    ]
    result = check(history)
    assert result.ok
    assert result.keys["k"].linearization == tuple(history)


def test_a_stale_read_after_an_acknowledged_edit_is_rejected() -> None:
    history = [
        op("set", "a", 201, 0, 1),
        op("edit", "b", 200, 2, 3),
        op("get", "a", 200, 4, 5),
    ]
    result = check(history)
    assert result.verdict is Verdict.NOT_LINEARIZABLE
    explanation = result.keys["k"].explanation
    assert explanation is not None
    # The edit cannot go first (the read still needs 'a') and the read cannot go after it.
    assert explanation.blocked == history[1]
    assert explanation.state == "a"
    assert f"yet {history[2].describe()} still has to read it" in str(result)


def test_a_read_overlapping_the_edit_may_still_see_the_old_value() -> None:
    assert linearizable(
        op("set", "a", 201, 0, 1),
        op("edit", "b", 200, 2, 3),
        op("get", "a", 200, 2.5, 5),
    )


def test_two_creates_of_one_key_without_a_delete_between_are_rejected() -> None:
    history = [op("set", "a", 201, 0, 1), op("set", "b", 201, 2, 3)]
    result = check(history)
    assert not result.ok
    explanation = result.keys["k"].explanation
    assert explanation is not None
    assert explanation.blocked == history[1]
    assert dict(explanation.candidates)[history[1]] == (
        "the key holds 'a', so set would answer 409"
    )


def test_two_creates_with_a_concurrent_successful_delete_between_are_accepted() -> None:
    assert linearizable(
        op("set", "a", 201, 0, 1), op("delete", None, 204, 0.5, 2.5), op("set", "b", 201, 2, 3)
    )
    assert not linearizable(
        op("set", "a", 201, 0, 1), op("delete", None, 404, 0.5, 2.5), op("set", "b", 201, 2, 3)
    )


def test_a_read_of_a_value_never_written_is_rejected() -> None:
    result = check([op("set", "a", 201, 0, 1), op("get", "zzz", 200, 0.5, 2)])
    assert not result.ok
    assert "no operation writes 'zzz'" in str(result)


def test_a_not_found_delete_while_the_key_must_exist_is_rejected() -> None:
    assert not linearizable(op("set", "a", 201, 0, 1), op("delete", None, 404, 2, 3))
    assert not linearizable(op("set", "a", 201, 0, 1), op("edit", "b", 404, 2, 3))
    assert not linearizable(op("set", "a", 201, 0, 1), op("get", None, 404, 2, 3))


def test_concurrent_creates_are_fine_in_the_order_the_reads_show() -> None:
    first = [op("set", "a", 201, 0, 5, p=1), op("set", "b", 409, 0, 5, p=2)]
    assert linearizable(*first, op("get", "a", 200, 6, 7))
    assert not linearizable(*first, op("get", "b", 200, 6, 7))
    second = [op("set", "a", 409, 0, 5, p=1), op("set", "b", 201, 0, 5, p=2)]
    assert linearizable(*second, op("get", "b", 200, 6, 7))


def test_reads_during_concurrent_writes_must_agree_on_one_order() -> None:
    writes = [op("set", "a", 201, 0, 1), op("edit", "b", 200, 2, 10, p=1),
              op("edit", "c", 200, 2, 10, p=2)]
    # b then c, or c then b: each alone is fine...
    assert linearizable(*writes, op("get", "b", 200, 3, 4), op("get", "c", 200, 5, 6))
    assert linearizable(*writes, op("get", "c", 200, 3, 4), op("get", "b", 200, 5, 6))
    # ...but not a read of b, then c, then b again: each write takes effect once.
    assert not linearizable(*writes, op("get", "b", 200, 3, 4), op("get", "c", 200, 5, 6),
                            op("get", "b", 200, 7, 8))


def test_an_unknown_write_explains_an_otherwise_impossible_read() -> None:
    base = [op("set", "a", 201, 0, 1), op("get", "b", 200, 3, 4)]
    assert not linearizable(*base)
    assert linearizable(*base, op("edit", "b", UNKNOWN, 2))
    assert linearizable(*base, op("set", "b", UNKNOWN, 2), op("delete", None, UNKNOWN, 2))
    assert not linearizable(op("set", "a", 201, 0, 1), op("get", None, 404, 3, 4))
    assert linearizable(op("set", "a", 201, 0, 1), op("get", None, 404, 3, 4),
                        op("delete", None, UNKNOWN, 2, 2.5))


def test_an_unknown_write_may_take_effect_long_after_the_client_gave_up() -> None:
    assert linearizable(
        op("set", "a", 201, 0, 1),
        op("edit", "b", UNKNOWN, 2, 2.5),  # the client timed out at 2.5
        op("get", "a", 200, 3, 4),
        op("get", "b", 200, 100, 101),
        op("get", "b", 200, 102, 103),
    )


def test_an_unknown_write_may_not_take_effect_before_it_is_invoked() -> None:
    assert not linearizable(
        op("set", "a", 201, 0, 1), op("get", "b", 200, 2, 3), op("edit", "b", UNKNOWN, 5)
    )
    assert not linearizable(
        op("set", "a", 201, 0, 1), op("get", None, 404, 2, 3), op("delete", None, UNKNOWN, 5)
    )


def test_an_unknown_write_takes_effect_at_most_once() -> None:
    assert not linearizable(
        op("set", "a", 201, 0, 1),
        op("edit", "b", UNKNOWN, 2),
        op("get", "b", 200, 3, 4),
        op("edit", "c", 200, 5, 6),
        op("get", "b", 200, 7, 8),
    )


def test_an_unknown_write_may_never_take_effect() -> None:
    assert linearizable(
        op("set", "a", 201, 0, 1), op("edit", "b", UNKNOWN, 2), op("get", "a", 200, 3, 4),
        op("delete", None, UNKNOWN, 5), op("get", "a", 200, 6, 7),
    )


def test_reads_with_no_answer_are_ignored() -> None:
    assert linearizable(op("set", "a", 201, 0, 1), op("get", None, UNKNOWN, 2, 3))


def test_an_op_invoked_at_the_instant_another_completed_counts_as_concurrent() -> None:
    assert linearizable(op("set", "a", 201, 0, 1), op("get", None, 404, 1, 2))
    assert not linearizable(op("set", "a", 201, 0, 1), op("get", None, 404, 1.001, 2))
    assert linearizable(op("set", "a", 201, 0, 1), op("get", "b", 200, 2, 3),
                        op("edit", "b", UNKNOWN, 3))


def test_the_initial_state_is_given_per_key() -> None:
    initial: dict[str, State] = {"k": "x"}
    assert linearizable(op("get", "x", 200, 0, 1), initial=initial)
    assert not linearizable(op("set", "a", 201, 0, 1), initial=initial)
    assert linearizable(op("set", "a", 409, 0, 1), initial=initial)
    assert not linearizable(op("get", "x", 200, 0, 1))
    assert linearizable(op("get", None, 404, 0, 1, key="other"), initial=initial)


def test_keys_are_checked_apart_and_only_the_bad_key_is_named() -> None:
    result = check([
        op("set", "a", 201, 0, 1, key="good"),
        op("set", "a", 201, 0, 1, key="bad"),
        op("get", "b", 200, 2, 3, key="bad"),
        op("get", "a", 200, 2, 3, key="good"),
    ])
    assert not result.ok
    assert [r.key for r in result.failures] == ["bad"]
    assert result.keys["good"].verdict is Verdict.LINEARIZABLE
    assert "key 'bad'" in str(result)


def test_past_the_work_bound_the_verdict_is_unknown_not_a_guess() -> None:
    history = simulate(ops=200, keys=["k"], processes=6, seed=3)
    assert check(history).ok
    result = check(history, max_steps=10)
    assert result.verdict is Verdict.UNKNOWN
    assert not result.ok
    assert result.keys["k"].steps == 10
    assert "unknown" in str(result)


@pytest.mark.parametrize(
    "bad",
    [
        op("get", None, 200, 0, 1),
        op("get", "a", 404, 0, 1),
        op("edit", "a", 201, 0, 1),
        op("delete", None, 409, 0, 1),
        op("set", None, 201, 0, 1),
        op("set", "a", 201, 0, None),
        op("set", "a", 201, 2, 1),
    ],
)
def test_malformed_operations_are_refused(bad: Op) -> None:
    with pytest.raises(ValueError, match=r"."):
        check([bad])


# -- against brute force, on tiny random histories -----------------------------------

VALUES = ("a", "b")


@st.composite
def tiny_histories(draw: st.DrawFn) -> tuple[list[Op], dict[str, State]]:
    ops = []
    for i in range(draw(st.integers(1, 7))):
        kind = draw(st.sampled_from(KINDS))
        status = draw(st.sampled_from((*STATUSES[kind], None)))
        value: str | None = None
        if kind in ("set", "edit") or (kind == "get" and status == 200):
            value = draw(st.sampled_from(VALUES))
        invoke = draw(st.integers(0, 8))
        complete = invoke + draw(st.integers(0, 4))
        ops.append(Op(draw(st.sampled_from(("k", "j"))), kind, value, status, invoke,
                      complete, i))
    initial = {"k": draw(st.sampled_from((None, *VALUES)))}
    return ops, initial


@settings(max_examples=300, deadline=None)
@given(tiny_histories())
def test_agrees_with_brute_force_on_tiny_histories(
    case: tuple[list[Op], dict[str, State]],
) -> None:
    history, initial = case
    result = check(history, initial)
    assert result.verdict is not Verdict.UNKNOWN
    assert result.ok == brute_force(history, initial), result


def test_brute_force_reference_sanity() -> None:
    assert brute_force([op("set", "a", 201, 0, 1), op("get", "a", 200, 2, 3)])
    assert not brute_force([op("set", "a", 201, 0, 1), op("get", "b", 200, 2, 3)])
    assert brute_force([op("set", "a", 201, 0, 1), op("get", "b", 200, 2, 3),
                        op("edit", "b", UNKNOWN, 1.5)])


# -- histories linearizable by construction ------------------------------------------


@st.composite
def plans(draw: st.DrawFn, *, overlap: bool = True, unknown: bool = True) -> list[Planned]:
    """Operations with integer times, so windows often touch and linearization points tie."""
    plan = []
    clock = 0
    for i in range(draw(st.integers(1, 30))):
        kind = draw(st.sampled_from(KINDS))
        if overlap:
            invoke = draw(st.integers(0, 30))
            at = invoke + draw(st.integers(0, 3))
            complete = at + draw(st.integers(0, 3))
        else:
            invoke = clock + draw(st.integers(1, 2))
            at = invoke + draw(st.integers(0, 1))
            complete = at + draw(st.integers(0, 1))
            clock = complete
        plan.append(Planned(
            key=draw(st.sampled_from(("k", "ключ", "🔑"))),
            kind=kind,
            value=f"v{i}" if kind in ("set", "edit") else None,
            invoke=invoke, at=at, complete=complete, process=i,
            unknown=unknown and draw(st.booleans()) and draw(st.booleans()),
            applied=draw(st.booleans()),
        ))
    return plan


@settings(max_examples=150, deadline=None)
@given(plans())
def test_histories_linearizable_by_construction_are_accepted(plan: list[Planned]) -> None:
    result = check(realize(plan))
    assert result.ok, result


def mutations(o: Op) -> list[Op]:
    """Every other definite answer to ``o``'s call (a read also of a value never written)."""
    assert o.status is not None
    ok, refused = STATUSES[o.kind]
    if o.kind == "get":
        others = [dataclasses.replace(o, value="never written", status=ok)]
        if o.status == ok:
            others.append(dataclasses.replace(o, value=None, status=refused))
        return others
    return [dataclasses.replace(o, status=refused if o.status == ok else ok)]


@settings(max_examples=60, deadline=None)
@given(plans(overlap=False, unknown=False))
def test_any_other_answer_in_a_sequential_history_is_rejected(plan: list[Planned]) -> None:
    history = realize(plan)
    for i, original in enumerate(history):
        for mutated in mutations(original):
            assert not check([*history[:i], mutated, *history[i + 1:]]).ok, (original, mutated)


@settings(max_examples=60, deadline=None)
@given(plans())
def test_a_read_of_a_value_never_written_is_always_rejected(plan: list[Planned]) -> None:
    history = realize(plan)
    for i, original in enumerate(history):
        if original.kind == "get" and original.status is not None:
            mutated = dataclasses.replace(original, status=200, value="never written")
            assert not check([*history[:i], mutated, *history[i + 1:]]).ok


@settings(max_examples=60, deadline=None)
@given(plans())
def test_a_read_from_the_future_is_always_rejected(plan: list[Planned]) -> None:
    """A read of a value (written once) whose only write was invoked after the read ended."""
    history = realize(plan)
    for i, read in enumerate(history):
        if read.kind != "get" or read.status is None:
            continue
        assert read.complete is not None
        for write in history:
            if (write.key == read.key and write.kind in ("set", "edit")
                    and write.invoke > read.complete):
                mutated = dataclasses.replace(read, status=200, value=write.value)
                assert not check([*history[:i], mutated, *history[i + 1:]]).ok
                break


@pytest.mark.parametrize("seed", range(4))
def test_large_simulated_histories_are_accepted_and_a_forged_read_is_not(seed: int) -> None:
    history = simulate(ops=1500, keys=[f"k{i}" for i in range(10)], processes=8, seed=seed,
                       unknown_rate=0.05)
    result = check(history)
    assert result.ok, result
    reads = [i for i, o in enumerate(history) if o.kind == "get" and o.status == 200]
    i = reads[len(reads) // 2]
    forged = dataclasses.replace(history[i], value="forged")
    result = check([*history[:i], forged, *history[i + 1:]])
    assert result.verdict is Verdict.NOT_LINEARIZABLE
    assert [r.key for r in result.failures] == [forged.key]
    explanation = result.failures[0].explanation
    assert explanation is not None
    assert explanation.blocked == forged


def test_check_key_of_an_empty_or_unknown_only_history_is_trivially_linearizable() -> None:
    assert check_key("k", []).verdict is Verdict.LINEARIZABLE
    assert check_key("k", [op("set", "a", UNKNOWN, 0, math.inf)]).verdict is (
        Verdict.LINEARIZABLE
    )
