"""The management API (`/v1/...`) against a real `hxb serve`: create, update, read, list,
reconfigure and delete functions; and every kind of bad package or configuration refused with a
message naming the problem, nothing written where it should not be, the platform still serving."""

from __future__ import annotations

import concurrent.futures
import http.client
import io
import os
import urllib.parse
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import HxbServer, function_yaml, make_zip
from tests.integration._helpers import (
    MIB,
    assert_canary_ok,
    deploy_canary,
    files_named,
    instance_running,
    management_error,
    unique,
    wait_for_instance_exit,
)

PACKAGE_LIMIT_BYTES = 50 * MIB

VERSIONED = """
import os
VERSION = {version!r}
def handler(event, context):
    return {{"version": VERSION, "instance": os.environ["AWS_LAMBDA_LOG_STREAM_NAME"].rsplit("]", 1)[1]}}
"""

SHOWS_CONFIG = """
import os
def handler(event, context):
    return {
        "greeting": os.environ.get("GREETING"),
        "memory_env": os.environ["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"],
        "memory_context": context.memory_limit_in_mb,
        "instance": os.environ["AWS_LAMBDA_LOG_STREAM_NAME"].rsplit("]", 1)[1],
    }
"""


@pytest.fixture(scope="module")
def canary(hxb_server: HxbServer) -> str:
    return deploy_canary(hxb_server)


def _package(name: str, version: str = "v1", **config: Any) -> bytes:
    return make_zip({"hexabase.yaml": function_yaml(name, **config), "index.py": VERSIONED.format(version=version)})


def _get(server: HxbServer, path: str) -> httpx.Response:
    with server.client() as c:
        return c.get(path)


def _send(server: HxbServer, method: str, path: str, body: bytes) -> httpx.Response:
    with server.client() as c:
        return c.request(method, path, content=body, headers={"content-type": "application/zip"})


def _patch(server: HxbServer, name: str, patch: dict[str, Any]) -> httpx.Response:
    with server.client() as c:
        return c.patch(f"/v1/functions/{name}", json=patch)


# --- the lifecycle of a function ----------------------------------------------------------------


def test_post_creates_a_function_and_a_second_post_conflicts(hxb_server: HxbServer) -> None:
    name = unique("post")

    created = _send(hxb_server, "POST", "/v1/functions", _package(name))
    again = _send(hxb_server, "POST", "/v1/functions", _package(name, version="v2"))
    invoked = hxb_server.invoke(name, {})

    assert created.status_code == 201, created.text
    assert created.json()["name"] == name
    assert created.json()["version"] == "$LATEST"
    error = management_error(again, 409)
    assert name in error["message"]
    assert invoked.status_code == 200, invoked.text
    assert invoked.json()["version"] == "v1", "a refused POST must not replace the code"


def test_put_creates_then_updates_and_retires_the_old_instances(hxb_server: HxbServer) -> None:
    name = unique("put")

    created = hxb_server.deploy_zip(name, _package(name, "v1"))
    first = hxb_server.invoke(name, {}).json()
    updated = hxb_server.deploy_zip(name, _package(name, "v2"))
    second = hxb_server.invoke(name, {}).json()

    assert created.status_code == 201, created.text
    assert updated.status_code == 200, updated.text
    assert updated.json()["code_sha256"] != created.json()["code_sha256"]
    assert updated.json()["revision_id"] != created.json()["revision_id"]
    assert first["version"] == "v1"
    assert second["version"] == "v2"
    assert second["instance"] != first["instance"]
    wait_for_instance_exit(first["instance"])


def test_refused_update_leaves_the_deployed_function_serving(hxb_server: HxbServer) -> None:
    name = unique("keepold")
    hxb_server.deploy_zip(name, _package(name, "v1"))
    before = hxb_server.invoke(name, {}).json()

    refused = hxb_server.deploy_zip(name, _package(name, "v2", memory=64))
    after = hxb_server.invoke(name, {}).json()

    management_error(refused, 400)
    assert after == before, "the refused update must not change the code or retire the instance"
    assert instance_running(before["instance"])


def test_update_during_an_invocation_lets_it_finish_on_its_own_code_then_retires_it(hxb_server: HxbServer) -> None:
    # As in Lambda, an invocation that started on the old code ends on it: even what it loads
    # late (a module imported in the handler, a data file) is still the old code's.
    name = unique("inflight")
    slow = """
    import os, time
    def handler(event, context):
        if event.get("slow"):
            print("slow call started", flush=True)
            # The sandbox shows nothing of the host to wait on: the test redeploys meanwhile.
            time.sleep(event["slow"])
        import late
        with open(os.path.join(os.environ["LAMBDA_TASK_ROOT"], "data.txt")) as fh:
            data = fh.read()
        instance = os.environ["AWS_LAMBDA_LOG_STREAM_NAME"].rsplit("]", 1)[1]
        return {"version": late.VERSION, "data": data, "instance": instance}
    """
    files = {"index.py": slow, "late.py": "VERSION = 'v1'\n", "data.txt": "old data"}
    hxb_server.deploy(name, files, timeout=30)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(hxb_server.invoke, name, {"slow": 4})
        hxb_server.wait_for_log(name, "slow call started")

        hxb_server.deploy(name, {**files, "late.py": "VERSION = 'v2'\n", "data.txt": "new data"}, timeout=30)
        new = hxb_server.invoke(name, {})
        assert not in_flight.done(), "the slow call ended before the redeploy: the test proves nothing"
        old = in_flight.result(timeout=30)

    assert new.status_code == 200, new.text
    assert new.json()["version"] == "v2"
    assert new.json()["data"] == "new data"
    assert old.status_code == 200, old.text
    assert "x-amz-function-error" not in old.headers, old.text
    assert old.json()["version"] == "v1"
    assert old.json()["data"] == "old data"
    assert new.json()["instance"] != old.json()["instance"]
    wait_for_instance_exit(old.json()["instance"])


def test_get_returns_the_function_and_list_includes_it(hxb_server: HxbServer) -> None:
    name = unique("get")
    hxb_server.deploy_zip(name, _package(name, memory=256, timeout=7, description="for the list"))

    one = _get(hxb_server, f"/v1/functions/{name}")
    listed = _get(hxb_server, "/v1/functions")

    assert one.status_code == 200, one.text
    doc = one.json()
    assert doc["name"] == name
    assert doc["runtime"] == "python3.11"
    assert doc["handler"] == "index.handler"
    assert doc["memory"] == 256
    assert doc["timeout"] == 7
    assert doc["description"] == "for the list"
    assert doc["arn"] == f"arn:hxb:lambda:local:default:function:{name}"
    assert doc["log_group"] == f"/hxb/functions/default/{name}"
    assert listed.status_code == 200, listed.text
    assert [f for f in listed.json()["functions"] if f["name"] == name] == [doc]


def test_patch_changes_configuration_seen_by_the_next_invocation(hxb_server: HxbServer) -> None:
    name = unique("patch")
    hxb_server.deploy(name, {"index.py": SHOWS_CONFIG}, environment={"GREETING": "hi"})
    before = hxb_server.invoke(name, {}).json()

    patched = _patch(hxb_server, name, {"environment": {"GREETING": "hello"}, "memory": 256})
    after = hxb_server.invoke(name, {}).json()

    assert patched.status_code == 200, patched.text
    assert patched.json()["memory"] == 256
    assert patched.json()["config"]["environment"] == {"GREETING": "hello"}
    assert before == {"greeting": "hi", "memory_env": "128", "memory_context": "128", "instance": before["instance"]}
    assert after == {"greeting": "hello", "memory_env": "256", "memory_context": "256", "instance": after["instance"]}
    assert _get(hxb_server, f"/v1/functions/{name}").json()["memory"] == 256
    wait_for_instance_exit(before["instance"])


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        pytest.param({"memory": 64}, "memory", id="memory-too-small"),
        pytest.param({"timeout": 901}, "timeout", id="timeout-too-long"),
        pytest.param({"environment": {"AWS_REGION": "mars-1"}}, "AWS_REGION", id="reserved-env"),
        pytest.param({"memroy": 256}, "memroy", id="unknown-field"),
    ],
)
def test_patch_with_an_invalid_value_is_400_naming_the_field(
    hxb_server: HxbServer, canary: str, patch: dict[str, Any], field: str
) -> None:
    name = unique("badpatch")
    hxb_server.deploy(name, {"index.py": SHOWS_CONFIG}, environment={"GREETING": "hi"})

    response = _patch(hxb_server, name, patch)

    error = management_error(response, 400)
    assert any(field in problem for problem in error["problems"]), error
    unchanged = _get(hxb_server, f"/v1/functions/{name}").json()
    assert unchanged["memory"] == 128
    assert unchanged["timeout"] == 3
    assert unchanged["config"]["environment"] == {"GREETING": "hi"}
    assert hxb_server.invoke(name, {}).json()["greeting"] == "hi"
    assert_canary_ok(hxb_server, canary)


def test_patch_adding_a_layer_is_refused(hxb_server: HxbServer, canary: str) -> None:
    name = unique("patchlayer")
    hxb_server.deploy(name, {"index.py": SHOWS_CONFIG})

    error = management_error(_patch(hxb_server, name, {"layers": ["x"]}), 400)

    assert "layer 'x'" in error["message"], error
    assert _get(hxb_server, f"/v1/functions/{name}").json()["config"]["layers"] == []
    assert_canary_ok(hxb_server, canary)


def test_patch_cannot_rename_a_function(hxb_server: HxbServer) -> None:
    name = unique("rename")
    hxb_server.deploy(name, {"index.py": SHOWS_CONFIG})
    new_name = unique("renamed")

    response = _patch(hxb_server, name, {"name": new_name})

    error = management_error(response, 400)
    assert any("name" in problem for problem in error["problems"]), error
    assert _get(hxb_server, f"/v1/functions/{name}").status_code == 200
    assert _get(hxb_server, f"/v1/functions/{new_name}").status_code == 404


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]"])
def test_patch_body_that_is_not_a_json_object_is_400(hxb_server: HxbServer, body: bytes) -> None:
    name = unique("patchbody")
    hxb_server.deploy(name, {"index.py": SHOWS_CONFIG})

    with hxb_server.client() as c:
        response = c.patch(f"/v1/functions/{name}", content=body, headers={"content-type": "application/json"})

    error = management_error(response, 400)
    assert "JSON" in error["message"]


def test_patch_of_a_missing_function_is_404(hxb_server: HxbServer) -> None:
    management_error(_patch(hxb_server, unique("nosuch"), {"memory": 256}), 404)


def test_delete_removes_the_function_and_its_instances(hxb_server: HxbServer) -> None:
    name = unique("delete")
    hxb_server.deploy_zip(name, _package(name))
    instance = hxb_server.invoke(name, {}).json()["instance"]

    with hxb_server.client() as c:
        deleted = c.delete(f"/v1/functions/{name}")
        again = c.delete(f"/v1/functions/{name}")

    assert deleted.status_code == 204, deleted.text
    assert deleted.content == b""
    management_error(again, 404)
    management_error(_get(hxb_server, f"/v1/functions/{name}"), 404)
    assert hxb_server.invoke(name, {}).status_code == 404
    assert name not in [f["name"] for f in _get(hxb_server, "/v1/functions").json()["functions"]]
    wait_for_instance_exit(instance)


def test_get_of_a_missing_function_is_404_naming_it(hxb_server: HxbServer) -> None:
    name = unique("nosuch")

    error = management_error(_get(hxb_server, f"/v1/functions/{name}"), 404)

    assert name in error["message"]


# --- discovery ----------------------------------------------------------------------------------


def test_openapi_document_is_3_1_and_lists_the_v1_paths(hxb_server: HxbServer) -> None:
    response = _get(hxb_server, "/openapi.json")

    assert response.status_code == 200, response.text
    doc = response.json()
    assert doc["openapi"].startswith("3.1"), doc["openapi"]
    assert doc["info"]["title"]
    assert {
        "/v1/health",
        "/v1/runtimes",
        "/v1/functions",
        "/v1/functions/{name}",
        "/v1/functions/{name}/logs",
    } <= set(doc["paths"])
    assert {"get", "post"} <= set(doc["paths"]["/v1/functions"])
    assert {"get", "put", "patch", "delete"} <= set(doc["paths"]["/v1/functions/{name}"])


def test_runtimes_include_python_3_11(hxb_server: HxbServer) -> None:
    response = _get(hxb_server, "/v1/runtimes")

    assert response.status_code == 200, response.text
    runtimes = {r["name"]: r for r in response.json()["runtimes"]}
    assert "python3.11" in runtimes
    assert runtimes["python3.11"]["version"].startswith("3.11.")


def test_health_reports_ok(hxb_server: HxbServer) -> None:
    response = _get(hxb_server, "/v1/health")

    assert response.status_code == 200, response.text
    assert response.json()["status"] == "ok"


# --- bad packages and configurations ------------------------------------------------------------


def _zip_entries(entries: list[tuple[zipfile.ZipInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for info, data in entries:
            zf.writestr(info, data)
    return buf.getvalue()


def _entry(name: str, mode: int = 0o100644) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.create_system = 3
    info.external_attr = mode << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    return info


def _config_entries(name: str) -> list[tuple[zipfile.ZipInfo, bytes]]:
    return [
        (_entry("hexabase.yaml"), function_yaml(name).encode()),
        (_entry("index.py"), b"def handler(event, context):\n    return 1\n"),
    ]


def _assert_nothing_half_unpacked(server: HxbServer) -> None:
    leftovers = [p.name for p in (server.data_dir / "code").iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers
    assert list((server.data_dir / "uploads").iterdir()) == []


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        pytest.param(
            "function:\n  name: {name}\n   memory: [128\n", ["hexabase.yaml", "line 3", "column"], id="malformed-yaml"
        ),
        pytest.param("function:\n  name: {name}\n  memory: 64\n", ["hexabase.yaml", "memory", "128"], id="memory-64"),
        pytest.param(
            "function:\n  name: {name}\n  timeout: 901\n", ["hexabase.yaml", "timeout", "900"], id="timeout-901"
        ),
        pytest.param(
            "function:\n  name: Bad-{name}\n", ["hexabase.yaml", "name", "lowercase"], id="name-with-capitals"
        ),
        pytest.param(
            "function:\n  name: {name}\n  environment:\n    BIG: '" + "v" * 4100 + "'\n",
            ["hexabase.yaml", "environment", "4096"],
            id="environment-over-4kb",
        ),
        pytest.param(
            "function:\n  name: {name}\n  environment:\n    AWS_REGION: mars-1\n",
            ["hexabase.yaml", "AWS_REGION", "reserved"],
            id="reserved-env-var",
        ),
        pytest.param(
            "function:\n  name: {name}\n  memroy: 256\n",
            ["hexabase.yaml", "memroy", "unknown field"],
            id="unknown-field",
        ),
        pytest.param("function:\n  name: {name}\n  runtime: python3.99\n", ["python3.99"], id="unavailable-runtime"),
        pytest.param("function:\n  name: {name}\n  layers: [x]\n", ["layer", "'x'"], id="layers"),
        pytest.param("functions:\n  name: {name}\n", ["function"], id="no-function-key"),
    ],
)
def test_invalid_configuration_is_400_naming_the_problem(
    hxb_server: HxbServer, canary: str, yaml_text: str, expected: list[str]
) -> None:
    name = unique("badcfg")
    package = make_zip({"hexabase.yaml": yaml_text.format(name=name), "index.py": "def handler(e, c):\n    return 1\n"})

    response = hxb_server.deploy_zip(name, package)

    error = management_error(response, 400)
    for word in expected:
        assert word in error["message"], error
    assert _get(hxb_server, f"/v1/functions/{name}").status_code == 404
    assert_canary_ok(hxb_server, canary)


def test_invalid_configuration_lists_every_problem(hxb_server: HxbServer) -> None:
    name = unique("badcfg")
    yaml_text = function_yaml(name, memory=64, timeout=901)

    error = management_error(hxb_server.deploy_zip(name, make_zip({"hexabase.yaml": yaml_text})), 400)

    problems = error["problems"]
    assert any("memory" in p for p in problems), problems
    assert any("timeout" in p for p in problems), problems


def test_put_whose_yaml_names_another_function_is_400(hxb_server: HxbServer, canary: str) -> None:
    url_name, yaml_name = unique("url"), unique("yaml")

    response = hxb_server.deploy_zip(url_name, _package(yaml_name))

    error = management_error(response, 400)
    assert url_name in error["message"]
    assert yaml_name in error["message"]
    assert _get(hxb_server, f"/v1/functions/{url_name}").status_code == 404
    assert _get(hxb_server, f"/v1/functions/{yaml_name}").status_code == 404
    assert_canary_ok(hxb_server, canary)


@pytest.mark.parametrize(
    ("package", "expected"),
    [
        pytest.param(make_zip({"index.py": "def handler(e, c):\n    return 1\n"}), "hexabase.yaml", id="no-config"),
        pytest.param(b"this is not a zip file at all", "zip", id="not-a-zip"),
        pytest.param(b"PK\x03\x04" + b"\0" * 200, "zip", id="truncated-zip"),
    ],
)
def test_unusable_package_is_400_naming_the_problem(
    hxb_server: HxbServer, canary: str, package: bytes, expected: str
) -> None:
    name = unique("badpkg")

    error = management_error(hxb_server.deploy_zip(name, package), 400)

    assert expected in error["message"], error
    assert_canary_ok(hxb_server, canary)


def test_empty_body_is_400(hxb_server: HxbServer) -> None:
    error = management_error(hxb_server.deploy_zip(unique("empty"), b""), 400)

    assert "zip" in error["message"]


def test_entry_that_climbs_out_of_the_package_is_refused_and_not_written(hxb_server: HxbServer, canary: str) -> None:
    name = unique("traversal")
    evil = f"evil-{uuid.uuid4().hex}.py"
    package = _zip_entries([*_config_entries(name), (_entry(f"../{evil}"), b"pwned = True\n")])

    error = management_error(hxb_server.deploy_zip(name, package), 400)

    assert f"../{evil}" in error["message"], error
    assert ".." in error["message"]
    # Wherever "../" would have led from the code, staging or upload directories, or the data dir.
    assert files_named(hxb_server.data_dir.parent, evil) == []
    _assert_nothing_half_unpacked(hxb_server)
    assert not (Path.cwd().parent / evil).exists()
    assert _get(hxb_server, f"/v1/functions/{name}").status_code == 404
    assert_canary_ok(hxb_server, canary)


def test_entry_with_an_absolute_path_is_refused_and_not_written(hxb_server: HxbServer, canary: str) -> None:
    name = unique("absolute")
    target = Path("/tmp") / f"hxb-evil-{uuid.uuid4().hex}.py"
    package = _zip_entries([*_config_entries(name), (_entry(str(target)), b"pwned = True\n")])

    error = management_error(hxb_server.deploy_zip(name, package), 400)

    assert str(target) in error["message"], error
    assert "absolute" in error["message"]
    assert not target.exists()
    assert files_named(hxb_server.data_dir.parent, target.name) == []
    assert_canary_ok(hxb_server, canary)


def test_symlink_pointing_outside_the_package_is_refused(hxb_server: HxbServer, canary: str) -> None:
    name = unique("symlink")
    link = f"passwd-{uuid.uuid4().hex}"
    package = _zip_entries([*_config_entries(name), (_entry(link, mode=0o120777), b"../../etc/passwd")])

    error = management_error(hxb_server.deploy_zip(name, package), 400)

    assert link in error["message"], error
    assert "../../etc/passwd" in error["message"]
    assert files_named(hxb_server.data_dir, link) == []
    _assert_nothing_half_unpacked(hxb_server)
    assert _get(hxb_server, f"/v1/functions/{name}").status_code == 404
    assert_canary_ok(hxb_server, canary)


@pytest.fixture(scope="module")
def zip_bomb() -> bytes:
    """One entry of 300 MB of zeros: about 300 KB zipped."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(_entry("hexabase.yaml"), function_yaml("bomb").encode())
        info = _entry("zeros.bin")
        zero = bytes(MIB)
        with zf.open(info, "w", force_zip64=True) as out:
            for _ in range(300):
                out.write(zero)
    return buf.getvalue()


def test_zip_bomb_is_refused_naming_size_and_limit(hxb_server: HxbServer, canary: str, zip_bomb: bytes) -> None:
    assert len(zip_bomb) < 2 * MIB

    response = hxb_server.deploy_zip("bomb", zip_bomb)

    assert response.status_code in (400, 413), response.text
    message = response.json()["error"]["message"]
    assert "300" in message, message
    assert "250" in message, message
    assert _get(hxb_server, "/v1/functions/bomb").status_code == 404
    assert files_named(hxb_server.data_dir, "zeros.bin") == []
    _assert_nothing_half_unpacked(hxb_server)
    assert_canary_ok(hxb_server, canary)


def test_package_over_50mb_is_refused_before_it_is_read(hxb_server: HxbServer, canary: str) -> None:
    # Declares 51 MB but sends only the first one: the answer must come without the rest.
    name = unique("huge")
    size = PACKAGE_LIMIT_BYTES + MIB
    url = urllib.parse.urlsplit(hxb_server.endpoint)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=10)
    try:
        conn.putrequest("PUT", f"/v1/functions/{name}")
        conn.putheader("Content-Type", "application/zip")
        conn.putheader("Content-Length", str(size))
        conn.endheaders(os.urandom(MIB))
        response = conn.getresponse()
        status, body = response.status, response.read()
    finally:
        conn.close()

    assert status == 413, body
    assert b"50" in body, body
    assert_canary_ok(hxb_server, canary)


def test_streamed_package_over_50mb_is_413(hxb_server: HxbServer, canary: str) -> None:
    # Chunked, so no Content-Length to refuse up front: the limit holds while reading.
    name = unique("streamed")
    chunk = os.urandom(MIB)

    def body() -> Iterator[bytes]:
        for _ in range(PACKAGE_LIMIT_BYTES // MIB + 1):
            yield chunk

    with hxb_server.client() as c:
        response = c.put(f"/v1/functions/{name}", content=body(), headers={"content-type": "application/zip"})

    error = management_error(response, 413)
    assert "50" in error["message"], error
    _assert_nothing_half_unpacked(hxb_server)
    assert_canary_ok(hxb_server, canary)
