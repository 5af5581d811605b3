"""The model directory through real processes: backend names mapped to slugs, unknown models
refused with a reason the agent prints, and operator edits (the admin CLI) reaching a running
coordinator without a restart."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from scripts import localpool
from tests.harness import Pool

MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    harness = Pool(tmp_path_factory.mktemp("directory"), directory_reload_seconds="0.5")
    harness.start()
    try:
        yield harness
    finally:
        harness.stop()


def models(pool: Pool) -> dict[str, dict[str, object]]:
    listed = httpx.get(f"{pool.url}/v1/models", timeout=10).json()["data"]
    return {entry["id"]: entry for entry in listed}


def test_a_backend_name_is_served_under_its_directory_slug(pool: Pool) -> None:
    agent = pool.agent(pool.standin(chunks=2), ["HuggingFaceTB/SmolLM2-135M-Instruct"])
    try:
        entry = models(pool)["smollm2-135m"]
        assert (entry["displayName"], entry["family"], entry["providerCount"]) == (
            "SmolLM2 135M Instruct",
            "smollm2",
            1,
        )
        assert "HuggingFaceTB/SmolLM2-135M-Instruct" in entry["aliases"]  # type: ignore[operator]
        response = pool.post({"model": "smollm2-135m", "messages": MSG})
        assert response.status_code == 200, response.text
        status = httpx.get(f"{pool.url}/v1/pool/status", timeout=10).json()
        assert [m["modelSlug"] for m in status["byModel"]] == ["smollm2-135m"]
        assert "'HuggingFaceTB/SmolLM2-135M-Instruct': 'smollm2-135m'" in agent.output()  # the agent logs the map
    finally:
        pool.stop_agents()
        pool.wait_agent_count(0)


def test_an_unknown_model_is_refused_with_a_reason_the_agent_prints(pool: Pool) -> None:
    for model in ("my-finetune-3b.Q4_K_M.gguf", "my-finetune=my-finetune-3b"):
        proc = pool.agent(pool.standin(), [model], wait=False)
        assert proc.popen.wait(20) == 1
        assert "is not in the pool's directory" in proc.output()
        assert "smollm2-135m" in proc.output()  # it says what is known
    assert pool.agent_count() == 0
    refused = pool.post({"model": "my-finetune", "messages": MSG})
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found"


def test_an_operator_edit_reaches_the_running_coordinator(pool: Pool, tmp_path: Path) -> None:
    env = localpool.coordinator_env(pool.db_url)
    added = localpool.admin(
        env,
        *("models", "add", "--slug", "my-finetune", "--display-name", "My Finetune 3B", "--family", "llama-3.2"),
        *("--parameter-count", "3200000000", "--context-window", "8192", "--use-case", "chat"),
        *("--quantization", "q4_k_m", "--alias", "acme/My-Finetune-3B-Instruct"),
    )
    assert added == "saved my-finetune"
    assert localpool.admin(env, "models", "alias", "--slug", "my-finetune", "--alias", "my-finetune-3b") == (
        "saved my-finetune"
    )
    with pytest.raises(RuntimeError, match="already names 'smollm2-135m'"):
        localpool.admin(env, "models", "alias", "--slug", "my-finetune", "--alias", "SmolLM2-135M-Instruct")
    # within a reload interval, an agent with the new model's file name is admitted
    pool.agent(pool.standin(), ["my-finetune-3b.Q4_K_M.gguf"])
    try:
        entry = models(pool)["my-finetune"]
        fields = ("displayName", "parameterCount", "parameterCountExact", "contextWindow")
        assert tuple(entry[field] for field in fields) == (
            "My Finetune 3B",
            "3.2B",
            3_200_000_000,
            8192,
        )
        assert pool.post({"model": "my-finetune", "messages": MSG}).status_code == 200
    finally:
        pool.stop_agents()
        pool.wait_agent_count(0)
    assert localpool.admin(env, "models", "remove", "--slug", "my-finetune") == "removed my-finetune"
    listed = localpool.admin(env, "models", "list")
    assert '"slug":"smollm2-135m"' in listed and "my-finetune" not in listed
