"""Server side of deployment packages: check an uploaded zip, which is hostile input, and unpack it
into the directory that becomes a function's read-only code (`/var/task`).

Everything that can be checked from the central directory is checked before the first byte is
written; what headers can lie about (real sizes, CRCs) is enforced while streaming, and any failure
removes the half-written destination.
"""

from __future__ import annotations

import errno
import hashlib
import lzma
import os
import shutil
import stat
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

from hxb.errors import PackageError, PackageTooLargeError
from hxb.packaging._names import EntryKind, PathTree, entry_error, split_member_name
from hxb.packaging.limits import DEFAULT_LIMITS, RATIO_EXEMPT_BYTES, PackageLimits, format_mb

CONFIG_NAMES: Final = ("hexabase.yaml", "hexabase.yml")
MAX_CONFIG_BYTES: Final = 64 * 1024
MAX_LINK_TARGET_BYTES: Final = 4 * 1024

# Members are streamed in chunks of this size: a member is never read into memory whole.
_CHUNK_BYTES: Final = 64 * 1024
# create_system of zips made on unix, whose external_attr high 16 bits are the st_mode.
_UNIX: Final = 3
# Bit 0: traditional PKWARE encryption; bit 6: strong encryption.
_ENCRYPTED_FLAGS: Final = 0x0001 | 0x0040
_METHODS: Final = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA})
_FILE_TYPES: Final = {
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}
# What zipfile and its decompressors raise on damaged input. OSError belongs here because bz2
# reports a bad stream with it and seeking to a nonsense offset raises it; the try blocks that
# catch these only read the upload, never write to the destination.
_CORRUPT: Final = (
    zipfile.BadZipFile,
    zlib.error,
    lzma.LZMAError,
    EOFError,
    ValueError,
    OSError,
    NotImplementedError,
)


@dataclass(frozen=True, slots=True)
class UnpackedPackage:
    """A package unpacked on disk. `sha256` is the hex digest of the zip file's bytes."""

    root: Path
    file_count: int  # regular files and symlinks; directories are not counted
    unzipped_bytes: int  # bytes actually written to regular files
    sha256: str


@dataclass(frozen=True, slots=True)
class _Entry:
    info: zipfile.ZipInfo
    parts: tuple[str, ...]
    kind: EntryKind
    mode: int

    @property
    def name(self) -> str:
        # orig_filename keeps what the archive says; zipfile truncates `filename` at a NUL.
        return self.info.orig_filename


def is_safe_member_name(name: str, *, limits: PackageLimits = DEFAULT_LIMITS) -> bool:
    """Whether `name` is acceptable as an entry name on its own (duplicates and links aside)."""
    try:
        split_member_name(name, max_path_bytes=limits.max_path_bytes)
    except PackageError:
        return False
    return True


def read_config_text(zip_path: Path, *, limits: PackageLimits = DEFAULT_LIMITS) -> tuple[str, str]:
    """Return `(member_name, text)` of the `hexabase.yaml` (or `hexabase.yml`) at the zip's root.

    Raises:
        PackageError: not a zip, no config or two of them, not a regular file, not UTF-8, over 64 KiB.
    """
    with _open_zip(zip_path, limits) as (archive, _):
        found = [info for info in archive.infolist() if _is_root_config(info, limits)]
        if not found:
            raise PackageError("the package has no hexabase.yaml at its root")
        if len(found) > 1:
            names = ", ".join(repr(info.orig_filename) for info in found)
            raise PackageError(f"the package has more than one config file at its root ({names}); keep one")
        entry = _classify(found[0], limits)
        if entry.kind is not EntryKind.FILE:
            raise entry_error(entry.name, f"is a {entry.kind.value}; the config must be a regular file")
        too_big = f"is over the {MAX_CONFIG_BYTES // 1024} KiB limit for a config file"
        if entry.info.file_size > MAX_CONFIG_BYTES:
            raise entry_error(entry.name, too_big)
        data = _read_small(archive, entry, MAX_CONFIG_BYTES, too_big)
        try:
            # utf-8-sig: editors on Windows like to start YAML files with a byte order mark.
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise entry_error(entry.name, f"is not valid UTF-8 (byte {exc.start})") from None
        return entry.parts[0], text


def unpack_package(zip_path: Path, dest: Path, *, limits: PackageLimits = DEFAULT_LIMITS) -> UnpackedPackage:
    """Check the zip at `zip_path` and unpack it into `dest`, which must not exist yet.

    On any failure everything written so far is removed, `dest` included.

    Raises:
        PackageTooLargeError: the zip, or what it unpacks to, is over a limit.
        PackageError: the zip is corrupt or holds anything unsafe; the message names the entry.
        FileExistsError: `dest` already exists (a bug in the caller: it is never reused).
    """
    if os.path.lexists(dest):
        raise FileExistsError(errno.EEXIST, "unpack destination already exists", os.fspath(dest))
    with _open_zip(zip_path, limits) as (archive, sha256):
        entries, tree = _plan(archive, limits)
        links = [(entry, _read_link_target(archive, entry)) for entry in entries if entry.kind is EntryKind.SYMLINK]
        for entry, target in links:
            tree.check_link_target(entry.parts, target, entry.name)
        os.mkdir(dest, 0o755)
        # From here on dest is ours, so a failure may delete it.
        try:
            file_count, unzipped_bytes = _extract(archive, os.fspath(dest), entries, tree, links, limits)
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
    return UnpackedPackage(root=dest, file_count=file_count, unzipped_bytes=unzipped_bytes, sha256=sha256)


@contextmanager
def _open_zip(zip_path: Path, limits: PackageLimits) -> Iterator[tuple[zipfile.ZipFile, str]]:
    with zip_path.open("rb") as raw:
        size_bytes = os.fstat(raw.fileno()).st_size
        if size_bytes > limits.max_zipped_bytes:
            raise PackageTooLargeError(
                f"the package is {format_mb(size_bytes)} zipped, over the limit of {format_mb(limits.max_zipped_bytes)}"
            )
        sha256 = hashlib.file_digest(raw, "sha256").hexdigest()
        raw.seek(0)
        try:
            archive = zipfile.ZipFile(raw)
        except _CORRUPT as exc:
            raise PackageError(f"the package is not a valid zip file: {exc}") from exc
        with archive:
            yield archive, sha256


def _is_root_config(info: zipfile.ZipInfo, limits: PackageLimits) -> bool:
    try:
        parts = split_member_name(info.orig_filename, max_path_bytes=limits.max_path_bytes)
    except PackageError:
        return False  # unpack_package refuses it; it cannot be the config either way
    return len(parts) == 1 and parts[0] in CONFIG_NAMES


def _plan(archive: zipfile.ZipFile, limits: PackageLimits) -> tuple[list[_Entry], PathTree]:
    """Check everything the central directory tells, before anything is written."""
    infos = archive.infolist()
    if len(infos) > limits.max_entries:
        raise PackageError(f"the package has {len(infos)} entries, over the limit of {limits.max_entries}")
    # Declared sizes first: a bomb is reported as too large, which is what the user must fix.
    declared_bytes = sum(info.file_size for info in infos)
    if declared_bytes > limits.max_unzipped_bytes:
        largest = max(infos, key=lambda info: info.file_size)
        raise PackageTooLargeError(
            f"the package unzips to {format_mb(declared_bytes)},"
            f" over the limit of {format_mb(limits.max_unzipped_bytes)}"
            f" (largest entry {largest.orig_filename!r}, {format_mb(largest.file_size)})"
        )
    tree = PathTree(max_paths=limits.max_entries)
    entries = []
    for info in infos:
        entry = _classify(info, limits)
        tree.add(entry.parts, entry.kind, entry.name)
        entries.append(entry)
    return entries, tree


def _classify(info: zipfile.ZipInfo, limits: PackageLimits) -> _Entry:
    name = info.orig_filename
    parts = split_member_name(name, max_path_bytes=limits.max_path_bytes)
    if info.flag_bits & _ENCRYPTED_FLAGS:
        raise entry_error(name, "is encrypted; upload a zip made without a password")
    if info.compress_type not in _METHODS:
        raise entry_error(name, f"uses compression method {info.compress_type}, which is not supported; use deflate")
    if info.file_size >= RATIO_EXEMPT_BYTES and info.file_size > limits.max_compression_ratio * max(
        info.compress_size, 1
    ):
        ratio = info.file_size // max(info.compress_size, 1)
        raise entry_error(
            name,
            f"expands {ratio}:1 to {format_mb(info.file_size)}, over the {limits.max_compression_ratio}:1 limit;"
            " it looks like a zip bomb",
        )
    kind, mode = _kind_and_mode(info)
    return _Entry(info=info, parts=parts, kind=kind, mode=mode)


def _kind_and_mode(info: zipfile.ZipInfo) -> tuple[EntryKind, int]:
    name = info.orig_filename
    # Only unix zips carry a st_mode; elsewhere the high bits are unset or mean something else.
    unix_mode = info.external_attr >> 16 if info.create_system == _UNIX else 0
    file_type = stat.S_IFMT(unix_mode)
    if file_type in _FILE_TYPES or file_type not in (0, stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK):
        what = _FILE_TYPES.get(file_type, f"file of type {file_type:#o}")
        raise entry_error(name, f"is a {what}; only regular files, directories and symlinks are allowed")
    is_dir_name = name.endswith(("/", "\\"))
    if file_type == stat.S_IFLNK:
        if is_dir_name:
            raise entry_error(name, "is a symlink with a directory name (ending in '/')")
        return EntryKind.SYMLINK, 0o777
    if is_dir_name or file_type == stat.S_IFDIR:
        return EntryKind.DIRECTORY, 0o755
    # & 0o777 drops setuid, setgid and sticky. Read for everyone: instances run as another,
    # unprivileged uid and must read their code; owner write so the platform can delete it.
    # Execute bits are kept as the zip has them (a bundled binary stays executable).
    permissions = unix_mode & 0o777
    return EntryKind.FILE, (permissions | 0o644) if permissions else 0o644


def _read_link_target(archive: zipfile.ZipFile, entry: _Entry) -> str:
    too_big = f"is a symlink whose target is over the {MAX_LINK_TARGET_BYTES}-byte limit"
    if entry.info.file_size > MAX_LINK_TARGET_BYTES:
        raise entry_error(entry.name, too_big)
    data = _read_small(archive, entry, MAX_LINK_TARGET_BYTES, too_big)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise entry_error(entry.name, "is a symlink whose target is not valid UTF-8") from None


def _read_small(archive: zipfile.ZipFile, entry: _Entry, max_bytes: int, too_big: str) -> bytes:
    """Read a member that must be small, without trusting its declared size."""
    chunks: list[bytes] = []
    read_bytes = 0
    with _open_member(archive, entry) as member:
        while chunk := _read_chunk(member, entry):
            read_bytes += len(chunk)
            if read_bytes > max_bytes:
                raise entry_error(entry.name, too_big)
            chunks.append(chunk)
    return b"".join(chunks)


def _extract(
    archive: zipfile.ZipFile,
    root: str,
    entries: list[_Entry],
    tree: PathTree,
    links: list[tuple[_Entry, str]],
    limits: PackageLimits,
) -> tuple[int, int]:
    # Directories, then files, then symlinks: no link exists yet while anything is written, and
    # no entry lies below a link (PathTree refused it), so no write can be redirected by one.
    for rel in tree.directories():
        path = f"{root}/{rel}"
        os.mkdir(path, 0o755)
        # mkdir's mode is filtered by the umask. World-readable on purpose: the sandbox may run
        # the code under another uid than the one unpacking it.
        os.chmod(path, 0o755)  # noqa: S103
    file_count = 0
    unzipped_bytes = 0
    for entry in entries:
        if entry.kind is EntryKind.FILE:
            unzipped_bytes += _write_file(archive, entry, root, limits.max_unzipped_bytes - unzipped_bytes, limits)
            file_count += 1
    for entry, target in links:
        os.symlink(target, f"{root}/{'/'.join(entry.parts)}")
        file_count += 1
    return file_count, unzipped_bytes


def _write_file(archive: zipfile.ZipFile, entry: _Entry, root: str, budget_bytes: int, limits: PackageLimits) -> int:
    """Stream one member to disk, counting real bytes: the declared sizes already checked may lie."""
    path = f"{root}/{'/'.join(entry.parts)}"
    # O_EXCL | O_NOFOLLOW: never reuse or write through anything already at that path.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    written_bytes = 0
    with os.fdopen(fd, "wb") as out, _open_member(archive, entry) as member:
        while chunk := _read_chunk(member, entry):
            written_bytes += len(chunk)
            if written_bytes > entry.info.file_size:
                raise entry_error(
                    entry.name, "holds more bytes than its header declares; the zip is corrupt or crafted"
                )
            if written_bytes > budget_bytes:
                raise PackageTooLargeError(
                    f"package entry {entry.name!r} takes the unzipped size over the limit of"
                    f" {format_mb(limits.max_unzipped_bytes)}"
                )
            out.write(chunk)
        os.fchmod(out.fileno(), entry.mode)  # fchmod, unlike the open() mode, ignores the umask
    return written_bytes


@contextmanager
def _open_member(archive: zipfile.ZipFile, entry: _Entry) -> Iterator[IO[bytes]]:
    try:
        member = archive.open(entry.info)
    except _CORRUPT as exc:
        raise _corrupt(entry, exc) from exc
    with member:
        yield member


def _read_chunk(member: IO[bytes], entry: _Entry) -> bytes:
    try:
        return member.read(_CHUNK_BYTES)
    except _CORRUPT as exc:
        # zipfile checks the CRC as the last byte is read, so damage is found here, mid-stream.
        raise _corrupt(entry, exc) from exc


def _corrupt(entry: _Entry, exc: Exception) -> PackageError:
    return entry_error(entry.name, f"is corrupt ({exc}); build the zip again")
