"""The connect step runs without a Task (lb.pipe._Driven): it is scheduled, resumed and cancelled
as a Task would be, and a pipe that ends mid-connect ends it."""

from __future__ import annotations

import asyncio
from typing import Any

from lb.pipe import _Driven
from tests.lb.lbkit import (
    Blackhole,
    connect,
    eventually,
    how_it_ends,
    lb_config,
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


async def test_cancel_cancels_the_awaited_future_and_the_coroutine_sees_it() -> None:
    loop = asyncio.get_running_loop()
    awaited: asyncio.Future[None] = loop.create_future()
    waiting = loop.create_future()
    raised: list[BaseException] = []

    async def body() -> None:
        waiting.set_result(None)
        try:
            await awaited
        except asyncio.CancelledError as exc:
            raised.append(exc)
            raise

    ended = Ended()
    driven = _Driven(loop, body(), ended)
    await waiting
    driven.cancel()
    await ended.wait()
    assert awaited.cancelled()
    assert len(raised) == 1
    assert ended.calls == 1


async def test_a_coroutine_that_catches_the_cancel_goes_on_uncancelled() -> None:
    """What the connect step does on a timeout: catch CancelledError and try the next backend.
    That next attempt must not be cancelled too, even when cancel() came twice."""
    loop = asyncio.get_running_loop()
    first: asyncio.Future[str] = loop.create_future()
    second: asyncio.Future[str] = loop.create_future()
    waiting = loop.create_future()
    retrying = loop.create_future()
    got: list[str] = []

    async def body() -> None:
        waiting.set_result(None)
        try:
            got.append(await first)
        except asyncio.CancelledError:
            got.append("cancelled")
        retrying.set_result(None)
        got.append(await second)

    ended = Ended()
    driven = _Driven(loop, body(), ended)
    await waiting
    driven.cancel()
    driven.cancel()  # twice is once
    await retrying
    assert not second.cancelled()
    second.set_result("second attempt")
    await ended.wait()
    assert got == ["cancelled", "second attempt"]


async def test_a_cancelled_end_is_quiet() -> None:
    """A connect step given up is no error: nothing reaches the loop's exception handler."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    awaited: asyncio.Future[None] = loop.create_future()
    waiting = loop.create_future()

    async def body() -> None:
        waiting.set_result(None)
        await awaited

    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        ended = Ended()
        driven = _Driven(loop, body(), ended)
        await waiting
        driven.cancel()
        await ended.wait()
        # The handler would be called from the same step that ended the coroutine.
    finally:
        loop.set_exception_handler(previous)
    assert reported == []


async def test_cancel_after_the_future_completed_still_cancels() -> None:
    """As with a Task: the future is done but has not resumed the coroutine yet, so the
    coroutine gets CancelledError, not the result (a connect that completes as its timeout
    fires is abandoned, and the transport it made closed)."""
    loop = asyncio.get_running_loop()
    awaited: asyncio.Future[str] = loop.create_future()
    waiting = loop.create_future()
    got: list[Any] = []

    async def body() -> None:
        waiting.set_result(None)
        try:
            got.append(await awaited)
        except asyncio.CancelledError as exc:
            got.append(exc)

    ended = Ended()
    driven = _Driven(loop, body(), ended)
    await waiting
    awaited.set_result("too late")
    driven.cancel()
    await ended.wait()
    assert len(got) == 1
    assert isinstance(got[0], asyncio.CancelledError)


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
    loop = asyncio.get_running_loop()
    reported: asyncio.Future[BaseException] = loop.create_future()

    def handler(_: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if not reported.done():
            reported.set_result(context["exception"])

    async def body() -> None:
        raise ValueError("from the connect step")

    previous = loop.get_exception_handler()
    loop.set_exception_handler(handler)
    try:
        ended = Ended()
        driven = _Driven(loop, body(), ended)
        await ended.wait()
        async with asyncio.timeout(5):
            exc = await reported
    finally:
        loop.set_exception_handler(previous)
    assert driven.finished
    assert ended.calls == 1
    assert isinstance(exc, ValueError)
    assert str(exc) == "from the connect step"


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
