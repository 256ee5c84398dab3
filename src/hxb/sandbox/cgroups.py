"""One cgroup per function instance, with Lambda-like limits (memory, a CPU quota that scales
with memory, a pids cap), on cgroup v2 or, where v2 lacks those controllers, on cgroup v1.

Everything is plain reads, writes, mkdir and rmdir under `root`, so tests point it at a tmp_path
tree (firecracker's MockCgroupFs idea). `create` is on the cold-start path: a few mkdirs and small
writes, no subprocesses and no sleeps.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Final, Protocol

from hxb.errors import PlatformError, SandboxUnavailableError

CPU_MB_PER_VCPU: Final = 1769  # Lambda's rule: a function gets one whole vCPU at 1769 MB
MIN_CPU_QUOTA_US: Final = 1000  # the kernel refuses a CFS quota below 1 ms
# A short period: a function at 128 MB gets 1.4 ms of every 20 ms rather than 7 ms of every
# 100 ms, the same share of a CPU, but a throttled invocation waits ~19 ms at most, not ~93.
DEFAULT_CPU_PERIOD_US: Final = 20_000
DEFAULT_PIDS_MAX: Final = 1024
REQUIRED_CONTROLLERS: Final = ("memory", "cpu", "pids")

# Optional files probed once per driver in the `<prefix>` group: a non-root group shows exactly
# the files its children will (the same controllers are enabled for both), so no per-create stat.
_V2_OPTIONAL: Final = ("memory.swap.max", "memory.oom.group", "cgroup.kill", "cgroup.freeze")
_V1_OPTIONAL: Final = ("memory.memsw.limit_in_bytes", "freezer.state")

# Group and prefix names become one path component; keep them boring (no "/", "..", spaces).
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")


class CgroupError(PlatformError):
    """A cgroup file or directory operation failed. The message names the path (and the value,
    for a write); `errno` keeps the OS error number when there is one."""

    error_type = "Sandbox.CgroupFailed"

    def __init__(self, message: str, *, path: Path, errno: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.errno = errno


@dataclass(frozen=True, slots=True, kw_only=True)
class CgroupLimits:
    memory_bytes: int
    cpu_quota_us: int | None  # None = unlimited
    cpu_period_us: int = DEFAULT_CPU_PERIOD_US
    pids_max: int = DEFAULT_PIDS_MAX

    def __post_init__(self) -> None:
        if self.memory_bytes <= 0:
            raise ValueError(f"memory_bytes must be positive, not {self.memory_bytes}")
        _check_quota(self.cpu_quota_us)
        # The kernel's bounds for a CFS period (both versions): 1 ms to 1 s.
        if not 1000 <= self.cpu_period_us <= 1_000_000:
            raise ValueError(f"cpu_period_us must be within 1000..1000000, not {self.cpu_period_us}")
        if self.pids_max < 1:
            raise ValueError(f"pids_max must be at least 1, not {self.pids_max}")


def limits_for(memory_mb: int, *, pids_max: int = DEFAULT_PIDS_MAX) -> CgroupLimits:
    """The limits of an instance of a function configured with `memory_mb` (MiB, as Lambda's
    "MB"): that much memory, and CPU in proportion, one vCPU per 1769 MB."""
    if memory_mb <= 0:
        raise ValueError(f"memory_mb must be positive, not {memory_mb}")
    period_us = DEFAULT_CPU_PERIOD_US
    # Nearest microsecond, half up, in integers: floats would drift for big memory sizes.
    quota_us = (2 * period_us * memory_mb + CPU_MB_PER_VCPU) // (2 * CPU_MB_PER_VCPU)
    return CgroupLimits(
        memory_bytes=memory_mb * 1024 * 1024,
        cpu_quota_us=max(MIN_CPU_QUOTA_US, quota_us),
        cpu_period_us=period_us,
        pids_max=pids_max,
    )


class Cgroup(Protocol):
    """One instance's group, in every hierarchy it needs."""

    @property
    def name(self) -> str: ...
    def join_paths(self) -> list[str]: ...  # a child writes "0" into each to move itself in
    def set_cpu_quota(self, quota_us: int | None) -> None: ...
    def set_memory_limit(self, memory_bytes: int) -> None: ...  # lowering only (a prepared group)
    def rename(self, name: str) -> None: ...
    def memory_peak_bytes(self) -> int | None: ...
    def oom_kill_count(self) -> int: ...
    def pids(self) -> list[int]: ...
    def kill_all(self, *, timeout_s: float = 5.0) -> None: ...
    def remove(self, *, timeout_s: float = 1.0) -> None: ...


# --- file I/O ---------------------------------------------------------------------------------


def _write(path: Path, value: str, *, append: bool = False) -> None:
    # One open/write/close per value: cgroupfs parses each write(2) as a whole. O_CREAT only
    # matters for the tmp_path stand-in: cgroupfs cannot create files (it answers EACCES).
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_APPEND if append else os.O_TRUNC)
    try:
        fd = os.open(path, flags, 0o644)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as exc:
        hint = ""
        if exc.errno == errno.EACCES and not path.exists():
            hint = " (no such control file: is its controller enabled for this group?)"
        raise CgroupError(f"cannot write {value} to {path}: {exc.strerror}{hint}", path=path, errno=exc.errno) from exc


def _read(path: Path) -> str | None:
    """The file's text, or None if it does not exist (an absent feature, or a removed group)."""
    try:
        with open(path, encoding="ascii") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CgroupError(f"cannot read {path}: {exc.strerror}", path=path, errno=exc.errno) from exc


def _read_int(path: Path) -> int | None:
    text = _read(path)
    return None if text is None else int(text)


class _KeptFile:
    """A control file read again and again (the peak, after every invocation): opened once,
    then pread, which costs a third of an open/read/close. The fd stays valid through a
    rename of the group."""

    def __init__(self) -> None:
        self._fd: int | None = None

    def read_int(self, path: Path) -> int | None:
        try:
            if self._fd is None:
                self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            text = os.pread(self._fd, 64, 0)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CgroupError(f"cannot read {path}: {exc.strerror}", path=path, errno=exc.errno) from exc
        return int(text) if text.strip() else None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _keyed(text: str | None) -> dict[str, str]:
    """`key value` lines (memory.events, memory.oom_control, cgroup.events, cpu.stat)."""
    pairs = (line.split(None, 1) for line in (text or "").splitlines())
    return {p[0]: p[1].strip() for p in pairs if len(p) == 2}


def _procs(group_dir: Path) -> list[int]:
    return [int(tok) for tok in (_read(group_dir / "cgroup.procs") or "").split()]


def _mkdir(path: Path, *, exist_ok: bool) -> None:
    try:
        path.mkdir(mode=0o755)
    except FileExistsError:
        if not exist_ok:
            raise CgroupError(f"cgroup {path} already exists", path=path, errno=errno.EEXIST) from None
    except OSError as exc:
        raise CgroupError(f"cannot create cgroup {path}: {exc.strerror}", path=path, errno=exc.errno) from exc


def _subtree_bottom_up(group_dir: Path) -> list[Path]:
    """The group and any groups under it, deepest first (the order rmdir needs)."""
    found = [Path(top) for top, _, _ in os.walk(group_dir, topdown=False)]
    return found or [group_dir]


def _unique(dirs: Iterable[Path]) -> tuple[Path, ...]:
    # Co-mounted v1 controllers (cpu,cpuacct) and every v2 controller share one directory.
    return tuple(dict.fromkeys(dirs))


def _check_name(kind: str, name: str) -> None:
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"cgroup {kind} {name!r} must match {_NAME_RE.pattern}")


def _check_quota(quota_us: int | None) -> None:
    if quota_us is not None and quota_us < MIN_CPU_QUOTA_US:
        raise ValueError(f"cpu quota must be at least {MIN_CPU_QUOTA_US} us (or None), not {quota_us}")


# --- who owns a group ---------------------------------------------------------------------------
# Two platforms can share one cgroup (two `hxb serve` from one shell, parallel test sessions), so
# a group's directory name starts with its platform's pid and start time: cleanup_stale removes
# only groups whose platform is gone, and a reused pid does not keep a dead platform's groups.


def _start_ticks(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    # Fields after the command name (field 2, which may hold spaces and ")"): state is field 3,
    # starttime field 22. A zombie is a platform that is gone, only not yet reaped.
    fields = stat.rpartition(")")[2].split()
    return None if fields[0] in ("Z", "X") else fields[19]


def _owner_token() -> str:
    pid = os.getpid()
    return f"{pid}-{_start_ticks(pid) or 0}"


def _is_stale(dirname: str, own_token: str) -> bool:
    owner, sep, _ = dirname.partition(".")
    if not sep:
        return True  # not a name we make: a leftover in our prefix all the same
    if owner == own_token:
        return False
    pid, _, start = owner.partition("-")
    return not pid.isdigit() or _start_ticks(int(pid)) != start


# --- groups -------------------------------------------------------------------------------------


class _GroupBase:
    """What both versions share: membership, killing and removal across the group's directories."""

    def __init__(
        self, name: str, dirs: Mapping[str, Path], features: frozenset[str], cpu_period_us: int = DEFAULT_CPU_PERIOD_US
    ) -> None:
        self._name = name
        self._dirs = dict(dirs)  # controller -> this group's directory in that hierarchy
        self._unique_dirs = _unique(self._dirs.values())
        self._features = features
        self._cpu_period_us = cpu_period_us
        self._peak = _KeptFile()

    @property
    def name(self) -> str:
        return self._name

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._name} at {', '.join(map(str, self._unique_dirs))}>"

    def join_paths(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self._unique_dirs]

    def rename(self, name: str) -> None:
        """Gives the group its instance's name (a sandbox prepared ahead of demand learns it
        late); cgroup v1 renames a directory in place, its processes stay."""
        _check_name("name", name)
        owner = self._unique_dirs[0].name.rsplit(".", 1)[0]
        renamed = {}
        for d in self._unique_dirs:
            target = d.with_name(f"{owner}.{name}")
            try:
                os.rename(d, target)
            except OSError as exc:
                raise CgroupError(
                    f"cannot rename {d} to {target.name}: {exc.strerror}", path=d, errno=exc.errno
                ) from exc
            renamed[d] = target
        self._dirs = {c: renamed[d] for c, d in self._dirs.items()}
        self._unique_dirs = _unique(self._dirs.values())
        self._name = name

    def pids(self) -> list[int]:
        # Union over hierarchies and any sub-groups: a child that died halfway through joining,
        # or a sub-group made later, must not hide a process from kill_all.
        found: set[int] = set()
        for top in self._unique_dirs:
            for d in _subtree_bottom_up(top):
                found.update(_procs(d))
        return sorted(found)

    def kill_all(self, *, timeout_s: float = 5.0) -> None:
        """SIGKILL every process in the group and wait until it is empty.

        Raises:
            CgroupError: processes remain after `timeout_s` (stuck in the kernel, e.g. on I/O).
        """
        deadline = time.monotonic() + timeout_s
        delay_s = 0.0005
        while pids := self.pids():
            if time.monotonic() > deadline:
                raise CgroupError(
                    f"cgroup {self._name}: processes {pids} still alive {timeout_s:g}s after SIGKILL",
                    path=self._unique_dirs[0],
                )
            self._kill_round()
            # Killed processes leave the group when they finish exiting (zombies are not listed).
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, 0.05)

    def _kill_round(self) -> None:
        """Freeze, SIGKILL every listed pid, thaw. Freezing first means no process forks or
        exits meanwhile, so each pid we signal is still the one we read (no pid-reuse race)."""
        frozen = self._freeze()
        try:
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):  # exited between the read and the kill
                    os.kill(pid, signal.SIGKILL)
        finally:
            if frozen:
                # A frozen task does not act on SIGKILL until thawed (measured on v1).
                self._thaw()

    def _freeze(self) -> bool:
        return False

    def _thaw(self) -> None:
        pass

    def _wait_frozen(self, is_frozen_file: Path, key: str | None, want: str, budget_s: float = 0.5) -> None:
        # Bounded: a task in uninterruptible sleep can hold freezing up; we SIGKILL regardless.
        deadline = time.monotonic() + budget_s
        while time.monotonic() < deadline:
            text = _read(is_frozen_file) or ""
            value = _keyed(text).get(key) if key else text.strip()
            if value == want:
                return
            time.sleep(0.0005)

    def remove(self, *, timeout_s: float = 1.0) -> None:
        """rmdir the group in every hierarchy (sub-groups first); idempotent. A group the kernel
        still reports busy (EBUSY: processes still exiting) is retried until `timeout_s`.

        Raises:
            CgroupError: naming the group that is still busy, or that could not be removed.
        """
        self._peak.close()
        deadline = time.monotonic() + timeout_s
        for top in self._unique_dirs:
            for d in _subtree_bottom_up(top):
                _rmdir_patiently(d, deadline, timeout_s)


def _rmdir_patiently(path: Path, deadline: float, timeout_s: float) -> None:
    delay_s = 0.0005
    while True:
        try:
            os.rmdir(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                busy = (
                    f"; still busy after {timeout_s:g}s with processes {_procs(path)}"
                    if exc.errno == errno.EBUSY
                    else ""
                )
                raise CgroupError(
                    f"cannot remove cgroup {path}: {exc.strerror}{busy}", path=path, errno=exc.errno
                ) from exc
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, 0.02)
        else:
            return


class V2Cgroup(_GroupBase):
    """An instance's group on cgroup v2: one directory with every controller."""

    @property
    def _dir(self) -> Path:
        return self._unique_dirs[0]

    def rename(self, name: str) -> None:
        """cgroup v2 cannot rename a group (the kernel answers EPERM): the directory keeps the
        name it was made with, only `name` changes."""
        _check_name("name", name)
        self._name = name

    def apply(self, limits: CgroupLimits) -> None:
        d = self._dir
        _write(d / "memory.max", str(limits.memory_bytes))
        if "memory.swap.max" in self._features:
            _write(d / "memory.swap.max", "0")  # no escaping the memory limit into swap
        if "memory.oom.group" in self._features:
            # An OOM kills the whole instance, not one process of it: no half-alive runtime.
            _write(d / "memory.oom.group", "1")
        self._cpu_period_us = limits.cpu_period_us
        self.set_cpu_quota(limits.cpu_quota_us)
        _write(d / "pids.max", str(limits.pids_max))

    def set_memory_limit(self, memory_bytes: int) -> None:
        _write(self._dir / "memory.max", str(memory_bytes))

    def set_cpu_quota(self, quota_us: int | None) -> None:
        _check_quota(quota_us)
        _write(self._dir / "cpu.max", f"{'max' if quota_us is None else quota_us} {self._cpu_period_us}")

    def memory_peak_bytes(self) -> int | None:
        return self._peak.read_int(self._dir / "memory.peak")  # Linux 5.19+

    def oom_kill_count(self) -> int:
        return int(_keyed(_read(self._dir / "memory.events")).get("oom_kill", "0"))

    def _kill_round(self) -> None:
        if "cgroup.kill" in self._features:
            # Linux 5.14+: the kernel kills the whole subtree atomically, forks included.
            _write(self._dir / "cgroup.kill", "1")
        else:
            super()._kill_round()

    def _freeze(self) -> bool:
        if "cgroup.freeze" not in self._features:
            return False
        _write(self._dir / "cgroup.freeze", "1")
        self._wait_frozen(self._dir / "cgroup.events", "frozen", "1")
        return True

    def _thaw(self) -> None:
        _write(self._dir / "cgroup.freeze", "0")


class V1Cgroup(_GroupBase):
    """An instance's group on cgroup v1: one directory per hierarchy (memory, cpu, pids, freezer)."""

    def apply(self, limits: CgroupLimits) -> None:
        mem = self._dirs["memory"]
        _write(mem / "memory.limit_in_bytes", str(limits.memory_bytes))
        if "memory.memsw.limit_in_bytes" in self._features:
            # memory+swap capped at the same value: no escaping the limit into swap. It must be
            # written after limit_in_bytes, which the kernel keeps <= memsw.
            _write(mem / "memory.memsw.limit_in_bytes", str(limits.memory_bytes))
        else:
            # Swap is not accounted (swapaccount=0); swappiness 0 stops this group's own reclaim
            # from swapping out at all.
            _write(mem / "memory.swappiness", "0")
        cpu = self._dirs["cpu"]
        self._cpu_period_us = limits.cpu_period_us
        _write(cpu / "cpu.cfs_period_us", str(limits.cpu_period_us))
        self.set_cpu_quota(limits.cpu_quota_us)
        _write(self._dirs["pids"] / "pids.max", str(limits.pids_max))

    def set_memory_limit(self, memory_bytes: int) -> None:
        # Lowering: the limit first, then memsw, which the kernel keeps >= the limit.
        mem = self._dirs["memory"]
        _write(mem / "memory.limit_in_bytes", str(memory_bytes))
        if "memory.memsw.limit_in_bytes" in self._features:
            _write(mem / "memory.memsw.limit_in_bytes", str(memory_bytes))

    def set_cpu_quota(self, quota_us: int | None) -> None:
        _check_quota(quota_us)
        path = self._dirs["cpu"] / "cpu.cfs_quota_us"
        try:
            _write(path, str(-1 if quota_us is None else quota_us))
        except CgroupError as exc:
            # v1 (unlike v2) refuses a child more bandwidth than an ancestor's quota (EINVAL; the
            # quota itself is already checked). Unlimited is then right: the ancestor caps it.
            if exc.errno != errno.EINVAL or quota_us is None:
                raise
            _write(path, "-1")

    def memory_peak_bytes(self) -> int | None:
        return self._peak.read_int(self._dirs["memory"] / "memory.max_usage_in_bytes")

    def oom_kill_count(self) -> int:
        # The `oom_kill` line exists since Linux 4.13; older kernels do not count.
        return int(_keyed(_read(self._dirs["memory"] / "memory.oom_control")).get("oom_kill", "0"))

    def _freeze(self) -> bool:
        if "freezer.state" not in self._features or "freezer" not in self._dirs:
            return False
        state = self._dirs["freezer"] / "freezer.state"
        _write(state, "FROZEN")
        self._wait_frozen(state, None, "FROZEN")
        return True

    def _thaw(self) -> None:
        _write(self._dirs["freezer"] / "freezer.state", "THAWED")


# --- the driver ---------------------------------------------------------------------------------


def _parse_self_cgroup(text: str) -> tuple[str | None, dict[str, tuple[str, str]]]:
    """(v2 path or None, {v1 controller: (hierarchy's mount name, path)}) from /proc/self/cgroup."""
    v2_path: str | None = None
    v1: dict[str, tuple[str, str]] = {}
    for line in text.splitlines():
        hierarchy_id, sep1, rest = line.partition(":")
        controllers, sep2, path = rest.partition(":")
        if not (sep1 and sep2):
            continue
        if hierarchy_id == "0" and not controllers:
            v2_path = path
            continue
        for controller in controllers.split(","):
            if controller and not controller.startswith("name="):
                v1[controller] = (controllers, path)
    return v2_path, v1


def _under(mount: Path, cgroup_path: str) -> Path | None:
    # A path with ".." means we sit outside our cgroup namespace's root: not a place to manage.
    parts = PurePosixPath(cgroup_path).parts
    if not cgroup_path.startswith("/") or ".." in parts:
        return None
    return mount.joinpath(*parts[1:])


@dataclass(frozen=True, slots=True)
class _V2Found:
    mount: Path
    own: Path
    base: Path  # where `<prefix>/` goes: `own`, or its parent when `own` is our platform leaf


@dataclass(frozen=True, slots=True)
class _V1Found:
    bases: dict[str, Path]  # controller -> own group in that hierarchy


class CgroupDriver:
    """Makes instance groups under the platform's own cgroup, in a `<prefix>/` subtree, so that a
    service manager's limits on hxb cover its instances. One per platform process."""

    def __init__(
        self,
        *,
        version: int,
        root: Path,
        bases: Mapping[str, Path],
        prefix: str,
        v2: _V2Found | None = None,
        controllers: Iterable[str] = (),
    ) -> None:
        self.version = version
        self.root = root
        self.prefix = prefix
        self._bases = dict(bases)
        self._v2 = v2
        self._controllers = tuple(sorted(controllers))
        self._owner = _owner_token()
        self._features: frozenset[str] | None = None
        self._lock = threading.Lock()

    # --- detection --------------------------------------------------------------------------

    @classmethod
    def detect(
        cls, root: Path = Path("/sys/fs/cgroup"), *, self_cgroup: str | None = None, prefix: str = "hxb"
    ) -> CgroupDriver:
        """Prefers cgroup v2 when it offers memory, cpu and pids, else cgroup v1 when it has those
        three hierarchies (hybrid hosts, whose v2 often has none of them).

        Args:
            self_cgroup: the text of /proc/self/cgroup (read when None).

        Raises:
            SandboxUnavailableError: naming what each version lacks.
        """
        _check_name("prefix", prefix)
        if self_cgroup is None:
            self_cgroup = Path("/proc/self/cgroup").read_text(encoding="ascii")
        v2_path, v1_paths = _parse_self_cgroup(self_cgroup)
        problems: list[str] = []
        v2 = _detect_v2(root, v2_path, prefix, problems)
        if v2 is not None:
            bases = dict.fromkeys(REQUIRED_CONTROLLERS, v2.base)
            available = (_read(v2.base / "cgroup.controllers") or "").split()
            return cls(version=2, root=v2.mount, bases=bases, prefix=prefix, v2=v2, controllers=available)
        v1 = _detect_v1(root, v1_paths, problems)
        if v1 is not None:
            return cls(version=1, root=root, bases=v1.bases, prefix=prefix, controllers=v1.bases)
        raise SandboxUnavailableError(
            "no cgroups to limit instances with: "
            + "; ".join(problems)
            + " (hint: boot with cgroup v2 and delegate memory, cpu and pids to hxb, e.g. systemd Delegate=yes)"
        )

    # --- setup --------------------------------------------------------------------------------

    def _prefix_dirs(self) -> tuple[Path, ...]:
        return _unique(base / self.prefix for base in self._bases.values())

    def prepare(self) -> None:
        """Creates the `<prefix>/` subtree (and, on v2, enables the controllers for it); `create`
        calls it. Idempotent; call it at startup to fail early."""
        self._prepared_features()

    def _prepared_features(self) -> frozenset[str]:
        features = self._features
        if features is not None:
            return features  # the cold-start path: no lock, no I/O
        with self._lock:
            if self._features is None:
                if self._v2 is not None:
                    self._prepare_v2(self._v2)
                else:
                    for d in self._prefix_dirs():
                        _mkdir(d, exist_ok=True)
                    # Always on (and the write refused) since Linux 5.x, and fixed once a group
                    # has children: enable it where it still matters, never fail over it.
                    with contextlib.suppress(CgroupError):
                        _write(self._bases["memory"] / self.prefix / "memory.use_hierarchy", "1")
                self._features = self._probe_features()
            return self._features

    def _prepare_v2(self, v2: _V2Found) -> None:
        # "No internal processes": a non-root group with processes cannot hand controllers to its
        # children, so the platform's processes move into a leaf, `<prefix>-platform`, first.
        leaf = v2.base / f"{self.prefix}-platform"
        if v2.base != v2.mount and _procs(v2.base):
            _mkdir(leaf, exist_ok=True)
            _move_processes(v2.base, leaf)
        for attempt in range(5):
            try:
                _enable_controllers(v2.base)
                break
            except CgroupError as exc:
                # EBUSY: a process forked into `own` while we moved the others: move it too.
                if exc.errno != errno.EBUSY or attempt == 4 or v2.base == v2.mount:
                    raise
                _mkdir(leaf, exist_ok=True)
                _move_processes(v2.base, leaf)
        prefix_dir = v2.base / self.prefix
        _mkdir(prefix_dir, exist_ok=True)
        _enable_controllers(prefix_dir)

    def _probe_features(self) -> frozenset[str]:
        names = _V2_OPTIONAL if self.version == 2 else _V1_OPTIONAL
        return frozenset(n for n in names for d in self._prefix_dirs() if (d / n).exists())

    # --- instances ----------------------------------------------------------------------------

    def create(self, name: str, limits: CgroupLimits) -> Cgroup:
        """A new group `name` (a plain path component, unique per driver) with `limits` applied.

        Raises:
            CgroupError: naming the directory or file that failed (the group is rolled back).
        """
        _check_name("name", name)
        features = self._prepared_features()
        dirname = f"{self._owner}.{name}"
        dirs = {c: base / self.prefix / dirname for c, base in self._bases.items()}
        group: V1Cgroup | V2Cgroup
        if self.version == 2:
            group = V2Cgroup(name, dirs, features, limits.cpu_period_us)
        else:
            group = V1Cgroup(name, dirs, features, limits.cpu_period_us)
        made: list[Path] = []
        try:
            for d in _unique(dirs.values()):
                _mkdir(d, exist_ok=False)
                made.append(d)
            group.apply(limits)
        except BaseException:
            # Nothing joined yet, so the new directories are empty groups: undo them.
            for d in reversed(made):
                # The original error matters more; a directory left here, cleanup_stale takes.
                with contextlib.suppress(OSError):
                    os.rmdir(d)
            raise
        return group

    def cleanup_stale(self) -> int:
        """Kills and removes groups under the prefix left by a platform that is gone (killed,
        crashed); returns how many. Groups of live platforms, this one included, are untouched."""
        stale: dict[str, dict[str, Path]] = {}
        for controller, base in self._bases.items():
            try:
                with os.scandir(base / self.prefix) as it:
                    entries = list(it)
            except FileNotFoundError:
                continue
            for entry in entries:
                if entry.is_dir(follow_symlinks=False) and _is_stale(entry.name, self._owner):
                    stale.setdefault(entry.name, {})[controller] = Path(entry.path)
        features = self._features if self._features is not None else self._probe_features()
        for dirname, dirs in sorted(stale.items()):
            group = (V2Cgroup if self.version == 2 else V1Cgroup)(dirname, dirs, features)
            group.kill_all()
            group.remove()
        return len(stale)

    def close(self) -> None:
        """Removes the `<prefix>/` subtree where it is empty (the platform is stopping and its
        instances are gone); a group still in use, or another platform's, stays."""
        for prefix_dir in self._prefix_dirs():
            with contextlib.suppress(OSError):
                prefix_dir.rmdir()

    def describe(self) -> dict[str, object]:
        """What `hxb doctor` shows: the version, the controllers, where groups are made."""
        info: dict[str, object] = {
            "version": self.version,
            "controllers": list(self._controllers),
            "groups_under": {c: str(b / self.prefix) for c, b in self._bases.items()},
            "optional_files": sorted(self._features if self._features is not None else self._probe_features()),
        }
        if self._v2 is not None:
            info["mount"] = str(self._v2.mount)
            info["own_cgroup"] = str(self._v2.own)
            info["platform_leaf"] = str(self._v2.base / f"{self.prefix}-platform")
        else:
            info["mount"] = str(self.root)
        return info


def _detect_v2(root: Path, v2_path: str | None, prefix: str, problems: list[str]) -> _V2Found | None:
    if (root / "cgroup.controllers").is_file():
        mount = root  # pure v2 (unified) host
    elif (root / "unified" / "cgroup.controllers").is_file():
        mount = root / "unified"  # hybrid host: v2 beside the v1 hierarchies
    else:
        problems.append(f"no cgroup v2 mounted at {root} or {root / 'unified'}")
        return None
    own = _under(mount, v2_path) if v2_path is not None else None
    if own is None or not own.is_dir():
        problems.append(f"cgroup v2 at {mount}: our own group {v2_path!r} (from /proc/self/cgroup) is not there")
        return None
    # Our own leaf from an earlier start (or a sibling platform's move): use the group above it.
    base = own.parent if own.name == f"{prefix}-platform" and own != mount else own
    available = (_read(base / "cgroup.controllers") or "").split()
    missing = [c for c in REQUIRED_CONTROLLERS if c not in available]
    if missing:
        offered = " ".join(available) or "nothing"
        problems.append(f"cgroup v2 at {base} lacks {', '.join(missing)} (it offers {offered})")
        return None
    return _V2Found(mount=mount, own=own, base=base)


def _detect_v1(root: Path, v1_paths: Mapping[str, tuple[str, str]], problems: list[str]) -> _V1Found | None:
    bases: dict[str, Path] = {}
    missing: list[str] = []
    for controller in (*REQUIRED_CONTROLLERS, "freezer"):
        found = _v1_hierarchy(root, controller, v1_paths.get(controller))
        if found is not None:
            bases[controller] = found
        elif controller in REQUIRED_CONTROLLERS:
            missing.append(controller)
    if missing:
        problems.append(f"cgroup v1 lacks the {', '.join(missing)} hierarchy under {root}")
        return None
    return _V1Found(bases=bases)


def _v1_hierarchy(root: Path, controller: str, entry: tuple[str, str] | None) -> Path | None:
    if entry is None:
        return None  # not in /proc/self/cgroup: the controller is not mounted as v1
    mount_name, path = entry
    # Co-mounted controllers live at e.g. cpu,cpuacct, with a cpu symlink on most distributions.
    for mount in (root / controller, root / mount_name):
        own = _under(mount, path)
        if own is not None and (own / "cgroup.procs").is_file():
            return own
    return None


def _move_processes(src: Path, dst: Path) -> None:
    for pid in _procs(src):
        try:
            # Appended, one pid per write: the kernel takes one pid per write(2) anyway.
            _write(dst / "cgroup.procs", f"{pid}\n", append=True)
        except CgroupError as exc:
            if exc.errno != errno.ESRCH:  # ESRCH: exited meanwhile
                raise


def _enable_controllers(group_dir: Path) -> None:
    path = group_dir / "cgroup.subtree_control"
    enabled = (_read(path) or "").split()
    missing = [c for c in REQUIRED_CONTROLLERS if c not in enabled]
    if missing:
        _write(path, " ".join(f"+{c}" for c in missing))
