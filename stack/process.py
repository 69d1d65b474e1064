"""One supervised child process: started, its output prefixed, restarted on failure, stopped.

The restart policy is compose.yaml's (``condition: on-failure, delay: 5s, max_attempts: 3,
window: 120s``): only a non-zero exit is restarted, after the delay, and at most
``max_attempts`` times within any ``window`` seconds; past that the process stays down and
says so, as a container does.

Each child runs in its own session, so a Ctrl-C in the terminal reaches the supervisor
alone and the supervisor decides the order in which children stop.  On Linux each child also
asks the kernel for SIGTERM when the supervisor dies (``PR_SET_PDEATHSIG``), so a supervisor
killed with SIGKILL leaves no replica or balancer behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

# Wide enough for "load_balancer" and "backend-12", so the columns line up.
NAME_WIDTH = 13


def exit_status(code: int | None) -> str:
    """A child's exit as the log says it: Popen's -N is the signal that killed it."""
    if code is None:
        return "exited (status unknown)"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


class Output:
    """Lines from every child, each prefixed by its name, to one stream."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout

    def line(self, name: str, text: str) -> None:
        try:
            self.stream.write(f"{name:<{NAME_WIDTH}}| {text.rstrip()}\n")
            self.stream.flush()
        except (OSError, ValueError):
            # The reader went away (a closed pipe; EIO from a hung-up terminal); the stack
            # still stops, silently.
            pass


_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child receive ``sig`` when its parent dies (Linux).

    The kernel sends it when the *thread* that forked the child exits, so spawn from a
    thread that lives as long as the supervisor (the event loop's).  None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        # The parent may have died between fork() and prctl(): then no signal would come.
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return preexec


@dataclass
class RestartPolicy:
    """on-failure with at most ``max_attempts`` restarts in ``window`` seconds."""

    max_attempts: int = 3
    window: float = 120.0
    delay: float = 5.0
    _attempts: deque[float] = field(default_factory=deque, init=False, repr=False)

    def allow(self, now: float | None = None) -> bool:
        """May the process be restarted now? Counts the attempt when it may."""
        now = time.monotonic() if now is None else now
        while self._attempts and now - self._attempts[0] >= self.window:
            self._attempts.popleft()
        if len(self._attempts) >= self.max_attempts:
            return False
        self._attempts.append(now)
        return True


class Child:
    """A command run, watched and restarted by the supervisor.

    ``start()`` spawns it; ``supervise()`` (a task the supervisor owns) waits for each exit
    and applies the policy; ``stop()`` sends SIGTERM and, after the deadline, SIGKILL.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        output: Output,
        policy: RestartPolicy,
        *,
        on_end: Callable[[Child], None] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env)
        self.output = output
        self.policy = policy
        #: Called when the child has ended for good while not being stopped: it exited with
        #: status 0 (not restarted, as compose's on-failure) or its restart policy gave up.
        self.on_end = on_end
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.exit_codes: list[int] = []
        self.gave_up = False  # the restart policy gave up on it
        self.ended = False  # it will not run again: gave up, or exited 0 (not restarted)
        self.started = asyncio.Event()  # set at every (re)start; cleared at exit
        self._stopping = False
        self._pump: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        proc = self.proc
        return proc.pid if proc is not None and proc.returncode is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def log(self, text: str) -> None:
        self.output.line(self.name, text)

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
        self._pump = asyncio.create_task(self._copy_output(self.proc), name=f"{self.name}-output")
        if self._stopping:  # stop() ran while this restart was being spawned
            self.signal(signal.SIGKILL)
            return
        self.started.set()

    async def _copy_output(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while True:
            try:
                raw = await proc.stdout.readline()
            except ValueError:  # a line longer than the stream's limit: take what is there
                raw = await proc.stdout.read(65536)
            if not raw:
                return
            self.log(raw.decode("utf-8", "replace"))

    async def _wait_exit(self) -> int:
        proc = self.proc
        assert proc is not None
        code = await proc.wait()
        if self._pump is not None:
            # The pipe reaches EOF when the child and anything it spawned have closed it.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._pump), 2.0)
        self.started.clear()
        return code

    async def supervise(self) -> None:
        """Wait for each exit and restart on failure, within the policy, until stopped."""
        while True:
            code = await self._wait_exit()
            self.exit_codes.append(code)
            if self._stopping:
                return
            if code == 0:
                self.log("exited with status 0; not restarted (restart policy: on-failure)")
                self._end()
                return
            if not self.policy.allow():
                self.gave_up = True
                self.log(
                    f"{exit_status(code)}; not restarted: {self.policy.max_attempts} "
                    f"restarts within {self.policy.window:g}s already"
                )
                self._end()
                return
            self.log(f"{exit_status(code)}; restarting in {self.policy.delay:g}s")
            await asyncio.sleep(self.policy.delay)
            if self.stopping:  # stop() may have run during the delay
                return
            self.restarts += 1
            await self.start()

    def _end(self) -> None:
        self.ended = True
        if self.on_end is not None:
            self.on_end(self)

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the child's whole process group (it leads its own session)."""
        pid = self.pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, sig)

    @property
    def stopping(self) -> bool:
        return self._stopping

    def prevent_restart(self) -> None:
        """From now on an exit is final (the first step of every shutdown)."""
        self._stopping = True

    async def stop(self, timeout: float, force: asyncio.Event | None = None) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout`` (or at once when ``force`` is set).

        No restart happens after this is called. Returns the exit status, if it ran."""
        self._stopping = True
        proc = self.proc
        if proc is None:
            return None
        if proc.returncode is None:
            self.signal(signal.SIGTERM)
            waiter = asyncio.ensure_future(proc.wait())
            forced = asyncio.ensure_future(force.wait()) if force is not None else None
            waits: list[asyncio.Future[Any]] = [waiter, *([forced] if forced else [])]
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if forced is not None:
                forced.cancel()
            if proc.returncode is None:
                if force is not None and force.is_set():
                    self.log("still running, and the stop is forced: SIGKILL")
                else:
                    self.log(f"still running {timeout:g}s after SIGTERM: SIGKILL")
                self.signal(signal.SIGKILL)
            await waiter
        # Anything the child left in its group goes with it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if self._pump is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._pump), 2.0)
            if not self._pump.done():
                self._pump.cancel()
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL now, as a crash would (the policy then restarts it): for tests."""
        self.signal(signal.SIGKILL)
