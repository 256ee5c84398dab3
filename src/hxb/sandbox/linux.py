"""LinuxSandboxFactory: every instance in its own PID, mount, IPC, UTS and network
namespaces, its own cgroup, as an unprivileged uid with no_new_privs and a seccomp filter,
on a minimal read-only root with its own /tmp. Instances are forked by a per-runtime zygote.

What an instance gets is prepared here on the host (cgroup, network namespace, scratch
volume; the last two ahead of demand by their managers), then the zygote's child enters it
(`_hxb_jail`). When the instance is gone, its resources are released in the background.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import dataclasses
import hashlib
import ipaddress
import json
import logging
import os
import signal
import socket
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from hxb._locks import HostLock, LockHeld
from hxb.config import SandboxSettings
from hxb.errors import SandboxSpawnError, SandboxUnavailableError
from hxb.runtimes import RuntimeCatalog, RuntimeInfo
from hxb.sandbox.base import SandboxPaths, SandboxSpec, describe_wait_status
from hxb.sandbox.cgroups import Cgroup, CgroupDriver, CgroupError, limits_for
from hxb.sandbox.doctor import check_seccomp
from hxb.sandbox.network import InstanceNetwork, NetworkManager
from hxb.sandbox.scratch import ScratchVolume, ScratchVolumes
from hxb.sandbox.zygote import ZygoteClient
from hxb.spec import MEMORY_MAX_MB

log = logging.getLogger(__name__)

# Inside the sandbox: Lambda's fixed paths.
_PATHS = SandboxPaths(task_root="/var/task", runtime_root="/var/runtime", opt_root="/opt", tmp_dir="/tmp")  # noqa: S108


# Prepared sandboxes get Lambda's default /tmp; other sizes are made on demand.
PREPARED_TMP_MIB: Final = 512
_REFILL_DELAY_S: Final = 0.2


class _ExitRelay:
    """Where the zygote's exit report for one sandbox goes: to its LinuxSandbox once there is
    one (reports that arrive before are kept), else to `on_unattached_exit`."""

    def __init__(self) -> None:
        self._sandbox: LinuxSandbox | None = None
        self._pending: int | None = None
        self.on_unattached_exit: Callable[[int], None] | None = None

    def __call__(self, status: int) -> None:
        if self._sandbox is not None:
            self._sandbox.set_exited(status)
        elif self.on_unattached_exit is not None:
            self.on_unattached_exit(status)
        else:
            self._pending = status

    def attach(self, sandbox: LinuxSandbox) -> None:
        self._sandbox = sandbox
        if self._pending is not None:
            sandbox.set_exited(self._pending)

    def when_unattached(self, callback: Callable[[int], None]) -> None:
        """`callback` gets the report, now if it came already (spawned and exited can arrive
        in one batch), while no sandbox is attached."""
        self.on_unattached_exit = callback
        if self._pending is not None and self._sandbox is None:
            status, self._pending = self._pending, None
            callback(status)


@dataclass(eq=False)
class _Prepared:
    """A sandbox made ahead of demand: its init waits on `assign` for a function."""

    pid: int
    assign: socket.socket
    cgroup: Cgroup
    network: InstanceNetwork | None
    scratch: ScratchVolume | None
    exits: _ExitRelay
    dead: bool = False


class LinuxSandbox:
    def __init__(
        self,
        *,
        factory: LinuxSandboxFactory,
        instance_id: str,
        pid: int,
        control: socket.socket,
        log_fd: int,
        cgroup: Cgroup,
        cpu_quota_us: int | None,
        network: InstanceNetwork | None,
        scratch: ScratchVolume | None,
    ) -> None:
        self._factory = factory
        self._instance_id = instance_id
        self._pid = pid
        self._control = control
        self._log_fd = log_fd
        self._cgroup = cgroup
        self._cpu_quota_us = cpu_quota_us
        self._network = network
        self._scratch = scratch
        # Becomes readable when the zygote reports the exit (it is the parent, not us).
        self._exit_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._status: int | None = None
        self._closed = False

    @property
    def instance_id(self) -> str:
        return self._instance_id

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def control(self) -> socket.socket:
        return self._control

    @property
    def log_fd(self) -> int:
        return self._log_fd

    @property
    def exit_fd(self) -> int:
        return self._exit_fd

    def set_exited(self, status: int) -> None:
        """Called by the zygote client when the instance is gone."""
        if self._status is None:
            self._status = status
            with contextlib.suppress(OSError):
                os.eventfd_write(self._exit_fd, 1)

    def poll_exit(self) -> int | None:
        return self._status

    def terminate(self) -> None:
        # To the instance's init, which forwards it to the runtime.
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        # SIGKILL of a PID namespace's init kills every process in it: nothing escapes a PID
        # namespace, so this is the whole tree.
        self._signal(signal.SIGKILL)

    def _signal(self, sig: signal.Signals) -> None:
        if self._status is not None:
            return  # reaped by the zygote: the pid may be someone else's now
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(self._pid, sig)

    def memory_peak_bytes(self) -> int | None:
        return self._cgroup.memory_peak_bytes()

    def out_of_memory(self) -> bool:
        return self._cgroup.oom_kill_count() > 0

    def on_ready(self) -> None:
        # Init ran unthrottled (as Lambda's init does); invocations get the quota that
        # scales with memory.
        if self._cpu_quota_us is not None:
            try:
                self._cgroup.set_cpu_quota(self._cpu_quota_us)
            except CgroupError as exc:  # the instance runs, but not throttled: say so
                log.warning("cannot apply the CPU quota of instance %s: %s", self._instance_id, exc)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._control.close()
        for fd in (self._log_fd, self._exit_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._factory.release_later(self._cgroup, self._network, self._scratch, exited=self._status is not None)


class LinuxSandboxFactory:
    def __init__(
        self,
        *,
        settings: SandboxSettings,
        data_dir: Path,
        catalog: RuntimeCatalog,
        cgroups: CgroupDriver,
        network: NetworkManager | None,
        scratch: ScratchVolumes | None,
    ) -> None:
        self._settings = settings
        self._catalog = catalog
        self._cgroups = cgroups
        self._network = network
        self._scratch = scratch
        self._root_mount = data_dir / "sandbox" / "root"
        self._root_mount.mkdir(parents=True, exist_ok=True)
        os.chmod(self._root_mount.parent, 0o700)
        self._zygotes: dict[str, ZygoteClient] = {}
        self._zygote_locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._ready: dict[str, deque[_Prepared]] = {}
        self._refilling: set[str] = set()
        self._closing = False
        self._lock: HostLock | None = None

    @classmethod
    async def open(
        cls, *, settings: SandboxSettings, data_dir: Path, catalog: RuntimeCatalog
    ) -> tuple[LinuxSandboxFactory, list[str]]:
        """Sets up what instances need on this host. Returns the factory and what is degraded
        (each a sentence); raises SandboxUnavailableError when there can be no sandbox."""
        if os.geteuid() != 0:
            raise SandboxUnavailableError(
                "the linux sandbox needs root (namespaces, cgroups, mounts); run hxb serve as root "
                "or set HXB_SANDBOX_MODE=local"
            )
        problems: list[str] = []
        platform_id = _platform_id(data_dir)
        # Before anything is cleaned up: what looks stale may belong to a live platform.
        lock = _lock_platform(platform_id, data_dir)
        try:
            return await cls._open_locked(settings, data_dir, catalog, platform_id, lock, problems)
        except BaseException:
            lock.release()
            raise

    @classmethod
    async def _open_locked(
        cls,
        settings: SandboxSettings,
        data_dir: Path,
        catalog: RuntimeCatalog,
        platform_id: str,
        lock: HostLock,
        problems: list[str],
    ) -> tuple[LinuxSandboxFactory, list[str]]:
        cgroups = CgroupDriver.detect(prefix=f"hxb-{platform_id}")
        cgroups.cleanup_stale()
        seccomp = check_seccomp()
        if not seccomp.ok:
            problems.append(f"instances run without a seccomp filter ({seccomp.detail}): {seccomp.hint}")
        network: NetworkManager | None = None
        if settings.network == "nat":
            try:
                network = await _open_network(settings, f"hx{platform_id}", platform_id)
            except SandboxUnavailableError as exc:
                problems.append(f"instances have no outbound network: {exc}")
        scratch: ScratchVolumes | None = None
        scratch_root = data_dir / "scratch"
        try:
            await ScratchVolumes.cleanup_stale(scratch_root)
            scratch = await ScratchVolumes.open(
                scratch_root, uid=settings.uid, gid=settings.gid, prewarm={512: settings.prewarm_scratch}
            )
        except SandboxUnavailableError as exc:
            problems.append(f"/tmp is a tmpfs that counts against memory: {exc}")  # noqa: S108
        factory = cls(
            settings=settings, data_dir=data_dir, catalog=catalog, cgroups=cgroups, network=network, scratch=scratch
        )
        factory._lock = lock
        return factory, problems

    @property
    def name(self) -> str:
        return "linux"

    def paths(self, spec_code_dir: Path, runtime_dir: Path, instance_id: str) -> SandboxPaths:
        return _PATHS

    def describe(self) -> dict[str, Any]:
        return {
            "cgroups": self._cgroups.describe(),
            "network": self._network.describe() if self._network else {"mode": "none"},
            "scratch": self._scratch.describe() if self._scratch else {"mode": "tmpfs"},
            "seccomp": {name: z.seccomp for name, z in self._zygotes.items()},
        }

    async def _zygote(self, runtime: RuntimeInfo) -> ZygoteClient:
        lock = self._zygote_locks.setdefault(runtime.name, asyncio.Lock())
        async with lock:
            zygote = self._zygotes.get(runtime.name)
            if zygote is not None and zygote.alive:
                return zygote
            if zygote is not None:
                await zygote.close()
            await self._catalog.ensure_compiled(runtime)
            zygote = await ZygoteClient.start(runtime, self._catalog.bootstrap_dir(runtime))
            self._zygotes[runtime.name] = zygote
            return zygote

    async def prepare(self, runtimes: list[RuntimeInfo]) -> None:
        """Starts zygotes ahead of demand, so the first instance does not wait for one, and
        their pools of prepared sandboxes."""
        for runtime in runtimes:
            await self._zygote(runtime)
            self._refill_later(runtime)

    async def start(self, spec: SandboxSpec) -> LinuxSandbox:
        if self._prepared_usable(spec):
            prepared = self._take_prepared(spec.runtime.name)
            self._refill_later(spec.runtime, delay_s=_REFILL_DELAY_S)
            if prepared is not None:
                try:
                    return self._assign(prepared, spec)
                except (OSError, CgroupError) as exc:
                    # Its init is gone (the zygote's report is on its way), or its cgroup
                    # refused the function's limit: make a sandbox now.
                    if isinstance(exc, CgroupError):
                        log.warning("a prepared sandbox could not be assigned: %s", exc)
                    self._prepared_died(prepared)
        else:
            self._refill_later(spec.runtime)
        return await self._start_cold(spec)

    async def _start_cold(self, spec: SandboxSpec) -> LinuxSandbox:
        """Everything now: a sandbox made for this instance, with its egress rules or its
        /tmp size (what prepared sandboxes do not have)."""
        zygote = await self._zygote(spec.runtime)
        limits = limits_for(spec.memory_limit_mib, pids_max=self._settings.pids_max)
        # Created without the CPU quota: init runs unthrottled, `on_ready` applies it.
        cgroup = self._cgroups.create(spec.instance_id, dataclasses.replace(limits, cpu_quota_us=None))
        network: InstanceNetwork | None = None
        scratch: ScratchVolume | None = None
        parent_sock: socket.socket | None = None
        child_sock: socket.socket | None = None
        log_r = log_w = -1
        exits = _ExitRelay()
        try:
            if self._network is not None:
                network = await self._network.acquire(spec.egress)
            if self._scratch is not None:
                scratch = await self._scratch.acquire(spec.ephemeral_storage_mib)
            parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            log_r, log_w = os.pipe()
            request = {
                "id": spec.instance_id,
                **self._base_request(spec.runtime, cgroup, network, scratch, spec.ephemeral_storage_mib),
                **self._function_fields(spec),
            }
            pid = await zygote.spawn(request, [child_sock.fileno(), log_w], exits)
        except BaseException:
            if parent_sock is not None:
                parent_sock.close()
            if log_r >= 0:
                os.close(log_r)
            self.release_later(cgroup, network, scratch, exited=True)
            raise
        finally:
            if child_sock is not None:
                child_sock.close()
            if log_w >= 0:
                os.close(log_w)
        parent_sock.setblocking(False)
        os.set_blocking(log_r, False)
        sandbox = LinuxSandbox(
            factory=self,
            instance_id=spec.instance_id,
            pid=pid,
            control=parent_sock,
            log_fd=log_r,
            cgroup=cgroup,
            cpu_quota_us=limits.cpu_quota_us,
            network=network,
            scratch=scratch,
        )
        exits.attach(sandbox)
        return sandbox

    def _base_request(
        self,
        runtime: RuntimeInfo,
        cgroup: Cgroup,
        network: InstanceNetwork | None,
        scratch: ScratchVolume | None,
        tmp_size_mib: int,
    ) -> dict[str, Any]:
        """What the zygote's child needs before it knows its function."""
        settings = self._settings
        interpreter_prefix = _interpreter_prefix(runtime)
        return {
            "root_mount": str(self._root_mount),
            "runtime_root": str(self._catalog.bootstrap_dir(runtime)),
            "extra_readonly": [interpreter_prefix] if interpreter_prefix else [],
            "tmp_volume": str(scratch.mount_path) if scratch else None,
            "tmp_size_mib": tmp_size_mib,
            "netns": str(network.netns_path) if network else None,
            "nameservers": list(network.nameservers) if network else [],
            "cgroup_procs": cgroup.join_paths(),
            "uid": settings.uid,
            "gid": settings.gid,
            "nofile": 1024,
        }

    @staticmethod
    def _function_fields(spec: SandboxSpec) -> dict[str, Any]:
        return {
            "env": dict(spec.env),
            "task_root": str(spec.code_dir),
            "opt_root": str(spec.layers_dir) if spec.layers_dir else None,
            "hostname": "hxb-" + spec.instance_id[:12],
        }

    # --- sandboxes prepared ahead of demand -------------------------------------------------------

    def _prepared_usable(self, spec: SandboxSpec) -> bool:
        # Prepared sandboxes have the default /tmp and unrestricted egress: a function that
        # asks for other ones gets a sandbox made for it.
        return spec.egress is None and spec.ephemeral_storage_mib == PREPARED_TMP_MIB

    def _take_prepared(self, runtime_name: str) -> _Prepared | None:
        ready = self._ready.get(runtime_name)
        while ready:
            prepared = ready.popleft()
            if not prepared.dead:
                return prepared
        return None

    def _assign(self, prepared: _Prepared, spec: SandboxSpec) -> LinuxSandbox:
        """Hands a prepared sandbox its function: the memory limit, then its code, environment
        and channels, in one message to its init."""
        limits = limits_for(spec.memory_limit_mib, pids_max=self._settings.pids_max)
        try:
            prepared.cgroup.set_memory_limit(limits.memory_bytes)
            prepared.cgroup.rename(spec.instance_id)
        except CgroupError:
            prepared.assign.close()  # its init exits; the zygote reports it gone
            raise
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        log_r, log_w = os.pipe()
        try:
            payload = json.dumps(self._function_fields(spec)).encode()
            prepared.assign.sendmsg(
                [payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [child_sock.fileno(), log_w]))]
            )
        except OSError:
            parent_sock.close()
            os.close(log_r)
            raise
        finally:
            child_sock.close()
            os.close(log_w)
            prepared.assign.close()
        parent_sock.setblocking(False)
        os.set_blocking(log_r, False)
        sandbox = LinuxSandbox(
            factory=self,
            instance_id=spec.instance_id,
            pid=prepared.pid,
            control=parent_sock,
            log_fd=log_r,
            cgroup=prepared.cgroup,
            cpu_quota_us=limits.cpu_quota_us,
            network=prepared.network,
            scratch=prepared.scratch,
        )
        prepared.exits.attach(sandbox)
        return sandbox

    def _refill_later(self, runtime: RuntimeInfo, *, delay_s: float = 0.0) -> None:
        if self._settings.prewarm_sandboxes <= 0 or self._closing or runtime.name in self._refilling:
            return
        self._refilling.add(runtime.name)
        task = asyncio.get_running_loop().create_task(
            self._refill(runtime, delay_s), name=f"hxb-prepare-{runtime.name}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refill(self, runtime: RuntimeInfo, delay_s: float) -> None:
        try:
            # After a cold start took a prepared sandbox, let it finish first: preparing the
            # next one costs a fork and CPU the instance being started needs now.
            await asyncio.sleep(delay_s)
            ready = self._ready.setdefault(runtime.name, deque())
            failures = 0
            while not self._closing and sum(not p.dead for p in ready) < self._settings.prewarm_sandboxes:
                try:
                    ready.append(await self._prepare(runtime))
                    failures = 0
                except Exception:  # a boundary: instances still start, the cold way
                    failures += 1
                    log.exception("preparing a sandbox failed", extra={"runtime": runtime.name})
                    await asyncio.sleep(min(30.0, 0.5 * 2**failures))
        finally:
            self._refilling.discard(runtime.name)

    async def _prepare(self, runtime: RuntimeInfo) -> _Prepared:
        zygote = await self._zygote(runtime)
        prepared_id = "prep-" + uuid.uuid4().hex
        # The most memory a function may have; lowered to the function's at assignment.
        limits = limits_for(MEMORY_MAX_MB, pids_max=self._settings.pids_max)
        cgroup = self._cgroups.create(prepared_id, dataclasses.replace(limits, cpu_quota_us=None))
        network: InstanceNetwork | None = None
        scratch: ScratchVolume | None = None
        exits = _ExitRelay()
        assign, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            if self._network is not None:
                network = await self._network.acquire(None)
            if self._scratch is not None:
                scratch = await self._scratch.acquire(PREPARED_TMP_MIB)
            request = {"id": prepared_id, **self._base_request(runtime, cgroup, network, scratch, PREPARED_TMP_MIB)}
            pid = await zygote.spawn(request, [child.fileno()], exits, op="prepare")
        except BaseException:
            assign.close()
            self.release_later(cgroup, network, scratch, exited=True)
            raise
        finally:
            child.close()
        prepared = _Prepared(pid=pid, assign=assign, cgroup=cgroup, network=network, scratch=scratch, exits=exits)
        exits.when_unattached(lambda status: self._prepared_died(prepared, status))
        return prepared

    def _prepared_died(self, prepared: _Prepared, status: int | None = None) -> None:
        """A prepared sandbox ended before it got a function (discarded at shutdown, or its
        setup failed): its resources go."""
        if prepared.dead:
            return
        prepared.dead = True
        if status is not None and not self._closing:
            # Its setup failed or something killed it: cold starts take the slow path meanwhile.
            log.warning(
                "a sandbox prepared ahead of demand ended before use (%s)",
                describe_wait_status(status),
                extra={"cgroup": prepared.cgroup.name},
            )
        prepared.assign.close()
        self.release_later(prepared.cgroup, prepared.network, prepared.scratch, exited=True)

    def release_later(
        self, cgroup: Cgroup, network: InstanceNetwork | None, scratch: ScratchVolume | None, *, exited: bool
    ) -> None:
        task = asyncio.get_running_loop().create_task(self._release(cgroup, network, scratch, exited=exited))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _release(
        self, cgroup: Cgroup, network: InstanceNetwork | None, scratch: ScratchVolume | None, *, exited: bool
    ) -> None:
        try:
            # In a thread: killing a group polls until its processes are gone, which can take
            # seconds for one with much memory, and the loop serves every other invocation.
            await asyncio.to_thread(_end_group, cgroup, exited=exited)
        except Exception:  # a boundary: a leftover cgroup is swept at the next start
            log.exception("removing an instance's cgroup failed", extra={"cgroup": cgroup.name})
        if network is not None and self._network is not None:
            try:
                await self._network.release(network)
            except Exception:  # a boundary: swept at the next start
                log.exception("releasing an instance's network failed")
        if scratch is not None and self._scratch is not None:
            try:
                await self._scratch.release(scratch)
            except Exception:  # a boundary: swept at the next start
                log.exception("releasing an instance's /tmp failed")

    async def close(self) -> None:
        self._closing = True
        for task in [t for t in self._tasks if t.get_name().startswith("hxb-prepare-")]:
            task.cancel()
        # Prepared sandboxes exit when their assignment socket closes; their resources are
        # released as the zygote reports them gone (or when it is closed below).
        for ready in self._ready.values():
            for prepared in ready:
                prepared.assign.close()
        # Every step runs even when one before it failed (a data dir deleted under a running
        # platform, say): each releases something of its own on the host.
        for zygote in list(self._zygotes.values()):
            await _logged("stopping a zygote", zygote.close)
        self._zygotes.clear()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._network is not None:
            await _logged("closing the network", self._network.close)
        if self._scratch is not None:
            await _logged("closing the /tmp volumes", self._scratch.close)
        self._cgroups.close()
        if self._lock is not None:
            self._lock.release()


def _end_group(cgroup: Cgroup, *, exited: bool) -> None:
    try:
        if not exited or cgroup.pids():
            cgroup.kill_all()
    finally:
        cgroup.remove()


async def _logged(what: str, step: Callable[[], Awaitable[None]]) -> None:
    try:
        await step()
    except Exception:  # a boundary: shutdown goes on
        log.exception("%s failed", what)


_LOCK_DIR: Final = Path("/run/hxb")


def _platform_id(data_dir: Path) -> str:
    """Several platforms can share a host (one per data dir, as tests do): each names its
    cgroups, network objects and subnet block after its data dir, and cleans only its own.
    A name, not a secret: sha1 is fine."""
    return hashlib.sha1(str(data_dir.resolve()).encode()).hexdigest()[:6]  # noqa: S324


async def cleanup_host(data_dir: Path) -> int:
    """Removes what a platform with this data dir left on the host when it was killed (its
    cgroups, network namespaces, veths and nftables table, /tmp volumes). Only when it is not
    running. Returns how many objects were removed."""
    data_dir = data_dir.resolve()  # noqa: ASYNC240 -- a path lookup, once, in a CLI command
    platform_id = _platform_id(data_dir)
    lock = _lock_platform(platform_id, data_dir)
    try:
        removed = await NetworkManager.cleanup_stale(f"hx{platform_id}")
        removed += await ScratchVolumes.cleanup_stale(data_dir / "scratch")
        cgroups = CgroupDriver.detect(prefix=f"hxb-{platform_id}")
        removed += cgroups.cleanup_stale()
        cgroups.close()
    finally:
        lock.release()
    return removed


def _lock_platform(platform_id: str, data_dir: Path) -> HostLock:
    """The host objects named after `platform_id` (cgroups, network namespaces, the nftables
    table) are this process's until the lock is released."""
    try:
        _LOCK_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
        return HostLock.acquire(_LOCK_DIR / f"sandbox-{platform_id}.lock", describe=f"data dir {data_dir}")
    except LockHeld as held:
        raise SandboxUnavailableError(
            f"the sandbox objects of id {platform_id} (this data dir's, {data_dir}) belong to a running"
            f" platform ({held.holder}): stop it first, or, if its data dir is another one, use"
            " a data dir of another name"
        ) from None
    except OSError as exc:
        raise SandboxUnavailableError(f"cannot lock {_LOCK_DIR}: {exc.strerror}") from exc


async def _open_network(settings: SandboxSettings, prefix: str, platform_id: str) -> NetworkManager:
    """Takes a /20 of the configured subnet (1024 instances), starting at one picked by the
    platform id, skipping blocks the host already routes (another platform's, a LAN)."""
    await NetworkManager.cleanup_stale(prefix)
    pool = ipaddress.ip_network(settings.subnet)
    blocks = list(pool.subnets(new_prefix=20)) if pool.prefixlen < 20 else [pool]
    start = int(platform_id, 16) % len(blocks)
    last_error: SandboxUnavailableError | None = None
    for block in blocks[start:] + blocks[:start]:
        try:
            return await NetworkManager.open(subnet=str(block), prewarm=settings.prewarm_networks, name_prefix=prefix)
        except SandboxUnavailableError as exc:
            if "already routes into" not in str(exc):
                raise
            last_error = exc
    assert last_error is not None  # noqa: S101 -- the loop ran at least once
    raise last_error


def _interpreter_prefix(runtime: RuntimeInfo) -> str | None:
    """The interpreter's installation directory when it is outside /usr (a pyenv Python):
    the sandbox shows it read-only at the same path, so the standard library imports."""
    executable = runtime.executable.resolve()
    if executable.is_relative_to("/usr"):
        return None
    prefix = executable.parent.parent  # <prefix>/bin/python3.X
    if prefix == Path("/"):
        raise SandboxSpawnError(f"cannot tell the installation directory of {executable}")
    return str(prefix)
