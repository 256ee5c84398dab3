"""Function logs against a real `hxb serve`: Lambda's per-invocation lines (START, the function's
output, END, REPORT), the logging format, init output, stream names, and the logs API filters."""

from __future__ import annotations

import math
import re
import time
import uuid
from typing import Any

import pytest

from tests.conftest import HxbServer
from tests.integration._helpers import unique

_TIMESTAMP = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z"
_REPORT = re.compile(
    r"REPORT RequestId: (?P<id>[0-9a-f-]{36})\tDuration: (?P<duration>\d+\.\d{2}) ms"
    r"\tBilled Duration: (?P<billed>\d+) ms\tMemory Size: (?P<memory>\d+) MB\tMax Memory Used: (?P<used>\d+) MB"
    r"(?:\tInit Duration: (?P<init>\d+\.\d{2}) ms)?\t?"
)
_STREAM = re.compile(r"(?P<day>\d{4}/\d{2}/\d{2})/\[\$LATEST\](?P<instance>[0-9a-zA-Z-]+)")

CHATTY = """
import logging, sys, time
print("init {token}")
logger = logging.getLogger()
def handler(event, context):
    time.sleep(0.015)
    print("stdout {token}", event.get("n"))
    print("stderr {token}", event.get("n"), file=sys.stderr)
    logger.info("logging %s %s", "{token}", event.get("n"))
    return {{"request_id": context.aws_request_id, "stream": context.log_stream_name, "group": context.log_group_name}}
"""


@pytest.fixture(scope="module")
def chatty(hxb_server: HxbServer) -> tuple[str, str]:
    """A function that prints at init and writes stdout, stderr and logging lines per invocation."""
    name, token = unique("chatty"), uuid.uuid4().hex
    hxb_server.deploy(name, {"index.py": CHATTY.format(token=token)})
    return name, token


def _invocation_log(server: HxbServer, name: str, request_id: str) -> list[dict[str, Any]]:
    """The whole log of one invocation, once its REPORT line is stored."""
    server.wait_for_log(name, f"REPORT RequestId: {request_id}", invocation_id=request_id)
    return server.logs(name, invocation_id=request_id)


def _report(events: list[dict[str, Any]], request_id: str) -> re.Match[str]:
    reports = [e["message"] for e in events if e["message"].startswith(f"REPORT RequestId: {request_id}")]
    assert len(reports) == 1, reports
    match = _REPORT.fullmatch(reports[0])
    assert match is not None, reports[0]
    return match


def test_invocation_log_has_start_output_end_and_report_in_order(
    hxb_server: HxbServer, chatty: tuple[str, str]
) -> None:
    name, token = chatty
    response = hxb_server.invoke(name, {"n": 1})
    request_id = response.headers["x-amzn-requestid"]

    events = _invocation_log(hxb_server, name, request_id)

    messages = [e["message"] for e in events]
    assert messages[0] == f"START RequestId: {request_id} Version: $LATEST", messages
    assert messages[-2] == f"END RequestId: {request_id}", messages
    assert messages[-1].startswith(f"REPORT RequestId: {request_id}\t"), messages
    # stdout and stderr share one pipe: their order is kept.
    assert messages[1:-2][:2] == [f"stdout {token} 1", f"stderr {token} 1"], messages
    assert len(messages) == 6, messages
    assert re.fullmatch(rf"\[INFO\]\t{_TIMESTAMP}\t{request_id}\tlogging {token} 1", messages[3]), messages[3]
    assert {e["invocation_id"] for e in events} == {request_id}
    assert len({e["stream"] for e in events}) == 1
    assert [e["timestamp_ms"] for e in events] == sorted(e["timestamp_ms"] for e in events)


def test_request_id_in_the_log_is_the_response_header_and_the_context_one(
    hxb_server: HxbServer, chatty: tuple[str, str]
) -> None:
    name, _ = chatty
    response = hxb_server.invoke(name, {"n": 2})
    request_id = response.headers["x-amzn-requestid"]

    events = _invocation_log(hxb_server, name, request_id)

    assert response.json()["request_id"] == request_id
    assert str(uuid.UUID(request_id)) == request_id
    assert events[0]["message"] == f"START RequestId: {request_id} Version: $LATEST"


def test_report_has_init_duration_on_the_cold_invocation_only(hxb_server: HxbServer) -> None:
    name = unique("report")
    hxb_server.deploy(name, {"index.py": "import time\ndef handler(event, context):\n    time.sleep(0.015)\n"})
    cold = hxb_server.invoke(name, {}).headers["x-amzn-requestid"]
    warm = hxb_server.invoke(name, {}).headers["x-amzn-requestid"]

    cold_report = _report(_invocation_log(hxb_server, name, cold), cold)
    warm_report = _report(_invocation_log(hxb_server, name, warm), warm)

    assert cold_report["init"] is not None, cold_report.string
    assert float(cold_report["init"]) > 0
    assert warm_report["init"] is None, warm_report.string
    for report in (cold_report, warm_report):
        assert report["memory"] == "128"
        assert int(report["used"]) > 0, report.string
        assert float(report["duration"]) >= 15.0, report.string


def test_billed_duration_is_the_duration_rounded_up_to_a_whole_ms(hxb_server: HxbServer) -> None:
    name = unique("billed")
    hxb_server.deploy(name, {"index.py": "import time\ndef handler(event, context):\n    time.sleep(0.0123)\n"})
    request_ids = [hxb_server.invoke(name, {}).headers["x-amzn-requestid"] for _ in range(3)]

    for request_id in request_ids:
        report = _report(_invocation_log(hxb_server, name, request_id), request_id)
        duration, billed = float(report["duration"]), int(report["billed"])
        # The duration is printed rounded to 0.01 ms; the bill is its unrounded value, rounded up.
        assert max(1, math.ceil(duration - 0.005)) <= billed <= max(1, math.ceil(duration + 0.005)), report.string


def test_memory_size_in_report_follows_the_configuration(hxb_server: HxbServer) -> None:
    name = unique("memsize")
    hxb_server.deploy(name, {"index.py": "def handler(event, context):\n    return 1\n"}, memory=512)
    request_id = hxb_server.invoke(name, {}).headers["x-amzn-requestid"]

    report = _report(_invocation_log(hxb_server, name, request_id), request_id)

    assert report["memory"] == "512"


def test_logger_exception_traceback_is_one_event(hxb_server: HxbServer) -> None:
    name, token = unique("traceback"), uuid.uuid4().hex
    hxb_server.deploy(
        name,
        {
            "index.py": f"""
            import logging
            logger = logging.getLogger("app")
            def handler(event, context):
                try:
                    1 / 0
                except ZeroDivisionError:
                    logger.exception("failed {token}")
                return "handled"
            """
        },
    )
    request_id = hxb_server.invoke(name, {}).headers["x-amzn-requestid"]

    messages = [e["message"] for e in _invocation_log(hxb_server, name, request_id)]

    logged = [m for m in messages if f"failed {token}" in m]
    assert len(logged) == 1, messages
    assert logged[0].startswith("[ERROR]\t"), logged[0]
    assert f"\t{request_id}\tfailed {token}\nTraceback (most recent call last):\n" in logged[0]
    assert logged[0].rstrip("\n").endswith("ZeroDivisionError: division by zero"), logged[0]
    assert "1 / 0" in logged[0]
    # START, the one event, END, REPORT: no line of the traceback got an event of its own.
    assert len(messages) == 4, messages


def test_unhandled_exception_is_logged_as_one_event(hxb_server: HxbServer) -> None:
    name, token = unique("unhandled"), uuid.uuid4().hex
    hxb_server.deploy(
        name,
        {"index.py": f"def handler(event, context):\n    raise KeyError('missing {token}')\n"},
    )
    response = hxb_server.invoke(name, {})
    request_id = response.headers["x-amzn-requestid"]

    messages = [e["message"] for e in _invocation_log(hxb_server, name, request_id)]

    logged = [m for m in messages if token in m]
    assert len(logged) == 1, messages
    assert "KeyError" in logged[0]
    assert "Traceback (most recent call last):\n" in logged[0]
    assert not any(m.startswith(("Traceback", "  File ")) for m in messages), messages


def test_output_printed_at_init_is_logged_without_an_invocation_id(
    hxb_server: HxbServer, chatty: tuple[str, str]
) -> None:
    name, token = chatty
    request_id = hxb_server.invoke(name, {"n": 3}).headers["x-amzn-requestid"]
    stream = _invocation_log(hxb_server, name, request_id)[0]["stream"]

    events = hxb_server.wait_for_log(name, f"init {token}")

    init = [e for e in events if e["message"] == f"init {token}" and e["stream"] == stream]
    assert len(init) == 1, [(e["stream"], e["message"]) for e in events]
    assert init[0]["invocation_id"] is None
    first_start = next(e for e in events if e["stream"] == stream and e["message"].startswith("START "))
    assert init[0]["id"] < first_start["id"]


def test_long_init_output_all_belongs_to_init(hxb_server: HxbServer) -> None:
    # More than a pipe buffer of it: whatever the platform has not read by READY is still init's.
    name, token = unique("biginit"), uuid.uuid4().hex
    hxb_server.deploy(
        name,
        {
            "index.py": f"""
            for i in range(3000):
                print(f"init {token} {{i:04d}} " + "i" * 100)
            def handler(event, context):
                print("handler {token}")
            """
        },
    )
    request_id = hxb_server.invoke(name, {}).headers["x-amzn-requestid"]

    events = hxb_server.wait_for_log(name, f"REPORT RequestId: {request_id}")

    init = [e for e in events if e["message"].startswith(f"init {token} ")]
    assert len(init) == 3000
    assert {e["invocation_id"] for e in init} == {None}
    invocation = [e["message"] for e in events if e["invocation_id"] == request_id]
    assert invocation[1:-2] == [f"handler {token}"], invocation[:3]


def test_output_without_a_final_newline_is_logged_in_its_invocation(hxb_server: HxbServer) -> None:
    name, token = unique("nonewline"), uuid.uuid4().hex
    hxb_server.deploy(
        name,
        {
            "index.py": f"""
            import sys
            def handler(event, context):
                sys.stdout.write("partial {token}")
                sys.stdout.flush()
                return "done"
            """
        },
    )
    request_id = hxb_server.invoke(name, {}).headers["x-amzn-requestid"]

    messages = [e["message"] for e in _invocation_log(hxb_server, name, request_id)]

    assert messages[1:-2] == [f"partial {token}"], messages


def test_log_stream_and_group_names_follow_lambdas_format(hxb_server: HxbServer, chatty: tuple[str, str]) -> None:
    name, _ = chatty
    response = hxb_server.invoke(name, {"n": 4})
    request_id = response.headers["x-amzn-requestid"]

    stream = _invocation_log(hxb_server, name, request_id)[0]["stream"]

    match = _STREAM.fullmatch(stream)
    assert match is not None, stream
    started = time.strptime(match["day"], "%Y/%m/%d")
    assert abs(time.mktime(started) - time.mktime(time.gmtime())) < 2 * 86400, stream
    assert response.json()["stream"] == stream
    assert response.json()["group"] == f"/hxb/functions/default/{name}"


def test_timed_out_invocation_logs_its_output_the_timeout_then_end_and_report(hxb_server: HxbServer) -> None:
    name = unique("logtimeout")
    hxb_server.deploy(
        name,
        {"index.py": "import time\ndef handler(event, context):\n    print('about to hang')\n    time.sleep(60)\n"},
        timeout=1,
    )
    request_id = hxb_server.invoke(name, {}).headers["x-amzn-requestid"]

    messages = [e["message"] for e in _invocation_log(hxb_server, name, request_id)]

    assert len(messages) == 5, messages
    assert messages[0] == f"START RequestId: {request_id} Version: $LATEST"
    assert messages[1] == "about to hang"
    assert re.fullmatch(rf"\S+ {request_id} Task timed out after 1\.00 seconds", messages[2]), messages[2]
    assert messages[3] == f"END RequestId: {request_id}"
    assert messages[4].startswith(f"REPORT RequestId: {request_id}\t")


def test_report_of_a_timed_out_invocation_has_the_memory_it_used(hxb_server: HxbServer) -> None:
    # Lambda reports what the instance used even when it had to be stopped.
    name = unique("memtimeout")
    hxb_server.deploy(name, {"index.py": "import time\ndef handler(event, context):\n    time.sleep(60)\n"}, timeout=1)
    request_id = hxb_server.invoke(name, {}).headers["x-amzn-requestid"]

    events = _invocation_log(hxb_server, name, request_id)

    report = next(e["message"] for e in events if e["message"].startswith("REPORT "))
    used = re.search(r"\tMax Memory Used: (\d+) MB", report)
    assert used is not None, report
    assert int(used[1]) > 0, report


def test_first_invocation_on_a_replacement_instance_reports_init_duration(hxb_server: HxbServer) -> None:
    name = unique("reinit")
    hxb_server.deploy(
        name,
        {"index.py": "import os\ndef handler(event, context):\n    if event.get('die'):\n        os._exit(1)\n"},
    )
    ids = [hxb_server.invoke(name, event).headers["x-amzn-requestid"] for event in ({}, {}, {"die": 1}, {})]

    reports = [_report(_invocation_log(hxb_server, name, request_id), request_id) for request_id in ids[:2] + ids[3:]]

    assert [r["init"] is not None for r in reports] == [True, False, True]


# --- the logs API's filters ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_invocations(hxb_server: HxbServer) -> tuple[str, str, str, list[dict[str, Any]]]:
    """A function invoked twice (A then B), and every stored event of it."""
    name = unique("filters")
    hxb_server.deploy(
        name,
        {
            "index.py": """
            import time
            def handler(event, context):
                print("n is", event["n"])
                time.sleep(0.01)
            """
        },
    )
    first = hxb_server.invoke(name, {"n": 1}).headers["x-amzn-requestid"]
    second = hxb_server.invoke(name, {"n": 2}).headers["x-amzn-requestid"]
    hxb_server.wait_for_log(name, f"REPORT RequestId: {first}")
    events = hxb_server.wait_for_log(name, f"REPORT RequestId: {second}")
    return name, first, second, events


def test_logs_filter_by_invocation_id(
    hxb_server: HxbServer, two_invocations: tuple[str, str, str, list[dict[str, Any]]]
) -> None:
    name, first, second, events = two_invocations

    only_first = hxb_server.logs(name, invocation_id=first)

    assert only_first == [e for e in events if e["invocation_id"] == first]
    assert [e["message"] for e in only_first][1] == "n is 1"
    assert not any(second in e["message"] for e in only_first)


def test_logs_filter_after_id(
    hxb_server: HxbServer, two_invocations: tuple[str, str, str, list[dict[str, Any]]]
) -> None:
    name, first, _, events = two_invocations
    last_of_first = next(e["id"] for e in events if e["message"].startswith(f"REPORT RequestId: {first}"))

    after = hxb_server.logs(name, after_id=last_of_first)

    assert after == [e for e in events if e["id"] > last_of_first]
    assert after
    assert not any(e["invocation_id"] == first for e in after)


def test_logs_filter_since_ms(
    hxb_server: HxbServer, two_invocations: tuple[str, str, str, list[dict[str, Any]]]
) -> None:
    name, first, second, events = two_invocations
    start_of_first = next(e for e in events if e["message"].startswith(f"START RequestId: {first}"))
    since = start_of_first["timestamp_ms"] + 1

    recent = hxb_server.logs(name, since_ms=since)

    assert recent == [e for e in events if e["timestamp_ms"] >= since]
    assert start_of_first not in recent
    assert any(e["message"].startswith(f"START RequestId: {second}") for e in recent)


def test_logs_page_with_limit_and_next_after_id(
    hxb_server: HxbServer, two_invocations: tuple[str, str, str, list[dict[str, Any]]]
) -> None:
    name, _, _, events = two_invocations
    pages: list[dict[str, Any]] = []
    after_id = 0
    with hxb_server.client() as c:
        while True:
            page = c.get(f"/v1/functions/{name}/logs", params={"limit": 3, "after_id": after_id}).json()
            if not page["events"]:
                break
            assert len(page["events"]) <= 3
            pages += page["events"]
            after_id = page["next_after_id"]

    assert pages[: len(events)] == events


def test_logs_of_a_missing_function_are_404(hxb_server: HxbServer) -> None:
    with hxb_server.client() as c:
        response = c.get(f"/v1/functions/{unique('nosuch')}/logs")

    assert response.status_code == 404


def test_logs_filter_that_is_not_a_number_is_400(hxb_server: HxbServer, chatty: tuple[str, str]) -> None:
    name, _ = chatty
    with hxb_server.client() as c:
        response = c.get(f"/v1/functions/{name}/logs", params={"since_ms": "yesterday"})

    assert response.status_code == 400
    assert "since_ms" in response.json()["error"]["message"]
