"""Clawback: which paid jobs a canary verdict vouches for, which it refunds, and the confirmation
on distinct prompts a disagreement needs before any refund."""

from __future__ import annotations

import time

from coordinator.money.clawback import Clawback
from coordinator.money.requestlog import RequestRecord


def test_a_canary_verdict_vouches_for_jobs_before_its_answer_and_refunds_the_rest() -> None:
    clawback = Clawback(engine=None, leases=None)  # type: ignore[arg-type]
    token = 7
    for n, agent in enumerate(["agt_a", "agt_a", "agt_b", "agt_a"]):  # agt_b: the token reconnected
        record = RequestRecord(id=f"req_{n}", user_id=1, key_id=None, provider_user_id=2, cost=100, provider_earned=90)
        clawback.served(token, agent, "m", record)
    jobs = list(clawback.unvouched[(token, "m")])
    clawback.vouched(token, "agt_a", "m", answered_at=jobs[1].at)  # agt_a answered after its first two jobs
    assert [job.request_id for job in clawback.unvouched[(token, "m")]] == ["req_2", "req_3"]
    clawback.discredited(token, "m")  # a later canary failed: every job not vouched for, reconnects too
    assert [job.request_id for job in clawback.due] == ["req_2", "req_3"]
    late = RequestRecord(id="req_late", user_id=1, key_id=None, provider_user_id=2, cost=50, provider_earned=45)
    clawback.served(token, "agt_a", "m", late)  # still running when the verdict came: refunded as it ends
    assert [job.request_id for job in clawback.due] == ["req_2", "req_3", "req_late"]
    clawback.vouched(token, "agt_a", "m", answered_at=time.monotonic())  # passing again ends that
    clawback.served(
        token, "agt_a", "m", RequestRecord(id="req_next", user_id=1, key_id=None, provider_user_id=2, cost=5)
    )
    assert len(clawback.due) == 3 and (token, "m") in clawback.unvouched
    clawback.served(8, "agt_c", "m", RequestRecord(id="req_other", user_id=1, key_id=None, provider_user_id=3, cost=5))
    clawback.discredited(token, "m")
    assert [job.request_id for job in clawback.unvouched[(8, "m")]] == ["req_other"]  # another token stands apart
    free = RequestRecord(id="req_free", user_id=1, key_id=None, provider_user_id=2, cost=0)
    clawback.served(9, "agt_d", "m", free)  # nothing paid, nothing to give back
    assert (9, "m") not in clawback.unvouched


def test_a_disagreement_refunds_only_once_confirmed_on_distinct_prompts() -> None:
    clawback = Clawback(engine=None, leases=None, confirmations=2)  # type: ignore[arg-type]

    def serve(n: int) -> None:
        record = RequestRecord(id=f"req_{n}", user_id=1, key_id=None, provider_user_id=2, cost=100, provider_earned=90)
        clawback.served(7, "agt_a", "m", record)

    serve(1)
    assert not clawback.disagreed(7, "m", "p1") and clawback.due == []  # one odd answer: a strike
    assert not clawback.disagreed(7, "m", "p1") and clawback.due == []  # the same prompt again: still one
    clawback.vouched(7, "agt_b", "m", answered_at=0.0)  # a pass in between clears the strikes
    assert not clawback.disagreed(7, "m", "p2")
    serve(2)
    assert clawback.disagreed(7, "m", "p3")  # two distinct prompts without a pass: confirmed
    assert [job.request_id for job in clawback.due] == ["req_1", "req_2"]
    serve(3)  # and what ends after it, until a pass
    assert [job.request_id for job in clawback.due] == ["req_1", "req_2", "req_3"]
