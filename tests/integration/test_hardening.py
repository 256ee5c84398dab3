"""Regressions for hostile or unlucky timing: slow request bodies across a deploy, fds the
platform inherited, deeply nested JSON, and one function flooding its logs."""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any
from urllib.parse import urlsplit

from tests.conftest import HxbServer


def _raw_post_in_two_parts(server: HxbServer, path: str, body: bytes, between: Any) -> dict[str, Any]:
    """Sends the headers, runs `between()`, then sends the body; returns the JSON answer."""
    url = urlsplit(server.endpoint)
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Length: {len(body)}\r\n"
            "Content-Type: application/json\r\nConnection: close\r\n\r\n"
        )
        sock.sendall(head.encode())
        between()
        sock.sendall(body)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    response = b"".join(chunks)
    head_bytes, _, payload = response.partition(b"\r\n\r\n")
    assert head_bytes.startswith(b"HTTP/1.1 200"), response[:300]
    result: dict[str, Any] = json.loads(payload)
    return result


def test_a_deploy_during_a_slow_request_body_runs_the_new_code(hxb_server: HxbServer) -> None:
    def version(v: int) -> dict[str, str]:
        return {"index.py": f"def handler(event, context):\n    return {{'version': {v}}}\n"}

    hxb_server.deploy("slow-body", version(1))
    assert hxb_server.invoke("slow-body").json() == {"version": 1}

    result = _raw_post_in_two_parts(
        hxb_server,
        "/2015-03-31/functions/slow-body/invocations",
        b"{}",
        lambda: hxb_server.deploy("slow-body", version(2)),
    )

    assert result == {"version": 2}


def test_instances_inherit_no_fd_but_stdio_and_their_channel(hxb_server_factory: Any) -> None:
    # The platform itself inherited an open pipe (as from a shell or a supervisor): not for instances.
    read_end, write_end = os.pipe()
    os.set_inheritable(write_end, True)
    try:
        hxb_server = hxb_server_factory(pass_fds=(write_end,))
    finally:
        os.close(read_end)
        os.close(write_end)
    hxb_server.deploy(
        "fds",
        {
            "index.py": """
                import os
                def handler(event, context):
                    fds = []
                    for name in os.listdir("/proc/self/fd"):
                        try:
                            fds.append((int(name), os.readlink("/proc/self/fd/" + name)))
                        except OSError:
                            pass  # the directory listing's own fd, already closed
                    return fds
            """
        },
    )
    fds = dict(hxb_server.invoke("fds").json())
    assert set(fds) <= {0, 1, 2, 3}, fds
    assert fds[3].startswith("socket:")


def test_deeply_nested_json_is_a_clear_400_not_a_500(hxb_server: HxbServer) -> None:
    hxb_server.deploy("deep", {"index.py": "def handler(e, c):\n    return 1\n"})
    response = hxb_server.invoke("deep", raw=b"[" * 200_000 + b"]" * 200_000)
    assert response.status_code == 400, response.text
    assert response.headers["x-amzn-errortype"] == "InvalidRequestContentException"


FLOOD = """
import subprocess, sys
FLOOD = None
def handler(event, context):
    global FLOOD
    # A child that prints for as long as the instance lives, as fast as it can.
    code = "import sys\\nwhile True:\\n    sys.stdout.write('x' * 200 + '\\\\n')"
    FLOOD = subprocess.Popen([sys.executable, "-c", code])
    return "flooding"
"""


def test_one_function_flooding_its_logs_does_not_cost_another_its_logs(hxb_server_factory: Any) -> None:
    server: HxbServer = hxb_server_factory(HXB_LOGS_MAX_PENDING_BYTES=str(8 * 1024 * 1024))
    server.deploy("flood", {"index.py": FLOOD})
    server.deploy("quiet", {"index.py": "def handler(e, c):\n    print('quiet', e['n'])\n    return e['n']\n"})
    assert server.invoke("flood").json() == "flooding"
    time.sleep(1.0)  # let the flood fill whatever it can

    ids = []
    for n in range(20):
        response = server.invoke("quiet", {"n": n})
        assert response.json() == n
        ids.append(response.headers["x-amzn-requestid"])

    events = server.wait_for_log("quiet", f"END RequestId: {ids[-1]}", timeout_s=30)
    for request_id in ids:
        mine = [e["message"] for e in events if e["invocation_id"] == request_id]
        assert mine[0].startswith("START"), mine
        assert mine[-1].startswith("REPORT"), mine
    assert not any("dropped" in e["message"] for e in events)
    with server.client() as c:
        assert c.get("/v1/health").status_code == 200
