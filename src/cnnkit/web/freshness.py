"""Which weights files a server loaded, and whether they changed on disk since.

``cnnkit serve`` may run beside a training that is still writing the same run: each
better epoch replaces ``model.safetensors`` (atomically: a new file renamed into place).
A server that loaded the old file would go on showing its numbers as if they were the
run's. So the files are stamped (size, modification time, inode, SHA-256) before they are
read, and :meth:`FileStamp.changed` tells, from a ``stat`` alone, when the file on disk is
no longer the one served; the page then says so and offers a reload.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cnnkit.run import RunPaths

__all__ = ["FileStamp", "weights_files", "iso_time"]


def iso_time(ns: int) -> str:
    """Nanoseconds since the epoch as ISO 8601 UTC to the second: ``2026-11-24T14:06:10Z``."""
    return datetime.fromtimestamp(ns / 1e9, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def weights_files(run: str | os.PathLike, weights: str) -> list[Path]:
    """The files :func:`cnnkit.load_run` reads for ``weights`` (an int8 model is
    rebuilt from the float weights' metadata, so both count)."""
    paths = RunPaths(Path(run))
    return {"best": [paths.weights], "last": [paths.last],
            "int8": [paths.int8, paths.weights]}[weights]


@dataclass(frozen=True)
class FileStamp:
    """A file as it was when loaded: what ``stat`` says of it, and its SHA-256."""

    path: Path
    size: int
    mtime_ns: int
    inode: int
    sha256: str

    @classmethod
    def of(cls, path: str | os.PathLike) -> FileStamp:
        """Stamp ``path`` now (stat first: a file replaced while hashing reads as changed).

        Raises:
            FileNotFoundError: no such file.
        """
        path = Path(path)
        st = path.stat()
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return cls(path, st.st_size, st.st_mtime_ns, st.st_ino, digest.hexdigest())

    def changed(self) -> bool:
        """Whether the file on disk is not the one stamped (replaced, rewritten or gone)."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return True
        return (st.st_size, st.st_mtime_ns, st.st_ino) != (self.size, self.mtime_ns, self.inode)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.path.name, "size": self.size, "modified": iso_time(self.mtime_ns),
                "sha256": self.sha256, "stale": self.changed()}
