"""Pure functions: keys, prices, protocol codec, SSE parsing, body rewriting, config."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from coordinator import catalog, keys
from coordinator.metering import TEMPLATE_ALLOWANCE, Meter, Price, output_bound, prompt_bound, text_deltas
from coordinator.ratelimit import AddressLimits, FailureLimits, KeyLimits, address_key, duration
from coordinator.routes.agent_ws import HelloRefused, hello_offers
from coordinator.routes.chat import XPool, stamp
from coordinator.settings import Settings, SettingsError
from provider_agent.config import ConfigError, load
from provider_agent.connection import backoff_delay
from shared import protocol
from shared.backend import SSEParser, prepare_body
from shared.money import usd_per_million_to_nano_per_token, usd_to_nano
from shared.openai import ChatCompletionRequest
from shared.protocol import Hello, JobChunk, ModelOffer, ProtocolError, UnknownMessage, Usage


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
    assert decoder.decode(msgspec.msgpack.encode({"type": "job.progress", "pct": 5})) == UnknownMessage("job.progress")
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


def hello_refusal(hello: Hello) -> str:
    with pytest.raises(HelloRefused) as refused:
        hello_offers(hello, DIRECTORY)
    return str(refused.value)


def test_hello_validation_gives_reasons() -> None:
    assert list(hello_offers(_hello(), DIRECTORY)) == ["smollm2-135m"]
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


def test_stamp_adds_x_pool_without_reparsing() -> None:
    x_pool = XPool(request_id="req_1", provider=1, agent="agt_1", fallback=False, latency_ms=5, cost_usd=0.25)
    stamped = msgspec.json.decode(stamp(b'{"id":"c","choices":[]}\n', x_pool))
    assert stamped["x_pool"] == {
        "request_id": "req_1",
        "provider": 1,
        "agent": "agt_1",
        "fallback": False,
        "latency_ms": 5,
        "cost_usd": 0.25,
    }
    assert msgspec.json.decode(stamp(b"{}", x_pool))["x_pool"]["agent"] == "agt_1"


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
    for chunk in (
        b'{"choices":[{"delta":{"role":"assistant","content":null}}]}',
        b'{"choices":[{"delta":{"content":"Hel"}}]}',
        b'{"choices":[{"delta":{"content": "lo"}}]}',
        b'{"choices":[{"delta":{"content":""}}]}',
        b'{"choices":[{"delta":{"tool_calls":[{"function":{"arguments":"{\\"a"}}]}}]}',
        b'{"choices":[{"delta":{},"finish_reason":"stop"}]}',
    ):
        meter.delivered += text_deltas(chunk)
    assert meter.delivered == 3
    meter.usage = Usage(prompt_tokens=9, completion_tokens=40, total_tokens=49)
    cut = meter.bill(completed=False, stream=True)
    assert (cut.prompt_tokens, cut.completion_tokens, cut.cut) == (0, 3, True)
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


def test_signups_are_counted_per_address_and_per_ipv6_64() -> None:
    limits = AddressLimits(2, 3600.0)
    assert limits.take("2001:db8::1") == 0 and limits.take("2001:db8::ffff:1") == 0
    assert 0 < limits.take("2001:db8::1:0:0:2") <= 1800  # the same /64: one signup refills in 30 min
    assert limits.take("2001:db8:0:1::1") == 0  # another /64
    assert limits.take("192.0.2.1") == 0 and limits.take("::ffff:192.0.2.1") == 0
    assert limits.take("192.0.2.1") > 0  # an IPv4-mapped address is that IPv4 address
    assert address_key("unknown") == "unknown"
