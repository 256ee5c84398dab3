"""Sandboxes prepared ahead of demand: one that dies before use is said, not lost silently, and
cold starts go on."""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path
from typing import Any

from tests.conftest import HxbServer
from tests.integration._helpers import unique


def sandbox_inits(data_dir: Path) -> list[int]:
    """Host pids of the inits (pid 1 of their namespace) of the sandboxes of the platform with
    this data dir: its cgroups are under hxb-<id>."""
    group = f"/hxb-{hashlib.sha1(str(data_dir.resolve()).encode()).hexdigest()[:6]}/".encode()  # noqa: S324
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cgroup", "rb") as fh:
                groups = fh.read()
            with open(f"/proc/{entry}/status", "rb") as fh:
                nspid = next(line for line in fh.read().splitlines() if line.startswith(b"NSpid:"))
        except (OSError, StopIteration):
            continue
        pids = nspid.split()[1:]  # the pid in each namespace, the host's first
        if group in groups and len(pids) == 2 and pids[1] == b"1":
            found.append(int(entry))
    return found


def test_a_prepared_sandbox_that_dies_is_logged_and_cold_starts_go_on(hxb_server_factory: Any) -> None:
    server: HxbServer = hxb_server_factory()
    deadline = time.monotonic() + 30
    # No function is deployed yet: every sandbox there is was prepared ahead of demand.
    while not (inits := sandbox_inits(server.data_dir)):
        assert time.monotonic() < deadline, "no prepared sandbox appeared"
        time.sleep(0.1)

    os.kill(inits[0], signal.SIGKILL)

    deadline = time.monotonic() + 10
    while not any("prepared ahead of demand ended before use (" in line for line in server.output):
        assert time.monotonic() < deadline, "".join(server.output[-20:])
        time.sleep(0.1)
    name = unique("after")
    server.deploy(name, {"index.py": "def handler(event, context):\n    return 'ok'\n"})
    assert server.invoke(name).json() == "ok"
