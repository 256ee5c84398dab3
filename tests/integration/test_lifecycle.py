"""The platform's own lifecycle: clean shutdown on SIGTERM/SIGINT (instances get SIGTERM, a
grace period, then SIGKILL; nothing is left behind), and functions surviving a restart."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.conftest import (
    HXB,
    INSTANCE_ID,
    HxbServer,
    host_leftovers,
    instance_pids,
    server_env,
    wait_instance_gone,
)

CHILDREN = f"""
import os, subprocess
def handler(event, context):
    child = subprocess.Popen(["sleep", "1000"])
    return {{"instance": {INSTANCE_ID}, "child": child.pid}}
"""

GRACEFUL = f"""
import os, signal, sys

def on_term(signum, frame):
    print("cleanup hook ran in", INSTANCE, flush=True)
    sys.exit(0)

signal.signal(signal.SIGTERM, on_term)
INSTANCE = {INSTANCE_ID}

def handler(event, context):
    return {{"instance": INSTANCE}}
"""

STUBBORN = f"""
import os, signal

signal.signal(signal.SIGTERM, lambda *_: print("ignoring SIGTERM", flush=True))

def handler(event, context):
    return {{"instance": {INSTANCE_ID}}}
"""


def test_sigterm_stops_every_instance_and_its_children(hxb_server_factory: Any) -> None:
    server: HxbServer = hxb_server_factory()
    server.deploy("kids", {"index.py": CHILDREN})
    first = server.invoke("kids").json()
    assert len(instance_pids(first["instance"])) >= 2  # the runtime and its `sleep 1000`

    status = server.stop(signal.SIGTERM)

    assert status == 0, "".join(server.output)
    assert wait_instance_gone(first["instance"]) == []


def test_sigint_stops_the_platform_cleanly(hxb_server_factory: Any) -> None:
    server: HxbServer = hxb_server_factory()
    server.deploy("ctrl-c", {"index.py": CHILDREN})
    first = server.invoke("ctrl-c").json()
    assert len(instance_pids(first["instance"])) >= 2

    status = server.stop(signal.SIGINT)

    assert status == 0, "".join(server.output)
    assert wait_instance_gone(first["instance"]) == []


def test_shutdown_runs_the_functions_sigterm_hook_and_logs_it(hxb_server_factory: Any, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    server: HxbServer = hxb_server_factory(data_dir=data_dir)
    server.deploy("graceful", {"index.py": GRACEFUL})
    instance = server.invoke("graceful").json()["instance"]

    assert server.stop() == 0

    # The hook's output was written during shutdown, outside any invocation: it is in the
    # instance's log stream, which the next start of the platform serves.
    again: HxbServer = hxb_server_factory(data_dir=data_dir)
    events = again.wait_for_log("graceful", f"cleanup hook ran in {instance}")
    hook = next(e for e in events if "cleanup hook ran" in e["message"])
    assert hook["invocation_id"] is None


def test_instance_ignoring_sigterm_is_killed_after_the_grace_period(hxb_server_factory: Any) -> None:
    server: HxbServer = hxb_server_factory(HXB_POOL_SHUTDOWN_GRACE_S="0.5")
    server.deploy("stubborn", {"index.py": STUBBORN})
    instance = server.invoke("stubborn").json()["instance"]

    started = time.monotonic()
    assert server.stop() == 0
    elapsed = time.monotonic() - started

    assert wait_instance_gone(instance) == []
    # Bounded by the grace period, not by the instance: a sanity bound, not a benchmark.
    assert elapsed < 20


def test_functions_deployed_before_a_restart_still_work(hxb_server_factory: Any, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first: HxbServer = hxb_server_factory(data_dir=data_dir)
    first.deploy("survivor", {"index.py": "def handler(event, context):\n    return {'v': 1, 'e': event}\n"})
    assert first.invoke("survivor", {"x": 1}).json() == {"v": 1, "e": {"x": 1}}
    first.stop()

    second: HxbServer = hxb_server_factory(data_dir=data_dir)
    response = second.invoke("survivor", {"x": 2})

    assert response.status_code == 200, response.text
    assert response.json() == {"v": 1, "e": {"x": 2}}
    with second.client() as c:
        assert [f["name"] for f in c.get("/v1/functions").json()["functions"]] == ["survivor"]


def test_killed_platform_leaves_no_instance_behind(hxb_server_factory: Any, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    server: HxbServer = hxb_server_factory(data_dir=data_dir)
    server.deploy("orphan", {"index.py": f"import os\ndef handler(e, c):\n    return {INSTANCE_ID}\n"})
    instance = server.invoke("orphan").json()

    os.kill(server.pid, signal.SIGKILL)
    server.kill()

    # Nothing of the instance outlives the platform (its channel closes; in the linux sandbox
    # its zygote dies too, and so does every instance it forked).
    assert wait_instance_gone(instance) == []
    # And the next start cleans what the killed one left in the data dir.
    again: HxbServer = hxb_server_factory(data_dir=data_dir)
    assert again.invoke("orphan").status_code == 200


def test_a_relative_data_dir_works_like_the_quickstarts(hxb_server_factory: Any, tmp_path: Path) -> None:
    # `make serve` passes `--data-dir .hxb`: instances run in their own directory, so every
    # path the platform hands them must be absolute.
    server: HxbServer = hxb_server_factory("--demo", data_dir=Path(".hxb"), cwd=tmp_path)
    with server.client() as c:
        response = c.get("/fn/hello", params={"name": "you"})
    assert response.status_code == 200, response.text
    assert "you" in response.json()["message"]
    server.deploy("relative", {"index.py": "def handler(e, c):\n    return 'ok'\n"})
    assert server.invoke("relative").json() == "ok"
    assert (tmp_path / ".hxb" / "hxb.db").exists()


def test_a_second_platform_on_the_same_data_dir_is_refused_and_harms_nothing(
    hxb_server_factory: Any, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    first: HxbServer = hxb_server_factory(data_dir=data_dir)
    first.deploy("busy", {"index.py": f"import os\ndef handler(e, c):\n    return {INSTANCE_ID}\n"})
    instance = first.invoke("busy").json()

    second = subprocess.run(
        [HXB, "serve", "--host", "127.0.0.1", "--port", "0", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        env=server_env(),
    )
    assert second.returncode != 0
    assert f"the data dir {data_dir.resolve()} is in use by another hxb platform (pid {first.pid}" in second.stderr

    with first.client() as c:
        isolated = c.get("/v1/health").json()["sandbox"] == "linux"
    tables_before = [o for o in host_leftovers(data_dir) if o.startswith("table")]
    cleanup = subprocess.run(
        [HXB, "sandbox", "cleanup", "--data-dir", str(data_dir)], capture_output=True, text=True, timeout=60
    )
    if isolated:
        assert cleanup.returncode == 1
        assert f"belong to a running platform (pid {first.pid}" in cleanup.stderr
        assert tables_before
        assert [o for o in host_leftovers(data_dir) if o.startswith("table")] == tables_before

    # The running platform lost nothing: the same instance answers.
    assert first.invoke("busy").json() == instance
    assert instance_pids(instance)
