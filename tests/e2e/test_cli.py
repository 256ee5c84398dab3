"""The `hxb` command as a user runs it against a real `hxb serve`: deploy, invoke, list, get,
delete, logs, runtimes, config schema, and the one-line errors when something is wrong."""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO

import httpx
import pytest

import hxb
from tests.conftest import HXB, HxbServer, server_env
from tests.e2e._helpers import assert_one_line_error, describe, run_hxb, write_function

ECHO = """
def handler(event, context):
    return {"echo": event, "function": context.function_name}
"""

PRINTER = """
def handler(event, context):
    print("said:", event.get("say"))
    return {"said": event.get("say")}
"""

UNREACHABLE = "http://127.0.0.1:1"


def _ep(server: HxbServer) -> tuple[str, str]:
    return ("--endpoint", server.endpoint)


def _cli_logs_until(server: HxbServer, name: str, needle: str, *args: str, timeout_s: float = 15.0) -> str:
    """Runs `hxb function logs NAME ARGS` until its output contains `needle` (logs land in batches)."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = run_hxb("function", "logs", name, *args, *_ep(server))
        assert result.returncode == 0, describe(result)
        if needle in result.stdout:
            return result.stdout
        if time.monotonic() > deadline:
            raise AssertionError(f"{needle!r} never showed in `hxb function logs {name}`\n{describe(result)}")
        time.sleep(0.2)


# --- deploy -----------------------------------------------------------------------------------------


def test_deploy_creates_then_updates_and_is_invocable_at_once(hxb_server: HxbServer, tmp_path: Path) -> None:
    name = "cli-deploy"
    fn = write_function(tmp_path / "fn", name, {"index.py": "def handler(e, c):\n    return {'code': 1}\n"})

    created = run_hxb("function", "deploy", str(fn), env_endpoint=hxb_server.endpoint)
    first = run_hxb("function", "invoke", name, *_ep(hxb_server))
    (fn / "index.py").write_text("def handler(e, c):\n    return {'code': 2}\n")
    updated = run_hxb("function", "deploy", str(fn), env_endpoint=hxb_server.endpoint)
    second = run_hxb("function", "invoke", name, *_ep(hxb_server))

    assert created.returncode == 0, describe(created)
    assert "Created" in created.stdout + created.stderr, describe(created)
    assert first.returncode == 0, describe(first)
    assert json.loads(first.stdout) == {"code": 1}
    assert updated.returncode == 0, describe(updated)
    assert "Updated" in updated.stdout + updated.stderr, describe(updated)
    assert second.returncode == 0, describe(second)
    assert json.loads(second.stdout) == {"code": 2}


def test_deploy_leaves_out_files_when_hxbignore_lists_them(hxb_server: HxbServer, tmp_path: Path) -> None:
    name = "cli-ignore"
    handler = """
        import os
        HERE = os.path.dirname(os.path.abspath(__file__))
        def handler(event, context):
            return {p: os.path.exists(os.path.join(HERE, p)) for p in event["paths"]}
    """
    fn = write_function(
        tmp_path / "fn",
        name,
        {
            "index.py": handler,
            ".hxbignore": "secret.txt\nbuild/\n*.log\n",
            "secret.txt": "do not ship",
            "build/out.bin": "artefact",
            "debug.log": "noise",
            "kept.txt": "ship me",
            "sub/kept.log.txt": "ship me too",
        },
    )
    paths = ["secret.txt", "build/out.bin", "debug.log", "kept.txt", "sub/kept.log.txt"]

    deployed = run_hxb("function", "deploy", str(fn), *_ep(hxb_server))
    result = run_hxb("function", "invoke", name, "--payload", json.dumps({"paths": paths}), *_ep(hxb_server))

    assert deployed.returncode == 0, describe(deployed)
    assert result.returncode == 0, describe(result)
    assert json.loads(result.stdout) == {
        "secret.txt": False,
        "build/out.bin": False,
        "debug.log": False,
        "kept.txt": True,
        "sub/kept.log.txt": True,
    }


def test_deploy_keeps_script_executable_when_bundled(hxb_server: HxbServer, tmp_path: Path) -> None:
    name = "cli-exec"
    handler = """
        import os
        import subprocess
        HERE = os.path.dirname(os.path.abspath(__file__))
        def handler(event, context):
            tool = os.path.join(HERE, "bin", "tool.sh")
            run = subprocess.run([tool, event["arg"]], capture_output=True, text=True)
            return {
                "tool_executable": os.access(tool, os.X_OK),
                "data_executable": os.access(os.path.join(HERE, "data.txt"), os.X_OK),
                "returncode": run.returncode,
                "stdout": run.stdout.strip(),
                "stderr": run.stderr.strip(),
            }
    """
    fn = write_function(
        tmp_path / "fn",
        name,
        {"index.py": handler, "bin/tool.sh": '#!/bin/sh\necho "tool says $1"\n', "data.txt": "plain"},
    )
    (fn / "bin" / "tool.sh").chmod(0o755)

    deployed = run_hxb("function", "deploy", str(fn), *_ep(hxb_server))
    result = run_hxb("function", "invoke", name, "--payload", '{"arg": "hi"}', *_ep(hxb_server))

    assert deployed.returncode == 0, describe(deployed)
    assert result.returncode == 0, describe(result)
    assert json.loads(result.stdout) == {
        "tool_executable": True,
        "data_executable": False,
        "returncode": 0,
        "stdout": "tool says hi",
        "stderr": "",
    }


@pytest.mark.parametrize(
    ("files", "needles"),
    [
        pytest.param(
            {"hexabase.yaml": "function:\n  name: cli-bad-yaml\n   memory: [1\n"},
            ("hexabase.yaml", "line 3"),
            id="malformed-yaml",
        ),
        pytest.param(
            {"hexabase.yaml": "function:\n  name: cli-bad-field\n  memory: 99999\n"},
            ("hexabase.yaml", "memory", "99999"),
            id="invalid-field",
        ),
        pytest.param({}, ("hexabase.yaml",), id="missing-config"),
    ],
)
def test_deploy_fails_with_one_line_when_config_is_wrong(
    hxb_server: HxbServer, tmp_path: Path, files: dict[str, str], needles: tuple[str, ...]
) -> None:
    fn = tmp_path / "fn"
    fn.mkdir()
    (fn / "index.py").write_text("def handler(e, c):\n    return 1\n")
    for relative, content in files.items():
        (fn / relative).write_text(content)

    result = run_hxb("function", "deploy", str(fn), *_ep(hxb_server))

    assert_one_line_error(result, *needles)


# --- invoke -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["inline", "file", "stdin"])
def test_invoke_prints_result_as_json_when_payload_given(hxb_server: HxbServer, tmp_path: Path, source: str) -> None:
    name = f"cli-payload-{source}"
    hxb_server.deploy(name, {"index.py": ECHO})
    event = {"source": source, "nested": {"n": [1, 2, 3]}, "text": "héllo"}
    text = json.dumps(event)
    stdin = None
    if source == "inline":
        payload = text
    elif source == "file":
        (tmp_path / "event.json").write_text(text)
        payload = f"@{tmp_path / 'event.json'}"
    else:
        payload, stdin = "-", text

    result = run_hxb("function", "invoke", name, "--payload", payload, *_ep(hxb_server), stdin=stdin)

    assert result.returncode == 0, describe(result)
    assert json.loads(result.stdout) == {"echo": event, "function": name}


def test_invoke_prints_log_tail_on_stderr_when_log_flag_given(hxb_server: HxbServer) -> None:
    name = "cli-log-tail"
    hxb_server.deploy(name, {"index.py": PRINTER})

    result = run_hxb("function", "invoke", name, "--payload", '{"say": "tail-marker"}', "--log", *_ep(hxb_server))

    assert result.returncode == 0, describe(result)
    assert json.loads(result.stdout) == {"said": "tail-marker"}
    assert "START RequestId:" in result.stderr, describe(result)
    assert "said: tail-marker" in result.stderr, describe(result)
    assert "REPORT RequestId:" in result.stderr, describe(result)
    assert result.stderr.index("START") < result.stderr.index("said: tail-marker") < result.stderr.index("REPORT")
    assert "START" not in result.stdout


def test_invoke_exits_1_with_error_document_when_function_raises(hxb_server: HxbServer) -> None:
    name = "cli-raises"
    hxb_server.deploy(name, {"index.py": "def handler(e, c):\n    raise ValueError('boom from ' + e['who'])\n"})

    result = run_hxb("function", "invoke", name, "--payload", '{"who": "cli"}', *_ep(hxb_server))

    assert result.returncode == 1, describe(result)
    document = json.loads(result.stdout)
    assert document["errorType"] == "ValueError"
    assert document["errorMessage"] == "boom from cli"
    assert_one_line_error(result, name, "ValueError", "boom from cli")


def test_invoke_fails_with_one_line_when_function_unknown(hxb_server: HxbServer) -> None:
    result = run_hxb("function", "invoke", "cli-never-deployed", *_ep(hxb_server))

    assert_one_line_error(result, "cli-never-deployed")
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("case", "payload"),
    [("malformed", "{bad"), ("truncated", "[1, 2"), ("missing-file", "@MISSING")],
)
def test_invoke_fails_with_one_line_when_payload_invalid(
    hxb_server: HxbServer, tmp_path: Path, case: str, payload: str
) -> None:
    name = f"cli-bad-payload-{case}"
    hxb_server.deploy(name, {"index.py": ECHO})
    payload = payload.replace("MISSING", str(tmp_path / "no-such-event.json"))

    result = run_hxb("function", "invoke", name, "--payload", payload, *_ep(hxb_server))

    assert_one_line_error(result, "--payload")
    assert result.stdout == ""


def _list_names(server: HxbServer) -> list[str]:
    with server.client() as c:
        return [fn["name"] for fn in c.get("/v1/functions").json()["functions"]]


# --- list, get, delete -----------------------------------------------------------------------------


def test_list_shows_function_when_deployed(hxb_server: HxbServer) -> None:
    name = "cli-listed"
    hxb_server.deploy(name, {"index.py": ECHO}, memory=256)

    result = run_hxb("function", "list", env_endpoint=hxb_server.endpoint)

    assert result.returncode == 0, describe(result)
    rows = [line.split() for line in result.stdout.splitlines()]
    row = next((r for r in rows if r and r[0] == name), None)
    assert row is not None, describe(result)
    assert "python3.11" in row
    assert "256" in row


def test_get_prints_config_as_json_when_function_exists(hxb_server: HxbServer) -> None:
    name = "cli-get"
    hxb_server.deploy(name, {"index.py": ECHO}, memory=256, timeout=7, environment={"COLOUR": "blue"})

    result = run_hxb("function", "get", name, *_ep(hxb_server))

    assert result.returncode == 0, describe(result)
    view = json.loads(result.stdout)
    assert view["name"] == name
    assert view["runtime"] == "python3.11"
    assert view["handler"] == "index.handler"
    assert view["memory"] == 256
    assert view["timeout"] == 7
    assert view["config"]["environment"] == {"COLOUR": "blue"}


def test_delete_makes_invoke_fail_when_function_was_deployed(hxb_server: HxbServer) -> None:
    name = "cli-deleted"
    hxb_server.deploy(name, {"index.py": ECHO})
    assert hxb_server.invoke(name).status_code == 200

    deleted = run_hxb("function", "delete", name, *_ep(hxb_server))
    after = run_hxb("function", "invoke", name, *_ep(hxb_server))

    assert deleted.returncode == 0, describe(deleted)
    assert_one_line_error(after, name)
    assert name not in _list_names(hxb_server)
    listed = run_hxb("function", "list", *_ep(hxb_server))
    assert listed.returncode == 0, describe(listed)
    assert name not in listed.stdout.split()


# --- logs --------------------------------------------------------------------------------------------


def test_logs_show_invocation_lines_when_function_printed(hxb_server: HxbServer) -> None:
    name = "cli-logs"
    hxb_server.deploy(name, {"index.py": PRINTER})
    assert hxb_server.invoke(name, {"say": "logs-marker"}).status_code == 200

    output = _cli_logs_until(hxb_server, name, "REPORT RequestId:")

    lines = output.splitlines()
    starts = [i for i, line in enumerate(lines) if "START RequestId:" in line]
    printed = [i for i, line in enumerate(lines) if "said: logs-marker" in line]
    ends = [i for i, line in enumerate(lines) if "END RequestId:" in line]
    reports = [i for i, line in enumerate(lines) if "REPORT RequestId:" in line]
    assert len(starts) == len(printed) == len(ends) == len(reports) == 1, output
    assert starts[0] < printed[0] < ends[0] < reports[0], output


def test_logs_filter_by_time_when_since_given(hxb_server: HxbServer) -> None:
    name = "cli-logs-since"
    hxb_server.deploy(name, {"index.py": PRINTER})
    assert hxb_server.invoke(name, {"say": "since-marker"}).status_code == 200
    hxb_server.wait_for_log(name, "REPORT RequestId:")
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()

    recent = run_hxb("function", "logs", name, "--since", "1h", *_ep(hxb_server))
    none_yet = run_hxb("function", "logs", name, "--since", future, *_ep(hxb_server))

    assert recent.returncode == 0, describe(recent)
    assert "said: since-marker" in recent.stdout, describe(recent)
    assert none_yet.returncode == 0, describe(none_yet)
    assert "since-marker" not in none_yet.stdout, describe(none_yet)


def test_logs_fail_with_one_line_when_since_invalid(hxb_server: HxbServer) -> None:
    name = "cli-logs-bad-since"
    hxb_server.deploy(name, {"index.py": PRINTER})

    result = run_hxb("function", "logs", name, "--since", "yesterday-ish", *_ep(hxb_server))

    assert_one_line_error(result, "--since", "yesterday-ish")


def _pump(stream: IO[str], lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line)


def _read_until(
    follower: subprocess.Popen[str], lines: queue.Queue[str], needle: str, seen: list[str], timeout_s: float = 20.0
) -> None:
    """Collects the follower's lines into `seen` until one holds `needle`; fails if it exits first."""
    deadline = time.monotonic() + timeout_s
    while not any(needle in line for line in seen):
        if time.monotonic() > deadline:
            raise AssertionError(f"{needle!r} never printed by --follow; got {seen}")
        try:
            seen.append(lines.get(timeout=0.2))
            continue
        except queue.Empty:
            pass
        exited = follower.poll() is not None and lines.empty()
        assert not exited, f"--follow exited ({follower.returncode}) before printing {needle!r}: {seen}"


def test_logs_keep_printing_new_lines_when_follow_given(hxb_server: HxbServer, tmp_path: Path) -> None:
    name = "cli-follow"
    hxb_server.deploy(name, {"index.py": PRINTER})
    lines: queue.Queue[str] = queue.Queue()
    seen: list[str] = []
    cmd = [HXB, "function", "logs", name, "--follow", *_ep(hxb_server)]

    with (
        (tmp_path / "follow.stderr").open("w") as stderr,
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env=server_env()) as follower,
    ):
        assert follower.stdout is not None
        stdout = follower.stdout
        reader = threading.Thread(target=_pump, args=(stdout, lines), daemon=True)
        reader.start()
        try:
            assert hxb_server.invoke(name, {"say": "follow-one"}).status_code == 200
            _read_until(follower, lines, "said: follow-one", seen)
            assert hxb_server.invoke(name, {"say": "follow-two"}).status_code == 200
            _read_until(follower, lines, "said: follow-two", seen)
            still_running = follower.poll() is None
        finally:
            follower.terminate()
            follower.wait(10)
            reader.join(10)

    assert still_running, "hxb function logs --follow exited on its own"
    assert sum("START RequestId:" in line for line in seen) == 2, seen
    said = [line.rstrip("\n").split("said: ", 1)[1] for line in seen if "said: " in line]
    assert said == ["follow-one", "follow-two"], seen


# --- endpoint, runtimes, config, version -------------------------------------------------------------


def test_endpoint_option_wins_when_env_points_elsewhere(hxb_server: HxbServer) -> None:
    name = "cli-endpoint"
    hxb_server.deploy(name, {"index.py": ECHO})

    by_option = run_hxb("function", "get", name, *_ep(hxb_server), env_endpoint=UNREACHABLE)
    by_env = run_hxb("function", "get", name, env_endpoint=hxb_server.endpoint)

    assert by_option.returncode == 0, describe(by_option)
    assert json.loads(by_option.stdout)["name"] == name
    assert by_env.returncode == 0, describe(by_env)
    assert json.loads(by_env.stdout)["name"] == name


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(("function", "list"), id="list"),
        pytest.param(("function", "invoke", "anything"), id="invoke"),
        pytest.param(("runtimes",), id="runtimes"),
    ],
)
def test_command_says_it_cannot_reach_hxb_when_nothing_listens(args: tuple[str, ...]) -> None:
    result = run_hxb(*args, "--endpoint", UNREACHABLE)

    assert_one_line_error(result, "cannot reach hxb", UNREACHABLE)


@pytest.mark.parametrize("where", ["server", "local"])
def test_runtimes_lists_python311_when_asked(hxb_server: HxbServer, where: str) -> None:
    args = ("--local",) if where == "local" else _ep(hxb_server)

    result = run_hxb("runtimes", *args)

    assert result.returncode == 0, describe(result)
    names = [line.split()[0] for line in result.stdout.splitlines() if line.strip()]
    assert "python3.11" in names, describe(result)


def test_config_schema_prints_json_schema_of_hexabase_yaml() -> None:
    result = run_hxb("config", "schema")

    assert result.returncode == 0, describe(result)
    schema = json.loads(result.stdout)
    assert "function" in schema["properties"]
    assert schema.get("$schema", "").startswith("https://json-schema.org/")


def test_version_prints_package_version() -> None:
    result = run_hxb("--version")

    assert result.returncode == 0, describe(result)
    assert result.stdout.strip() == f"hxb {hxb.__version__}"


# --- hxb serve ---------------------------------------------------------------------------------------


def test_serve_answers_http_trigger_when_demo_given(hxb_server_factory: Callable[..., HxbServer]) -> None:
    server: HxbServer = hxb_server_factory("--demo")

    response = httpx.get(f"{server.endpoint}/fn/hello", params={"name": "you"}, timeout=60)
    banner = _banner(server, "/fn/hello")

    assert response.status_code == 200, response.text
    assert "you" in response.json()["message"]
    assert "demo" in banner, banner
    assert "/fn/hello" in banner, banner


def _banner(server: HxbServer, needle: str, timeout_s: float = 10.0) -> str:
    """The server's output so far, once it holds `needle` (its drainer thread reads it in)."""
    deadline = time.monotonic() + timeout_s
    while needle not in "".join(server.output) and time.monotonic() < deadline:
        time.sleep(0.05)
    return "".join(server.output)


# --- asynchronous invocation --------------------------------------------------------------------------


def test_invoke_async_prints_the_request_id_and_failures_reach_the_dlq(hxb_server: HxbServer, tmp_path: Path) -> None:
    ok, failing = "cli-async", "cli-async-fail"
    write_function(tmp_path / "ok", ok, {"index.py": PRINTER})
    write_function(
        tmp_path / "failing",
        failing,
        {"index.py": "def handler(e, c):\n    raise RuntimeError('nope ' + e['say'])\n"},
        async_={"max_retries": 0},
    )
    for directory in ("ok", "failing"):
        deployed = run_hxb("function", "deploy", str(tmp_path / directory), *_ep(hxb_server))
        assert deployed.returncode == 0, describe(deployed)

    queued = run_hxb("function", "invoke", ok, "--async", "--payload", '{"say": "later"}', *_ep(hxb_server))
    assert queued.returncode == 0, describe(queued)
    request_id = queued.stdout.strip()
    assert len(request_id) == 36, describe(queued)
    _cli_logs_until(hxb_server, ok, "said: later", "--invocation", request_id)

    failed = run_hxb("function", "invoke", failing, "--async", "--payload", '{"say": "x"}', *_ep(hxb_server))
    assert failed.returncode == 0, describe(failed)
    failed_id = failed.stdout.strip()
    deadline = time.monotonic() + 20
    while True:
        listed = run_hxb("function", "dlq", "list", failing, *_ep(hxb_server))
        assert listed.returncode == 0, describe(listed)
        if failed_id in listed.stdout:
            break
        assert time.monotonic() < deadline, describe(listed)
        time.sleep(0.2)
    line = next(x for x in listed.stdout.splitlines() if x.startswith(failed_id))
    assert "RetriesExhausted" in line
    assert "RuntimeError" in line

    shown = run_hxb("function", "dlq", "show", failing, failed_id, *_ep(hxb_server))
    assert shown.returncode == 0, describe(shown)
    letter = json.loads(shown.stdout)
    assert letter["payload"] == {"say": "x"}
    assert letter["attempts"] == 1
    assert letter["error"]["errorMessage"] == "nope x"

    missing = run_hxb("function", "dlq", "show", failing, "no-such-event", *_ep(hxb_server))
    assert_one_line_error(missing, "no-such-event")
