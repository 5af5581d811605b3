"""Trust scores: the prior, the weight of each kind of evidence, decay, and the new-agent cap."""

from __future__ import annotations

import pytest

from coordinator.trust import scores as trust
from coordinator.trust.scores import Evidence, Reputation, reputation_of

HOUR = 3600.0


def test_new_agents_start_at_50_and_one_clear_cheat_sinks_them() -> None:
    assert Reputation().score() == 50.0
    for kind in (trust.USAGE_INFLATED, trust.IMPLAUSIBLE_SPEED, trust.BAD_OUTPUT, trust.STALLED, trust.CANARY_FAILED):
        reputation = Reputation()
        reputation.add(trust.WEIGHTS[kind], 1000.0, HOUR)
        assert reputation.score() < 40.0, kind
    # an honest hiccup does not: one failure, one lost heartbeat
    reputation = Reputation()
    reputation.add(trust.WEIGHTS[trust.FAILED], 1000.0, HOUR)
    assert reputation.score() > 40.0
    reputation.add(trust.WEIGHTS[trust.COMPLETED], 1001.0, HOUR)
    reputation.add(trust.WEIGHTS[trust.HEARTBEAT_MISSED], 1002.0, HOUR)
    assert reputation.score() > 40.0


def test_scores_decay_toward_the_prior_and_add_up_from_stored_evidence() -> None:
    evidence = [Evidence(1, 1, trust.COMPLETED, 0.0, count=20), Evidence(1, 1, trust.USAGE_INFLATED, 10.0)]
    now = reputation_of(evidence, HOUR, 10.0)
    assert now.score() == pytest.approx(100 * 23 / (23 + 11))
    later = reputation_of(evidence, HOUR, 10.0 + 10 * HOUR)
    assert abs(later.score() - 50.0) < 1.0  # ten half-lives on, next to nothing is left
    # order of arrival does not matter, the times do
    assert reputation_of(list(reversed(evidence)), HOUR, 10.0).score() == pytest.approx(now.score())
    # incremental adding equals recomputing
    incremental = Reputation()
    for item in evidence:
        incremental.add(item.weight, item.at, HOUR, item.count)
    incremental.decay_to(10.0 + HOUR, HOUR)
    assert incremental.score() == pytest.approx(reputation_of(evidence, HOUR, 10.0 + HOUR).score())


def test_trust_limits_concurrency_until_trusted() -> None:
    assert trust.concurrency_cap(50.0, 2) == 2
    assert trust.concurrency_cap(trust.TRUSTED, 2) is None
