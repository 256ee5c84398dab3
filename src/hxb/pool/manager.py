"""PoolManager: per function revision, warm instances reused first, one cold start per needed
instance, idle reaping, a node-wide instance cap, and the invocation deadline.

Waiting invocations queue per revision. An instance that becomes free (started, or released
by an invocation) goes to the oldest waiter; a new instance is started only while fewer are
starting than are waited for. So N concurrent requests cause at most N cold starts, and fewer
when warm instances come back in time (no thundering herd).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from hxb.config import LogSettings, PoolSettings
from hxb.errors import InvocationError, RuntimeExitError, SandboxSpawnError, SandboxTimeoutError, ThrottledError
from hxb.logs.capture import InvocationLog
from hxb.logs.records import LogEvent, end_line, log_stream_name, report_line, start_line, tail_of
from hxb.logs.sink import LogFlow
from hxb.models import FunctionRevision, InvocationRequest, InvocationResult
from hxb.pool.environment import instance_environment
from hxb.pool.wire import FrameType
from hxb.pool.worker import Worker, WorkerState
from hxb.runtimes import RuntimeCatalog
from hxb.sandbox.base import SandboxFactory, SandboxSpec, describe_wait_status

log = logging.getLogger(__name__)

_MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    instances: int
    idle: int
    busy: int
    starting: int
    waiting: int
    cold_starts: int
    warm_starts: int
    timeouts: int


class FunctionPool:
    """The instances of one function revision."""

    def __init__(self, revision: FunctionRevision) -> None:
        self.revision = revision
        self.idle: list[Worker] = []  # LIFO: the most recently used instance is the warmest
        self.busy: set[Worker] = set()
        self.starting = 0
        self.waiters: deque[asyncio.Future[Worker]] = deque()
        self.retired = False
        # Every instance of this revision whose process has not exited yet, stopping ones too:
        # the revision's code must stay on disk until this is empty.
        self.members: set[Worker] = set()
        self.drained = asyncio.Event()

    @property
    def size(self) -> int:
        return len(self.idle) + len(self.busy) + self.starting


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
    ) -> None:
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
            workers += pool.idle + list(pool.busy)
            pool.idle.clear()
            pool.busy.clear()
            while pool.waiters:
                fut = pool.waiters.popleft()
                if not fut.done():
                    fut.set_exception(ThrottledError("the platform is shutting down"))
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
        init_ms = worker.init_duration_ms if worker.invocations == 0 else None
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
        except TimeoutError:
            # A sandbox that overran its deadline may hold half-written state: never reuse it.
            self._timeouts += 1
            duration_ms, peak = (time.perf_counter() - started) * 1000, worker.sandbox.memory_peak_bytes()
            inv_log.add(f"{_utc_stamp()} {invocation_id} Task timed out after {cfg.timeout:.2f} seconds")
            await worker.kill()
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
            worker.current_log = None
            await asyncio.shield(worker.kill())
            self._release(pool, worker)
            raise
        worker.current_log = None
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
        while pool.idle:
            worker = pool.idle.pop()
            if worker.state is WorkerState.IDLE:
                worker.transition(WorkerState.BUSY)
                pool.busy.add(worker)
                return worker
        if self._closing:
            raise ThrottledError("the platform is shutting down")
        waiter: asyncio.Future[Worker] = asyncio.get_running_loop().create_future()
        pool.waiters.append(waiter)
        if pool.starting < len(pool.waiters):
            self._make_room(pool)
            pool.starting += 1
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
        """Keeps the node under `max_instances`: evicts the least recently used idle instance
        of any function, or refuses the invocation."""
        total = sum(p.size for p in self._pools.values())
        if total < self._settings.max_instances:
            return
        candidates = [(w.last_used, p, w) for p in self._pools.values() for w in p.idle]
        if not candidates:
            pool.waiters.pop()
            raise ThrottledError(
                f"all {self._settings.max_instances} instances of this node are busy "
                "(HXB_POOL_MAX_INSTANCES); retry later"
            )
        _, victim_pool, victim = min(candidates, key=lambda c: c[0])
        victim_pool.idle.remove(victim)
        self._stop_later(victim, "evict")

    async def _start_instance(self, pool: FunctionPool) -> None:
        try:
            worker = await self._spawn(pool)
        except InvocationError as exc:
            pool.starting -= 1
            self._fail_one_waiter(pool, exc)
            return
        except Exception as exc:  # a boundary: an unexpected spawn failure fails one invocation
            log.exception("starting an instance failed", extra={"function": pool.revision.name})
            pool.starting -= 1
            self._fail_one_waiter(pool, SandboxSpawnError(f"could not start an instance: {exc}"))
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
            self._fail_one_waiter(
                pool, RuntimeExitError("", describe_wait_status(status if status is not None else -1))
            )
            return
        self._hand_off(pool, worker)

    @staticmethod
    def _fail_one_waiter(pool: FunctionPool, exc: InvocationError) -> None:
        while pool.waiters:
            waiter = pool.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(exc)
                return

    def _hand_off(self, pool: FunctionPool, worker: Worker) -> None:
        """Gives a free instance to the oldest waiter, or parks it as idle."""
        while pool.waiters:
            waiter = pool.waiters.popleft()
            if not waiter.done():
                worker.transition(WorkerState.BUSY)
                pool.busy.add(worker)
                waiter.set_result(worker)
                return
        if pool.retired:
            self._stop_later(worker, "retire")
            return
        if worker.state is not WorkerState.IDLE:
            worker.transition(WorkerState.IDLE)
        worker.last_used = time.monotonic()
        pool.idle.append(worker)

    def _release(self, pool: FunctionPool, worker: Worker) -> None:
        pool.busy.discard(worker)
        if worker.state is WorkerState.DEAD:
            worker.close()
            self._drop_if_empty(pool)
            return
        worker.transition(WorkerState.IDLE)
        self._hand_off(pool, worker)
        self._drop_if_empty(pool)

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

    async def _spawn(self, pool: FunctionPool) -> Worker:
        revision = pool.revision
        spawn_started = time.perf_counter()
        await self._catalog.ensure_compiled(revision.runtime)
        instance_id = uuid.uuid4().hex
        runtime_dir = self._catalog.bootstrap_dir(revision.runtime)
        paths = self._factory.paths(revision.code_dir, runtime_dir, instance_id)
        stream = log_stream_name(revision.version, instance_id, time.time())
        spec = SandboxSpec(
            instance_id=instance_id,
            runtime=revision.runtime,
            argv=revision.runtime.instance_argv(paths.runtime_root),
            code_dir=revision.code_dir,
            runtime_dir=runtime_dir,
            layers_dir=None,
            env=instance_environment(revision, paths, stream=stream),
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
        worker = Worker(
            sandbox=sandbox,
            revision=revision,
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

    def _on_worker_dead(self, worker: Worker) -> None:
        """An instance exited on its own. An idle one is simply dropped; a busy one is dealt
        with by the invocation that is waiting on it."""
        pool = self._pools.get(worker.revision.key)
        if pool is None:
            return
        pool.members.discard(worker)
        if worker in pool.idle:
            pool.idle.remove(worker)
            worker.instance_log("[hxb] instance exited while idle")
            worker.close()
        self._drop_if_empty(pool)

    # --- retiring and reaping ---------------------------------------------------------------------

    def retire(self, revision_key: str) -> None:
        """A revision was replaced or deleted: its idle instances stop now, busy ones when
        their invocation ends. Queued invocations are still served by it."""
        pool = self._pools.get(revision_key)
        if pool is None:
            return
        pool.retired = True
        for worker in pool.idle:
            self._stop_later(worker, "retire")
        pool.idle.clear()
        self._drop_if_empty(pool)

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self._settings.reap_interval_s)
            self.reap_idle(time.monotonic())

    def reap_idle(self, now: float) -> int:
        """Stops instances idle for longer than the idle timeout; returns how many."""
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
        pools = self._pools.values()
        return PoolStatistics(
            instances=sum(p.size for p in pools),
            idle=sum(len(p.idle) for p in pools),
            busy=sum(len(p.busy) for p in pools),
            starting=sum(p.starting for p in pools),
            waiting=sum(len(p.waiters) for p in pools),
            cold_starts=self._cold_starts,
            warm_starts=self._warm_starts,
            timeouts=self._timeouts,
        )

    def function_statistics(self, workspace: str, name: str) -> PoolStatistics:
        pools = [p for p in self._pools.values() if p.revision.workspace == workspace and p.revision.name == name]
        return PoolStatistics(
            instances=sum(p.size for p in pools),
            idle=sum(len(p.idle) for p in pools),
            busy=sum(len(p.busy) for p in pools),
            starting=sum(p.starting for p in pools),
            waiting=sum(len(p.waiters) for p in pools),
            cold_starts=0,
            warm_starts=0,
            timeouts=0,
        )


def _utc_stamp() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"


def _error_payload(exc: InvocationError) -> bytes:
    return json.dumps(exc.to_document(), separators=(",", ":")).encode()
