"""Rate limits: per key (with OpenAI's headers), failed authentications and signups per address."""

from __future__ import annotations

from coordinator.core.ratelimit import AddressLimits, FailureLimits, KeyLimits, address_key, duration


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


def test_signups_are_counted_per_address_and_per_ipv6_64() -> None:
    limits = AddressLimits(2, 3600.0)
    assert limits.take("2001:db8::1") == 0 and limits.take("2001:db8::ffff:1") == 0
    assert 0 < limits.take("2001:db8::1:0:0:2") <= 1800  # the same /64: one signup refills in 30 min
    assert limits.take("2001:db8:0:1::1") == 0  # another /64
    assert limits.take("192.0.2.1") == 0 and limits.take("::ffff:192.0.2.1") == 0
    assert limits.take("192.0.2.1") > 0  # an IPv4-mapped address is that IPv4 address
    assert address_key("unknown") == "unknown"
