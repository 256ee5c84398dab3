"""Size and shape limits of a deployment package, shared by the CLI (pack) and the server (unpack)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True, kw_only=True)
class PackageLimits:
    """What a deployment package may contain. The defaults follow AWS Lambda's direct-upload limits."""

    max_zipped_bytes: int = 50 * 1024 * 1024
    max_unzipped_bytes: int = 250 * 1024 * 1024
    max_entries: int = 20_000
    # Counted in UTF-8 bytes of the entry name; far below PATH_MAX even once prefixed with /var/task.
    max_path_bytes: int = 1024
    # Declared uncompressed/compressed ratio of one entry beyond which it is refused as a zip bomb.
    # Deflate tops out near 1032:1, reached only by long runs of a single byte value.
    max_compression_ratio: int = 1000


# Entries smaller than this are exempt from the ratio check: a 100 KiB file of spaces is no bomb,
# and the total-size limit bounds what many small entries can add up to.
RATIO_EXEMPT_BYTES: Final = 1024 * 1024


# The default argument of every function taking limits: one frozen instance, safe to share.
DEFAULT_LIMITS: Final = PackageLimits()


def format_mb(size_bytes: int) -> str:
    """A size for a message: MiB labelled MB, the way AWS quotes its "50 MB" and "250 MB" limits."""
    if size_bytes < 1024 * 1024:
        return f"{size_bytes} bytes"  # "0.0 MB" would hide the difference between two small sizes
    return f"{size_bytes / (1024 * 1024):.1f} MB"
