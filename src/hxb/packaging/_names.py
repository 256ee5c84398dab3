"""Rules for entry names and symlink targets, shared by pack and unpack so that the CLI never
builds a package the server would refuse."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Final

from hxb.errors import PackageError

# Linux NAME_MAX: no single path component may be longer, whatever the total length.
NAME_MAX_BYTES: Final = 255

# "C:\x", "C:/x" and the drive-relative "C:x" all mean "somewhere else" to a Windows tool.
_DRIVE: Final = re.compile(r"[A-Za-z]:")


class EntryKind(enum.Enum):
    FILE = "file"
    DIRECTORY = "directory"
    SYMLINK = "symlink"


def entry_error(name: str, why: str) -> PackageError:
    # repr() quotes the name and escapes newlines, so the message stays on one line.
    return PackageError(f"package entry {name!r} {why}")


def _split(path: str) -> list[str]:
    # Backslashes are separators too: Windows zip tools write them, and a name like "a\..\x"
    # must not slip through as one odd-looking file name.
    parts = path.replace("\\", "/").split("/")
    # The membership tests run in C; the Python-level filter only runs for names that need it.
    if "" in parts or "." in parts:
        parts = [part for part in parts if part not in ("", ".")]
    return parts


def _is_absolute(path: str) -> bool:
    return path.startswith(("/", "\\")) or _DRIVE.match(path) is not None


def _longest_component_bytes(encoded: bytes) -> int:
    if len(encoded) <= NAME_MAX_BYTES:
        return len(encoded)  # the common case, without splitting
    return max(map(len, encoded.replace(b"\\", b"/").split(b"/")))


def split_member_name(name: str, *, max_path_bytes: int) -> tuple[str, ...]:
    """Normalise an entry name to its path components below the package root.

    `a//b`, `./a/b` and `a\\b` all give `("a", "b")`, so duplicates can be found by comparing
    the results.

    Raises:
        PackageError: the name is empty, absolute, has a `..` component, contains NUL, or is too long.
    """
    if not name:
        raise entry_error(name, "has an empty name")
    if "\0" in name:
        raise entry_error(name, "contains a NUL byte")
    encoded = name.encode("utf-8", "surrogatepass")
    if len(encoded) > max_path_bytes:
        raise entry_error(name, f"has a name longer than {max_path_bytes} bytes")
    if _is_absolute(name):
        raise entry_error(name, "is an absolute path; entries must be relative to the package root")
    parts = _split(name)
    if ".." in parts:
        raise entry_error(name, "has a '..' component, which would leave the package root")
    if not parts:
        raise entry_error(name, "names the package root itself")
    if _longest_component_bytes(encoded) > NAME_MAX_BYTES:
        raise entry_error(name, f"has a path component longer than {NAME_MAX_BYTES} bytes")
    return tuple(parts)


@dataclass(slots=True)
class _Node:
    name: str | None = None  # the entry's name as written, when an entry sits at this path
    kind: EntryKind = EntryKind.DIRECTORY  # a node no entry names is a directory implied by its children
    children: dict[str, _Node] = field(default_factory=dict)

    def any_entry_below(self) -> str:
        node = self
        while node.children:
            node = next(iter(node.children.values()))
            if node.name is not None:
                return node.name
        return "?"  # unreachable: a leaf node always carries an entry


class PathTree:
    """The package's paths as a tree of components.

    A hostile zip may hold thousands of names hundreds of components deep, so no check here may
    cost the depth of a name per entry: directories are also indexed by their full path, and only
    components not seen before are walked. `max_paths` caps every path the package creates,
    directories implied by the names below them included, so a few thousand entries cannot make
    the server create millions of directories.
    """

    def __init__(self, *, max_paths: int) -> None:
        self._root = _Node()
        self._max_paths = max_paths
        self._path_count = 0
        # Only directories with children go in: such a node can never become a file or a symlink.
        self._directories: dict[str, _Node] = {"": self._root}

    def add(self, parts: tuple[str, ...], kind: EntryKind, name: str) -> None:
        """Record an entry; refuse duplicates and any path that uses a file or symlink as a directory."""
        # Find the deepest known directory above the entry, then walk down only what is new.
        known = "/".join(parts[:-1])
        unseen: list[str] = []
        while (node := self._directories.get(known)) is None:
            known, _, part = known.rpartition("/")
            unseen.append(part)
        for part in reversed(unseen):
            node = self._child(node, part, name)
            if node.kind is EntryKind.SYMLINK:
                raise entry_error(name, f"goes through the symlink entry {node.name!r}; nothing is unpacked via a link")
            if node.kind is EntryKind.FILE:
                raise entry_error(name, f"uses the file entry {node.name!r} as a directory")
            known = f"{known}/{part}" if known else part
            self._directories[known] = node
        leaf = self._child(node, parts[-1], name)
        if leaf.name is not None:
            raise entry_error(name, f"has the same path as the entry {leaf.name!r}")
        if kind is not EntryKind.DIRECTORY and leaf.children:
            raise entry_error(name, f"is a {kind.value}, but the entry {leaf.any_entry_below()!r} is inside it")
        leaf.name = name
        leaf.kind = kind

    def _child(self, node: _Node, part: str, name: str) -> _Node:
        child = node.children.get(part)
        if child is None:
            self._path_count += 1
            if self._path_count > self._max_paths:
                raise PackageError(
                    f"the package would create more than {self._max_paths} files and directories"
                    f" (reached at entry {name!r})"
                )
            child = node.children[part] = _Node()
        return child

    def directories(self) -> list[str]:
        """Every directory path, each after its parent, joined with '/'."""
        found: list[str] = []
        pending: list[tuple[str, _Node]] = [("", self._root)]
        while pending:
            prefix, node = pending.pop()
            for part, child in node.children.items():
                if child.kind is EntryKind.DIRECTORY:
                    path = prefix + part
                    found.append(path)
                    pending.append((path + "/", child))
        return found

    def check_link_target(self, parts: tuple[str, ...], target: str, name: str) -> None:
        """Refuse a symlink target that could lead outside the package root.

        The target is resolved lexically from the link's directory. A lexical `..` equals the
        kernel's only if the component before it is a real directory, so a target may not pass
        *through* another symlink: with `a -> .`, the target `a/..` looks like the root but is its
        parent. A symlink as the last component is fine: that link is checked on its own.
        """
        hint = "copy the file into the package instead of linking to it"
        if not target or "\0" in target:
            raise entry_error(name, "is a symlink with an empty target or a NUL byte in it")
        if _is_absolute(target):
            raise PackageError(f"symlink {name!r} -> {target!r} points to an absolute path; {hint}")
        # Ancestors of the link are real directories: add() refused any entry below a symlink.
        stack: list[_Node | None] = [self._root]
        node = self._root
        for part in parts[:-1]:
            node = node.children[part]  # present: the link itself was add()ed first
            stack.append(node)
        components = _split(target)
        for index, part in enumerate(components):
            if part == "..":
                if len(stack) == 1:
                    raise PackageError(f"symlink {name!r} -> {target!r} leaves the package root; {hint}")
                stack.pop()
                continue
            current = stack[-1]
            child = current.children.get(part) if current is not None else None
            if child is not None and child.kind is EntryKind.SYMLINK and index < len(components) - 1:
                raise PackageError(
                    f"symlink {name!r} -> {target!r} goes through the symlink {child.name!r};"
                    " point it at the real path instead"
                )
            stack.append(child)
