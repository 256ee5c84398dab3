"""LinuxSandboxFactory: every instance in its own PID, mount, IPC, UTS and network
namespaces, its own cgroup, as an unprivileged uid with no_new_privs and a seccomp filter,
on a minimal read-only root with its own /tmp. Instances are forked by a per-runtime zygote.

What an instance gets is prepared here on the host (cgroup, network namespace, scratch
volume; the last two ahead of demand by their managers), then the zygote's child enters it
(`_hxb_jail`). When the instance is gone, its resources are released in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Any

from hxb.config import SandboxSettings
from hxb.errors import SandboxSpawnError, SandboxUnavailableError
from hxb.runtimes import RuntimeCatalog, RuntimeInfo
from hxb.sandbox.base import SandboxPaths, SandboxSpec
from hxb.sandbox.cgroups import Cgroup, CgroupDriver, limits_for
from hxb.sandbox.network import InstanceNetwork, NetworkManager
from hxb.sandbox.scratch import ScratchVolume, ScratchVolumes
from hxb.sandbox.zygote import ZygoteClient

log = logging.getLogger(__name__)

# Inside the sandbox: Lambda's fixed paths.
_PATHS = SandboxPaths(task_root="/var/task", runtime_root="/var/runtime", opt_root="/opt", tmp_dir="/tmp")  # noqa: S108


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
            with contextlib.suppress(OSError):
                self._cgroup.set_cpu_quota(self._cpu_quota_us)

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
        cgroups = CgroupDriver.detect(prefix=f"hxb-{platform_id}")
        cgroups.cleanup_stale()
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
        """Starts zygotes ahead of demand, so the first instance does not wait for one."""
        for runtime in runtimes:
            await self._zygote(runtime)

    async def start(self, spec: SandboxSpec) -> LinuxSandbox:
        zygote = await self._zygote(spec.runtime)
        limits = limits_for(spec.memory_limit_mib, pids_max=self._settings.pids_max)
        # Created without the CPU quota: init runs unthrottled, `on_ready` applies it.
        cgroup = self._cgroups.create(spec.instance_id, limits)
        cgroup.set_cpu_quota(None)
        network: InstanceNetwork | None = None
        scratch: ScratchVolume | None = None
        parent_sock: socket.socket | None = None
        child_sock: socket.socket | None = None
        log_r = log_w = -1
        try:
            if self._network is not None:
                network = await self._network.acquire(spec.egress)
            if self._scratch is not None:
                scratch = await self._scratch.acquire(spec.ephemeral_storage_mib)
            parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            log_r, log_w = os.pipe()
            sandbox_ref: list[LinuxSandbox] = []
            pending_status: list[int] = []

            def on_exit(status: int) -> None:
                if sandbox_ref:
                    sandbox_ref[0].set_exited(status)
                else:
                    pending_status.append(status)

            pid = await zygote.spawn(
                self._request(spec, cgroup, network, scratch), [child_sock.fileno(), log_w], on_exit
            )
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
        sandbox_ref.append(sandbox)
        for status in pending_status:
            sandbox.set_exited(status)
        return sandbox

    def _request(
        self, spec: SandboxSpec, cgroup: Cgroup, network: InstanceNetwork | None, scratch: ScratchVolume | None
    ) -> dict[str, Any]:
        settings = self._settings
        interpreter_prefix = _interpreter_prefix(spec.runtime)
        return {
            "id": spec.instance_id,
            "env": dict(spec.env),
            "root_mount": str(self._root_mount),
            "task_root": str(spec.code_dir),
            "runtime_root": str(spec.runtime_dir),
            "opt_root": str(spec.layers_dir) if spec.layers_dir else None,
            "extra_readonly": [interpreter_prefix] if interpreter_prefix else [],
            "tmp_volume": str(scratch.mount_path) if scratch else None,
            "tmp_size_mib": spec.ephemeral_storage_mib,
            "netns": str(network.netns_path) if network else None,
            "nameservers": list(network.nameservers) if network else [],
            "cgroup_procs": cgroup.join_paths(),
            "uid": settings.uid,
            "gid": settings.gid,
            "nofile": 1024,
            "hostname": "hxb-" + spec.instance_id[:12],
        }

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
            if not exited or cgroup.pids():
                cgroup.kill_all()
            await asyncio.to_thread(cgroup.remove)
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
        for zygote in list(self._zygotes.values()):
            await zygote.close()
        self._zygotes.clear()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._network is not None:
            await self._network.close()
        if self._scratch is not None:
            await self._scratch.close()
        self._cgroups.close()


def _platform_id(data_dir: Path) -> str:
    """Several platforms can share a host (one per data dir, as tests do): each names its
    cgroups, network objects and subnet block after its data dir, and cleans only its own.
    A name, not a secret: sha1 is fine."""
    return hashlib.sha1(str(data_dir.resolve()).encode()).hexdigest()[:4]  # noqa: S324


async def cleanup_host(data_dir: Path) -> int:
    """Removes what a platform with this data dir left on the host when it was killed (its
    cgroups, network namespaces, veths and nftables table, /tmp volumes). Only when it is not
    running. Returns how many objects were removed."""
    data_dir = data_dir.resolve()  # noqa: ASYNC240 -- a path lookup, once, in a CLI command
    platform_id = _platform_id(data_dir)
    removed = await NetworkManager.cleanup_stale(f"hx{platform_id}")
    removed += await ScratchVolumes.cleanup_stale(data_dir / "scratch")
    cgroups = CgroupDriver.detect(prefix=f"hxb-{platform_id}")
    removed += cgroups.cleanup_stale()
    cgroups.close()
    return removed


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
