"""The hxb zygote: one per Python runtime. An interpreter that has already imported the
runtime (and what handlers commonly import) and forks a sandboxed instance per request, so
an instance starts in milliseconds instead of paying for interpreter start and imports.

Runs as root, in the host's namespaces, with no user code. Python 3.7+ and the standard
library only. Talks to the platform over a SOCK_SEQPACKET socket on fd 3: one JSON message
per packet, file descriptors passed alongside (SCM_RIGHTS).

  platform -> zygote   {"op": "spawn", "id", ...the sandbox spec}   fds: [control, log]
  zygote -> platform   {"op": "ready", "pid", "seccomp"}  once, at start
                       {"op": "spawned", "id", "pid"}      pid = the instance's init, host pid
                       {"op": "failed", "id", "error"}
                       {"op": "exited", "id", "status"}    the runtime's wait status

Each instance is two processes in a new PID namespace: PID 1, a minimal init that reaps
orphans, forwards SIGTERM and reports how the runtime ended; and PID 2, the runtime, which
drops to the sandbox user, loads the seccomp filter and then imports the handler.
"""

import array

# Imported here, once, so that no instance pays for them: the runtime's lazy imports, and the
# modules handlers use most. Pages stay shared with every instance until written.
import asyncio  # noqa: F401
import atexit
import contextlib
import ctypes  # noqa: F401
import decimal  # noqa: F401
import gc
import importlib  # noqa: F401
import json
import logging  # noqa: F401
import os
import resource  # noqa: F401
import select
import signal
import socket
import struct
import sys
import traceback  # noqa: F401
import urllib.request  # noqa: F401

import _hxb_bootstrap as bootstrap
import _hxb_jail as jail

CONTROL_FD = 3
_MAX_MESSAGE = 256 * 1024
_MAX_FDS = 8
SETUP_FAILED_EXIT = 126


def _recv(sock):
    data, ancdata, _flags, _addr = sock.recvmsg(_MAX_MESSAGE, socket.CMSG_SPACE(_MAX_FDS * 4))
    fds = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds_array = array.array("i")
            fds_array.frombytes(payload[: len(payload) - (len(payload) % fds_array.itemsize)])
            fds.extend(fds_array)
    return data, fds


def _send(sock, message, fds=()):
    payload = json.dumps(message).encode()
    if fds:
        sock.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.send(payload)


class Zygote(object):
    def __init__(self, sock):
        self.sock = sock
        self.children = {}  # init pid -> (instance id, status pipe read end)
        self.own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        self.seccomp = jail.compile_seccomp()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        os.set_blocking(self.wake_r, False)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        # Objects made so far are never collected: the collector then never writes to their
        # pages, which stay shared with every forked instance (copy-on-write).
        gc.freeze()

    def serve(self):
        _send(self.sock, {"op": "ready", "pid": os.getpid(), "seccomp": bool(self.seccomp)})
        while True:
            readable, _, _ = select.select([self.sock, self.wake_r], [], [])
            if self.wake_r in readable:
                with contextlib.suppress(BlockingIOError):
                    os.read(self.wake_r, 4096)
                self.reap()
            if self.sock in readable:
                data, fds = _recv(self.sock)
                if not data:
                    return  # the platform is gone: our children die with us (PDEATHSIG)
                request = json.loads(data)
                expected = {"spawn": 2, "prepare": 1}.get(request.get("op"))
                if expected is not None and len(fds) == expected:
                    self.spawn(request, fds)
                else:
                    for fd in fds:
                        os.close(fd)
                    _send(self.sock, {"op": "failed", "id": request.get("id"), "error": "bad request"})

    def spawn(self, request, fds):
        """ "spawn" (fds: control, log): an instance now. "prepare" (fds: the assignment socket):
        a sandbox made ahead of demand, which waits there for its function."""
        status_r, status_w = os.pipe()
        try:
            # The next child is PID 1 of a namespace of its own; then back to ours, so that
            # every instance gets a fresh one. (Only here, in the parent: the child must keep
            # the new namespace for the runtime it forks.)
            jail.unshare(jail.CLONE_NEWPID)
            try:
                pid = os.fork()
            except OSError:
                jail.setns(self.own_pidns, jail.CLONE_NEWPID)
                raise
            if pid != 0:
                jail.setns(self.own_pidns, jail.CLONE_NEWPID)
        except (OSError, jail.JailError) as exc:
            for fd in (*fds, status_r, status_w):
                os.close(fd)
            _send(self.sock, {"op": "failed", "id": request["id"], "error": str(exc)})
            return
        if pid == 0:
            _child(self, request, fds, status_w)  # never returns
        for fd in (*fds, status_w):
            os.close(fd)
        self.children[pid] = (request["id"], status_r)
        _send(self.sock, {"op": "spawned", "id": request["id"], "pid": pid})

    def reap(self):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            entry = self.children.pop(pid, None)
            if entry is None:
                continue
            instance_id, status_r = entry
            # The init wrote the runtime's own status before exiting; if it did not (it was
            # killed, or setup failed), the init's status is what there is.
            reported = os.read(status_r, 4)
            os.close(status_r)
            if len(reported) == 4:
                status = struct.unpack("<i", reported)[0]
            _send(self.sock, {"op": "exited", "id": instance_id, "status": status})


def _child(zygote, request, fds, status_w):
    """The instance's init (PID 1 of its namespace). Never returns.

    Prepare phase (ahead of demand for "prepare"): join the cgroup, enter the namespaces,
    build the root but for the function's code, and fork the runtime, which drops its
    privileges and loads the seccomp filter at once and then waits. Assignment: the code is
    bound in, the root pivoted to, and the runtime handed its environment and channels: the
    only steps left on the path of a cold start."""
    code = SETUP_FAILED_EXIT
    control_fd = fds[0] if request["op"] == "spawn" else -1
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        jail.prctl(jail.PR_SET_PDEATHSIG, signal.SIGKILL)
        _close_all_but({*fds, status_w})
        jail.set_process_name("hxb-init")
        jail.join_cgroup(request.get("cgroup_procs", ()))
        jail.enter_namespaces(request.get("netns"))
        jail.build_base_root(request)
        to_runtime, from_init = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        runtime_pid = os.fork()
        if runtime_pid == 0:
            to_runtime.close()
            os.close(status_w)
            for fd in fds:
                os.close(fd)
            _runtime(zygote, request, from_init)  # never returns
        from_init.close()
        if request["op"] == "prepare":
            assignment, (control_fd, log_fd) = _wait_assignment(fds[0], runtime_pid)
            request = dict(request, **assignment)
        else:
            control_fd, log_fd = fds
        jail.finish_root(request)
        jail.set_hostname(request["hostname"])
        _send_fds(to_runtime, {"env": request["env"]}, [control_fd, log_fd])
        to_runtime.close()
        os.close(control_fd)
        os.close(log_fd)
        _init_loop(runtime_pid, status_w)
    except BaseException as exc:  # noqa: B036 -- the child must never fall back into the zygote's loop
        if control_fd >= 0:
            _report_setup_failure(control_fd, exc)
    finally:
        os._exit(code)


def _send_fds(sock, message, fds):
    sock.sendmsg([json.dumps(message).encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])


def _wait_assignment(sock_fd, runtime_pid):
    """Blocks until the platform hands this prepared sandbox a function (JSON, with the
    instance's control and log fds); the platform closing the socket instead means: exit
    (the runtime waiting for its function is killed with this namespace)."""
    sock = socket.socket(fileno=sock_fd)
    data, fds = _recv(sock)
    sock.close()
    if not data or len(fds) != 2:
        os._exit(0)
    return json.loads(data), fds


def _close_all_but(keep):
    highest = max(keep) + 1
    os.closerange(3, min(keep))
    for fd in range(min(keep) + 1, highest):
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)
    os.closerange(highest, 65536)


def _report_setup_failure(control_fd, exc):
    doc = {
        "errorType": "Sandbox.SetupFailed",
        "errorMessage": "sandbox setup failed: {}".format(exc),
        "requestId": "",
        "stackTrace": [],
    }
    body = json.dumps(doc).encode()
    with contextlib.suppress(OSError):
        os.write(control_fd, bootstrap.HEADER.pack(bootstrap.T_INIT_ERROR, 0, len(body)) + body)


def _init_loop(runtime_pid, status_w):
    """PID 1: forwards SIGTERM to the runtime, reaps every orphan, and when the runtime ends,
    reports its status and exits, which makes the kernel kill whatever is left."""
    signal.signal(signal.SIGTERM, lambda *_: _forward(runtime_pid, signal.SIGTERM))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            os._exit(0)
        if pid == runtime_pid:
            os.write(status_w, struct.pack("<i", status))
            os._exit(0)


def _forward(pid, sig):
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _runtime(zygote, request, from_init):
    """PID 2: becomes the unprivileged sandbox user, then waits for its function (from the
    init, once the code is in place) and runs the handler. Never returns."""
    code = 1
    try:
        jail.set_process_name("hxb-runtime")
        jail.drop_privileges(request["uid"], request["gid"], request.get("nofile", 1024))
        # Cleared by the change of credentials: set again, so the runtime dies with its init.
        jail.prctl(jail.PR_SET_PDEATHSIG, signal.SIGKILL)
        jail.apply_seccomp(zygote.seccomp)
        bootstrap.prepare_logging()
        data, fds = _recv(from_init)
        from_init.close()
        if not data or len(fds) != 2:
            os._exit(0)  # the sandbox was discarded before it got a function
        assignment = json.loads(data)
        _arrange_fds(*fds)
        os.environ.clear()
        os.environ.update(assignment["env"])
        os.environ["_HXB_OPT_ROOT"] = "/opt"
        sys.path[:] = ["/var/runtime"] + [p for p in sys.path if p and not p.startswith(request["runtime_root"])]
        os.chdir("/var/task")
        channel = socket.socket(fileno=CONTROL_FD)
        code = bootstrap.run_instance(channel)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException as exc:  # noqa: B036 -- never fall back into the zygote's loop
        with contextlib.suppress(Exception):
            sys.stderr.write("[hxb] runtime failed: {!r}\n".format(exc))
        code = 1
    finally:
        # As an interpreter exit would: the function's atexit handlers, flushed output.
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:  # noqa: B036
            pass
        os._exit(code)


def _arrange_fds(control_fd, log_fd):
    """stdin /dev/null, stdout and stderr the log pipe, the channel on fd 3, nothing else."""
    control_fd = _move_above(control_fd, 10)
    log_fd = _move_above(log_fd, 10)
    devnull = os.open("/dev/null", os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.dup2(control_fd, CONTROL_FD)
    os.closerange(CONTROL_FD + 1, 65536)


def _move_above(fd, floor):
    """A copy of `fd` numbered `floor` or more, so that the dup2s onto 0-3 cannot clobber it."""
    import fcntl

    return fd if fd >= floor else fcntl.fcntl(fd, fcntl.F_DUPFD, floor)


def main():
    sock = socket.socket(fileno=CONTROL_FD)
    # The platform's end closing means the platform is gone: this process and every
    # instance (PDEATHSIG) follow.
    jail.prctl(jail.PR_SET_PDEATHSIG, signal.SIGKILL)
    Zygote(sock).serve()
    os._exit(0)
