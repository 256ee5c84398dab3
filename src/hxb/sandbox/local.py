"""LocalSandboxFactory: each instance is a plain child process, with no isolation.

For development machines where namespaces and cgroups are unavailable, and the reference
against which the isolating factories are measured. Instances still get their own process
group (so a kill takes their children too), a private TMPDIR and nothing but the fds we pass.
"""

from __future__ import annotations

import contextlib
import os
import resource  # noqa: F401 -- os.wait4 imports it lazily, which can fail later (EMFILE)
import shutil
import signal
import socket
from pathlib import Path

from hxb.runtimes import RuntimeInfo
from hxb.sandbox.base import SandboxPaths, SandboxSpec

# The bootstrap finds its end of the control channel here (see _hxb_bootstrap.main).
CONTROL_FD = 3


class LocalSandbox:
    def __init__(self, instance_id: str, pid: int, control: socket.socket, log_fd: int, workdir: Path) -> None:
        self._instance_id = instance_id
        self._pid = pid
        self._control = control
        self._log_fd = log_fd
        self._workdir = workdir
        self._exit_fd = os.pidfd_open(pid)
        self._status: int | None = None
        self._status_fd: int | None = None
        self._exit_peak_bytes: int | None = None
        self._closed = False

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

    def poll_exit(self) -> int | None:
        if self._status is not None:
            return self._status
        try:
            exited = os.waitid(os.P_PID, self._pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            self._status = -1  # reaped by someone else: the status is lost, but it is gone
            return self._status
        if exited is None:
            return None
        # The instance is a zombie: its pid, and so its process group id, cannot be reused
        # yet. Kill what it left running in its group now; once reaped, never signal again.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._pid, signal.SIGKILL)
        try:
            _, status, usage = os.wait4(self._pid, os.WNOHANG)
        except ChildProcessError:
            self._status = -1
            return self._status
        self._status = status
        # /proc/PID is gone once reaped: the kernel's own account of its peak (KiB).
        self._exit_peak_bytes = usage.ru_maxrss * 1024
        return self._status

    def terminate(self) -> None:
        self._signal_group(signal.SIGTERM)

    def kill(self) -> None:
        self._signal_group(signal.SIGKILL)

    def _signal_group(self, sig: signal.Signals) -> None:
        # The instance leads its own process group: signalling the group reaches the
        # processes it spawned too (those that did not start a session of their own). Once
        # reaped, its pid may belong to someone else: no more signals (see poll_exit).
        if self._status is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._pid, sig)

    def memory_peak_bytes(self) -> int | None:
        # Read on every invocation (REPORT's Max Memory Used): pread on a kept fd costs a third
        # of an open/read/close of /proc/PID/status.
        if self._status is not None:
            return self._exit_peak_bytes
        try:
            if self._status_fd is None:
                self._status_fd = os.open(f"/proc/{self._pid}/status", os.O_RDONLY | os.O_CLOEXEC)
            data = os.pread(self._status_fd, 4096, 0)
        except OSError:
            return None
        start = data.find(b"VmHWM:")
        if start < 0:
            return None
        end = data.find(b"\n", start)
        try:
            return int(data[start + 6 : end].split()[0]) * 1024
        except (ValueError, IndexError):
            return None

    def out_of_memory(self) -> bool:
        return False  # no memory limit without a cgroup

    def on_ready(self) -> None:
        return None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._control.close()
        for fd in (self._log_fd, self._exit_fd, self._status_fd):
            if fd is None:
                continue
            with contextlib.suppress(OSError):
                os.close(fd)
        shutil.rmtree(self._workdir, ignore_errors=True)


class LocalSandboxFactory:
    """Starts instances with posix_spawn: no fork of the (large) platform process."""

    def __init__(self, instances_dir: Path) -> None:
        self._instances_dir = instances_dir
        instances_dir.mkdir(parents=True, exist_ok=True)

    @property
    def name(self) -> str:
        return "local"

    def _workdir(self, instance_id: str) -> Path:
        return self._instances_dir / instance_id

    def paths(self, spec_code_dir: Path, runtime_dir: Path, instance_id: str) -> SandboxPaths:
        workdir = self._workdir(instance_id)
        # An empty per-instance /opt: the host's own /opt must not land on sys.path.
        return SandboxPaths(
            task_root=str(spec_code_dir),
            runtime_root=str(runtime_dir),
            opt_root=str(workdir / "opt"),
            tmp_dir=str(workdir / "tmp"),
        )

    async def start(self, spec: SandboxSpec) -> LocalSandbox:
        workdir = self._workdir(spec.instance_id)
        (workdir / "tmp").mkdir(parents=True, exist_ok=True)
        (workdir / "opt").mkdir(exist_ok=True)
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        log_r, log_w = os.pipe()
        devnull = os.open(os.devnull, os.O_RDONLY)
        env = dict(spec.env)
        env["_HXB_CONTROL_FD"] = str(CONTROL_FD)
        if child_sock.fileno() == CONTROL_FD:
            # dup2 onto itself would keep close-on-exec set: make it inheritable instead.
            os.set_inheritable(CONTROL_FD, True)
        try:
            # posix_spawn is vfork + exec: it returns in well under a millisecond and never
            # copies the platform's memory, so it is fine on the event loop.
            pid = os.posix_spawn(  # noqa: ASYNC221
                spec.argv[0],
                list(spec.argv),
                env,
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, devnull, 0),
                    (os.POSIX_SPAWN_DUP2, log_w, 1),
                    (os.POSIX_SPAWN_DUP2, log_w, 2),
                    (os.POSIX_SPAWN_DUP2, child_sock.fileno(), CONTROL_FD),
                ],
                setsid=True,  # its own session and process group; never the server's terminal
            )
        except OSError:
            parent_sock.close()
            os.close(log_r)
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        finally:
            child_sock.close()
            os.close(log_w)
            os.close(devnull)
        parent_sock.setblocking(False)
        os.set_blocking(log_r, False)
        try:
            return LocalSandbox(spec.instance_id, pid, parent_sock, log_r, workdir)
        except OSError:
            # No fd left for the pidfd (EMFILE): do not leave an instance nobody watches.
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)  # noqa: ASYNC222 -- SIGKILLed: returns at once
            parent_sock.close()
            os.close(log_r)
            shutil.rmtree(workdir, ignore_errors=True)
            raise

    async def prepare(self, runtimes: list[RuntimeInfo]) -> None:
        return None

    async def close(self) -> None:
        return None
