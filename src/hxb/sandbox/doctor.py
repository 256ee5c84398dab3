"""What isolation this host can give: each feature the linux sandbox uses, whether it is
there, and what to do when it is not. Used by `hxb doctor` and by `hxb serve` to choose
between the linux sandbox and the local (no isolation) one."""

from __future__ import annotations

import ctypes
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from hxb.errors import SandboxUnavailableError


@dataclass(frozen=True, slots=True)
class Feature:
    name: str
    ok: bool
    detail: str
    required: bool = True  # without it there is no linux sandbox; else a degraded one
    hint: str = ""


@dataclass(frozen=True, slots=True)
class HostReport:
    features: tuple[Feature, ...]

    @property
    def sandbox_possible(self) -> bool:
        return all(f.ok for f in self.features if f.required)

    @property
    def complete(self) -> bool:
        return all(f.ok for f in self.features)

    def missing(self) -> list[Feature]:
        return [f for f in self.features if not f.ok]


_NAMESPACES = {
    "mount": 0x00020000,
    "uts": 0x04000000,
    "ipc": 0x08000000,
    "pid": 0x20000000,
    "network": 0x40000000,
}


def _probe_unshare(flag: int) -> str | None:
    """Tries unshare(flag) in a throw-away child; None if it worked, else the error."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave at once, without Python's cleanup
        os.close(read_fd)
        libc = ctypes.CDLL(None, use_errno=True)
        result = libc.unshare(flag)
        os.write(write_fd, b"ok" if result == 0 else os.strerror(ctypes.get_errno()).encode())
        os._exit(0)
    os.close(write_fd)
    try:
        answer = os.read(read_fd, 256).decode()
    finally:
        os.close(read_fd)
        os.waitpid(pid, 0)
    return None if answer == "ok" else answer or "no answer"


def _check_root() -> Feature:
    root = os.geteuid() == 0
    return Feature(
        "root",
        root,
        "running as root" if root else f"running as uid {os.geteuid()}",
        hint="" if root else "run `hxb serve` as root (namespaces, cgroups and mounts need it)",
    )


def _check_namespaces() -> list[Feature]:
    features = []
    for name, flag in _NAMESPACES.items():
        error = _probe_unshare(flag) if hasattr(os, "fork") else "not Linux"
        features.append(Feature(f"{name} namespace", error is None, "available" if error is None else error))
    return features


def _check_cgroups() -> Feature:
    from hxb.sandbox.cgroups import CgroupDriver

    try:
        driver = CgroupDriver.detect()
    except (SandboxUnavailableError, OSError) as exc:
        return Feature("cgroups", False, str(exc), hint="mount cgroup v2 with memory, cpu and pids (or v1)")
    info = driver.describe()
    return Feature("cgroups", True, f"v{driver.version}: " + ", ".join(f"{k}={v}" for k, v in info.items()))


def check_seccomp() -> Feature:
    """Whether instances can get their seccomp filter (libseccomp 2 and a kernel with filters)."""
    actions = Path("/proc/sys/kernel/seccomp/actions_avail")
    try:
        ctypes.CDLL("libseccomp.so.2")
        have_lib = True
    except OSError:
        have_lib = False
    kernel = actions.exists() and "errno" in actions.read_text()
    ok = have_lib and kernel
    detail = "libseccomp 2 and kernel filters" if ok else ("no libseccomp.so.2" if not have_lib else "kernel lacks it")
    return Feature(
        "seccomp",
        ok,
        detail,
        required=False,
        hint="" if ok else "apt-get install libseccomp2 (instances run unfiltered)",
    )


def _check_network() -> Feature:
    missing = [tool for tool in ("ip", "nft") if shutil.which(tool) is None]
    forward = Path("/proc/sys/net/ipv4/ip_forward")
    if missing:
        return Feature(
            "outbound NAT",
            False,
            "missing " + ", ".join(missing),
            required=False,
            hint="apt-get install iproute2 nftables (instances get no network)",
        )
    if not os.access(forward, os.W_OK):
        return Feature("outbound NAT", False, "cannot set net.ipv4.ip_forward", required=False)
    return Feature("outbound NAT", True, "veth + nftables masquerade (ip, nft found)", required=False)


def _check_scratch() -> Feature:
    loop = Path("/dev/loop-control").exists()
    mkfs = shutil.which("mkfs.ext4") is not None
    ok = loop and mkfs
    detail = "loop devices and mkfs.ext4" if ok else ("no /dev/loop-control" if not loop else "no mkfs.ext4")
    return Feature(
        "disk-backed /tmp",
        ok,
        detail,
        required=False,
        hint="" if ok else "apt-get install e2fsprogs; load the loop module (/tmp falls back to a tmpfs in memory)",
    )


def _check_uid(uid: int) -> Feature:
    users = {}
    try:
        for line in Path("/etc/passwd").read_text().splitlines():
            parts = line.split(":")
            if len(parts) > 2 and parts[2].isdigit():
                users[int(parts[2])] = parts[0]
    except OSError:
        pass
    clash = users.get(uid)
    return Feature(
        "sandbox uid",
        clash is None,
        f"uid {uid} is unused on this host" if clash is None else f"uid {uid} belongs to {clash!r} on this host",
        required=False,
        hint="" if clash is None else "set HXB_SANDBOX_UID/HXB_SANDBOX_GID to an unused id",
    )


def check_host(*, uid: int = 990) -> HostReport:
    """Runs every check; cheap (a few forks), safe to call at every start."""
    features: list[Feature] = [_check_root()]
    if not Path("/proc/self/ns").is_dir():
        features.append(Feature("namespaces", False, "not Linux", hint="use HXB_SANDBOX_MODE=local"))
        return HostReport(tuple(features))
    if features[0].ok:
        # Probing namespaces unprivileged only says "operation not permitted".
        features += _check_namespaces()
        features.append(_check_cgroups())
    features += [check_seccomp(), _check_network(), _check_scratch(), _check_uid(uid)]
    return HostReport(tuple(features))
