"""Exclusive locks between hxb processes on one host: a file, flock'ed for as long as its fd is
open. The kernel drops the lock when the holder dies, however it dies, so a lock is never
stale; its content only names the holder for the error message."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class LockHeld(Exception):
    """Another live process holds the lock; `holder` is what it wrote in the file."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is held by {holder}")
        self.path = path
        self.holder = holder


class HostLock:
    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, path: Path, *, describe: str = "") -> HostLock:
        """Takes the lock at `path` without waiting and writes `pid N` (and `describe`) into it.

        Raises:
            LockHeld: another live process has it.
        """
        # Close-on-exec: processes the holder starts (zygotes, instances) do not keep it.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise LockHeld(path, holder) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}{', ' + describe if describe else ''}\n".encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        """Idempotent."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
