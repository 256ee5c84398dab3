"""Log records and the formats of the platform's own lines (START, END, REPORT), as in Lambda."""

from __future__ import annotations

import math
import time
from typing import NamedTuple

# Lambda's `X-Amz-Log-Result` carries the last 4 KB of the invocation's log.
TAIL_BYTES = 4096


class LogEvent(NamedTuple):
    workspace: str
    function: str
    stream: str
    invocation_id: str | None
    ts_ms: int
    message: str


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def log_group_name(workspace: str, function: str) -> str:
    return f"/hxb/functions/{workspace}/{function}"


def log_stream_name(version: str, instance_id: str, started_epoch_s: float) -> str:
    day = time.strftime("%Y/%m/%d", time.gmtime(started_epoch_s))
    return f"{day}/[{version}]{instance_id}"


def start_line(invocation_id: str, version: str) -> str:
    return f"START RequestId: {invocation_id} Version: {version}"


def end_line(invocation_id: str) -> str:
    return f"END RequestId: {invocation_id}"


def report_line(
    invocation_id: str,
    *,
    duration_ms: float,
    memory_size_mb: int,
    max_memory_used_mb: int | None,
    init_duration_ms: float | None,
    status: str | None = None,
) -> str:
    billed_ms = max(1, math.ceil(duration_ms))
    parts = [
        f"REPORT RequestId: {invocation_id}",
        f"Duration: {duration_ms:.2f} ms",
        f"Billed Duration: {billed_ms} ms",
        f"Memory Size: {memory_size_mb} MB",
        f"Max Memory Used: {max_memory_used_mb if max_memory_used_mb is not None else 0} MB",
    ]
    if init_duration_ms is not None:
        parts.append(f"Init Duration: {init_duration_ms:.2f} ms")
    if status:
        parts.append(f"Status: {status}")
    return "\t".join(parts)


def tail_of(lines: list[str], limit_bytes: int = TAIL_BYTES) -> str:
    """The last `limit_bytes` of the log text, cut at a UTF-8 character boundary."""
    text = "".join(line + "\n" for line in lines)
    data = text.encode("utf-8")
    if len(data) <= limit_bytes:
        return text
    return data[-limit_bytes:].decode("utf-8", errors="ignore")
