"""PoolManager: per function revision, warm instances reused first, one cold start per needed
instance, provisioned concurrency, idle reaping, a node-wide instance cap and memory budget,
and the invocation deadline.

Waiting invocations queue per revision. An instance that becomes free (started, or released
by an invocation) goes to the oldest waiter; a new instance is started only while fewer are
starting than are waited for. So N concurrent requests cause at most N cold starts, and fewer
when warm instances come back in time (no thundering herd).

With `concurrency_per_instance` C > 1 (async handlers), an instance serves up to C invocations
at once: one with a free slot is used before an idle one, a started instance takes up to C
waiters, and a new one starts only while the starting ones cannot take every waiter.

Provisioned instances (`set_provisioned`) are started ahead of demand, served first, never
reaped or evicted, and replaced when they die. Every instance, from the decision to start it
until its process exited, holds its function's memory against `memory_budget_mb`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, Final

from hxb.config import LogSettings, PoolSettings
from hxb.errors import InvocationError, RuntimeExitError, SandboxSpawnError, SandboxTimeoutError, ThrottledError
from hxb.logs.capture import InvocationLog
from hxb.logs.records import LogEvent, end_line, log_stream_name, report_line, start_line, tail_of
from hxb.logs.sink import LogFlow
from hxb.models import FunctionRevision, InvocationRequest, InvocationResult
from hxb.pool.capacity import memory_used_mb, victims_for
from hxb.pool.environment import instance_environment
from hxb.pool.function_pool import FunctionPool, PoolStatistics, sum_statistics
from hxb.pool.wire import FrameType
from hxb.pool.worker import Worker, WorkerState
from hxb.runtimes import RuntimeCatalog
from hxb.sandbox.base import Sandbox, SandboxFactory, SandboxSpec, describe_wait_status

log = logging.getLogger(__name__)

_MIB = 1024 * 1024
_PROVISIONED_RETRY_S: Final = 1.0
_PROVISIONED_RETRY_MAX_S: Final = 60.0
# How long a start may wait, past the stop grace period, for stopping instances to give their
# memory back: SIGKILL follows the grace period, so only a wedged kernel needs more.
_MEMORY_WAIT_SLACK_S: Final = 5.0


class PoolManager:
    def __init__(
        self,
        settings: PoolSettings,
        log_settings: LogSettings,
        factory: SandboxFactory,
        catalog: RuntimeCatalog,
        emit_log: Callable[[LogEvent], None],
        *,
        log_flow: LogFlow | None = None,
        provisioned_retry_s: float = _PROVISIONED_RETRY_S,
    ) -> None:
        """`provisioned_retry_s` is the first delay before starting provisioned instances again
        after a failed start; it doubles with each failure in a row, up to a minute."""
        self._settings = settings
        self._max_line_bytes = log_settings.max_line_bytes
        self._factory = factory
        self._catalog = catalog
        self._emit_log = emit_log
        self._log_flow = log_flow
        self._pools: dict[str, FunctionPool] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stop_tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._cold_starts = 0
        self._warm_starts = 0
        self._timeouts = 0
        self._provisioned_retry_s = provisioned_retry_s
        self._memory_freed = asyncio.Event()
        self._short: set[FunctionPool] = set()  # pools with provisioned instances that did not fit

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._spawn_task(self._reap_forever(), name="hxb-pool-reaper")

    async def close(self) -> None:
        """Stops every instance: SIGTERM, the grace period, then SIGKILL."""
        self._closing = True
        # Stops already under way (retire, evict, reap) finish: cancelling one midway through
        # its grace period would leave its instance running with nobody to kill it.
        for task in list(self._tasks):
            if task not in self._stop_tasks:
                task.cancel()
        workers: list[Worker] = []
        for pool in self._pools.values():
            workers += pool.idle + pool.provisioned_idle + list(pool.busy)
            pool.idle.clear()
            pool.provisioned_idle.clear()
            pool.provisioned.clear()
            pool.busy.clear()
            if pool.provision_retry is not None:
                pool.provision_retry.cancel()
                pool.provision_retry = None
            pool.notify()
            while pool.waiters:
                fut = pool.waiters.popleft()
                if not fut.done():
                    fut.set_exception(ThrottledError("the platform is shutting down"))
        self._short.clear()
        await asyncio.gather(*(w.stop(self._settings.shutdown_grace_s) for w in workers), return_exceptions=True)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._pools.clear()

    def _spawn_task(self, coro: Coroutine[Any, Any, Any], *, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _stop_later(self, worker: Worker, why: str) -> None:
        task = asyncio.get_running_loop().create_task(
            worker.stop(self._settings.shutdown_grace_s), name=f"hxb-{why}-{worker.id}"
        )
        self._tasks.add(task)
        self._stop_tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        self._stop_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("pool task failed", exc_info=task.exception(), extra={"task": task.get_name()})

    # --- invoking -------------------------------------------------------------------------------

    async def invoke(self, revision: FunctionRevision, request: InvocationRequest) -> InvocationResult:
        """Runs one invocation on a warm or new instance. Failures of the function or its
        runtime come back as a result with `function_error` set, as in Lambda."""
        pool = self._pool_for(revision)
        try:
            worker = await self._acquire(pool)
        except InvocationError as exc:
            return self._failed_before_start(revision, request, exc)
        return await self._run(pool, worker, request)

    async def _run(self, pool: FunctionPool, worker: Worker, request: InvocationRequest) -> InvocationResult:
        revision = pool.revision
        cfg = revision.config
        invocation_id = request.invocation_id
        # A provisioned instance was initialised ahead of demand: nobody waited for its init.
        first = worker.invocations == 0 and worker not in pool.provisioned
        init_ms = worker.init_duration_ms if first else None
        if init_ms is None:
            self._warm_starts += 1
        else:
            self._cold_starts += 1
        worker.invocations += 1
        inv_log = InvocationLog(
            self._emit_log,
            workspace=revision.workspace,
            function=revision.name,
            stream=worker.stream,
            invocation_id=invocation_id,
        )
        inv_log.add(start_line(invocation_id, revision.version))
        meta = json.dumps(
            {
                "id": invocation_id,
                "deadline_ms": int(time.time() * 1000) + cfg.timeout * 1000,
                "arn": request.invoked_arn,
                "cc": request.client_context,
                "identity": request.identity,
            },
            separators=(",", ":"),
        ).encode()
        status: str | None = None
        error_type: str | None = None
        started = time.perf_counter()
        try:
            async with asyncio.timeout(cfg.timeout):
                frame = await worker.invoke(meta, request.payload, inv_log)
            payload = frame.body
            function_error = frame.type == FrameType.ERROR
            duration_ms, peak = (time.perf_counter() - started) * 1000, worker.sandbox.memory_peak_bytes()
            if worker.draining and worker.running == 1:
                await worker.kill()  # the last invocation of a drained instance
        except TimeoutError:
            # A sandbox that overran its deadline may hold half-written state: never reuse it.
            self._timeouts += 1
            duration_ms, peak = (time.perf_counter() - started) * 1000, worker.sandbox.memory_peak_bytes()
            inv_log.add(f"{_utc_stamp()} {invocation_id} Task timed out after {cfg.timeout:.2f} seconds")
            await self._discard(worker)
            exc: InvocationError = SandboxTimeoutError(invocation_id, cfg.timeout)
            payload, function_error, status, error_type = _error_payload(exc), True, "timeout", exc.wire_type
        except InvocationError as exc_:
            exc = exc_
            duration_ms, peak = (time.perf_counter() - started) * 1000, worker.sandbox.memory_peak_bytes()
            prefixed = exc.message.startswith("RequestId:")
            inv_log.add(exc.message if prefixed else f"RequestId: {invocation_id} Error: {exc.message}")
            await worker.kill()
            payload, function_error, status, error_type = _error_payload(exc), True, "error", exc.wire_type
        except BaseException:
            # Cancelled (client gone during shutdown) or a bug: the instance may still be
            # running the handler, so it cannot be handed to anyone else.
            worker.end_invocation(invocation_id)
            await asyncio.shield(self._discard(worker))
            self._release(pool, worker)
            raise
        worker.end_invocation(invocation_id)
        inv_log.add(end_line(invocation_id))
        inv_log.add(
            report_line(
                invocation_id,
                duration_ms=duration_ms,
                memory_size_mb=cfg.memory,
                max_memory_used_mb=(peak + _MIB - 1) // _MIB if peak is not None else None,
                init_duration_ms=init_ms,
                status=status,
            )
        )
        self._release(pool, worker)
        return InvocationResult(
            invocation_id=invocation_id,
            payload=payload,
            function_error=function_error,
            executed_version=revision.version,
            duration_ms=duration_ms,
            init_duration_ms=init_ms,
            log_tail=tail_of(inv_log.tail_lines()) if request.want_log_tail else None,
            error_type=error_type,
        )

    async def _discard(self, worker: Worker) -> None:
        """The invocation that just ended on `worker` may have left its handler running: the
        instance is never used again. Killed now if no other invocation runs on it; otherwise
        drained (no new invocations) and killed when the last of them ends, so that one
        invocation's timeout does not fail the others (each still has its own deadline)."""
        if worker.running <= 1:
            await worker.kill()
        elif not worker.draining:
            worker.draining = True
            worker.instance_log(
                f"[hxb] an invocation timed out: instance drained, stopped after its other {worker.running - 1}"
            )

    def _failed_before_start(
        self, revision: FunctionRevision, request: InvocationRequest, exc: InvocationError
    ) -> InvocationResult:
        """Init failed (or the instance could not start): the invocation reports that error,
        with a log of its own so that `--log` and `hxb function logs` show why."""
        stream = log_stream_name(revision.version, "init-failed", time.time())
        inv_log = InvocationLog(
            self._emit_log,
            workspace=revision.workspace,
            function=revision.name,
            stream=stream,
            invocation_id=request.invocation_id,
        )
        inv_log.add(start_line(request.invocation_id, revision.version))
        inv_log.add(f"[ERROR] {exc.wire_type}: {exc.message}")
        inv_log.add(end_line(request.invocation_id))
        inv_log.add(
            report_line(
                request.invocation_id,
                duration_ms=0.0,
                memory_size_mb=revision.config.memory,
                max_memory_used_mb=None,
                init_duration_ms=None,
                status="error",
            )
        )
        return InvocationResult(
            invocation_id=request.invocation_id,
            payload=_error_payload(exc),
            function_error=True,
            executed_version=revision.version,
            duration_ms=0.0,
            log_tail=tail_of(inv_log.tail_lines()) if request.want_log_tail else None,
            error_type=exc.wire_type,
        )

    # --- acquiring and releasing instances --------------------------------------------------------

    def _pool_for(self, revision: FunctionRevision) -> FunctionPool:
        pool = self._pools.get(revision.key)
        if pool is None:
            pool = self._pools[revision.key] = FunctionPool(revision)
        return pool

    async def _acquire(self, pool: FunctionPool) -> Worker:
        slots = pool.revision.config.concurrency_per_instance
        if slots > 1:
            # A busy instance with a free slot is as warm as it gets (and leaves idle ones to the reaper).
            worker = pool.with_free_slot()
            if worker is not None:
                worker.running += 1
                return worker
        # Provisioned instances first: they are paid for whether they serve or not.
        for idle in (pool.provisioned_idle, pool.idle):
            while idle:
                worker = idle.pop()
                if worker.state is WorkerState.IDLE:
                    worker.transition(WorkerState.BUSY)
                    pool.busy.add(worker)
                    worker.running += 1
                    return worker
        if self._closing:
            raise ThrottledError("the platform is shutting down")
        waiter: asyncio.Future[Worker] = asyncio.get_running_loop().create_future()
        pool.waiters.append(waiter)
        # Each instance starting takes up to `slots` waiters once it is ready.
        if pool.starting * slots < len(pool.waiters):
            try:
                self._make_room(pool)
            except ThrottledError:
                pool.waiters.remove(waiter)
                raise
            pool.starting += 1
            pool.launching += 1
            self._spawn_task(self._start_instance(pool), name=f"hxb-start-{pool.revision.name}")
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter in pool.waiters:
                pool.waiters.remove(waiter)
            elif waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release(pool, waiter.result())
            raise

    def _make_room(self, pool: FunctionPool) -> None:
        """Makes room on the node for one more instance of `pool` (instance cap and memory
        budget) by evicting idle instances, or raises ThrottledError (nothing evicted then)."""
        for victim in victims_for(list(self._pools.values()), pool, self._settings):
            self._pools[victim.revision.key].idle.remove(victim)
            victim.instance_log("[hxb] stopping idle instance to make room on the node")
            self._stop_later(victim, "evict")

    async def _wait_for_memory(self, pool: FunctionPool) -> None:
        """Waits until the instances holding memory, this start included, fit the budget:
        `_make_room` admitted it counting on instances that are still stopping."""
        budget_mb = self._settings.memory_budget_mb
        if memory_used_mb(self._pools.values()) <= budget_mb:
            return
        try:
            async with asyncio.timeout(self._settings.shutdown_grace_s + _MEMORY_WAIT_SLACK_S):
                while memory_used_mb(self._pools.values()) > budget_mb:
                    await self._memory_freed.wait()
        except TimeoutError:
            raise SandboxSpawnError(
                f"could not start an instance of {pool.revision.name!r}: stopping instances did not give "
                f"back their memory in time (HXB_POOL_MEMORY_BUDGET_MB={budget_mb})"
            ) from None

    def _capacity_freed(self) -> None:
        """An instance exited, or a start failed before it had one: memory and instance slots
        are free again, for starts waiting on them and for provisioned instances that did not fit."""
        freed, self._memory_freed = self._memory_freed, asyncio.Event()
        freed.set()
        self._retry_shortfalls()

    def _retry_shortfalls(self) -> None:
        """Provisioned instances that did not fit try again: room was made, or an on-demand
        instance became idle and so can be evicted for them."""
        for pool in list(self._short):
            # Not while one of its starts is in flight: that start may be the one failing now
            # (before its backoff is set), and it calls `_provision` itself when it ends.
            if not pool.provisioned_starting:
                self._provision(pool)

    async def _start_instance(self, pool: FunctionPool) -> None:
        try:
            worker = await self._spawn(pool)
        except InvocationError as exc:
            pool.starting -= 1
            self._fail_waiters_of_one_start(pool, exc)
            self._drop_if_empty(pool)
            return
        except Exception as exc:  # a boundary: an unexpected spawn failure fails its invocations
            log.exception("starting an instance failed", extra={"function": pool.revision.name})
            pool.starting -= 1
            self._fail_waiters_of_one_start(pool, SandboxSpawnError(f"could not start an instance: {exc}"))
            self._drop_if_empty(pool)
            return
        pool.starting -= 1
        if self._closing:
            await worker.stop(self._settings.shutdown_grace_s)
            return
        if worker.state is WorkerState.DEAD:
            # It exited between READY and now (both seen in one loop turn): its waiter still
            # needs an instance, so this start failed.
            worker.close()
            status = worker.sandbox.poll_exit()
            self._fail_waiters_of_one_start(
                pool, RuntimeExitError("", describe_wait_status(status if status is not None else -1))
            )
            return
        self._hand_off(pool, worker)

    @staticmethod
    def _fail_waiters_of_one_start(pool: FunctionPool, exc: InvocationError) -> None:
        """A start failed: the waiters it was for (the oldest; one per slot of an instance) fail."""
        left = pool.revision.config.concurrency_per_instance
        while pool.waiters and left:
            waiter = pool.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(exc)
                left -= 1

    @staticmethod
    def _give_to_waiter(pool: FunctionPool, worker: Worker) -> bool:
        """Gives a free instance's free slots to the oldest waiters; whether it got any."""
        given = False
        while pool.waiters and worker.running < worker.capacity:
            waiter = pool.waiters.popleft()
            if not waiter.done():
                if worker.state is not WorkerState.BUSY:
                    worker.transition(WorkerState.BUSY)
                    pool.busy.add(worker)
                worker.running += 1
                waiter.set_result(worker)
                given = True
        return given

    def _hand_off(self, pool: FunctionPool, worker: Worker) -> None:
        """Gives a free instance to the oldest waiter, or parks it as idle."""
        if self._give_to_waiter(pool, worker):
            return
        if pool.retired:
            self._stop_later(worker, "retire")
            return
        if worker.state is not WorkerState.IDLE:
            worker.transition(WorkerState.IDLE)
        worker.last_used = time.monotonic()
        pool.idle.append(worker)
        if self._short:
            self._retry_shortfalls()

    def _release(self, pool: FunctionPool, worker: Worker) -> None:
        worker.running -= 1
        if worker.running > 0:
            # Others still run on it. Its free slot serves a waiter; a dead or drained instance
            # serves nobody, and the last of its invocations releases it.
            if worker.state is WorkerState.BUSY and not worker.draining:
                self._give_to_waiter(pool, worker)
            return
        pool.busy.discard(worker)
        provisioned = worker in pool.provisioned
        if worker.state is WorkerState.DEAD:
            worker.close()
            if provisioned:
                # Crashed, timed out or ran out of memory: a provisioned instance is replaced.
                pool.provisioned.discard(worker)
                self._provision(pool)
                pool.notify()
            self._drop_if_empty(pool)
            return
        worker.transition(WorkerState.IDLE)
        if not provisioned:
            self._hand_off(pool, worker)
        elif pool.provisioned_missing < 0:
            # Provisioned concurrency was lowered (or the revision retired) while it was busy.
            pool.provisioned.discard(worker)
            pool.notify()
            if not self._give_to_waiter(pool, worker):
                worker.instance_log("[hxb] stopping provisioned instance: no longer provisioned")
                self._stop_later(worker, "unprovision")
        else:
            self._park_provisioned(pool, worker)
        self._drop_if_empty(pool)

    def _park_provisioned(self, pool: FunctionPool, worker: Worker) -> None:
        """A free provisioned instance serves the oldest waiter, or waits for the next one."""
        if self._give_to_waiter(pool, worker):
            return
        if worker.state is not WorkerState.IDLE:
            worker.transition(WorkerState.IDLE)
        worker.last_used = time.monotonic()
        pool.provisioned_idle.append(worker)

    def _drop_if_empty(self, pool: FunctionPool) -> None:
        if pool.retired and pool.size == 0 and not pool.waiters and not pool.members:
            self._pools.pop(pool.revision.key, None)
            pool.drained.set()

    async def wait_drained(self, revision_key: str) -> None:
        """Returns once no process of that retired revision is left."""
        pool = self._pools.get(revision_key)
        if pool is not None:
            await pool.drained.wait()

    def code_in_use(self, code_sha256: str) -> bool:
        """Whether any instance, starting, running or stopping, runs this code."""
        return any(p.revision.code_sha256 == code_sha256 and (p.size or p.members) for p in self._pools.values())

    async def _spawn(self, pool: FunctionPool, *, provisioned: bool = False) -> Worker:
        """Starts one instance and waits for its READY. The caller counted it in
        `pool.launching` (its memory is held from then on); this moves it to `pool.members`."""
        try:
            sandbox, stream, spawn_started = await self._start_sandbox(pool, provisioned)
        except BaseException:
            pool.launching -= 1
            self._capacity_freed()
            raise
        pool.launching -= 1
        worker = Worker(
            sandbox=sandbox,
            revision=pool.revision,
            stream=stream,
            emit_log=self._emit_log,
            max_response_bytes=self._settings.max_response_bytes,
            max_line_bytes=self._max_line_bytes,
            on_dead=self._on_worker_dead,
            spawn_started=spawn_started,
            log_flow=self._log_flow,
        )
        pool.members.add(worker)
        try:
            await worker.attach()
            await worker.wait_ready(self._settings.init_timeout_s)
        except BaseException:
            await asyncio.shield(worker.kill())
            raise
        return worker

    async def _start_sandbox(self, pool: FunctionPool, provisioned: bool) -> tuple[Sandbox, str, float]:
        revision = pool.revision
        await self._wait_for_memory(pool)
        spawn_started = time.perf_counter()
        await self._catalog.ensure_compiled(revision.runtime)
        instance_id = uuid.uuid4().hex
        runtime_dir = self._catalog.bootstrap_dir(revision.runtime)
        paths = self._factory.paths(revision.code_dir, runtime_dir, instance_id)
        stream = log_stream_name(revision.version, instance_id, time.time())
        env = instance_environment(revision, paths, stream=stream)
        if provisioned:
            env["AWS_LAMBDA_INITIALIZATION_TYPE"] = "provisioned-concurrency"  # as Lambda tells its init code
        spec = SandboxSpec(
            instance_id=instance_id,
            runtime=revision.runtime,
            argv=revision.runtime.instance_argv(paths.runtime_root),
            code_dir=revision.code_dir,
            runtime_dir=runtime_dir,
            layers_dir=None,
            env=env,
            memory_limit_mib=revision.config.memory,
            ephemeral_storage_mib=revision.config.ephemeral_storage,
            egress=tuple(revision.config.vpc.egress)
            if revision.config.vpc and revision.config.vpc.egress is not None
            else None,
            labels={"function": revision.name, "workspace": revision.workspace},
        )
        try:
            sandbox = await self._factory.start(spec)
        except OSError as exc:
            raise SandboxSpawnError(f"could not start an instance of {revision.name!r}: {exc}") from exc
        return sandbox, stream, spawn_started

    def _on_worker_dead(self, worker: Worker) -> None:
        """An instance exited (on its own, or stopped). An idle one is dropped, and replaced if
        it was provisioned; a busy one is dealt with by the invocation that is waiting on it."""
        pool = self._pools.get(worker.revision.key)
        if pool is not None:
            pool.members.discard(worker)
            if worker in pool.idle:
                pool.idle.remove(worker)
                worker.instance_log("[hxb] instance exited while idle")
                worker.close()
            elif worker in pool.provisioned_idle:
                pool.provisioned_idle.remove(worker)
                pool.provisioned.discard(worker)
                worker.instance_log("[hxb] provisioned instance exited while idle; starting another")
                worker.close()
                self._provision(pool)
                pool.notify()
        self._capacity_freed()
        if pool is not None:
            self._drop_if_empty(pool)

    # --- provisioned concurrency -------------------------------------------------------------------

    def set_provisioned(self, revision: FunctionRevision, count: int) -> None:
        """Keeps `count` instances of `revision` initialised ahead of demand, from now on: more
        start in the background (this does not wait for them, `wait_provisioned` does); surplus
        idle ones stop now, busy ones when their invocation ends. A retired revision keeps none."""
        if count < 0:
            raise ValueError(f"provisioned concurrency of {revision.name!r} must be >= 0, got {count}")
        pool = self._pools.get(revision.key)
        if pool is None and count == 0:
            return
        pool = self._pool_for(revision)
        if pool.retired:
            return
        pool.provisioned_target = count
        surplus = -pool.provisioned_missing
        # The least recently used first: the warmest stay.
        while surplus > 0 and pool.provisioned_idle:
            worker = pool.provisioned_idle.pop(0)
            pool.provisioned.discard(worker)
            worker.instance_log("[hxb] stopping provisioned instance: no longer provisioned")
            self._stop_later(worker, "unprovision")
            surplus -= 1
        self._provision(pool)
        pool.notify()

    async def wait_provisioned(self, revision_key: str) -> None:
        """Returns once every provisioned instance of that revision is ready, or as soon as one
        failed to start or did not fit the node: `function_statistics` tells which."""
        pool = self._pools.get(revision_key)
        while pool is not None and not self._provisioning_settled(pool):
            await pool.wait_changed()

    def _provisioning_settled(self, pool: FunctionPool) -> bool:
        return (
            self._closing
            or pool.retired
            or len(pool.provisioned) >= pool.provisioned_target
            or pool.provision_failures > 0
            or pool.provisioned_starting == 0
        )

    def _provision(self, pool: FunctionPool) -> None:
        """Starts the provisioned instances `pool` lacks, as far as the node has room."""
        if self._closing or pool.retired or pool.provision_retry is not None:
            return  # a failed start's backoff runs: its timer calls this again
        missing = max(pool.provisioned_missing, 0)
        started = 0
        while started < missing:
            try:
                self._make_room(pool)
            except ThrottledError as exc:
                self._provisioned_do_not_fit(pool, missing - started, exc)
                return
            pool.provisioned_starting += 1
            pool.launching += 1
            self._spawn_task(self._start_provisioned(pool), name=f"hxb-provision-{pool.revision.name}")
            started += 1
        pool.provisioned_shortfall = 0
        self._short.discard(pool)

    def _provisioned_do_not_fit(self, pool: FunctionPool, shortfall: int, exc: ThrottledError) -> None:
        if shortfall > pool.provisioned_shortfall:
            log.warning(
                "provisioned instances do not fit on this node",
                extra={
                    "function": pool.revision.name,
                    "revision": pool.revision.key,
                    "missing": shortfall,
                    "reason": exc.message,
                },
            )
        pool.provisioned_shortfall = shortfall
        self._short.add(pool)
        pool.notify()

    async def _start_provisioned(self, pool: FunctionPool) -> None:
        try:
            worker = await self._spawn(pool, provisioned=True)
        except InvocationError as exc:
            pool.provisioned_starting -= 1
            self._provision_failed(pool, exc)
            return
        except Exception as exc:  # a boundary: no invocation waits on this start
            log.exception("starting a provisioned instance failed", extra={"function": pool.revision.name})
            pool.provisioned_starting -= 1
            self._provision_failed(pool, SandboxSpawnError(f"could not start an instance: {exc}"))
            return
        pool.provisioned_starting -= 1
        if self._closing:
            await worker.stop(self._settings.shutdown_grace_s)
            return
        if worker.state is WorkerState.DEAD:
            worker.close()  # it exited between READY and now (both seen in one loop turn)
            status = worker.sandbox.poll_exit()
            self._provision_failed(
                pool, RuntimeExitError("", describe_wait_status(status if status is not None else -1))
            )
            return
        if pool.provision_failures:
            log.info("provisioned instances start again", extra={"function": pool.revision.name})
        pool.provision_failures = 0
        if pool.retired or len(pool.provisioned) >= pool.provisioned_target:
            # Lowered (or retired) while it was starting: it serves a waiter if one is left.
            if not self._give_to_waiter(pool, worker):
                self._stop_later(worker, "unprovision")
        else:
            pool.provisioned.add(worker)
            self._park_provisioned(pool, worker)
        self._provision(pool)  # those that did not fit while this one was starting
        pool.notify()

    def _provision_failed(self, pool: FunctionPool, exc: InvocationError) -> None:
        """Schedules another try after a backoff that doubles with each failure in a row (an
        init error would fail again at once); logs the first failure of each streak only."""
        pool.provision_failures += 1
        delay_s = min(self._provisioned_retry_s * 2 ** (pool.provision_failures - 1), _PROVISIONED_RETRY_MAX_S)
        if pool.provision_failures == 1:
            log.warning(
                "starting a provisioned instance failed; retrying with a backoff",
                extra={
                    "function": pool.revision.name,
                    "revision": pool.revision.key,
                    "error_type": exc.wire_type,
                    "error": exc.message,
                },
            )
        if pool.provision_retry is None and not pool.retired and not self._closing:
            pool.provision_retry = asyncio.get_running_loop().call_later(delay_s, self._retry_provision, pool)
        pool.notify()
        self._drop_if_empty(pool)  # retired meanwhile: this start was the last thing it waited for

    def _retry_provision(self, pool: FunctionPool) -> None:
        pool.provision_retry = None
        self._provision(pool)

    # --- retiring and reaping ---------------------------------------------------------------------

    def retire(self, revision_key: str) -> None:
        """A revision was replaced or deleted: its idle instances stop now, busy ones when
        their invocation ends. Queued invocations are still served by it."""
        pool = self._pools.get(revision_key)
        if pool is None:
            return
        pool.retired = True
        pool.provisioned_target = 0
        pool.provisioned_shortfall = 0
        self._short.discard(pool)
        if pool.provision_retry is not None:
            pool.provision_retry.cancel()
            pool.provision_retry = None
        for worker in pool.provisioned_idle:
            pool.provisioned.discard(worker)
        for worker in pool.idle + pool.provisioned_idle:
            self._stop_later(worker, "retire")
        pool.idle.clear()
        pool.provisioned_idle.clear()
        pool.notify()
        self._drop_if_empty(pool)

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self._settings.reap_interval_s)
            self.reap_idle(time.monotonic())

    def reap_idle(self, now: float) -> int:
        """Stops on-demand instances idle for longer than the idle timeout (provisioned ones
        stay); returns how many."""
        reaped = 0
        deadline = now - self._settings.idle_timeout_s
        for pool in list(self._pools.values()):
            stale = [w for w in pool.idle if w.last_used <= deadline]
            for worker in stale:
                pool.idle.remove(worker)
                worker.instance_log("[hxb] stopping idle instance")
                self._stop_later(worker, "reap")
                reaped += 1
            self._drop_if_empty(pool)
        return reaped

    def statistics(self) -> PoolStatistics:
        """The whole node. Provisioned instances count in `instances`, `idle`, `busy` and `starting` too."""
        return dataclasses.replace(
            sum_statistics(self._pools.values()),
            cold_starts=self._cold_starts,
            warm_starts=self._warm_starts,
            timeouts=self._timeouts,
        )

    def function_statistics(self, workspace: str, name: str) -> PoolStatistics:
        """One function, all its revisions; the start and timeout counters are the node's only."""
        return sum_statistics(
            p for p in self._pools.values() if p.revision.workspace == workspace and p.revision.name == name
        )


def _utc_stamp() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"


def _error_payload(exc: InvocationError) -> bytes:
    return json.dumps(exc.to_document(), separators=(",", ":")).encode()


__all__ = ["PoolManager", "PoolStatistics"]
