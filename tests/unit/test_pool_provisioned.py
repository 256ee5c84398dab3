"""Provisioned concurrency and the node memory budget of PoolManager, with the real Worker on
FakeSandboxes: instances started ahead of demand and served first, replaced when they die,
resized without a restart; evictions and 429s when the memory budget is used up."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from hxb.config import LogSettings, PoolSettings, host_memory_budget_mb, load_settings
from hxb.errors import ConfigError, ThrottledError
from hxb.models import FunctionRevision
from hxb.pool.manager import PoolManager
from hxb.sandbox.base import SandboxSpec
from hxb.testing import FakeSandbox, FakeSandboxFactory, exit_status, fail_init, hang, wait_until
from tests.unit.test_pool_manager import Harness, PrecompiledCatalog, held, request, running, stats


class RecordingFactory(FakeSandboxFactory):
    """Also records, at each start, which earlier fakes had exited by then."""

    def __init__(self) -> None:
        super().__init__()
        self.exited_at_start: list[list[bool]] = []

    async def start(self, spec: SandboxSpec) -> FakeSandbox:
        self.exited_at_start.append([s.exited for s in self.sandboxes])
        return await super().start(spec)


@dataclasses.dataclass
class Provisioned(Harness):
    factory: FakeSandboxFactory = dataclasses.field(default_factory=RecordingFactory)

    def pool(self, *, retry_s: float = 10.0, **settings: Any) -> PoolManager:
        pool = PoolManager(
            PoolSettings(**settings),
            LogSettings(),
            self.factory,
            PrecompiledCatalog(self.tmp_path / "runtimes"),
            self.events.append,
            provisioned_retry_s=retry_s,
        )
        self.pools.append(pool)
        return pool

    def function(self, name: str = "echo", *, memory: int = 128, timeout_s: float | None = None) -> FunctionRevision:
        revision = self.revision(name, timeout_s=timeout_s)
        return dataclasses.replace(revision, config=revision.config.model_copy(update={"memory": memory}))

    def report(self, invocation_id: str) -> str:
        [line] = [m for m in self.messages(invocation_id) if m.startswith("REPORT")]
        return line


@pytest.fixture
async def harness(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> AsyncIterator[Provisioned]:
    async with running(Provisioned(tmp_path), caplog) as h:
        yield h


def warnings(caplog: pytest.LogCaptureFixture, message: str) -> int:
    return sum(1 for r in caplog.records if r.levelno == logging.WARNING and r.getMessage() == message)


# --- provisioned concurrency ----------------------------------------------------------------------


async def test_provisioned_instances_start_in_the_background_before_any_invocation(harness: Provisioned) -> None:
    pool = harness.pool()
    fn = harness.function()

    pool.set_provisioned(fn, 2)
    assert harness.factory.started == []  # the call did not wait for them
    assert pool.statistics() == stats(instances=2, starting=2)
    await pool.wait_provisioned(fn.key)

    assert len(harness.factory.started) == 2
    assert all(s.ready_calls == 1 for s in harness.factory.sandboxes)
    assert harness.invokes_received() == 0
    assert pool.statistics() == stats(instances=2, idle=2, provisioned=2)
    assert pool.function_statistics("default", "echo").provisioned == 2


async def test_provisioned_instance_is_told_its_initialization_type(harness: Provisioned) -> None:
    pool = harness.pool()
    fn = harness.function()
    await pool.invoke(fn, request())
    pool.set_provisioned(fn, 1)
    await pool.wait_provisioned(fn.key)

    on_demand, provisioned = harness.factory.started
    assert on_demand.env["AWS_LAMBDA_INITIALIZATION_TYPE"] == "on-demand"
    assert provisioned.env["AWS_LAMBDA_INITIALIZATION_TYPE"] == "provisioned-concurrency"


async def test_provisioned_instance_is_used_before_an_idle_on_demand_one(harness: Provisioned) -> None:
    pool = harness.pool()
    fn = harness.function()
    await pool.invoke(fn, request())  # leaves an on-demand instance idle
    pool.set_provisioned(fn, 1)
    await pool.wait_provisioned(fn.key)
    on_demand, provisioned = harness.factory.sandboxes

    await pool.invoke(fn, request())

    assert len(provisioned.runtime.invokes) == 1
    assert len(on_demand.runtime.invokes) == 1


async def test_invocation_on_a_provisioned_instance_reports_no_init_duration(harness: Provisioned) -> None:
    pool = harness.pool()
    fn = harness.function()
    pool.set_provisioned(fn, 1)
    await pool.wait_provisioned(fn.key)

    result = await pool.invoke(fn, request(invocation_id="inv-first"))

    assert result.init_duration_ms is None
    assert "Init Duration" not in harness.report("inv-first")
    assert harness.report("inv-first").startswith("REPORT RequestId: inv-first\tDuration: ")
    assert pool.statistics() == stats(instances=1, idle=1, provisioned=1, warm_starts=1)


async def test_busy_provisioned_instance_lets_more_invocations_start_on_demand(harness: Provisioned) -> None:
    gate = asyncio.Event()
    harness.factory.behaviour = held(gate)
    pool = harness.pool()
    fn = harness.function()
    pool.set_provisioned(fn, 1)
    await pool.wait_provisioned(fn.key)

    first = asyncio.create_task(pool.invoke(fn, request(b"1", invocation_id="inv-1")))
    await harness.wait_running(1)
    second = asyncio.create_task(pool.invoke(fn, request(b"2", invocation_id="inv-2")))
    await harness.wait_running(2)
    gate.set()

    assert (await first).init_duration_ms is None
    assert (await second).init_duration_ms is not None  # a cold start on demand
    assert "\tInit Duration: " in harness.report("inv-2")
    assert pool.statistics() == stats(instances=2, idle=2, provisioned=1, cold_starts=1, warm_starts=1)


async def test_provisioned_instance_that_exits_while_idle_is_replaced(harness: Provisioned) -> None:
    pool = harness.pool()
    fn = harness.function()
    pool.set_provisioned(fn, 1)
    await pool.wait_provisioned(fn.key)
    [dead] = harness.factory.sandboxes

    dead.runtime.exit(exit_status(1))
    await wait_until(lambda: len(harness.factory.sandboxes) == 2 and pool.statistics().provisioned == 1)

    assert "[hxb] provisioned instance exited while idle; starting another" in harness.messages(None)
    assert pool.statistics() == stats(instances=1, idle=1, provisioned=1)
    result = await pool.invoke(fn, request(invocation_id="inv-after"))
    assert result.init_duration_ms is None
    assert len(harness.factory.sandboxes[1].runtime.invokes) == 1


async def test_provisioned_instance_killed_for_a_timeout_is_replaced(harness: Provisioned) -> None:
    harness.factory.behaviour = hang
    pool = harness.pool()
    fn = harness.function(timeout_s=0.02)
    pool.set_provisioned(fn, 1)
    await pool.wait_provisioned(fn.key)

    result = await pool.invoke(fn, request())
    await wait_until(lambda: pool.statistics().provisioned == 1)

    assert result.error_type == "Sandbox.Timedout"
    first, replacement = harness.factory.sandboxes
    assert first.killed
    assert not replacement.killed
    assert pool.statistics() == stats(instances=1, idle=1, provisioned=1, warm_starts=1, timeouts=1)


async def test_failing_provisioned_start_is_not_retried_before_its_backoff(harness: Provisioned) -> None:
    harness.factory.behaviour = fail_init()
    pool = harness.pool(retry_s=30.0)
    fn = harness.function()

    pool.set_provisioned(fn, 1)
    await pool.wait_provisioned(fn.key)  # returns on the failure
    for _ in range(20):
        await asyncio.sleep(0)

    assert len(harness.factory.started) == 1
    assert harness.factory.sandboxes[0].killed
    assert pool.statistics() == stats()


async def test_failing_provisioned_starts_back_off_log_once_and_recover(
    harness: Provisioned, caplog: pytest.LogCaptureFixture
) -> None:
    harness.factory.behaviour = fail_init()
    pool = harness.pool(retry_s=0.01)
    fn = harness.function()

    pool.set_provisioned(fn, 1)
    await wait_until(lambda: len(harness.factory.started) >= 3)
    harness.factory.behaviour = hang  # the next retry succeeds
    await wait_until(lambda: pool.statistics().provisioned == 1)

    assert warnings(caplog, "starting a provisioned instance failed; retrying with a backoff") == 1
    starts = [s.ready_calls for s in harness.factory.sandboxes]
    assert starts[-1] == 1
    assert starts[:-1] == [0] * (len(starts) - 1)


async def test_growing_provisioned_concurrency_keeps_the_running_instances(harness: Provisioned) -> None:
    pool = harness.pool()
    fn = harness.function()
    pool.set_provisioned(fn, 1)
    await pool.wait_provisioned(fn.key)

    pool.set_provisioned(fn, 3)
    await pool.wait_provisioned(fn.key)

    assert len(harness.factory.started) == 3
    assert not any(s.signals for s in harness.factory.sandboxes)
    assert pool.statistics() == stats(instances=3, idle=3, provisioned=3)


async def test_shrinking_stops_idle_surplus_now_and_busy_surplus_when_it_finishes(harness: Provisioned) -> None:
    gate = asyncio.Event()
    harness.factory.behaviour = held(gate)
    pool = harness.pool()
    fn = harness.function()
    pool.set_provisioned(fn, 3)
    await pool.wait_provisioned(fn.key)
    task = asyncio.create_task(pool.invoke(fn, request(b"7")))
    await harness.wait_running(1)
    [busy] = [s for s in harness.factory.sandboxes if s.runtime.invokes]
    idle = [s for s in harness.factory.sandboxes if s is not busy]

    pool.set_provisioned(fn, 1)  # two too many: the two idle ones go
    await wait_until(lambda: all(s.closed for s in idle))
    assert busy.signals == []
    assert pool.statistics() == stats(instances=1, busy=1, provisioned=1, warm_starts=1)

    pool.set_provisioned(fn, 0)  # the busy one goes once its invocation ends
    await asyncio.sleep(0)
    assert busy.signals == []
    gate.set()
    assert (await task).payload == b"7"
    await wait_until(lambda: busy.closed)

    assert all(s.signals == [signal.SIGTERM] for s in harness.factory.sandboxes)
    assert len(harness.factory.started) == 3  # nothing was replaced
    assert pool.statistics() == stats(warm_starts=1)


async def test_retire_stops_provisioned_instances_and_starts_no_replacement(harness: Provisioned) -> None:
    pool = harness.pool()
    fn = harness.function()
    pool.set_provisioned(fn, 2)
    await pool.wait_provisioned(fn.key)

    pool.retire(fn.key)
    await asyncio.wait_for(pool.wait_drained(fn.key), timeout=1.0)

    assert all(s.terminated and s.closed for s in harness.factory.sandboxes)
    assert len(harness.factory.started) == 2
    assert pool.statistics() == stats()


async def test_provisioned_instances_are_never_reaped(harness: Provisioned) -> None:
    pool = harness.pool(idle_timeout_s=60.0)
    fn = harness.function()
    pool.set_provisioned(fn, 1)
    await pool.wait_provisioned(fn.key)
    await pool.invoke(harness.function("other"), request())  # an on-demand instance, reapable

    assert pool.reap_idle(time.monotonic() + 3600.0) == 1

    [provisioned, on_demand] = harness.factory.sandboxes
    await wait_until(lambda: on_demand.closed)
    assert provisioned.signals == []
    assert pool.statistics().provisioned == 1


async def test_provisioned_instances_are_never_evicted_for_the_instance_cap(harness: Provisioned) -> None:
    pool = harness.pool(max_instances=1)
    fn = harness.function("kept")
    pool.set_provisioned(fn, 1)
    await pool.wait_provisioned(fn.key)

    with pytest.raises(ThrottledError, match="HXB_POOL_MAX_INSTANCES"):
        await pool.invoke(harness.function("other"), request())

    assert harness.factory.sandboxes[0].signals == []
    assert len(harness.factory.started) == 1


# --- the memory budget ----------------------------------------------------------------------------


async def test_memory_budget_evicts_the_least_recently_used_idle_instance_of_another_function(
    harness: Provisioned,
) -> None:
    pool = harness.pool(memory_budget_mb=512)
    a, b, c = harness.function("a", memory=256), harness.function("b", memory=256), harness.function("c", memory=256)
    await pool.invoke(a, request())
    await pool.invoke(b, request())
    await pool.invoke(a, request())  # now b is the least recently used
    sandbox_a, sandbox_b = harness.factory.sandboxes

    result = await pool.invoke(c, request(b"8"))

    assert result.payload == b"8"
    assert sandbox_b.terminated
    assert not sandbox_a.terminated
    assert pool.statistics().instances == 2


async def test_memory_budget_evicts_as_many_idle_instances_as_the_new_one_needs(harness: Provisioned) -> None:
    pool = harness.pool(memory_budget_mb=512)
    for name in ("a", "b", "c", "d"):
        await pool.invoke(harness.function(name), request())  # 4 x 128 MB: the budget is full

    await pool.invoke(harness.function("big", memory=320), request())

    # 320 MB need three of the 128 MB instances gone, the least recently used ones.
    assert [s.terminated for s in harness.factory.sandboxes] == [True, True, True, False, False]


async def test_new_instance_starts_only_once_the_evicted_one_exited(harness: Provisioned) -> None:
    harness.factory.ignore_sigterm = True  # it exits at the SIGKILL after the grace period
    pool = harness.pool(memory_budget_mb=256, shutdown_grace_s=0.05)
    await pool.invoke(harness.function("a", memory=256), request())
    [evicted] = harness.factory.sandboxes

    await pool.invoke(harness.function("b", memory=256), request())

    assert evicted.signals == [signal.SIGTERM, signal.SIGKILL]
    assert isinstance(harness.factory, RecordingFactory)
    assert harness.factory.exited_at_start[-1] == [True]


async def test_memory_budget_refuses_with_429_when_nothing_can_be_evicted(harness: Provisioned) -> None:
    gate = asyncio.Event()
    harness.factory.behaviour = held(gate)
    pool = harness.pool(memory_budget_mb=384)
    busy = asyncio.create_task(pool.invoke(harness.function("a", memory=256), request(b"9")))
    await harness.wait_running(1)

    with pytest.raises(ThrottledError) as caught:
        await pool.invoke(harness.function("b", memory=256), request())

    message = str(caught.value)
    assert caught.value.http_status == 429
    assert "memory budget of 384 MB" in message
    assert "256 MB are in use" in message
    assert "HXB_POOL_MEMORY_BUDGET_MB" in message
    assert len(harness.factory.started) == 1
    assert pool.statistics() == stats(instances=1, busy=1, cold_starts=1)
    gate.set()
    assert (await busy).payload == b"9"


async def test_memory_budget_never_evicts_provisioned_instances(harness: Provisioned) -> None:
    pool = harness.pool(memory_budget_mb=256)
    fn = harness.function("kept", memory=256)
    pool.set_provisioned(fn, 1)
    await pool.wait_provisioned(fn.key)

    with pytest.raises(ThrottledError, match="HXB_POOL_MEMORY_BUDGET_MB"):
        await pool.invoke(harness.function("other"), request())

    assert harness.factory.sandboxes[0].signals == []


async def test_provisioned_instances_beyond_the_budget_are_not_started(
    harness: Provisioned, caplog: pytest.LogCaptureFixture
) -> None:
    pool = harness.pool(memory_budget_mb=384)
    fn = harness.function()

    pool.set_provisioned(fn, 4)
    await pool.wait_provisioned(fn.key)

    assert len(harness.factory.started) == 3
    assert pool.statistics() == stats(instances=3, idle=3, provisioned=3, provisioned_shortfall=1)
    assert pool.function_statistics("default", "echo").provisioned_shortfall == 1
    assert warnings(caplog, "provisioned instances do not fit on this node") == 1

    pool.set_provisioned(fn, 3)
    assert pool.statistics().provisioned_shortfall == 0


async def test_provisioned_instances_that_did_not_fit_start_once_memory_is_free(harness: Provisioned) -> None:
    gate = asyncio.Event()
    harness.factory.behaviour = held(gate)
    pool = harness.pool(memory_budget_mb=384)
    other = asyncio.create_task(pool.invoke(harness.function("other"), request()))
    await harness.wait_running(1)
    fn = harness.function()
    pool.set_provisioned(fn, 3)
    await pool.wait_provisioned(fn.key)
    assert pool.statistics().provisioned_shortfall == 1

    gate.set()  # the other function's instance becomes idle, so it can be evicted
    await other
    await wait_until(lambda: pool.statistics().provisioned == 3)

    assert harness.factory.sandboxes[0].terminated
    assert pool.statistics() == stats(instances=3, idle=3, provisioned=3, cold_starts=1)


# --- settings -------------------------------------------------------------------------------------


def test_memory_budget_defaults_to_80_percent_of_the_host_memory() -> None:
    settings = load_settings({})

    assert settings.pool.memory_budget_mb == host_memory_budget_mb()
    assert 0 < settings.pool.memory_budget_mb < 64 * 1024 * 1024


def test_memory_budget_comes_from_its_env_var() -> None:
    assert load_settings({"HXB_POOL_MEMORY_BUDGET_MB": "2048"}).pool.memory_budget_mb == 2048


@pytest.mark.parametrize("raw", ["0", "lots"])
def test_invalid_memory_budget_is_an_error_naming_the_variable(raw: str) -> None:
    with pytest.raises(ConfigError, match="HXB_POOL_MEMORY_BUDGET_MB"):
        load_settings({"HXB_POOL_MEMORY_BUDGET_MB": raw})


def test_set_provisioned_refuses_a_negative_count(tmp_path: Path) -> None:
    pool = PoolManager(
        PoolSettings(), LogSettings(), FakeSandboxFactory(), PrecompiledCatalog(tmp_path), lambda event: None
    )
    with pytest.raises(ValueError, match="must be >= 0, got -1"):
        pool.set_provisioned(Harness(tmp_path).revision(), -1)
