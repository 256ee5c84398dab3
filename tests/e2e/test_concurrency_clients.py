"""Workspaces and reserved concurrency as users reach them: the `hxb` CLI and boto3's own
concurrency operations against a real `hxb serve`."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import HXB, HxbServer, server_env
from tests.e2e._helpers import CLI_TIMEOUT_S, assert_one_line_error, describe, run_hxb, write_function
from tests.integration._helpers import unique

HELLO = {"index.py": "def handler(event, context):\n    return {'arn': context.invoked_function_arn}\n"}


def hxb(server: HxbServer, *args: str, workspace: str | None = None) -> subprocess.CompletedProcess[str]:
    """`hxb ARGS` against `server`, in `workspace` (HXB_WORKSPACE) when given."""
    env = server_env(HXB_ENDPOINT=server.endpoint, **({"HXB_WORKSPACE": workspace} if workspace else {}))
    return subprocess.run([HXB, *args], capture_output=True, text=True, env=env, timeout=CLI_TIMEOUT_S, check=False)


def test_workspace_commands_create_list_and_change_plans(hxb_server: HxbServer, tmp_path: Path) -> None:
    name = unique("team")
    created = run_hxb("workspace", "create", name, "--plan", "single_user", env_endpoint=hxb_server.endpoint)
    assert created.returncode == 0, describe(created)
    assert f"{name}: single plan, concurrency 10 (burst 50)" in created.stderr

    moved = run_hxb("workspace", "set-plan", name, "enterprise", env_endpoint=hxb_server.endpoint)
    assert moved.returncode == 0, describe(moved)
    listed = run_hxb("workspace", "list", env_endpoint=hxb_server.endpoint)
    assert listed.returncode == 0, describe(listed)
    row = next(line for line in listed.stdout.splitlines() if line.split()[:1] == [name])
    assert row.split()[1:4] == ["enterprise", "1000", "3000"]

    assert_one_line_error(
        run_hxb("workspace", "set-plan", name, "gold", env_endpoint=hxb_server.endpoint), "unknown plan 'gold'"
    )
    assert_one_line_error(
        run_hxb("workspace", "create", name, env_endpoint=hxb_server.endpoint), f"workspace '{name}' already exists"
    )


def test_function_commands_act_in_hxb_workspace(hxb_server: HxbServer, tmp_path: Path) -> None:
    ws, fn = unique("ws"), unique("fn")
    assert run_hxb("workspace", "create", ws, env_endpoint=hxb_server.endpoint).returncode == 0
    directory = write_function(tmp_path / fn, fn, HELLO)
    deployed = hxb(hxb_server, "function", "deploy", str(directory), workspace=ws)
    assert deployed.returncode == 0, describe(deployed)
    invoked = hxb(hxb_server, "function", "invoke", fn, workspace=ws)
    assert invoked.returncode == 0, describe(invoked)
    assert f":{ws}:function:{fn}" in invoked.stdout
    elsewhere = hxb(hxb_server, "function", "get", fn)  # the default workspace has no such function
    assert_one_line_error(elsewhere, f"function '{fn}' not found")


def test_concurrency_commands_reserve_throttle_and_release(hxb_server: HxbServer, tmp_path: Path) -> None:
    fn = unique("fn")
    assert hxb(hxb_server, "function", "deploy", str(write_function(tmp_path / fn, fn, HELLO))).returncode == 0
    assert hxb(hxb_server, "function", "concurrency", "set", fn, "0").returncode == 0
    throttled = hxb(hxb_server, "function", "invoke", fn)
    assert_one_line_error(throttled, "TooManyRequestsException", "reserved_concurrency 0")
    over = hxb(hxb_server, "function", "concurrency", "set", fn, "51")
    assert_one_line_error(over, "at most 50")
    shown = hxb(hxb_server, "function", "concurrency", "get", fn)
    assert '"throttles": 1' in shown.stdout, describe(shown)
    assert hxb(hxb_server, "function", "concurrency", "delete", fn).returncode == 0
    assert hxb(hxb_server, "function", "invoke", fn).returncode == 0


def test_boto3_concurrency_operations(hxb_server: HxbServer, lambda_client: Any) -> None:
    fn = unique("boto")
    hxb_server.deploy(fn, HELLO)
    assert lambda_client.get_function_concurrency(FunctionName=fn).get("ReservedConcurrentExecutions") is None
    put = lambda_client.put_function_concurrency(FunctionName=fn, ReservedConcurrentExecutions=0)
    assert put["ReservedConcurrentExecutions"] == 0
    assert lambda_client.get_function_concurrency(FunctionName=fn)["ReservedConcurrentExecutions"] == 0
    with pytest.raises(lambda_client.exceptions.TooManyRequestsException) as caught:
        lambda_client.invoke(FunctionName=fn, Payload=b"{}")
    assert caught.value.response["Reason"] == "ConcurrentInvocationLimitExceeded"
    with pytest.raises(lambda_client.exceptions.InvalidParameterValueException, match="at most 50"):
        lambda_client.put_function_concurrency(FunctionName=fn, ReservedConcurrentExecutions=51)
    with pytest.raises(lambda_client.exceptions.ResourceNotFoundException):
        lambda_client.put_function_concurrency(FunctionName=unique("nope"), ReservedConcurrentExecutions=1)
    lambda_client.delete_function_concurrency(FunctionName=fn)
    assert lambda_client.invoke(FunctionName=fn, Payload=b"{}")["StatusCode"] == 200
    settings = lambda_client.get_account_settings()
    assert settings["AccountLimit"]["ConcurrentExecutions"] == 100
    assert settings["AccountUsage"]["FunctionCount"] >= 1
