"""Chart geometry for the server-rendered pages: numbers in, SVG coordinates and labels out.

The templates draw the SVG (``templates/_charts.html``), so a chart is in the HTML of the first paint,
works without JavaScript, and is labelled for screen readers. Values are scaled into a fixed
``WIDTH`` x ``HEIGHT`` box; a missing value (no requests that minute) breaks a line in two.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

WIDTH, HEIGHT = 600, 160


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    label: str  # what the bar stands for, read out by screen readers
    series: str = "s0"  # its colour class


@dataclass(frozen=True, slots=True)
class Chart:
    title: str
    top: str  # the value at the top of the box, formatted
    start: str  # the label at the left end of the x axis
    end: str  # and at the right end
    summary: str  # one sentence for those who cannot see the chart
    lines: list[str] = field(default_factory=list)  # SVG polyline ``points``, one per unbroken run
    dots: list[tuple[str, str]] = field(default_factory=list)  # runs of one point, drawn as dots
    bars: list[Bar] = field(default_factory=list)
    legend: list[tuple[str, str]] = field(default_factory=list)  # (colour class, series name)

    @property
    def empty(self) -> bool:
        return not self.lines and not self.dots and not self.bars


def _top(values: Sequence[float]) -> float:
    """A round number at or above the largest value, so the axis reads well."""
    peak = max(values, default=0.0)
    if peak <= 0:
        return 1.0
    step = 10 ** (len(str(int(peak))) - 1) if peak >= 1 else 0.1
    while step * 10 < peak:
        step *= 10
    for multiple in (1, 2, 2.5, 5, 10):
        if multiple * step >= peak:
            return float(multiple * step)
    return peak


def clock(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%H:%M UTC")


def timeline(
    title: str,
    points: Sequence[tuple[float, float | None]],
    start: float,
    end: float,
    fmt: Callable[[float], str],
    step: float = 60.0,
) -> Chart:
    """A line over time from ``(t, value)`` points between ``start`` and ``end`` (unix seconds);
    consecutive points (``step`` apart: minutes, or a price history's candles) join, a gap or a
    missing value breaks the line."""
    values = [v for _, v in points if v is not None]
    top = _top(values)
    span = max(end - start, 1.0)
    runs: list[list[tuple[str, str]]] = []
    previous: float | None = None
    for t, value in points:
        if value is None:
            previous = None
            continue
        if previous is None or t - previous > step:
            runs.append([])
        runs[-1].append((f"{(t - start) / span * WIDTH:.1f}", f"{HEIGHT - value / top * HEIGHT:.1f}"))
        previous = t
    lines = [" ".join(f"{x},{y}" for x, y in run) for run in runs if len(run) > 1]
    dots = [run[0] for run in runs if len(run) == 1]
    latest = next((v for _, v in reversed(points) if v is not None), None)
    summary = f"{title}: no data in this period." if latest is None else f"{title}: latest {fmt(latest)}."
    if values:
        summary += f" Highest {fmt(max(values))}."
    return Chart(title, fmt(top), _ago(end - start), "now", summary, lines=lines, dots=dots)


def _ago(seconds: float) -> str:
    return f"{seconds / 3600:.0f} h ago" if seconds >= 3600 else f"{seconds / 60:.0f} min ago"


SERIES = 6  # colours for stacked series (``s0`` … ``s5`` in the stylesheet); more share the last


def columns(
    title: str,
    labels: Sequence[str],
    series: Mapping[str, Mapping[str, float]],
    fmt: Callable[[float], str],
) -> Chart:
    """A bar per label (days, say), left to right, stacked by series (models, say): ``series``
    maps each series name to its value per label."""
    names = list(series)
    totals = [sum(series[name].get(label, 0.0) for name in names) for label in labels]
    top = _top(totals)
    slot = WIDTH / max(len(labels), 1)
    bars: list[Bar] = []
    for i, label in enumerate(labels):
        base = float(HEIGHT)
        for n, name in enumerate(names):
            value = series[name].get(label, 0.0)
            if value <= 0:
                continue
            height = value / top * HEIGHT
            base -= height
            text = f"{label}, {name}: {fmt(value)}"
            bars.append(Bar(i * slot + slot * 0.15, base, slot * 0.7, height, text, f"s{min(n, SERIES - 1)}"))
    parts = [f"{label}: {fmt(total)}" for label, total in zip(labels, totals, strict=True) if total]
    summary = f"{title}: " + ("; ".join(parts) if parts else "nothing in this period.")
    legend = [(f"s{min(n, SERIES - 1)}", name) for n, name in enumerate(names)] if len(names) > 1 else []
    start = labels[0] if labels else ""
    end = labels[-1] if labels else ""
    return Chart(title, fmt(top), start, end, summary, bars=bars, legend=legend)
