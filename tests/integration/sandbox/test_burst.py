"""A burst of cold starts larger than the zygote's socket can queue: every one still starts.

The zygote forks one instance at a time; requests for more wait in its SEQPACKET socket. Here
the zygote is stopped (SIGSTOP) while a hundred cold starts are asked of it, so its socket
fills up, then let go: a start must wait for room in the socket, never fail with EAGAIN."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

from tests.conftest import HxbServer
from tests.integration._helpers import unique

BURST = 100
HOLD = """
import time

def handler(event, context):
    time.sleep(event.get("hold", 0))
    return context.log_stream_name
"""


def zygote_pids(server_pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read()
            with open(f"/proc/{entry}/stat", "rb") as fh:
                ppid = int(fh.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == server_pid and b"_hxb_zygote" in cmdline:
            found.append(int(entry))
    return found


@pytest.mark.timeout(240)
def test_a_burst_of_cold_starts_waits_for_the_zygote_instead_of_failing(hxb_server: HxbServer) -> None:
    name = unique("burst")
    hxb_server.deploy(name, {"index.py": HOLD}, timeout=60)
    assert hxb_server.invoke(name).status_code == 200  # the zygote is up
    zygotes = zygote_pids(hxb_server.pid)
    assert zygotes, "no zygote found"

    results: list[httpx.Response] = []
    lock = threading.Lock()
    client = httpx.Client(
        base_url=hxb_server.endpoint,
        timeout=120,
        limits=httpx.Limits(max_connections=BURST, max_keepalive_connections=0),
    )

    def one() -> None:
        response = client.post(f"/2015-03-31/functions/{name}/invocations", json={"hold": 3})
        with lock:
            results.append(response)

    for pid in zygotes:
        os.kill(pid, signal.SIGSTOP)
    try:
        threads = [threading.Thread(target=one) for _ in range(BURST)]
        for thread in threads:
            thread.start()
        time.sleep(5)  # the requests pile up in the stopped zygote's socket
    finally:
        for pid in zygotes:
            os.kill(pid, signal.SIGCONT)
    for thread in threads:
        thread.join(180)
    client.close()

    failures = [r.text[:200] for r in results if r.status_code != 200 or "x-amz-function-error" in r.headers]
    assert failures == []
    assert len(results) == BURST
