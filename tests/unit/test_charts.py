"""The pages' SVG charts: stacked bars per series, lines broken at gaps."""

from __future__ import annotations

from coordinator.web import charts


def test_charts_stack_bars_by_series_and_break_lines_at_gaps() -> None:
    chart = charts.columns(
        "Spend", ["11-01", "11-02"], {"a": {"11-01": 30.0, "11-02": 10.0}, "b": {"11-01": 10.0}}, str
    )
    assert chart.top == "50.0"  # the tallest day is 40: the axis ends at a round 50
    first_day = [bar for bar in chart.bars if bar.label.startswith("11-01")]
    assert [(bar.series, bar.height) for bar in first_day] == [("s0", 96.0), ("s1", 32.0)]
    assert first_day[1].y + first_day[1].height == first_day[0].y  # b sits on top of a
    assert chart.legend == [("s0", "a"), ("s1", "b")] and "11-01: 40.0" in chart.summary
    assert charts.columns("Spend", ["11-01"], {"a": {"11-01": 1.0}}, str).legend == []  # one series: no legend
    line = charts.timeline("p95", [(0, 5.0), (60, 10.0), (120, None), (180, 5.0), (600, 1.0)], 0, 600, str)
    assert len(line.lines) == 1 and len(line.dots) == 2  # joined minutes, then a gap and a lone point twice
    assert charts.timeline("p95", [], 0, 600, str).empty
