"""Unpacking a deployment package: hostile zips are refused before or while writing, and leave nothing behind."""

from __future__ import annotations

import hashlib
import os
import re
import stat
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest

from hxb.errors import PackageError, PackageTooLargeError
from hxb.packaging import PackageLimits, is_safe_member_name, read_config_text, unpack_package

REGULAR = stat.S_IFREG | 0o644


@dataclass(frozen=True)
class Entry:
    """One entry of a test zip, written exactly as given (no sanitising)."""

    name: str
    data: bytes = b""
    mode: int = REGULAR  # st_mode, file type included; 0 for none
    create_system: int = 3
    # MS-DOS attributes in the low 16 bits; zipfile swaps an all-zero external_attr for 0o600.
    dos_attributes: int = 0
    compress_type: int = zipfile.ZIP_DEFLATED


def link(name: str, target: str) -> Entry:
    return Entry(name, target.encode(), mode=stat.S_IFLNK | 0o777, compress_type=zipfile.ZIP_STORED)


def directory(name: str) -> Entry:
    return Entry(name, mode=stat.S_IFDIR | 0o755, compress_type=zipfile.ZIP_STORED)


def write_zip(path: Path, *entries: Entry) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for entry in entries:
            info = zipfile.ZipInfo(entry.name, date_time=(2024, 1, 1, 0, 0, 0))
            # ZipInfo cuts a name at NUL; the raw name is what goes into the archive.
            info.filename = entry.name
            info.create_system = entry.create_system
            info.external_attr = entry.mode << 16 | entry.dos_attributes
            info.compress_type = entry.compress_type
            archive.writestr(info, entry.data)
    return path


def patch_central(data: bytes, name: str, offset: int, fmt: str, value: int) -> bytes:
    """Overwrite one field of `name`'s central directory record (offsets per APPNOTE 4.3.12)."""
    start = 0
    while (start := data.find(b"PK\x01\x02", start)) >= 0:
        (name_length,) = struct.unpack_from("<H", data, start + 28)
        if data[start + 46 : start + 46 + name_length] == name.encode():
            patched = bytearray(data)
            struct.pack_into(fmt, patched, start + offset, value)
            return bytes(patched)
        start += 4
    raise AssertionError(f"no central directory record for {name!r}")


CRC_OFFSET, METHOD_OFFSET, FLAGS_OFFSET, SIZE_OFFSET = 16, 10, 8, 24


@pytest.fixture
def area(tmp_path: Path) -> Path:
    """The parent of every dest, holding a sentinel that no unpack may touch."""
    area = tmp_path / "area"
    area.mkdir()
    (area / "sentinel.txt").write_text("untouched")
    return area


@pytest.fixture
def dest(area: Path) -> Path:
    return area / "task"


@pytest.fixture
def zip_path(tmp_path: Path) -> Path:
    return tmp_path / "package.zip"


def assert_left_nothing(tmp_path: Path, area: Path, dest: Path) -> None:
    assert not os.path.lexists(dest)
    assert sorted(os.listdir(area)) == ["sentinel.txt"]
    assert (area / "sentinel.txt").read_text() == "untouched"
    assert sorted(os.listdir(tmp_path)) == ["area", "package.zip"]


def refuse(zip_path: Path, dest: Path, *, limits: PackageLimits | None = None) -> PackageError:
    with pytest.raises(PackageError) as caught:
        unpack_package(zip_path, dest, limits=limits or PackageLimits())
    message = str(caught.value)
    assert "\n" not in message
    return caught.value


# --- what a good package becomes -----------------------------------------------------------------


def test_unpack_nested_tree_keeps_contents_and_modes(zip_path: Path, dest: Path) -> None:
    write_zip(
        zip_path,
        Entry("hexabase.yaml", b"function: {name: demo}\n"),
        directory("lib/"),
        Entry("lib/pkg/mod.py", b"X = 1\n"),
        Entry("bin/tool", b"#!/bin/sh\necho hi\n", mode=stat.S_IFREG | 0o755),
        Entry("data/private.txt", b"p", mode=stat.S_IFREG | 0o640),
        directory("empty/"),
    )

    result = unpack_package(zip_path, dest)

    assert result.root == dest
    assert result.file_count == 4
    assert result.unzipped_bytes == 23 + 6 + 18 + 1
    assert result.sha256 == hashlib.sha256(zip_path.read_bytes()).hexdigest()
    assert (dest / "lib/pkg/mod.py").read_bytes() == b"X = 1\n"
    assert (dest / "empty").is_dir()
    assert os.access(dest / "bin/tool", os.X_OK)
    assert stat.S_IMODE((dest / "bin/tool").stat().st_mode) == 0o755
    # Made readable by all: instances run as another uid and must read their code.
    assert stat.S_IMODE((dest / "data/private.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((dest / "hexabase.yaml").stat().st_mode) == 0o644
    for directory_path in (dest, dest / "lib", dest / "lib/pkg", dest / "empty"):
        assert stat.S_IMODE(directory_path.stat().st_mode) == 0o755


@pytest.mark.parametrize(
    ("entry", "expected_mode"),
    [
        pytest.param(Entry("f", b"x", mode=0, create_system=0, dos_attributes=0x20), 0o644, id="windows"),
        pytest.param(Entry("f", b"x", mode=0, dos_attributes=0x20), 0o644, id="unix-without-mode"),
        pytest.param(Entry("f", b"x", mode=REGULAR | 0o111, create_system=0), 0o644, id="windows-ignores-high-bits"),
        pytest.param(Entry("f", b"x", mode=stat.S_IFREG), 0o644, id="unix-type-only"),
        pytest.param(Entry("f", b"x", mode=stat.S_IFREG | 0o6755), 0o755, id="setuid-setgid-stripped"),
        pytest.param(Entry("f", b"x", mode=stat.S_IFREG | 0o1777), 0o777, id="sticky-stripped"),
        pytest.param(Entry("f", b"x", mode=stat.S_IFREG | 0o444), 0o644, id="owner-write-added"),
        pytest.param(Entry("f", b"x", mode=stat.S_IFREG | 0o055), 0o655, id="owner-read-added"),
        pytest.param(Entry("f", b"x", mode=0o755), 0o755, id="permissions-without-type"),
    ],
)
def test_unpack_file_mode_is_normalised(zip_path: Path, dest: Path, entry: Entry, expected_mode: int) -> None:
    write_zip(zip_path, entry)
    unpack_package(zip_path, dest)
    assert stat.S_IMODE((dest / "f").stat().st_mode) == expected_mode


def test_unpack_windows_zip_with_backslashes_makes_directories(zip_path: Path, dest: Path) -> None:
    write_zip(
        zip_path,
        Entry("dir\\sub\\", mode=0, create_system=0, dos_attributes=0x10),
        Entry("dir\\sub\\f.txt", b"x", mode=0, create_system=0, dos_attributes=0x20),
    )

    unpack_package(zip_path, dest)

    assert (dest / "dir/sub/f.txt").read_bytes() == b"x"
    assert stat.S_IMODE((dest / "dir/sub").stat().st_mode) == 0o755


def test_unpack_internal_symlinks_are_created_as_links(zip_path: Path, dest: Path) -> None:
    write_zip(
        zip_path,
        link("alias", "pkg"),  # before its target: links are made after every file
        Entry("pkg/real.py", b"REAL"),
        link("pkg/link.py", "real.py"),
        link("pkg/up.py", "../top.txt"),
        link("pkg/dangling", "missing.txt"),
        link("root", "."),
        Entry("top.txt", b"TOP"),
    )

    result = unpack_package(zip_path, dest)

    assert result.file_count == 7
    assert os.readlink(dest / "pkg/link.py") == "real.py"
    assert (dest / "pkg/link.py").read_bytes() == b"REAL"
    assert (dest / "pkg/up.py").read_bytes() == b"TOP"
    assert (dest / "alias/real.py").read_bytes() == b"REAL"
    assert os.readlink(dest / "pkg/dangling") == "missing.txt"
    assert (dest / "root").resolve() == dest.resolve()


def test_unpack_small_highly_compressible_entry_is_not_a_bomb(zip_path: Path, dest: Path) -> None:
    write_zip(zip_path, Entry("spaces.txt", b" " * (512 * 1024)))
    unpack_package(zip_path, dest, limits=PackageLimits(max_compression_ratio=10))
    assert (dest / "spaces.txt").stat().st_size == 512 * 1024


def test_unpack_existing_dest_is_refused_and_kept(zip_path: Path, dest: Path) -> None:
    write_zip(zip_path, Entry("f", b"x"))
    dest.mkdir()
    (dest / "mine").write_text("keep")

    with pytest.raises(FileExistsError):
        unpack_package(zip_path, dest)

    assert (dest / "mine").read_text() == "keep"


# --- names -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("../evil", "'..'"),
        ("a/../../evil", "'..'"),
        ("..\\evil", "'..'"),
        ("a\\..\\..\\evil", "'..'"),
        ("/abs", "absolute"),
        ("//server/share/x", "absolute"),
        ("\\abs", "absolute"),
        ("C:\\x", "absolute"),
        ("C:/x", "absolute"),
        ("c:x", "absolute"),
        ("", "empty"),
        ("./", "root"),
        ("a\0b", "NUL"),
        ("x" * 1025, "longer than 1024 bytes"),
        ("d/" + "x" * 256, "component longer than 255"),
    ],
)
def test_unpack_unsafe_name_is_refused(
    tmp_path: Path, area: Path, zip_path: Path, dest: Path, name: str, why: str
) -> None:
    write_zip(zip_path, Entry("ok.txt", b"fine"), Entry(name, b"evil"))

    error = refuse(zip_path, dest)

    assert repr(name) in str(error)
    assert why in str(error)
    assert not is_safe_member_name(name)
    assert_left_nothing(tmp_path, area, dest)


@pytest.mark.parametrize("name", ["a", "a/b/c.py", "dir/", "./a", "a//b", "dir\\file", "..a/b..", "ünïcødé.txt"])
def test_is_safe_member_name_accepts_relative_names(name: str) -> None:
    assert is_safe_member_name(name)


@pytest.mark.parametrize(
    ("first", "second"),
    [("a/b", "a//b"), ("a/b", "./a/b"), ("a/b", "a\\b"), ("d/", "d//"), ("f", "f/")],
)
def test_unpack_duplicate_paths_are_refused(
    tmp_path: Path, area: Path, zip_path: Path, dest: Path, first: str, second: str
) -> None:
    write_zip(zip_path, Entry(first, b"1"), Entry(second, b"2"))

    error = refuse(zip_path, dest)

    assert repr(second) in str(error)
    assert repr(first) in str(error)
    assert_left_nothing(tmp_path, area, dest)


def test_unpack_exact_duplicate_name_is_refused(tmp_path: Path, area: Path, zip_path: Path, dest: Path) -> None:
    with pytest.warns(UserWarning, match="Duplicate name"):
        write_zip(zip_path, Entry("app.py", b"good"), Entry("app.py", b"evil"))

    error = refuse(zip_path, dest)

    assert "'app.py'" in str(error)
    assert "same path" in str(error)
    assert_left_nothing(tmp_path, area, dest)


@pytest.mark.parametrize(
    "entries",
    [
        [Entry("a", b"file"), Entry("a/b", b"below")],
        [Entry("a/b", b"below"), Entry("a", b"file")],
        [Entry("x/a", b"file"), directory("x/a/")],
    ],
    ids=["file-first", "file-last", "file-then-directory-entry"],
)
def test_unpack_path_used_as_file_and_directory_is_refused(
    tmp_path: Path, area: Path, zip_path: Path, dest: Path, entries: list[Entry]
) -> None:
    write_zip(zip_path, *entries)

    error = refuse(zip_path, dest)

    assert repr(entries[1].name) in str(error)
    assert_left_nothing(tmp_path, area, dest)


def test_unpack_too_many_entries_is_refused(tmp_path: Path, area: Path, zip_path: Path, dest: Path) -> None:
    write_zip(zip_path, *(Entry(f"f{i}", b"x") for i in range(4)))

    error = refuse(zip_path, dest, limits=PackageLimits(max_entries=3))

    assert "4 entries" in str(error)
    assert_left_nothing(tmp_path, area, dest)


def test_unpack_deep_implied_directories_count_against_entries(
    tmp_path: Path, area: Path, zip_path: Path, dest: Path
) -> None:
    deep = "/".join(["d"] * 50) + "/f"
    write_zip(zip_path, Entry(deep, b"x"))

    error = refuse(zip_path, dest, limits=PackageLimits(max_entries=10))

    assert repr(deep) in str(error)
    assert_left_nothing(tmp_path, area, dest)


# --- symlinks and special files ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entries", "offender", "why"),
    [
        ([link("evil", "../outside")], "evil", "leaves the package root"),
        ([link("a/b/evil", "../../../x")], "a/b/evil", "leaves the package root"),
        ([link("evil", "..\\outside")], "evil", "leaves the package root"),
        ([link("evil", "missing/../../x")], "evil", "leaves the package root"),
        ([link("evil", "/etc/passwd")], "evil", "absolute"),
        ([link("evil", "C:\\Windows")], "evil", "absolute"),
        ([link("evil", "")], "evil", "empty target"),
        ([link("evil", "x" * 4097)], "evil", "4096-byte limit"),
        ([link("lib", "sub"), Entry("lib/x.py", b"through")], "lib/x.py", "through the symlink entry 'lib'"),
        ([Entry("lib/x.py", b"through"), link("lib", "sub")], "lib", "is a symlink, but the entry 'lib/x.py'"),
        ([link("lib", "sub"), directory("lib/")], "lib/", "same path"),
        # `a` points at the root, so `a/..` is the root's parent although it reads as the root.
        ([link("a", "."), link("b", "a/..")], "b", "through the symlink 'a'"),
        ([link("dir/", "target")], "dir/", "directory name"),
    ],
)
def test_unpack_unsafe_symlink_is_refused(
    tmp_path: Path, area: Path, zip_path: Path, dest: Path, entries: list[Entry], offender: str, why: str
) -> None:
    write_zip(zip_path, Entry("ok.txt", b"fine"), *entries)

    error = refuse(zip_path, dest)

    assert repr(offender) in str(error)
    assert why in str(error)
    assert_left_nothing(tmp_path, area, dest)


@pytest.mark.parametrize(
    ("file_type", "what"),
    [
        (stat.S_IFCHR, "character device"),
        (stat.S_IFBLK, "block device"),
        (stat.S_IFIFO, "fifo"),
        (stat.S_IFSOCK, "socket"),
    ],
)
def test_unpack_special_file_is_refused(
    tmp_path: Path, area: Path, zip_path: Path, dest: Path, file_type: int, what: str
) -> None:
    write_zip(zip_path, Entry("dev/thing", mode=file_type | 0o666))

    error = refuse(zip_path, dest)

    assert "'dev/thing'" in str(error)
    assert what in str(error)
    assert_left_nothing(tmp_path, area, dest)


# --- damaged zips -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"", b"not a zip at all", b"PK\x05\x06" + b"\0" * 10],
    ids=["empty", "text", "truncated-end-record"],
)
def test_unpack_not_a_zip_is_refused(tmp_path: Path, area: Path, zip_path: Path, dest: Path, data: bytes) -> None:
    zip_path.write_bytes(data)

    error = refuse(zip_path, dest)

    assert "not a valid zip file" in str(error)
    assert_left_nothing(tmp_path, area, dest)


def test_unpack_bad_crc_is_refused_and_written_files_removed(
    tmp_path: Path, area: Path, zip_path: Path, dest: Path
) -> None:
    write_zip(
        zip_path,
        Entry("first.txt", b"written before the damage is found"),
        Entry("damaged.txt", b"hello world", compress_type=zipfile.ZIP_STORED),
    )
    zip_path.write_bytes(zip_path.read_bytes().replace(b"hello world", b"hellO world"))

    error = refuse(zip_path, dest)

    assert "'damaged.txt'" in str(error)
    assert "corrupt" in str(error)
    assert_left_nothing(tmp_path, area, dest)


def test_unpack_encrypted_entry_is_refused(tmp_path: Path, area: Path, zip_path: Path, dest: Path) -> None:
    write_zip(zip_path, Entry("secret.py", b"x"))
    zip_path.write_bytes(patch_central(zip_path.read_bytes(), "secret.py", FLAGS_OFFSET, "<H", 0x1))

    error = refuse(zip_path, dest)

    assert "'secret.py'" in str(error)
    assert "encrypted" in str(error)
    assert_left_nothing(tmp_path, area, dest)


def test_unpack_unsupported_compression_is_refused(tmp_path: Path, area: Path, zip_path: Path, dest: Path) -> None:
    write_zip(zip_path, Entry("big.bin", b"x"))
    zip_path.write_bytes(patch_central(zip_path.read_bytes(), "big.bin", METHOD_OFFSET, "<H", 9))  # deflate64

    error = refuse(zip_path, dest)

    assert "'big.bin'" in str(error)
    assert "compression method 9" in str(error)
    assert_left_nothing(tmp_path, area, dest)


# --- sizes and bombs --------------------------------------------------------------------------------


def test_unpack_zip_over_zipped_limit_is_refused(tmp_path: Path, area: Path, zip_path: Path, dest: Path) -> None:
    write_zip(zip_path, Entry("random.bin", os.urandom(4096)))

    with pytest.raises(PackageTooLargeError, match="zipped, over the limit of 1000 bytes"):
        unpack_package(zip_path, dest, limits=PackageLimits(max_zipped_bytes=1000))

    assert_left_nothing(tmp_path, area, dest)


def test_unpack_declared_total_over_limit_is_refused(tmp_path: Path, area: Path, zip_path: Path, dest: Path) -> None:
    write_zip(zip_path, *(Entry(f"part{i}.bin", os.urandom(400 * 1024)) for i in range(3)))

    with pytest.raises(PackageTooLargeError) as caught:
        unpack_package(zip_path, dest, limits=PackageLimits(max_unzipped_bytes=1024 * 1024))

    assert "unzips to 1.2 MB, over the limit of 1.0 MB" in str(caught.value)
    assert "'part0.bin'" in str(caught.value)
    assert_left_nothing(tmp_path, area, dest)


def write_zeros(zip_path: Path, name: str, size_mib: int) -> None:
    """An entry of `size_mib` MiB of zeros, streamed so the test never holds it in memory."""
    chunk = bytes(1024 * 1024)
    with zipfile.ZipFile(zip_path, "w") as archive:
        info = zipfile.ZipInfo(name)
        info.compress_type = zipfile.ZIP_DEFLATED
        with archive.open(info, "w") as member:
            for _ in range(size_mib):
                member.write(chunk)


def test_unpack_zip_bomb_is_refused_before_writing(tmp_path: Path, area: Path, zip_path: Path, dest: Path) -> None:
    write_zeros(zip_path, "bomb.bin", 300)
    assert zip_path.stat().st_size < 1024 * 1024  # small enough to pass the zipped limit

    with pytest.raises(PackageTooLargeError) as caught:
        unpack_package(zip_path, dest)

    assert "'bomb.bin'" in str(caught.value)
    assert "300.0 MB" in str(caught.value)
    assert "250.0 MB" in str(caught.value)
    assert_left_nothing(tmp_path, area, dest)


def test_unpack_entry_over_compression_ratio_is_refused(tmp_path: Path, area: Path, zip_path: Path, dest: Path) -> None:
    write_zeros(zip_path, "zeros.bin", 2)

    error = refuse(zip_path, dest, limits=PackageLimits(max_compression_ratio=100))

    assert "'zeros.bin'" in str(error)
    assert "zip bomb" in str(error)
    assert_left_nothing(tmp_path, area, dest)


def test_unpack_header_understating_size_is_refused(tmp_path: Path, area: Path, zip_path: Path, dest: Path) -> None:
    # 8 MiB of zeros declared as 1000 bytes: every declared-size check passes, so only counting
    # the bytes really produced (and the CRC of what was read) can stop it.
    write_zeros(zip_path, "liar.bin", 8)
    zip_path.write_bytes(patch_central(zip_path.read_bytes(), "liar.bin", SIZE_OFFSET, "<I", 1000))

    error = refuse(zip_path, dest, limits=PackageLimits(max_unzipped_bytes=1024 * 1024))

    assert "'liar.bin'" in str(error)
    assert_left_nothing(tmp_path, area, dest)


def test_unpack_never_writes_more_than_declared_size(zip_path: Path, dest: Path) -> None:
    # The same lie with a CRC that matches the declared prefix: the entry is cut at its declared size.
    write_zeros(zip_path, "liar.bin", 8)
    data = patch_central(zip_path.read_bytes(), "liar.bin", SIZE_OFFSET, "<I", 1000)
    zip_path.write_bytes(patch_central(data, "liar.bin", CRC_OFFSET, "<I", zlib.crc32(bytes(1000))))

    result = unpack_package(zip_path, dest, limits=PackageLimits(max_unzipped_bytes=1024 * 1024))

    assert result.unzipped_bytes == 1000
    assert (dest / "liar.bin").stat().st_size == 1000


# --- read_config_text -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "data", "expected"),
    [
        ("hexabase.yaml", b"function: {name: a}\n", "function: {name: a}\n"),
        ("hexabase.yml", b"function: {name: b}\n", "function: {name: b}\n"),
        ("./hexabase.yaml", "name: ü\n".encode(), "name: ü\n"),
        ("hexabase.yaml", b"\xef\xbb\xbfname: bom\n", "name: bom\n"),
    ],
)
def test_read_config_text_returns_root_config(zip_path: Path, name: str, data: bytes, expected: str) -> None:
    write_zip(zip_path, Entry("sub/hexabase.yaml", b"nested: ignored\n"), Entry(name, data), Entry("app.py", b""))

    member_name, text = read_config_text(zip_path)

    assert member_name == name.removeprefix("./")
    assert text == expected


@pytest.mark.parametrize(
    ("entries", "match"),
    [
        ([Entry("sub/hexabase.yaml", b"x: 1")], "no hexabase.yaml at its root"),
        ([Entry("hexabase.yaml", b"x: 1"), Entry("hexabase.yml", b"x: 2")], "more than one config file"),
        ([Entry("hexabase.yaml", b"x: \xff\n")], "'hexabase.yaml' is not valid UTF-8"),
        ([Entry("hexabase.yaml", b"#" * (64 * 1024 + 1))], "'hexabase.yaml' is over the 64 KiB limit"),
        ([link("hexabase.yaml", "other.yaml"), Entry("other.yaml", b"x: 1")], "'hexabase.yaml' is a symlink"),
        ([directory("hexabase.yaml/")], "'hexabase.yaml/' is a directory"),
    ],
)
def test_read_config_text_refuses_bad_config(zip_path: Path, entries: list[Entry], match: str) -> None:
    write_zip(zip_path, *entries)

    with pytest.raises(PackageError, match=re.escape(match)):
        read_config_text(zip_path)


def test_read_config_text_refuses_non_zip(zip_path: Path) -> None:
    zip_path.write_bytes(b"function:\n  name: not-zipped\n")

    with pytest.raises(PackageError, match="not a valid zip file"):
        read_config_text(zip_path)


def test_read_config_text_refuses_config_with_understated_size(zip_path: Path) -> None:
    write_zip(zip_path, Entry("hexabase.yaml", b"#" * (100 * 1024)))
    zip_path.write_bytes(patch_central(zip_path.read_bytes(), "hexabase.yaml", SIZE_OFFSET, "<I", 10))

    with pytest.raises(PackageError, match=re.escape("'hexabase.yaml' is corrupt")):
        read_config_text(zip_path)
