"""The targets table's verdicts: how a miss reads, and a figure the run cannot be judged on."""

from __future__ import annotations

import pytest

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
