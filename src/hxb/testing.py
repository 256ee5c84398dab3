"""Fakes we ship for unit tests: a sandbox with real fds and no process, the runtime that drives
its other end, and a factory of them. Nothing here starts a process or opens a network socket.

A `FakeSandbox` gives the real `Worker` what a started instance gives it: a connected control
socket (a socketpair), a log pipe and an exit fd. Its `runtime` plays the bootstrap on the other
ends, either step by step from the test or by running a `Behaviour`, a coroutine function that is
the fake instance's whole program:

    async def echo(runtime: FakeRuntime) -> None:
        runtime.send_ready()
        while True:
            invoke = await runtime.next_invoke()
            runtime.send_result(invoke.invocation_id, invoke.body)

A behaviour that returns leaves its instance running (blocked, as a process waiting on a lock
would be) until it is terminated or killed; `runtime.exit(status)` makes it exit on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import json
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, Final, NamedTuple, cast

from hxb.pool.wire import HEADER, LOG_TAG, FrameType
from hxb.runtimes import RuntimeInfo
from hxb.sandbox.base import SandboxPaths, SandboxSpec

Behaviour = Callable[["FakeRuntime"], Coroutine[Any, Any, None]]
Handler = Callable[[dict[str, Any], bytes], bytes | Awaitable[bytes]]

# A wait status for "killed by signal N" is N itself (no core dump bit): what waitpid reports.
SIGTERM_STATUS: Final = int(signal.SIGTERM)
SIGKILL_STATUS: Final = int(signal.SIGKILL)

_pids = itertools.count(10_000)


def exit_status(code: int) -> int:
    """The wait status of a process that called exit(code)."""
    return (code & 0xFF) << 8


class FakeInvoke(NamedTuple):
    """One INVOKE frame as the runtime received it."""

    meta: dict[str, Any]
    body: bytes

    @property
    def invocation_id(self) -> str:
        return str(self.meta["id"])


class FakeRuntime(asyncio.Protocol):
    """The instance's side of a `FakeSandbox`: reads INVOKE frames, sends the runtime's frames
    and writes to the log pipe. Sends never block (they go through an asyncio transport)."""

    def __init__(self, sandbox: FakeSandbox, sock: socket.socket, log_write_fd: int) -> None:
        self.sandbox = sandbox
        self.invokes: list[FakeInvoke] = []
        # A behaviour that failed (not one that was killed): FakeSandboxFactory.close() raises it.
        self.error: BaseException | None = None
        self._sock = sock
        self._log_fd = log_write_fd
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._inbox: asyncio.Queue[FakeInvoke | None] = asyncio.Queue()
        self._lost: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._connected = False

    async def start(self, behaviour: Behaviour | None = None) -> None:
        """Connects this end of the channel; then runs `behaviour`, if given, as a task."""
        loop = asyncio.get_running_loop()
        self._lost = loop.create_future()
        await loop.create_unix_connection(lambda: self, sock=self._sock)
        self._connected = True
        if behaviour is not None:
            self._task = loop.create_task(behaviour(self), name=f"hxb-fake-{self.sandbox.instance_id}")
            self._task.add_done_callback(self._behaviour_done)

    def _behaviour_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        # EOFError: the platform hung up, after which a real runtime exits too.
        if exc is not None and not isinstance(exc, EOFError | ConnectionError):
            self.error = exc

    # --- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while len(self._buf) >= HEADER.size:
            frame_type, meta_len, body_len = HEADER.unpack_from(self._buf)
            end = HEADER.size + meta_len + body_len
            if len(self._buf) < end:
                return
            meta = bytes(self._buf[HEADER.size : HEADER.size + meta_len])
            body = bytes(self._buf[HEADER.size + meta_len : end])
            del self._buf[:end]
            if frame_type != FrameType.INVOKE:
                self.error = AssertionError(f"the platform sent frame type {frame_type}, expected INVOKE")
                continue
            invoke = FakeInvoke(json.loads(meta), body)
            self.invokes.append(invoke)
            self._inbox.put_nowait(invoke)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._inbox.put_nowait(None)
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    # --- what a runtime does --------------------------------------------------------------------

    async def next_invoke(self) -> FakeInvoke:
        """The next INVOKE frame. Raises EOFError once the platform closed the channel."""
        item = await self._inbox.get()
        if item is None:
            self._inbox.put_nowait(None)  # stays closed for the next call
            raise EOFError("the platform closed the channel")
        return item

    def send_ready(self) -> None:
        self._send(FrameType.READY, b"", b"")

    def send_init_error(self, error_type: str, message: str, stack_trace: Sequence[str] = ()) -> None:
        self._send(FrameType.INIT_ERROR, b"", _error_document(error_type, message, "", stack_trace))

    def send_result(self, invocation_id: str, body: bytes) -> None:
        self._send(FrameType.RESULT, invocation_id.encode(), body)

    def send_error(self, invocation_id: str, error_type: str, message: str, stack_trace: Sequence[str] = ()) -> None:
        doc = _error_document(error_type, message, invocation_id, stack_trace)
        self._send(FrameType.ERROR, invocation_id.encode(), doc)

    def send_raw(self, data: bytes) -> None:
        """Anything at all on the channel: for protocol violations."""
        if self._transport is None or self._transport.is_closing():
            raise ConnectionError(f"fake instance {self.sandbox.instance_id}: the channel is closed")
        self._transport.write(data)

    def _send(self, frame_type: FrameType, meta: bytes, body: bytes) -> None:
        self.send_raw(HEADER.pack(frame_type, len(meta), len(body)) + meta + body)

    def write_log(self, text: str) -> None:
        """Writes to the instance's stdout/stderr pipe (the platform reads it as log lines)."""
        if self._log_fd < 0:
            raise ConnectionError(f"fake instance {self.sandbox.instance_id}: the log pipe is closed")
        os.write(self._log_fd, text.encode())

    def write_invocation_log(self, invocation_id: str, line: str) -> None:
        """Writes one line as a runtime serving several invocations at once does: tagged with
        the invocation it belongs to."""
        self.write_log(f"{LOG_TAG}{invocation_id}{LOG_TAG}{line}\n")

    def exit(self, status: int = 0) -> None:
        """The instance exits on its own with wait status `status` (see `exit_status`)."""
        self.sandbox.exit(status)

    # --- teardown -------------------------------------------------------------------------------

    def _shutdown(self) -> None:
        """What the kernel does when the process dies: its program stops and its fds close."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._transport is not None:
            self._transport.close()
        elif not self._connected:
            self._sock.close()
        if self._log_fd >= 0:
            os.close(self._log_fd)
            self._log_fd = -1

    async def _dispose(self) -> None:
        self._shutdown()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        if self._transport is not None:
            self._transport.abort()  # close() waits for unsent data the platform may never read
        if self._connected and self._lost is not None:
            await self._lost


def _error_document(error_type: str, message: str, request_id: str, stack_trace: Sequence[str]) -> bytes:
    doc = {"errorMessage": message, "errorType": error_type, "requestId": request_id, "stackTrace": list(stack_trace)}
    return json.dumps(doc).encode()


class FakeSandbox:
    """A `Sandbox` with real fds and no process. `terminate()` and `kill()` are recorded in
    `signals` and make it exit (SIGTERM not if `ignore_sigterm`); `exit(status)` makes it exit
    on its own. `reported_memory_peak_bytes` is what `memory_peak_bytes()` returns."""

    def __init__(
        self,
        instance_id: str = "fake",
        *,
        ignore_sigterm: bool = False,
        memory_peak_bytes: int | None = None,
    ) -> None:
        self._instance_id = instance_id
        self._pid = next(_pids)
        self.ignore_sigterm = ignore_sigterm
        self.reported_memory_peak_bytes = memory_peak_bytes
        self.oom = False  # set to make the next exit an out-of-memory kill
        self.ready_calls = 0
        self.signals: list[signal.Signals] = []
        self.status: int | None = None
        self.closed = False
        self._control, runtime_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._control.setblocking(False)
        self._log_fd, log_w = os.pipe()
        os.set_blocking(self._log_fd, False)
        # A pipe stands in for the pidfd: it becomes readable when the fake exits.
        self._exit_fd, self._exit_w = os.pipe()
        os.set_blocking(self._exit_fd, False)
        self.runtime = FakeRuntime(self, runtime_sock, log_w)

    @property
    def instance_id(self) -> str:
        return self._instance_id

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def control(self) -> socket.socket:
        return self._control

    @property
    def log_fd(self) -> int:
        return self._log_fd

    @property
    def exit_fd(self) -> int:
        return self._exit_fd

    @property
    def terminated(self) -> bool:
        return signal.SIGTERM in self.signals

    @property
    def killed(self) -> bool:
        return signal.SIGKILL in self.signals

    @property
    def exited(self) -> bool:
        return self.status is not None

    def exit(self, status: int = 0) -> None:
        if self.status is not None:
            return
        self.status = status
        self.runtime._shutdown()
        if self._exit_w >= 0:
            with contextlib.suppress(BrokenPipeError):
                os.write(self._exit_w, b"x")
            os.close(self._exit_w)
            self._exit_w = -1

    def poll_exit(self) -> int | None:
        return self.status

    def terminate(self) -> None:
        self.signals.append(signal.SIGTERM)
        if not self.ignore_sigterm:
            self.exit(SIGTERM_STATUS)

    def kill(self) -> None:
        self.signals.append(signal.SIGKILL)
        self.exit(SIGKILL_STATUS)

    def memory_peak_bytes(self) -> int | None:
        return self.reported_memory_peak_bytes

    def out_of_memory(self) -> bool:
        return self.oom

    def on_ready(self) -> None:
        self.ready_calls += 1

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._control.close()
        for fd in (self._log_fd, self._exit_fd):
            with contextlib.suppress(OSError):
                os.close(fd)

    async def dispose(self) -> None:
        """Releases both sides, whatever state the fake is in. Close the pool first: a Worker
        still attached would be watching fds that are gone."""
        await self.runtime._dispose()
        if self._exit_w >= 0:
            os.close(self._exit_w)
            self._exit_w = -1
        self.close()


# --- behaviours ---------------------------------------------------------------------------------


async def echo(runtime: FakeRuntime) -> None:
    """Ready at once; answers every invocation with its own payload."""
    runtime.send_ready()
    while True:
        invoke = await runtime.next_invoke()
        runtime.send_result(invoke.invocation_id, invoke.body)


async def hang(runtime: FakeRuntime) -> None:
    """Ready at once; takes invocations and never answers them."""
    runtime.send_ready()
    while True:
        await runtime.next_invoke()


async def never_ready(runtime: FakeRuntime) -> None:
    """Init never finishes."""
    return


def serve(handler: Handler) -> Behaviour:
    """Ready at once; answers each invocation with `handler(meta, body)` (sync or async)."""

    async def behaviour(runtime: FakeRuntime) -> None:
        runtime.send_ready()
        while True:
            invoke = await runtime.next_invoke()
            result = handler(invoke.meta, invoke.body)
            body = await result if inspect.isawaitable(result) else result
            runtime.send_result(invoke.invocation_id, body)

    return behaviour


def serve_concurrently(handler: Handler) -> Behaviour:
    """Ready at once; answers each invocation with `handler(meta, body)` in a task of its own,
    so that invocations overlap (as the runtime does for concurrency_per_instance > 1)."""

    async def behaviour(runtime: FakeRuntime) -> None:
        runtime.send_ready()
        # Not a TaskGroup: the platform hanging up (EOFError here) must stay a plain EOFError.
        tasks: set[asyncio.Task[None]] = set()

        def done(task: asyncio.Task[None]) -> None:
            tasks.discard(task)
            exc = None if task.cancelled() else task.exception()
            if exc is not None and not isinstance(exc, EOFError | ConnectionError):
                runtime.error = exc

        try:
            while True:
                invoke = await runtime.next_invoke()
                task = asyncio.get_running_loop().create_task(_answer(runtime, handler, invoke))
                tasks.add(task)
                task.add_done_callback(done)
        finally:
            for task in list(tasks):
                task.cancel()

    return behaviour


async def _answer(runtime: FakeRuntime, handler: Handler, invoke: FakeInvoke) -> None:
    result = handler(invoke.meta, invoke.body)
    body = await result if inspect.isawaitable(result) else result
    runtime.send_result(invoke.invocation_id, body)


def fail_init(error_type: str = "Runtime.ImportModuleError", message: str = "No module named 'index'") -> Behaviour:
    """Reports an init error instead of READY, then stays alive (the platform must kill it)."""

    async def behaviour(runtime: FakeRuntime) -> None:
        runtime.send_init_error(error_type, message)

    return behaviour


def exit_on_invoke(status: int) -> Behaviour:
    """Ready at once; exits with wait status `status` when the first invocation arrives."""

    async def behaviour(runtime: FakeRuntime) -> None:
        runtime.send_ready()
        await runtime.next_invoke()
        runtime.exit(status)

    return behaviour


# --- the factory --------------------------------------------------------------------------------


class FakeSandboxFactory:
    """A `SandboxFactory` of `FakeSandbox`es, each running `behaviour` (which may be changed
    between starts). `started` holds the specs, `sandboxes` the fakes, in start order."""

    def __init__(
        self,
        behaviour: Behaviour = echo,
        *,
        ignore_sigterm: bool = False,
        memory_peak_bytes: int | None = None,
    ) -> None:
        self.behaviour = behaviour
        self.ignore_sigterm = ignore_sigterm
        self.memory_peak_bytes = memory_peak_bytes
        # Raised by the next start() instead of starting anything, if set.
        self.start_error: OSError | None = None
        self.started: list[SandboxSpec] = []
        self.sandboxes: list[FakeSandbox] = []

    @property
    def name(self) -> str:
        return "fake"

    def paths(self, spec_code_dir: Path, runtime_dir: Path, instance_id: str) -> SandboxPaths:
        # Lambda's fixed paths, as an isolating sandbox maps them; nothing is created.
        return SandboxPaths(task_root="/var/task", runtime_root="/var/runtime", opt_root="/opt", tmp_dir="/tmp")  # noqa: S108

    async def start(self, spec: SandboxSpec) -> FakeSandbox:
        if self.start_error is not None:
            raise self.start_error
        sandbox = FakeSandbox(
            spec.instance_id, ignore_sigterm=self.ignore_sigterm, memory_peak_bytes=self.memory_peak_bytes
        )
        self.started.append(spec)
        self.sandboxes.append(sandbox)
        await sandbox.runtime.start(self.behaviour)
        return sandbox

    async def prepare(self, runtimes: list[RuntimeInfo]) -> None:
        return None

    async def close(self) -> None:
        """Disposes of every fake; raises the first error a behaviour raised."""
        for sandbox in self.sandboxes:
            await sandbox.dispose()
        for sandbox in self.sandboxes:
            if sandbox.runtime.error is not None:
                raise sandbox.runtime.error


async def wait_until(predicate: Callable[[], bool], *, timeout_s: float = 1.0) -> None:
    """Lets the event loop run until `predicate()` holds; TimeoutError after `timeout_s`."""
    async with asyncio.timeout(timeout_s):
        # Polling, not an Event: the conditions are other objects' state, which has no hooks.
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.001)


__all__ = [
    "SIGKILL_STATUS",
    "SIGTERM_STATUS",
    "Behaviour",
    "FakeInvoke",
    "FakeRuntime",
    "FakeSandbox",
    "FakeSandboxFactory",
    "Handler",
    "echo",
    "exit_on_invoke",
    "exit_status",
    "fail_init",
    "hang",
    "never_ready",
    "serve",
    "serve_concurrently",
    "wait_until",
]
