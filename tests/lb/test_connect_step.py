"""The connect step runs without a Task (lb.pipe._Driven): it is scheduled, resumed and cancelled
as a Task would be, and a pipe that ends mid-connect ends it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

from lb.pipe import _Driven
from tests.lb.lbkit import (
    Blackhole,
    connect,
    eventually,
    how_it_ends,
    lb_config,
    reset,
    running_lb,
    tcp_states,
)


class Ended:
    """The ``on_end`` of a driven coroutine: a future to await, and how often it was called."""

    def __init__(self) -> None:
        self.calls = 0
        self.future: asyncio.Future[_Driven] = asyncio.get_running_loop().create_future()

    def __call__(self, driven: _Driven) -> None:
        self.calls += 1
        if not self.future.done():
            self.future.set_result(driven)

    async def wait(self) -> _Driven:
        async with asyncio.timeout(5):
            return await self.future


class Awaiting:
    """A driven coroutine that awaits one future, and then (with ``then``) a second one, as the
    connect step does when it tries the next backend; it records what each await gave or
    raised. With ``reraise``, a CancelledError from the first await ends it."""

    def __init__(self, *, reraise: bool = True, then: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self.first: asyncio.Future[str] = loop.create_future()
        self.second: asyncio.Future[str] | None = loop.create_future() if then else None
        self.at_first: asyncio.Future[None] = loop.create_future()
        self.at_second: asyncio.Future[None] = loop.create_future()
        self.reraise = reraise
        self.got: list[object] = []
        self.ended = Ended()

    async def body(self) -> None:
        self.at_first.set_result(None)
        try:
            self.got.append(await self.first)
        except asyncio.CancelledError as exc:
            self.got.append(exc)
            if self.reraise:
                raise
        if self.second is not None:
            self.at_second.set_result(None)
            self.got.append(await self.second)

    async def start(self) -> _Driven:
        """The driver, once the coroutine waits at its first await."""
        driven = _Driven(asyncio.get_running_loop(), self.body(), self.ended)
        async with asyncio.timeout(5):
            await self.at_first
        return driven


@contextlib.contextmanager
def loop_errors() -> Iterator[list[dict[str, Any]]]:
    """What reaches the running loop's exception handler meanwhile."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        yield reported
    finally:
        loop.set_exception_handler(previous)


async def test_steps_run_from_the_loop_each_future_resumes_it_and_no_task_is_made() -> None:
    loop = asyncio.get_running_loop()
    tasks = asyncio.all_tasks()
    answer: asyncio.Future[str] = loop.create_future()
    started = loop.create_future()
    seen: list[str] = []

    async def body() -> None:
        started.set_result(None)
        seen.append(await answer)
        await asyncio.sleep(0)  # a bare yield
        seen.append("after a bare yield")

    ended = Ended()
    driven = _Driven(loop, body(), ended)
    assert not started.done()  # never inside the caller
    await started
    assert asyncio.all_tasks() == tasks
    answer.set_result("answer")
    assert await ended.wait() is driven
    assert driven.finished
    assert ended.calls == 1
    assert seen == ["answer", "after a bare yield"]
    driven.cancel()  # once ended, nothing to cancel
    assert ended.calls == 1


async def test_cancelled_before_its_first_step_it_never_runs() -> None:
    ran = False

    async def body() -> None:
        nonlocal ran
        ran = True

    ended = Ended()
    driven = _Driven(asyncio.get_running_loop(), body(), ended)
    driven.cancel()
    await ended.wait()
    assert not ran
    assert driven.finished
    assert ended.calls == 1


async def test_cancel_cancels_the_awaited_future_and_a_cancelled_end_is_quiet() -> None:
    """A connect step given up is no error: nothing reaches the loop's exception handler."""
    coroutine = Awaiting()
    with loop_errors() as reported:
        driven = await coroutine.start()
        driven.cancel()
        await coroutine.ended.wait()
    assert coroutine.first.cancelled()
    assert len(coroutine.got) == 1
    assert isinstance(coroutine.got[0], asyncio.CancelledError)
    assert coroutine.ended.calls == 1
    assert reported == []


async def test_a_coroutine_that_catches_the_cancel_goes_on_uncancelled() -> None:
    """What the connect step does on a timeout: catch CancelledError and try the next backend.
    That next attempt must not be cancelled too, even when cancel() came twice."""
    coroutine = Awaiting(reraise=False, then=True)
    driven = await coroutine.start()
    driven.cancel()
    driven.cancel()  # twice is once
    async with asyncio.timeout(5):
        await coroutine.at_second
    assert coroutine.second is not None
    assert not coroutine.second.cancelled()
    coroutine.second.set_result("second attempt")
    await coroutine.ended.wait()
    assert isinstance(coroutine.got[0], asyncio.CancelledError)
    assert coroutine.got[1:] == ["second attempt"]


async def test_cancel_after_the_future_completed_still_cancels() -> None:
    """As with a Task: the future is done but has not resumed the coroutine yet, so the
    coroutine gets CancelledError, not the result (a connect that completes as its timeout
    fires is abandoned, and the transport it made closed)."""
    coroutine = Awaiting(reraise=False)
    driven = await coroutine.start()
    coroutine.first.set_result("too late")
    driven.cancel()
    await coroutine.ended.wait()
    assert len(coroutine.got) == 1
    assert isinstance(coroutine.got[0], asyncio.CancelledError)


async def test_cancelled_while_it_runs_the_next_future_it_awaits_is_cancelled() -> None:
    loop = asyncio.get_running_loop()
    awaited: asyncio.Future[None] = loop.create_future()
    drivers: list[_Driven] = []
    raised: list[BaseException] = []

    async def body() -> None:
        drivers[0].cancel()  # the pipe ended from inside the connect step
        try:
            await awaited
        except asyncio.CancelledError as exc:
            raised.append(exc)
            raise

    ended = Ended()
    drivers.append(_Driven(loop, body(), ended))
    await ended.wait()
    assert awaited.cancelled()
    assert len(raised) == 1


async def test_an_exception_ends_it_and_reaches_the_loop_s_handler() -> None:
    async def body() -> None:
        raise ValueError("from the connect step")

    ended = Ended()
    with loop_errors() as reported:
        driven = _Driven(asyncio.get_running_loop(), body(), ended)
        await ended.wait()
    assert driven.finished
    assert ended.calls == 1
    # The exception left the same callback that ended the coroutine: it was reported at once.
    (context,) = reported
    assert isinstance(context["exception"], ValueError)
    assert str(context["exception"]) == "from the connect step"


async def test_a_stop_while_a_connect_hangs_ends_the_connect() -> None:
    """At the drain deadline, a pipe still connecting is ended with its connect step: the
    half-open socket to the backend is closed, the client's connection ends, and the backend
    is not blamed (the connect did not fail, it was given up)."""
    async with Blackhole() as hole:
        config = lb_config(hole.address, connect_timeout=30.0, check_interval=60.0,
                           check_timeout=0.2)
        async with running_lb(config) as lb:
            # The first health check's connect hangs too: counts are taken once it timed out.
            await eventually(lambda: lb.pool.backends[0].checks_failed >= 1)
            syn_sent = tcp_states(hole.port).get("SYN_SENT", 0)
            reader, writer = await connect(lb.port)
            writer.write(b"never delivered")
            await writer.drain()
            await eventually(lambda: tcp_states(hole.port).get("SYN_SENT", 0) == syn_sent + 1)
            (pipe,) = lb.pipes
            assert pipe.upstream is None
        # running_lb's exit stopped the balancer with a drain deadline of one second.
        assert pipe.end == "drain deadline"
        await eventually(lambda: tcp_states(hole.port).get("SYN_SENT", 0) == syn_sent)
        async with asyncio.timeout(5):
            got, _ = await how_it_ends(reader)
        assert got == 0
        totals = lb.stats()["totals"]
        assert totals["accepted_connections"] == 1
        assert totals["finished_connections"] == 1
        assert totals["failed_connects"] == 0
        writer.close()


async def test_a_client_leaving_while_its_connect_hangs_is_let_go_when_the_connect_ends() -> None:
    """The client is not read from until a backend accepts, so its reset is seen only when the
    connect step ends: its slot is held for at most the connect timeouts it may wait through."""
    async with Blackhole() as hole:
        config = lb_config(hole.address, connect_timeout=1.0, connect_retries=0,
                           check_interval=60.0, check_timeout=0.2)
        async with running_lb(config) as lb:
            await eventually(lambda: lb.pool.backends[0].checks_failed >= 1)
            _reader, writer = await connect(lb.port)
            writer.write(b"never delivered")
            await writer.drain()
            await eventually(lambda: bool(lb.pipes))
            (pipe,) = lb.pipes
            reset(writer)
            await eventually(lambda: not lb.pipes, timeout=5)
            assert pipe.end == "no backend accepted"
            totals = lb.stats()["totals"]
            assert totals["finished_connections"] == 1
            assert totals["failed_connects"] == 1
