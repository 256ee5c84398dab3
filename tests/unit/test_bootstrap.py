"""The Python bootstrap, driven in this process: handler loading and its init errors, the
context object, and invocations over a socketpair (frames decoded by the platform's decoder).

`run_instance` is not called here: it installs a handler on the root logger and changes the
working directory, which would leak into the other tests.
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import io
import json
import socket
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import pytest

from hxb.pool.wire import Frame, FrameDecoder, FrameType, encode_frame

# --- loading the handler -------------------------------------------------------------------------


class WriteModule(Protocol):
    def __call__(self, source: str, *, package: str = "") -> str: ...


@pytest.fixture
def user_code(tmp_path: Path) -> Iterator[WriteModule]:
    """Writes a module of user code under a fresh name into a directory on sys.path; returns
    the module name. The directory and the imported modules are forgotten afterwards."""
    root = tmp_path / "task"
    root.mkdir()
    sys.path.insert(0, str(root))
    names: list[str] = []

    def write(source: str, *, package: str = "") -> str:
        name = f"user_{uuid.uuid4().hex[:12]}"
        directory = root / package if package else root
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"{name}.py").write_text(textwrap.dedent(source))
        importlib.invalidate_caches()
        dotted = f"{package.replace('/', '.')}.{name}" if package else name
        names.append(dotted)
        return dotted

    yield write
    sys.path.remove(str(root))
    for name in list(sys.modules):
        module_file = getattr(sys.modules[name], "__file__", None) or ""
        if module_file.startswith(str(root)):
            del sys.modules[name]


def test_load_handler_returns_the_function(bootstrap: ModuleType, user_code: WriteModule) -> None:
    module = user_code("def handler(event, context):\n    return 'hi'\n")

    handler = bootstrap.load_handler(f"{module}.handler")

    assert handler(None, None) == "hi"


def test_load_handler_accepts_a_slash_path(bootstrap: ModuleType, user_code: WriteModule) -> None:
    module = user_code("def main(event, context):\n    return 'nested'\n", package="src/app")

    handler = bootstrap.load_handler(f"{module.replace('.', '/')}.main")

    assert handler(None, None) == "nested"


def test_load_handler_missing_module_is_import_module_error(bootstrap: ModuleType) -> None:
    with pytest.raises(bootstrap.InitFailure) as caught:
        bootstrap.load_handler("no_such_module_hxb.handler")

    assert caught.value.error_type == "Runtime.ImportModuleError"
    assert caught.value.message == (
        "Unable to import module 'no_such_module_hxb': No module named 'no_such_module_hxb'"
    )


def test_load_handler_missing_dependency_is_import_module_error(bootstrap: ModuleType, user_code: WriteModule) -> None:
    module = user_code("import no_such_dependency_hxb\n\ndef handler(event, context):\n    pass\n")

    with pytest.raises(bootstrap.InitFailure) as caught:
        bootstrap.load_handler(f"{module}.handler")

    assert caught.value.error_type == "Runtime.ImportModuleError"
    assert "No module named 'no_such_dependency_hxb'" in caught.value.message


def test_load_handler_syntax_error_is_user_code_syntax_error(bootstrap: ModuleType, user_code: WriteModule) -> None:
    module = user_code("def handler(event, context:\n    return 1\n")

    with pytest.raises(bootstrap.InitFailure) as caught:
        bootstrap.load_handler(f"{module}.handler")

    assert caught.value.error_type == "Runtime.UserCodeSyntaxError"
    assert caught.value.message.startswith(f"Syntax error in module '{module}': ")


def test_load_handler_missing_function_is_handler_not_found(bootstrap: ModuleType, user_code: WriteModule) -> None:
    module = user_code("def other(event, context):\n    pass\n")

    with pytest.raises(bootstrap.InitFailure) as caught:
        bootstrap.load_handler(f"{module}.handler")

    assert caught.value.error_type == "Runtime.HandlerNotFound"
    assert caught.value.message == f"Handler 'handler' missing on module '{module}'"


def test_load_handler_not_callable_is_handler_not_found(bootstrap: ModuleType, user_code: WriteModule) -> None:
    module = user_code("handler = 42\n")

    with pytest.raises(bootstrap.InitFailure) as caught:
        bootstrap.load_handler(f"{module}.handler")

    assert caught.value.error_type == "Runtime.HandlerNotFound"
    assert "is not callable" in caught.value.message


@pytest.mark.parametrize("spec", ["handler", ".handler", "index.", ""])
def test_load_handler_malformed_name(bootstrap: ModuleType, spec: str) -> None:
    with pytest.raises(bootstrap.InitFailure) as caught:
        bootstrap.load_handler(spec)

    assert caught.value.error_type == "Runtime.MalformedHandlerName"
    assert caught.value.message.startswith(f"Bad handler '{spec}': ")


def test_load_handler_exception_at_import_reports_its_type(bootstrap: ModuleType, user_code: WriteModule) -> None:
    module = user_code(
        """\
        def configure():
            raise ValueError("DATABASE_URL is not set")

        configure()

        def handler(event, context):
            pass
        """
    )

    with pytest.raises(bootstrap.InitFailure) as caught:
        bootstrap.load_handler(f"{module}.handler")

    failure = caught.value
    assert (failure.error_type, failure.message) == ("ValueError", "DATABASE_URL is not set")
    assert failure.stack, "the user's frames are reported"
    assert any(f"{module}.py" in entry and "configure" in entry for entry in failure.stack)
    assert not any("_hxb_bootstrap" in entry for entry in failure.stack)


def test_load_handler_exception_at_import_stack_has_only_the_users_frames(
    bootstrap: ModuleType, user_code: WriteModule
) -> None:
    module = user_code("def configure():\n    raise ValueError('no')\n\nconfigure()\n")

    with pytest.raises(bootstrap.InitFailure) as caught:
        bootstrap.load_handler(f"{module}.handler")

    # `_frames` promises "the user's part of a traceback": the import machinery is not.
    files = [Path(entry.split('"')[1]).name for entry in caught.value.stack]
    assert files == [f"{module}.py", f"{module}.py"]


# --- the context ---------------------------------------------------------------------------------


@pytest.fixture
def lambda_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {
        "AWS_LAMBDA_FUNCTION_NAME": "echo",
        "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "256",
        "AWS_LAMBDA_LOG_GROUP_NAME": "/hxb/functions/default/echo",
        "AWS_LAMBDA_LOG_STREAM_NAME": "2024/01/01/[$LATEST]abc",
    }.items():
        monkeypatch.setenv(key, value)


ARN = "arn:hxb:lambda:local:default:function:echo"


@pytest.mark.usefixtures("lambda_env")
def test_context_has_lambdas_fields(bootstrap: ModuleType) -> None:
    client_context = {"client": {"app_title": "demo", "installation_id": "i-1"}, "custom": {"k": 1}, "env": {"os": "x"}}
    identity = {"cognitoIdentityId": "id-1", "cognitoIdentityPoolId": "pool-1"}

    ctx = bootstrap.LambdaContext("inv-1", time.time() * 1000 + 5000, ARN, client_context, identity)

    assert ctx.aws_request_id == "inv-1"
    assert ctx.function_name == "echo"
    assert ctx.function_version == "$LATEST"
    assert ctx.memory_limit_in_mb == "256"
    assert ctx.log_group_name == "/hxb/functions/default/echo"
    assert ctx.log_stream_name == "2024/01/01/[$LATEST]abc"
    assert ctx.invoked_function_arn == ARN
    assert ctx.client_context.client.app_title == "demo"
    assert ctx.client_context.client.installation_id == "i-1"
    assert ctx.client_context.custom == {"k": 1}
    assert ctx.client_context.env == {"os": "x"}
    assert ctx.identity.cognito_identity_id == "id-1"
    assert ctx.identity.cognito_identity_pool_id == "pool-1"


@pytest.mark.usefixtures("lambda_env")
def test_context_camel_case_names_alias_the_python_ones(bootstrap: ModuleType) -> None:
    ctx = bootstrap.LambdaContext("inv-2", time.time() * 1000 + 5000, ARN, {"custom": {}}, None)

    assert ctx.requestId == ctx.request_id == "inv-2"
    assert ctx.functionName == "echo"
    assert ctx.functionVersion == "$LATEST"
    assert ctx.invokedFunctionArn == ARN
    assert ctx.memoryLimitInMB == "256"
    assert ctx.logGroupName == "/hxb/functions/default/echo"
    assert ctx.logStreamName == "2024/01/01/[$LATEST]abc"
    assert ctx.clientContext is ctx.client_context
    assert 0 < ctx.getRemainingTimeInMillis() <= 5000


def test_context_without_client_context_or_identity(bootstrap: ModuleType) -> None:
    ctx = bootstrap.LambdaContext("inv-3", 0, ARN, None, None)

    assert ctx.client_context is None
    assert ctx.identity.cognito_identity_id is None


def test_remaining_time_counts_down_to_zero(bootstrap: ModuleType) -> None:
    ctx = bootstrap.LambdaContext("inv-4", time.time() * 1000 + 5000, ARN, None, None)

    first = ctx.get_remaining_time_in_millis()
    time.sleep(0.003)
    second = ctx.get_remaining_time_in_millis()

    assert 4900 < first <= 5000
    assert second < first
    expired = bootstrap.LambdaContext("inv-5", time.time() * 1000 - 10, ARN, None, None)
    assert expired.get_remaining_time_in_millis() == 0


# --- invoking ------------------------------------------------------------------------------------


class Channel:
    """Both ends of the private channel; `platform` reads with the platform's decoder."""

    def __init__(self) -> None:
        self.runtime, self.platform = socket.socketpair()
        self.platform.settimeout(5.0)
        self._decoder = FrameDecoder(max_body_bytes=8 * 1024 * 1024)
        self._frames: list[Frame] = []

    def read_frame(self) -> Frame:
        while not self._frames:
            data = self.platform.recv(65536)
            assert data, "the runtime closed the channel"
            self._frames += self._decoder.feed(data)
        return self._frames.pop(0)

    def close(self) -> None:
        self.runtime.close()
        self.platform.close()


@pytest.fixture
def channel() -> Iterator[Channel]:
    ch = Channel()
    yield ch
    ch.close()


MakeRuntime = Callable[[Callable[..., Any]], Any]


@pytest.fixture
def make_runtime(bootstrap: ModuleType, channel: Channel) -> Iterator[MakeRuntime]:
    made: list[Any] = []

    def make(handler: Callable[..., Any]) -> Any:
        runtime = bootstrap.Runtime(channel.runtime, handler)
        made.append(runtime)
        return runtime

    yield make
    for runtime in made:
        runtime.rfile.close()
        if runtime.async_runner is not None:
            runtime.async_runner.loop.close()
            asyncio.set_event_loop(None)


def meta(invocation_id: str = "inv-1", **extra: Any) -> dict[str, Any]:
    return {"id": invocation_id, "deadline_ms": time.time() * 1000 + 3000, "arn": ARN, "cc": None, **extra}


def test_invoke_sync_handler_sends_its_result(make_runtime: MakeRuntime, channel: Channel) -> None:
    def handler(event: Any, context: Any) -> Any:
        return {"echo": event, "id": context.aws_request_id, "arn": context.invoked_function_arn}

    make_runtime(handler).invoke(meta("inv-1"), b'{"n": 1}')

    frame = channel.read_frame()
    assert (frame.type, frame.meta) == (FrameType.RESULT, b"inv-1")
    assert json.loads(frame.body) == {"echo": {"n": 1}, "id": "inv-1", "arn": ARN}


def test_invoke_with_empty_body_passes_none(make_runtime: MakeRuntime, channel: Channel) -> None:
    make_runtime(lambda event, context: {"event": event}).invoke(meta(), b"")

    assert json.loads(channel.read_frame().body) == {"event": None}


def test_invoke_passes_the_client_context(make_runtime: MakeRuntime, channel: Channel) -> None:
    def handler(event: Any, context: Any) -> Any:
        return context.client_context.custom

    make_runtime(handler).invoke(meta(cc={"custom": {"tenant": "t1"}}), b"{}")

    assert json.loads(channel.read_frame().body) == {"tenant": "t1"}


def test_invoke_async_handler_runs_on_one_loop_across_invocations(make_runtime: MakeRuntime, channel: Channel) -> None:
    loops: list[asyncio.AbstractEventLoop] = []

    async def handler(event: Any, context: Any) -> Any:
        await asyncio.sleep(0)
        loops.append(asyncio.get_running_loop())
        return {"async": event}

    runtime = make_runtime(handler)
    runtime.invoke(meta("inv-a"), b"1")
    runtime.invoke(meta("inv-b"), b"2")

    assert [json.loads(channel.read_frame().body) for _ in range(2)] == [{"async": 1}, {"async": 2}]
    assert loops[0] is loops[1]


def test_invoke_result_with_decimals_is_json_numbers(make_runtime: MakeRuntime, channel: Channel) -> None:
    make_runtime(lambda event, context: {"price": Decimal("1.50"), "count": Decimal("2")}).invoke(meta(), b"{}")

    frame = channel.read_frame()
    assert frame.type == FrameType.RESULT
    assert frame.body == b'{"price":1.5,"count":2}'


def test_invoke_unserialisable_result_is_a_marshal_error(make_runtime: MakeRuntime, channel: Channel) -> None:
    make_runtime(lambda event, context: {"when": object()}).invoke(meta("inv-m"), b"{}")

    frame = channel.read_frame()
    doc = json.loads(frame.body)
    assert (frame.type, frame.meta) == (FrameType.ERROR, b"inv-m")
    assert doc["errorType"] == "Runtime.MarshalError"
    assert doc["errorMessage"] == "Unable to marshal response: Object of type object is not JSON serializable"
    assert doc["requestId"] == "inv-m"


def test_invoke_oversized_result_is_refused_by_the_runtime(
    bootstrap: ModuleType, make_runtime: MakeRuntime, channel: Channel
) -> None:
    make_runtime(lambda event, context: "x" * bootstrap.MAX_RESPONSE_BYTES).invoke(meta(), b"{}")

    frame = channel.read_frame()
    assert frame.type == FrameType.ERROR
    assert json.loads(frame.body)["errorType"] == "Function.ResponseSizeTooLarge"


def test_invoke_raising_handler_sends_an_error_without_bootstrap_frames(
    bootstrap: ModuleType,
    user_code: WriteModule,
    make_runtime: MakeRuntime,
    channel: Channel,
    capsys: pytest.CaptureFixture[str],
) -> None:
    module = user_code(
        """\
        def lookup(event):
            return event["missing"]

        def handler(event, context):
            return lookup(event)
        """
    )
    handler = bootstrap.load_handler(f"{module}.handler")

    make_runtime(handler).invoke(meta("inv-e"), b"{}")

    frame = channel.read_frame()
    doc = json.loads(frame.body)
    assert (frame.type, frame.meta) == (FrameType.ERROR, b"inv-e")
    assert (doc["errorType"], doc["errorMessage"], doc["requestId"]) == ("KeyError", "'missing'", "inv-e")
    assert len(doc["stackTrace"]) == 2
    assert "in handler\n    return lookup(event)\n" in doc["stackTrace"][0]
    assert 'in lookup\n    return event["missing"]\n' in doc["stackTrace"][1]
    assert not any("_hxb_bootstrap" in entry for entry in doc["stackTrace"])
    # The error is logged as one record: inner newlines travel as CR.
    record = capsys.readouterr().err
    assert record.count("\n") == 1
    assert record.endswith("\n")
    assert record.startswith("[ERROR] KeyError: 'missing'\rTraceback (most recent call last):\r")


def test_serve_forever_answers_invocations_until_the_platform_hangs_up(
    make_runtime: MakeRuntime, channel: Channel
) -> None:
    for n in range(2):
        channel.platform.sendall(encode_frame(FrameType.INVOKE, json.dumps(meta(f"inv-{n}")).encode(), b"%d" % n))
    channel.platform.shutdown(socket.SHUT_WR)

    make_runtime(lambda event, context: event * 10).serve_forever()

    assert [channel.read_frame() for _ in range(2)] == [
        Frame(FrameType.RESULT, b"inv-0", b"0"),
        Frame(FrameType.RESULT, b"inv-1", b"10"),
    ]


def test_serve_forever_exits_on_an_unexpected_frame(make_runtime: MakeRuntime, channel: Channel) -> None:
    channel.platform.sendall(encode_frame(FrameType.RESULT, b"x", b""))

    with pytest.raises(SystemExit, match="unexpected frame type 12"):
        make_runtime(lambda event, context: None).serve_forever()


# --- several invocations at once (concurrency_per_instance > 1) ----------------------------------


def test_check_concurrency_refuses_a_sync_handler_above_one(bootstrap: ModuleType) -> None:
    async def async_handler(event: Any, context: Any) -> Any:
        return None

    def sync_handler(event: Any, context: Any) -> Any:
        return None

    bootstrap.check_concurrency(sync_handler, "index.handler", 1)
    bootstrap.check_concurrency(async_handler, "index.handler", 8)
    with pytest.raises(bootstrap.InitFailure) as caught:
        bootstrap.check_concurrency(sync_handler, "index.handler", 8)

    assert caught.value.error_type == "Runtime.InvalidConcurrency"
    assert caught.value.message.startswith(
        "Handler 'index.handler' is not an async def function, but concurrency_per_instance is 8"
    )


def _in_invocation(bootstrap: ModuleType, request_id: str, fn: Callable[[], Any]) -> Any:
    """Runs `fn` as the task of invocation `request_id` would: in a context of its own."""
    ctx = contextvars.copy_context()
    ctx.run(bootstrap._request_id_var.set, request_id)
    return ctx.run(fn)


def test_tagged_stream_writes_whole_lines_tagged_with_their_invocation(bootstrap: ModuleType) -> None:
    raw = io.StringIO()
    stream = bootstrap._TaggedStream(raw)

    _in_invocation(bootstrap, "inv-a", lambda: stream.write("half of a, "))
    _in_invocation(bootstrap, "inv-b", lambda: stream.write("b one\nb two\n"))
    _in_invocation(bootstrap, "inv-a", lambda: stream.write("other half\nstart of a's last"))
    stream.write("the instance's own\n")
    stream.end("inv-a")

    tag = bootstrap.LOG_TAG
    assert raw.getvalue().splitlines() == [
        f"{tag}inv-b{tag}b one",
        f"{tag}inv-b{tag}b two",
        f"{tag}inv-a{tag}half of a, other half",
        "the instance's own",
        f"{tag}inv-a{tag}start of a's last",
    ]


def test_tagged_stream_flush_ends_the_current_line(bootstrap: ModuleType) -> None:
    raw = io.StringIO()
    stream = bootstrap._TaggedStream(raw)

    def write_and_flush() -> None:
        print("no newline", end="", file=stream, flush=True)

    _in_invocation(bootstrap, "inv-f", write_and_flush)

    assert raw.getvalue() == f"{bootstrap.LOG_TAG}inv-f{bootstrap.LOG_TAG}no newline\n"
    assert stream.encoding == raw.encoding  # everything else is the real stream's


@pytest.fixture
def make_concurrent_runtime(bootstrap: ModuleType, channel: Channel) -> Iterator[Callable[..., Any]]:
    made: list[Any] = []

    def make(handler: Callable[..., Any], concurrency: int, streams: tuple[Any, ...] = ()) -> Any:
        runtime = bootstrap.ConcurrentRuntime(channel.runtime, handler, concurrency, streams)
        made.append(runtime)
        return runtime

    yield make
    for runtime in made:
        runtime.rfile.close()
        if runtime.async_runner is not None:
            runtime.async_runner.loop.close()
            asyncio.set_event_loop(None)


def _send_invokes(channel: Channel, metas: list[dict[str, Any]]) -> None:
    for m in metas:
        channel.platform.sendall(encode_frame(FrameType.INVOKE, json.dumps(m).encode(), b"{}"))
    channel.platform.shutdown(socket.SHUT_WR)


def test_concurrent_runtime_runs_invocations_at_once_each_with_its_own_context(
    make_concurrent_runtime: Callable[..., Any], channel: Channel
) -> None:
    started: list[str] = []
    all_in = asyncio.Event()

    async def handler(event: Any, context: Any) -> Any:
        started.append(context.aws_request_id)
        if len(started) == 3:
            all_in.set()
        # Only returns once all three run at the same time.
        await asyncio.wait_for(all_in.wait(), 5)
        return {"id": context.aws_request_id, "remaining_ms": context.get_remaining_time_in_millis()}

    now_ms = time.time() * 1000
    _send_invokes(
        channel,
        [meta("inv-1", deadline_ms=now_ms + 1000), meta("inv-2", deadline_ms=now_ms + 5000), meta("inv-3")],
    )
    make_concurrent_runtime(handler, 3).serve_forever()

    frames = {f.meta: json.loads(f.body) for f in (channel.read_frame() for _ in range(3))}
    assert sorted(frames) == [b"inv-1", b"inv-2", b"inv-3"]
    assert all(frames[key]["id"] == key.decode() for key in frames)
    assert 0 < frames[b"inv-1"]["remaining_ms"] <= 1000 < frames[b"inv-2"]["remaining_ms"] <= 5000


def test_concurrent_runtime_answers_errors_with_their_own_id(
    make_concurrent_runtime: Callable[..., Any], channel: Channel, capsys: pytest.CaptureFixture[str]
) -> None:
    async def handler(event: Any, context: Any) -> Any:
        await asyncio.sleep(0)
        if context.aws_request_id == "inv-bad":
            raise ValueError("bad one")
        if context.aws_request_id == "inv-cancel":
            raise asyncio.CancelledError
        return "fine"

    _send_invokes(channel, [meta("inv-bad"), meta("inv-good"), meta("inv-cancel")])
    make_concurrent_runtime(handler, 3).serve_forever()

    frames = {f.meta: f for f in (channel.read_frame() for _ in range(3))}
    assert frames[b"inv-good"] == Frame(FrameType.RESULT, b"inv-good", b'"fine"')
    for rid, error_type in ((b"inv-bad", "ValueError"), (b"inv-cancel", "CancelledError")):
        doc = json.loads(frames[rid].body)
        assert frames[rid].type == FrameType.ERROR
        assert (doc["requestId"], doc["errorType"]) == (rid.decode(), error_type)


def test_concurrent_runtime_sends_an_invocations_output_whole_before_its_answer(
    bootstrap: ModuleType,
    make_concurrent_runtime: Callable[..., Any],
    channel: Channel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    raw = io.StringIO()
    stdout = bootstrap._TaggedStream(raw)
    monkeypatch.setattr(sys, "stdout", stdout)
    answered_with_output: dict[str, str] = {}

    async def handler(event: Any, context: Any) -> Any:
        print("hello from", context.aws_request_id)
        await asyncio.sleep(0)
        print("bye from", context.aws_request_id, end="")
        return None

    runtime = make_concurrent_runtime(handler, 2, (stdout,))

    def record(frame_type: int, meta_bytes: bytes, body: bytes) -> None:
        bootstrap.ConcurrentRuntime.send(runtime, frame_type, meta_bytes, body)
        # Nothing ran in between: what was written now is what went out before the frame.
        answered_with_output[meta_bytes.decode()] = raw.getvalue()

    runtime.send = record
    _send_invokes(channel, [meta("inv-x"), meta("inv-y")])
    runtime.serve_forever()

    tag = bootstrap.LOG_TAG
    assert sorted(raw.getvalue().splitlines()) == sorted(
        f"{tag}{rid}{tag}{text} from {rid}" for rid in ("inv-x", "inv-y") for text in ("hello", "bye")
    )
    # Each answer went out after its own last (unfinished) line.
    for rid in ("inv-x", "inv-y"):
        assert f"{tag}{rid}{tag}bye from {rid}\n" in answered_with_output[rid]
