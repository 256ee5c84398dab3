"""run_process: runs a helper program (ip, nft, mkfs, mount, a compiler) from the event loop
without stalling it.

asyncio's subprocesses (uvloop's too) fork the platform: copying the page tables of a process
of a few hundred MB blocks the loop for ~17 ms, measured, per spawn, and the sandbox spawns
several tools per instance it prepares. posix_spawn is vfork + exec: nothing is copied, the
loop stalls for ~0.3 ms. The exit is watched through a pidfd, the output through readers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

_OUTPUT_GRACE_S = 2.0


@dataclass(frozen=True, slots=True)
class ProcessResult:
    returncode: int  # negative: killed by that signal
    stdout: bytes
    stderr: bytes


class _Collector:
    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        self.loop = loop
        self.fd = fd
        self.chunks: list[bytes] = []
        self.closed = False
        self.done: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, self._read)

    def _read(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.chunks.append(data)
            return
        self.close()

    def close(self) -> None:
        # Exactly once: a second close could hit an fd number already reused by someone else.
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.fd)
        os.close(self.fd)
        if not self.done.done():
            self.done.set_result(None)

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


async def _feed(loop: asyncio.AbstractEventLoop, fd: int, data: bytes) -> None:
    view = memoryview(data)
    try:
        while view:
            try:
                written = os.write(fd, view)
            except BlockingIOError:
                ready: asyncio.Future[None] = loop.create_future()

                def writable(ready: asyncio.Future[None] = ready) -> None:
                    if not ready.done():
                        ready.set_result(None)

                loop.add_writer(fd, writable)
                try:
                    await ready
                finally:
                    loop.remove_writer(fd)
                continue
            except BrokenPipeError:
                return  # the program stopped reading: its exit status says why
            view = view[written:]
    finally:
        os.close(fd)


def _spawn(argv: Sequence[str], env: Mapping[str, str] | None, *, with_input: bool) -> tuple[int, int, int, int]:
    """posix_spawn with stdin (a pipe, or /dev/null), stdout and stderr pipes: (pid, stdin's
    write end or -1, stdout's read end, stderr's read end)."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    in_r, in_w = os.pipe() if with_input else (os.open(os.devnull, os.O_RDONLY), -1)
    try:
        pid = os.posix_spawnp(
            argv[0],
            list(argv),
            dict(env if env is not None else os.environ),
            file_actions=[
                (os.POSIX_SPAWN_DUP2, in_r, 0),
                (os.POSIX_SPAWN_DUP2, out_w, 1),
                (os.POSIX_SPAWN_DUP2, err_w, 2),
            ],
            setsigdef=(signal.SIGPIPE,),
        )
    except OSError:
        for fd in (out_r, err_r, in_w):
            if fd >= 0:
                os.close(fd)
        raise
    finally:
        for fd in (out_w, err_w, in_r):
            os.close(fd)
    return pid, in_w, out_r, err_r


async def run_process(
    argv: Sequence[str],
    *,
    input_bytes: bytes | None = None,
    env: Mapping[str, str] | None = None,
    timeout_s: float | None = None,
) -> ProcessResult:
    """Runs `argv` (argv[0] found on PATH if not absolute) to its end. On timeout or
    cancellation the program is killed (SIGKILL) and reaped before this returns or raises."""
    loop = asyncio.get_running_loop()
    pid, in_w, out_r, err_r = _spawn(argv, env, with_input=input_bytes is not None)
    pidfd = os.pidfd_open(pid)
    for fd in (out_r, err_r):
        os.set_blocking(fd, False)
    stdout, stderr = _Collector(loop, out_r), _Collector(loop, err_r)
    exited: asyncio.Future[int] = loop.create_future()
    # Not `exited.done()`: cancelling this coroutine cancels that future too, and then the
    # program may well still run, and its pidfd still be watched.
    state = {"reaped": False, "watching": True}

    def on_exit() -> None:
        try:
            waited, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            waited, status = pid, 255 << 8
        if waited != pid:
            return
        state["reaped"] = True
        state["watching"] = False
        loop.remove_reader(pidfd)
        if not exited.done():
            exited.set_result(os.waitstatus_to_exitcode(status))

    loop.add_reader(pidfd, on_exit)
    feeder = None
    if input_bytes is not None:
        os.set_blocking(in_w, False)
        feeder = loop.create_task(_feed(loop, in_w, input_bytes))
    try:
        async with asyncio.timeout(timeout_s):
            returncode = await exited
            # Its output ends with it, unless a process it started still holds the pipes.
            await asyncio.wait([stdout.done, stderr.done], timeout=_OUTPUT_GRACE_S)
    except BaseException:
        if not state["reaped"]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)  # noqa: ASYNC222 -- SIGKILLed: returns at once
        raise
    finally:
        # Unregistered before it is closed, always: a stale registration would swallow the
        # events of the next fd given the same number.
        if state["watching"]:
            loop.remove_reader(pidfd)
        if feeder is not None:
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await feeder
        stdout.close()
        stderr.close()
        os.close(pidfd)
    return ProcessResult(returncode, stdout.data, stderr.data)
