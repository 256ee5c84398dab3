"""Provisioned concurrency through a real server: instances initialised ahead of demand, used
first, without Init Duration, replaced when they die, following config and plan changes
without a restart."""

from __future__ import annotations

import base64
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import HxbServer, function_yaml, instance_pids, make_zip, server_env, wait_instance_gone
from tests.integration._helpers import unique

WHOAMI = {
    "index.py": """
        import os
        print("INIT", os.environ.get("AWS_LAMBDA_INITIALIZATION_TYPE"), flush=True)

        def handler(event, context):
            return context.log_stream_name.rsplit("]", 1)[1]
        """
}
SEED_PER_PLAN = {"single_user": 0, "team": 2, "enterprise": 10}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HxbServer]:
    srv = HxbServer(data_dir=tmp_path_factory.mktemp("hxb-provisioned"), env=server_env())
    srv.start()
    yield srv
    srv.shutdown()


def view(server: HxbServer, name: str) -> dict[str, Any]:
    with server.client() as c:
        response = c.get(f"/v1/functions/{name}")
    assert response.status_code == 200, response.text
    doc: dict[str, Any] = response.json()
    return doc


def wait_provisioned(server: HxbServer, name: str, count: int, timeout_s: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        instances: dict[str, Any] = view(server, name)["instances"]
        if instances["provisioned"] == count and instances["starting"] == 0 and instances["idle"] == count:
            return instances
        assert time.monotonic() < deadline, instances
        time.sleep(0.1)


def init_lines(server: HxbServer, name: str) -> list[str]:
    return [e["message"] for e in server.logs(name) if e["message"].startswith("INIT")]


def invoke_id(server: HxbServer, name: str) -> str:
    response = server.invoke(name)
    assert response.status_code == 200, response.text
    assert "x-amz-function-error" not in response.headers, response.text
    instance: str = response.json()
    return instance


def test_provisioned_instances_are_ready_before_the_first_invocation_and_used_first(server: HxbServer) -> None:
    name = unique("prov")
    server.deploy(name, WHOAMI, provisioned_concurrency=2)
    wait_provisioned(server, name, 2)
    server.wait_for_log(name, "INIT")
    deadline = time.monotonic() + 10
    while len(init_lines(server, name)) < 2:
        assert time.monotonic() < deadline, init_lines(server, name)
        time.sleep(0.1)
    assert init_lines(server, name) == ["INIT provisioned-concurrency"] * 2

    provisioned_ids = {e["stream"].rsplit("]", 1)[1] for e in server.logs(name) if e["message"].startswith("INIT")}
    first = server.invoke(name, headers={"x-amz-log-type": "Tail"})
    second = invoke_id(server, name)

    assert first.status_code == 200, first.text
    tail = base64.b64decode(first.headers["x-amz-log-result"]).decode()
    assert "REPORT" in tail
    assert "Init Duration" not in tail  # initialised ahead of demand, as in Lambda
    assert init_lines(server, name) == ["INIT provisioned-concurrency"] * 2  # no new instance
    assert view(server, name)["instances"]["provisioned"] == 2
    assert {first.json(), second} <= provisioned_ids


def test_a_provisioned_instance_that_dies_is_replaced(server: HxbServer) -> None:
    name = unique("prov-die")
    server.deploy(name, WHOAMI, provisioned_concurrency=1)
    wait_provisioned(server, name, 1)
    victim = invoke_id(server, name)
    for pid in instance_pids(victim):
        os.kill(pid, signal.SIGKILL)
    assert wait_instance_gone(victim) == []
    wait_provisioned(server, name, 1)
    replacement = invoke_id(server, name)
    assert replacement != victim


def test_count_changes_apply_without_a_restart_or_a_new_revision(server: HxbServer) -> None:
    name = unique("prov-grow")
    server.deploy(name, WHOAMI, provisioned_concurrency=1)
    wait_provisioned(server, name, 1)
    before = view(server, name)["revision_id"]
    with server.client() as c:
        grown = c.patch(f"/v1/functions/{name}", json={"provisioned_concurrency": 3})
    assert grown.status_code == 200, grown.text
    wait_provisioned(server, name, 3)
    with server.client() as c:
        shrunk = c.patch(f"/v1/functions/{name}", json={"provisioned_concurrency": 0})
    assert shrunk.status_code == 200, shrunk.text
    wait_provisioned(server, name, 0)
    assert view(server, name)["revision_id"] == before


def test_the_seeds_per_plan_counts_follow_the_workspace_plan(server: HxbServer) -> None:
    ws = unique("ws")
    name = unique("critical-api")
    with server.client() as c:
        assert c.post("/v1/workspaces", json={"name": ws, "plan": "team"}).status_code == 201
        package = make_zip({"hexabase.yaml": function_yaml(name, provisioned_concurrency=SEED_PER_PLAN), **WHOAMI})
        deployed = c.put(f"/v1/functions/{name}", params={"workspace": ws}, content=package)
        assert deployed.status_code == 201, deployed.text

        def instances() -> dict[str, Any]:
            doc: dict[str, Any] = c.get(f"/v1/functions/{name}", params={"workspace": ws}).json()["instances"]
            return doc

        def wait(count: int) -> None:
            deadline = time.monotonic() + 30
            while not (instances()["provisioned"] == count and instances()["idle"] == count):
                assert time.monotonic() < deadline, instances()
                time.sleep(0.1)

        wait(2)  # team
        assert c.put(f"/v1/workspaces/{ws}/plan", json={"plan": "single"}).status_code == 200
        wait(0)
        assert c.put(f"/v1/workspaces/{ws}/plan", json={"plan": "enterprise"}).status_code == 200
        wait(10)
