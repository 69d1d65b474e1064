"""The targets table's verdicts: how a miss reads, and a figure the run cannot be judged on."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import report
from bench.report import TARGETS, Target
from bench.stats import Results


def target(figure_start: str) -> Target:
    return next(t for t in TARGETS if t.figure.startswith(figure_start))


@pytest.mark.parametrize(
    ("ratio", "reads"),
    [(0.96, "missed by 4%"), (0.997, "missed by 0.3%"), (0.9996, "missed by 0.04%"),
     (1.0, "**met**")],
)
def test_a_miss_reads_as_a_percentage_that_is_never_zero(ratio: float, reads: str) -> None:
    results = Results()
    for _ in range(3):
        results.add("ka_rps", "ours", ratio * 1000)
        results.add("ka_rps", "haproxy", 1000)
    assert target("balancer keep-alive").verdict(results) == reads


def test_an_idle_figure_from_fewer_connections_than_the_target_s_is_not_judged() -> None:
    rss = target("balancer RSS")
    results = Results(meta={"options": {"idle": 1000}})
    results.add("idle_kib_per_conn", "ours", 1.49)
    assert rss.verdict(results) == (
        "not judged: 1,000 connections (--idle), the target is for 5,000")
    results.meta["options"]["idle"] = 5000
    assert rss.verdict(results) == "**met**"
    results.values["idle_kib_per_conn"]["ours"] = [3.2]
    assert rss.verdict(results) == "missed by 7%"


def test_an_idle_figure_that_was_not_measured_says_so() -> None:
    results = Results(meta={"options": {"idle": 0}})  # --idle 0 skips the figure
    assert target("balancer RSS").verdict(results) == "not measured"


def keep_alive_run(ours: tuple[list[float], list[float]],
                   haproxy: tuple[list[float], list[float]]) -> Results:
    """Three rounds of keep-alive, ours a little slower, with user and kernel ms per 1,000."""
    results = Results(meta={"options": {"idle": 0}})
    for variant, (user, kernel) in (("ours", ours), ("haproxy", haproxy)):
        for rnd in range(3):
            results.add("ka_rps", variant, 900 if variant == "ours" else 1000)
            results.add("ka_user_ms_per_1k", variant, user[rnd])
            results.add("ka_kernel_ms_per_1k", variant, kernel[rnd])
            results.add("ka_cpu_ms_per_1k", variant, user[rnd] + kernel[rnd])
    return results


def test_the_keep_alive_reason_says_where_this_run_s_difference_lies() -> None:
    # User time apart, kernel times whose spreads overlap.
    why = target("balancer keep-alive").explain(keep_alive_run(
        ours=([2.3, 2.4, 2.5], [13.5, 13.7, 14.0]), haproxy=([1.3, 1.4, 1.5], [13.3, 13.6, 13.8])))
    assert ("per request, ours spent 1.00 us more of user time and 0.100 us more of kernel time, "
            "and the two kernel times' spreads overlap") in why
    # Kernel times apart about as much as the user times.
    why = target("balancer keep-alive").explain(keep_alive_run(
        ours=([2.2, 2.32, 2.4], [13.3, 13.4, 14.5]),
        haproxy=([1.5, 1.53, 1.6], [12.3, 12.7, 13.2])))
    assert ("ours spent 0.790 us more of user time and 0.700 us more of kernel time, and the two "
            "kernel times' spreads do not overlap") in why
    assert "the kernel time is the same" not in why


def test_a_reason_two_missed_figures_share_is_written_out_once() -> None:
    # Keep-alive req/s and its CPU both missed: one reason, given under the first.
    results = keep_alive_run(ours=([2.0] * 3, [14.0] * 3), haproxy=([1.5] * 3, [14.0] * 3))
    reasons = report.targets_table(results).split("Why the missed ones fall short")[1]
    keep_alive, cpu = (line for line in reasons.splitlines() if line.startswith("- **"))
    assert keep_alive.startswith("- **balancer keep-alive req/s ÷ HAProxy's**: In this run")
    assert cpu == ("- **balancer CPU per 1,000 keep-alive requests ÷ HAProxy's**: the same reason "
                   "as for *balancer keep-alive req/s ÷ HAProxy's*, above.")


def test_a_run_with_idle_zero_says_the_figure_was_not_measured() -> None:
    results = keep_alive_run(ours=([2.0] * 3, [14.0] * 3), haproxy=([1.5] * 3, [14.0] * 3))
    part1 = "\n".join(report.balancer_section(results))
    assert "Idle RSS: not measured (--idle 0)." in part1
    assert "0 connections opened" not in part1
    results.meta["options"]["idle"] = 5000
    assert "5000 connections opened and left idle" in "\n".join(report.balancer_section(results))


def test_direct_has_no_proxy_cpu() -> None:
    results = keep_alive_run(ours=([2.0] * 3, [14.0] * 3), haproxy=([1.5] * 3, [14.0] * 3))
    for _ in range(3):
        results.add("ka_rps", "direct", 2000)
        results.add("ka_cpu_ms_per_1k", "direct", 8.0)  # nginx's, as the run records it
        results.add("ka_backend_cpu_ms_per_1k", "direct", 8.0)
    part1 = "\n".join(report.balancer_section(results))
    assert ("| proxy CPU per 1,000 keep-alive requests (CPU ms) | - | 16.0 [16.0-16.0] | "
            "15.5 [15.5-15.5] |") in part1
    assert ("| backend (nginx) CPU per 1,000 keep-alive requests (CPU ms) | 8.00 [8.00-8.00] | "
            "- | - |") in part1


def test_the_report_says_how_its_rounds_were_ordered(tmp_path: Path) -> None:
    results = keep_alive_run(ours=([2.0] * 3, [14.0] * 3), haproxy=([1.5] * 3, [14.0] * 3))
    results.meta["options"]["rounds"] = 3
    written = report.write(results, tmp_path / "run.md", []).read_text()
    assert "3 interleaved rounds (A B A B, order rotated each round)" in written  # an old run
    results.meta["order"] = "reversed"
    written = report.write(results, tmp_path / "run.md", []).read_text()
    assert ("3 interleaved rounds (A B, then B A: each round the one before reversed, every "
            "second one moved on by one)") in written


def test_hey_rows_say_which_one_request_hey_repeats() -> None:
    results = Results()
    for tool in ("wrk", "hey"):
        for name in ("set", "delete"):
            results.add(f"service_{tool}_{name}", "rps", 1000)
    section = "\n".join(report.endpoints_section(results, "service", "## 2."))
    assert "| POST /set_var (new keys) | wrk |" in section
    assert "| POST /set_var (one existing key) | hey |" in section
    assert "| DELETE /delete_var (one missing key) | hey |" in section


def test_a_run_that_measures_no_target_says_so_instead_of_eight_empty_rows() -> None:
    results = Results(meta={"options": {"sections": ["target"]}})
    results.add("target_wrk_get_query", "rps", 1000)
    table = report.targets_table(results)
    assert table == ("No target is measured by this run's sections (target); the targets need "
                     "the balancer, service and stack sections.")
    assert "not measured" in report.targets_table(keep_alive_run(
        ours=([2.0] * 3, [14.0] * 3), haproxy=([1.5] * 3, [14.0] * 3)))  # some are measured
