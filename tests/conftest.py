"""Shared factories: a real `hxb serve` process, functions deployed to it, and invocations.

`HxbServer` starts the real platform (the installed `hxb` command) on a free loopback port
with its own data dir, and always stops it, even when the test fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import httpx
import pytest

HXB = str(Path(sys.executable).parent / "hxb")
ROOT = Path(__file__).resolve().parent.parent


def make_zip(files: Mapping[str, str | bytes], *, modes: Mapping[str, int] | None = None) -> bytes:
    """A deployment package in memory. `files` maps names to contents (str is dedented)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in files.items():
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.create_system = 3
            info.external_attr = (0o100000 | (modes or {}).get(name, 0o644)) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            data = textwrap.dedent(content).encode() if isinstance(content, str) else content
            zf.writestr(info, data)
    return buf.getvalue()


def function_yaml(name: str, **fields: Any) -> str:
    """hexabase.yaml text for `name` with extra fields (nested values as JSON, which is YAML)."""
    lines = ["function:", f"  name: {name}"]
    for key, value in fields.items():
        key = "async" if key == "async_" else key
        rendered = json.dumps(value) if not isinstance(value, str) else value
        lines.append(f"  {key}: {rendered}")
    return "\n".join(lines) + "\n"


@dataclass
class HxbServer:
    """A running `hxb serve`."""

    data_dir: Path
    env: dict[str, str]
    cwd: Path | None = None
    pass_fds: tuple[int, ...] = ()
    terminal: int | None = None  # a tty (fd) to run the server on, as its controlling terminal
    process: subprocess.Popen[str] | None = None
    endpoint: str = ""
    output: list[str] = field(default_factory=list)
    _drainer: threading.Thread | None = None

    def start(self, *extra_args: str, timeout_s: float = 30.0) -> HxbServer:
        cmd = [HXB, "serve", "--host", "127.0.0.1", "--port", "0", "--data-dir", str(self.data_dir), *extra_args]
        self.process = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
            cwd=self.cwd,
            pass_fds=self.pass_fds,
            start_new_session=True,
            stdin=self.terminal,
            preexec_fn=_take_controlling_terminal if self.terminal is not None else None,
        )
        deadline = time.monotonic() + timeout_s
        assert self.process.stdout is not None
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            self.output.append(line)
            if line.startswith("hxb listening on "):
                self.endpoint = line.split()[-1]
                break
        if not self.endpoint:
            self.kill()
            raise RuntimeError("hxb serve did not start:\n" + "".join(self.output))
        # Keep draining its output so the server never blocks on a full pipe.
        self._drainer = threading.Thread(target=self._drain, daemon=True)
        self._drainer.start()
        return self

    def _drain(self) -> None:
        assert self.process is not None
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        """Stops the server the way a user would; returns its exit status."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
                raise
        self._close_output()
        return self.process.returncode

    def shutdown(self) -> None:
        """The end of a test: a clean stop, after which nothing of the platform may be left on
        the host (the sandbox's network namespaces, nftables table, mounts, cgroups). A platform
        that was killed is cleaned up after with `hxb sandbox cleanup`."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.stop(signal.SIGTERM, timeout_s=30)
            self.kill()
        self._close_output()
        if self.process is None or os.geteuid() != 0:
            return
        leftovers = host_leftovers(self.data_dir)
        if self.process.returncode != 0 or leftovers:
            subprocess.run(
                [HXB, "sandbox", "cleanup", "--data-dir", str(self.data_dir)],
                capture_output=True,
                timeout=60,
                check=False,
            )
        assert self.process.returncode != 0 or not leftovers, f"a clean stop left {leftovers} on the host"

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self._close_output()

    def _close_output(self) -> None:
        # Every process that held the pipe (the server and its instances) is gone once the
        # drainer sees EOF; an instance that outlived the server keeps it open: a bug to see.
        if self._drainer is not None:
            self._drainer.join(10)
            self._drainer = None
        if self.process is not None and self.process.stdout is not None and not self.process.stdout.closed:
            self.process.stdout.close()

    def client(self, timeout_s: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.endpoint, timeout=timeout_s)

    # --- conveniences ---------------------------------------------------------------------------

    def deploy(self, name: str, files: Mapping[str, str | bytes], **config: Any) -> httpx.Response:
        """Deploys `files` plus a hexabase.yaml built from `config`; asserts it succeeded."""
        response = self.deploy_zip(name, make_zip({"hexabase.yaml": function_yaml(name, **config), **files}))
        assert response.status_code in (200, 201), response.text
        return response

    def deploy_zip(self, name: str, package: bytes) -> httpx.Response:
        with self.client() as c:
            return c.put(f"/v1/functions/{name}", content=package, headers={"content-type": "application/zip"})

    def invoke(
        self, name: str, payload: Any = None, *, headers: Mapping[str, str] | None = None, raw: bytes | None = None
    ) -> httpx.Response:
        body = raw if raw is not None else json.dumps({} if payload is None else payload).encode()
        with self.client(timeout_s=120) as c:
            return c.post(f"/2015-03-31/functions/{name}/invocations", content=body, headers=dict(headers or {}))

    def logs(self, name: str, **params: Any) -> list[dict[str, Any]]:
        with self.client() as c:
            response = c.get(f"/v1/functions/{name}/logs", params={"limit": 10000, **params})
        assert response.status_code == 200, response.text
        events: list[dict[str, Any]] = response.json()["events"]
        return events

    def wait_for_log(self, name: str, needle: str, timeout_s: float = 10.0, **params: Any) -> list[dict[str, Any]]:
        """Polls the function's logs until a message contains `needle` (logs are written in batches)."""
        deadline = time.monotonic() + timeout_s
        while True:
            events = self.logs(name, **params)
            if any(needle in e["message"] for e in events):
                return events
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not in the logs of {name}: {[e['message'] for e in events]}")
            time.sleep(0.1)


# A handler's own instance, from inside: this works in every sandbox, where a pid would not
# (in the linux sandbox every runtime is pid 2 of a PID namespace of its own).
INSTANCE_ID = 'os.environ["AWS_LAMBDA_LOG_STREAM_NAME"].rsplit("]", 1)[1]'


def instance_pids(instance_id: str) -> list[int]:
    """Host pids of every live process of an instance (its runtime, init and children): those
    in its cgroup (linux sandbox) or with its id in their environment (local sandbox)."""
    found = []
    needle = instance_id.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                if fh.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X"):
                    continue
            with open(f"/proc/{entry}/cgroup", "rb") as fh:
                mine = needle in fh.read()
            if not mine:
                with open(f"/proc/{entry}/environ", "rb") as fh:
                    mine = needle in fh.read()
        except (OSError, IndexError):
            continue
        if mine:
            found.append(int(entry))
    return found


def wait_instance_gone(instance_id: str, timeout_s: float = 10.0) -> list[int]:
    """Polls until no process of the instance is left; returns the survivors (empty is good)."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = instance_pids(instance_id)
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def host_leftovers(data_dir: Path) -> list[str]:
    """The linux sandbox's objects of the platform with this data dir still on the host."""
    platform_id = hashlib.sha1(str(data_dir.resolve()).encode()).hexdigest()[:6]  # noqa: S324 -- a name
    found: list[str] = []
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=False).stdout
    found += [line for line in tables.splitlines() if line.endswith(f" hx{platform_id}")]
    netns = Path("/run/netns")
    if netns.is_dir():
        found += [f"netns {n}" for n in os.listdir(netns) if n.startswith(f"hx{platform_id}-")]
    scratch = str((data_dir / "scratch" / "mnt").resolve())
    found += [
        f"mount {line.split()[4]}"
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split()[4].startswith(scratch)
    ]
    found += [f"cgroup {path}" for path in _cgroup_dirs(f"hxb-{platform_id}") if path.exists()]
    return found


def _cgroup_dirs(prefix: str) -> list[Path]:
    """Where the platform's cgroup driver makes its groups, in every hierarchy."""
    from hxb.errors import SandboxUnavailableError
    from hxb.sandbox.cgroups import CgroupDriver

    try:
        info = CgroupDriver.detect(prefix=prefix).describe()
    except SandboxUnavailableError:
        return []
    groups_under: dict[str, str] = info["groups_under"]  # type: ignore[assignment]
    dirs = {Path(p) for p in groups_under.values()}
    if "platform_leaf" in info:
        dirs.add(Path(str(info["platform_leaf"])))
    return sorted(dirs)


def _take_controlling_terminal() -> None:
    """In the child, after setsid: stdin (a tty) becomes the session's controlling terminal, as
    when an operator runs `hxb serve` in a shell."""
    import fcntl
    import termios

    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def missing(what: str) -> NoReturn:
    """Skips a test that needs `what`, which this host lacks; fails it under CI (CI=true), whose
    `.ci/run` installs everything the tests need: a lost install step must not pass as a skip."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what}, and CI must provide it: .ci/run installs what the tests need")
    pytest.skip(what)


def server_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HXB_")}
    env.update(overrides)
    return env


@pytest.fixture
def hxb_server_factory(tmp_path: Path) -> Iterator[Any]:
    """Starts `hxb serve` processes (fresh data dir unless given); kills them after the test."""
    started: list[HxbServer] = []

    def start(
        *args: str,
        data_dir: Path | None = None,
        cwd: Path | None = None,
        pass_fds: tuple[int, ...] = (),
        terminal: int | None = None,
        **env: str,
    ) -> HxbServer:
        server = HxbServer(
            data_dir=data_dir or tmp_path / f"data{len(started)}",
            env=server_env(**env),
            cwd=cwd,
            pass_fds=pass_fds,
            terminal=terminal,
        )
        started.append(server)
        return server.start(*args)

    yield start
    # Latest first: a later server may be using an earlier one's data dir.
    for server in reversed(started):
        server.shutdown()


@pytest.fixture(scope="module")
def hxb_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HxbServer]:
    """One `hxb serve` shared by a test module (deploy functions with unique names)."""
    server = HxbServer(data_dir=tmp_path_factory.mktemp("hxb-data"), env=server_env())
    server.start()
    yield server
    server.shutdown()
