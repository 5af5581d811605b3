"""Pure functions: keys, prices, protocol codec, SSE parsing, body rewriting, config."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest

from coordinator import audit, catalog, dispatch, keys
from coordinator.dispatch import Dispatcher, Job, output_budget
from coordinator.forward import backend_body, content_problem
from coordinator.metering import TEMPLATE_ALLOWANCE, Meter, Price, output_bound, prompt_bound, prompt_estimate
from coordinator.ratelimit import AddressLimits, FailureLimits, KeyLimits, address_key, duration
from coordinator.registry import ConnectedAgent, Registry
from coordinator.routes.agent_ws import HelloRefused, hello_offers
from coordinator.present import Said, present
from coordinator.routes.chat import XPool
from coordinator.settings import Settings, SettingsError
from coordinator.upstream import Upstream
from provider_agent.config import ConfigError, load
from provider_agent.connection import backoff_delay
from shared import errors, protocol
from shared.backend import Failure, SSEParser, prepare_body
from shared.money import usd_per_million_to_nano_per_token, usd_to_nano
from shared.openai import ChatCompletionRequest
from shared.protocol import Hello, JobCancel, JobChunk, JobDone, ModelOffer, ProtocolError, UnknownMessage, Usage


def test_key_format_and_checksum() -> None:
    secret = keys.generate(keys.CONSUMER_PREFIX)
    assert secret.startswith("pool_live_") and len(secret) == len("pool_live_") + 49
    assert keys.is_well_formed(secret, keys.CONSUMER_PREFIX)
    assert not keys.is_well_formed(secret, keys.AGENT_PREFIX)
    flipped = secret[:-7] + ("A" if secret[-7] != "A" else "B") + secret[-6:]
    assert not keys.is_well_formed(flipped, keys.CONSUMER_PREFIX)
    assert not keys.is_well_formed(secret + "x", keys.CONSUMER_PREFIX)
    assert not keys.is_well_formed(secret[:-1] + "!", keys.CONSUMER_PREFIX)
    assert keys.digest(secret) != keys.digest(keys.generate(keys.CONSUMER_PREFIX))
    assert len(keys.digest(secret)) == 64
    assert keys.display_prefix(secret) == secret[:16]


@pytest.mark.parametrize(
    ("usd", "nano"), [("0", 0), ("1", 1000), ("0.05", 50), ("2.5", 2500), ("0.000001", 0), ("15", 15000)]
)
def test_price_conversion_is_exact(usd: str, nano: int) -> None:
    if usd == "0.000001":
        with pytest.raises(ValueError, match="precision"):
            usd_per_million_to_nano_per_token(usd)
    else:
        assert usd_per_million_to_nano_per_token(usd) == nano


@pytest.mark.parametrize("bad", ["-1", "abc", "nan", "inf"])
def test_bad_prices_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        usd_per_million_to_nano_per_token(bad)


def test_protocol_round_trip_unknown_tag_and_garbage() -> None:
    decoder = protocol.agent_decoder()
    chunk = JobChunk(job_id="j", seq=3, data=b'{"a":1}')
    assert decoder.decode(protocol.encode(chunk)) == chunk
    assert decoder.decode(msgspec.msgpack.encode({"type": "job.eta", "pct": 5})) == UnknownMessage("job.eta")
    # a newer peer's extra fields are ignored
    extended = msgspec.msgpack.encode({"type": "heartbeat", "in_flight": 2, "gpu_temp": 71})
    assert decoder.decode(extended) == protocol.Heartbeat(in_flight=2)
    for garbage in (b"\xc1\xc1", b"", msgspec.msgpack.encode([1, 2]), msgspec.msgpack.encode({"type": "hello"})):
        with pytest.raises(ProtocolError):
            decoder.decode(garbage)
    # the coordinator's messages are not valid from an agent
    assert isinstance(decoder.decode(protocol.encode(protocol.JobCancel(job_id="j"))), UnknownMessage)


def _hello(**kw: object) -> Hello:
    fields: dict[str, object] = {
        "protocol": protocol.PROTOCOL_VERSION,
        "agent_version": "t",
        "models": [ModelOffer("smollm2-135m", "m", 1, 2)],
        "max_concurrency": 2,
    }
    fields.update(kw)
    return Hello(**fields)  # type: ignore[arg-type]


DIRECTORY = catalog.Directory(catalog.shipped())
CEILING = Price(50_000, 200_000)


def hello_refusal(hello: Hello) -> str:
    with pytest.raises(HelloRefused) as refused:
        hello_offers(hello, DIRECTORY, CEILING)
    return str(refused.value)


def test_hello_validation_gives_reasons() -> None:
    assert list(hello_offers(_hello(), DIRECTORY, CEILING)) == ["smollm2-135m"]
    assert "protocol version 99" in hello_refusal(_hello(protocol=99))
    assert "no models" in hello_refusal(_hello(models=[]))
    assert "max_concurrency" in hello_refusal(_hello(max_concurrency=0))
    assert "slug" in hello_refusal(_hello(models=[ModelOffer("Bad Slug", "m", 1, 1)]))
    twice = [ModelOffer("smollm2-135m", "a", 1, 1), ModelOffer("", "SmolLM2-135M-Instruct.Q4_1.gguf", 1, 1)]
    assert "'smollm2-135m' announced twice" in hello_refusal(_hello(models=twice))
    assert "negative" in hello_refusal(_hello(models=[ModelOffer("smollm2-135m", "a", -1, 1)]))
    unknown = hello_refusal(_hello(models=[ModelOffer("", "my-finetune-3b.gguf", 1, 1)]))
    assert "'my-finetune-3b.gguf' is not in the pool's directory" in unknown and "smollm2-135m" in unknown


def test_backend_names_map_to_directory_slugs() -> None:
    """The spellings of llama.cpp files, Hugging Face ids, Ollama tags and vLLM/LM Studio names."""
    cases = {
        "qwen2.5-coder:7b": ("qwen2.5-coder-7b", None),
        "Qwen/Qwen2.5-Coder-7B-Instruct": ("qwen2.5-coder-7b", None),
        "qwen2.5-coder-7b-instruct-q4_k_m.gguf": ("qwen2.5-coder-7b", "q4_k_m"),
        "/models/Qwen2.5-Coder-7B-Instruct-Q5_K_M.gguf": ("qwen2.5-coder-7b", "q5_k_m"),
        "SmolLM2-135M-Instruct.Q4_1.gguf": ("smollm2-135m", "q4_1"),
        "smollm2-135m": ("smollm2-135m", None),
        "HuggingFaceTB/SmolLM2-135M-Instruct": ("smollm2-135m", None),
        "gemma3:270m": ("gemma-3-270m", None),
        "gemma-3-270m-it-Q8_0.gguf": ("gemma-3-270m-it", "q8_0"),
        "meta-llama/Llama-3.1-8B-Instruct-AWQ": ("llama-3.1-8b", "awq"),
    }
    assert {name: DIRECTORY.resolve(name) for name in cases} == cases
    for unknown in ("qwen2.5-coder:14b", "gemma-3-27b", "smollm2-360m", "", "q4_k_m"):
        assert DIRECTORY.resolve(unknown) is None, unknown


def test_directory_edits_replace_add_and_hide_shipped_entries() -> None:
    class Row:
        def __init__(self, slug: str, info: catalog.ModelInfo | None) -> None:
            self.slug, self.removed = slug, info is None
            self.entry = msgspec.json.encode(info) if info else b"{}"

    tiny = catalog.ModelInfo(slug="tiny-1m", display_name="Tiny", family="tiny", aliases=("org/Tiny-1M",))
    renamed = msgspec.structs.replace(DIRECTORY.entries["mistral-7b"], display_name="Mistral 7B v0.3")
    merged = catalog.merge(
        catalog.shipped(), [Row("tiny-1m", tiny), Row("mistral-7b", renamed), Row("gemma-3-270m", None)]
    )
    assert merged.resolve("tiny-1m.Q8_0.gguf") == ("tiny-1m", "q8_0")
    assert merged.entries["mistral-7b"].display_name == "Mistral 7B v0.3"
    assert merged.get("gemma-3-270m") is None and merged.resolve("gemma3:270m") is None
    with pytest.raises(catalog.DirectoryError, match="invalid slug"):
        catalog.check(msgspec.structs.replace(tiny, slug="Tiny Model"))


def test_sse_parser_handles_split_events_and_crlf() -> None:
    parser = SSEParser()
    stream = b'data: {"a":1}\n\ndata: {"b"' + b":2}\r\n\r\n: comment\n\ndata: [DONE]\n\n"
    out: list[bytes] = []
    for i in range(len(stream)):
        out += parser.feed(stream[i : i + 1])
    assert out == [b'{"a":1}', b'{"b":2}', b"[DONE]"]


def test_prepare_body_keeps_unknown_fields_and_forces_usage() -> None:
    raw = b'{"model":"slug","messages":[],"ignore_eos":true,"stream":true,"stream_options":{"x":1}}'
    body = msgspec.json.decode(prepare_body(raw, "backend-name", stream=True))
    assert body["model"] == "backend-name"
    assert body["ignore_eos"] is True
    assert body["stream_options"] == {"x": 1, "include_usage": True}
    assert "stream_options" not in msgspec.json.decode(prepare_body(b'{"model":"a"}', "b", stream=False))


def test_present_shows_the_pool_id_slug_and_api_fields_only() -> None:
    x_pool = XPool(request_id="req_1", provider=1, agent="agt_1", fallback=False, latency_ms=5, cost_usd=0.25)
    backend = (
        b'{"id":"chatcmpl-9","object":"chat.completion","created":3,"model":"/models/q4.gguf",'
        b'"system_fingerprint":"b0-unknown","timings":{"predicted_n":4},"x_pool":{"cost_usd":0},'
        b'"choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],'
        b'"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}'
    )
    shown, said = present(backend, "req_1", "smollm2-135m", x_pool)
    body = msgspec.json.decode(shown)
    assert list(body) == ["id", "object", "created", "model", "choices", "usage", "x_pool"]
    assert (body["id"], body["model"], body["created"]) == ("req_1", "smollm2-135m", 3)
    assert body["x_pool"] == {
        "request_id": "req_1",
        "provider": 1,
        "agent": "agt_1",
        "fallback": False,
        "latency_ms": 5,
        "cost_usd": 0.25,
    }
    assert (said.id, said.model) == ("chatcmpl-9", "/models/q4.gguf")
    chunk, _ = present(b'{"id":"c","model":"m","choices":[{"delta":{"content":"x"}}]}', "req_1", "slug")
    assert msgspec.json.decode(chunk) == {"id": "req_1", "model": "slug", "choices": [{"delta": {"content": "x"}}]}
    # What isn't a JSON object goes out as it came (the audit counts it as garbage).
    for odd in (b"not json", b"[1, 2]", b'"text"', b"\xff\xfe"):
        assert present(odd, "req_1", "slug") == (odd, Said())


def test_agent_config_precedence(tmp_path: Path) -> None:
    config_file = tmp_path / "agent.toml"
    config_file.write_text(
        'coordinator = "http://file:1"\ntoken = "t"\nbackend = "http://b:2"\nmodel = ["a=x"]\n'
        'price_in = "1"\nprice_out = "2"\nmax_concurrency = 3\n'
    )
    env = {"POOL_AGENT_COORDINATOR": "https://env:3", "POOL_AGENT_MODEL": "b,c=y"}
    config = load({"max_concurrency": 7, "model": []}, env, config_file)
    assert config.coordinator_url == "wss://env:3/v1/agent/connect"
    assert config.backend_url == "http://b:2/v1"
    assert [(m.slug, m.backend_model) for m in config.models] == [("", "b"), ("c", "y")]  # "b": the coordinator maps it
    assert (config.price_in, config.price_out, config.max_concurrency) == (1000, 2000, 7)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({}, "missing --coordinator, --token, --backend, --model"),
        ({"coordinator": "ftp://x", "token": "t", "backend": "http://b", "model": ["m"]}, "coordinator URL"),
        ({"coordinator": "http://c", "token": "t", "backend": "b", "model": ["m"]}, "backend URL"),
        ({"coordinator": "http://c", "token": "t", "backend": "http://b", "model": ["m"], "price_in": "x"}, "price-in"),
        (
            {"coordinator": "http://c", "token": "t", "backend": "http://b", "model": ["m"], "max_concurrency": 0},
            "max-concurrency",
        ),
        ({"coordinator": "http://c", "token": "t", "backend": "http://b", "model": ["m", "m=x"]}, "twice"),
    ],
)
def test_agent_config_errors_are_clear(flags: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(flags, {})


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    early = [backoff_delay(0, 0.5, 30) for _ in range(200)]
    late = [backoff_delay(20, 0.5, 30) for _ in range(200)]
    assert all(0.25 <= d <= 0.5 for d in early)
    assert all(0.25 <= d <= 30 for d in late) and max(late) > 10
    assert len(set(late)) > 100  # jittered, not a fixed schedule


def test_coordinator_settings_from_env() -> None:
    settings = Settings.from_env(
        {"POOL_UPSTREAM_MODELS": "a=up-a, b", "POOL_HEARTBEAT_INTERVAL": "2", "POOL_UPSTREAM_BASE_URL": "http://u/v1/"}
    )
    assert settings.upstream_models == {"a": "up-a", "b": "b"}
    assert settings.stale_after == 6
    assert settings.upstream_base_url == "http://u/v1"
    with pytest.raises(SettingsError, match="POOL_HEARTBEAT_INTERVAL"):
        Settings.from_env({"POOL_HEARTBEAT_INTERVAL": "-1"})


# --- metering, limits, money -------------------------------------------------------------------


def test_hold_covers_the_worst_case_and_bills_are_capped() -> None:
    request = msgspec.json.decode(
        b'{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":7}', type=ChatCompletionRequest
    )
    meter = Meter(prompt_bound(b"x" * 100), output_bound(request, 4096))
    assert (meter.prompt_bound, meter.completion_bound) == (100 + TEMPLATE_ALLOWANCE, 7)
    assert meter.hold_amount(Price(2, 3)) == (100 + TEMPLATE_ALLOWANCE) * 2 + 7 * 3
    unbounded = msgspec.json.decode(
        b'{"model":"m","messages":[{"role":"user","content":"hi"}]}', type=ChatCompletionRequest
    )
    assert output_bound(unbounded, 8192) == 8192
    meter.usage = Usage(prompt_tokens=10, completion_tokens=50, total_tokens=60)
    bill = meter.bill(completed=True, stream=False)
    assert (bill.prompt_tokens, bill.completion_tokens, bill.capped, bill.cut) == (10, 7, True, False)
    meter.usage = Usage(prompt_tokens=10, completion_tokens=5, total_tokens=15)
    assert not meter.bill(completed=True, stream=True).capped


def test_cut_streams_bill_only_delivered_text() -> None:
    meter = Meter(100, 50)
    output = audit.Output()
    for chunk in (
        b'{"choices":[{"delta":{"role":"assistant","content":null}}]}',
        b'{"choices":[{"delta":{"content":"Hel"}}]}',
        b'{"choices":[{"delta":{"content": "lo"}}]}',
        b'{"choices":[{"delta":{"content":""}}]}',
        b'{"choices":[{"delta":{"tool_calls":[{"function":{"arguments":"{\\"a"}}]}}]}',
        b'{"choices":[{"delta":{},"finish_reason":"stop"}]}',
        b'{"choices":[],"content":"outside","delta":{"content":"outside"}}',
    ):
        meter.delivered += output.read(chunk)
    assert meter.delivered == 3
    meter.usage = Usage(prompt_tokens=9, completion_tokens=40, total_tokens=49)
    cut = meter.bill(completed=False, stream=True)
    assert (cut.prompt_tokens, cut.completion_tokens, cut.cut) == (0, 3, True)
    hung_up = Meter(100, 50, prompt_tokens_estimate=30)
    hung_up.delivered = 3
    left = hung_up.bill(completed=False, stream=True, consumer_left=True)
    assert (left.prompt_tokens, left.completion_tokens) == (30, 3)  # the prompt was processed
    assert meter.bill(completed=False, stream=False).completion_tokens == 0
    meter.usage = None
    assert meter.bill(completed=True, stream=True).completion_tokens == 3


def test_key_limits_refuse_with_openai_headers() -> None:
    limits = KeyLimits(default_rpm=2, default_tpm=1000)
    first = limits.admit(1, estimate=10)
    assert first.allowed and first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-limit-tokens"] == "1000"
    assert limits.admit(1, estimate=10).allowed
    refused = limits.admit(1, estimate=10)
    assert (
        not refused.allowed and refused.retry_after >= 1 and refused.headers["retry-after"] == str(refused.retry_after)
    )
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert limits.admit(2, estimate=10).allowed  # other keys are untouched
    tokens = KeyLimits(default_rpm=100, default_tpm=100)
    assert tokens.admit(3, estimate=60).allowed
    tokens.correct(3, 200)  # the request used far more than estimated: the bucket is in debt
    assert not tokens.admit(3, estimate=1).allowed
    assert KeyLimits(1, 1).admit(4, 0, rpm=5, tpm=5).headers["x-ratelimit-limit-requests"] == "5"
    assert (duration(0.02), duration(1.0), duration(61), duration(360)) == ("20ms", "1s", "1m1s", "6m0s")


def test_failed_authentications_block_a_client() -> None:
    failures = FailureLimits(per_minute=3)
    for _ in range(3):
        assert failures.blocked("10.0.0.1") == 0
        failures.failed("10.0.0.1")
    assert failures.blocked("10.0.0.1") >= 1
    assert failures.blocked("10.0.0.2") == 0


@pytest.mark.parametrize(
    ("value", "nano"), [("10", 10_000_000_000), (0.25, 250_000_000), ("0.000000001", 1), (3, 3_000_000_000)]
)
def test_usd_amounts_convert_exactly(value: object, nano: int) -> None:
    assert usd_to_nano(value, 1_000_000) == nano  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["abc", "-1", "0", "0.0000000001", "NaN", "Infinity", True, "1000001"])
def test_bad_usd_amounts_are_refused(value: object) -> None:
    with pytest.raises(ValueError):
        usd_to_nano(value, 1_000_000)  # type: ignore[arg-type]


def test_money_settings() -> None:
    settings = Settings.from_env({"POOL_PLATFORM_FEE": "0.125", "POOL_UPSTREAM_PRICE_OUT": "2.5"})
    assert (settings.fee_bps, settings.upstream_price_out) == (1250, 2500)
    for name, raw in (
        ("PLATFORM_FEE", "1.5"),
        ("PLATFORM_FEE", "0.12345"),
        ("JWT_ALGORITHMS", "HS256,RS256"),
        ("JWT_ALGORITHMS", "none"),
        ("RATE_LIMIT_RPM", "0"),
    ):
        with pytest.raises(SettingsError):
            Settings.from_env({f"POOL_{name}": raw})


# --- what a hostile agent or consumer can claim (issue 15) --------------------------------------


def test_output_counts_only_text_inside_the_choices_and_bounds_tool_calls() -> None:
    output = audit.Output()
    payloads = [
        b'{"choices":[{"delta":{"content":"one"}}]}',
        b'{"choices":[{"delta":{"content":"\xc3\xa9t\xc3\xa9"}}]}',  # 4 non-ASCII bytes: up to 5 tokens
        b'{"choices":[{"delta":{"refusal":"no"}}]}',
        b'{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"name":"get","arguments":""}}]}}]}',
        b'{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\\"a\\":1}"}}]}}]}',
        b'{"content":"outside","choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}',
        b'{"usage":{"completion_tokens":9},"delta":{"content":"nope"}}',
    ]
    assert [output.read(p) for p in payloads] == [1, 1, 1, 0, 1, 0, 0]
    assert output.deltas == 4
    # 1 + (1 + 4 non-ASCII bytes) + 1, the call's allowance and name, its arguments' bytes
    assert output.token_bound == 1 + 5 + 1 + audit.TOOL_CALL_ALLOWANCE + 3 + 7
    assert output.tool_calls == 1 and output.finish_reason == "tool_calls"
    assert output.text == "oneéténo"
    whole = audit.Output()
    assert whole.read(b'{"choices":[{"message":{"role":"assistant","content":"hello"}}]}') == 1
    assert whole.token_bound == 5  # a whole reply is bounded by its bytes


def test_the_audit_counts_tool_calls_and_prompt_reports() -> None:
    output = audit.read_output([b'{"choices":[{"delta":{"content":"a"},"finish_reason":null}]}'] * 5)
    output.read(b'{"choices":[{"delta":{"tool_calls":[{"function":{"name":"f","arguments":"{}"}}]}}]}')
    job = audit.Job(
        stream=True,
        delivered=5,
        reported=Usage(prompt_tokens=10**9, completion_tokens=10**9),
        output=output,
        seconds=1.0,
        parameter_count=None,
        prompt_bound=300,
        prompt_estimate=7,
    )
    verdict = audit.judge(job)
    assert [kind for kind, _ in verdict.findings] == ["usage_inflated", "usage_inflated"]
    assert verdict.completion_tokens == 5 + audit.TOOL_CALL_ALLOWANCE + 1 + 2
    assert verdict.prompt_tokens == 7


def test_output_keeps_a_bounded_text_for_the_sanity_checks() -> None:
    output = audit.Output()
    piece = b'{"choices":[{"delta":{"content":"' + b"y" * 10_000 + b'"}}]}'
    for _ in range(20):
        output.read(piece)
    assert len(output.text) == audit.TEXT_KEPT
    assert output.deltas == 20


def test_prompt_estimate_counts_message_text() -> None:
    request = msgspec.json.decode(
        b'{"model":"m","messages":[{"role":"system","content":"12345678"},'
        b'{"role":"user","content":[{"type":"text","text":"abcd"},{"type":"image_url","image_url":{"url":"data:x"}}]}]}',
        type=ChatCompletionRequest,
    )
    assert prompt_estimate(request) == 12 // 4 + 2 * 4


def test_backends_get_only_the_api_and_the_priced_output_limit() -> None:
    raw = (
        b'{"model":"m","messages":[],"n_predict":4096,"ignore_eos":true,"top_k":5,'
        b'"max_completion_tokens":900,"options":{"num_predict":9},"provider":{"sort":"price"}}'
    )
    assert msgspec.json.decode(backend_body(raw, 10)) == {
        "model": "m",
        "messages": [],
        "top_k": 5,
        "max_completion_tokens": 10,
    }
    assert msgspec.json.decode(backend_body(b'{"model":"m","messages":[],"max_tokens":99}', 10))["max_tokens"] == 10
    assert msgspec.json.decode(backend_body(b'{"model":"m","messages":[]}', 10))["max_tokens"] == 10


@pytest.mark.parametrize(
    ("part", "param"),
    [
        ({"type": "image_url", "image_url": {"url": "http://10.0.0.1/x.png"}}, "messages[0].content[0].image_url.url"),
        ({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}, "messages[0].content[0].image_url.url"),
        ({"type": "file", "text": "x"}, "messages[0].content[0].type"),
    ],
)
def test_content_parts_that_name_urls_are_refused(part: dict[str, object], param: str) -> None:
    body = msgspec.json.encode({"model": "m", "messages": [{"role": "user", "content": [part]}]})
    problem = content_problem(msgspec.json.decode(body, type=ChatCompletionRequest))
    assert problem is not None and problem[0] == param
    inline = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    body = msgspec.json.encode({"model": "m", "messages": [{"role": "user", "content": [inline]}]})
    assert content_problem(msgspec.json.decode(body, type=ChatCompletionRequest)) is None


def test_prices_above_the_ceiling_are_refused_at_hello() -> None:
    for price_in, price_out in ((50_001, 1), (1, 200_001), (2**62, 2**62)):
        hello = _hello()
        offer = msgspec.structs.replace(hello.models[0], price_in=price_in, price_out=price_out)
        with pytest.raises(HelloRefused, match="ceiling"):
            hello_offers(msgspec.structs.replace(hello, models=[offer]), DIRECTORY, CEILING)
    entry = msgspec.structs.replace(DIRECTORY.entries["smollm2-135m"], max_price_in=7, max_price_out=8)
    assert entry.ceiling(CEILING) == Price(7, 8)
    with pytest.raises(catalog.DirectoryError):
        catalog.check(msgspec.structs.replace(entry, max_price_out=catalog.MAX_PRICE + 1))


def test_one_token_is_one_identity_for_concurrency_and_speed() -> None:
    registry = Registry()
    agents = [
        ConnectedAgent(f"agt_{i}", 1, 7, {}, max_concurrency=4, link=None, last_seen=0.0)  # type: ignore[arg-type]
        for i in range(3)
    ]
    for agent in agents:
        agent.concurrency_cap = 2
        registry.add(agent)
    assert registry.of_token(7) == 3
    assert len({id(agent.share) for agent in agents}) == 1
    agents[0].in_flight = agents[0].share.in_flight = 2
    assert [agent.free_slots for agent in agents] == [0, 0, 0]
    agents[0].concurrency_cap = agents[1].concurrency_cap = agents[2].concurrency_cap = None
    assert [agent.free_slots for agent in agents] == [2, 4, 4]


def test_output_budget_grows_with_the_bound_and_logprobs() -> None:
    assert output_budget(10, False) < output_budget(10, True) < output_budget(1000, True)
    assert output_budget(10, False) < 100_000


def test_deeply_nested_frames_are_protocol_errors() -> None:
    decoder = protocol.agent_decoder()
    with pytest.raises(ProtocolError):
        decoder.decode(b"\x91" * 100_000 + b"\xc0")
    with pytest.raises(ProtocolError):
        decoder.decode(b"\x81\xa4type" + b"\x91" * 100_000 + b"\xc0")


class _Outbox:
    """The agent's end of the socket, as the job table sees it: what was sent to it."""

    def __init__(self) -> None:
        self.sent: list[object] = []

    async def send(self, message: object) -> None:
        self.sent.append(message)

    async def close(self, code: int, reason: str) -> None:
        self.sent.append(("close", code))


async def _job_on_an_agent(budget: int) -> tuple[Dispatcher, ConnectedAgent, Job, _Outbox]:
    registry = Registry()
    outbox = _Outbox()
    agent = ConnectedAgent("agt_x", 1, 1, {"m": ModelOffer("m", "m", 1, 1)}, 4, outbox, 0.0)
    registry.add(agent)
    dispatcher = Dispatcher(registry, Upstream(None, None, {}, 5.0), 5.0, 60.0)
    job = await dispatcher.assign(agent, "m", b"{}", stream=True, want_usage=False, budget=budget)
    return dispatcher, agent, job, outbox


async def test_a_backlog_makes_the_agents_socket_wait_for_the_consumer() -> None:
    dispatcher, agent, job, _ = await _job_on_an_agent(budget=64 * 1024 * 1024)
    piece = b"x" * (256 * 1024)
    for seq in range(4):  # 1 MiB waiting: the high-water mark
        assert await dispatcher.on_chunk(agent, JobChunk(job_id=job.job_id, seq=seq, data=piece))
    blocked = asyncio.ensure_future(dispatcher.on_chunk(agent, JobChunk(job_id=job.job_id, seq=4, data=piece)))
    await asyncio.sleep(0.05)
    assert not blocked.done()  # the agent's reader waits: nothing more is read from its socket
    for _ in range(3):  # the consumer reads, not yet down to the low-water mark
        await job.next(1.0)
    await asyncio.sleep(0.05)
    assert not blocked.done()
    await job.next(1.0)  # now it is: the agent's socket is read again
    await asyncio.wait_for(blocked, 1.0)
    assert job.queued == dispatch.QUEUE_LOW


async def test_a_consumer_that_never_reads_has_its_own_job_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "DRAIN_TIMEOUT", 0.2)
    dispatcher, agent, job, outbox = await _job_on_an_agent(budget=64 * 1024 * 1024)
    piece = b"x" * (512 * 1024)
    for seq in range(3):
        await dispatcher.on_chunk(agent, JobChunk(job_id=job.job_id, seq=seq, data=piece))
    assert job.finished and agent.in_flight == 0
    events = job.ready()
    assert isinstance(events[-1], Failure) and events[-1].code == errors.CONSUMER_TOO_SLOW
    await asyncio.sleep(0)
    assert any(isinstance(m, JobCancel) for m in outbox.sent)


async def test_output_past_the_budget_ends_the_job_and_frames_for_others_are_ignored() -> None:
    dispatcher, agent, job, outbox = await _job_on_an_agent(budget=1000)
    other = ConnectedAgent("agt_y", 2, 2, {"m": ModelOffer("m", "m", 1, 1)}, 4, _Outbox(), 0.0)
    assert not await dispatcher.on_chunk(other, JobChunk(job_id=job.job_id, seq=0, data=b"stolen"))
    assert not dispatcher.on_done(other, JobDone(job_id=job.job_id))
    assert job.queue.empty()
    assert await dispatcher.on_chunk(agent, JobChunk(job_id=job.job_id, seq=0, data=b"x" * 1001))
    (event,) = job.ready()
    assert isinstance(event, Failure) and event.code == errors.OUTPUT_OVERRUN
    assert not await dispatcher.on_chunk(agent, JobChunk(job_id=job.job_id, seq=1, data=b"late"))
    await asyncio.sleep(0)
    assert any(isinstance(m, JobCancel) for m in outbox.sent)


def test_signups_are_counted_per_address_and_per_ipv6_64() -> None:
    limits = AddressLimits(2, 3600.0)
    assert limits.take("2001:db8::1") == 0 and limits.take("2001:db8::ffff:1") == 0
    assert 0 < limits.take("2001:db8::1:0:0:2") <= 1800  # the same /64: one signup refills in 30 min
    assert limits.take("2001:db8:0:1::1") == 0  # another /64
    assert limits.take("192.0.2.1") == 0 and limits.take("::ffff:192.0.2.1") == 0
    assert limits.take("192.0.2.1") > 0  # an IPv4-mapped address is that IPv4 address
    assert address_key("unknown") == "unknown"
