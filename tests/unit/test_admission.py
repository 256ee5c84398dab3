"""Admission: the plans' limits, reserved concurrency and burst credit, on a fake clock."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from hxb.concurrency import PLANS, Admission, Ticket, plan_named
from hxb.errors import ClientError, ThrottledError
from hxb.models import LATEST, FunctionRevision
from hxb.runtimes import RuntimeInfo
from hxb.spec import FunctionConfig

RUNTIME = RuntimeInfo(name="python3.11", family="python", version="3.11.2", executable=Path(sys.executable))
REFILL_S = 60.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def revision(name: str, *, workspace: str = "ws", reserved: int | None = None) -> FunctionRevision:
    return FunctionRevision(
        workspace=workspace,
        name=name,
        version=LATEST,
        revision_id="r1",
        config=FunctionConfig(name=name, reserved_concurrency=reserved),
        code_dir=Path("/code") / name,
        code_sha256="0" * 64,
        code_size_bytes=0,
        runtime=RUNTIME,
        region="local",
        last_modified="2024-01-01T00:00:00Z",
    )


def admission(plan: str = "single") -> tuple[Admission, Clock]:
    clock = Clock()
    adm = Admission(burst_refill_s=REFILL_S, clock=clock)
    adm.set_plan("ws", plan_named(plan))
    return adm, clock


def enter_many(adm: Admission, rev: FunctionRevision, count: int) -> list[Ticket]:
    return [adm.enter(rev) for _ in range(count)]


def test_the_plans_are_the_seeds_table() -> None:
    table = {n: (p.default_concurrency, p.reserved_cap, p.burst_concurrency) for n, p in PLANS.items()}
    assert table == {"single": (10, 0, 50), "team": (100, 50, 500), "enterprise": (1000, 500, 3000)}
    assert plan_named("single_user") is PLANS["single"]
    with pytest.raises(ClientError, match="unknown plan 'gold'"):
        plan_named("gold")


def test_default_concurrency_always_then_burst_up_to_its_ceiling() -> None:
    adm, _ = admission("single")
    fn = revision("fn")
    enter_many(adm, fn, 50)  # 10 by default, 40 on burst credit
    with pytest.raises(ThrottledError, match="burst concurrency of 50") as caught:
        adm.enter(fn)
    assert caught.value.retry_after_s >= 1
    limits = adm.workspace_limits("ws")
    assert (limits.concurrent_executions, limits.burst_credit, limits.throttles) == (50, 0, 1)


def test_spent_burst_credit_holds_the_workspace_at_its_default_until_it_refills() -> None:
    adm, clock = admission("single")
    fn = revision("fn")
    tickets = enter_many(adm, fn, 50)
    for ticket in tickets:
        ticket.release()
    enter_many(adm, fn, 10)  # the default never needs credit
    with pytest.raises(ThrottledError, match="burst credit is spent") as caught:
        adm.enter(fn)
    per_credit_s = REFILL_S / 40
    assert caught.value.retry_after_s == pytest.approx(max(1.0, per_credit_s))
    clock.now += per_credit_s  # one credit back
    adm.enter(fn)
    with pytest.raises(ThrottledError):
        adm.enter(fn)
    clock.now += REFILL_S  # full again, and no more than full
    assert adm.workspace_limits("ws").burst_credit == 40
    enter_many(adm, fn, 39)  # 11 + 39 = 50
    with pytest.raises(ThrottledError, match="burst concurrency of 50"):
        adm.enter(fn)


def test_a_reservation_caps_its_function_and_zero_throttles_it() -> None:
    adm, _ = admission("team")
    capped, off = revision("capped", reserved=3), revision("off", reserved=0)
    adm.set_reservation("ws", "capped", 3)
    enter_many(adm, capped, 3)
    with pytest.raises(ThrottledError, match="reserved concurrency of 3"):
        adm.enter(capped)
    with pytest.raises(ThrottledError, match="reserved_concurrency 0"):
        adm.enter(off)
    assert adm.function_usage("ws", "capped").throttles == 1
    assert adm.function_usage("ws", "off").throttles == 1
    assert adm.workspace_limits("ws").throttles == 2


def test_reservations_are_carved_out_of_the_unreserved_pool() -> None:
    adm, _ = admission("team")
    adm.set_reservation("ws", "batch", 50)
    batch, other = revision("batch", reserved=50), revision("other")
    enter_many(adm, batch, 50)
    enter_many(adm, other, 450)  # 100 - 50 by default, burst 500 - 50
    with pytest.raises(ThrottledError, match="burst concurrency of 450"):
        adm.enter(other)
    limits = adm.workspace_limits("ws")
    assert (limits.unreserved_limit, limits.concurrent_executions, limits.unreserved_executions) == (50, 500, 450)


def test_reservations_beyond_the_plans_cap_are_refused() -> None:
    adm, _ = admission("team")
    assert adm.reserve("ws", "a", 30) is None
    with pytest.raises(ClientError, match=r"reserve 51 .*allows at most 50 in total \(30 reserved by other"):
        adm.reserve("ws", "b", 21)
    adm.reserve("ws", "b", 20)
    assert adm.reserve("ws", "a", 10) == 30  # lowering one's own reservation is always fine
    adm.reserve("ws", "c", 20)
    assert adm.workspace_limits("ws").reserved_total == 50


def test_the_single_plan_has_no_reservations_but_zero_throttles() -> None:
    adm, _ = admission("single")
    with pytest.raises(ClientError, match="not available on the single plan"):
        adm.check_reservation("ws", "fn", 1)
    adm.check_reservation("ws", "fn", 0)
    adm.check_reservation("ws", "fn", None)


def test_a_plan_that_cannot_hold_the_reservations_is_refused() -> None:
    adm, _ = admission("enterprise")
    adm.reserve("ws", "big", 200)
    with pytest.raises(ClientError, match=r"reserves 200 .*big \(200\).*team plan allows at most 50"):
        adm.set_plan("ws", plan_named("team"))
    assert adm.workspace_limits("ws").plan == "enterprise"
    adm.set_reservation("ws", "big", 40)
    adm.set_plan("ws", plan_named("team"))
    assert adm.workspace_limits("ws").plan == "team"


def test_moving_to_a_bigger_plan_grants_its_extra_burst_credit() -> None:
    adm, _ = admission("single")
    fn = revision("fn")
    for ticket in enter_many(adm, fn, 50):
        ticket.release()
    adm.set_plan("ws", plan_named("team"))
    assert adm.workspace_limits("ws").burst_credit == 400 - 40


def test_release_frees_the_slot_once() -> None:
    adm, _ = admission("team")
    adm.set_reservation("ws", "fn", 1)
    fn = revision("fn", reserved=1)
    ticket = adm.enter(fn)
    ticket.release()
    ticket.release()
    assert adm.workspace_limits("ws").concurrent_executions == 0
    adm.enter(fn)
    with pytest.raises(ThrottledError):
        adm.enter(fn)


def test_unknown_workspace_is_a_clear_error() -> None:
    adm, _ = admission()
    with pytest.raises(ClientError, match="workspace 'elsewhere' does not exist"):
        adm.enter(revision("fn", workspace="elsewhere"))
