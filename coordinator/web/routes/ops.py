"""For operators and load balancers: ``/healthz`` (the process is alive), ``/readyz`` (it can serve:
database reachable, schema current, not draining) and ``/metrics`` (Prometheus)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgspec
from litestar import Response, get
from litestar.openapi import ResponseSpec
from prometheus_client import CONTENT_TYPE_LATEST

from coordinator import __version__
from coordinator.core import db
from coordinator.services.state import PoolState

log = logging.getLogger(__name__)
CHECK_TIMEOUT = 2.0  # seconds a readiness check may take: a load balancer polls every second or two


class Readiness(msgspec.Struct):
    """Each check is ``ok`` or what is wrong; ``ready`` when all are ``ok``."""

    ready: bool
    checks: dict[str, str]


@get("/healthz", summary="Liveness and agent count", tags=["ops"])
async def healthz(pool: PoolState) -> dict[str, Any]:
    return {"status": "ok", "version": __version__, "agents": len(pool.registry.local())}


@get(
    "/readyz",
    summary="Whether this process should get traffic (database, migrations, draining, Redis)",
    description="200 when every check is `ok`, else 503; a load balancer's health check.",
    tags=["ops"],
    responses={503: ResponseSpec(Readiness, description="Not ready: the failing checks are named")},
)
async def readyz(pool: PoolState) -> Response[Readiness]:
    checks = {"database": "ok", "migrations": "ok", "draining": "no" if not pool.draining else "yes"}
    checks["redis"] = await pool.cluster.ping()  # degraded is still ready: a replica serves its own agents
    try:
        checks["migrations"] = await asyncio.wait_for(_schema(pool), CHECK_TIMEOUT)
    except TimeoutError:
        checks["database"] = f"no answer within {CHECK_TIMEOUT:g} s"
    except Exception as exc:  # any driver error: the database is what is wrong, not this request
        log.warning("readiness: database check failed", extra={"error": repr(exc)[:300]})
        checks["database"] = type(exc).__name__  # the details stay in the log: this endpoint is public
    if checks["database"] != "ok":
        checks["migrations"] = "unknown"
    ready = checks["database"] == "ok" and checks["migrations"] == "ok" and not pool.draining
    return Response(Readiness(ready, checks), status_code=200 if ready else 503)


async def _schema(pool: PoolState) -> str:
    """``ok`` if the database answers and carries the newest migration, else what it carries."""
    current = await db.current_revision(pool.engine)
    return "ok" if current == pool.schema_head else f"at {current}, this code needs {pool.schema_head}"


@get("/metrics", summary="Prometheus metrics of this process", tags=["ops"], media_type=CONTENT_TYPE_LATEST)
async def prometheus_metrics(pool: PoolState) -> Response[bytes]:
    return Response(pool.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
