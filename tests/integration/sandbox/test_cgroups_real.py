"""CgroupDriver on the host's real cgroupfs (v2, or v1 on hybrid hosts): limits that the kernel
enforces (OOM kill, pids.max, CPU throttling), the readers, kill_all, remove and cleanup_stale.

Every group lives under the prefix `hxbtest`, and each test kills and removes what it made,
even when it fails. Children are forked and leave with os._exit, never through pytest. On a v2
host the first `create` moves this test process into `<own>/hxbtest-platform`, as the platform
moves itself: v2 allows no processes in a group that hands controllers to its children.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hxb.sandbox.cgroups import Cgroup, CgroupDriver, CgroupError, CgroupLimits
from tests.conftest import missing

MIB = 1024 * 1024
PREFIX = "hxbtest"
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")

MakeGroup = Callable[..., Cgroup]


@pytest.fixture
def driver() -> Iterator[CgroupDriver]:
    drv = CgroupDriver.detect(prefix=PREFIX)
    yield drv
    groups_under: dict[str, str] = drv.describe()["groups_under"]  # type: ignore[assignment]
    for path in groups_under.values():
        # Another test session may still use the prefix groups: then they stay (EBUSY).
        with contextlib.suppress(OSError):
            os.rmdir(path)


@pytest.fixture
def make_group(driver: CgroupDriver) -> Iterator[MakeGroup]:
    made: list[Cgroup] = []

    def make(name: str, *, memory_mb: int = 256, cpu_quota_us: int | None = None, pids_max: int = 1024) -> Cgroup:
        limits = CgroupLimits(memory_bytes=memory_mb * MIB, cpu_quota_us=cpu_quota_us, pids_max=pids_max)
        group = driver.create(name, limits)
        made.append(group)
        return group

    yield make
    failures: list[CgroupError] = []
    for group in made:
        try:
            group.kill_all()
            group.remove()
        except CgroupError as exc:
            failures.append(exc)
    assert not failures


def fork_into(group: Cgroup, body: Callable[[], int]) -> int:
    """Forks a child that joins `group`, runs `body` and exits with its return value."""
    join_paths = group.join_paths()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 100
        try:
            for path in join_paths:
                with open(path, "w") as f:
                    f.write("0")
            code = body()
        finally:
            os._exit(code)
    return pid


def wait_status(pid: int, timeout_s: float = 20.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"child {pid} did not exit within {timeout_s}s")


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def group_dirs(group: Cgroup) -> list[Path]:
    return [Path(p).parent for p in group.join_paths()]


def cpu_dir(group: Cgroup) -> Path:
    return next(d for d in group_dirs(group) if (d / "cpu.max").exists() or (d / "cpu.cfs_quota_us").exists())


def pause_forever() -> int:
    signal.pause()  # until killed
    return 0


def allocate_and_touch(size_bytes: int) -> bytearray:
    buf = bytearray(size_bytes)  # calloc'd: pages count only once written
    for offset in range(0, size_bytes, PAGE_BYTES):
        buf[offset] = 1
    return buf


def test_child_over_the_memory_limit_is_oom_killed(make_group: MakeGroup) -> None:
    group = make_group("oom", memory_mb=64)

    def hog() -> int:
        allocate_and_touch(200 * MIB)
        return 0

    status = wait_status(fork_into(group, hog))
    assert os.WIFSIGNALED(status)
    assert os.WTERMSIG(status) == signal.SIGKILL
    assert group.oom_kill_count() >= 1


def test_forking_stops_at_pids_max_and_nothing_leaks(make_group: MakeGroup) -> None:
    group = make_group("forkbomb", pids_max=20)

    def fork_until_refused() -> int:
        forked = 0
        while forked < 200:
            try:
                child = os.fork()
            except BlockingIOError as exc:
                return forked if exc.errno == errno.EAGAIN else 250
            if child == 0:
                signal.pause()  # until kill_all
                os._exit(0)
            forked += 1
        return 251

    status = wait_status(fork_into(group, fork_until_refused))
    assert os.WIFEXITED(status)
    assert os.WEXITSTATUS(status) == 19  # the forking child itself is the 20th
    assert len(group.pids()) == 19  # its orphans, still in the group
    group.kill_all()
    assert group.pids() == []
    group.remove()
    assert not any(d.exists() for d in group_dirs(group))


def test_memory_peak_grows_after_allocating(make_group: MakeGroup) -> None:
    group = make_group("peak", memory_mb=256)
    before = group.memory_peak_bytes()
    if before is None:
        missing("this kernel has no memory.peak (Linux < 5.19)")

    def allocate() -> int:
        allocate_and_touch(30 * MIB)
        return 0

    status = wait_status(fork_into(group, allocate))
    assert os.WIFEXITED(status)
    assert os.WEXITSTATUS(status) == 0
    after = group.memory_peak_bytes()
    assert after is not None
    assert after - before >= 30 * MIB


def test_kill_all_kills_a_tree_including_a_new_session(make_group: MakeGroup) -> None:
    group = make_group("tree")

    def spawn_tree() -> int:
        if os.fork() == 0:
            os.setsid()  # out of our process group and session: killpg would miss it
            if os.fork() == 0:
                signal.pause()
            signal.pause()
            os._exit(0)
        if os.fork() == 0:
            signal.pause()
            os._exit(0)
        signal.pause()
        return 0

    child = fork_into(group, spawn_tree)
    try:
        wait_until(lambda: len(group.pids()) >= 4)
        group.kill_all()
        assert group.pids() == []
        status = wait_status(child)
        assert os.WIFSIGNALED(status)
        assert os.WTERMSIG(status) == signal.SIGKILL
    finally:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)


def test_remove_leaves_nothing(make_group: MakeGroup) -> None:
    group = make_group("removed")
    dirs = group_dirs(group)
    assert all(d.is_dir() for d in dirs)
    started = time.perf_counter()
    group.remove()
    elapsed_s = time.perf_counter() - started
    assert not any(d.exists() for d in dirs)
    group.remove()  # idempotent
    assert elapsed_s < 0.5


def test_remove_waits_for_processes_that_are_still_exiting(make_group: MakeGroup) -> None:
    group = make_group("exiting")
    child = fork_into(group, pause_forever)
    wait_until(lambda: group.pids() == [child])
    os.kill(child, signal.SIGKILL)
    group.remove()  # EBUSY until the child is gone from the group, then it succeeds
    assert not any(d.exists() for d in group_dirs(group))
    os.waitpid(child, 0)


def test_remove_of_a_busy_group_names_it(make_group: MakeGroup) -> None:
    group = make_group("busy")
    child = fork_into(group, pause_forever)
    try:
        wait_until(lambda: group.pids() == [child])
        with pytest.raises(CgroupError, match=rf"cannot remove cgroup .*\.busy: .*still busy .* \[{child}\]"):
            group.remove(timeout_s=0.05)
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def test_cleanup_stale_removes_the_groups_of_a_platform_that_was_killed(
    driver: CgroupDriver, make_group: MakeGroup
) -> None:
    ours = make_group("ours")
    read_fd, write_fd = os.pipe()
    platform = os.fork()
    if platform == 0:  # a platform that makes a group with a process in it, then dies uncleanly
        code = 100
        try:
            os.close(read_fd)
            dead = CgroupDriver.detect(prefix=PREFIX)
            leftover = dead.create("leftover", CgroupLimits(memory_bytes=64 * MIB, cpu_quota_us=None))

            def linger() -> int:
                os.close(write_fd)  # so that the test's read ends when the platform dies
                signal.pause()
                return 0

            fork_into(leftover, linger)
            wait_until(lambda: len(leftover.pids()) == 1)
            os.write(write_fd, "\n".join(leftover.join_paths()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    reaped = False
    try:
        with os.fdopen(read_fd, "rb") as pipe:
            leftover_dirs = [Path(p).parent for p in pipe.read().decode().split()]
        # EOF comes as the platform closes its files, a moment before it is dead: wait for that.
        assert os.waitpid(platform, 0)[1] == 0
        reaped = True
        assert leftover_dirs
        assert all((d / "cgroup.procs").read_text().split() for d in leftover_dirs)
        assert driver.cleanup_stale() >= 1
        assert not any(d.exists() for d in leftover_dirs)
        assert all(d.is_dir() for d in group_dirs(ours))  # a live platform's group stays
    finally:
        if not reaped:
            os.waitpid(platform, 0)
        driver.cleanup_stale()  # whatever the test left of the dead platform


def test_cpu_quota_set_later_throttles_a_busy_loop(make_group: MakeGroup) -> None:
    group = make_group("cpu", cpu_quota_us=None)  # init runs unthrottled...
    group.set_cpu_quota(10_000)  # ...then 10 ms per 20 ms period

    def spin() -> int:
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            pass
        return 0

    status = wait_status(fork_into(group, spin))
    assert os.WIFEXITED(status)
    stat = dict(line.split() for line in (cpu_dir(group) / "cpu.stat").read_text().splitlines())
    assert int(stat["nr_throttled"]) > 0


def test_v1_quota_above_an_ancestors_falls_back_to_unlimited() -> None:
    # A prefix of its own: capping the shared one would make other tests' writes fail.
    driver = CgroupDriver.detect(prefix=f"{PREFIX}cap")
    if driver.version != 1:
        pytest.skip("only cgroup v1 refuses a child more CPU than its ancestors")
    driver.prepare()
    groups_under: dict[str, str] = driver.describe()["groups_under"]  # type: ignore[assignment]
    prefix_quota = Path(groups_under["cpu"]) / "cpu.cfs_quota_us"
    group: Cgroup | None = None
    try:
        prefix_quota.write_text("50000")  # half a CPU for everything under the prefix
        group = driver.create("capped", CgroupLimits(memory_bytes=64 * MIB, cpu_quota_us=170_040))
        assert (cpu_dir(group) / "cpu.cfs_quota_us").read_text().strip() == "-1"
    finally:
        if group is not None:
            group.remove()
        prefix_quota.write_text("-1")
        for path in groups_under.values():
            with contextlib.suppress(OSError):
                os.rmdir(path)
