"""The pages' Jinja2 set-up (autoescaping on, as Litestar configures it) and the filters that format
numbers the same way on every page."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from litestar.contrib.jinja import JinjaTemplateEngine
from litestar.template.config import TemplateConfig

from shared.money import format_usd

TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"
DASH = "—"


def ms(value: float | None) -> str:
    return DASH if value is None else f"{value:,.0f} ms"


def pct(value: float | None) -> str:
    return DASH if value is None else f"{value * 100:.1f} %"


def usd_per_m(value: float | None) -> str:
    """A price per 1M tokens: cents, or up to four places when finer (``$0.125``)."""
    if value is None:
        return DASH
    text = f"{value:,.4f}".rstrip("0")
    whole, _, cents = text.partition(".")
    return f"${whole}.{cents.ljust(2, '0')}"


def score(value: float | None) -> str:
    return DASH if value is None else f"{value:.0f}"


def usd(nano: int | None) -> str:
    return DASH if nano is None else format_usd(nano)


def usd_short(nano: int) -> str:
    """Whole dollars without cents (``$10``), else to the cent (``$12.50``): amounts people pick."""
    cents = nano // 10_000_000
    return f"${cents // 100:,}" if cents % 100 == 0 else f"${cents / 100:,.2f}"


def when(value: datetime | None) -> str:
    return DASH if value is None else value.strftime("%Y-%m-%d %H:%M UTC")


def _filters(engine: JinjaTemplateEngine) -> None:
    engine.engine.filters.update(
        ms=ms, pct=pct, usd_per_m=usd_per_m, score=score, usd=usd, usd_short=usd_short, when=when
    )


def template_config() -> TemplateConfig[JinjaTemplateEngine]:
    return TemplateConfig(directory=TEMPLATES, engine=JinjaTemplateEngine, engine_callback=_filters)
