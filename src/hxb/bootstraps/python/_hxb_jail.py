"""Entering an hxb sandbox, from inside: the steps a zygote's child takes before it runs any
user code. Linux only; root until `drop_privileges`. Python 3.7+ and the standard library
(ctypes for the system calls Python does not wrap).

Order matters and is fixed by `_hxb_zygote`: join the cgroup, then new mount/UTS/IPC
namespaces and the prepared network namespace (the PID namespace was made by the fork),
then the new root, then (in the runtime process) drop privileges, rlimits, seccomp last.
"""

import ctypes
import errno
import os
import platform
import socket
import struct

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEW_ANY = (
    CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET
)

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2

# glibc has no pivot_root wrapper: the raw system call, by architecture.
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


class JailError(Exception):
    """A step of entering the sandbox failed; the message names the step and the path."""


def _check(result, what):
    if result != 0:
        code = ctypes.get_errno()
        raise JailError("{}: {}".format(what, os.strerror(code)))


def _b(text):
    return text.encode() if text is not None else None


def mount(source, target, fstype, flags, data=None):
    _check(_libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)), "mount {} on {}".format(source, target))


def bind_readonly(source, target, extra_flags=MS_NOSUID | MS_NODEV):
    # A bind mount takes its flags only on a second, remount call.
    mount(source, target, None, MS_BIND | MS_REC)
    mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | extra_flags)


def bind_writable(source, target):
    mount(source, target, None, MS_BIND)
    mount(None, target, None, MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV)


def unshare(flags):
    _check(_libc.unshare(flags), "unshare({:#x})".format(flags))


def setns(fd, nstype):
    _check(_libc.setns(fd, nstype), "setns({:#x})".format(nstype))


def prctl(option, arg2=0, arg3=0, arg4=0, arg5=0):
    _check(_libc.prctl(option, arg2, arg3, arg4, arg5), "prctl({})".format(option))


def set_process_name(name):
    buf = ctypes.create_string_buffer(name.encode()[:15])
    _libc.prctl(PR_SET_NAME, ctypes.addressof(buf), 0, 0, 0)


def join_cgroup(procs_files):
    for path in procs_files:
        try:
            with open(path, "w") as fh:
                fh.write("0")
        except OSError as exc:
            raise JailError("joining cgroup {}: {}".format(path, exc.strerror)) from None


def enter_namespaces(netns_path):
    flags = CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC
    if netns_path is None:
        flags |= CLONE_NEWNET  # no network at all: a loopback-only namespace
    unshare(flags)
    if netns_path is not None:
        fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            setns(fd, CLONE_NEWNET)
        finally:
            os.close(fd)


def _mkdirs(root, path, mode=0o755):
    full = os.path.join(root, path.lstrip("/"))
    os.makedirs(full, mode=mode, exist_ok=True)
    return full


def _write(root, path, text, mode=0o644):
    full = os.path.join(root, path.lstrip("/"))
    with open(full, "w") as fh:
        fh.write(text)
    os.chmod(full, mode)


def build_root(spec):
    """Makes the sandbox's file system in a fresh tmpfs at spec["root_mount"] and pivots into
    it. Everything of the host it shows is bound read-only; /tmp is the instance's scratch
    volume; /proc belongs to the new PID namespace (this process is its PID 1)."""
    build_base_root(spec)
    finish_root(spec)


def build_base_root(spec):
    """Everything of the root that does not depend on the function: done ahead of demand for a
    prepared sandbox, which then waits for its function (see `finish_root`)."""
    root = spec["root_mount"]
    # Nothing mounted from here on propagates back to the host, and host mounts stop
    # propagating in.
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=4m,mode=755")

    for host_dir in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(host_dir):
            os.symlink(os.readlink(host_dir), os.path.join(root, host_dir.lstrip("/")))
        elif os.path.isdir(host_dir):
            bind_readonly(host_dir, _mkdirs(root, host_dir))
    for host_dir in spec.get("extra_readonly", ()):  # e.g. an interpreter outside /usr
        if os.path.isdir(host_dir):
            bind_readonly(host_dir, _mkdirs(root, host_dir))

    _mkdirs(root, "/var/task")
    bind_readonly(spec["runtime_root"], _mkdirs(root, "/var/runtime"))
    _mkdirs(root, "/opt")

    tmp = _mkdirs(root, "/tmp", 0o1777)
    if spec.get("tmp_volume"):
        bind_writable(spec["tmp_volume"], tmp)
    else:
        # No scratch volume (degraded): a tmpfs, which counts against the memory limit.
        mount("tmpfs", tmp, "tmpfs", MS_NOSUID | MS_NODEV, "size={}m,mode=1777".format(spec["tmp_size_mib"]))

    _build_etc(root, spec)
    _build_dev(root)
    _mkdirs(root, "/proc")
    _mkdirs(root, "/var/tmp", 0o1777)
    _mkdirs(root, "/run", 0o755)
    _mkdirs(root, "/.oldroot", 0o700)


def finish_root(spec):
    """The function's code and layers, then the pivot into the new root: from here on the
    process sees nothing of the host."""
    root = spec["root_mount"]
    bind_readonly(spec["task_root"], os.path.join(root, "var/task"))
    if spec.get("opt_root"):
        bind_readonly(spec["opt_root"], os.path.join(root, "opt"))
    old = os.path.join(root, ".oldroot")
    _check(_libc.syscall(_SYS_PIVOT_ROOT[platform.machine()], _b(root), _b(old)), "pivot_root")
    os.chdir("/")
    _check(_libc.umount2(b"/.oldroot", MNT_DETACH), "umount old root")
    os.rmdir("/.oldroot")
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _write("/", "/etc/hostname", spec["hostname"] + "\n")
    # The root tmpfs itself becomes read-only: the instance writes only to /tmp.
    mount(None, "/", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _build_etc(root, spec):
    """A minimal, secret-free /etc: users and names the sandbox needs, the CA certificates,
    the dynamic linker's cache; nothing else of the host's /etc."""
    _mkdirs(root, "/etc")
    uid, gid = spec["uid"], spec["gid"]
    _write(
        root,
        "/etc/passwd",
        "root:x:0:0:root:/root:/usr/sbin/nologin\nsbx_user1051:x:{}:{}:hxb sandbox:/tmp:/usr/sbin/nologin\n".format(
            uid, gid
        ),
    )
    _write(root, "/etc/group", "root:x:0:\nsbx_user1051:x:{}:\n".format(gid))
    _write(root, "/etc/hosts", "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")
    _write(root, "/etc/nsswitch.conf", "passwd: files\ngroup: files\nhosts: files dns\nnetworks: files\n")
    resolvers = "".join("nameserver {}\n".format(ns) for ns in spec.get("nameservers", ()))
    _write(root, "/etc/resolv.conf", resolvers or "# no network\n")
    for host_path in ("/etc/ssl/certs", "/etc/ca-certificates", "/etc/alternatives", "/etc/ld.so.conf.d"):
        if os.path.isdir(host_path):
            bind_readonly(host_path, _mkdirs(root, host_path))
    for host_file in (
        "/etc/ld.so.cache",
        "/etc/ld.so.conf",
        "/etc/localtime",
        "/etc/mime.types",
        "/etc/protocols",
        "/etc/services",
        "/etc/ssl/openssl.cnf",
    ):
        if os.path.isfile(host_file):
            target = os.path.join(root, host_file.lstrip("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            open(target, "w").close()
            bind_readonly(host_file, target)


def _build_dev(root):
    dev = _mkdirs(root, "/dev")
    mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=755")
    # No /dev/tty: an instance has no controlling terminal (its zygote has its own session).
    for name in ("null", "zero", "full", "random", "urandom"):
        target = os.path.join(dev, name)
        open(target, "w").close()
        mount("/dev/" + name, target, None, MS_BIND)
    os.mkdir(os.path.join(dev, "shm"), 0o1777)
    # POSIX shared memory for multiprocessing; tmpfs, so it counts against the memory limit.
    mount("tmpfs", os.path.join(dev, "shm"), "tmpfs", MS_NOSUID | MS_NODEV, "size=64m,mode=1777")
    os.mkdir(os.path.join(dev, "pts"), 0o755)
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, os.path.join(dev, name))


def set_hostname(name):
    try:
        socket.sethostname(name)
    except OSError as exc:
        raise JailError("sethostname: {}".format(exc.strerror)) from None


def drop_privileges(uid, gid, nofile):
    """Becomes the unprivileged sandbox user: all capabilities go with uid 0."""
    import resource

    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def apply_seccomp(program):
    """Loads a compiled BPF filter (made once by the zygote with libseccomp). no_new_privs
    first: no setuid binary can regain what was dropped, and the kernel requires it."""
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    if not program:
        return
    count = len(program) // 8

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    buf = ctypes.create_string_buffer(program)
    fprog = SockFprog(count, ctypes.cast(buf, ctypes.c_void_p))
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0), "seccomp")


# --- the filter, compiled once per zygote ----------------------------------------------------------

# Refused with EPERM: what could reach outside the sandbox (mount, namespaces, kernel modules,
# keys, tracing other processes, the clock), or accept connections.
DENIED_SYSCALLS = (
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsmount",
    "fsconfig",
    "fspick",
    "mount_setattr",
    "unshare",
    "setns",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kexec_load",
    "kexec_file_load",
    "reboot",
    "init_module",
    "finit_module",
    "delete_module",
    "bpf",
    "perf_event_open",
    "keyctl",
    "add_key",
    "request_key",
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    "open_by_handle_at",
    "name_to_handle_at",
    "userfaultfd",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "syslog",
    "lookup_dcookie",
    "vhangup",
    "iopl",
    "ioperm",
    "uselib",
    "sethostname",
    "setdomainname",
    "pidfd_getfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "listen",
    "accept",
    "accept4",
)
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_ERRNO_BASE = 0x00050000
SCMP_CMP_EQ = 4
SCMP_CMP_MASKED_EQ = 7
# Socket families no function needs that reach past the network namespace: vsock talks to the
# hypervisor of a VM (its agents listen there), not through our NAT.
DENIED_SOCKET_FAMILIES = (40,)  # AF_VSOCK


class _ScmpArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


def compile_seccomp():
    """The BPF program (bytes) of hxb's filter, or b"" when libseccomp is not installed."""
    try:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError:
        return b""
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ScmpArgCmp),
    ]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        return b""
    try:
        eperm = SCMP_ACT_ERRNO_BASE | errno.EPERM
        for name in DENIED_SYSCALLS:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:
                continue  # not on this architecture
            _check(lib.seccomp_rule_add_array(ctx, eperm, nr, 0, None), "seccomp rule " + name)
        socket_nr = lib.seccomp_syscall_resolve_name(b"socket")
        for family in DENIED_SOCKET_FAMILIES:
            cmp = _ScmpArgCmp(0, SCMP_CMP_EQ, family, 0)
            _check(lib.seccomp_rule_add_array(ctx, eperm, socket_nr, 1, ctypes.byref(cmp)), "seccomp rule socket")
        # clone() with any namespace flag: no new namespaces from inside. clone3 cannot be
        # inspected (its flags are behind a pointer): ENOSYS makes libc fall back to clone.
        clone_nr = lib.seccomp_syscall_resolve_name(b"clone")
        for flag in (
            CLONE_NEWNS,
            CLONE_NEWCGROUP,
            CLONE_NEWUTS,
            CLONE_NEWIPC,
            CLONE_NEWUSER,
            CLONE_NEWPID,
            CLONE_NEWNET,
        ):
            cmp = _ScmpArgCmp(0, SCMP_CMP_MASKED_EQ, flag, flag)
            _check(lib.seccomp_rule_add_array(ctx, eperm, clone_nr, 1, ctypes.byref(cmp)), "seccomp rule clone")
        clone3_nr = lib.seccomp_syscall_resolve_name(b"clone3")
        if clone3_nr >= 0:
            _check(
                lib.seccomp_rule_add_array(ctx, SCMP_ACT_ERRNO_BASE | errno.ENOSYS, clone3_nr, 0, None),
                "seccomp rule clone3",
            )
        read_fd, write_fd = os.pipe()
        try:
            _check(lib.seccomp_export_bpf(ctx, write_fd), "seccomp export")
            os.close(write_fd)
            write_fd = -1
            chunks = []
            while True:
                chunk = os.read(read_fd, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(read_fd)
            if write_fd >= 0:
                os.close(write_fd)
    finally:
        lib.seccomp_release(ctx)


def status_bytes(status):
    return struct.pack("<i", status)
