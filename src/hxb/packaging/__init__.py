"""Deployment packages: the zip of a function's directory, packed by the CLI and unpacked by the server.

The zip is hostile input on the server side; `unpack_package` checks it before and while writing.
"""

from hxb.packaging.limits import PackageLimits
from hxb.packaging.pack import BUILTIN_IGNORES, IGNORE_FILE, PackResult, pack_directory
from hxb.packaging.unpack import UnpackedPackage, is_safe_member_name, read_config_text, unpack_package

__all__ = [
    "BUILTIN_IGNORES",
    "IGNORE_FILE",
    "PackResult",
    "PackageLimits",
    "UnpackedPackage",
    "is_safe_member_name",
    "pack_directory",
    "read_config_text",
    "unpack_package",
]
