"""The chart ``make bench`` publishes: the gateways' figures as horizontal bars, one panel per
measure, drawn as SVG and rendered to PNG by Debian's Chromium (through Playwright, as the page
tests do), so that no plotting library joins the dependencies."""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

CHROMIUM = os.environ.get("POOL_TEST_CHROMIUM", "/usr/bin/chromium")
COLORS = {"direct": "#9aa5b1", "pool": "#2563eb", "litellm": "#d97706", "portkey": "#7c3aed"}
WIDTH, BAR, GAP, LABEL, PAD = 760, 18, 6, 90, 14


def panels(results: dict[str, Any]) -> list[tuple[str, str, dict[str, float]]]:
    """(title, unit, value by gateway) for each measure present in ``results``."""
    out: list[tuple[str, str, dict[str, float]]] = []
    latency = {name: row for name, row in results.get("concurrency_1", {}).items() if name != "direct"}
    if latency:
        nonstream = {name: row["added_nonstream_p50_ms"] for name, row in latency.items()}
        out.append(("Added to a non-streamed request, p50", "ms", nonstream))
        out.append(("Added to time to first token, p50", "ms", {n: r["added_ttft_p50_ms"] for n, r in latency.items()}))
    sweeps = results.get("throughput", {})
    if sweeps:
        # The direct sweep is the load side's own capacity, not a gateway: it would dwarf the bars.
        rates = {name: sweep["rps_p99_under_100ms"] or 0 for name, sweep in sweeps.items() if name != "direct"}
        out.append(("Requests/s on one core, p99 under 100 ms", "req/s", rates))
    ramp = results.get("streams", {})
    if ramp:
        top = {n: max(r["levels"].items(), key=lambda kv: int(kv[0])) for n, r in ramp.items() if r["levels"]}
        streams = max(int(level) for level, _ in top.values())
        peers = {name: level for name, (_, level) in top.items() if name != "direct"}
        gaps = {name: level["added_gap_p99_ms"] for name, level in peers.items()}
        out.append((f"Added inter-chunk gap p99 at {streams} streams", "ms", gaps))
        out.append(("Memory per open stream", "KB", {name: level["kb_per_stream"] for name, level in peers.items()}))
    agents = results.get("idle_agents", {})
    if agents:  # at the most agents: the fewest carry one-time costs
        count, row = max(agents.items(), key=lambda kv: int(kv[0]))
        title = f"Coordinator memory per idle agent, {int(count):,} connected"
        out.append((title, "KB", {"pool": row["kb_per_agent"]}))
    return out


def svg(results: dict[str, Any]) -> str:
    parts: list[str] = []
    y = PAD
    for title, unit, values in panels(results):
        parts.append(f'<text x="{PAD}" y="{y + 12}" class="t">{html.escape(title)} ({unit})</text>')
        y += 22
        top = max([abs(v) for v in values.values()] + [1e-9])
        span = WIDTH - LABEL - PAD * 2 - 80
        for name, value in values.items():
            length = max(1.0, abs(value) / top * span)
            parts.append(f'<text x="{PAD}" y="{y + 13}" class="l">{html.escape(name)}</text>')
            color = COLORS.get(name, "#64748b")
            parts.append(f'<rect x="{LABEL}" y="{y}" width="{length:.1f}" height="{BAR}" fill="{color}"/>')
            text = f"{value:,.0f}" if unit == "req/s" else f"{value:,.2f}"
            parts.append(f'<text x="{LABEL + length + 6:.1f}" y="{y + 13}" class="v">{text}</text>')
            y += BAR + GAP
        y += PAD
    date = html.escape(str(results.get("date", "")))
    machine = results.get("machine", {})
    footer = f"{date} · {machine.get('cpus')} CPUs · Python {machine.get('python')} · make bench"
    parts.append(f'<text x="{PAD}" y="{y + 8}" class="f">{html.escape(footer)}</text>')
    height = y + PAD + 8
    style = (
        "<style>text{font-family:sans-serif}.t{font-size:14px;font-weight:600}.l{font-size:12px}"
        ".v{font-size:12px}.f{font-size:11px;fill:#555}</style>"
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}">'
        f'{style}<rect width="100%" height="100%" fill="white"/>{"".join(parts)}</svg>'
    )


def write(results: dict[str, Any], png: Path) -> None:
    """Write ``png`` and the SVG beside it."""
    from playwright.sync_api import sync_playwright

    drawing = svg(results)
    png.with_suffix(".svg").write_text(drawing)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": WIDTH, "height": 200})
            page.set_content(f"<html><body style='margin:0'>{drawing}</body></html>")
            page.locator("svg").screenshot(path=str(png))
        finally:
            browser.close()


if __name__ == "__main__":  # re-draw a results file: python -m tests.bench.chart RESULTS.json OUT.png
    import json
    import sys

    write(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))
