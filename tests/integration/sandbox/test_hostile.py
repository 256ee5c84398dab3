"""Hostile functions against the real linux sandbox: each test deploys a function that tries to break
out (read the host, write its code, signal or spy on other instances, reach the platform, exhaust a
limit, regain privileges) and asserts what the function observed, then that a canary function on the
same platform still answers. The last tests are the positive side: what a function may do (NAT out,
egress allow-lists, child processes, its own binaries) does work.

Every wait is bounded: handler timeouts, connect timeouts of at most 2 s, polls with deadlines.
"""

from __future__ import annotations

import os
import re
import socket
import textwrap
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import INSTANCE_ID, HxbServer, instance_pids, make_zip, wait_instance_gone
from tests.integration._helpers import (
    MIB,
    assert_canary_ok,
    deploy_canary,
    function_error,
    unique,
    wait_for_log_event,
)
from tests.integration.sandbox._netserver import OutsideServer, host_ipv4, outside_server, tcp_outcome

# Prepended to every handler: the instance's id, errno names, and raw system calls by number.
PRELUDE = f"""
import ctypes, errno, os, platform, resource, signal, socket, stat, subprocess, sys, time
import urllib.error, urllib.request

SYSCALLS = {{
    "x86_64": {{"ptrace": 101, "bpf": 321, "perf_event_open": 298, "accept": 43, "keyctl": 250, "clone": 56}},
    "aarch64": {{"ptrace": 117, "bpf": 280, "perf_event_open": 241, "accept": 202, "keyctl": 219, "clone": 220}},
}}[platform.machine()]
libc = ctypes.CDLL(None, use_errno=True)

def instance_id():
    return {INSTANCE_ID}

def name_of(code):
    return errno.errorcode.get(code, str(code))

def attempt(fn, *args):
    try:
        fn(*args)
    except OSError as exc:
        return name_of(exc.errno)
    return "ok"

def c_attempt(result):
    return name_of(ctypes.get_errno()) if result == -1 else "ok"

def require_sandbox():
    # The destructive probes (kill every pid, fork bomb, fill /tmp) would hit the host itself in
    # the unisolated local sandbox: they run only as pid 2 of a PID namespace, and not as root.
    if os.getpid() != 2 or os.getuid() == 0:
        raise RuntimeError("not in the linux sandbox: refusing to run a destructive probe")
"""

SANDBOX_ROOT = {"bin", "dev", "etc", "lib", "lib64", "opt", "proc", "run", "sbin", "tmp", "usr", "var"}
REPORT_MEMORY = re.compile(r"Max Memory Used: (\d+) MB")


def code(body: str) -> dict[str, str]:
    return {"index.py": PRELUDE + textwrap.dedent(body)}


@pytest.fixture(scope="module")
def canary(hxb_server: HxbServer) -> str:
    """A healthy function on the module's server, which must run the linux sandbox: in the local
    one these probes would kill, fill and remount the host itself."""
    name = deploy_canary(hxb_server)
    probe = unique("sandbox-probe")
    hxb_server.deploy(probe, code("def handler(event, context):\n    return [os.getpid(), os.getuid()]\n"))
    if ok(hxb_server.invoke(probe)) != [2, 990]:
        pytest.fail("the server does not run the linux sandbox: refusing to run hostile functions on the host")
    return name


def ok(response: Any) -> Any:
    assert response.status_code == 200, response.text
    assert "x-amz-function-error" not in response.headers, response.text
    return response.json()


# --- 1-2: the host's files --------------------------------------------------------------------------


def test_host_secrets_and_the_platform_data_dir_are_invisible(hxb_server: HxbServer, canary: str) -> None:
    name = unique("hostile-read")
    hxb_server.deploy(
        name,
        code(
            """
            def read(path):
                try:
                    with open(path, "rb") as fh:
                        fh.read(1)
                except OSError as exc:
                    return name_of(exc.errno)
                return "read"

            def handler(event, context):
                data_dir = event["data_dir"]
                return {
                    "shadow": read("/etc/shadow"),
                    "data_dir": attempt(os.listdir, data_dir),
                    "database": read(data_dir + "/hxb.db"),
                    "root": sorted(os.listdir("/")),
                }
            """
        ),
    )

    seen = ok(hxb_server.invoke(name, {"data_dir": str(hxb_server.data_dir)}))

    assert seen["shadow"] in {"ENOENT", "EACCES"}, seen
    assert seen["data_dir"] in {"ENOENT", "EACCES"}, seen
    assert seen["database"] in {"ENOENT", "EACCES"}, seen
    host_extras = {d for d in ("lib32", "libx32") if os.path.isdir(f"/{d}")}  # bound when the host has them
    assert set(seen["root"]) == SANDBOX_ROOT | host_extras, seen["root"]
    assert_canary_ok(hxb_server, canary)


def test_code_layers_runtime_and_system_dirs_are_read_only(hxb_server: HxbServer, canary: str) -> None:
    name = unique("hostile-write")
    hxb_server.deploy(
        name,
        code(
            """
            def create(path):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.close(fd)

            def handler(event, context):
                require_sandbox()
                dirs = ["/var/task", "/opt", "/var/runtime", "/usr", "/etc", "/"]
                seen = {d: attempt(create, os.path.join(d, "hxb-probe")) for d in dirs}
                seen["/var/task/index.py"] = attempt(open, "/var/task/index.py", "ab")
                seen["mkdir /var/task/new"] = attempt(os.mkdir, "/var/task/new")
                seen["chmod /var/task/index.py"] = attempt(os.chmod, "/var/task/index.py", 0o777)
                return seen
            """
        ),
    )

    seen = ok(hxb_server.invoke(name))

    assert set(seen.values()) <= {"EROFS", "EACCES"}, seen
    assert len(seen) == 9
    assert_canary_ok(hxb_server, canary)


# --- 3-4: other instances ---------------------------------------------------------------------------


def test_an_instance_can_neither_see_nor_signal_other_processes(hxb_server: HxbServer, canary: str) -> None:
    killer, victim = unique("hostile-kill"), unique("hostile-victim")
    hxb_server.deploy(
        killer,
        code(
            """
            def handler(event, context):
                require_sandbox()
                me = os.getpid()
                child = subprocess.Popen(["sleep", "30"])
                visible = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
                hit = {}
                for pid in range(1, event["limit"]):
                    if pid in (me, child.pid):
                        continue
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        continue
                    except PermissionError:
                        hit[pid] = "EPERM"
                        continue
                    hit[pid] = "killed"
                child.kill()
                child.wait()
                return {"me": me, "child": child.pid, "visible": visible, "hit": hit}
            """
        ),
        memory=1769,  # one vCPU: the loop below makes up to a few hundred thousand system calls
        timeout=30,
    )
    hxb_server.deploy(victim, code("def handler(event, context):\n    return instance_id()\n"))
    victim_id = ok(hxb_server.invoke(victim))
    victim_pids = instance_pids(victim_id)
    assert victim_pids
    # Every host pid of the victim and of the platform is in the range the killer tries.
    limit = max(4096, hxb_server.pid, *victim_pids) + 1

    seen = ok(hxb_server.invoke(killer, {"limit": limit}))

    assert seen["me"] == 2
    assert seen["visible"] == [1, 2, seen["child"]]
    assert seen["hit"] == {"1": "EPERM"}  # its init, root-owned; nothing else exists for it
    assert ok(hxb_server.invoke(victim)) == victim_id
    assert set(victim_pids) <= set(instance_pids(victim_id))
    assert_canary_ok(hxb_server, canary)


NAMESPACES = ("mnt", "pid", "ipc", "uts", "net")
# Module-level code runs when the user's code is imported: what it sees there is where the
# instance already was before any user code ran.
AT_IMPORT = """
AT_IMPORT = {
    "ns": {kind: os.readlink(f"/proc/self/ns/{kind}") for kind in ("mnt", "pid", "ipc", "uts", "net")},
    "cgroup": open("/proc/self/cgroup").read(),
}

def handler(event, context):
    time.sleep(event.get("hold", 0))
    return {"instance": instance_id(), "at_import": AT_IMPORT, "hostname": socket.gethostname()}
"""


def cgroup_paths(proc_self_cgroup: str) -> dict[str, str]:
    """controller -> group path, from /proc/PID/cgroup (v2's single line is `unified`)."""
    paths: dict[str, str] = {}
    for line in proc_self_cgroup.splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else ["unified"]:
            paths[controller] = path
    return paths


def test_each_instance_has_its_own_namespaces_and_cgroup_before_its_code_is_imported(
    hxb_server: HxbServer, canary: str
) -> None:
    name = unique("hostile-ns")
    hxb_server.deploy(name, code(AT_IMPORT), memory=256)
    results: list[Any] = []

    def invoke() -> None:
        results.append(ok(hxb_server.invoke(name, {"hold": 1.0})))

    threads = [threading.Thread(target=invoke) for _ in range(2)]  # two at once: two instances
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    first, second = results
    assert first["instance"] != second["instance"]

    host = {kind: os.readlink(f"/proc/self/ns/{kind}") for kind in NAMESPACES}
    for seen in (first, second):
        namespaces = seen["at_import"]["ns"]
        assert [kind for kind in NAMESPACES if namespaces[kind] == host[kind]] == [], seen
        paths = cgroup_paths(seen["at_import"]["cgroup"])
        limited = ("memory", "cpu", "pids") if "memory" in paths else ("unified",)
        assert all(paths[c].endswith(seen["instance"]) for c in limited), seen
        assert seen["hostname"] != socket.gethostname()
    assert [kind for kind in NAMESPACES if first["at_import"]["ns"][kind] == second["at_import"]["ns"][kind]] == []
    assert_canary_ok(hxb_server, canary)


TMP_HANDLER = """
def handler(event, context):
    path = "/tmp/secret"
    if event.get("token"):
        with open(path, "w") as fh:
            fh.write(event["token"])
    time.sleep(event.get("hold", 0))
    try:
        with open(path) as fh:
            seen = fh.read()
    except FileNotFoundError:
        seen = None
    return {"instance": instance_id(), "seen": seen, "tmp": sorted(os.listdir("/tmp"))}
"""


def test_tmp_is_private_to_an_instance_and_kept_between_its_invocations(hxb_server: HxbServer, canary: str) -> None:
    writer, other = unique("hostile-tmp-a"), unique("hostile-tmp-b")
    for name in (writer, other):
        hxb_server.deploy(name, code(TMP_HANDLER), timeout=10)
    token = uuid.uuid4().hex

    first = ok(hxb_server.invoke(writer, {"token": token}))
    again = ok(hxb_server.invoke(writer))
    # Two at once: the second runs on a new instance of the same function.
    concurrent: list[dict[str, Any]] = []
    threads = [
        threading.Thread(target=lambda: concurrent.append(ok(hxb_server.invoke(writer, {"hold": 2})))) for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    elsewhere = ok(hxb_server.invoke(other))

    assert first["seen"] == token
    assert (again["instance"], again["seen"]) == (first["instance"], token)  # kept within the instance
    assert len(concurrent) == 2
    by_instance = {r["instance"]: r for r in concurrent}
    assert len(by_instance) == 2, concurrent
    second = next(r for i, r in by_instance.items() if i != first["instance"])
    assert by_instance[first["instance"]]["seen"] == token
    assert second["seen"] is None
    assert "secret" not in second["tmp"]
    assert elsewhere["seen"] is None
    assert "secret" not in elsewhere["tmp"]
    assert_canary_ok(hxb_server, canary)


# --- 5-6: the network, inbound and toward the platform ----------------------------------------------


def test_the_platform_api_port_is_unreachable_from_an_instance(hxb_server_factory: Any) -> None:
    # Listening on every address, so that each target does accept connections from the host.
    server = hxb_server_factory("--host", "0.0.0.0")  # noqa: S104
    canary = deploy_canary(server)
    port = int(server.endpoint.rsplit(":", 1)[1])
    eth0 = host_ipv4()
    name = unique("hostile-api")
    server.deploy(
        name,
        code(
            """
            def default_gateway():
                with open("/proc/net/route") as fh:
                    for line in fh.readlines()[1:]:
                        fields = line.split()
                        if fields[1] == "00000000":
                            return socket.inet_ntoa(int(fields[2], 16).to_bytes(4, "little"))
                return None

            def connect(host, port):
                try:
                    with socket.create_connection((host, port), timeout=1.5):
                        return "connected"
                except ConnectionRefusedError:
                    return "refused"
                except (TimeoutError, socket.timeout):
                    return "timeout"
                except OSError as exc:
                    return "error:" + name_of(exc.errno)

            def handler(event, context):
                gateway = default_gateway()
                targets = {"loopback": "127.0.0.1", "eth0": event["eth0"], "gateway": gateway}
                seen = {k: connect(v, event["port"]) for k, v in targets.items() if v}
                return {"gateway": gateway, "outcomes": seen}
            """
        ),
        timeout=10,
    )

    seen = ok(server.invoke(name, {"port": port, "eth0": eth0}))

    assert seen["gateway"], seen
    # The same port answers the host on each of those addresses: only the sandbox stops the instance.
    assert tcp_outcome(eth0, port) == "connected"
    assert tcp_outcome(seen["gateway"], port) == "connected"
    assert set(seen["outcomes"]) == {"loopback", "eth0", "gateway"}
    for target, outcome in seen["outcomes"].items():
        assert outcome in {"refused", "timeout", "error:EPERM", "error:EHOSTUNREACH"}, (target, outcome)
    assert_canary_ok(server, canary)


def test_an_instance_cannot_listen_or_accept(hxb_server: HxbServer, canary: str) -> None:
    name = unique("hostile-listen")
    hxb_server.deploy(
        name,
        code(
            """
            def handler(event, context):
                tcp = socket.socket()
                tcp.bind(("127.0.0.1", 0))
                unix = socket.socket(socket.AF_UNIX)
                unix.bind("/tmp/hxb.sock")
                return {
                    "listen": attempt(tcp.listen, 8),
                    # On a socket that is not listening the kernel would say EINVAL: EPERM is seccomp.
                    "accept4": attempt(tcp.accept),
                    "accept": c_attempt(libc.syscall(SYSCALLS["accept"], tcp.fileno(), None, None)),
                    "listen unix": attempt(unix.listen, 1),
                }
            """
        ),
    )

    seen = ok(hxb_server.invoke(name))

    assert seen == {"listen": "EPERM", "accept4": "EPERM", "accept": "EPERM", "listen unix": "EPERM"}
    assert_canary_ok(hxb_server, canary)


# --- 7-10: limits -------------------------------------------------------------------------------------

FORK_BOMB = """
def report_once(exc):
    # Whichever process fails first reports: with a thousand processes in one CPU quota, waiting
    # for a particular one (the runtime) could take longer than the timeout.
    try:
        os.close(os.open("/tmp/forkbomb-reported", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError:
        return
    processes = sum(1 for p in os.listdir("/proc") if p.isdigit())
    print("FORKBOMB instance={} pid={} error={} processes={}".format(
        instance_id(), os.getpid(), name_of(exc.errno), processes), flush=True)

def handler(event, context):
    if not event.get("bomb"):
        return instance_id()
    require_sandbox()
    runtime = os.getpid()
    try:
        while True:
            try:
                os.fork()
            except OSError as exc:
                report_once(exc)
                time.sleep(2)  # and try again, as a bomb does; until the timeout kills the instance
    finally:
        if os.getpid() != runtime:
            os._exit(0)  # a child never returns into the runtime
"""


def test_a_fork_bomb_is_stopped_by_the_pids_limit_and_cleaned_up(hxb_server: HxbServer, canary: str) -> None:
    name = unique("hostile-forkbomb")
    # Memory for a thousand small processes: the pids limit, not the memory limit, must stop it.
    # A fork costs 2-4 ms of CPU on these VMs: the most CPU a function gets (3008 MB) and a
    # timeout with room for a loaded machine to reach the limit before the timeout kills it.
    hxb_server.deploy(name, code(FORK_BOMB), timeout=12, memory=3008)
    bomber = ok(hxb_server.invoke(name))  # the warm instance the bomb will run in
    outcome: list[Any] = []
    bombing = threading.Thread(target=lambda: outcome.append(hxb_server.invoke(name, {"bomb": True})))
    bombing.start()
    peak = 0
    while bombing.is_alive():  # bounded by the function's timeout
        peak = max(peak, len(instance_pids(bomber)))
        bombing.join(0.1)

    error = function_error(outcome[0])
    line = wait_for_log_event(hxb_server, name, "FORKBOMB")["message"]
    fields = dict(part.split("=", 1) for part in line.split()[1:])
    assert error["errorType"] == "Sandbox.Timedout", error
    assert fields["instance"] == bomber
    assert fields["error"] == "EAGAIN", line
    assert 1000 <= int(fields["processes"]) <= 1024, line
    assert 1000 <= peak <= 1024
    assert_canary_ok(hxb_server, canary)
    assert wait_instance_gone(bomber, timeout_s=20) == []
    assert ok(hxb_server.invoke(name)) != bomber  # a new instance
    assert_canary_ok(hxb_server, canary)


def test_open_files_stop_at_1024(hxb_server: HxbServer, canary: str) -> None:
    name = unique("hostile-files")
    hxb_server.deploy(
        name,
        code(
            """
            def handler(event, context):
                limits = resource.getrlimit(resource.RLIMIT_NOFILE)
                try:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
                    raised = "ok"
                except (ValueError, OSError) as exc:
                    raised = type(exc).__name__
                fds, error = [], None
                try:
                    for _ in range(2000):
                        fds.append(os.open("/dev/null", os.O_RDONLY))
                except OSError as exc:
                    error = name_of(exc.errno)
                finally:
                    for fd in fds:
                        os.close(fd)
                return {"limits": limits, "raise": raised, "opened": len(fds), "highest": max(fds), "error": error}
            """
        ),
    )

    seen = ok(hxb_server.invoke(name))

    assert seen["limits"] == [1024, 1024]
    assert seen["raise"] != "ok"
    assert seen["error"] == "EMFILE"
    assert seen["highest"] == 1023
    assert 1000 <= seen["opened"] < 1024
    assert ok(hxb_server.invoke(name))["opened"] == seen["opened"]  # all closed again
    assert_canary_ok(hxb_server, canary)


def test_allocating_past_memory_is_an_out_of_memory_error(hxb_server: HxbServer, canary: str) -> None:
    name = unique("hostile-oom")
    hxb_server.deploy(
        name,
        code(
            """
            def handler(event, context):
                print("INSTANCE", instance_id(), flush=True)
                hog = [b"\\x01" * (1024 * 1024) for _ in range(event.get("mb", 0))]  # touched, not lazy
                return {"instance": instance_id(), "allocated_mb": len(hog)}
            """
        ),
        memory=128,
        timeout=30,
    )

    response = hxb_server.invoke(name, {"mb": 300})
    error = function_error(response)
    report = wait_for_log_event(hxb_server, name, f"REPORT RequestId: {response.headers['x-amzn-requestid']}")
    oom_instance = wait_for_log_event(hxb_server, name, "INSTANCE")["message"].split()[-1]
    used = REPORT_MEMORY.search(report["message"])

    assert error["errorType"] == "Runtime.OutOfMemory", error
    assert error["errorMessage"].endswith("Runtime exited with error: signal: killed"), error
    assert used is not None, report
    assert 120 <= int(used.group(1)) <= 128, report
    assert wait_instance_gone(oom_instance) == []
    after = ok(hxb_server.invoke(name, {"mb": 10}))
    assert after["allocated_mb"] == 10
    assert after["instance"] != oom_instance
    assert_canary_ok(hxb_server, canary)


@pytest.mark.timeout(120)
def test_filling_tmp_stops_at_its_size_without_costing_memory(hxb_server: HxbServer, canary: str) -> None:
    name = unique("hostile-fill")
    hxb_server.deploy(
        name,
        code(
            """
            def handler(event, context):
                path = "/tmp/fill"
                if event["op"] == "again":
                    os.remove(path)
                    with open(path, "wb") as fh:
                        fh.write(b"\\x5a" * (10 * 1024 * 1024))
                        os.fsync(fh.fileno())
                    return {"instance": instance_id(), "size": os.path.getsize(path)}
                require_sandbox()
                chunk, written, error = b"\\xa5" * (1024 * 1024), 0, None
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    while written < 2048 * 1024 * 1024:  # a bound, should the volume not stop it
                        written += os.write(fd, chunk)
                        os.fsync(fd)
                except OSError as exc:
                    error = name_of(exc.errno)
                finally:
                    os.close(fd)
                return {"instance": instance_id(), "written": written, "error": error}
            """
        ),
        memory=128,
        ephemeral_storage=512,
        timeout=90,
    )

    filled = ok(hxb_server.invoke(name, {"op": "fill"}))
    again = ok(hxb_server.invoke(name, {"op": "again"}))

    assert filled["error"] == "ENOSPC", filled  # and not an out-of-memory kill: ok() saw a result
    assert 512 * MIB <= filled["written"] < 560 * MIB, filled
    assert again == {"instance": filled["instance"], "size": 10 * MIB}
    assert_canary_ok(hxb_server, canary)


# --- 11-12: privileges and kernel interfaces --------------------------------------------------------


def test_an_instance_cannot_reach_the_operators_terminal(hxb_server_factory: Any) -> None:
    # `hxb serve` run from a shell has that shell's terminal; an instance that inherited it
    # could type into it (TIOCSTI) or read what the operator types.
    primary, secondary = os.openpty()
    try:
        server: HxbServer = hxb_server_factory(terminal=secondary)
        name = unique("hostile-tty")
        server.deploy(
            name,
            code(
                """
                def handler(event, context):
                    with open("/proc/self/stat") as fh:
                        tty_nr = int(fh.read().rsplit(")", 1)[1].split()[4])
                    return {"tty_nr": tty_nr, "open /dev/tty": attempt(os.open, "/dev/tty", os.O_RDWR)}
                """
            ),
        )
        seen = ok(server.invoke(name))
        assert os.stat(secondary).st_rdev != 0
    finally:
        os.close(primary)
        os.close(secondary)

    assert seen["tty_nr"] == 0  # no controlling terminal
    assert seen["open /dev/tty"] in ("ENOENT", "ENXIO")


def test_an_instance_runs_unprivileged_and_cannot_become_root(hxb_server: HxbServer, canary: str) -> None:
    name = unique("hostile-uid")
    hxb_server.deploy(
        name,
        code(
            """
            def handler(event, context):
                with open("/proc/self/status") as fh:
                    status = dict(line.rstrip("\\n").split(":\\t", 1) for line in fh if ":\\t" in line)
                keys = ("CapInh", "CapPrm", "CapEff", "CapAmb", "NoNewPrivs", "Seccomp")
                return {
                    "ids": [os.getuid(), os.geteuid(), os.getgid(), os.getegid()],
                    "groups": os.getgroups(),
                    "setuid": attempt(os.setuid, 0),
                    "setgid": attempt(os.setgid, 0),
                    "setresuid": attempt(os.setresuid, 0, 0, 0),
                    "status": {k: status[k].strip() for k in keys},
                }
            """
        ),
    )

    seen = ok(hxb_server.invoke(name))

    assert seen["ids"] == [990, 990, 990, 990]
    assert seen["groups"] == []
    assert (seen["setuid"], seen["setgid"], seen["setresuid"]) == ("EPERM", "EPERM", "EPERM")
    no_capabilities = dict.fromkeys(("CapInh", "CapPrm", "CapEff", "CapAmb"), "0" * 16)
    assert seen["status"] == {**no_capabilities, "NoNewPrivs": "1", "Seccomp": "2"}
    assert_canary_ok(hxb_server, canary)


ESCAPES = """
def clone_newuser():
    pid = libc.syscall(SYSCALLS["clone"], 0x10000000 | signal.SIGCHLD, 0, 0, 0, 0)
    if pid == 0:
        os._exit(0)  # the filter failed: the child must not run the handler
    if pid > 0:
        os.waitpid(pid, 0)
    return c_attempt(pid)

def sys_dir():
    if not os.path.exists("/sys"):
        return "absent"
    return "empty" if not os.listdir("/sys") else "listed: " + ",".join(sorted(os.listdir("/sys")))

def handler(event, context):
    require_sandbox()
    mount = libc.mount
    mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    return {
        "unshare(CLONE_NEWUSER)": c_attempt(libc.unshare(0x10000000)),
        "unshare(CLONE_NEWNET)": c_attempt(libc.unshare(0x40000000)),
        "clone(CLONE_NEWUSER)": clone_newuser(),
        "mount tmpfs": c_attempt(mount(b"tmpfs", b"/tmp", b"tmpfs", 0, None)),
        "ptrace(TRACEME)": c_attempt(libc.syscall(SYSCALLS["ptrace"], 0, 0, 0, 0)),
        "ptrace(ATTACH, 1)": c_attempt(libc.syscall(SYSCALLS["ptrace"], 16, 1, 0, 0)),
        "chroot": attempt(os.chroot, "/tmp"),
        "bpf": c_attempt(libc.syscall(SYSCALLS["bpf"], 0, None, 0)),
        "perf_event_open": c_attempt(libc.syscall(SYSCALLS["perf_event_open"], None, 0, -1, -1, 0)),
        "keyctl": c_attempt(libc.syscall(SYSCALLS["keyctl"], 0, -3, 0)),
        "mknod": attempt(os.mknod, "/tmp/null", stat.S_IFCHR | 0o600, os.makedev(1, 3)),
        "socket(AF_PACKET)": attempt(socket.socket, socket.AF_PACKET, socket.SOCK_RAW),
        "socket(SOCK_RAW)": attempt(socket.socket, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP),
        # A VM's host listens on vsock (this one does): no way out of the network namespace.
        "socket(AF_VSOCK)": attempt(socket.socket, socket.AF_VSOCK, socket.SOCK_STREAM),
        "sethostname": attempt(socket.sethostname, "pwned"),
        "/proc/1/environ": attempt(lambda: open("/proc/1/environ", "rb").read()),
        "/proc/1/root": attempt(os.listdir, "/proc/1/root"),
        "/proc/1/ns/mnt": attempt(os.open, "/proc/1/ns/mnt", os.O_RDONLY),
        "/sys": sys_dir(),
    }
"""


def test_escape_system_calls_are_refused(hxb_server: HxbServer, canary: str) -> None:
    name = unique("hostile-escape")
    hxb_server.deploy(name, code(ESCAPES))

    seen = ok(hxb_server.invoke(name))

    # Reading init's (root's) files needs ptrace access: EACCES. Everything else is EPERM, from the
    # seccomp filter or from having no capabilities.
    init_files = ("/proc/1/environ", "/proc/1/root", "/proc/1/ns/mnt")
    expected = {key: "EACCES" if key in init_files else "EPERM" for key in seen if key != "/sys"}
    assert len(expected) == 18
    sys_seen = seen.pop("/sys")
    assert seen == expected
    assert sys_seen in {"absent", "empty"}
    assert_canary_ok(hxb_server, canary)


# --- 13-15: what a function may do ------------------------------------------------------------------

URL_FETCHER = """
def fetch(url):
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return "ok:" + response.read().decode()
    except urllib.error.URLError as exc:
        return "blocked:" + type(exc.reason).__name__
    except OSError as exc:
        return "blocked:" + type(exc).__name__

def handler(event, context):
    return {url: fetch(url) for url in event["urls"]}
"""


@pytest.fixture(scope="module")
def outside() -> Iterator[OutsideServer]:
    with outside_server(ports=(18080, 18081)) as server:
        yield server


def test_outbound_http_reaches_a_server_through_the_nat(
    hxb_server: HxbServer, canary: str, outside: OutsideServer
) -> None:
    name = unique("net-open")
    hxb_server.deploy(name, code(URL_FETCHER), timeout=10)
    urls = [outside.url(port) for port in outside.ports]

    seen = ok(hxb_server.invoke(name, {"urls": urls}))

    # The server saw the host's end of its link: the instance was masqueraded.
    assert seen == {outside.url(p): "ok:" + outside.body(p) for p in outside.ports}
    assert_canary_ok(hxb_server, canary)


def test_egress_allow_list_limits_where_a_function_connects(
    hxb_server: HxbServer, canary: str, outside: OutsideServer
) -> None:
    allowed_port, other_port = outside.ports
    one_port, elsewhere = unique("net-one-port"), unique("net-elsewhere")
    hxb_server.deploy(
        one_port,
        code(URL_FETCHER),
        timeout=10,
        vpc={"egress": [{"cidr": f"{outside.addr}/32", "ports": [allowed_port]}]},
    )
    hxb_server.deploy(elsewhere, code(URL_FETCHER), timeout=10, vpc={"egress": [{"cidr": "203.0.113.0/24"}]})
    urls = [outside.url(allowed_port), outside.url(other_port)]

    through_one_port = ok(hxb_server.invoke(one_port, {"urls": urls}))
    through_elsewhere = ok(hxb_server.invoke(elsewhere, {"urls": urls}))

    assert through_one_port[urls[0]] == "ok:" + outside.body(allowed_port)
    assert through_one_port[urls[1]].startswith("blocked:"), through_one_port
    assert all(v.startswith("blocked:") for v in through_elsewhere.values()), through_elsewhere
    assert_canary_ok(hxb_server, canary)


def test_child_processes_run(hxb_server: HxbServer, canary: str) -> None:
    name = unique("child-procs")
    hxb_server.deploy(
        name,
        code(
            """
            def handler(event, context):
                ls = subprocess.run(["ls", "-la", "/tmp"], capture_output=True, text=True, timeout=5)
                py = subprocess.run(["python3", "-c", "print(6*7)"], capture_output=True, text=True, timeout=5)
                return {
                    "path": os.environ["PATH"],
                    "ls": [ls.returncode, ls.stdout],
                    "python": [py.returncode, py.stdout],
                }
            """
        ),
        timeout=15,
    )

    seen = ok(hxb_server.invoke(name))

    assert seen["path"].split(":")[:3] == ["/usr/local/bin", "/usr/bin", "/bin"]
    assert seen["ls"][0] == 0
    assert seen["ls"][1].startswith("total "), seen["ls"]
    assert seen["python"] == [0, "42\n"]
    assert_canary_ok(hxb_server, canary)


def test_a_binary_shipped_in_the_package_runs(hxb_server: HxbServer, canary: str) -> None:
    name = unique("shipped-tool")
    tool = '#!/bin/sh\necho "tool uid=$(id -u) arg=$1"\n'
    handler = PRELUDE + textwrap.dedent(
        """
        def handler(event, context):
            done = subprocess.run(["/var/task/bin/tool", "hi"], capture_output=True, text=True, timeout=5)
            return [done.returncode, done.stdout, done.stderr]
        """
    )
    package = make_zip(
        {"hexabase.yaml": f"function:\n  name: {name}\n", "index.py": handler, "bin/tool": tool},
        modes={"bin/tool": 0o755},
    )
    deployed = hxb_server.deploy_zip(name, package)
    assert deployed.status_code in (200, 201), deployed.text

    assert ok(hxb_server.invoke(name)) == [0, "tool uid=990 arg=hi\n", ""]
    assert_canary_ok(hxb_server, canary)
