"""Stopping the bench's load from another thread: what Ctrl-C does to a measuring thread, with
real child processes."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator

import pytest

from bench import load

#: A load that says it started (one byte on the descriptor it is given), then runs for a minute.
STARTS_THEN_RUNS = "import os, sys, time; os.write(int(sys.argv[1]), b'x'); time.sleep(60)"


@pytest.fixture(autouse=True)
def loads_allowed_after() -> Iterator[None]:
    yield
    load.allow_loads()


def test_a_load_runs_and_its_output_is_kept() -> None:
    done = load.run_load([sys.executable, "-c", "print('42 requests')"], timeout=30)
    assert (done.returncode, done.stdout) == (0, "42 requests\n")


def test_stopping_cuts_a_running_load_and_refuses_the_next() -> None:
    started_r, started_w = os.pipe()
    outcome: list[BaseException | None] = []

    def measure() -> None:
        try:
            load.run_load([sys.executable, "-c", STARTS_THEN_RUNS, str(started_w)], timeout=120,
                          pass_fds=(started_w,))
        except BaseException as exc:  # the thread reports what ended it
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=measure)
    thread.start()
    try:
        assert os.read(started_r, 1) == b"x"  # the load runs
        load.stop_loads()
        thread.join(timeout=30)
        assert not thread.is_alive()  # cut, not run for its minute
        assert len(outcome) == 1
        assert isinstance(outcome[0], load.Stopped)
        assert "cut short" in str(outcome[0])
        # Another load is not started at all (its start would write to the pipe).
        with pytest.raises(load.Stopped, match="not started"):
            load.run_load([sys.executable, "-c", STARTS_THEN_RUNS, str(started_w)],
                          timeout=120, pass_fds=(started_w,))
        os.close(started_w)
        started_w = -1
        assert os.read(started_r, 1) == b""  # nobody else ever wrote
    finally:
        thread.join(timeout=30)
        os.close(started_r)
        if started_w != -1:
            os.close(started_w)


def test_a_stopped_bench_is_not_taken_for_a_failed_section() -> None:
    # The section handler catches Exception (a failed section is reported, the next one runs).
    assert not issubclass(load.Stopped, Exception)


def test_loads_are_allowed_again_for_a_new_run() -> None:
    load.stop_loads()
    load.allow_loads()
    assert load.run_load([sys.executable, "-c", "pass"], timeout=30).returncode == 0
