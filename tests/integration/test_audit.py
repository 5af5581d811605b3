"""The audit list (``GET /v1/requests``) through real coordinator and agent processes, on SQLite and
on PostgreSQL: each request keeps its key, its key's project, the OpenAI ``user`` field and its
``metadata`` tags (never forwarded to the agent); the list filters by key, project, model, status
and provider, pages with a cursor without repeats or gaps, exports CSV, and shows only the caller's
own requests. Refusals by policy are in it with their error code."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.harness import Pool, last_request

SLUG = "smollm2-135m"
MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def audited(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    workdir = tmp_path_factory.mktemp("audit")
    db_url = None if request.param == "sqlite" else str(request.getfixturevalue("own_database"))
    pool = Pool(workdir, db_url=db_url)
    pool.start()
    try:
        pool.extra["backend"] = backend = pool.standin()
        pool.agent(backend, [SLUG], max_concurrency=8)
        yield pool
    finally:
        pool.stop()


def _list(pool: Pool, secret: str, **params: Any) -> httpx.Response:
    return httpx.get(
        f"{pool.url}/v1/requests", params=params, headers={"authorization": f"Bearer {secret}"}, timeout=10
    )


def test_requests_are_listed_with_their_tags_filtered_paged_and_exported(audited: Pool) -> None:
    pool = audited
    email = "audited@example.com"
    web, batch = pool.new_consumer(email, "1", keys=2)
    auth = {"authorization": f"Bearer {web}"}
    for n in range(5):
        body = {
            "model": SLUG,
            "messages": MSG,
            "user": f"end-user-{n % 2}",
            "metadata": {"feature": "search", "n": str(n)},
        }
        assert httpx.post(f"{pool.url}/v1/chat/completions", json=body, headers=auth, timeout=30).status_code == 200
    assert "metadata" not in last_request(pool.extra["backend"])  # tags stay with the pool
    formula = {"model": SLUG, "messages": MSG, "user": '=HYPERLINK("http://evil")'}  # a spreadsheet must not run it
    assert httpx.post(f"{pool.url}/v1/chat/completions", json=formula, headers=auth, timeout=30).status_code == 200
    other = {"authorization": f"Bearer {batch}"}
    assert (
        httpx.post(f"{pool.url}/v1/chat/completions", json={"model": SLUG, "messages": MSG}, headers=other).status_code
        == 200
    )
    unknown = httpx.post(
        f"{pool.url}/v1/chat/completions", json={"model": "no-such-model", "messages": MSG}, headers=other
    )
    assert unknown.status_code == 404

    everything = _list(pool, web)
    assert everything.status_code == 200, everything.text
    rows = everything.json()["data"]
    assert len(rows) == 8 and everything.json()["nextCursor"] is None  # both keys, the refusal too
    newest = rows[0]
    assert newest["status"] == 404 and newest["errorCode"] == "model_not_found"
    tagged = [r for r in rows if r["metadata"]]
    assert (
        len(tagged) == 5
        and tagged[0]["user"] == "end-user-0"
        and tagged[0]["metadata"] == {"feature": "search", "n": "4"}
    )
    key_id = tagged[0]["keyId"]
    by_key = _list(pool, web, key=key_id).json()["data"]
    assert [r["metadata"]["n"] for r in by_key if r["metadata"]] == ["4", "3", "2", "1", "0"] and len(by_key) == 6
    assert len(_list(pool, web, status=404).json()["data"]) == 1
    assert len(_list(pool, web, model=SLUG, status=200).json()["data"]) == 7
    assert _list(pool, web, provider="platform").json()["data"] == []  # the agent served all

    seen, cursor = [], None  # pages of two: every request once, in order
    while True:
        page = _list(pool, web, limit=2, **({"cursor": cursor} if cursor else {})).json()
        seen += [r["id"] for r in page["data"]]
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert seen == [r["id"] for r in rows]

    exported = _list(pool, web, format="csv")
    assert exported.status_code == 200 and exported.headers["content-type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(exported.text)))
    assert [r["id"] for r in table] == [r["id"] for r in rows]
    assert next(r for r in table if r["user"].startswith("'="))["user"] == '\'=HYPERLINK("http://evil")'
    row = next(r for r in table if r["id"] == tagged[0]["id"])
    assert row["metadata"] == '{"feature":"search","n":"4"}' and row["user"] == "end-user-0"

    assert _list(pool, web, cursor="not-a-cursor").status_code == 400
    assert _list(pool, web, provider="anyone").status_code == 400
    assert all(r["id"] not in seen for r in _list(pool, pool.key).json()["data"])  # another user's: none of these
