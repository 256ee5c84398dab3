"""Packing a function's directory: deterministic zips that honour .hxbignore and unpack to the same tree."""

from __future__ import annotations

import os
import re
import stat
import zipfile
from pathlib import Path

import pytest

from hxb.errors import PackageError, PackageTooLargeError
from hxb.packaging import PackageLimits, pack_directory, unpack_package


def write(root: Path, name: str, data: bytes | str = b"", mode: int = 0o644) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    path.chmod(mode)
    return path


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Every path below `root`, with what a round trip must keep (directory modes are normalised)."""
    found: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath, name)
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                found[rel] = ("symlink", os.readlink(path))
            elif path.is_dir():
                found[rel] = ("directory",)
            else:
                found[rel] = ("file", path.read_bytes(), stat.S_IMODE(path.stat().st_mode))
    return found


def entry_names(zip_path: Path) -> list[str]:
    with zipfile.ZipFile(zip_path) as archive:
        return archive.namelist()


@pytest.fixture
def src(tmp_path: Path) -> Path:
    src = tmp_path / "fn"
    src.mkdir()
    return src


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "fn.zip"


def build_tree(src: Path) -> None:
    write(src, "hexabase.yaml", "function:\n  name: demo\n")
    write(src, "index.py", "def handler(event, context):\n    return event\n")
    write(src, "lib/pkg/__init__.py", "")
    write(src, "lib/pkg/mod.py", "X = 1\n", mode=0o664)
    write(src, "bin/tool", "#!/bin/sh\necho hi\n", mode=0o755)
    write(src, "données/été.txt", "unicode names survive\n")
    write(src, "big.bin", os.urandom(600 * 1024))
    (src / "empty").mkdir()
    (src / "lib/link.py").symlink_to("pkg/mod.py")
    (src / "alias").symlink_to("lib")
    (src / "dangling").symlink_to("not-there.txt")


# --- round trip and the zip's shape -----------------------------------------------------------------


def test_pack_then_unpack_gives_the_same_tree(tmp_path: Path, src: Path, out: Path) -> None:
    build_tree(src)

    packed = pack_directory(src, out)
    unpacked = unpack_package(out, tmp_path / "task")

    assert snapshot(tmp_path / "task") == snapshot(src)
    assert os.access(tmp_path / "task/bin/tool", os.X_OK)
    assert (tmp_path / "task/alias/link.py").read_text() == "X = 1\n"
    assert packed.path == out
    assert packed.file_count == unpacked.file_count == 10
    assert (
        packed.unzipped_bytes
        == unpacked.unzipped_bytes
        == sum(path.stat().st_size for path in src.rglob("*") if path.is_file() and not path.is_symlink())
    )
    assert packed.zipped_bytes == out.stat().st_size
    assert packed.sha256 == unpacked.sha256


def test_pack_writes_sorted_unix_entries_with_fixed_timestamps(src: Path, out: Path) -> None:
    build_tree(src)

    pack_directory(src, out)

    with zipfile.ZipFile(out) as archive:
        infos = archive.infolist()
    assert [info.filename for info in infos] == sorted(info.filename for info in infos)
    assert {info.date_time for info in infos} == {(1980, 1, 1, 0, 0, 0)}
    assert {info.create_system for info in infos} == {3}
    by_name = {info.filename: info for info in infos}
    assert by_name["bin/tool"].external_attr >> 16 == stat.S_IFREG | 0o755
    assert by_name["bin/tool"].compress_type == zipfile.ZIP_DEFLATED
    assert by_name["lib/link.py"].external_attr >> 16 == stat.S_IFLNK | 0o777
    assert stat.S_ISDIR(by_name["empty/"].external_attr >> 16)
    assert "lib/" not in by_name  # directories with content are implied by their entries


def test_pack_is_deterministic(tmp_path: Path, src: Path) -> None:
    build_tree(src)
    first = pack_directory(src, tmp_path / "first.zip")
    for path in src.rglob("*"):
        os.utime(path, (1_000_000_000, 1_000_000_000), follow_symlinks=False)

    second = pack_directory(src, tmp_path / "second.zip")

    assert second.sha256 == first.sha256
    assert (tmp_path / "first.zip").read_bytes() == (tmp_path / "second.zip").read_bytes()


def test_pack_does_not_depend_on_creation_order(tmp_path: Path) -> None:
    names = ["b.py", "a/z.py", "a/b.py", "c/d/e.txt", "a.py"]
    for label, order in (("one", names), ("two", list(reversed(names)))):
        for name in order:
            write(tmp_path / label, name, name)

    first = pack_directory(tmp_path / "one", tmp_path / "one.zip")
    second = pack_directory(tmp_path / "two", tmp_path / "two.zip")

    assert first.sha256 == second.sha256


def test_pack_progress_reaches_total(src: Path, out: Path) -> None:
    build_tree(src)
    calls: list[tuple[int, int]] = []

    result = pack_directory(src, out, progress=lambda done, total: calls.append((done, total)))

    assert len(calls) > 1
    assert calls[-1] == (result.unzipped_bytes, result.unzipped_bytes)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    assert {total for _, total in calls} == {result.unzipped_bytes}


def test_pack_replaces_existing_output_and_skips_output_inside_tree(src: Path) -> None:
    write(src, "index.py", "x = 1\n")
    out = src / "dist.zip"
    out.write_bytes(b"stale")

    pack_directory(src, out)
    pack_directory(src, out)

    assert entry_names(out) == ["index.py"]
    assert sorted(path.name for path in src.iterdir()) == ["dist.zip", "index.py"]  # no temporary left


def test_pack_leaves_out_directory_emptied_by_ignores(src: Path, out: Path) -> None:
    write(src, "pkg/__pycache__/mod.cpython-311.pyc", b"\0")
    write(src, "pkg/stale.pyc", b"\0")
    (src / "pkg/empty").mkdir()

    pack_directory(src, out)

    assert entry_names(out) == ["pkg/empty/"]


# --- ignores ----------------------------------------------------------------------------------------


def test_pack_applies_builtin_ignores(src: Path, out: Path) -> None:
    for name in [
        ".git/config",
        ".hg/store",
        ".svn/entries",
        "__pycache__/m.cpython-311.pyc",
        "lib/__pycache__/m.cpython-311.pyc",
        "old.pyc",
        "lib/old.pyc",
        ".DS_Store",
        "lib/.DS_Store",
        ".venv/bin/python",
        "node_modules/.cache/babel/x.json",
        "web/node_modules/.cache/y.json",
    ]:
        write(src, name, "ignored")
    write(src, "node_modules/left-pad/index.js", "kept")
    write(src, "index.py", "kept")

    pack_directory(src, out)

    assert entry_names(out) == ["index.py", "node_modules/left-pad/index.js"]


def test_pack_honours_hxbignore_like_git(src: Path, out: Path) -> None:
    write(
        src,
        ".hxbignore",
        "# build output\n*.log\nbuild/\n/secret.txt\n"
        "!keep.pyc\n!important.log\n!build/keep.txt\n\ntests/**/fixtures/\n",
    )
    for name in [
        "app.log",
        "sub/app.log",
        "important.log",
        "build/out.bin",
        "build/keep.txt",  # git cannot re-include a file below an ignored directory
        "secret.txt",
        "sub/secret.txt",  # '/secret.txt' is anchored to the root
        "keep.pyc",
        "other.pyc",
        "tests/unit/fixtures/a.json",
        "tests/unit/test_a.py",
        "index.py",
    ]:
        write(src, name, name)

    pack_directory(src, out)

    assert entry_names(out) == [
        "important.log",
        "index.py",
        "keep.pyc",
        "sub/secret.txt",
        "tests/unit/test_a.py",
    ]


def test_pack_ignored_special_file_is_skipped(src: Path, out: Path) -> None:
    write(src, ".hxbignore", "run/\n")
    write(src, "index.py", "x = 1\n")
    (src / "run").mkdir()
    os.mkfifo(src / "run/control")

    pack_directory(src, out)

    assert entry_names(out) == ["index.py"]


# --- symlinks ---------------------------------------------------------------------------------------


def test_pack_absolute_symlink_inside_is_stored_relative(tmp_path: Path, src: Path, out: Path) -> None:
    write(src, "shared/config.json", "{}")
    (src / "lib").mkdir()
    (src / "lib/config.json").symlink_to(src / "shared/config.json")

    pack_directory(src, out)
    unpack_package(out, tmp_path / "task")

    assert os.readlink(tmp_path / "task/lib/config.json") == "../shared/config.json"
    assert (tmp_path / "task/lib/config.json").read_text() == "{}"


@pytest.mark.parametrize("target", ["../outside.txt", "sub/../../outside.txt", "/etc/hostname"])
def test_pack_symlink_leading_outside_is_refused(tmp_path: Path, src: Path, out: Path, target: str) -> None:
    write(tmp_path, "outside.txt", "secret")
    write(src, "index.py", "x = 1\n")
    (src / "data.txt").symlink_to(target)

    with pytest.raises(PackageError) as caught:
        pack_directory(src, out)

    message = str(caught.value)
    assert "'data.txt'" in message
    assert repr(target) in message
    assert "copy the file" in message
    assert not out.exists()


def test_pack_symlink_through_another_symlink_is_refused(src: Path, out: Path) -> None:
    (src / "here").symlink_to(".")
    (src / "escape").symlink_to("here/..")

    with pytest.raises(PackageError, match=re.escape("'escape' -> 'here/..' goes through the symlink 'here'")):
        pack_directory(src, out)


# --- refusals ---------------------------------------------------------------------------------------


def test_pack_fifo_is_refused(src: Path, out: Path) -> None:
    write(src, "index.py", "x = 1\n")
    os.mkfifo(src / "pipe")

    with pytest.raises(PackageError, match="'pipe' is a fifo"):
        pack_directory(src, out)

    assert not out.exists()


def test_pack_backslash_in_name_is_refused(src: Path, out: Path) -> None:
    write(src, "odd\\name.py", "x = 1\n")

    with pytest.raises(PackageError, match="backslash"):
        pack_directory(src, out)


def test_pack_name_over_path_limit_is_refused(src: Path, out: Path) -> None:
    write(src, "a" * 40 + "/b.py", "x = 1\n")

    with pytest.raises(PackageError, match="longer than 30 bytes"):
        pack_directory(src, out, limits=PackageLimits(max_path_bytes=30))


def test_pack_too_many_files_is_refused(src: Path, out: Path) -> None:
    for index in range(5):
        write(src, f"f{index}.py")

    with pytest.raises(PackageError, match="more than 4 files and directories"):
        pack_directory(src, out, limits=PackageLimits(max_entries=4))


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_pack_source_that_is_not_a_directory_is_refused(tmp_path: Path, out: Path, kind: str) -> None:
    src = tmp_path / "fn"
    if kind == "file":
        src.write_text("x")

    with pytest.raises(PackageError, match="is not a directory"):
        pack_directory(src, out)


def test_pack_input_over_unzipped_limit_is_refused_before_writing(tmp_path: Path, src: Path, out: Path) -> None:
    write(src, "small.py", b"x" * 100)
    write(src, "model.bin", os.urandom(2 * 1024 * 1024))

    with pytest.raises(PackageTooLargeError) as caught:
        pack_directory(src, out, limits=PackageLimits(max_unzipped_bytes=1024 * 1024))

    assert "2.0 MB, over the limit of 1.0 MB" in str(caught.value)
    assert "'model.bin'" in str(caught.value)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["fn"]


def test_pack_zip_over_zipped_limit_is_refused(tmp_path: Path, src: Path, out: Path) -> None:
    write(src, "random.bin", os.urandom(64 * 1024))

    with pytest.raises(PackageTooLargeError, match="zipped, over the limit of 10000 bytes"):
        pack_directory(src, out, limits=PackageLimits(max_zipped_bytes=10_000))

    assert sorted(path.name for path in tmp_path.iterdir()) == ["fn"]  # neither output nor temporary
