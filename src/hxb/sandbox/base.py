"""The seam between the pool and how instances are started: `SandboxSpec` says what to run,
a `SandboxFactory` starts it and returns a `Sandbox`, one isolated process tree.

The pool talks to an instance only through the `Sandbox`: a control socket (the private
channel to the bootstrap), a log pipe (the instance's stdout and stderr, merged so their order
is kept), and the lifecycle calls. A factory may exec a fresh interpreter per instance or ask a
zygote, an interpreter that has already imported the runtime, to fork one; the pool cannot tell.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from hxb.runtimes import RuntimeInfo
from hxb.spec import EgressRule


@dataclass(frozen=True, slots=True)
class SandboxPaths:
    """Where an instance sees its files. A sandbox with its own mount namespace maps the
    host directories to Lambda's fixed paths; the local (no isolation) one uses host paths."""

    task_root: str
    runtime_root: str
    opt_root: str
    tmp_dir: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SandboxSpec:
    instance_id: str
    runtime: RuntimeInfo
    argv: tuple[str, ...]  # the bootstrap command, with paths as the instance sees them
    code_dir: Path  # host path, read-only for the instance (/var/task)
    runtime_dir: Path  # host path of the bootstrap (/var/runtime)
    layers_dir: Path | None  # host path mounted at /opt, if any
    env: Mapping[str, str]  # the instance's whole environment
    memory_limit_mib: int
    ephemeral_storage_mib: int
    # None: outbound network unrestricted (through NAT); a tuple: only these destinations.
    egress: tuple[EgressRule, ...] | None = None
    labels: Mapping[str, str] = field(default_factory=dict)


class Sandbox(Protocol):
    """One started instance: a process tree, its control socket and its log pipe."""

    @property
    def instance_id(self) -> str: ...
    @property
    def pid(self) -> int: ...
    @property
    def control(self) -> socket.socket: ...  # the platform's end; non-blocking
    @property
    def log_fd(self) -> int: ...  # read end of the merged stdout/stderr pipe; non-blocking
    @property
    def exit_fd(self) -> int: ...  # becomes readable once the instance has exited (a pidfd)

    def poll_exit(self) -> int | None:
        """The wait status once the instance has exited and was reaped, else None."""
        ...

    def terminate(self) -> None:
        """SIGTERM to the instance: its cleanup hooks may run."""
        ...

    def kill(self) -> None:
        """SIGKILL the whole tree. Idempotent."""
        ...

    def memory_peak_bytes(self) -> int | None: ...

    def out_of_memory(self) -> bool:
        """Whether the instance hit its memory limit (its exit is then Runtime.OutOfMemory)."""
        ...

    def on_ready(self) -> None:
        """Init is over: limits that spare init (the CPU quota) apply from now on."""
        ...

    def close(self) -> None:
        """Releases the platform's fds. Call after the instance exited."""
        ...


class SandboxFactory(Protocol):
    @property
    def name(self) -> str: ...

    def paths(self, spec_code_dir: Path, runtime_dir: Path, instance_id: str) -> SandboxPaths:
        """How an instance started from these host directories will see them."""
        ...

    async def start(self, spec: SandboxSpec) -> Sandbox: ...

    async def prepare(self, runtimes: list[RuntimeInfo]) -> None:
        """Gets ready ahead of demand (e.g. starts zygotes), so first instances start fast."""
        ...

    async def close(self) -> None: ...


# Go's words for these signals, which is what Lambda's error messages use.
_SIGNAL_WORDS: dict[int, str] = {
    signal.SIGKILL: "killed",
    signal.SIGSEGV: "segmentation fault",
    signal.SIGABRT: "aborted",
    signal.SIGTERM: "terminated",
    signal.SIGBUS: "bus error",
    signal.SIGFPE: "floating point exception",
    signal.SIGILL: "illegal instruction",
}


def describe_wait_status(status: int) -> str:
    """Words for a wait status, as Lambda reports them ("exit status 1", "signal: killed").
    -1 stands for a status that could not be collected."""
    if status < 0:
        return "exit status unknown"
    if os.WIFEXITED(status):
        return f"exit status {os.WEXITSTATUS(status)}"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        words = _SIGNAL_WORDS.get(sig)
        if words is None:
            try:
                words = signal.Signals(sig).name.lower()
            except ValueError:
                words = str(sig)
        return f"signal: {words}"
    return f"status {status}"
