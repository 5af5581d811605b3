"""Routing through real coordinator and agent processes: every `provider` preference, the model
list, and the paid upstream (a loopback stand-in) as the fallback."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.harness import Pool, last_request, with_upstream

MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def routed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    """A pool whose upstream (a loopback stand-in) serves both models at $1/$2 per 1M tokens."""
    harness = with_upstream(
        tmp_path_factory.mktemp("routing"),
        "gemma-3-270m=upstream-gemma,smollm2-135m=upstream-smol",
        chunks=2,
        upstream_price_in="1",
        upstream_price_out="2",
    )
    harness.start()
    try:
        yield harness
    finally:
        harness.stop()


@pytest.fixture(autouse=True)
def _stop_agents(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "routed" in request.fixturenames:
        request.getfixturevalue("routed").stop_agents()


def _x_pool(response: httpx.Response) -> dict[str, object]:
    assert response.status_code == 200, response.text
    return dict(response.json()["x_pool"])


def test_allow_fallbacks_false_gets_503_instead_of_the_upstream(routed: Pool) -> None:
    body = {"model": "gemma-3-270m", "messages": MSG}
    assert _x_pool(routed.post(body))["route"] == "fallback"
    refused = routed.post({**body, "provider": {"allow_fallbacks": False}})
    assert refused.status_code == 503 and refused.headers["retry-after"]
    error = refused.json()["error"]
    assert error["code"] == "no_capacity" and "`provider` preferences" in error["message"]
    for prefs in ({"ignore": ["platform"]}, {"only": [12345]}, {"max_price": {"prompt": 0.5}}):
        assert routed.post({**body, "provider": prefs}).status_code == 503, prefs
    assert _x_pool(routed.post({**body, "provider": {"only": ["platform"]}}))["fallback"] is True


def test_preferences_route_between_real_agents(routed: Pool) -> None:
    cheap = routed.standin(chunks=1)
    routed.agent(cheap, ["smollm2-135m"], price_in="0.1", price_out="0.1")
    routed.agent(routed.standin(chunks=1), ["smollm2-135m"], price_in="0.5", price_out="0.5")
    body = {"model": "smollm2-135m", "messages": MSG}

    by_price = _x_pool(routed.post({**body, "provider": {"sort": "price"}}))
    assert by_price["route"] == "sort:price" and by_price["candidates"] == 2 and by_price["attempts"] == 1
    cheapest = str(by_price["agent"])
    dearest = str(_x_pool(routed.post({**body, "provider": {"ignore": [cheapest]}}))["agent"])
    assert dearest.startswith("agt_") and dearest != cheapest
    ordered = _x_pool(routed.post({**body, "provider": {"order": [dearest, cheapest]}}))
    assert (ordered["agent"], ordered["route"]) == (dearest, "order")
    assert _x_pool(routed.post({**body, "provider": {"only": [dearest]}}))["agent"] == dearest
    assert _x_pool(routed.post({**body, "provider": {"max_price": {"prompt": 0.2}}}))["agent"] == cheapest
    # the backend never sees the pool's own preferences
    assert "provider" not in last_request(cheap)
    # one provider owns both agents: its id names both, and not the upstream
    provider = by_price["provider"]
    assert _x_pool(routed.post({**body, "provider": {"only": [provider], "ignore": [cheapest]}}))["agent"] == dearest
    assert routed.post({**body, "provider": {"only": [provider], "ignore": [cheapest, dearest]}}).status_code == 503
    assert _x_pool(routed.post({**body, "provider": {"ignore": [provider]}}))["fallback"] is True
    # the default spreads load by power of two choices and says so
    assert _x_pool(routed.post(body))["route"] == "power_of_two"


def test_model_list_is_tried_in_order(routed: Pool) -> None:
    routed.agent(routed.standin(chunks=1), ["gemma-3-270m"])
    body = {"messages": MSG, "provider": {"allow_fallbacks": False}}
    # no agent serves smollm2 and fallbacks are off: the second model serves it
    first = _x_pool(routed.post({**body, "model": ["smollm2-135m", "gemma-3-270m"]}))
    assert first["model"] == "gemma-3-270m" and first["fallback"] is False
    # with fallbacks on, the first model's upstream comes before the second model
    second = _x_pool(routed.post({"messages": MSG, "model": ["smollm2-135m", "gemma-3-270m"]}))
    assert second["model"] == "smollm2-135m" and second["fallback"] is True
    unknown = routed.post({"messages": MSG, "model": ["gemma-3-270m", "no-such-model"]})
    assert unknown.status_code == 404 and "no-such-model" in unknown.json()["error"]["message"]
    for bad, param in (
        ({"model": []}, "model"),
        ({"model": ["a"] * 9}, "model"),
        ({"model": [""]}, "model[0]"),
        ({"provider": {"sort": "cheapest"}}, "provider.sort"),
        ({"provider": {"min_trust": 101}}, "provider.min_trust"),
        ({"provider": {"max_price": {"prompt": -1}}}, "provider.max_price.prompt"),
        ({"provider": {"order": "agt_1"}}, "provider.order"),
        ({"provider": {"allow_fallbacks": "no"}}, "provider.allow_fallbacks"),
        ({"provider": {"data_collection": "deny"}}, "provider"),
    ):
        response = routed.post({"model": "gemma-3-270m", "messages": MSG, **bad})
        assert response.status_code == 400, (bad, response.text)
        assert response.json()["error"]["param"] == param, response.json()
