"""Files that are never lost and never clobbered: the write discipline of every command.

Three rules, one place (every package imports them; they import nothing of cnnkit):

* **Atomic writes.** :func:`atomic_write` writes a temporary file in the target folder,
  flushes it to disk and renames it into place (``os.replace`` is atomic on POSIX and
  Windows), so a crash leaves the old file or the new one, never half of one.
* **No clobbering.** ``atomic_write(..., overwrite=False)`` publishes with ``os.link``,
  which fails if the target exists, so two processes racing for one name cannot both
  win; :func:`make_folder` creates a folder exclusively (``os.mkdir``) or takes the next
  free name (``name-2``, ``name-3`` ...). A command writes over a file only when the user
  said so (``--force``), and never over the files of a run folder
  (:func:`refuse_run_file`).
* **One writer per folder.** :class:`FolderLock` is an advisory lock (``flock``) that
  the kernel drops when its process dies, SIGKILL included: a folder whose lock is
  free belongs to nobody, so its leftovers (:func:`remove_temporaries`) may be cleaned.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_write", "move_new", "is_temporary", "remove_temporaries", "make_folder",
           "free_names", "FolderLock", "refuse_existing", "refuse_run_file", "RUN_FILES",
           "LOCK_NAME"]

LOCK_NAME = ".lock"
# What a run folder holds (cnnkit.run.RunPaths): no command other than the run's own
# training (and cnnkit compress, which writes a new run) may write over these.
RUN_FILES = frozenset({"config.yaml", "model.safetensors", "model_last.safetensors",
                       "model_int8.safetensors", "train_state.safetensors", "metrics.jsonl",
                       "summary.json", "report.html", "compress.json"})
# atomic_write's temporaries: ".<target name>.<random>.tmp".
_TEMPORARY = re.compile(r"\..+\.[A-Za-z0-9_]{6,}\.tmp\Z")


def atomic_write(path: str | os.PathLike, data: bytes | str, *, overwrite: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename).

    Args:
        path: the file; its folder is created if missing.
        data: bytes, or text written as UTF-8.
        overwrite: replace an existing file (the default); with False the file is
            published only if ``path`` does not exist yet, atomically even against a
            concurrent writer of the same name.

    Raises:
        FileExistsError: ``overwrite=False`` and ``path`` exists.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; give the file the permissions open() would (0666 - umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _publish_new(Path(tmp), path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _Exists(FileExistsError):
    """A FileExistsError whose text is "PATH exists" (OSError's own text would be
    "[Errno None] None: 'PATH'" once ``filename`` is set)."""

    def __str__(self) -> str:
        return self.text


def exists(path: Path, more: int = 0) -> FileExistsError:
    """The error for a file that is there already: ``str`` is "PATH exists", ``filename``
    the path."""
    err = _Exists(str(path))
    err.filename = str(path)
    err.text = f"{path} exists" + (f" (and {more} more)" if more else "")
    return err


def _publish_new(tmp: Path, path: Path) -> None:
    """Give the finished ``tmp`` the name ``path`` unless that name exists (then raise)."""
    try:
        os.link(tmp, path)  # fails with FileExistsError if the name is taken: no race
    except FileExistsError:
        raise exists(path) from None
    except OSError:  # a file system without hard links: the (racy) check is the best left
        if path.exists():
            raise exists(path) from None
        os.replace(tmp, path)
    else:
        tmp.unlink()


def move_new(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Move the finished file ``src`` to ``dst`` in the same file system, refusing an
    existing ``dst`` unless ``overwrite`` (atomically either way)."""
    if overwrite:
        os.replace(src, dst)
    else:
        _publish_new(Path(src), Path(dst))


def is_temporary(name: str) -> bool:
    """Whether a file name is one of :func:`atomic_write`'s temporaries."""
    return _TEMPORARY.match(name) is not None


def remove_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporaries an interrupted :func:`atomic_write` left in ``folder`` (a
    process killed between writing and renaming); returns what was deleted.

    Call it only while holding the folder's :class:`FolderLock`: a live writer's
    temporary would otherwise be pulled from under it.
    """
    gone = []
    for p in Path(folder).iterdir():
        if is_temporary(p.name) and p.is_file():
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def free_names(path: Path) -> Iterator[Path]:
    """``path``, then ``path-2``, ``path-3`` ... (``name-2.onnx`` keeps a file's suffix)."""
    yield path
    i = 2
    while True:
        yield path.with_name(f"{path.stem}-{i}{path.suffix}") if path.suffix else \
            path.with_name(f"{path.name}-{i}")
        i += 1


def make_folder(path: str | os.PathLike, *, next_free: bool = False) -> Path:
    """Create ``path`` exclusively (its parents as needed) and return it.

    Args:
        path: the folder.
        next_free: if ``path`` exists, create the first free ``path-2``, ``path-3`` ...
            instead of raising.

    Raises:
        FileExistsError: ``path`` exists and ``next_free`` is False.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for candidate in free_names(path):
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            if not next_free:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def refuse_existing(paths: list[Path], overwrite: bool = False) -> None:
    """Raise before writing ``paths`` if any exists (unless ``overwrite``), or if two of
    them are one file (outputs named after inputs ``a/x.png`` and ``b/x.png``).

    Raises:
        FileExistsError: naming the first existing file and how many there are.
        ValueError: two outputs share a name.
    """
    seen: dict[Path, int] = {}
    for i, p in enumerate(paths):
        if p in seen:
            raise ValueError(f"two outputs would both be written to {p}: inputs with the same "
                             "file name in different folders; rename one of them")
        seen[p] = i
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        raise exists(existing[0], len(existing) - 1)


def refuse_run_file(path: str | os.PathLike) -> None:
    """Raise if ``path`` is one of a run folder's own files (a folder with a
    ``config.yaml``), which no command but the run's training may replace, ``--force``
    or not.

    Raises:
        ValueError: naming the file and what it is.
    """
    path = Path(path)
    if path.name in RUN_FILES and (path.parent / "config.yaml").is_file():
        raise ValueError(f"{path} is a file of the run {path.parent} (cnnkit train wrote it); "
                         "no command writes over it, --force or not: give another --out")


class FolderLock:
    """An exclusive advisory lock on a folder (``folder/.lock``), held by one process.

    The kernel releases it when the process ends, however it ends, so a folder with a
    free lock has no live writer. The holder's process id is written into the lock file
    for messages. Works on POSIX (``flock``) and Windows (``msvcrt.locking``).

    Example:
        >>> import tempfile
        >>> from cnnkit._files import FolderLock
        >>> lock = FolderLock(tempfile.mkdtemp())
        >>> lock.acquire(), lock.acquire(), FolderLock(lock.folder).acquire()
        (True, True, False)
        >>> lock.release()
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> bool:
        """Take the lock without waiting; True if this object holds it now."""
        if self._fd is not None:
            return True
        fd = os.open(self.folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _lock(fd)
        except OSError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                _unlock(fd)
            os.close(fd)

    def owner(self) -> str:
        """The holder's process id as written in the lock file ('' if unknown)."""
        with contextlib.suppress(OSError):
            return (self.folder / LOCK_NAME).read_text().strip()
        return ""

    def __enter__(self) -> FolderLock:
        if not self.acquire():
            raise BlockingIOError(f"{self.folder} is in use by another cnnkit process "
                                  f"(pid {self.owner() or '?'})")
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


try:
    import fcntl

    def _lock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
except ImportError:  # pragma: no cover - Windows
    import msvcrt

    def _lock(fd: int) -> None:  # msvcrt locks bytes from the current position: byte 0
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
