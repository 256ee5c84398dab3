"""Instances: one invocation at a time each, more instances for concurrent invocations, warm
reuse, and idle instances stopped (SIGTERM first) after the idle timeout."""

from __future__ import annotations

import concurrent.futures
from typing import Any

from tests.conftest import INSTANCE_ID, HxbServer, wait_instance_gone

SLOW = f"""
import os, time
def handler(event, context):
    time.sleep(event.get("sleep", 0))
    return {INSTANCE_ID}
"""


def test_concurrent_invocations_start_more_instances(hxb_server: HxbServer) -> None:
    hxb_server.deploy("wide", {"index.py": SLOW})
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        instances = list(pool.map(lambda _: hxb_server.invoke("wide", {"sleep": 1.0}).json(), range(4)))
    # Four at once, one at a time per instance: four instances.
    assert len(set(instances)) == 4
    # Sequential calls reuse warm instances: no fifth one.
    later = {hxb_server.invoke("wide").json() for _ in range(6)}
    assert later <= set(instances)
    with hxb_server.client() as c:
        instances = c.get("/v1/functions/wide").json()["instances"]
    assert instances == {"idle": 4, "busy": 0, "starting": 0, "provisioned": 0, "provisioned_shortfall": 0}


def test_idle_instances_are_stopped_after_the_idle_timeout(hxb_server_factory: Any) -> None:
    server: HxbServer = hxb_server_factory(HXB_POOL_IDLE_TIMEOUT_S="1", HXB_POOL_REAP_INTERVAL_S="0.2")
    server.deploy(
        "sleepy",
        {
            "index.py": f"""
                import os, signal, sys
                def bye(*_):
                    print("got SIGTERM", flush=True)
                    sys.exit(0)
                signal.signal(signal.SIGTERM, bye)
                def handler(event, context):
                    return {INSTANCE_ID}
            """
        },
    )
    instance = server.invoke("sleepy").json()

    assert wait_instance_gone(instance, timeout_s=15) == []
    # It was asked to stop (SIGTERM), it was not just killed.
    server.wait_for_log("sleepy", "got SIGTERM")
    # The function still works: a new instance starts cold.
    assert server.invoke("sleepy").json() != instance
