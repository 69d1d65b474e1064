"""Per-round numbers, their medians and spreads, and ratios taken round by round."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Results:
    """``values[metric][variant]`` is one number per round, in round order."""

    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    #: Every load run, as run (for the raw JSON): section, metric, variant, round, result.
    runs: list[dict[str, Any]] = field(default_factory=list)
    #: One example command line per kind of run, for the report.
    commands: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def add(self, metric: str, variant: str, value: float) -> None:
        self.values.setdefault(metric, {}).setdefault(variant, []).append(value)

    def get(self, metric: str, variant: str) -> list[float]:
        return self.values.get(metric, {}).get(variant, [])

    def has(self, metric: str, variant: str) -> bool:
        return bool(self.get(metric, variant))

    def ratios(self, metric: str, a: str, b: str, *, metric_b: str | None = None) -> list[float]:
        """``a / b`` round by round (the two were measured side by side in each round)."""
        xs, ys = self.get(metric, a), self.get(metric_b or metric, b)
        return [x / y for x, y in zip(xs, ys, strict=False) if y]

    def to_json(self) -> dict[str, Any]:
        return {"meta": self.meta, "values": self.values, "commands": self.commands,
                "notes": self.notes, "runs": self.runs}


@dataclass(frozen=True)
class Summary:
    median: float
    low: float
    high: float
    n: int

    @property
    def spread_pct(self) -> float:
        """Half the min-max range, as a percentage of the median."""
        return (self.high - self.low) / 2 / self.median * 100 if self.median else 0.0


def summarize(values: list[float]) -> Summary | None:
    if not values:
        return None
    return Summary(statistics.median(values), min(values), max(values), len(values))


def fmt_num(x: float) -> str:
    if x == 0:
        return "0"
    a = abs(x)
    if a >= 1000:
        return f"{x:,.0f}".replace(",", " ")
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def fmt(values: list[float], *, spread: bool = True) -> str:
    """``median [min-max]`` (or ``-`` when nothing was measured)."""
    s = summarize(values)
    if s is None:
        return "-"
    if not spread or s.n == 1:
        return fmt_num(s.median)
    return f"{fmt_num(s.median)} [{fmt_num(s.low)}-{fmt_num(s.high)}]"
