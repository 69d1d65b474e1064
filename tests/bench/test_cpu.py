"""The stack section's CPU account: real processes burning a known amount of CPU, read back from
/proc, and the report's table and reasoning built from such numbers."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from bench import load, report
from bench.run import CpuSplit, record_cpu
from bench.stats import Results

#: CPU seconds each burner spends; /proc counts in ticks of 10 ms, so the checks allow a few.
BURN = 0.3
TICKS = 0.05

BURNER = f"""
import time
t = time.process_time()
while time.process_time() - t < {BURN}:
    pass
"""


def burn_here(seconds: float) -> None:
    started = time.process_time()
    while time.process_time() - started < seconds:
        pass


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_process_tree_counts_ended_and_live_children() -> None:
    # The parent burns nothing itself; one child burns and ends (waited for: the parent's
    # cutime), the other burns and stays alive (read from its own /proc entry).
    parent_code = f"""
import subprocess, sys
ended = subprocess.run([sys.executable, "-c", {BURNER!r}])
live = subprocess.Popen([sys.executable, "-c",
                         {BURNER!r} + "print('burnt', flush=True); import sys; sys.stdin.read()"],
                        stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)
live.stdout.readline()
print("ready", flush=True)
sys.stdin.readline()
live.stdin.close()
live.wait()
"""
    with subprocess.Popen([sys.executable, "-c", parent_code], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as parent:
        assert parent.stdout is not None
        assert parent.stdin is not None
        assert parent.stdout.readline() == "ready\n"
        total = load.tree_cpu_seconds(parent.pid)
        own = load.cpu_seconds(parent.pid)
        parent.stdin.close()  # lets both go
    assert total - own >= 2 * BURN - TICKS


def test_ended_children_and_the_machine_are_counted() -> None:
    children, machine = load.ended_children_cpu_seconds(), load.machine_busy_seconds()
    subprocess.run([sys.executable, "-c", BURNER], check=True)
    assert load.ended_children_cpu_seconds() - children >= BURN - TICKS
    burn_here(BURN)
    assert load.machine_busy_seconds() - machine >= 2 * BURN - TICKS


def test_a_part_that_ends_during_the_run_is_left_out(
    sleeper: subprocess.Popen[bytes],
) -> None:
    split = CpuSplit(replica_pids=[sleeper.pid], pg_pid=sleeper.pid)
    with split.measure() as spent:
        sleeper.kill()
        sleeper.wait()
    assert spent["replicas"] == 0
    assert spent["postgres"] == 0
    assert spent["balancer"] == 0  # no balancer on this path
    assert spent["wall"] > 0


def test_the_run_itself_is_measured_per_request(sleeper: subprocess.Popen[bytes]) -> None:
    results = Results()
    split = CpuSplit(replica_pids=[sleeper.pid], pg_pid=sleeper.pid)
    with split.measure(balancer_pid=sleeper.pid) as spent:
        subprocess.run([sys.executable, "-c", BURNER], check=True)
    record_cpu(results, "ours-2", spent, requests=1000)
    # The burner stands for wrk: BURN s over 1,000 requests is 300 us each.
    (load_us,) = results.get("stack_cpu_us_load", "ours-2")
    assert BURN * 1000 - TICKS * 1000 <= load_us <= BURN * 1000 + 100
    (machine_us,) = results.get("stack_cpu_us_machine", "ours-2")
    assert machine_us >= load_us - TICKS * 1000
    assert results.get("stack_busy_cores", "ours-2")[0] > 0
    record_cpu(results, "ours-4", spent, requests=0)  # a run with no answers records nothing
    assert not results.has("stack_cpu_us_load", "ours-4")


def test_the_balancer_s_user_time_is_counted_within_its_total() -> None:
    # The burner stands for the balancer: once told to, it burns user time (BURNER would not
    # do: reading the process clock is a system call, so most of its time is the kernel's).
    code = f"""
import resource, sys
sys.stdin.readline()
started = resource.getrusage(resource.RUSAGE_SELF).ru_utime
while resource.getrusage(resource.RUSAGE_SELF).ru_utime - started < {BURN}:
    for _ in range(100_000):
        pass
print("burnt", flush=True)
sys.stdin.read()
"""
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                          stdin=subprocess.PIPE, text=True) as balancer:
        assert balancer.stdout is not None
        assert balancer.stdin is not None
        split = CpuSplit(replica_pids=[], pg_pid=balancer.pid)
        with split.measure(balancer_pid=balancer.pid) as spent:
            balancer.stdin.write("go\n")
            balancer.stdin.flush()
            assert balancer.stdout.readline() == "burnt\n"
        balancer.stdin.close()
    assert BURN - TICKS <= spent["balancer_user"] <= spent["balancer"] <= BURN + TICKS
    results = Results()
    record_cpu(results, "ours-2", spent, requests=1000)
    (user_us,) = results.get("stack_cpu_us_balancer_user", "ours-2")
    assert user_us >= (BURN - TICKS) * 1000


def account(results: Results, variant: str, **us: float) -> None:
    for part, value in us.items():
        results.add(f"stack_cpu_us_{part}", variant, value)


def test_the_report_shows_the_account_and_reasons_from_it() -> None:
    results = Results()
    results.add("stack_get_rps", "pgbench", 25000)
    results.add("stack_get_rps", "ours-2", 3000)
    results.add("stack_busy_cores", "ours-2", 2.0)
    results.add("stack_busy_cores", "pgbench", 1.9)
    account(results, "ours-2", replicas=400, balancer=80, postgres=120, load=50, machine=700)
    account(results, "pgbench", replicas=1, balancer=0, postgres=40, load=20, machine=76)
    table = "\n".join(report.cpu_split_section(results))
    assert "| ours-2 | 400 | 80.0 | 120 | 50.0 | 50.0 | 700 | 2.00 |" in table
    assert "| pgbench | 1.00 | - | 40.0 | 20.0 | 15.0 | 76.0 | 1.90 |" in table
    why = report.targets_table(results)
    assert ("each request cost 700 CPU us in all: the replicas 400, our balancer 80.0, "
            "PostgreSQL 120, wrk 50.0, other 50.0") in why
    # 0.2 of 25,000 tps is 5,000 req/s: 2 busy cores give each at most 400 us.
    assert "Reaching 0.2 of pgbench, 5 000 req/s, on those cores needs at most 400 us" in why


def test_the_stack_reasoning_splits_the_balancers_user_time_when_measured() -> None:
    results = Results()
    for variant, rps in (("ours-2", 3000), ("haproxy-2", 3200)):
        results.add("stack_get_rps", variant, rps)
        account(results, variant, replicas=400, balancer=30 if variant == "ours-2" else 25,
                postgres=120, load=50, machine=700)
    why = report.targets_table(results)
    assert "our balancer spent 30.0 CPU us and HAProxy 25.0, the machine" in why
    account(results, "ours-2", balancer_user=8)
    account(results, "haproxy-2", balancer_user=4)
    why = report.targets_table(results)
    assert ("our balancer spent 30.0 CPU us and HAProxy 25.0 (8.00 and 4.00 of it user time, "
            "22.0 and 21.0 the rest), the machine") in why


def test_a_run_without_the_account_keeps_the_profiles_reasoning() -> None:
    results = Results()
    results.add("stack_get_rps", "pgbench", 25000)
    results.add("stack_get_rps", "ours-2", 3000)
    assert report.cpu_split_section(results) == []
    why = report.targets_table(results)
    assert "two cores hold wrk, the balancer, both replicas and PostgreSQL" in why
    assert "In this run" not in why
