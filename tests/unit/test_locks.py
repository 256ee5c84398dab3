"""HostLock: one holder at a time, named in the refusal, released by close or by death."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hxb._locks import HostLock, LockHeld


def test_a_second_holder_is_refused_with_the_first_named(tmp_path: Path) -> None:
    first = HostLock.acquire(tmp_path / "x.lock", describe="data dir /srv/a")
    with pytest.raises(LockHeld) as caught:
        HostLock.acquire(tmp_path / "x.lock")
    assert caught.value.holder == f"pid {os.getpid()}, data dir /srv/a"
    first.release()
    first.release()  # idempotent
    HostLock.acquire(tmp_path / "x.lock").release()


def test_the_lock_goes_with_its_holder(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    code = (
        f"import pathlib, hxb._locks as m; m.HostLock.acquire(pathlib.Path({str(path)!r}))\n"
        "print(1, flush=True)\ninput()"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as holder:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "1\n"
        with pytest.raises(LockHeld, match=f"pid {holder.pid}"):
            HostLock.acquire(path)
        holder.kill()
    HostLock.acquire(path).release()
