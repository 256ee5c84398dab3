"""CgroupDriver against a cgroupfs stand-in in tmp_path: detection, where groups go, which files
get which values on v1 and v2, and the readers. Killing and removal are tested on the real
cgroupfs (tests/integration/sandbox/test_cgroups_real.py)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

from hxb.errors import PlatformError, SandboxUnavailableError
from hxb.sandbox.cgroups import CgroupDriver, CgroupError, CgroupLimits, limits_for

MIB = 1024 * 1024
V2_ALL_CONTROLLERS = "cpuset cpu io memory hugetlb pids rdma misc"
V2_OPTIONAL = ("memory.swap.max", "memory.oom.group", "memory.peak", "cgroup.kill", "cgroup.freeze")
V1_HIERARCHIES = ("cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids")
# As on the hybrid VM these tests were written on: only the memory hierarchy puts us in a sub-group.
V1_OWN = {"memory": "/process_api/4c0c6a28"}


class FakeCgroupFs:
    """Directories and regular files under tmp_path laid out like cgroupfs, v1 or v2.

    It is no kernel: a new group directory starts empty (the driver's writes create its files),
    and writing a pid to cgroup.procs moves nothing. Tests read back what the driver wrote. The
    `<prefix>` group is pre-made with the files the "kernel" shows, as a previous run leaves it,
    because the driver learns the optional files from it.
    """

    def __init__(self, root: Path, self_cgroup: str) -> None:
        self.root = root
        self.self_cgroup = self_cgroup

    @staticmethod
    def make_group(path: Path, files: Mapping[str, str]) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            (path / name).write_text(content)
        return path

    @classmethod
    def v2(
        cls,
        tmp_path: Path,
        *,
        own: str = "/system.slice/hxb.service",
        controllers: str = V2_ALL_CONTROLLERS,
        own_pids: Iterable[int] = (4242, 4243),
        optional: Iterable[str] = V2_OPTIONAL,
        prefix: str | None = "hxb",
        own_subtree_control: str = "",
    ) -> FakeCgroupFs:
        root = tmp_path / "cgroup"
        fs = cls(root, f"0::{own}\n")
        core = {"cgroup.procs": "", "cgroup.controllers": controllers, "cgroup.subtree_control": ""}
        fs.make_group(root, {**core, "cgroup.procs": "1\n"})
        leaf = {**core, "cgroup.events": "populated 0\nfrozen 0\n", "memory.max": "max\n", "cpu.max": "max 100000\n"}
        leaf |= {"pids.max": "max\n", "memory.events": "oom 0\noom_kill 0\n"}
        if own != "/":
            procs = "".join(f"{pid}\n" for pid in own_pids)
            fs.make_group(
                fs.v2_dir(own), {**leaf, "cgroup.procs": procs, "cgroup.subtree_control": own_subtree_control}
            )
        if prefix is not None:
            fs.make_group(fs.v2_dir(own) / prefix, {**leaf, **dict.fromkeys(optional, "0\n")})
        return fs

    @classmethod
    def v1(
        cls,
        tmp_path: Path,
        *,
        own: Mapping[str, str] = V1_OWN,
        hierarchies: Iterable[str] = V1_HIERARCHIES,
        memsw: bool = True,
        unified_controllers: str | None = "hugetlb",
        prefix: str | None = "hxb",
    ) -> FakeCgroupFs:
        root = tmp_path / "cgroup"
        hierarchies = tuple(hierarchies)
        lines = [f"{i + 1}:{h}:{own.get(h, '/')}" for i, h in enumerate(hierarchies)]
        lines.reverse()
        if unified_controllers is not None:
            lines.append("0::/")
            fs_files = {"cgroup.procs": "1\n", "cgroup.controllers": unified_controllers, "cgroup.subtree_control": ""}
            cls.make_group(root / "unified", fs_files)
        fs = cls(root, "\n".join(lines) + "\n")
        for h in hierarchies:
            files = {"cgroup.procs": "", "tasks": ""} | _V1_FILES.get(h, {})
            if not memsw:
                files.pop("memory.memsw.limit_in_bytes", None)
            fs.make_group(root / h, files)
            fs.make_group(fs.v1_dir(h, own.get(h, "/")), files)
            if prefix is not None:
                fs.make_group(fs.v1_dir(h, own.get(h, "/")) / prefix, files | _V1_NON_ROOT.get(h, {}))
        return fs

    def v2_dir(self, cgroup_path: str) -> Path:
        return self.root.joinpath(*cgroup_path.strip("/").split("/")) if cgroup_path != "/" else self.root

    def v1_dir(self, hierarchy: str, cgroup_path: str) -> Path:
        base = self.root / hierarchy
        return base.joinpath(*cgroup_path.strip("/").split("/")) if cgroup_path != "/" else base

    def driver(self, prefix: str = "hxb") -> CgroupDriver:
        return CgroupDriver.detect(self.root, self_cgroup=self.self_cgroup, prefix=prefix)


_V1_FILES: dict[str, dict[str, str]] = {
    "memory": {
        "memory.limit_in_bytes": "9223372036854771712\n",
        "memory.memsw.limit_in_bytes": "9223372036854771712\n",
        "memory.max_usage_in_bytes": "0\n",
        "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n",
        "memory.use_hierarchy": "1\n",
        "memory.swappiness": "60\n",
    },
    "cpu": {"cpu.cfs_period_us": "100000\n", "cpu.cfs_quota_us": "-1\n", "cpu.stat": "nr_periods 0\n"},
}
_V1_NON_ROOT: dict[str, dict[str, str]] = {"pids": {"pids.max": "max\n"}, "freezer": {"freezer.state": "THAWED\n"}}


def read(path: Path) -> str:
    return path.read_text().strip()


def group_dir(join_path: str) -> Path:
    return Path(join_path).parent


def v1_dirs(group: object) -> dict[str, Path]:
    """hierarchy -> group directory, from the join paths (`<root>/<hierarchy>/...`)."""
    join_paths: list[str] = group.join_paths()  # type: ignore[attr-defined]
    out = {}
    for p in join_paths:
        d = group_dir(p)
        hierarchy = next(h for h in V1_HIERARCHIES if f"/cgroup/{h}/" in str(d))
        out[hierarchy] = d
    return out


LIMITS_128 = limits_for(128)


# --- limits_for ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("memory_mb", "quota_us"),
    [
        (128, 1447),  # 1447.15 of every 20 ms
        (1769, 20_000),  # one vCPU
        # Nearest microsecond, never truncated: it never drifts more than half a microsecond.
        (3008, 34_008),  # 34007.91
        (10_240, 115_772),  # 115771.62
    ],
)
def test_limits_for_scales_cpu_quota_with_memory(memory_mb: int, quota_us: int) -> None:
    limits = limits_for(memory_mb)
    assert limits == CgroupLimits(
        memory_bytes=memory_mb * MIB, cpu_quota_us=quota_us, cpu_period_us=20_000, pids_max=1024
    )


def test_limits_for_tiny_memory_gets_the_kernels_minimum_quota() -> None:
    assert limits_for(1).cpu_quota_us == 1000


def test_limits_for_passes_pids_max() -> None:
    assert limits_for(128, pids_max=20).pids_max == 20


@pytest.mark.parametrize(
    "kwargs",
    [
        {"memory_bytes": 0, "cpu_quota_us": None},
        {"memory_bytes": MIB, "cpu_quota_us": 999},
        {"memory_bytes": MIB, "cpu_quota_us": None, "cpu_period_us": 999},
        {"memory_bytes": MIB, "cpu_quota_us": None, "pids_max": 0},
    ],
)
def test_limits_reject_values_the_kernel_would_refuse(kwargs: dict[str, int | None]) -> None:
    with pytest.raises(ValueError, match="must be"):
        CgroupLimits(**kwargs)  # type: ignore[arg-type]


def test_limits_for_rejects_non_positive_memory() -> None:
    with pytest.raises(ValueError, match="memory_mb"):
        limits_for(0)


# --- detection ----------------------------------------------------------------------------------


def test_detect_picks_v2_when_it_has_memory_cpu_and_pids(tmp_path: Path) -> None:
    driver = FakeCgroupFs.v2(tmp_path).driver()
    assert driver.version == 2


def test_detect_picks_v1_on_a_hybrid_host_whose_v2_offers_only_hugetlb(tmp_path: Path) -> None:
    driver = FakeCgroupFs.v1(tmp_path).driver()
    assert driver.version == 1


def test_detect_prefers_v2_when_both_are_usable(tmp_path: Path) -> None:
    driver = FakeCgroupFs.v1(tmp_path, unified_controllers="cpu memory pids").driver()
    assert driver.version == 2


def test_detect_raises_naming_what_v2_and_v1_lack(tmp_path: Path) -> None:
    fs = FakeCgroupFs.v2(tmp_path, controllers="cpu memory io")
    with pytest.raises(SandboxUnavailableError, match="lacks pids") as caught:
        fs.driver()
    assert "cgroup v1 lacks the memory, cpu, pids hierarchy" in str(caught.value)
    assert caught.value.error_type == "Platform.SandboxUnavailable"


def test_detect_raises_when_v1_has_no_pids_hierarchy(tmp_path: Path) -> None:
    fs = FakeCgroupFs.v1(tmp_path, hierarchies=("cpu", "memory", "freezer"))
    with pytest.raises(SandboxUnavailableError, match=r"cgroup v1 lacks the pids hierarchy") as caught:
        fs.driver()
    assert "cgroup v2 at" in str(caught.value)
    assert "lacks memory, cpu, pids (it offers hugetlb)" in str(caught.value)


def test_detect_raises_when_no_cgroupfs_is_mounted(tmp_path: Path) -> None:
    (tmp_path / "cgroup").mkdir()
    with pytest.raises(SandboxUnavailableError, match="no cgroup v2 mounted"):
        CgroupDriver.detect(tmp_path / "cgroup", self_cgroup="0::/\n")


def test_detect_raises_when_our_own_v2_group_is_not_in_the_mount(tmp_path: Path) -> None:
    fs = FakeCgroupFs.v2(tmp_path)
    with pytest.raises(SandboxUnavailableError, match=r"'/elsewhere\.slice' .* is not there"):
        CgroupDriver.detect(fs.root, self_cgroup="0::/elsewhere.slice\n")


def test_detect_refuses_a_path_outside_our_cgroup_namespace(tmp_path: Path) -> None:
    fs = FakeCgroupFs.v2(tmp_path)
    with pytest.raises(SandboxUnavailableError, match="is not there"):
        CgroupDriver.detect(fs.root, self_cgroup="0::/../../etc\n")


def test_detect_finds_co_mounted_v1_controllers_by_their_mount_name(tmp_path: Path) -> None:
    fs = FakeCgroupFs.v1(tmp_path, hierarchies=("cpu,cpuacct", "memory", "pids"), own={}, unified_controllers=None)
    driver = fs.driver()
    group = driver.create("abc", LIMITS_128)
    cpu_dir = next(group_dir(p) for p in group.join_paths() if "cpu,cpuacct" in p)
    assert read(cpu_dir / "cpu.cfs_quota_us") == "1447"


def test_detect_rejects_a_prefix_that_is_not_one_path_component(tmp_path: Path) -> None:
    fs = FakeCgroupFs.v2(tmp_path)
    with pytest.raises(ValueError, match="prefix"):
        fs.driver(prefix="../hxb")


# --- v1 -----------------------------------------------------------------------------------------


def test_v1_groups_land_under_our_own_cgroup_in_each_hierarchy(tmp_path: Path) -> None:
    fs = FakeCgroupFs.v1(tmp_path)
    group = fs.driver().create("abc", LIMITS_128)
    dirs = v1_dirs(group)
    assert sorted(dirs) == ["cpu", "freezer", "memory", "pids"]
    assert dirs["memory"].parent == fs.root / "memory" / "process_api" / "4c0c6a28" / "hxb"
    assert dirs["cpu"].parent == fs.root / "cpu" / "hxb"
    assert dirs["pids"].parent == fs.root / "pids" / "hxb"
    assert {d.name for d in dirs.values()} == {dirs["memory"].name}
    assert dirs["memory"].name.endswith(".abc")
    assert group.join_paths() == [str(d / "cgroup.procs") for d in dirs.values()]
    assert group.name == "abc"


def test_v1_limits_go_to_memory_memsw_cfs_and_pids_files(tmp_path: Path) -> None:
    dirs = v1_dirs(FakeCgroupFs.v1(tmp_path).driver().create("abc", LIMITS_128))
    assert read(dirs["memory"] / "memory.limit_in_bytes") == "134217728"
    assert read(dirs["memory"] / "memory.memsw.limit_in_bytes") == "134217728"
    assert not (dirs["memory"] / "memory.swappiness").exists()
    assert read(dirs["cpu"] / "cpu.cfs_period_us") == "20000"
    assert read(dirs["cpu"] / "cpu.cfs_quota_us") == "1447"
    assert read(dirs["pids"] / "pids.max") == "1024"


def test_v1_without_swap_accounting_sets_swappiness_zero(tmp_path: Path) -> None:
    dirs = v1_dirs(FakeCgroupFs.v1(tmp_path, memsw=False).driver().create("abc", LIMITS_128))
    assert not (dirs["memory"] / "memory.memsw.limit_in_bytes").exists()
    assert read(dirs["memory"] / "memory.swappiness") == "0"


def test_v1_unlimited_cpu_writes_minus_one(tmp_path: Path) -> None:
    limits = CgroupLimits(memory_bytes=64 * MIB, cpu_quota_us=None, cpu_period_us=50_000, pids_max=20)
    dirs = v1_dirs(FakeCgroupFs.v1(tmp_path).driver().create("abc", limits))
    assert read(dirs["cpu"] / "cpu.cfs_quota_us") == "-1"
    assert read(dirs["cpu"] / "cpu.cfs_period_us") == "50000"
    assert read(dirs["pids"] / "pids.max") == "20"


def test_v1_set_cpu_quota_later(tmp_path: Path) -> None:
    group = FakeCgroupFs.v1(tmp_path).driver().create("abc", CgroupLimits(memory_bytes=MIB, cpu_quota_us=None))
    group.set_cpu_quota(1447)
    assert read(v1_dirs(group)["cpu"] / "cpu.cfs_quota_us") == "1447"
    group.set_cpu_quota(None)
    assert read(v1_dirs(group)["cpu"] / "cpu.cfs_quota_us") == "-1"


def test_v1_creates_the_prefix_groups_when_missing(tmp_path: Path) -> None:
    fs = FakeCgroupFs.v1(tmp_path, prefix=None)
    dirs = v1_dirs(fs.driver().create("abc", LIMITS_128))
    assert read(fs.root / "memory" / "process_api" / "4c0c6a28" / "hxb" / "memory.use_hierarchy") == "1"
    # Nothing probed in the fresh prefix: the optional files are not assumed.
    assert not (dirs["memory"] / "memory.memsw.limit_in_bytes").exists()


def test_v1_peak_and_oom_readers(tmp_path: Path) -> None:
    group = FakeCgroupFs.v1(tmp_path).driver().create("abc", LIMITS_128)
    memory_dir = v1_dirs(group)["memory"]
    assert group.oom_kill_count() == 0  # no memory.oom_control yet: an old kernel's answer
    (memory_dir / "memory.max_usage_in_bytes").write_text("31457280\n")
    (memory_dir / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    assert group.memory_peak_bytes() == 31457280
    assert group.oom_kill_count() == 3
    (memory_dir / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\n")
    assert group.oom_kill_count() == 0


def test_v1_pids_are_the_union_over_hierarchies(tmp_path: Path) -> None:
    group = FakeCgroupFs.v1(tmp_path).driver().create("abc", LIMITS_128)
    dirs = v1_dirs(group)
    (dirs["memory"] / "cgroup.procs").write_text("10\n11\n")
    (dirs["pids"] / "cgroup.procs").write_text("11\n12\n")
    assert group.pids() == [10, 11, 12]


# --- v2 -----------------------------------------------------------------------------------------


def test_v2_groups_land_under_our_own_cgroup(tmp_path: Path) -> None:
    fs = FakeCgroupFs.v2(tmp_path)
    group = fs.driver().create("abc", LIMITS_128)
    (join_path,) = group.join_paths()
    assert group_dir(join_path).parent == fs.root / "system.slice" / "hxb.service" / "hxb"
    assert group_dir(join_path).name.endswith(".abc")


def test_v2_limits_go_to_memory_swap_oom_group_cpu_and_pids_files(tmp_path: Path) -> None:
    (join_path,) = FakeCgroupFs.v2(tmp_path).driver().create("abc", LIMITS_128).join_paths()
    d = group_dir(join_path)
    assert read(d / "memory.max") == "134217728"
    assert read(d / "memory.swap.max") == "0"
    assert read(d / "memory.oom.group") == "1"
    assert read(d / "cpu.max") == "1447 20000"
    assert read(d / "pids.max") == "1024"


def test_v2_unlimited_cpu_writes_max(tmp_path: Path) -> None:
    limits = CgroupLimits(memory_bytes=MIB, cpu_quota_us=None)
    (join_path,) = FakeCgroupFs.v2(tmp_path).driver().create("abc", limits).join_paths()
    assert read(group_dir(join_path) / "cpu.max") == "max 20000"


def test_v2_writes_optional_files_only_where_the_kernel_has_them(tmp_path: Path) -> None:
    fs = FakeCgroupFs.v2(tmp_path, optional=())
    (join_path,) = fs.driver().create("abc", LIMITS_128).join_paths()
    assert not (group_dir(join_path) / "memory.swap.max").exists()
    assert not (group_dir(join_path) / "memory.oom.group").exists()
    assert read(group_dir(join_path) / "memory.max") == "134217728"


def test_v2_set_cpu_quota_later(tmp_path: Path) -> None:
    group = FakeCgroupFs.v2(tmp_path).driver().create("abc", CgroupLimits(memory_bytes=MIB, cpu_quota_us=None))
    group.set_cpu_quota(1447)
    assert read(group_dir(group.join_paths()[0]) / "cpu.max") == "1447 20000"
    group.set_cpu_quota(None)
    assert read(group_dir(group.join_paths()[0]) / "cpu.max") == "max 20000"


def test_v2_set_cpu_quota_rejects_less_than_a_millisecond(tmp_path: Path) -> None:
    group = FakeCgroupFs.v2(tmp_path).driver().create("abc", LIMITS_128)
    with pytest.raises(ValueError, match="at least 1000"):
        group.set_cpu_quota(500)


def test_v2_peak_and_oom_readers(tmp_path: Path) -> None:
    group = FakeCgroupFs.v2(tmp_path).driver().create("abc", LIMITS_128)
    d = group_dir(group.join_paths()[0])
    assert group.memory_peak_bytes() is None  # memory.peak is Linux 5.19+
    assert group.oom_kill_count() == 0
    (d / "memory.peak").write_text("31457280\n")
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 7\noom 1\noom_kill 2\noom_group_kill 1\n")
    assert group.memory_peak_bytes() == 31457280
    assert group.oom_kill_count() == 2


def test_v2_moves_our_processes_to_a_leaf_and_enables_controllers(tmp_path: Path) -> None:
    fs = FakeCgroupFs.v2(tmp_path, own_pids=(4242, 4243), prefix=None)
    driver = fs.driver()
    driver.create("abc", LIMITS_128)
    own = fs.root / "system.slice" / "hxb.service"
    assert read(own / "hxb-platform" / "cgroup.procs").split() == ["4242", "4243"]
    assert read(own / "cgroup.subtree_control") == "+memory +cpu +pids"
    assert read(own / "hxb" / "cgroup.subtree_control") == "+memory +cpu +pids"
    assert driver.describe()["platform_leaf"] == str(own / "hxb-platform")


def test_v2_enables_only_the_controllers_not_yet_enabled(tmp_path: Path) -> None:
    fs = FakeCgroupFs.v2(tmp_path, own_pids=(), own_subtree_control="cpu memory\n")
    fs.driver().create("abc", LIMITS_128)
    own = fs.root / "system.slice" / "hxb.service"
    assert read(own / "cgroup.subtree_control") == "+pids"
    assert not (own / "hxb-platform").exists()  # no processes in our group: nothing to move


def test_v2_in_the_root_group_moves_nothing(tmp_path: Path) -> None:
    fs = FakeCgroupFs.v2(tmp_path, own="/")
    group = fs.driver().create("abc", LIMITS_128)
    assert group_dir(group.join_paths()[0]).parent == fs.root / "hxb"
    assert not (fs.root / "hxb-platform").exists()
    assert read(fs.root / "cgroup.subtree_control") == "+memory +cpu +pids"


def test_v2_started_inside_our_platform_leaf_uses_the_group_above(tmp_path: Path) -> None:
    fs = FakeCgroupFs.v2(tmp_path, own_pids=())
    own = fs.root / "system.slice" / "hxb.service"
    FakeCgroupFs.make_group(own / "hxb-platform", {"cgroup.procs": "4242\n", "cgroup.controllers": "cpu memory pids"})
    driver = CgroupDriver.detect(fs.root, self_cgroup="0::/system.slice/hxb.service/hxb-platform\n")
    group = driver.create("abc", LIMITS_128)
    assert group_dir(group.join_paths()[0]).parent == own / "hxb"
    assert not (own / "hxb-platform" / "hxb-platform").exists()


# --- errors and housekeeping ----------------------------------------------------------------------


def test_a_failed_write_names_the_file_and_the_value(tmp_path: Path) -> None:
    group = FakeCgroupFs.v2(tmp_path).driver().create("abc", LIMITS_128)
    cpu_max = group_dir(group.join_paths()[0]) / "cpu.max"
    cpu_max.unlink()
    cpu_max.mkdir()  # a directory cannot be written: EISDIR
    with pytest.raises(CgroupError) as caught:
        group.set_cpu_quota(1447)
    assert str(caught.value) == f"cannot write 1447 20000 to {cpu_max}: Is a directory"
    assert caught.value.path == cpu_max
    assert isinstance(caught.value, PlatformError)


def test_a_failed_mkdir_names_the_group(tmp_path: Path) -> None:
    fs = FakeCgroupFs.v1(tmp_path, prefix=None)
    (fs.root / "pids" / "hxb").write_text("not a directory")
    with pytest.raises(CgroupError, match=r"cannot create cgroup .*/pids/hxb/[0-9-]+\.abc: Not a directory"):
        fs.driver().create("abc", LIMITS_128)


def test_create_refuses_an_existing_group(tmp_path: Path) -> None:
    driver = FakeCgroupFs.v2(tmp_path).driver()
    driver.create("abc", LIMITS_128)
    with pytest.raises(CgroupError, match=r"cgroup .*\.abc already exists"):
        driver.create("abc", LIMITS_128)


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "x" * 201, "a b"])
def test_create_rejects_names_that_are_not_one_plain_path_component(tmp_path: Path, name: str) -> None:
    driver = FakeCgroupFs.v2(tmp_path).driver()
    with pytest.raises(ValueError, match="must match"):
        driver.create(name, LIMITS_128)


def test_remove_failure_names_the_group(tmp_path: Path) -> None:
    group = FakeCgroupFs.v2(tmp_path).driver().create("abc", LIMITS_128)
    d = group_dir(group.join_paths()[0])
    # Regular files make the stand-in's rmdir fail (ENOTEMPTY), an error that is not retried.
    with pytest.raises(CgroupError, match=re.escape(f"cannot remove cgroup {d}: Directory not empty")):
        group.remove()


def test_cleanup_stale_removes_only_groups_of_platforms_that_are_gone(tmp_path: Path) -> None:
    fs = FakeCgroupFs.v2(tmp_path)
    driver = fs.driver()
    ours = driver.create("ours", LIMITS_128)
    prefix_dir = fs.root / "system.slice" / "hxb.service" / "hxb"
    ppid = os.getppid()
    live_other = prefix_dir / f"{ppid}-{start_ticks(ppid)}.theirs"
    dead = prefix_dir / f"{2**30}-12345.gone"  # above any pid_max: that platform is gone
    reused_pid = prefix_dir / f"{ppid}-1.reused"  # same pid, another start time: gone too
    not_ours = prefix_dir / "junk"
    # Empty directories: the stand-in can rmdir them (there are no processes to kill).
    for d in (live_other, dead, reused_pid, not_ours):
        d.mkdir()
    assert driver.cleanup_stale() == 3
    assert live_other.is_dir()
    assert group_dir(ours.join_paths()[0]).is_dir()
    assert not dead.exists()
    assert not reused_pid.exists()
    assert not not_ours.exists()


def test_cleanup_stale_without_a_prefix_group_finds_nothing(tmp_path: Path) -> None:
    assert FakeCgroupFs.v1(tmp_path, prefix=None).driver().cleanup_stale() == 0


def test_describe_says_version_controllers_and_where_groups_go(tmp_path: Path) -> None:
    fs = FakeCgroupFs.v1(tmp_path)
    info = fs.driver().describe()
    assert info["version"] == 1
    assert info["controllers"] == ["cpu", "freezer", "memory", "pids"]
    assert info["groups_under"] == {
        "memory": str(fs.root / "memory" / "process_api" / "4c0c6a28" / "hxb"),
        "cpu": str(fs.root / "cpu" / "hxb"),
        "pids": str(fs.root / "pids" / "hxb"),
        "freezer": str(fs.root / "freezer" / "hxb"),
    }
    assert info["optional_files"] == ["freezer.state", "memory.memsw.limit_in_bytes"]


def test_describe_on_v2(tmp_path: Path) -> None:
    fs = FakeCgroupFs.v2(tmp_path)
    info = fs.driver().describe()
    assert info["version"] == 2
    assert info["controllers"] == sorted(V2_ALL_CONTROLLERS.split())
    assert info["mount"] == str(fs.root)
    assert info["own_cgroup"] == str(fs.root / "system.slice" / "hxb.service")


def start_ticks(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rpartition(")")[2].split()[19]
