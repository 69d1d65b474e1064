"""The backend set alone: round-robin choice, up/down with rise and fall, panic, updates."""

from __future__ import annotations

from lb.backends import Backend, BackendPool


def pool_of(n: int, **kwargs: int) -> BackendPool:
    pool = BackendPool(**kwargs)
    pool.update([(f"10.0.0.{i}", 5000) for i in range(1, n + 1)])
    return pool


def picks(pool: BackendPool, n: int) -> list[str]:
    out = []
    for _ in range(n):
        backend = pool.choose()
        assert backend is not None
        out.append(backend.host)
    return out


def test_round_robin_skips_down_backends_evenly() -> None:
    pool = pool_of(3)
    assert picks(pool, 6) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"] * 2
    pool.connect_failed(pool.backends[1], "refused")
    assert picks(pool, 6) == ["10.0.0.1", "10.0.0.3"] * 3


def test_choose_excludes_tried_and_panics_when_all_down() -> None:
    pool = pool_of(3)
    a, b, c = pool.backends
    assert pool.choose([a, b]) is c
    assert pool.choose([a, b, c]) is None
    for backend in pool.backends:
        pool.connect_failed(backend, "refused")
    # Everything is down: still hand them out, in turn.
    assert picks(pool, 3) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    # One up again: it is preferred over the down ones.
    pool.check_passed(b, "ok")
    pool.check_passed(b, "ok")
    assert picks(pool, 3) == ["10.0.0.2"] * 3
    assert pool.choose([b]) in (a, c)


def state(backend: Backend) -> str:
    return "up" if backend.up else "down"


def test_rise_and_fall() -> None:
    pool = pool_of(1, rise=2, fall=3)
    (backend,) = pool.backends
    pool.check_failed(backend, "HTTP 503")
    pool.check_failed(backend, "HTTP 503")
    assert backend.up
    pool.check_passed(backend, "HTTP 200")  # a pass breaks the streak
    pool.check_failed(backend, "HTTP 503")
    pool.check_failed(backend, "HTTP 503")
    assert backend.up
    pool.check_failed(backend, "timeout")
    assert (backend.up, backend.last_check) == (False, "timeout")
    pool.check_passed(backend, "HTTP 200")
    assert state(backend) == "down"
    pool.check_passed(backend, "HTTP 200")
    assert state(backend) == "up"


def test_update_keeps_known_backends_and_their_counters() -> None:
    pool = pool_of(2)
    first = pool.backends[0]
    first.total = 7
    pool.connect_failed(pool.backends[1], "timeout")
    added, removed = pool.update([("10.0.0.1", 5000), ("10.0.0.9", 5000)])
    assert [b.host for b in added] == ["10.0.0.9"]
    assert [b.host for b in removed] == ["10.0.0.2"]
    assert pool.backends[0] is first
    assert first.total == 7
    assert pool.retired_failed_connects == 1
    assert pool.update([("10.0.0.1", 5000), ("10.0.0.9", 5000)]) == ([], [])


def test_one_address_named_twice_is_one_backend_that_keeps_its_state() -> None:
    """Two names of LB_BACKENDS may resolve to one address: one backend, not a new one each
    re-resolution (which came back up every time, a dead backend back in rotation)."""
    pool = BackendPool()
    twice = [("127.0.0.1", 5001), ("127.0.0.2", 5002), ("127.0.0.1", 5001)]
    added, removed = pool.update(twice)
    assert [b.address for b in added] == ["127.0.0.1:5001", "127.0.0.2:5002"]
    assert removed == []
    first = pool.backends[0]
    pool.connect_failed(first, "refused")
    assert pool.update(twice) == ([], [])
    assert pool.backends[0] is first
    assert not first.up
    assert [b.address for b in pool.backends] == ["127.0.0.1:5001", "127.0.0.2:5002"]


def test_address_formats() -> None:
    assert Backend("10.0.0.1", 5000).address == "10.0.0.1:5000"
    assert Backend("::1", 5000).address == "[::1]:5000"
