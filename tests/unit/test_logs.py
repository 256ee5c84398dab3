"""Log lines from the instance pipe, the invocation's log and tail, the platform's lines, and
the batching sink in front of the store."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from hxb.logs.capture import InvocationLog, LineSplitter
from hxb.logs.records import TAIL_BYTES, LogEvent, end_line, log_stream_name, report_line, start_line, tail_of
from hxb.logs.sink import LogSink, LogSinkStatistics
from hxb.testing import wait_until

# --- LineSplitter -------------------------------------------------------------------------------


def test_splitter_keeps_a_partial_line_until_its_newline() -> None:
    splitter = LineSplitter(max_line_bytes=100)

    assert splitter.feed(b"hel") == []
    assert splitter.feed(b"lo\nwor") == ["hello"]
    assert splitter.feed(b"ld\n") == ["world"]
    assert splitter.flush() == []


def test_splitter_byte_by_byte_gives_the_same_lines() -> None:
    splitter = LineSplitter(max_line_bytes=100)
    data = "one\ntwo\n\nthré\n".encode()

    lines = [line for i in range(len(data)) for line in splitter.feed(data[i : i + 1])]

    assert lines == ["one", "two", "", "thré"]


def test_splitter_turns_cr_back_into_newlines() -> None:
    splitter = LineSplitter(max_line_bytes=100)

    lines = splitter.feed(b"[ERROR] boom\rTraceback (most recent call last):\r  File x\n")

    assert lines == ["[ERROR] boom\nTraceback (most recent call last):\n  File x"]


def test_splitter_cuts_long_lines_at_the_maximum() -> None:
    splitter = LineSplitter(max_line_bytes=4)

    assert splitter.feed(b"abcdefghij\nxy\n") == ["abcd", "efgh", "ij", "xy"]


def test_splitter_cuts_a_long_partial_line_without_waiting_for_its_newline() -> None:
    splitter = LineSplitter(max_line_bytes=4)

    assert splitter.feed(b"abcdefghij") == ["abcd", "efgh"]
    assert splitter.feed(b"k") == []
    assert splitter.flush() == ["ijk"]


def test_tagged_splitter_repeats_a_cut_lines_tag_on_every_piece() -> None:
    splitter = LineSplitter(max_line_bytes=8, tag="#")

    assert splitter.feed(b"#id#abcdefghij\n#id#xy\nuntagged-long\n") == [
        "#id#abcd",
        "#id#efgh",
        "#id#ij",
        "#id#xy",
        "untagged",
        "-long",
    ]
    # A partial line cut before its newline keeps its tag too.
    assert splitter.feed(b"#id#0123456789") == ["#id#0123", "#id#4567"]
    assert splitter.flush() == ["#id#89"]


def test_tagged_splitter_does_not_repeat_a_tag_as_long_as_half_the_line() -> None:
    splitter = LineSplitter(max_line_bytes=8, tag="#")

    assert splitter.feed(b"#long#abcdefgh\n") == ["#long#ab", "cdefgh"]


def test_splitter_flush_returns_the_rest_once() -> None:
    splitter = LineSplitter(max_line_bytes=100)
    splitter.feed(b"done\nno newline")

    assert splitter.flush() == ["no newline"]
    assert splitter.flush() == []
    assert splitter.feed(b"next\n") == ["next"]


def test_splitter_decodes_invalid_utf8_with_replacement() -> None:
    splitter = LineSplitter(max_line_bytes=100)

    assert splitter.feed(b"bad \xff byte\n") == ["bad \ufffd byte"]


# --- InvocationLog and the tail -----------------------------------------------------------------


def _invocation_log(events: list[LogEvent]) -> InvocationLog:
    return InvocationLog(events.append, workspace="ws", function="fn", stream="s", invocation_id="inv")


def test_invocation_log_forwards_every_line_with_its_invocation() -> None:
    events: list[LogEvent] = []
    log = _invocation_log(events)

    log.add("one", ts_ms=5)
    log.add("two")

    assert [(e.workspace, e.function, e.stream, e.invocation_id, e.message) for e in events] == [
        ("ws", "fn", "s", "inv", "one"),
        ("ws", "fn", "s", "inv", "two"),
    ]
    assert events[0].ts_ms == 5
    assert events[1].ts_ms > 1_600_000_000_000


def test_invocation_log_tail_keeps_the_last_4kb_of_many_lines() -> None:
    events: list[LogEvent] = []
    log = _invocation_log(events)
    lines = [f"line {n:04d} " + "x" * 90 for n in range(500)]

    for line in lines:
        log.add(line)

    assert len(events) == 500
    assert len(log.tail_lines()) < 200  # bounded
    assert tail_of(log.tail_lines()) == tail_of(lines)
    assert len(tail_of(log.tail_lines()).encode()) == TAIL_BYTES


def test_invocation_log_tail_keeps_the_last_4kb_when_a_long_line_is_followed_by_short_ones() -> None:
    log = _invocation_log([])
    lines = ["START", "y" * 10_000, "END", "REPORT"]

    for line in lines:
        log.add(line)

    tail = tail_of(log.tail_lines())
    assert len(tail.encode()) == TAIL_BYTES  # "END\nREPORT\n" alone is 11 bytes
    assert tail == tail_of(lines)


def test_tail_of_short_text_is_all_of_it() -> None:
    assert tail_of(["a", "b"]) == "a\nb\n"
    assert tail_of([]) == ""


def test_tail_of_cuts_at_a_utf8_boundary() -> None:
    lines = ["é" * 3000]  # 6000 bytes of 2-byte characters, then the newline

    tail = tail_of(lines)

    assert "\ufffd" not in tail
    assert ("".join(line + "\n" for line in lines)).endswith(tail)
    assert TAIL_BYTES - 1 <= len(tail.encode()) <= TAIL_BYTES


def test_tail_of_takes_the_last_bytes() -> None:
    lines = [f"{n:09d}" for n in range(1000)]  # 10 bytes per line with its newline

    tail = tail_of(lines, limit_bytes=25)

    assert tail == "0997\n000000998\n000000999\n"


# --- the platform's lines -----------------------------------------------------------------------


def test_start_and_end_lines() -> None:
    assert start_line("inv-1", "$LATEST") == "START RequestId: inv-1 Version: $LATEST"
    assert end_line("inv-1") == "END RequestId: inv-1"


def test_report_line_has_lambdas_fields_separated_by_tabs() -> None:
    line = report_line("inv-1", duration_ms=12.345, memory_size_mb=128, max_memory_used_mb=40, init_duration_ms=101.5)

    assert line == (
        "REPORT RequestId: inv-1\tDuration: 12.35 ms\tBilled Duration: 13 ms\tMemory Size: 128 MB"
        "\tMax Memory Used: 40 MB\tInit Duration: 101.50 ms"
    )


def test_report_line_without_init_duration_or_memory_figure() -> None:
    line = report_line("inv-2", duration_ms=2.0, memory_size_mb=256, max_memory_used_mb=None, init_duration_ms=None)

    assert line == (
        "REPORT RequestId: inv-2\tDuration: 2.00 ms\tBilled Duration: 2 ms\tMemory Size: 256 MB\tMax Memory Used: 0 MB"
    )


def test_report_line_ends_with_the_status_when_given() -> None:
    line = report_line(
        "inv-3", duration_ms=3000.0, memory_size_mb=128, max_memory_used_mb=1, init_duration_ms=None, status="timeout"
    )

    assert line.endswith("\tMax Memory Used: 1 MB\tStatus: timeout")


@pytest.mark.parametrize(
    ("duration_ms", "billed_ms"),
    [(0.0, 1), (0.01, 1), (1.0, 1), (1.2, 2), (3.0, 3), (999.001, 1000)],
)
def test_billed_duration_rounds_up_to_a_whole_millisecond(duration_ms: float, billed_ms: int) -> None:
    line = report_line("i", duration_ms=duration_ms, memory_size_mb=128, max_memory_used_mb=0, init_duration_ms=None)

    assert f"\tBilled Duration: {billed_ms} ms\t" in line


def test_log_stream_name_has_the_day_version_and_instance() -> None:
    assert log_stream_name("$LATEST", "abc123", 86400 * 365) == "1971/01/01/[$LATEST]abc123"


# --- LogSink ------------------------------------------------------------------------------------


class RecordingWriter:
    """The store's batch writer: records batches; fails the next `fail_next` calls."""

    def __init__(self) -> None:
        self.batches: list[list[LogEvent]] = []
        self.fail_next = 0

    async def __call__(self, batch: Sequence[LogEvent]) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise ConnectionError("store unavailable")
        self.batches.append(list(batch))


def _event(message: str, *, stream: str = "s", invocation_id: str | None = "inv") -> LogEvent:
    return LogEvent("ws", "fn", stream, invocation_id, 1, message)


async def test_sink_writes_pending_events_in_one_batch() -> None:
    writer = RecordingWriter()
    sink = LogSink(writer, flush_interval_s=60.0, max_pending_bytes=1 << 20)
    events = [_event(f"line {n}") for n in range(3)]

    for event in events:
        sink.emit(event)
    assert sink.statistics() == LogSinkStatistics(
        pending_events=3, pending_bytes=3 * (6 + 64), written_events=0, dropped_events=0
    )
    await sink.flush()

    assert writer.batches == [events]
    assert sink.statistics() == LogSinkStatistics(pending_events=0, pending_bytes=0, written_events=3, dropped_events=0)


async def test_sink_flush_with_nothing_pending_writes_nothing() -> None:
    writer = RecordingWriter()
    sink = LogSink(writer, flush_interval_s=60.0, max_pending_bytes=1 << 20)

    await sink.flush()

    assert writer.batches == []


async def test_sink_drops_events_beyond_its_memory_bound_and_says_so() -> None:
    writer = RecordingWriter()
    sink = LogSink(writer, flush_interval_s=60.0, max_pending_bytes=200)  # room for two 10-char events

    for n in range(5):
        sink.emit(_event(f"message {n:02d}"))
    assert sink.statistics() == LogSinkStatistics(
        pending_events=2, pending_bytes=2 * 74, written_events=0, dropped_events=3
    )
    await sink.flush()

    [batch] = writer.batches
    assert [e.message for e in batch[:2]] == ["message 00", "message 01"]
    marker = batch[2]
    assert marker.message == "[hxb] 3 log lines dropped: the log store fell behind"
    assert (marker.workspace, marker.function, marker.stream, marker.invocation_id) == ("ws", "fn", "s", None)
    assert len(batch) == 3


async def test_sink_accepts_new_events_once_the_pending_ones_are_written() -> None:
    writer = RecordingWriter()
    sink = LogSink(writer, flush_interval_s=60.0, max_pending_bytes=200)
    for n in range(3):
        sink.emit(_event(f"message {n:02d}"))

    await sink.flush()
    sink.emit(_event("after flush"))

    assert sink.statistics().pending_events == 1
    assert sink.statistics().dropped_events == 1


async def test_sink_marks_drops_per_stream() -> None:
    writer = RecordingWriter()
    sink = LogSink(writer, flush_interval_s=60.0, max_pending_bytes=10)  # every event is dropped

    sink.emit(_event("a", stream="s1"))
    sink.emit(_event("b", stream="s2"))
    sink.emit(_event("c", stream="s2"))
    await sink.flush()

    assert sorted((e.stream, e.message) for e in writer.batches[0]) == [
        ("s1", "[hxb] 1 log lines dropped: the log store fell behind"),
        ("s2", "[hxb] 2 log lines dropped: the log store fell behind"),
    ]


async def test_sink_keeps_the_batch_when_the_writer_fails() -> None:
    writer = RecordingWriter()
    writer.fail_next = 1
    sink = LogSink(writer, flush_interval_s=60.0, max_pending_bytes=1 << 20)
    first = [_event("one"), _event("two")]
    for event in first:
        sink.emit(event)

    with pytest.raises(ConnectionError):
        await sink.flush()
    assert sink.statistics().pending_events == 2
    assert sink.statistics().written_events == 0
    later = _event("three")
    sink.emit(later)
    await sink.flush()

    assert writer.batches == [[*first, later]]
    assert sink.statistics() == LogSinkStatistics(pending_events=0, pending_bytes=0, written_events=3, dropped_events=0)


async def test_sink_background_task_flushes_on_its_interval_and_survives_failures(
    caplog: pytest.LogCaptureFixture,
) -> None:
    writer = RecordingWriter()
    writer.fail_next = 1
    sink = LogSink(writer, flush_interval_s=0.001, max_pending_bytes=1 << 20)
    sink.start()
    try:
        sink.emit(_event("one"))
        await wait_until(lambda: sink.statistics().written_events == 1)
    finally:
        await sink.close()

    assert writer.batches == [[_event("one")]]
    assert "writing logs to the store failed" in caplog.text


async def test_sink_close_flushes_what_is_pending() -> None:
    writer = RecordingWriter()
    sink = LogSink(writer, flush_interval_s=60.0, max_pending_bytes=1 << 20)
    sink.start()
    sink.emit(_event("last words"))

    await sink.close()

    assert writer.batches == [[_event("last words")]]
