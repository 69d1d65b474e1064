"""``make run``'s life and death for real: hang-ups, a supervisor killed with SIGKILL, a signal
while the database is still starting, and a part the stack cannot serve without that ends.

Every test runs ``python -m stack`` as a subprocess and checks, with psutil, that whatever it
started is gone at the end (or, for SIGKILL, what the next start finds and stops).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from chaos.system import free_port_run
from tests.deploy.supervised import ROOT, Supervisor, request

READY = "Ctrl-C (or SIGTERM) stops everything"


def postmasters(data_dir: Path) -> list[psutil.Process]:
    """Every PostgreSQL server running on ``data_dir`` (whoever started it)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "-D" in cmdline and cmdline[cmdline.index("-D") + 1:][:1] == [str(data_dir)]:
            found.append(proc)
    return found


def on_other_ports(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a second stack on the same data directory: its own ports, no admin."""
    port = free_port_run(2)
    return env | {"LB_PORT": str(port), "LB_ADMIN_PORT": "0",
                  "STACK_BACKEND_PORT": str(port + 1)}


def running(proc: psutil.Process) -> bool:
    """Not exited: an orphan's zombie waits for PID 1 to reap it, which takes its time."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def one_replica_env(stack_env: dict[str, str]) -> dict[str, str]:
    return stack_env | {"SERVER_COUNT": "1"}


@pytest.fixture
def pgdata(stack_env: dict[str, str]) -> Iterator[Path]:
    """The data directory the stack's PostgreSQL uses; any server left on it is killed."""
    path = Path(stack_env["STACK_DATA_DIR"]).resolve() / "pgdata"
    yield path
    for proc in postmasters(path):
        proc.kill()


def test_sighup_to_the_process_group_stops_everything_in_order(
    one_replica_env: dict[str, str], pgdata: Path
) -> None:
    # A closed terminal or a dropped SSH session: SIGHUP to the foreground process group
    # (make and the supervisor; the children are in sessions of their own).
    sup = Supervisor(one_replica_env, new_session=True)
    try:
        sup.wait_for(READY, timeout=90)
        started = sup.processes()
        assert len(started) >= 3  # a replica, the balancer, PostgreSQL (and its workers)
        os.killpg(sup.proc.pid, signal.SIGHUP)
        assert sup.proc.wait(60) == 0, sup.log()
        log = sup.log()
        assert "SIGHUP: stopping" in log
        order = [log.index(s) for s in ("stopping load_balancer", "stopping 1 replica(s)",
                                        "stopping the database", "stack        | stopped")]
        assert order == sorted(order), log
        _gone, alive = psutil.wait_procs(started, timeout=5)
        assert not alive, f"left running: {alive}"
    finally:
        sup.close()


@pytest.mark.slow
def test_after_a_sigkill_the_children_die_and_the_next_start_stops_the_orphaned_database(
    one_replica_env: dict[str, str], pgdata: Path
) -> None:
    sup = Supervisor(one_replica_env)
    again: Supervisor | None = None
    try:
        sup.wait_for(READY, timeout=90)
        python_children = [p for p, command in sup.commands() if "-m" in command]
        assert len(python_children) == 2, python_children  # the replica and the balancer
        [postmaster] = postmasters(pgdata)
        sup.proc.kill()
        sup.proc.wait(10)
        # PR_SET_PDEATHSIG: the replica and the balancer get SIGTERM, and drain and exit.
        _gone, alive = psutil.wait_procs(python_children, timeout=15)
        assert not alive, f"left running: {alive}"
        # PostgreSQL cannot be tied to the supervisor's life: it is left, an orphan.
        assert running(postmaster)
        assert postmaster.ppid() != sup.proc.pid

        again = Supervisor(one_replica_env)
        line = again.wait_for(f"PostgreSQL (pid {postmaster.pid}) left running on {pgdata}",
                              timeout=30)
        assert "stopping it" in line
        again.wait_for(f"the orphaned PostgreSQL (pid {postmaster.pid}) has stopped", timeout=30)
        again.wait_for(READY, timeout=90)
        assert not running(postmaster)
        assert request(int(one_replica_env["LB_PORT"]), "GET", "/healthcheck")[0] == 200
        started = again.processes()
        again.proc.send_signal(signal.SIGTERM)
        assert again.proc.wait(60) == 0, again.log()
        _gone, alive = psutil.wait_procs(started, timeout=5)
        assert not alive, f"left running: {alive}"
    finally:
        if again is not None:
            again.close()
        sup.close()  # after the second start: it would kill what that one must find


@pytest.mark.slow
def test_a_live_stack_s_database_is_not_taken_for_an_orphan(
    one_replica_env: dict[str, str], pgdata: Path
) -> None:
    first = Supervisor(one_replica_env)
    try:
        first.wait_for(READY, timeout=90)
        [postmaster] = postmasters(pgdata)
        # A second stack on the same data directory, on other ports: refused, not "reclaimed".
        second = Supervisor(on_other_ports(one_replica_env))
        try:
            assert second.proc.wait(60) == 1, second.log()
            assert (f"STACK_DATA_DIR {pgdata.parent} is in use by another stack "
                    f"(pid {first.proc.pid})") in second.log()
        finally:
            second.close()
        assert running(postmaster)
        first.proc.send_signal(signal.SIGTERM)
        assert first.proc.wait(60) == 0, first.log()
    finally:
        first.close()


@pytest.mark.parametrize("phase", ["initdb", "postmaster"])
def test_a_signal_while_the_database_starts_leaves_nothing_running(
    one_replica_env: dict[str, str], pgdata: Path, phase: str
) -> None:
    sup = Supervisor(one_replica_env)
    try:
        if phase == "initdb":  # the data directory is new: initdb runs for a second or two
            sup.wait_for("database: embedded PostgreSQL", timeout=30)
        else:  # the server process is there, not yet accepting (or creating the database)
            while not postmasters(pgdata) and sup.proc.poll() is None:
                time.sleep(0.01)  # no event to await: the server is not ours to watch
        sup.proc.send_signal(signal.SIGTERM)
        assert sup.proc.wait(60) == 0, sup.log()
        assert "varstack is ready" not in sup.log()
        assert postmasters(pgdata) == [], sup.log()
    finally:
        sup.close()


def test_a_replica_exiting_0_is_not_restarted_and_the_balancer_exiting_0_stops_the_stack(
    stack_env: dict[str, str], pgdata: Path
) -> None:
    sup = Supervisor(stack_env)
    try:
        sup.wait_for(READY, timeout=90)
        started = sup.processes()
        first = int(stack_env["STACK_BACKEND_PORT"])
        sup.replica(first).terminate()  # drains, exits 0
        sup.wait_for("backend-1    | exited with status 0; not restarted", timeout=20)
        sup.wait_for("backend-1 will not run again; 1 of 2 replica(s) left", timeout=5)
        assert sup.proc.poll() is None
        [balancer] = [p for p, command in sup.commands() if command[-2:] == ["-m", "lb"]]
        balancer.terminate()  # someone SIGTERMs the balancer: it drains and exits 0
        assert sup.proc.wait(60) == 1, sup.log()
        log = sup.log()
        assert ("load_balancer will not run again (it exited with status 0): stopping the "
                "stack") in log
        assert "stopping 1 replica(s)" in log  # the one still running, not both
        _gone, alive = psutil.wait_procs(started, timeout=5)
        assert not alive, f"left running: {alive}"
    finally:
        sup.close()


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("SERVICE_POOL_MAX_SIZE", "0", "SERVICE_POOL_MAX_SIZE must be between 1 and 1000"),
        ("LB_CHECK_MODE", "udp", "LB_CHECK_MODE: must be one of"),
    ],
)
def test_a_bad_program_setting_is_exit_2_before_anything_starts(
    stack_env: dict[str, str], name: str, value: str, message: str
) -> None:
    result = subprocess.run([sys.executable, "-m", "stack"], cwd=ROOT,
                            env=stack_env | {name: value}, text=True, capture_output=True,
                            timeout=20, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"varstack-stack: configuration error: {message}" in result.stderr
    assert not Path(stack_env["STACK_DATA_DIR"]).exists()  # not even the database started


def test_a_data_directory_that_is_a_file_is_exit_2_naming_it(
    stack_env: dict[str, str], tmp_path: Path
) -> None:
    data = tmp_path / "not-a-dir"
    data.write_text("")
    result = subprocess.run([sys.executable, "-m", "stack"], cwd=ROOT,
                            env=stack_env | {"STACK_DATA_DIR": str(data)}, text=True,
                            capture_output=True, timeout=20, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip() == (
        f"varstack-stack: configuration error: STACK_DATA_DIR {data} must be a directory")
    assert "Traceback" not in result.stdout + result.stderr


def test_a_second_signal_kills_a_database_that_does_not_stop(
    one_replica_env: dict[str, str], pgdata: Path
) -> None:
    sup = Supervisor(one_replica_env)
    try:
        sup.wait_for(READY, timeout=90)
        [postmaster] = postmasters(pgdata)
        postmaster.suspend()  # SIGSTOP: its fast shutdown would wait out the whole deadline
        sup.proc.send_signal(signal.SIGTERM)
        sup.wait_for("stopping the database (fast)", timeout=60)
        sup.proc.send_signal(signal.SIGINT)
        # Well inside the 30 s a fast shutdown is given: the second signal does not wait it out.
        assert sup.proc.wait(15) == 0, sup.log()
        assert "killing the database" in sup.log()
        assert postmasters(pgdata) == []
    finally:
        sup.close()


def test_two_stacks_on_one_data_directory_the_second_is_refused_naming_the_first(
    one_replica_env: dict[str, str], pgdata: Path
) -> None:
    """Started together on a fresh directory, they must not both run initdb on it."""
    first, second = Supervisor(one_replica_env), Supervisor(on_other_ports(one_replica_env))
    try:
        winner, loser = None, None
        deadline = time.monotonic() + 90
        while winner is None and time.monotonic() < deadline:
            for sup, peer in ((first, second), (second, first)):
                if sup.proc.poll() is not None:
                    winner, loser = peer, sup
            time.sleep(0.1)
        assert loser is not None, first.log() + second.log()
        assert winner is not None
        assert loser.proc.returncode == 1, loser.log()
        assert (f"STACK_DATA_DIR {pgdata.parent} is in use by another stack "
                f"(pid {winner.proc.pid})") in loser.log()
        # The reason first, then the stop it causes.
        assert loser.log().index("is in use by another stack") < loser.log().index("stopped")
        winner.wait_for(READY, timeout=90)
        winner.proc.send_signal(signal.SIGTERM)
        assert winner.proc.wait(60) == 0, winner.log()
    finally:
        first.close()
        second.close()
