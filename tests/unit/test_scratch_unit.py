"""Scratch volumes without a kernel: the image size formula, the tool command lines it relies on,
mountinfo parsing, and the pool's books on a fake backend."""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hxb.errors import ConfigError, InternalError, SandboxSpawnError, SandboxUnavailableError
from hxb.sandbox.scratch import (
    ScratchStatistics,
    ScratchVolumes,
    attach_argv,
    fs_type_of,
    image_size_mib,
    mkfs_argv,
    mount_argv,
    mount_points_under,
    new_ident,
)

# --- the image size ---------------------------------------------------------------------------


def _ext4_overhead_mib(image_mib: int) -> int:
    """What ext4 takes out of an image of this size: inode tables (1/64), the reserved clusters
    (2%, at most 16 MiB), and 1 MiB for the rest."""
    return math.ceil(image_mib / 64) + min(math.ceil(image_mib / 50), 16) + 1


def test_image_size_covers_the_overhead_of_the_image_itself() -> None:
    # The overhead grows with the image, not with the requested size: the formula must be a fixed point.
    for size_mib in range(1, 10241):
        image_mib = image_size_mib(size_mib)
        assert image_mib - size_mib >= _ext4_overhead_mib(image_mib), size_mib


def test_image_size_headroom_stays_small_and_grows_with_the_size() -> None:
    previous_mib = 0
    for size_mib in range(1, 10241):
        image_mib = image_size_mib(size_mib)
        assert image_mib - size_mib <= 0.045 * size_mib + 4, size_mib
        assert image_mib >= previous_mib
        previous_mib = image_mib


@pytest.mark.parametrize(("size_mib", "image_mib"), [(64, 70), (512, 534), (10240, 10431)])
def test_image_size_for_typical_sizes(size_mib: int, image_mib: int) -> None:
    assert image_size_mib(size_mib) == image_mib


@pytest.mark.parametrize("size_mib", [0, -1])
def test_image_size_rejects_sizes_below_one_mib(size_mib: int) -> None:
    with pytest.raises(InternalError):
        image_size_mib(size_mib)


# --- command lines ----------------------------------------------------------------------------


def test_mkfs_argv_pins_what_the_size_formula_assumes() -> None:
    argv = mkfs_argv("/usr/sbin/mkfs.ext4", Path("/d/images/x.img"), uid=1234, gid=5678)
    pairs = dict(itertools.pairwise(argv))
    assert pairs["-b"] == "4096"
    assert pairs["-I"] == "256"
    assert pairs["-i"] == "16384"  # inode tables are 1/64 of the image
    assert pairs["-m"] == "0"
    assert set(pairs["-O"].split(",")) == {"^has_journal", "^resize_inode"}
    assert "root_owner=1234:5678" in pairs["-E"].split(",")
    assert argv[0] == "/usr/sbin/mkfs.ext4"
    assert argv[-1] == "/d/images/x.img"


def test_mount_argv_forbids_setuid_and_devices_but_allows_exec() -> None:
    argv = mount_argv("/usr/bin/mount", "/dev/loop3", Path("/d/mnt/x"))
    options = set(argv[argv.index("-o") + 1].split(","))
    assert {"nosuid", "nodev", "noatime"} <= options
    assert "noexec" not in options  # Lambda functions run binaries they put in /tmp
    assert argv[-2:] == ["/dev/loop3", "/d/mnt/x"]


def test_attach_argv_asks_for_direct_io() -> None:
    argv = attach_argv("/usr/sbin/losetup", Path("/d/images/x.img"))
    assert "--direct-io=on" in argv
    assert "--show" in argv


def test_new_ident_names_the_size_and_is_unique() -> None:
    idents = {new_ident(512) for _ in range(1000)}
    assert len(idents) == 1000
    assert all(ident.startswith("512m-") for ident in idents)
    assert all("/" not in ident for ident in idents)


def test_mount_points_under_unescapes_and_lists_deepest_first() -> None:
    mountinfo = (
        "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
        "40 22 7:0 / /data\\040dir/scratch/mnt/a rw,nosuid - ext4 /dev/loop0 rw\n"
        "41 40 0:5 / /data\\040dir/scratch/mnt/a/inner rw - tmpfs tmpfs rw\n"
        "42 22 7:1 / /data\\040dir/scratch/mntx rw - ext4 /dev/loop1 rw\n"
        "43 22 7:2 / /data\\040dir/scratch/mnt rw - ext4 /dev/loop2 rw\n"
    )
    points = mount_points_under(mountinfo, Path("/data dir/scratch/mnt"))
    assert points == [Path("/data dir/scratch/mnt/a/inner"), Path("/data dir/scratch/mnt/a")]


def test_fs_type_of_takes_the_deepest_and_latest_mount() -> None:
    mountinfo = (
        "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
        "30 22 0:40 / /run rw,nosuid shared:5 master:2 - tmpfs tmpfs rw\n"
        "31 22 0:41 / /srv rw - xfs /dev/vdb rw\n"
        "32 31 0:42 / /srv rw - tmpfs tmpfs rw\n"
    )
    assert fs_type_of(mountinfo, Path("/var/lib/hxb/scratch")) == "ext4"
    assert fs_type_of(mountinfo, Path("/run/hxb/scratch")) == "tmpfs"
    assert fs_type_of(mountinfo, Path("/srv/hxb")) == "tmpfs"  # stacked on the xfs
    assert fs_type_of(mountinfo, Path("/running")) == "ext4"


# --- the pool's books, on a fake backend --------------------------------------------------------


class FakeBackend:
    """Makes volumes instantly (or when `gate` is set), failing the next `fail_next` makes."""

    def __init__(self) -> None:
        self.made: list[str] = []
        self.destroyed: list[str] = []
        self.fail_next = 0
        self.gate: asyncio.Event | None = None
        self.closed = False

    @property
    def live(self) -> set[str]:
        return set(self.made) - set(self.destroyed)

    async def make(self, ident: str, size_mib: int) -> Path:
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_next:
            self.fail_next -= 1
            raise SandboxSpawnError("mkfs.ext4 failed: no space left on device")
        self.made.append(ident)
        return Path("/fake/mnt") / ident

    async def destroy(self, ident: str) -> None:
        self.destroyed.append(ident)

    def describe(self) -> dict[str, object]:
        return {"kind": "fake"}

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
async def volumes(backend: FakeBackend) -> AsyncIterator[ScratchVolumes]:
    scratch = ScratchVolumes(backend, prewarm={64: 2}, retry_delay_s=0)
    scratch.start()
    try:
        yield scratch
    finally:
        await scratch.close()


async def test_prewarm_fills_the_pool(volumes: ScratchVolumes, backend: FakeBackend) -> None:
    await volumes.wait_prepared()
    assert volumes.statistics() == ScratchStatistics(
        prepared={64: 2}, preparing=0, in_use=0, made=2, released=0, failures=0
    )
    assert len(backend.made) == 2


async def test_acquire_takes_from_the_pool_without_making_and_refills(
    volumes: ScratchVolumes, backend: FakeBackend
) -> None:
    await volumes.wait_prepared()
    pooled = list(backend.made)
    volume = await volumes.acquire(64)
    assert volume.ident == pooled[0]
    assert volume.size_mib == 64
    assert volume.mount_path == Path("/fake/mnt") / volume.ident
    assert len(backend.made) == 2  # nothing made in acquire() itself
    await volumes.wait_prepared()
    assert volumes.statistics().prepared == {64: 2}
    assert volumes.statistics().in_use == 1
    assert len(backend.made) == 3


async def test_acquire_makes_a_size_that_is_not_prewarmed(volumes: ScratchVolumes, backend: FakeBackend) -> None:
    await volumes.wait_prepared()
    volume = await volumes.acquire(128)
    assert volume.size_mib == 128
    assert volume.ident in backend.made
    assert volumes.statistics().prepared == {64: 2}


async def test_release_destroys_once_and_is_idempotent(volumes: ScratchVolumes, backend: FakeBackend) -> None:
    volume = await volumes.acquire(128)
    await volumes.release(volume)
    await volumes.release(volume)
    volumes.release_nowait(volume)
    assert backend.destroyed == [volume.ident]
    stats = volumes.statistics()
    assert (stats.in_use, stats.released) == (0, 1)


async def test_concurrent_acquires_get_distinct_volumes(volumes: ScratchVolumes) -> None:
    got = await asyncio.gather(*(volumes.acquire(64) for _ in range(8)))
    assert len({v.ident for v in got}) == 8
    assert volumes.statistics().in_use == 8


async def test_close_releases_ready_and_in_use_volumes(volumes: ScratchVolumes, backend: FakeBackend) -> None:
    await volumes.wait_prepared()
    await volumes.acquire(64)
    releasing = await volumes.acquire(256)
    volumes.release_nowait(releasing)
    await volumes.close()
    assert backend.live == set()
    assert backend.closed
    assert volumes.statistics().in_use == 0
    assert volumes.statistics().prepared == {64: 0}
    with pytest.raises(SandboxUnavailableError):
        await volumes.acquire(64)


async def test_close_stops_a_refill_that_is_waiting_to_make(backend: FakeBackend) -> None:
    backend.gate = asyncio.Event()
    scratch = ScratchVolumes(backend, prewarm={64: 2})
    scratch.start()
    await asyncio.sleep(0)  # the refill is now waiting in make()
    assert scratch.statistics().preparing == 1
    await scratch.close()
    assert backend.made == []
    assert scratch.statistics().preparing == 0


async def test_refill_keeps_trying_after_failures(volumes: ScratchVolumes, backend: FakeBackend) -> None:
    await volumes.wait_prepared()
    backend.fail_next = 3
    await volumes.acquire(64)
    await volumes.wait_prepared()
    stats = volumes.statistics()
    assert stats.prepared == {64: 2}
    assert stats.failures == 3


async def test_acquire_raises_when_making_fails(volumes: ScratchVolumes, backend: FakeBackend) -> None:
    await volumes.wait_prepared()
    backend.fail_next = 1
    with pytest.raises(SandboxSpawnError, match="no space left"):
        await volumes.acquire(128)
    assert volumes.statistics().in_use == 0


async def test_cancelled_acquire_gives_its_volume_back(volumes: ScratchVolumes, backend: FakeBackend) -> None:
    await volumes.wait_prepared()
    backend.gate = asyncio.Event()
    caller = asyncio.create_task(volumes.acquire(128))
    await asyncio.sleep(0)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    backend.gate.set()  # the make finishes after its caller gave up
    await volumes.close()
    made_128 = [ident for ident in backend.made if ident.startswith("128m-")]
    assert len(made_128) == 1
    assert made_128[0] in backend.destroyed


async def test_acquire_during_close_gets_an_error_and_leaves_nothing(backend: FakeBackend) -> None:
    scratch = ScratchVolumes(backend, prewarm={})
    scratch.start()
    backend.gate = asyncio.Event()
    caller = asyncio.create_task(scratch.acquire(64))
    await asyncio.sleep(0)
    closing = asyncio.create_task(scratch.close())
    await asyncio.sleep(0)
    backend.gate.set()
    with pytest.raises(SandboxUnavailableError):
        await caller
    await closing
    assert backend.live == set()


async def test_describe_counts_what_the_host_disk_may_have_to_hold(volumes: ScratchVolumes) -> None:
    await volumes.wait_prepared()
    await volumes.acquire(256)
    described = volumes.describe()
    assert described["kind"] == "fake"
    assert described["prewarm"] == {64: 2}
    assert described["committed_mib"] == 2 * 64 + 256


@pytest.mark.parametrize("prewarm", [{0: 1}, {64: -1}])
def test_invalid_prewarm_is_a_config_error(backend: FakeBackend, prewarm: dict[int, int]) -> None:
    with pytest.raises(ConfigError):
        ScratchVolumes(backend, prewarm=prewarm)
