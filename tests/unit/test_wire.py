"""The pool's frame decoder, and agreement of its wire format with the Python bootstrap's."""

from __future__ import annotations

from types import ModuleType

import pytest

from hxb.config import PoolSettings
from hxb.errors import ResponseTooLargeError, RuntimeProtocolError
from hxb.pool.wire import (
    HEADER,
    LOG_TAG,
    MAX_ERROR_BYTES,
    MAX_META_BYTES,
    Frame,
    FrameDecoder,
    FrameType,
    encode_frame,
)


def test_decoder_assembles_a_frame_fed_byte_by_byte() -> None:
    decoder = FrameDecoder(max_body_bytes=1024)
    data = encode_frame(FrameType.RESULT, b"inv-1", b'{"ok":true}')

    frames: list[Frame] = []
    for i in range(len(data)):
        frames += decoder.feed(data[i : i + 1])

    assert frames == [Frame(FrameType.RESULT, b"inv-1", b'{"ok":true}')]


def test_decoder_returns_nothing_until_the_body_is_complete() -> None:
    decoder = FrameDecoder(max_body_bytes=1024)
    data = encode_frame(FrameType.ERROR, b"inv-2", b"x" * 100)

    assert decoder.feed(data[:-1]) == []
    assert decoder.feed(data[-1:]) == [Frame(FrameType.ERROR, b"inv-2", b"x" * 100)]


def test_decoder_returns_every_frame_of_one_feed_in_order() -> None:
    decoder = FrameDecoder(max_body_bytes=1024)
    data = (
        encode_frame(FrameType.READY, b"", b"")
        + encode_frame(FrameType.RESULT, b"a", b"1")
        + encode_frame(FrameType.ERROR, b"b", b"{}")
        + encode_frame(FrameType.RESULT, b"c", b"")[:5]
    )

    frames = decoder.feed(data)

    assert frames == [
        Frame(FrameType.READY, b"", b""),
        Frame(FrameType.RESULT, b"a", b"1"),
        Frame(FrameType.ERROR, b"b", b"{}"),
    ]
    assert decoder.feed(encode_frame(FrameType.RESULT, b"c", b"")[5:]) == [Frame(FrameType.RESULT, b"c", b"")]


def test_decoder_refuses_an_unknown_frame_type() -> None:
    decoder = FrameDecoder(max_body_bytes=1024)

    with pytest.raises(RuntimeProtocolError, match="unknown frame type 99"):
        decoder.feed(HEADER.pack(99, 0, 0))


def test_decoder_refuses_an_invoke_frame_from_the_runtime() -> None:
    decoder = FrameDecoder(max_body_bytes=1024)

    with pytest.raises(RuntimeProtocolError, match="INVOKE frame, which only the platform sends"):
        decoder.feed(encode_frame(FrameType.INVOKE, b"{}", b""))


def test_decoder_refuses_metadata_over_the_limit() -> None:
    decoder = FrameDecoder(max_body_bytes=1024)

    with pytest.raises(RuntimeProtocolError, match="metadata"):
        decoder.feed(HEADER.pack(FrameType.RESULT, MAX_META_BYTES + 1, 0))


def test_decoder_accepts_metadata_at_the_limit() -> None:
    decoder = FrameDecoder(max_body_bytes=1024)
    meta = b"m" * MAX_META_BYTES

    assert decoder.feed(encode_frame(FrameType.RESULT, meta, b"")) == [Frame(FrameType.RESULT, meta, b"")]


def test_decoder_refuses_a_large_result_from_its_header_alone() -> None:
    decoder = FrameDecoder(max_body_bytes=1024)

    # Only the header arrives: the 4 GB body is never waited for (nor buffered).
    with pytest.raises(ResponseTooLargeError) as caught:
        decoder.feed(HEADER.pack(FrameType.RESULT, 5, 0xFFFF_FFFF))

    assert caught.value.size_bytes == 0xFFFF_FFFF
    assert caught.value.limit_bytes == 1024
    assert caught.value.error_type == "Function.ResponseSizeTooLarge"


def test_decoder_refuses_a_result_one_byte_over_the_limit() -> None:
    decoder = FrameDecoder(max_body_bytes=1024)

    with pytest.raises(ResponseTooLargeError):
        decoder.feed(HEADER.pack(FrameType.RESULT, 1, 1025))


def test_decoder_accepts_a_result_at_the_limit() -> None:
    decoder = FrameDecoder(max_body_bytes=1024)

    assert decoder.feed(encode_frame(FrameType.RESULT, b"r", b"x" * 1024)) == [
        Frame(FrameType.RESULT, b"r", b"x" * 1024)
    ]


@pytest.mark.parametrize("frame_type", [FrameType.ERROR, FrameType.INIT_ERROR])
def test_decoder_refuses_an_error_document_over_the_limit(frame_type: FrameType) -> None:
    decoder = FrameDecoder(max_body_bytes=MAX_ERROR_BYTES * 4)

    with pytest.raises(RuntimeProtocolError, match="error document"):
        decoder.feed(HEADER.pack(frame_type, 0, MAX_ERROR_BYTES + 1))


def test_encode_frame_writes_header_meta_then_body() -> None:
    data = encode_frame(FrameType.INVOKE, b"meta", b"body")

    assert data == bytes([1]) + (4).to_bytes(4, "little") + (4).to_bytes(4, "little") + b"metabody"


def test_header_matches_the_bootstraps(bootstrap: ModuleType) -> None:
    assert bootstrap.HEADER.format == HEADER.format
    assert bootstrap.HEADER.size == HEADER.size == 9


def test_frame_types_match_the_bootstraps(bootstrap: ModuleType) -> None:
    theirs = {name[2:]: value for name, value in vars(bootstrap).items() if name.startswith("T_")}

    assert theirs == {t.name: t.value for t in FrameType}


def test_response_limit_matches_the_bootstraps(bootstrap: ModuleType) -> None:
    assert PoolSettings().max_response_bytes == bootstrap.MAX_RESPONSE_BYTES


def test_log_tag_matches_the_bootstraps(bootstrap: ModuleType) -> None:
    assert bootstrap.LOG_TAG == LOG_TAG


def test_ready_frame_with_a_body_is_refused_before_it_is_buffered() -> None:
    decoder = FrameDecoder(max_body_bytes=1024)
    with pytest.raises(RuntimeProtocolError, match="READY"):
        decoder.feed(HEADER.pack(FrameType.READY, 0, 0xFFFFFFF0))
