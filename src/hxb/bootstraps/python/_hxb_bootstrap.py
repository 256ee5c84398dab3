"""The hxb Python runtime: runs inside an instance, imports the handler once, then serves
invocations over the platform's private channel: one at a time, or, for an `async def` handler
with `concurrency_per_instance` N > 1, up to N at once as tasks on one event loop.

This file runs on every CPython the host offers (3.7 and later): keep to 3.7 syntax and the
standard library. Its wire format is mirrored by `hxb.pool.wire`; tests check the two agree.

Frames, both ways: a 9-byte header `<BII` (type, meta length, body length), then meta, then
body. Platform -> runtime: INVOKE (meta = JSON, body = the event bytes). Runtime -> platform:
READY, INIT_ERROR (body = error document), RESULT (meta = request id, body = JSON result),
ERROR (meta = request id, body = error document).

Output of an instance serving several invocations at once is tagged per line: `\x1f<request
id>\x1f<text>` (`LOG_TAG`), so the platform can give each line to its invocation.
"""

import contextlib
import contextvars
import json
import os
import struct
import sys
import time

HEADER = struct.Struct("<BII")
T_INVOKE = 1
T_READY = 10
T_INIT_ERROR = 11
T_RESULT = 12
T_ERROR = 13

# Lambda's limit for a synchronous response; the platform enforces it too (the guest is not trusted).
MAX_RESPONSE_BYTES = 6 * 1024 * 1024
MAX_ERROR_MESSAGE_CHARS = 256 * 1024
MAX_STACK_FRAMES = 50
_CO_COROUTINE = 0x0080
_LEVELS = {"DEBUG": 10, "INFO": 20, "WARN": 30, "WARNING": 30, "ERROR": 40}
# Starts (and ends) the request id on a line written by one of several concurrent invocations.
# A control character: ordinary output never starts with it. Mirrored by `hxb.pool.wire.LOG_TAG`.
LOG_TAG = "\x1f"


class InitFailure(Exception):
    def __init__(self, error_type, message, stack=None):
        Exception.__init__(self, message)
        self.error_type = error_type
        self.message = message
        self.stack = stack or []


class CognitoIdentity(object):
    __slots__ = ("cognito_identity_id", "cognito_identity_pool_id")

    def __init__(self, data):
        data = data or {}
        self.cognito_identity_id = data.get("cognitoIdentityId")
        self.cognito_identity_pool_id = data.get("cognitoIdentityPoolId")


class Client(object):
    __slots__ = ("installation_id", "app_title", "app_version_name", "app_version_code", "app_package_name")

    def __init__(self, data):
        self.installation_id = data.get("installation_id")
        self.app_title = data.get("app_title")
        self.app_version_name = data.get("app_version_name")
        self.app_version_code = data.get("app_version_code")
        self.app_package_name = data.get("app_package_name")


class ClientContext(object):
    __slots__ = ("client", "custom", "env")

    def __init__(self, data):
        client = data.get("client")
        self.client = Client(client) if isinstance(client, dict) else None
        self.custom = data.get("custom")
        self.env = data.get("env")


class LambdaContext(object):
    """What the handler receives as `context`: Lambda's Python names, plus the seed's
    camelCase names as aliases (`requestId`, `getRemainingTimeInMillis`, ...)."""

    def __init__(self, request_id, deadline_ms, invoked_function_arn, client_context, identity):
        env = os.environ
        self.aws_request_id = request_id
        self.function_name = env.get("AWS_LAMBDA_FUNCTION_NAME")
        self.function_version = env.get("AWS_LAMBDA_FUNCTION_VERSION")
        self.memory_limit_in_mb = env.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE")
        self.log_group_name = env.get("AWS_LAMBDA_LOG_GROUP_NAME")
        self.log_stream_name = env.get("AWS_LAMBDA_LOG_STREAM_NAME")
        self.invoked_function_arn = invoked_function_arn
        self.client_context = ClientContext(client_context) if isinstance(client_context, dict) else None
        self.identity = CognitoIdentity(identity)
        self._deadline_ms = deadline_ms

    def get_remaining_time_in_millis(self):
        return max(int(self._deadline_ms - time.time() * 1000), 0)

    @property
    def request_id(self):
        return self.aws_request_id

    # The seed documents these camelCase names; they alias the Python ones.
    requestId = request_id

    @property
    def functionName(self):
        return self.function_name

    @property
    def functionVersion(self):
        return self.function_version

    @property
    def invokedFunctionArn(self):
        return self.invoked_function_arn

    @property
    def memoryLimitInMB(self):
        return self.memory_limit_in_mb

    @property
    def logGroupName(self):
        return self.log_group_name

    @property
    def logStreamName(self):
        return self.log_stream_name

    @property
    def clientContext(self):
        return self.client_context

    def getRemainingTimeInMillis(self):
        return self.get_remaining_time_in_millis()

    def __repr__(self):
        return "<LambdaContext request_id={} function={} version={}>".format(
            self.aws_request_id, self.function_name, self.function_version
        )


# --- logging ------------------------------------------------------------------------------------

_current_request_id = [""]


_LOG_HANDLER = []


def prepare_logging():
    """Installs the runtime's log handler ahead of the function (a zygote's child does it
    before it knows its function); `_install_logging` then only sets the level."""
    _install_logging("INFO")


def _install_logging(level_name):
    import logging

    root = logging.getLogger()
    if _LOG_HANDLER:
        root.setLevel(_LEVELS.get(level_name.upper(), 20))
        return

    class _RequestIdFilter(logging.Filter):
        def filter(self, record):
            record.aws_request_id = _current_request_id[0]
            return True

    class _Formatter(logging.Formatter):
        def formatTime(self, record, datefmt=None):
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            return "{}.{:03d}Z".format(stamp, int(record.msecs))

        def format(self, record):
            # One record per line on the log pipe: embedded newlines travel as CR and the
            # platform turns them back, so a traceback stays one log event (as in Lambda).
            return logging.Formatter.format(self, record).replace("\n", "\r")

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter("[%(levelname)s]\t%(asctime)s\t%(aws_request_id)s\t%(message)s"))
    handler.addFilter(_RequestIdFilter())
    _LOG_HANDLER.append(handler)
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_LEVELS.get(level_name.upper(), 20))


_request_id_var = contextvars.ContextVar("hxb_request_id", default="")


class _TaggedStream(object):
    """`sys.stdout` / `sys.stderr` of an instance serving several invocations at once. Each line
    goes out whole, tagged with the request id of the invocation whose task wrote it (a task
    runs in a context of its own, so `_request_id_var` says whose it is); lines written outside
    any invocation go out untagged. A line ends at a newline, at `flush()`, or when its
    invocation ends (`end`), so two tasks' half lines never merge into one."""

    def __init__(self, stream):
        self._stream = stream
        self._partial = {}  # request id ("" outside invocations) -> its unfinished line
        # Threads the handler started write here too.
        import threading

        self._lock = threading.RLock()  # a signal handler may print mid-write

    def write(self, text):
        request_id = _request_id_var.get()
        with self._lock:
            pending = self._partial.pop(request_id, "") + text
            head, newline, rest = pending.rpartition("\n")
            if rest:
                self._partial[request_id] = rest
            if newline:
                self._emit(request_id, head)
        return len(text)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        self.end(_request_id_var.get())
        self._stream.flush()

    def end(self, request_id):
        """Sends the invocation's unfinished line, if any (before its answer goes out)."""
        with self._lock:
            rest = self._partial.pop(request_id, "")
            if rest:
                self._emit(request_id, rest)

    def _emit(self, request_id, text):
        # `text` is one or more whole lines without the last newline.
        if request_id:
            tag = LOG_TAG + request_id + LOG_TAG
            text = tag + text.replace("\n", "\n" + tag)
        self._stream.write(text + "\n")

    def __getattr__(self, name):
        # encoding, fileno(), isatty(), buffer, ...: what the real stream has. Bytes written to
        # `buffer` or the fd bypass the tagging and land in the instance's log.
        return getattr(self._stream, name)


def _tag_output_per_invocation():
    """Installs `_TaggedStream`s as stdout and stderr, and points the log handler at them with
    each record's request id taken from the task's context. Returns the two streams."""
    import logging

    out, err = _TaggedStream(sys.stdout), _TaggedStream(sys.stderr)
    sys.stdout, sys.stderr = out, err

    class _TaskRequestIdFilter(logging.Filter):
        def filter(self, record):
            record.aws_request_id = _request_id_var.get()
            return True

    for handler in _LOG_HANDLER:
        handler.setStream(err)
        for old in list(handler.filters):
            handler.removeFilter(old)
        handler.addFilter(_TaskRequestIdFilter())
    return out, err


def _log_error_record(error_type, message, stack):
    text = "[ERROR] {}: {}".format(error_type, message)
    if stack:
        text += "\nTraceback (most recent call last):\n" + "".join(stack)
    sys.stderr.write(text.rstrip("\n").replace("\n", "\r") + "\n")


# --- handler loading ----------------------------------------------------------------------------


def _frames(tb):
    """The user's part of a traceback: our own frames and the event loop's are left out."""
    import traceback

    ours = os.path.abspath(__file__)
    kept = [
        f
        for f in traceback.extract_tb(tb)
        if os.path.abspath(f.filename) != ours
        and os.sep + "asyncio" + os.sep not in f.filename
        and not f.filename.startswith("<frozen importlib")
        and os.sep + "importlib" + os.sep not in f.filename
    ]
    return traceback.format_list(kept)


def load_handler(spec):
    """Imports the handler named by `module.function` (module may use `/` or `.`)."""
    import importlib

    try:
        module_path, func_name = spec.rsplit(".", 1)
    except ValueError as exc:
        raise InitFailure("Runtime.MalformedHandlerName", "Bad handler '{}': {}".format(spec, exc)) from None
    if not module_path or not func_name:
        raise InitFailure("Runtime.MalformedHandlerName", "Bad handler '{}': empty module or function".format(spec))
    module_name = module_path.replace("/", ".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        message = "Unable to import module '{}': {}".format(module_name, exc)
        raise InitFailure("Runtime.ImportModuleError", message) from None
    except SyntaxError as exc:
        message = "Syntax error in module '{}': {}".format(module_name, exc)
        raise InitFailure("Runtime.UserCodeSyntaxError", message) from None
    except Exception as exc:
        raise InitFailure(type(exc).__name__, str(exc), _frames(sys.exc_info()[2])) from None
    handler = getattr(module, func_name, None)
    if handler is None:
        raise InitFailure(
            "Runtime.HandlerNotFound", "Handler '{}' missing on module '{}'".format(func_name, module_name)
        )
    if not callable(handler):
        raise InitFailure(
            "Runtime.HandlerNotFound", "Handler '{}' on module '{}' is not callable".format(func_name, module_name)
        )
    return handler


# --- serving ------------------------------------------------------------------------------------


def _json_default(value):
    kind = type(value).__name__
    if kind == "Decimal":
        return int(value) if value == value.to_integral_value() else float(value)
    raise TypeError("Object of type {} is not JSON serializable".format(kind))


class _AsyncRunner(object):
    """One event loop per instance, kept across invocations, so that clients created at
    module level (bound to a loop) keep working on warm invocations."""

    def __init__(self):
        import asyncio

        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)

    def run(self, awaitable):
        return self.loop.run_until_complete(awaitable)


class Runtime(object):
    def __init__(self, channel, handler):
        self.sock = channel
        self.rfile = channel.makefile("rb", buffering=65536)
        self.handler = handler
        self.is_async = _is_async(handler)
        self.async_runner = None

    def send(self, frame_type, meta, body):
        self.sock.sendall(HEADER.pack(frame_type, len(meta), len(body)) + meta + body)

    def read_frame(self):
        header = self.rfile.read(HEADER.size)
        if len(header) < HEADER.size:
            return None
        frame_type, meta_len, body_len = HEADER.unpack(header)
        meta = self.rfile.read(meta_len)
        body = self.rfile.read(body_len)
        if len(meta) < meta_len or len(body) < body_len:
            return None
        return frame_type, meta, body

    def call(self, event, context):
        if self.is_async:
            if self.async_runner is None:
                self.async_runner = _AsyncRunner()
            return self.async_runner.run(self.handler(event, context))
        result = self.handler(event, context)
        if hasattr(result, "__await__") and type(result).__name__ == "coroutine":
            if self.async_runner is None:
                self.async_runner = _AsyncRunner()
            result = self.async_runner.run(result)
        return result

    def invoke(self, meta, body):
        request_id = meta["id"]
        rid = request_id.encode("ascii")
        _current_request_id[0] = request_id
        try:
            event = json.loads(body) if body else None
            context = LambdaContext(request_id, meta["deadline_ms"], meta["arn"], meta.get("cc"), meta.get("identity"))
            result = self.call(event, context)
        except Exception as exc:
            self.send_exception(rid, request_id, exc)
            return
        self.send_result(rid, request_id, result)

    def send_exception(self, rid, request_id, exc):
        stack = _frames(exc.__traceback__)
        _log_error_record(type(exc).__name__, str(exc), stack)
        self.send_error(rid, type(exc).__name__, str(exc), request_id, stack)

    def send_result(self, rid, request_id, result):
        try:
            payload = json.dumps(result, default=_json_default, separators=(",", ":")).encode("utf-8")
        except Exception as exc:
            message = "Unable to marshal response: {}".format(exc)
            _log_error_record("Runtime.MarshalError", message, [])
            self.send_error(rid, "Runtime.MarshalError", message, request_id, [])
            return
        if len(payload) > MAX_RESPONSE_BYTES:
            message = "Response payload size ({} bytes) exceeded maximum allowed payload size ({} bytes).".format(
                len(payload), MAX_RESPONSE_BYTES
            )
            self.send_error(rid, "Function.ResponseSizeTooLarge", message, request_id, [])
            return
        self.send(T_RESULT, rid, payload)

    def send_error(self, rid, error_type, message, request_id, stack):
        # The platform refuses error documents over 1 MB: keep well under it.
        if len(message) > MAX_ERROR_MESSAGE_CHARS:
            message = message[:MAX_ERROR_MESSAGE_CHARS] + "... (truncated)"
        stack = [line[:4096] for line in stack[-MAX_STACK_FRAMES:]]
        doc = {"errorMessage": message, "errorType": error_type, "requestId": request_id, "stackTrace": stack}
        self.send(T_ERROR, rid, json.dumps(doc, default=str).encode("utf-8"))

    def serve_forever(self):
        while True:
            frame = self.read_frame()
            if frame is None:
                return  # the platform closed the channel: nothing more will come
            frame_type, meta, body = frame
            if frame_type != T_INVOKE:
                raise SystemExit("hxb runtime: unexpected frame type {}".format(frame_type))
            self.invoke(json.loads(meta), body)
            _current_request_id[0] = ""


def _is_async(handler):
    code = getattr(handler, "__code__", None)
    return bool(code is not None and code.co_flags & _CO_COROUTINE)


class ConcurrentRuntime(Runtime):
    """Serves up to `concurrency` invocations at once, each a task on the instance's event loop
    with its own context, deadline and request id (`_request_id_var`). For `async def` handlers
    only: `run_instance` refuses the others at init. `streams` are the tagged stdout and
    stderr: an invocation's unfinished lines go out before its answer."""

    def __init__(self, channel, handler, concurrency, streams=()):
        import asyncio

        Runtime.__init__(self, channel, handler)
        self.cancelled_error = asyncio.CancelledError
        self.concurrency = concurrency
        self.streams = streams
        self.writer = None
        self.tasks = set()

    def send(self, frame_type, meta, body):
        if self.writer is None:
            Runtime.send(self, frame_type, meta, body)  # READY: the loop does not own the channel yet
            return
        # Called from the invocation's own task: `_request_id_var` is its request id.
        request_id = _request_id_var.get()
        for stream in self.streams:
            stream.end(request_id)
        self.writer.write(HEADER.pack(frame_type, len(meta), len(body)) + meta + body)

    def serve_forever(self):
        if self.async_runner is None:
            self.async_runner = _AsyncRunner()
        self.async_runner.run(self.serve())

    async def serve(self):
        import asyncio

        reader, self.writer = await asyncio.open_unix_connection(sock=self.sock)
        while True:
            try:
                frame_type, meta_len, body_len = HEADER.unpack(await reader.readexactly(HEADER.size))
                meta = await reader.readexactly(meta_len)
                body = await reader.readexactly(body_len)
            except asyncio.IncompleteReadError:
                break  # the platform closed the channel: nothing more will come
            if frame_type != T_INVOKE:
                raise SystemExit("hxb runtime: unexpected frame type {}".format(frame_type))
            if len(self.tasks) >= self.concurrency:
                raise SystemExit("hxb runtime: more than {} invocations at once".format(self.concurrency))
            task = asyncio.ensure_future(self.invoke_async(json.loads(meta), body))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        # As the one-at-a-time runtime finishes the invocation it is in: those started end.
        if self.tasks:
            await asyncio.wait(list(self.tasks))
        self.writer.close()  # after what is buffered went out
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()

    async def invoke_async(self, meta, body):
        request_id = meta["id"]
        # The task runs in a copy of the context: this is its own, not the loop's.
        _request_id_var.set(request_id)
        rid = request_id.encode("ascii")
        try:
            event = json.loads(body) if body else None
            context = LambdaContext(request_id, meta["deadline_ms"], meta["arn"], meta.get("cc"), meta.get("identity"))
            result = await self.handler(event, context)
        except Exception as exc:
            self.send_exception(rid, request_id, exc)
            return
        except self.cancelled_error as exc:
            # Not an Exception since 3.8. Nothing here cancels an invocation's task, so it is
            # the handler's own doing: its error, not a task that ends without an answer.
            self.send_exception(rid, request_id, exc)
            return
        self.send_result(rid, request_id, result)


def _send_init_error(channel, failure):
    doc = {
        "errorMessage": failure.message[:MAX_ERROR_MESSAGE_CHARS],
        "errorType": failure.error_type,
        "requestId": "",
        "stackTrace": [line[:4096] for line in failure.stack[-MAX_STACK_FRAMES:]],
    }
    body = json.dumps(doc, default=str).encode("utf-8")
    channel.sendall(HEADER.pack(T_INIT_ERROR, 0, len(body)) + body)
    _log_error_record(failure.error_type, failure.message, failure.stack)


def _python_paths(task_root, opt_root):
    version = "python{}.{}".format(sys.version_info[0], sys.version_info[1])
    return [
        task_root,
        os.path.join(opt_root, "python", "lib", version, "site-packages"),
        os.path.join(opt_root, "python"),
    ]


def check_concurrency(handler, spec, concurrency):
    """Only an `async def` handler can serve more than one invocation at once: the platform
    cannot tell at deploy (that needs the module imported), so init refuses it here."""
    if concurrency > 1 and not _is_async(handler):
        message = (
            "Handler '{}' is not an async def function, but concurrency_per_instance is {}: only async "
            "handlers can serve more than one invocation at once (make it async def, or set "
            "concurrency_per_instance: 1)".format(spec, concurrency)
        )
        raise InitFailure("Runtime.InvalidConcurrency", message)


def run_instance(channel):
    """Everything after the interpreter exists: set up paths and logging, import the
    handler, report READY (or INIT_ERROR), serve. A zygote calls this in each forked child."""
    env = os.environ
    task_root = os.path.abspath(env.get("LAMBDA_TASK_ROOT", "/var/task"))
    opt_root = os.path.abspath(env.pop("_HXB_OPT_ROOT", "/opt"))
    sys.path[:0] = _python_paths(task_root, opt_root)
    with contextlib.suppress(OSError):
        os.chdir(task_root)
    _install_logging(env.get("HXB_LOG_LEVEL", "INFO"))
    spec = env.get("_HANDLER", "index.handler")
    concurrency = int(env.get("HXB_CONCURRENCY_PER_INSTANCE") or 1)
    try:
        handler = load_handler(spec)
        check_concurrency(handler, spec, concurrency)
    except InitFailure as failure:
        _send_init_error(channel, failure)
        return 1
    if concurrency > 1:
        runtime = ConcurrentRuntime(channel, handler, concurrency, _tag_output_per_invocation())
    else:
        runtime = Runtime(channel, handler)
    runtime.send(T_READY, b"", b"")
    runtime.serve_forever()
    return 0


def main():
    import socket

    fd = int(os.environ.pop("_HXB_CONTROL_FD"))
    # Nothing but stdio and the channel is meant for this process.
    os.closerange(fd + 1, 65536)
    channel = socket.socket(fileno=fd)
    sys.exit(run_instance(channel))
