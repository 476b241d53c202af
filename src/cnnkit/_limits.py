"""Size checks before allocation: nothing asks for memory a check could have refused.

A bad option (``--image-size 2048`` on 8x8 digits), a bad label (590,000 in a file of
ten classes), a decompression bomb (a 38 KB PNG of 6300x6300 pixels) or tampered
metadata should cost one line of explanation, not minutes of swapping and an
out-of-memory kill. Code that is about to allocate something sized by its input calls
:func:`require_memory` with the bytes it needs, and images are checked against
:func:`max_image_pixels` from their header, before they are decoded.

What "available" means: the smallest of the kernel's ``MemAvailable``, the control
group's limit less its usage (containers, CI runners), and ``CNNKIT_MEMORY_LIMIT`` if
set (bytes, or a number with a unit: ``4GB``, ``512MiB``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["available_memory", "require_memory", "format_bytes", "max_image_pixels",
           "MemoryLimitError", "parse_bytes"]

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20,
          "g": 1e9, "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000


class MemoryLimitError(ValueError):
    """An allocation refused before it was tried: it would not fit in memory."""


def parse_bytes(text: str) -> int:
    """``"4GB"`` -> 4_000_000_000; ``"512MiB"`` -> 536_870_912; ``"1000"`` -> 1000.

    Raises:
        ValueError: not a size.
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if m is None or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{text!r} is not a size; write bytes or a number with a unit such as "
                         "4GB or 512MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_bytes(n: float) -> str:
    """``1.5e9`` -> ``'1.5 GB'``."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_free() -> int | None:
    """The control group's memory limit less its usage (v2, then v1), if it has one."""
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        cap = _read_int(limit)
        if cap is not None and cap < 2**60:  # v1 writes a huge number for "no limit"
            return max(0, cap - (_read_int(usage) or 0))
    return None


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def available_memory() -> int | None:
    """Bytes this process may still allocate (see the module docstring), None if unknown.

    Raises:
        ValueError: ``CNNKIT_MEMORY_LIMIT`` is set but is not a size.
    """
    found = [v for v in (_meminfo_available(), _cgroup_free()) if v is not None]
    limit = os.environ.get("CNNKIT_MEMORY_LIMIT")
    if limit:
        found.append(parse_bytes(limit))
    return min(found) if found else None


def require_memory(nbytes: float, what: str, fix: str) -> None:
    """Refuse, before allocating, an allocation that would not fit in memory.

    Args:
        nbytes: what is about to be allocated.
        what: what needs it, for the message ("1797 images of 1x2048x2048").
        fix: what to do instead ("give a smaller --image-size").

    Raises:
        MemoryLimitError: ``nbytes`` is more than :func:`available_memory`.
    """
    free = available_memory()
    if free is not None and nbytes > free:
        raise MemoryLimitError(f"{what} needs {format_bytes(nbytes)} of memory, more than the "
                               f"{format_bytes(free)} available; {fix}")


def max_image_pixels() -> int:
    """The most pixels one image file may have before it is decoded (a guard against
    decompression bombs): 64 million, or ``CNNKIT_MAX_IMAGE_PIXELS``.

    Raises:
        ValueError: ``CNNKIT_MAX_IMAGE_PIXELS`` is set but is not a positive integer.
    """
    text = os.environ.get("CNNKIT_MAX_IMAGE_PIXELS")
    if not text:
        return DEFAULT_MAX_IMAGE_PIXELS
    if not text.strip().isdigit() or int(text) < 1:
        raise ValueError(f"CNNKIT_MAX_IMAGE_PIXELS must be a positive integer, got {text!r}")
    return int(text)
