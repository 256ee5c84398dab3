"""Scratch volumes for real (root): ext4 images on loop devices, filled by a process running as the
instance user, inside a small memory cgroup, released, prewarmed, and cleaned up after a platform
that was killed."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import secrets
import signal
import stat
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from hxb.errors import SandboxUnavailableError
from hxb.sandbox.scratch import ScratchVolume, ScratchVolumes, image_size_mib, mount_points_under
from tests.conftest import missing

MIB = 1024 * 1024
UID = 64_321  # the instance user: any uid works for root, none needs to exist
GID = 64_321
OTHER_UID = 64_322


# --- helpers --------------------------------------------------------------------------------------


def mounts_under(root: Path) -> list[Path]:
    return mount_points_under(Path("/proc/self/mountinfo").read_text(), root.resolve())


def loop_devices_under(root: Path) -> list[str]:
    """Loop devices whose backing file lies under `root`."""
    prefix = str(root.resolve()) + "/"
    found = []
    for backing_file in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            if backing_file.read_text().startswith(prefix):
                found.append(backing_file.parent.parent.name)
    return found


@contextlib.contextmanager
def tmpfs_at(path: Path) -> Iterator[Path]:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128m,mode=0777", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def losetup_list() -> str:
    return subprocess.run(["losetup", "-a"], check=True, capture_output=True, text=True).stdout


def is_mount(path: Path) -> bool:
    return os.path.ismount(path)


def is_attached(device: str) -> bool:
    return Path(f"/sys/block/{device}/loop/backing_file").exists()


def loop_device_of(mount_path: Path) -> str:
    dev = os.stat(mount_path).st_dev
    return Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}").resolve().name


def image_of(root: Path, volume: ScratchVolume) -> Path:
    return root.resolve() / "images" / f"{volume.ident}.img"


def assert_nothing_left(root: Path) -> None:
    root = root.resolve()
    assert mounts_under(root) == []
    assert loop_devices_under(root) == []
    assert list((root / "images").iterdir()) == []
    assert list((root / "mnt").iterdir()) == []


def run_as(
    uid: int, gid: int, cwd: Path, action: Callable[[int], int], *, before_start: Callable[[int], None] | None = None
) -> tuple[int, str]:
    """Forks a child that enters `cwd` while still root (the volumes' parent directory is root's
    alone, as the sandbox's bind mount at /tmp makes it unnecessary), becomes uid:gid, and exits
    with `action(out_fd)`. `before_start(pid)` runs before the child may go on. Returns the wait
    status and what the child wrote to out_fd."""
    go_r, go_w = os.pipe()
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 70
        try:
            os.close(go_w)
            os.close(out_r)
            os.read(go_r, 1)
            os.chdir(cwd)
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            code = action(out_w)
        except BaseException:  # noqa: BLE001 -- whatever happened, the child must exit here
            code = 71
        finally:
            os._exit(code)
    os.close(go_r)
    os.close(out_w)
    try:
        if before_start is not None:
            before_start(pid)
        os.write(go_w, b"g")
    finally:
        os.close(go_w)
        _, status = os.waitpid(pid, 0)
        with os.fdopen(out_r) as out:
            output = out.read()
    return status, output


def fill_until_full(out_fd: int) -> int:
    written = 0
    chunk = b"\xa5" * MIB  # not zeros: nothing may store it as a hole
    fd = os.open("fill", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        while True:
            written += os.write(fd, chunk)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            return 2
    os.write(out_fd, str(written).encode())
    return 0


class MemoryCgroup:
    """A fresh memory cgroup (v1 if the memory controller is mounted there, else v2), removed after."""

    def __init__(self, limit_bytes: int) -> None:
        name = f"hxbtest-{secrets.token_hex(4)}"
        v1 = Path("/sys/fs/cgroup/memory")
        v2 = Path("/sys/fs/cgroup")
        if (v1 / "memory.limit_in_bytes").exists():
            self.path, self.v2 = v1 / name, False
        elif "memory" in (v2 / "cgroup.subtree_control").read_text().split():
            self.path, self.v2 = v2 / name, True
        else:
            missing("no memory cgroup controller to test against")
        self.limit_bytes = limit_bytes

    def __enter__(self) -> MemoryCgroup:
        self.path.mkdir()
        limit_file = "memory.max" if self.v2 else "memory.limit_in_bytes"
        (self.path / limit_file).write_text(str(self.limit_bytes))
        return self

    def __exit__(self, *exc: object) -> None:
        # The child was reaped already; its page cache may stay charged to the removed cgroup.
        self.path.rmdir()

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def oom_kills(self) -> int:
        counters = (self.path / ("memory.events" if self.v2 else "memory.oom_control")).read_text().split()
        return int(counters[counters.index("oom_kill") + 1])


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture
async def scratch_root(tmp_path: Path) -> AsyncIterator[Path]:
    root = tmp_path / "scratch"
    try:
        yield root
    finally:
        # The safety net for a failed test: nothing stays mounted or attached.
        await ScratchVolumes.cleanup_stale(root)


@pytest.fixture
async def volumes(scratch_root: Path) -> AsyncIterator[ScratchVolumes]:
    scratch = await ScratchVolumes.open(scratch_root, uid=UID, gid=GID, prewarm={})
    try:
        yield scratch
    finally:
        await scratch.close()


# --- tests ----------------------------------------------------------------------------------------


async def test_volume_is_mounted_empty_and_private_to_the_instance_user(volumes: ScratchVolumes) -> None:
    volume = await volumes.acquire(64)
    assert is_mount(volume.mount_path)
    assert os.listdir(volume.mount_path) == []  # no lost+found
    st = os.stat(volume.mount_path)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o700, UID, GID)
    flags = os.statvfs(volume.mount_path).f_flag
    assert flags & os.ST_NOSUID
    assert flags & os.ST_NODEV
    assert flags & os.ST_NOATIME
    assert not flags & os.ST_NOEXEC


def create_and_read_back(out_fd: int) -> int:
    Path("mine").write_text("hello")
    return 0 if Path("mine").read_text() == "hello" and os.listdir(".") == ["mine"] else 1


def try_to_look_in(out_fd: int) -> int:
    refused = 0
    for attempt in (lambda: os.listdir("."), lambda: os.open("theirs", os.O_WRONLY | os.O_CREAT, 0o600)):
        try:
            attempt()
        except PermissionError:
            refused += 1
    return 0 if refused == 2 else 1


async def test_only_the_instance_user_can_read_or_write_the_volume(volumes: ScratchVolumes) -> None:
    volume = await volumes.acquire(16)
    status, _ = run_as(UID, GID, volume.mount_path, create_and_read_back)
    assert os.waitstatus_to_exitcode(status) == 0
    status, _ = run_as(OTHER_UID, OTHER_UID, volume.mount_path, try_to_look_in)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("size_mib", [1, 64, 512, 10240])
async def test_volume_offers_at_least_its_size(volumes: ScratchVolumes, size_mib: int) -> None:
    volume = await volumes.acquire(size_mib)
    fs = os.statvfs(volume.mount_path)
    available_bytes = fs.f_bavail * fs.f_frsize
    assert size_mib * MIB <= available_bytes < image_size_mib(size_mib) * MIB


async def test_writes_stop_with_enospc_just_past_the_size(volumes: ScratchVolumes) -> None:
    volume = await volumes.acquire(64)
    status, output = run_as(UID, GID, volume.mount_path, fill_until_full)
    assert os.waitstatus_to_exitcode(status) == 0
    written_bytes = int(output)
    headroom_mib = image_size_mib(64) - 64
    assert 64 * MIB <= written_bytes < (64 + headroom_mib) * MIB


def write_64_mib(fsync: bool) -> Callable[[int], int]:
    def action(out_fd: int) -> int:
        chunk = b"\x5a" * MIB
        fd = os.open("data", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        for _ in range(64):
            os.write(fd, chunk)
        if fsync:
            os.fsync(fd)
        os.close(fd)
        return 0

    return action


@pytest.mark.parametrize("fsync", [True, False], ids=["fsync", "no_fsync"])
async def test_writes_are_not_held_against_a_small_memory_limit(
    volumes: ScratchVolumes, scratch_root: Path, fsync: bool
) -> None:
    # The key property: a 32 MB instance writes 64 MB to its /tmp. The page cache is charged to its
    # memory cgroup, but the kernel writes it back and reclaims it at the limit instead of OOM-killing.
    volume = await volumes.acquire(128)
    with MemoryCgroup(32 * MIB) as cgroup:
        status, _ = run_as(UID, GID, volume.mount_path, write_64_mib(fsync), before_start=cgroup.add)
        oom_kills = cgroup.oom_kills()
    assert os.waitstatus_to_exitcode(status) == 0, f"wait status {status:#x}, {oom_kills} OOM kills"
    assert oom_kills == 0
    assert os.stat(volume.mount_path / "data").st_size == 64 * MIB
    if fsync:  # the data is in the image on the host disk
        assert os.stat(image_of(scratch_root, volume)).st_blocks * 512 >= 64 * MIB


def test_the_same_writes_to_tmpfs_are_oom_killed(tmp_path: Path) -> None:
    # The control for the test above: without it, a cgroup that did not bite would pass it too.
    with tmpfs_at(tmp_path / "tmpfs") as tmpfs, MemoryCgroup(32 * MIB) as cgroup:
        status, _ = run_as(UID, GID, tmpfs, write_64_mib(True), before_start=cgroup.add)
        oom_kills = cgroup.oom_kills()
    assert os.waitstatus_to_exitcode(status) == -signal.SIGKILL
    assert oom_kills == 1


async def test_release_unmounts_detaches_and_deletes_the_image(volumes: ScratchVolumes, scratch_root: Path) -> None:
    volume = await volumes.acquire(64)
    image = image_of(scratch_root, volume)
    device = loop_device_of(volume.mount_path)
    assert str(image) in losetup_list()
    (volume.mount_path / "junk").write_bytes(b"x" * 8 * MIB)
    released_before = volumes.statistics().released
    await volumes.release(volume)
    assert volume.mount_path not in mounts_under(scratch_root)
    assert not volume.mount_path.exists()
    assert not image.exists()
    assert str(image) not in losetup_list()
    assert not is_attached(device)
    await volumes.release(volume)  # idempotent
    assert volumes.statistics().released == released_before + 1
    assert volumes.statistics().in_use == 0
    assert_nothing_left(scratch_root)


async def test_release_of_a_busy_volume_unmounts_lazily(volumes: ScratchVolumes, scratch_root: Path) -> None:
    volume = await volumes.acquire(16)
    image = image_of(scratch_root, volume)
    device = loop_device_of(volume.mount_path)
    fd = os.open(volume.mount_path / "held", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        await volumes.release(volume)
        assert mounts_under(scratch_root) == []
        assert not image.exists()
        # Still attached to the unlinked image while the file system is in use...
        assert is_attached(device)
    finally:
        os.close(fd)
    # ...and detached by autoclear once its last user lets go.
    async with asyncio.timeout(5):
        while is_attached(device):  # noqa: ASYNC110 -- nothing to wait on short of uevents
            await asyncio.sleep(0.01)
    assert_nothing_left(scratch_root)


async def test_prewarm_keeps_volumes_ready(scratch_root: Path) -> None:
    scratch = await ScratchVolumes.open(scratch_root, uid=UID, gid=GID, prewarm={16: 2})
    try:
        async with asyncio.timeout(20):
            await scratch.wait_prepared()
        made_before = scratch.statistics().made
        assert scratch.statistics().prepared == {16: 2}
        assert len(mounts_under(scratch_root)) == 2
        volume = await scratch.acquire(16)
        assert scratch.statistics().made == made_before  # from the pool: no mkfs, no mount
        assert is_mount(volume.mount_path)
        async with asyncio.timeout(20):
            await scratch.wait_prepared()
        assert scratch.statistics().prepared == {16: 2}
        assert scratch.statistics().made == made_before + 1
        assert len(mounts_under(scratch_root)) == 3
    finally:
        await scratch.close()
    assert_nothing_left(scratch_root)


async def test_concurrent_acquires_get_distinct_volumes(volumes: ScratchVolumes, scratch_root: Path) -> None:
    got = await asyncio.gather(*(volumes.acquire(16) for _ in range(8)))
    assert len({v.mount_path for v in got}) == 8
    assert all(is_mount(v.mount_path) for v in got)
    assert len({os.stat(v.mount_path).st_dev for v in got}) == 8  # eight file systems
    await asyncio.gather(*(volumes.release(v) for v in got))
    assert_nothing_left(scratch_root)


async def test_close_releases_everything(scratch_root: Path) -> None:
    scratch = await ScratchVolumes.open(scratch_root, uid=UID, gid=GID, prewarm={16: 1})
    await scratch.acquire(16)
    await scratch.acquire(32)
    await scratch.close()
    assert_nothing_left(scratch_root)


@pytest.mark.parametrize("delay_s", [0, 0.002, 0.005, 0.01, 0.02])
async def test_close_while_a_refill_is_making_leaves_nothing(scratch_root: Path, delay_s: float) -> None:
    # Cancelled at some step of mkfs, losetup, mount, detach: whatever that step left goes too.
    scratch = await ScratchVolumes.open(scratch_root, uid=UID, gid=GID, prewarm={16: 1})
    await scratch.acquire(16)  # the refill starts making the next one
    await asyncio.sleep(delay_s)
    await scratch.close()
    assert_nothing_left(scratch_root)


async def test_a_second_platform_cannot_take_the_same_root(volumes: ScratchVolumes, scratch_root: Path) -> None:
    with pytest.raises(SandboxUnavailableError, match="running platform"):
        await ScratchVolumes.open(scratch_root, uid=UID, gid=GID, prewarm={})
    with pytest.raises(SandboxUnavailableError, match="running platform"):
        await ScratchVolumes.cleanup_stale(scratch_root)


async def test_open_refuses_a_root_in_memory(tmp_path: Path) -> None:
    with tmpfs_at(tmp_path / "tmpfs") as tmpfs, pytest.raises(SandboxUnavailableError, match="in memory"):
        await ScratchVolumes.open(tmpfs / "scratch", uid=UID, gid=GID, prewarm={})


def run_platform_and_kill_it(root: Path) -> subprocess.CompletedProcess[str]:
    code = textwrap.dedent(
        f"""
        import asyncio, os, signal
        from pathlib import Path
        from hxb.sandbox.scratch import ScratchVolumes

        async def main():
            scratch = await ScratchVolumes.open(Path({str(root)!r}), uid={UID}, gid={GID}, prewarm={{16: 1}})
            await scratch.wait_prepared()
            await scratch.acquire(16)  # the refill starts making another: killed midway, maybe
            await scratch.acquire(32)
            os.kill(os.getpid(), signal.SIGKILL)

        asyncio.run(main())
        """
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False)


def attach_stray_loop_device(root: Path) -> str:
    """What a crash between attaching a loop device and mounting it leaves."""
    image = root.resolve() / "images" / "16m-000000000000.img"
    image.write_bytes(b"")
    os.truncate(image, 16 * MIB)
    return subprocess.run(
        ["losetup", "--find", "--show", str(image)], check=True, capture_output=True, text=True
    ).stdout.strip()


async def test_cleanup_stale_removes_what_a_killed_platform_left(scratch_root: Path) -> None:
    killed = run_platform_and_kill_it(scratch_root)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert len(mounts_under(scratch_root)) >= 2
    attach_stray_loop_device(scratch_root)
    assert loop_devices_under(scratch_root)

    removed = await ScratchVolumes.cleanup_stale(scratch_root)

    assert removed >= 3
    assert_nothing_left(scratch_root)
    scratch = await ScratchVolumes.open(scratch_root, uid=UID, gid=GID, prewarm={})
    await scratch.close()


async def test_open_cleans_up_what_a_killed_platform_left(scratch_root: Path) -> None:
    killed = run_platform_and_kill_it(scratch_root)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    scratch = await ScratchVolumes.open(scratch_root, uid=UID, gid=GID, prewarm={})
    try:
        assert mounts_under(scratch_root) == []
        assert loop_devices_under(scratch_root) == []
    finally:
        await scratch.close()
    assert_nothing_left(scratch_root)
