"""Each instance's private /tmp: a size-capped ext4 file system in a sparse image file, loop-mounted on
the host in a private directory, which the sandbox then bind-mounts at /tmp. A pool per size keeps
volumes ready, so that taking one costs no subprocess.

Why not tmpfs: its pages are charged to the memory cgroup of whoever writes them and cannot be
reclaimed without swap, so a 128 MB function could not fill a 512 MB /tmp, which Lambda allows. The
page cache of a disk-backed file system is charged to the writer too, but the kernel writes it back
and reclaims it when the cgroup reaches its limit, instead of killing the instance.

Under `root` (mode 0700, root's): `images/<ident>.img`, `mnt/<ident>`, and a `lock` file held by the
one `ScratchVolumes` that owns the directory, so that no one tears down volumes another platform uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import math
import os
import re
import secrets
import shutil
import struct
from collections import deque
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Protocol

from hxb._subprocess import run_process
from hxb.errors import ConfigError, InternalError, PlatformError, SandboxSpawnError, SandboxUnavailableError

log = logging.getLogger(__name__)

_MIB: Final = 1024 * 1024
_DEFAULT_PREWARM: Final[Mapping[int, int]] = MappingProxyType({512: 2})

# The tools run as root: look for them in the system directories only, never in an inherited PATH.
_TOOL_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_TOOL_ENV: Final = {"PATH": _TOOL_PATH, "LC_ALL": "C"}  # LC_ALL: error messages we can quote as they are
_TOOLS: Final = {"mkfs": "mkfs.ext4", "mount": "mount", "umount": "umount", "losetup": "losetup"}

# mkfs settings pinned on the command line, because the headroom formula depends on them: below
# 512 MiB a stock /etc/mke2fs.conf would pick the "small" type (1 KiB blocks, an inode per 4 KiB).
_BLOCK_BYTES: Final = 4096
_INODE_BYTES: Final = 256
_BYTES_PER_INODE: Final = 16384

# <linux/ext4.h>: EXT4_IOC_SHUTDOWN is XFS's GOINGDOWN ioctl, _IOR('X', 125, __u32).
_EXT4_IOC_SHUTDOWN: Final = 0x8004587D
_EXT4_GOING_FLAGS_NOLOGFLUSH: Final = 0x2

# mkfs + mount are a few milliseconds of mostly CPU each: a burst of cold starts should queue for
# them rather than fork a hundred at once.
_MAX_CONCURRENT_MAKES: Final = 8
_RETRY_MAX_S: Final = 30.0
_IN_MEMORY_FS: Final = frozenset({"tmpfs", "ramfs"})
_DETACH_WAIT_S: Final = 0.2
_TOOL_TIMEOUT_S: Final = 60.0  # each tool takes milliseconds, even mkfs of a 10 GiB image: this is hung
_DETACH_POLL_S: Final = 0.005


def image_size_mib(size_mib: int) -> int:
    """The size of the image whose ext4 offers at least `size_mib` MiB to its user (`df` "Avail").

    Out of the image, ext4 (with the options of `mkfs_argv`) takes:
    - the inode tables: a 256-byte inode per 16 KiB, so 1/64 of the image;
    - the reserved clusters: the kernel keeps min(2% of the blocks, 4096 blocks = 16 MiB) back so that
      delayed allocation and extent splits never fail; `-m 0` does not remove them;
    - the rest (superblock and descriptor copies, bitmaps of 8 KiB per 128 MiB group, the root
      directory, extent-tree blocks of large files): 1 MiB plus 1/1024 of the image covers it.

    image = size + ceil(image/64) + min(ceil(image/50), 16) + 1 + ceil(image/1024), solved by
    iterating from image = size: the overhead grows far slower than the image, so a few steps reach
    the fixed point. The image is sparse, so the headroom costs host disk only when it is written.
    """
    if size_mib < 1:
        raise InternalError(f"scratch volume size must be at least 1 MiB, got {size_mib}")
    image_mib = size_mib
    while True:
        overhead_mib = math.ceil(image_mib / 64) + min(math.ceil(image_mib / 50), 16) + 1 + math.ceil(image_mib / 1024)
        if size_mib + overhead_mib <= image_mib:
            return image_mib
        image_mib = size_mib + overhead_mib


def new_ident(size_mib: int) -> str:
    """A fresh volume name: its size, for whoever reads `ls` or `mount`, and 48 random bits."""
    return f"{size_mib}m-{secrets.token_hex(6)}"


def mkfs_argv(mkfs: str, image: Path, *, uid: int, gid: int) -> list[str]:
    return [
        mkfs,
        "-q",
        "-F",  # never ask: stdin is /dev/null
        *("-b", str(_BLOCK_BYTES), "-I", str(_INODE_BYTES), "-i", str(_BYTES_PER_INODE)),
        # No journal: the volume never outlives its instance, so there is nothing to recover after a
        # crash. No resize inode: it is never grown, and its reserved descriptor blocks would be lost space.
        *("-O", "^has_journal,^resize_inode"),
        # Zeroing inode tables or discarding blocks of a file that is all holes would only cost time.
        # The root directory belongs to the instance user from the start.
        *("-E", f"lazy_itable_init=1,nodiscard,root_owner={uid}:{gid}"),
        *("-m", "0"),  # no blocks reserved for root: the instance user is the only user
        str(image),
    ]


def attach_argv(losetup: str, image: Path) -> list[str]:
    # Direct I/O on the image, so that the volume's data is not cached twice (once in the volume's
    # page cache, again in the image's) and goes to disk at disk speed. On cgroup v2 the loop device
    # also charges the image's page cache to the writer's memory cgroup. mount(8) has no option for
    # it, and LOOP_SET_DIRECT_IO on a mounted device costs 12-30 ms (a queue freeze) against 3 ms here.
    return [losetup, "--find", "--show", "--direct-io=on", str(image)]


def mount_argv(mount: str, device: str, mount_path: Path) -> list[str]:
    # nosuid,nodev: the guest cannot leave set-id programs or device nodes for anyone to use. exec
    #   stays allowed: Lambda functions commonly download a binary to /tmp and run it.
    # noatime: reading writes nothing. noinit_itable: no kernel thread zeroing the inode tables that
    #   mkfs left uninitialised (they read as zeros from the sparse image anyway).
    return [mount, "-t", "ext4", "-o", "nosuid,nodev,noatime,noinit_itable", device, str(mount_path)]


_MOUNTINFO_ESCAPE: Final = re.compile(r"\\([0-7]{3})")


def _mounts(mountinfo: str) -> list[tuple[Path, str]]:
    """(mount point, file system type) of each line of /proc/<pid>/mountinfo, in mount order."""
    mounts = []
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if len(fields) < 5 or "-" not in fields[5:]:
            continue
        # The kernel escapes space, tab, newline and backslash in paths as three octal digits.
        point = Path(_MOUNTINFO_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[4]))
        mounts.append((point, fields[fields.index("-", 5) + 1]))
    return mounts


def mount_points_under(mountinfo: str, directory: Path) -> list[Path]:
    """The mount points in `mountinfo` (the text of /proc/<pid>/mountinfo) strictly below `directory`,
    deepest first, so that unmounting them in order never hits a busy parent."""
    found = [point for point, _ in _mounts(mountinfo) if point != directory and point.is_relative_to(directory)]
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def fs_type_of(mountinfo: str, path: Path) -> str:
    """The type of the file system that `path` (absolute, resolved) is on."""
    found = ""
    best_depth = -1
    for point, fs_type in _mounts(mountinfo):
        # The deepest mount point above `path` wins; of mounts stacked on one point, the last.
        if path.is_relative_to(point) and len(point.parts) >= best_depth:
            found, best_depth = fs_type, len(point.parts)
    return found


@dataclass(frozen=True, slots=True)
class ScratchVolume:
    """One instance's /tmp: a mounted file system that only the instance user can enter."""

    mount_path: Path  # the file system's root on the host; the sandbox bind-mounts it at /tmp
    size_mib: int
    ident: str


@dataclass(frozen=True, slots=True)
class ScratchStatistics:
    prepared: Mapping[int, int]  # size_mib -> volumes ready in the pool
    preparing: int  # volumes the background refill is making now
    in_use: int
    made: int
    released: int
    failures: int  # makes and releases that failed


class ScratchBackend(Protocol):
    """Makes and destroys the file systems behind the volumes; `ScratchVolumes` keeps the books."""

    async def make(self, ident: str, size_mib: int) -> Path:
        """Makes and mounts a volume and returns its mount path. Leaves nothing behind when it
        fails or is cancelled."""
        ...

    async def destroy(self, ident: str) -> None:
        """Unmounts, detaches and deletes whatever exists of `ident`. Idempotent."""
        ...

    def describe(self) -> dict[str, object]: ...

    def close(self) -> None: ...


class ScratchVolumes:
    """The scratch volumes of one platform: prepared ahead per size, handed out, torn down."""

    def __init__(
        self, backend: ScratchBackend, *, prewarm: Mapping[int, int] = _DEFAULT_PREWARM, retry_delay_s: float = 1.0
    ) -> None:
        for size_mib, count in prewarm.items():
            if size_mib < 1 or count < 0:
                raise ConfigError(f"scratch prewarm {{{size_mib}: {count}}}: sizes must be >= 1 MiB, counts >= 0")
        self._backend = backend
        self._targets = {size_mib: count for size_mib, count in prewarm.items() if count > 0}
        self._retry_delay_s = retry_delay_s
        self._ready: dict[int, deque[ScratchVolume]] = {size_mib: deque() for size_mib in self._targets}
        self._in_use: dict[str, ScratchVolume] = {}
        self._releasing: dict[str, asyncio.Task[None]] = {}
        self._wake: dict[int, asyncio.Event] = {size_mib: asyncio.Event() for size_mib in self._targets}
        self._changed = asyncio.Condition()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._refills: set[asyncio.Task[Any]] = set()
        self._preparing = 0
        self._made = 0
        self._released = 0
        self._failures = 0
        self._closing = False

    @classmethod
    async def open(
        cls, root: Path, *, uid: int, gid: int, prewarm: Mapping[int, int] = _DEFAULT_PREWARM
    ) -> ScratchVolumes:
        """Takes `root` (left-overs of a platform that was killed are cleaned up), proves that a
        volume can be made, and starts filling the pool.

        Raises:
            SandboxUnavailableError: not root, no loop devices, a tool missing, another platform
                owns `root`, or making a volume failed.
        """
        backend = await LoopScratchBackend.open(root, uid=uid, gid=gid)
        try:
            volumes = cls(backend, prewarm=prewarm)
            # Make one now, so that a host where loop mounts cannot work says so at startup rather
            # than at the first cold start. It seeds the pool when there is one.
            probe_mib = min(volumes._targets, default=1)
            try:
                probe = await volumes._make(probe_mib, for_pool=probe_mib in volumes._targets)
            except SandboxSpawnError as exc:
                raise SandboxUnavailableError(
                    f"cannot make a scratch volume (ext4 on a loop device) under {backend.root}: {exc}"
                ) from exc
            await volumes.release(probe)  # a no-op when the probe went to the pool
        except BaseException:
            backend.close()
            raise
        volumes.start()
        return volumes

    def start(self) -> None:
        """Starts the background refill of every prewarmed size."""
        for size_mib, count in self._targets.items():
            task = self._spawn(self._refill_forever(size_mib, count), name=f"hxb-scratch-refill-{size_mib}")
            self._refills.add(task)

    # --- handing out --------------------------------------------------------------------------

    async def acquire(self, size_mib: int) -> ScratchVolume:
        """A ready volume of `size_mib` MiB from the pool, or one made now.

        Raises:
            SandboxSpawnError: making the volume failed.
            SandboxUnavailableError: `close()` was called meanwhile.
        """
        if self._closing:
            raise SandboxUnavailableError("scratch volumes are shut down")
        image_size_mib(size_mib)  # validates the size
        ready = self._ready.get(size_mib)
        if ready:
            volume = ready.popleft()
            self._in_use[volume.ident] = volume
            self._wake[size_mib].set()
            return volume
        # Made in a task of ours, so that a caller who gives up midway does not leave a volume
        # half-made, and close() waits for it.
        task = self._spawn(self._make(size_mib, for_pool=False), name=f"hxb-scratch-make-{size_mib}")
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(self._give_back)
            raise

    async def release(self, volume: ScratchVolume) -> None:
        """Unmounts the volume (lazily if something still uses it), detaches its loop device and
        deletes its image; its contents are discarded, not written back. Idempotent; returns when
        the teardown is done. Call it once the instance has exited."""
        task = self._start_release(volume)
        if task is not None:
            await asyncio.shield(task)

    def release_nowait(self, volume: ScratchVolume) -> None:
        """`release()` in the background (tearing down a full volume takes up to a few hundred ms)."""
        self._start_release(volume)

    async def wait_prepared(self) -> None:
        """Returns once the pool holds the prewarm count of every size."""
        async with self._changed:
            await self._changed.wait_for(self._is_prepared)

    async def close(self) -> None:
        """Stops the refills and releases every volume, ready or in use."""
        self._closing = True
        # Only the refills are cancelled, and a make is left clean when cancelled; makes for acquire()
        # and teardowns run to their end, so that nothing is left half-done.
        for task in self._refills:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        volumes = [volume for ready in self._ready.values() for volume in ready] + list(self._in_use.values())
        for ready in self._ready.values():
            ready.clear()
        self._in_use.clear()
        await asyncio.gather(*(self._destroy(volume) for volume in volumes), return_exceptions=True)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._backend.close()

    def statistics(self) -> ScratchStatistics:
        return ScratchStatistics(
            prepared={size_mib: len(ready) for size_mib, ready in self._ready.items()},
            preparing=self._preparing,
            in_use=len(self._in_use),
            made=self._made,
            released=self._released,
            failures=self._failures,
        )

    def describe(self) -> dict[str, object]:
        """What `hxb doctor` shows: how /tmp is provided, and how much of the host disk it may take."""
        stats = self.statistics()
        committed_mib = sum(v.size_mib for v in self._in_use.values()) + sum(
            size_mib * count for size_mib, count in stats.prepared.items()
        )
        return {
            **self._backend.describe(),
            "prewarm": dict(self._targets),
            "prepared": dict(stats.prepared),
            "in_use": stats.in_use,
            # Images are sparse: the host disk is overcommitted when this exceeds its free space.
            "committed_mib": committed_mib,
            "made": stats.made,
            "released": stats.released,
            "failures": stats.failures,
        }

    @staticmethod
    async def cleanup_stale(root: Path) -> int:
        """Unmounts, detaches and deletes what a platform that was killed left under `root`, and
        returns how many volumes that was.

        Raises:
            SandboxUnavailableError: a running platform owns `root`, or a tool is missing.
        """
        if not _is_dir(root):
            return 0
        backend = await LoopScratchBackend.open(root, uid=0, gid=0, clean=False)
        try:
            return await backend.destroy_all()
        finally:
            backend.close()

    # --- internals ----------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        self._refills.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("scratch volume task failed", exc_info=task.exception(), extra={"task": task.get_name()})

    async def _make(self, size_mib: int, *, for_pool: bool) -> ScratchVolume:
        ident = new_ident(size_mib)
        if for_pool:
            self._preparing += 1
        try:
            mount_path = await self._backend.make(ident, size_mib)
        except PlatformError:
            self._failures += 1
            raise
        finally:
            if for_pool:
                self._preparing -= 1
        volume = ScratchVolume(mount_path=mount_path, size_mib=size_mib, ident=ident)
        self._made += 1
        if self._closing:
            await self._destroy(volume)
            raise SandboxUnavailableError("scratch volumes are shut down")
        if for_pool:
            self._ready[size_mib].append(volume)
            async with self._changed:
                self._changed.notify_all()
        else:
            self._in_use[ident] = volume
        return volume

    def _give_back(self, task: asyncio.Task[Any]) -> None:
        """For a make whose caller gave up: the volume is released as soon as it exists."""
        if not task.cancelled() and task.exception() is None:
            self.release_nowait(task.result())

    def _start_release(self, volume: ScratchVolume) -> asyncio.Task[None] | None:
        if volume.ident in self._releasing:
            return self._releasing[volume.ident]
        if self._in_use.pop(volume.ident, None) is None:
            return None  # released already, or never ours
        task = self._spawn(self._destroy(volume), name=f"hxb-scratch-release-{volume.ident}")
        self._releasing[volume.ident] = task
        task.add_done_callback(lambda _: self._releasing.pop(volume.ident, None))
        return task

    async def _destroy(self, volume: ScratchVolume) -> None:
        try:
            await self._backend.destroy(volume.ident)
        except Exception:
            self._failures += 1
            raise
        self._released += 1

    def _is_prepared(self) -> bool:
        return all(len(self._ready[size_mib]) >= count for size_mib, count in self._targets.items())

    async def _refill_forever(self, size_mib: int, count: int) -> None:
        wake = self._wake[size_mib]
        delay_s = self._retry_delay_s
        while True:
            wake.clear()  # before looking, so that an acquire() while we make one is not missed
            while len(self._ready[size_mib]) < count:
                try:
                    await self._make(size_mib, for_pool=True)
                except PlatformError:  # a boundary: the refill keeps going; acquire() makes volumes meanwhile
                    log.exception("preparing a scratch volume failed", extra={"size_mib": size_mib})
                    await asyncio.sleep(delay_s)
                    delay_s = min(delay_s * 2, _RETRY_MAX_S)
                    continue
                delay_s = self._retry_delay_s
            await wake.wait()


# --- the loop-mounted ext4 backend ----------------------------------------------------------------


class LoopScratchBackend:
    """Volumes as ext4 images in sparse files under `root`, loop-mounted on the host."""

    def __init__(self, root: Path, *, uid: int, gid: int, tools: Mapping[str, str], host_fs: str, lock_fd: int) -> None:
        self.root = root
        self._host_fs = host_fs
        self._images = root / "images"
        self._mnt = root / "mnt"
        self._uid = uid
        self._gid = gid
        self._tools = dict(tools)
        self._lock_fd: int | None = lock_fd
        self._makes = asyncio.Semaphore(_MAX_CONCURRENT_MAKES)
        self.direct_io: bool | None = None  # known after the first make

    @classmethod
    async def open(cls, root: Path, *, uid: int, gid: int, clean: bool = True) -> LoopScratchBackend:
        """Checks the host, takes `root` and, with `clean`, removes what was left there."""
        backend = cls._take(root, uid=uid, gid=gid)
        if clean:
            try:
                removed = await backend.destroy_all()
            except BaseException:
                backend.close()
                raise
            if removed:
                log.warning("removed scratch volumes left by a previous run", extra={"count": removed})
        return backend

    @classmethod
    def _take(cls, root: Path, *, uid: int, gid: int) -> LoopScratchBackend:
        if os.geteuid() != 0:
            raise SandboxUnavailableError(
                f"scratch volumes need root (loop devices, mount); running as uid {os.geteuid()}"
            )
        tools = {key: shutil.which(name, path=_TOOL_PATH) for key, name in _TOOLS.items()}
        missing = sorted(_TOOLS[key] for key, path in tools.items() if path is None)
        if missing:
            raise SandboxUnavailableError(
                f"scratch volumes need {', '.join(missing)}, not found in {_TOOL_PATH}"
                " (hint: apt-get install e2fsprogs mount)"
            )
        if not Path("/dev/loop-control").exists():
            raise SandboxUnavailableError(
                "scratch volumes need loop devices: /dev/loop-control is missing"
                " (hint: modprobe loop; in a container, pass the loop devices in)"
            )
        root = root.resolve()  # the kernel reports resolved paths (mountinfo, loop backing files)
        host_fs = fs_type_of(_mountinfo(), root)
        if host_fs in _IN_MEMORY_FS:
            # The images would live in memory: /tmp data would take host RAM, without swap for good.
            raise SandboxUnavailableError(
                f"scratch volumes under {root} would be in memory ({host_fs}): put the data dir on a disk"
            )
        for directory in (root, root / "images", root / "mnt"):
            directory.mkdir(mode=0o700, exist_ok=True)
            # Whatever was there before: only root may look at or into the volumes' parents.
            os.chown(directory, 0, 0)
            directory.chmod(0o700)
        tools_found = {k: v for k, v in tools.items() if v}
        return cls(root, uid=uid, gid=gid, tools=tools_found, host_fs=host_fs, lock_fd=_lock(root))

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def describe(self) -> dict[str, object]:
        host = os.statvfs(self.root)
        return {
            "kind": "ext4 image on a loop device",
            "root": str(self.root),
            "host_fs": self._host_fs,
            "owner": f"{self._uid}:{self._gid}",
            "direct_io": self.direct_io,
            "tools": dict(self._tools),
            "host_free_mib": host.f_bavail * host.f_frsize // _MIB,
        }

    async def make(self, ident: str, size_mib: int) -> Path:
        image = self._images / f"{ident}.img"
        mount_path = self._mnt / ident
        async with self._makes:
            try:
                await self._make_steps(image, mount_path, size_mib)
            except BaseException:
                # Whatever step failed or was cancelled, look at what exists and remove it.
                await self.destroy(ident)
                raise
        return mount_path

    async def _make_steps(self, image: Path, mount_path: Path, size_mib: int) -> None:
        try:
            _create(image, mount_path, image_size_mib(size_mib) * _MIB)
            await _run(mkfs_argv(self._tools["mkfs"], image, uid=self._uid, gid=self._gid))
            device = (await _run(attach_argv(self._tools["losetup"], image))).strip()
            await _run(mount_argv(self._tools["mount"], device, mount_path))
            # On a device in use, detaching only sets the autoclear flag: the kernel detaches it at the
            # last close, so at unmount, or when the last sandbox holding a bind of it exits.
            await _run([self._tools["losetup"], "--detach", device])
            # A handful of syscalls on a new, empty file system: too quick to be worth a thread.
            _finish_root(mount_path, size_mib)
            self.direct_io = _sysfs_flag(device, "dio")
        except OSError as exc:
            raise SandboxSpawnError(f"cannot make scratch volume {mount_path.name}: {exc}") from exc

    async def destroy(self, ident: str) -> None:
        image = self._images / f"{ident}.img"
        mount_path = self._mnt / ident
        for point in mount_points_under(_mountinfo(), self._mnt):
            if point == mount_path or point.is_relative_to(mount_path):
                await self._unmount(point)
        await self._detach(image)
        await asyncio.to_thread(_remove, image, mount_path)  # unlinking a full image takes ~100 ms

    async def destroy_all(self) -> int:
        """Destroys every volume under root; returns how many there were."""
        idents = {p.name for p in _entries(self._mnt)}
        idents |= {p.name.removesuffix(".img") for p in _entries(self._images)}
        idents |= {p.relative_to(self._mnt).parts[0] for p in mount_points_under(_mountinfo(), self._mnt)}
        idents |= {Path(b).name.removesuffix(".img") for b in _loop_devices_backed_by(self._images, None).values()}
        for ident in sorted(idents):
            await self.destroy(ident)
        # Anything else in images/ goes too, whatever its name: the directory is ours alone.
        for device in _loop_devices_backed_by(self._images, None):
            await _run([self._tools["losetup"], "--detach", device])
        for leftover in _entries(self._images):
            await asyncio.to_thread(leftover.unlink)
        return len(idents)

    async def _detach(self, image: Path) -> None:
        # Autoclear detaches the device at its last close: usually within the unmount, rarely a moment
        # later. One still attached after that was never mounted (a crash between attaching and
        # mounting) or is still in use (a lazy unmount); detaching the latter only sets autoclear.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _DETACH_WAIT_S
        # Polling: nothing to wait on short of listening to uevents.
        while (devices := _loop_devices_backed_by(self._images, {image})) and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(_DETACH_POLL_S)
        for device in devices:
            try:
                await _run([self._tools["losetup"], "--detach", device])
            except SandboxSpawnError:
                if device in _loop_devices_backed_by(self._images, {image}):
                    raise
                # detached by autoclear meanwhile

    async def _unmount(self, point: Path) -> None:
        # The volume's contents are discarded: shutting the file system down first makes the kernel
        # drop its dirty pages instead of writing them to the image at unmount (measured on a buffered
        # loop device with 400 MB dirty: umount 630 ms -> 45 ms; direct I/O keeps less dirty anyway).
        await asyncio.to_thread(_shut_down, point)
        try:
            await _run([self._tools["umount"], str(point)])
        except SandboxSpawnError:
            # Busy (a process still has a file or its cwd there): detach it now; the kernel frees the
            # file system, and autoclear the loop device, once the last user lets go.
            await _run([self._tools["umount"], "--lazy", str(point)])
            log.warning("scratch volume was busy, unmounted lazily", extra={"mount_path": str(point)})


async def _run(argv: Sequence[str]) -> str:
    """Runs a tool to its end and returns its stdout; raises SandboxSpawnError if it fails.

    Cancelling the caller does not stop the tool midway: the caller cleans up by looking at what
    exists, which must not change behind its back (a loop device attached, a mount made after it
    looked). The tools take milliseconds, and a hung one is killed after _TOOL_TIMEOUT_S."""
    task = asyncio.ensure_future(_run_to_end(argv))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await task
        raise


async def _run_to_end(argv: Sequence[str]) -> str:
    # posix_spawn, not asyncio's subprocesses: those fork the platform and stall its loop.
    try:
        result = await run_process(argv, env=_TOOL_ENV, timeout_s=_TOOL_TIMEOUT_S)
    except TimeoutError:
        raise SandboxSpawnError(f"{' '.join(argv)} did not finish in {_TOOL_TIMEOUT_S:g}s") from None
    if result.returncode != 0:
        detail = result.stderr.decode(errors="replace").strip() or f"exit status {result.returncode}"
        raise SandboxSpawnError(f"{Path(argv[0]).name} failed: {detail} (command: {' '.join(argv)})")
    return result.stdout.decode(errors="replace")


def _lock(root: Path) -> int:
    """Takes root's lock for as long as the returned fd is open (close-on-exec: sandboxes do not get it)."""
    fd = os.open(root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise SandboxUnavailableError(
            f"scratch volumes under {root} belong to a running platform (pid {owner}):"
            " give each platform its own data dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _create(image: Path, mount_path: Path, image_bytes: int) -> None:
    # A sparse file: the host disk is used only as the instance writes.
    fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, image_bytes)
    finally:
        os.close(fd)
    mount_path.mkdir(mode=0o700)


def _finish_root(mount_path: Path, size_mib: int) -> None:
    """Makes the new file system's root private and empty, and checks its size."""
    # lost+found only serves fsck, which never runs on a volume that dies with its instance.
    (mount_path / "lost+found").rmdir()
    # mkfs made the root 0755 (root_owner sets only the owner): only the instance user may enter.
    mount_path.chmod(0o700)
    fs = os.statvfs(mount_path)
    available_mib = fs.f_bavail * fs.f_frsize / _MIB
    if available_mib < size_mib:
        raise InternalError(
            f"scratch volume {mount_path} offers {available_mib:.1f} MiB, less than its {size_mib} MiB:"
            " image_size_mib() no longer matches this mkfs.ext4"
        )


def _sysfs_flag(device: str, name: str) -> bool:
    try:
        return Path(f"/sys/block/{Path(device).name}/loop/{name}").read_text().strip() == "1"
    except OSError:
        return False


def _shut_down(mount_path: Path) -> None:
    try:
        fd = os.open(mount_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return  # unmounting without it is only slower
    try:
        fcntl.ioctl(fd, _EXT4_IOC_SHUTDOWN, struct.pack("I", _EXT4_GOING_FLAGS_NOLOGFLUSH))
    except OSError as exc:
        log.debug("scratch shutdown ioctl failed", extra={"mount_path": str(mount_path), "errno": exc.errno})
    finally:
        os.close(fd)


def _remove(image: Path, mount_path: Path) -> None:
    image.unlink(missing_ok=True)
    with contextlib.suppress(FileNotFoundError):
        mount_path.rmdir()


def _is_dir(path: Path) -> bool:
    return path.is_dir()


def _mountinfo() -> str:
    return Path("/proc/self/mountinfo").read_text()


def _entries(directory: Path) -> list[Path]:
    try:
        return list(directory.iterdir())
    except FileNotFoundError:
        return []


def _loop_devices_backed_by(images: Path, only: Iterable[Path] | None) -> dict[str, str]:
    """Loop devices whose backing file is in `images` (or is one of `only`): device -> file."""
    wanted = None if only is None else {str(p) for p in only}
    found: dict[str, str] = {}
    for backing_file in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            # An image unlinked while still attached shows as "<path> (deleted)".
            backing = backing_file.read_text().rstrip("\n").removesuffix(" (deleted)")
        except OSError:
            continue  # detached meanwhile
        if (wanted is None and Path(backing).parent == images) or (wanted is not None and backing in wanted):
            found[f"/dev/{backing_file.parent.parent.name}"] = backing
    return found
