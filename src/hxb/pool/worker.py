"""Worker: the pool's handle on one instance. Owns the instance's channel, log pipe and exit
watch, its in-flight invocations (answers are matched to them by invocation id), and its
lifecycle state machine."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Final

from hxb.errors import (
    FunctionInitError,
    InitTimeoutError,
    InternalError,
    InvocationError,
    RuntimeExitError,
    RuntimeOutOfMemoryError,
    RuntimeProtocolError,
)
from hxb.logs.capture import InvocationLog, LineSplitter
from hxb.logs.records import LogEvent, now_ms
from hxb.logs.sink import LogFlow
from hxb.models import FunctionRevision
from hxb.pool.wire import LOG_TAG, Frame, FrameDecoder, FrameType, encode_frame
from hxb.sandbox.base import Sandbox, describe_wait_status

log = logging.getLogger(__name__)


class WorkerState(enum.Enum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    DEAD = "dead"


# Transitions are irreversible: a dead worker never comes back.
_ALLOWED: Final[dict[WorkerState, frozenset[WorkerState]]] = {
    WorkerState.STARTING: frozenset({WorkerState.IDLE, WorkerState.BUSY, WorkerState.DEAD}),
    WorkerState.IDLE: frozenset({WorkerState.BUSY, WorkerState.DEAD}),
    WorkerState.BUSY: frozenset({WorkerState.IDLE, WorkerState.DEAD}),
    WorkerState.DEAD: frozenset(),
}

# How long a runtime that closed its channel gets to actually exit before it is killed.
_EXIT_AFTER_EOF_S: Final = 2.0
_LOG_READ_BYTES: Final = 256 * 1024
_LOG_DRAIN_BYTES: Final = 1024 * 1024


class _Channel(asyncio.Protocol):
    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    def data_received(self, data: bytes) -> None:
        self._worker._on_channel_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._worker._on_channel_closed()


class Worker:
    """One instance of one function revision. Serves up to `capacity` invocations at once (the
    function's `concurrency_per_instance`, 1 unless its async handler opts in); BUSY while it
    serves at least one. `running` and `draining` are the pool's bookkeeping."""

    def __init__(
        self,
        *,
        sandbox: Sandbox,
        revision: FunctionRevision,
        stream: str,
        emit_log: Callable[[LogEvent], None],
        max_response_bytes: int,
        max_line_bytes: int,
        on_dead: Callable[[Worker], None],
        spawn_started: float,
        log_flow: LogFlow | None = None,
    ) -> None:
        self.sandbox = sandbox
        self._spawn_started = spawn_started
        self._log_flow = log_flow
        self._log_paused = False
        self._closed = False
        self.revision = revision
        self.stream = stream
        self.state = WorkerState.STARTING
        self.spawned_at = time.monotonic()
        self.last_used = self.spawned_at
        self.invocations = 0
        # Reported on the first invocation only, as Lambda reports Init Duration.
        self.init_duration_ms: float | None = None
        self.retired = False
        self.capacity = revision.config.concurrency_per_instance
        self.running = 0  # invocations handed this instance and not released yet
        # An invocation of it timed out while others ran: no new ones, killed after the last.
        self.draining = False
        # Above 1, the runtime tags each line with its invocation; at 1, every line written
        # during an invocation is that invocation's (`_untagged_log`).
        self._tagged = self.capacity > 1
        self._logs: dict[str, InvocationLog] = {}
        self._untagged_log: InvocationLog | None = None
        self._emit_log = emit_log
        self._on_dead = on_dead
        self._decoder = FrameDecoder(max_response_bytes)
        self._splitter = LineSplitter(max_line_bytes, tag=LOG_TAG if self._tagged else None)
        self._transport: asyncio.Transport | None = None
        self._init_answered = False
        self._init_waiter: asyncio.Future[Frame] | None = None
        # Invocation id (as the frames carry it) -> the future its RESULT or ERROR resolves.
        self._pending: dict[bytes, asyncio.Future[Frame]] = {}
        # Invocations the platform gave up on (deadline, cancel): an answer still coming is dropped.
        self._abandoned: set[bytes] = set()
        self._channel_closed = False
        self._early_frame: Frame | None = None
        self._exit_task: asyncio.Task[int] | None = None
        self._exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._loop = asyncio.get_running_loop()

    @property
    def id(self) -> str:
        return self.sandbox.instance_id

    def transition(self, new: WorkerState) -> None:
        if new not in _ALLOWED[self.state]:
            raise InternalError(f"worker {self.id}: illegal transition {self.state.name} -> {new.name}")
        self.state = new

    # --- start-up -------------------------------------------------------------------------------

    async def attach(self) -> None:
        loop = self._loop
        transport, _ = await loop.create_unix_connection(lambda: _Channel(self), sock=self.sandbox.control)
        self._transport = transport
        loop.add_reader(self.sandbox.log_fd, self._on_log_readable)
        loop.add_reader(self.sandbox.exit_fd, self._on_exit_readable)

    async def wait_ready(self, init_timeout_s: float) -> None:
        """Waits for the runtime's READY. Raises the init error it reports instead, or
        InitTimeoutError / RuntimeExitError; the caller then kills the instance."""
        try:
            async with asyncio.timeout(init_timeout_s):
                frame = await self._init_frame()
        except TimeoutError:
            raise InitTimeoutError(init_timeout_s) from None
        # Init Duration counts from the request to spawn to READY: what the caller waited.
        self.init_duration_ms = (time.perf_counter() - self._spawn_started) * 1000
        if frame.type == FrameType.READY:
            self.sandbox.on_ready()
            return
        if frame.type == FrameType.INIT_ERROR:
            raise self._init_error(frame.body)
        raise RuntimeProtocolError(f"the runtime sent {frame.type.name} before it was ready")

    @staticmethod
    def _init_error(body: bytes) -> FunctionInitError:
        try:
            doc = json.loads(body)
            return FunctionInitError(
                str(doc.get("errorType") or "Runtime.Unknown"),
                str(doc.get("errorMessage") or ""),
                tuple(str(s) for s in doc.get("stackTrace") or ()),
            )
        except (ValueError, AttributeError, TypeError, RecursionError):
            return FunctionInitError("Runtime.InvalidInitError", "the runtime reported an unreadable init error")

    # --- invoking -------------------------------------------------------------------------------

    async def invoke(self, meta: bytes, payload: bytes, log: InvocationLog) -> Frame:
        """Sends one INVOKE and waits for its RESULT or ERROR frame (no deadline here: the
        pool wraps this in the function's timeout). The invocation's output goes to `log` from
        now until `end_invocation`."""
        invocation_id = log.invocation_id
        if not self._tagged:
            # What the instance wrote while idle is the instance's, not this invocation's.
            self._drain_log_pipe()
            for line in self._splitter.flush():
                self._route_line(line)
            self._untagged_log = log
        self._logs[invocation_id] = log
        if self._transport is None or self._channel_closed:
            raise await self._exit_error(invocation_id)
        key = invocation_id.encode()
        if key in self._pending:
            raise InternalError(f"worker {self.id}: invocation {invocation_id} sent twice")
        waiter: asyncio.Future[Frame] = self._loop.create_future()
        self._pending[key] = waiter
        self._transport.write(encode_frame(FrameType.INVOKE, meta, payload))
        try:
            frame = await waiter
        except asyncio.CancelledError:
            if not waiter.done():
                # Timed out (or cancelled): the handler may still answer; that is not a protocol error.
                self._abandoned.add(key)
            raise
        finally:
            del self._pending[key]
        # Everything the handler printed was written to the pipe before the runtime sent its
        # answer, but the loop may not have read it yet: read it now, before END is logged.
        self._drain_log_pipe()
        if not self._tagged:
            for line in self._splitter.flush():
                self._route_line(line)
        return frame

    def end_invocation(self, invocation_id: str) -> None:
        """The invocation is over (END logged or about to be): later output is the instance's."""
        log = self._logs.pop(invocation_id, None)
        if log is not None and log is self._untagged_log:
            self._untagged_log = None

    async def _init_frame(self) -> Frame:
        if self._init_waiter is not None:
            raise InternalError(f"worker {self.id}: two waiters for init")
        if self._early_frame is not None:
            frame, self._early_frame = self._early_frame, None
            return frame
        if self._channel_closed:
            raise await self._exit_error("")
        self._init_waiter = self._loop.create_future()
        try:
            return await self._init_waiter
        finally:
            self._init_waiter = None

    async def _exit_error(self, invocation_id: str) -> InvocationError:
        """The runtime closed its channel: wait (briefly) for its exit status to say why."""
        return self._exit_error_for(invocation_id, await self._wait_exit_status())

    async def _wait_exit_status(self) -> int:
        try:
            async with asyncio.timeout(_EXIT_AFTER_EOF_S):
                return await asyncio.shield(self._exited)
        except TimeoutError:
            self.sandbox.kill()
            return await asyncio.shield(self._exited)

    def _exit_error_for(self, invocation_id: str, status: int) -> InvocationError:
        if self.sandbox.out_of_memory():
            return RuntimeOutOfMemoryError(invocation_id, describe_wait_status(status))
        return RuntimeExitError(invocation_id, describe_wait_status(status))

    def _on_channel_data(self, data: bytes) -> None:
        try:
            frames = self._decoder.feed(data)
        except InvocationError as exc:
            self._fail_channel(exc)
            return
        for frame in frames:
            if not self._init_answered:
                # The runtime's first frame answers init (READY or INIT_ERROR); a fast
                # runtime's can arrive before `wait_ready` asks for it.
                self._init_answered = True
                waiter = self._init_waiter
                if waiter is not None and not waiter.done():
                    waiter.set_result(frame)
                else:
                    self._early_frame = frame
                continue
            if frame.type in (FrameType.RESULT, FrameType.ERROR):
                waiter = self._pending.get(frame.meta)
                if waiter is not None and not waiter.done():
                    waiter.set_result(frame)
                    continue
                if frame.meta in self._abandoned:
                    self._abandoned.discard(frame.meta)
                    continue
                # E.g. a thread left over from an earlier invocation answering now.
                self._fail_channel(
                    RuntimeProtocolError("the runtime answered for an invocation that is not in progress")
                )
                return
            self._fail_channel(RuntimeProtocolError(f"the runtime sent an unexpected {frame.type.name} frame"))
            return

    def _waiters(self) -> list[tuple[str, asyncio.Future[Frame]]]:
        """Everyone waiting on the channel: init ("" for its id) and each invocation."""
        waiters = [(key.decode(), fut) for key, fut in self._pending.items() if not fut.done()]
        if self._init_waiter is not None and not self._init_waiter.done():
            waiters.append(("", self._init_waiter))
        return waiters

    def _fail_channel(self, exc: InvocationError) -> None:
        # A runtime that breaks the protocol is not trusted again; which of its invocations
        # caused it is not known, so every one in flight fails with it.
        self.sandbox.kill()
        for _, waiter in self._waiters():
            waiter.set_exception(exc)
        if self._transport is not None:
            self._transport.abort()

    def _on_channel_closed(self) -> None:
        self._channel_closed = True
        waiters = self._waiters()
        if not waiters:
            return
        task = self._loop.create_task(self._wait_exit_status())
        self._exit_task = task  # referenced until it ran: nothing fire-and-forget

        def deliver(done: asyncio.Task[int]) -> None:
            if done.cancelled():
                return
            # The instance died: each invocation in flight fails, with its own id.
            status = done.result()
            for invocation_id, waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(self._exit_error_for(invocation_id, status))

        task.add_done_callback(deliver)

    # --- exit and logs --------------------------------------------------------------------------

    def _on_exit_readable(self) -> None:
        status = self.sandbox.poll_exit()
        if status is None:
            return
        self._loop.remove_reader(self.sandbox.exit_fd)
        self._drain_log_pipe()
        for line in self._splitter.flush():
            self._route_line(line)
        if not self._exited.done():
            self._exited.set_result(status)
        if self.state is not WorkerState.DEAD:
            self.transition(WorkerState.DEAD)
        self._on_dead(self)

    async def wait_exited(self) -> int:
        return await asyncio.shield(self._exited)

    def _on_log_readable(self) -> None:
        # One bounded read per wake-up: a flooding instance gets its turn, not the whole loop.
        self._read_log_pipe(_LOG_READ_BYTES)
        if self._log_flow is not None and not self._log_paused and self._log_flow.over_quota(self.stream):
            # The store is behind on this instance's output: stop reading, so the instance
            # blocks on its full pipe, until a flush makes room.
            self._log_paused = True
            self._loop.remove_reader(self.sandbox.log_fd)
            self._log_flow.when_flushed(self._resume_log)

    def _resume_log(self) -> None:
        if not self._log_paused or self._closed:
            return
        if self._log_flow is not None and self._log_flow.over_quota(self.stream):
            self._log_flow.when_flushed(self._resume_log)
            return
        self._log_paused = False
        self._loop.add_reader(self.sandbox.log_fd, self._on_log_readable)

    def _drain_log_pipe(self) -> None:
        """Reads what is already in the pipe, up to a bound (a child process that never stops
        writing must not keep the loop here)."""
        self._read_log_pipe(_LOG_DRAIN_BYTES)

    def _read_log_pipe(self, limit_bytes: int) -> None:
        fd = self.sandbox.log_fd
        taken = 0
        while taken < limit_bytes:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                # EOF: every writer (the instance and its children) is gone.
                self._loop.remove_reader(fd)
                return
            taken += len(data)
            for line in self._splitter.feed(data):
                self._route_line(line)
            if len(data) < 65536:
                return

    def _route_line(self, line: str) -> None:
        if self._tagged and line.startswith(LOG_TAG):
            end = line.find(LOG_TAG, 1)
            if end > 0:
                log = self._logs.get(line[1:end])
                line = line[end + 1 :]
                if log is not None:
                    log.add(line)
                    return
            # An invocation that already ended (a task it left behind): the instance's line.
            self.instance_log(line)
            return
        if self._untagged_log is not None:
            self._untagged_log.add(line)
        else:
            self.instance_log(line)

    def instance_log(self, message: str) -> None:
        """A line that belongs to the instance, not to one invocation (init, shutdown)."""
        rev = self.revision
        self._emit_log(LogEvent(rev.workspace, rev.name, self.stream, None, now_ms(), message))

    # --- shutdown -------------------------------------------------------------------------------

    async def stop(self, grace_s: float) -> None:
        """SIGTERM, up to `grace_s` for the instance's cleanup hooks, then SIGKILL."""
        if self.state is not WorkerState.DEAD:
            self.transition(WorkerState.DEAD)
        if not self._exited.done():
            self.sandbox.terminate()
            try:
                async with asyncio.timeout(grace_s):
                    await asyncio.shield(self._exited)
            except TimeoutError:
                self.sandbox.kill()
                await asyncio.shield(self._exited)
        self.close()

    async def kill(self) -> None:
        if self.state is not WorkerState.DEAD:
            self.transition(WorkerState.DEAD)
        self.sandbox.kill()
        if not self._exited.done():
            await asyncio.shield(self._exited)
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._exit_task is not None:
            self._exit_task.cancel()
        loop = self._loop
        for fd in (self.sandbox.log_fd, self.sandbox.exit_fd):
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(fd)
        if self._transport is not None:
            self._transport.abort()
        self.sandbox.close()
