"""Workspaces, plans, reserved concurrency and throttling, on a real server with real instances.

Burst credit does not refill during these tests (HXB_CONCURRENCY_BURST_REFILL_S is an hour), so
every limit is exact: a test counts admitted and throttled invocations, never times them."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import HxbServer, function_yaml, make_zip, server_env
from tests.integration._helpers import api_error, management_error, unique

SLEEPER = {
    "index.py": """
        import time

        def handler(event, context):
            time.sleep(event.get("sleep", 0))
            return {"slept": event.get("sleep", 0)}
        """
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HxbServer]:
    srv = HxbServer(
        data_dir=tmp_path_factory.mktemp("hxb-concurrency"), env=server_env(HXB_CONCURRENCY_BURST_REFILL_S="3600")
    )
    srv.start()
    yield srv
    srv.shutdown()


def deploy_in(server: HxbServer, workspace: str, name: str, **config: Any) -> httpx.Response:
    package = make_zip({"hexabase.yaml": function_yaml(name, **config), **SLEEPER})
    with server.client() as c:
        return c.put(
            f"/v1/functions/{name}",
            params={"workspace": workspace},
            content=package,
            headers={"content-type": "application/zip"},
        )


def invoke_in(server: HxbServer, workspace: str, name: str, payload: Any = None) -> httpx.Response:
    with server.client(timeout_s=120) as c:
        return c.post(f"/2015-03-31/functions/{workspace}:function:{name}/invocations", json=payload or {})


def workspace_view(server: HxbServer, name: str) -> dict[str, Any]:
    with server.client() as c:
        response = c.get(f"/v1/workspaces/{name}")
    assert response.status_code == 200, response.text
    view: dict[str, Any] = response.json()
    return view


def create_workspace(server: HxbServer, plan: str) -> str:
    name = unique("ws")
    with server.client() as c:
        response = c.post("/v1/workspaces", json={"name": name, "plan": plan})
    assert response.status_code == 201, response.text
    return name


def run_concurrently(server: HxbServer, workspace: str, name: str, count: int, sleep_s: float) -> list[httpx.Response]:
    """Starts `count` invocations at once; returns once all have been answered."""
    results: list[httpx.Response] = []
    lock = threading.Lock()
    client = httpx.Client(
        base_url=server.endpoint, timeout=120, limits=httpx.Limits(max_connections=count, max_keepalive_connections=0)
    )
    path = f"/2015-03-31/functions/{workspace}:function:{name}/invocations"

    def one() -> None:
        response = client.post(path, json={"sleep": sleep_s})
        with lock:
            results.append(response)

    threads = [threading.Thread(target=one) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    client.close()
    return results


def wait_running(server: HxbServer, workspace: str, count: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while workspace_view(server, workspace)["concurrent_executions"] < count:
        assert time.monotonic() < deadline, workspace_view(server, workspace)
        time.sleep(0.05)


def statuses(responses: list[httpx.Response]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for response in responses:
        counts[response.status_code] = counts.get(response.status_code, 0) + 1
    return counts


# --- workspaces -----------------------------------------------------------------------------------


def test_the_default_workspace_is_on_the_team_plan(server: HxbServer) -> None:
    view = workspace_view(server, "default")
    assert (view["plan"], view["default_concurrency"], view["reserved_cap"], view["burst_concurrency"]) == (
        "team",
        100,
        50,
        500,
    )


def test_workspaces_are_created_listed_and_moved_between_plans(server: HxbServer) -> None:
    name = create_workspace(server, "single_user")
    assert workspace_view(server, name)["plan"] == "single"
    with server.client() as c:
        assert c.post("/v1/workspaces", json={"name": name, "plan": "team"}).status_code == 409
        bad = management_error(c.post("/v1/workspaces", json={"name": "Bad_Name", "plan": "team"}), 400)
        assert "lowercase letters" in bad["message"]
        bad = management_error(c.put(f"/v1/workspaces/{name}/plan", json={"plan": "gold"}), 400)
        assert "unknown plan 'gold'" in bad["message"]
        assert c.put(f"/v1/workspaces/{name}/plan", json={"plan": "enterprise"}).status_code == 200
        listed = {ws["name"]: ws for ws in c.get("/v1/workspaces").json()["workspaces"]}
        missing = management_error(c.get("/v1/workspaces/nowhere"), 404)
    assert listed[name]["default_concurrency"] == 1000
    assert "default" in listed
    assert "nowhere" in missing["message"]


def test_functions_belong_to_their_workspace(server: HxbServer) -> None:
    ws = create_workspace(server, "team")
    name = unique("owned")
    assert deploy_in(server, ws, name).status_code == 201
    assert invoke_in(server, ws, name, {"sleep": 0}).json() == {"slept": 0}
    with server.client() as c:
        view = c.get(f"/v1/functions/{name}", params={"workspace": ws}).json()
        nowhere = c.get(f"/v1/functions/{name}", params={"workspace": "nowhere"})
    assert view["workspace"] == ws
    assert view["arn"].endswith(f":{ws}:function:{name}")
    api_error(server.invoke(name), 404, "ResourceNotFoundException")  # not in the default workspace
    assert "nowhere" in management_error(nowhere, 404)["message"]
    with server.client() as c:
        package = make_zip({"hexabase.yaml": function_yaml(unique("x")), **SLEEPER})
        refused = c.put("/v1/functions/x", params={"workspace": "nowhere"}, content=package)
    assert refused.status_code in (400, 404)


# --- reserved concurrency -----------------------------------------------------------------------


def test_a_reservation_caps_its_function_with_a_lambda_throttle(server: HxbServer) -> None:
    ws = create_workspace(server, "team")
    name = unique("capped")
    assert deploy_in(server, ws, name, reserved_concurrency=2, timeout=30).status_code == 201
    results: list[httpx.Response] = []
    runner = threading.Thread(target=lambda: results.extend(run_concurrently(server, ws, name, 2, 3.0)))
    runner.start()
    wait_running(server, ws, 2)
    throttled = invoke_in(server, ws, name, {"sleep": 0})
    runner.join(60)

    message = api_error(throttled, 429, "TooManyRequestsException")
    assert "reserved concurrency of 2" in message
    assert throttled.json()["Reason"] == "ConcurrentInvocationLimitExceeded"
    assert int(throttled.headers["retry-after"]) >= 1
    assert statuses(results) == {200: 2}
    with server.client() as c:
        view = c.get(f"/v1/functions/{name}/concurrency", params={"workspace": ws}).json()
    assert (view["reserved_concurrency"], view["throttles"], view["concurrent_executions"]) == (2, 1, 0)


def test_reserving_zero_throttles_and_changes_apply_without_a_new_revision(server: HxbServer) -> None:
    ws = create_workspace(server, "team")
    name = unique("switch")
    assert deploy_in(server, ws, name).status_code == 201
    assert invoke_in(server, ws, name).status_code == 200
    with server.client() as c:
        before = c.get(f"/v1/functions/{name}", params={"workspace": ws}).json()
        put = c.put(f"/v1/functions/{name}/concurrency", params={"workspace": ws}, json={"reserved_concurrency": 0})
        assert put.status_code == 200, put.text
        off = invoke_in(server, ws, name)
        assert c.delete(f"/v1/functions/{name}/concurrency", params={"workspace": ws}).status_code == 204
        after = c.get(f"/v1/functions/{name}", params={"workspace": ws}).json()
    assert "reserved_concurrency 0" in api_error(off, 429, "TooManyRequestsException")
    assert after["revision_id"] == before["revision_id"]  # the warm instance was kept
    assert after["instances"]["idle"] == 1
    assert invoke_in(server, ws, name).status_code == 200


def test_reservations_beyond_the_plans_cap_are_refused(server: HxbServer) -> None:
    ws = create_workspace(server, "team")
    big, more = unique("big"), unique("more")
    assert deploy_in(server, ws, big, reserved_concurrency=40).status_code == 201
    refused = management_error(deploy_in(server, ws, more, reserved_concurrency=11), 400)
    assert "reserve 51" in refused["message"]
    assert "at most 50" in refused["message"]
    assert deploy_in(server, ws, more, reserved_concurrency=10).status_code == 201
    with server.client() as c:
        over = c.put(f"/v1/functions/{more}/concurrency", params={"workspace": ws}, json={"reserved_concurrency": 11})
        down = c.put(f"/v1/workspaces/{ws}/plan", json={"plan": "single"})
    assert "at most 50" in management_error(over, 400)["message"]
    assert "lower the reservations first" in management_error(down, 400)["message"]
    assert workspace_view(server, ws)["reserved_total"] == 50

    single = create_workspace(server, "single")
    refused = management_error(deploy_in(server, single, unique("r"), reserved_concurrency=1), 400)
    assert "not available on the single plan" in refused["message"]


# --- the plan's limits, exactly -----------------------------------------------------------------


@pytest.mark.timeout(240)  # 50 cold starts on a 2-core machine
def test_throttling_starts_exactly_at_the_burst_ceiling_then_at_the_default(server: HxbServer) -> None:
    """Single plan: 10 always, up to 50 on 40 burst credits, which then stay spent."""
    ws = create_workspace(server, "single")
    name = unique("burst")
    assert deploy_in(server, ws, name, timeout=60).status_code == 201

    results: list[httpx.Response] = []
    runner = threading.Thread(target=lambda: results.extend(run_concurrently(server, ws, name, 50, 4.0)))
    runner.start()
    wait_running(server, ws, 50)
    over_ceiling = invoke_in(server, ws, name)
    runner.join(120)
    assert statuses(results) == {200: 50}
    assert "burst concurrency of 50" in api_error(over_ceiling, 429, "TooManyRequestsException")
    assert workspace_view(server, ws)["burst_credit"] == 0

    # Credit spent: the default concurrency, and not one more.
    again = run_concurrently(server, ws, name, 11, 2.0)
    assert statuses(again) == {200: 10, 429: 1}
    throttled = next(r for r in again if r.status_code == 429)
    assert "burst credit is spent" in throttled.json()["message"]
    view = workspace_view(server, ws)
    assert (view["throttles"], view["concurrent_executions"]) == (2, 0)
    with server.client() as c:
        fn = c.get(f"/v1/functions/{name}", params={"workspace": ws}).json()
    assert fn["concurrency"]["throttles"] == 2


def test_the_http_trigger_is_throttled_too(server: HxbServer) -> None:
    name = unique("web")
    server.deploy(name, SLEEPER, reserved_concurrency=0)
    with server.client() as c:
        response = c.get(f"/fn/{name}")
    assert response.status_code == 429
    assert json.loads(response.text)["message"] == "Too Many Requests"
    assert response.headers["retry-after"] == "1"
