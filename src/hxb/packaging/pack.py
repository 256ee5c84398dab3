"""CLI side of deployment packages: zip a function's directory, honouring `.hxbignore`, so that the
same tree always gives the same bytes (and so the same sha256)."""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pathspec

from hxb.errors import PackageError, PackageTooLargeError
from hxb.packaging._names import EntryKind, PathTree, split_member_name
from hxb.packaging.limits import DEFAULT_LIMITS, PackageLimits, format_mb

IGNORE_FILE: Final = ".hxbignore"
# Put before the user's lines, so that a negation there (`!vendored.pyc`) wins, as in git.
# node_modules/.cache is matched at any depth: a function may hold several node projects.
BUILTIN_IGNORES: Final = (
    ".git/",
    ".hg/",
    ".svn/",
    "__pycache__/",
    "*.pyc",
    ".DS_Store",
    ".venv/",
    "**/node_modules/.cache/",
)

# The earliest timestamp a zip can hold; fixed so that only names, modes and contents reach the bytes.
_EPOCH: Final = (1980, 1, 1, 0, 0, 0)
_CHUNK_BYTES: Final = 256 * 1024
# MS-DOS directory attribute, which Windows tools look at instead of the unix mode.
_DOS_DIRECTORY: Final = 0x10
_SPECIAL_FILES: Final = {
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}


@dataclass(frozen=True, slots=True)
class PackResult:
    """The zip written by `pack_directory`."""

    path: Path
    file_count: int  # regular files and symlinks; directory entries are not counted
    zipped_bytes: int
    unzipped_bytes: int
    sha256: str


@dataclass(frozen=True, slots=True)
class _Source:
    name: str  # entry name: '/'-separated, relative to the root, ending in '/' for a directory
    path: Path
    kind: EntryKind
    mode: int
    size_bytes: int = 0
    link_target: str = ""


def pack_directory(
    src: Path,
    out: Path,
    *,
    limits: PackageLimits = DEFAULT_LIMITS,
    progress: Callable[[int, int], None] | None = None,
) -> PackResult:
    """Zip the directory `src` into the file `out`, replacing `out` only once the zip is complete.

    `progress(done_bytes, total_bytes)` counts uncompressed file content and is called after each
    chunk is added.

    Raises:
        PackageTooLargeError: the files, or the zip, are over a limit.
        PackageError: `src` is not a directory, holds a special file, a symlink leading outside it,
            or a name the server would refuse.
    """
    if not src.is_dir():
        raise PackageError(f"{os.fspath(src)!r} is not a directory; pass the function's directory")
    sources = _Walker(src, out, limits).collect()
    total_bytes = sum(source.size_bytes for source in sources)
    if total_bytes > limits.max_unzipped_bytes:
        largest = max(sources, key=lambda source: source.size_bytes)
        raise PackageTooLargeError(
            f"the files to package add up to {format_mb(total_bytes)},"
            f" over the limit of {format_mb(limits.max_unzipped_bytes)}"
            f" (largest: {largest.name!r}, {format_mb(largest.size_bytes)}); list what is not needed in {IGNORE_FILE}"
        )
    # A temporary file beside `out`, so the final rename stays on one file system and is atomic.
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w+b") as fh:
            with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED) as archive:
                unzipped_bytes = _write_all(archive, sources, total_bytes, limits, progress)
            zipped_bytes = fh.tell()
            _check_zipped_size(zipped_bytes, limits)
            fh.seek(0)
            sha256 = hashlib.file_digest(fh, "sha256").hexdigest()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return PackResult(
        path=out,
        file_count=sum(source.kind is not EntryKind.DIRECTORY for source in sources),
        zipped_bytes=zipped_bytes,
        unzipped_bytes=unzipped_bytes,
        sha256=sha256,
    )


class _Walker:
    """Lists what goes into the package, in entry-name order."""

    def __init__(self, root: Path, out: Path, limits: PackageLimits) -> None:
        self._root = root
        self._limits = limits
        self._spec = pathspec.GitIgnoreSpec.from_lines([*BUILTIN_IGNORES, *self._read_ignore_file()])
        # A previous zip written inside the tree must not end up inside the next one.
        self._out_name: str | None = None
        resolved_root, resolved_out = root.resolve(), out.resolve()
        if resolved_out.is_relative_to(resolved_root):
            self._out_name = resolved_out.relative_to(resolved_root).as_posix()
        self._tree = PathTree(max_paths=limits.max_entries)
        self._sources: list[_Source] = []

    def collect(self) -> list[_Source]:
        self._walk("")  # an empty root gives an empty zip: the server then says hexabase.yaml is missing
        for source in self._sources:
            if source.kind is EntryKind.SYMLINK:
                parts = split_member_name(source.name, max_path_bytes=self._limits.max_path_bytes)
                self._tree.check_link_target(parts, source.link_target, source.name)
        return sorted(self._sources, key=lambda source: source.name)

    def _read_ignore_file(self) -> list[str]:
        path = self._root / IGNORE_FILE
        try:
            return path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        except UnicodeDecodeError:
            raise PackageError(f"{os.fspath(path)!r} is not valid UTF-8") from None

    def _walk(self, prefix: str) -> bool:
        """Add what `prefix` (a directory name ending in '/', or '' for the root) holds; False if empty."""
        with os.scandir(self._root / prefix if prefix else self._root) as scan:
            items = sorted(scan, key=lambda item: item.name)
        for item in items:
            name = prefix + item.name
            st = item.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                # Pruning an ignored directory is also what makes git ignore `!dir/keep` below it.
                if self._spec.match_file(name + "/"):
                    continue
                parts = self._split(name)
                if not self._walk(name + "/"):
                    # Kept as an entry, or the empty directory would vanish: a zip implies only the
                    # directories above its entries. One emptied by ignores is left out, as git does.
                    empty = _Source(name=name + "/", path=Path(item.path), kind=EntryKind.DIRECTORY, mode=0o755)
                    self._add(parts, empty)
            elif name not in (IGNORE_FILE, self._out_name) and not self._spec.match_file(name):
                self._add(self._split(name), self._file_source(name, Path(item.path), st))
        return bool(items)

    def _file_source(self, name: str, path: Path, st: os.stat_result) -> _Source:
        if stat.S_ISREG(st.st_mode):
            return _Source(name=name, path=path, kind=EntryKind.FILE, mode=st.st_mode & 0o777, size_bytes=st.st_size)
        if stat.S_ISLNK(st.st_mode):
            target = self._link_target(name, path)
            return _Source(name=name, path=path, kind=EntryKind.SYMLINK, mode=0o777, link_target=target)
        what = _SPECIAL_FILES.get(stat.S_IFMT(st.st_mode), "special file")
        raise PackageError(f"{name!r} is a {what}, which cannot be packaged; delete it or list it in {IGNORE_FILE}")

    def _link_target(self, name: str, path: Path) -> str:
        target = os.readlink(path)
        if not os.path.isabs(target):
            return target  # as written; collect() checks that it stays inside
        # An absolute target inside the tree is stored relative: the server refuses absolute ones,
        # and the tree will live at another path there anyway.
        for root in (os.path.abspath(self._root), os.path.realpath(self._root)):
            if target == root or target.startswith(root + os.sep):
                return Path(os.path.relpath(target, start=os.path.dirname(os.path.join(root, name)))).as_posix()
        raise PackageError(
            f"symlink {name!r} -> {target!r} points outside {os.fspath(self._root)!r};"
            " copy the file into the package instead of linking to it"
        )

    def _split(self, name: str) -> tuple[str, ...]:
        """Check `name` by the server's rules, before descending into it."""
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise PackageError(f"{name!r} has a name that is not valid UTF-8; rename it") from None
        if "\\" in name:
            # The server reads '\' as a separator, as Windows zip tools write it.
            raise PackageError(f"{name!r} has a backslash in its name, which a package cannot hold; rename it")
        return split_member_name(name, max_path_bytes=self._limits.max_path_bytes)

    def _add(self, parts: tuple[str, ...], source: _Source) -> None:
        self._tree.add(parts, source.kind, source.name)
        self._sources.append(source)


def _write_all(
    archive: zipfile.ZipFile,
    sources: list[_Source],
    total_bytes: int,
    limits: PackageLimits,
    progress: Callable[[int, int], None] | None,
) -> int:
    done_bytes = 0
    for source in sources:
        info = zipfile.ZipInfo(source.name, date_time=_EPOCH)
        info.create_system = 3  # unix: the high 16 bits of external_attr are then a st_mode
        if source.kind is EntryKind.DIRECTORY:
            info.external_attr = ((stat.S_IFDIR | 0o755) << 16) | _DOS_DIRECTORY
            archive.writestr(info, b"", compress_type=zipfile.ZIP_STORED)
        elif source.kind is EntryKind.SYMLINK:
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, source.link_target.encode("utf-8"), compress_type=zipfile.ZIP_STORED)
        else:
            info.external_attr = (stat.S_IFREG | source.mode) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            info.file_size = source.size_bytes  # lets zipfile decide up front whether ZIP64 is needed
            done_bytes = _copy_file(archive, info, source, done_bytes, total_bytes, limits, progress)
    return done_bytes


def _copy_file(
    archive: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    source: _Source,
    done_bytes: int,
    total_bytes: int,
    limits: PackageLimits,
    progress: Callable[[int, int], None] | None,
) -> int:
    try:
        # O_NOFOLLOW: the file was a regular file when listed; never follow a link swapped in since.
        fd = os.open(source.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise PackageError(f"cannot read {source.name!r}: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as src, archive.open(info, "w") as dst:
        while chunk := src.read(_CHUNK_BYTES):
            done_bytes += len(chunk)
            if done_bytes > limits.max_unzipped_bytes:  # the file grew since it was listed
                raise PackageTooLargeError(
                    f"{source.name!r} takes the files to package over the limit of"
                    f" {format_mb(limits.max_unzipped_bytes)}"
                )
            dst.write(chunk)
            if progress is not None:
                progress(done_bytes, total_bytes)
    return done_bytes


def _check_zipped_size(zipped_bytes: int, limits: PackageLimits) -> None:
    if zipped_bytes > limits.max_zipped_bytes:
        raise PackageTooLargeError(
            f"the package is {format_mb(zipped_bytes)} zipped, over the limit of"
            f" {format_mb(limits.max_zipped_bytes)}; list what is not needed in {IGNORE_FILE}"
        )
