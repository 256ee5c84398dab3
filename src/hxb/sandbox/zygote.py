"""ZygoteClient: the platform's end of one runtime's zygote (`_hxb_zygote` in the bootstraps).

The zygote is a root process in the host's namespaces that has imported the runtime; asked
over a SOCK_SEQPACKET socket, it forks an instance into a fresh sandbox and reports its pid,
and later how it exited. If the zygote dies, its instances die with it (PDEATHSIG) and every
one of them is reported exited; the next spawn starts a new zygote.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from hxb.errors import SandboxSpawnError
from hxb.runtimes import RuntimeInfo

log = logging.getLogger(__name__)

_MAX_MESSAGE: Final = 256 * 1024
_START_TIMEOUT_S: Final = 15.0
_SPAWN_TIMEOUT_S: Final = 15.0
ExitCallback = Callable[[int], None]


class ZygoteClient:
    def __init__(self, runtime: RuntimeInfo, pid: int, sock: socket.socket, output_fd: int) -> None:
        self.runtime = runtime
        self.pid = pid
        self.seccomp = False
        self._sock = sock
        self._output_fd = output_fd
        self._loop = asyncio.get_running_loop()
        self._ready: asyncio.Future[None] = self._loop.create_future()
        self._spawns: dict[str, asyncio.Future[int]] = {}
        self._exits: dict[str, ExitCallback] = {}
        self._send_lock = asyncio.Lock()
        self._output = b""
        self.alive = True
        self._closed = False

    @classmethod
    async def start(cls, runtime: RuntimeInfo, runtime_dir: Path) -> ZygoteClient:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        out_r, out_w = os.pipe()
        devnull = os.open(os.devnull, os.O_RDONLY)
        code = f"import sys;sys.path.insert(0,{str(runtime_dir)!r});import _hxb_zygote as z;z.main()"
        argv = [str(runtime.executable), "-I", "-S", "-u", "-c", code]
        try:
            # posix_spawn is vfork + exec: fine on the event loop. The zygote gets only stdio
            # and its socket, on fd 3, and a session of its own: no instance may inherit the
            # terminal `hxb serve` was started from (it could type into it, or read it).
            pid = os.posix_spawn(  # noqa: ASYNC221
                argv[0],
                argv,
                {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"},
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, devnull, 0),
                    (os.POSIX_SPAWN_DUP2, out_w, 1),
                    (os.POSIX_SPAWN_DUP2, out_w, 2),
                    (os.POSIX_SPAWN_DUP2, child.fileno(), 3),
                ],
                setsid=True,
            )
        finally:
            child.close()
            os.close(out_w)
            os.close(devnull)
        parent.setblocking(False)
        os.set_blocking(out_r, False)
        client = cls(runtime, pid, parent, out_r)
        client._loop.add_reader(parent.fileno(), client._on_messages)
        client._loop.add_reader(out_r, client._on_output)
        try:
            async with asyncio.timeout(_START_TIMEOUT_S):
                await client._ready
        except (TimeoutError, SandboxSpawnError) as exc:
            await client.close()
            output = client._output[-2000:]
            raise SandboxSpawnError(
                f"the {runtime.name} zygote did not start: {str(exc) or 'no answer'}; output: {output!r}"
            ) from None
        return client

    async def spawn(
        self, request: Mapping[str, Any], fds: Sequence[int], on_exit: ExitCallback, *, op: str = "spawn"
    ) -> int:
        """Asks for one instance (op "spawn", fds: control and log) or a sandbox prepared ahead
        of demand (op "prepare", fd: its assignment socket); returns its pid (the init of its
        PID namespace). `on_exit` is called with the runtime's wait status when it is gone."""
        if not self.alive:
            raise SandboxSpawnError(f"the {self.runtime.name} zygote is not running")
        instance_id = str(request["id"])
        future: asyncio.Future[int] = self._loop.create_future()
        self._spawns[instance_id] = future
        self._exits[instance_id] = on_exit
        payload = json.dumps({**request, "op": op}).encode()
        try:
            async with asyncio.timeout(_SPAWN_TIMEOUT_S):
                await self._send(payload, fds)
                return await future
        except (OSError, TimeoutError) as exc:
            self._exits.pop(instance_id, None)
            raise SandboxSpawnError(f"the {self.runtime.name} zygote could not start an instance: {exc}") from None
        finally:
            self._spawns.pop(instance_id, None)

    async def _send(self, payload: bytes, fds: Sequence[int]) -> None:
        """One SEQPACKET message (sent whole or not at all). In a burst of cold starts the
        zygote forks one instance at a time while requests pile up in the socket: when its
        buffer is full, wait until it drains, in order, rather than fail the start."""
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        async with self._send_lock:
            while True:
                try:
                    self._sock.sendmsg([payload], ancillary)
                except BlockingIOError:
                    await self._writable()
                else:
                    return

    async def _writable(self) -> None:
        writable: asyncio.Future[None] = self._loop.create_future()
        fd = self._sock.fileno()

        def wake() -> None:
            if not writable.done():
                writable.set_result(None)

        self._loop.add_writer(fd, wake)
        try:
            await writable
        finally:
            self._loop.remove_writer(fd)

    def _on_messages(self) -> None:
        while True:
            try:
                data = self._sock.recv(_MAX_MESSAGE)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._died("its socket closed")
                return
            try:
                self._dispatch(json.loads(data))
            except (ValueError, KeyError, TypeError) as exc:
                log.exception("bad message from a zygote", extra={"runtime": self.runtime.name, "error": str(exc)})

    def _dispatch(self, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == "ready":
            self.seccomp = bool(message.get("seccomp"))
            if not self._ready.done():
                self._ready.set_result(None)
        elif op == "spawned":
            future = self._spawns.get(message["id"])
            if future is not None and not future.done():
                future.set_result(int(message["pid"]))
        elif op == "failed":
            future = self._spawns.get(message["id"])
            self._exits.pop(message["id"], None)
            if future is not None and not future.done():
                future.set_exception(SandboxSpawnError(f"could not start an instance: {message.get('error')}"))
        elif op == "exited":
            callback = self._exits.pop(message["id"], None)
            if callback is not None:
                callback(int(message["status"]))

    def _on_output(self) -> None:
        try:
            data = os.read(self._output_fd, 65536)
        except BlockingIOError:
            return
        if not data:
            self._loop.remove_reader(self._output_fd)
            return
        self._output = (self._output + data)[-8192:]
        for line in data.decode(errors="replace").splitlines():
            log.warning("zygote %s: %s", self.runtime.name, line)

    def _died(self, why: str) -> None:
        if not self.alive:
            return
        self.alive = False
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self._sock.fileno())
        error = SandboxSpawnError(f"the {self.runtime.name} zygote stopped ({why})")
        if not self._ready.done():
            self._ready.set_exception(error)
        for future in self._spawns.values():
            if not future.done():
                future.set_exception(error)
        # Its instances died with it (PDEATHSIG): their status is unknown.
        exits, self._exits = self._exits, {}
        for callback in exits.values():
            callback(-1)
        if self._loop.is_running():
            log.warning("zygote %s stopped: %s", self.runtime.name, why)

    async def close(self) -> None:
        # Once: closing an fd twice could close whatever got its number in between.
        if self._closed:
            return
        self._closed = True
        self._died("closed")
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self._output_fd)
        self._sock.close()
        with contextlib.suppress(OSError):
            os.close(self._output_fd)
        # Its socket closing ends it; give it a moment, then make sure.
        for _ in range(50):
            try:
                pid, _ = os.waitpid(self.pid, os.WNOHANG)  # noqa: ASYNC222 -- WNOHANG: never blocks
            except ChildProcessError:
                return
            if pid == self.pid:
                return
            await asyncio.sleep(0.02)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)  # noqa: ASYNC222 -- SIGKILLed: returns at once
