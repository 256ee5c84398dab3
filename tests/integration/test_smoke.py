"""The shortest path through the platform: deploy, invoke, read the log."""

from __future__ import annotations

from tests.conftest import HxbServer

HANDLER = """
COUNT = 0
def handler(event, context):
    global COUNT
    COUNT += 1
    print("count is", COUNT)
    return {"count": COUNT, "echo": event}
"""


def test_deployed_function_is_invoked_and_reused(hxb_server: HxbServer) -> None:
    hxb_server.deploy("smoke", {"index.py": HANDLER})

    first = hxb_server.invoke("smoke", {"a": 1})
    second = hxb_server.invoke("smoke", {"a": 2})

    assert first.status_code == 200, first.text
    assert first.json() == {"count": 1, "echo": {"a": 1}}
    assert second.json() == {"count": 2, "echo": {"a": 2}}
    hxb_server.wait_for_log("smoke", "count is 2")
