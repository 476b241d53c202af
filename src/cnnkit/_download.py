"""Files fetched over HTTP(S) into a cache: checked by SHA-256, resumed, published atomically.

What downloads (pretrained weights, standard data sets) runs on users' machines, so it is
real code, tested against a server on 127.0.0.1 (``tests/test_download.py``):

* a cached file whose hash matches is used as it is, with no network at all;
* a download goes to ``NAME.part`` beside its destination and is renamed into place only
  once its hash matches: a file under its final name is always complete and verified;
* an interrupted download resumes from its ``.part`` with an HTTP ``Range`` request
  (RFC 9110, section 14); a server that answers the whole file instead restarts it;
* a hash mismatch deletes the ``.part`` and raises; a corrupt cached file is fetched again;
* the free disk space is checked against ``Content-Length`` before a byte is written;
* ``CNNKIT_DATA_MIRROR`` (a base URL, or a local folder) replaces the origin of every URL
  with the file's name under the mirror, for mirrors and air-gapped machines;
* no network and no cache: one line naming the URL, where to put the file and its hash.

The standard library's ``urllib`` does the HTTP; ``tqdm`` draws the progress bar.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from tqdm.auto import tqdm

__all__ = ["cache_dir", "fetch", "sha256_of", "mirrored"]

_CHUNK = 1 << 20


def cache_dir() -> Path:
    """Where cnnkit keeps what it downloads: ``$CNNKIT_HOME`` or ``~/.cache/cnnkit``.

    Example:
        >>> import os
        >>> from cnnkit._download import cache_dir
        >>> os.environ["CNNKIT_HOME"] = "/tmp/ck"
        >>> str(cache_dir())
        '/tmp/ck'
        >>> del os.environ["CNNKIT_HOME"]
    """
    home = os.environ.get("CNNKIT_HOME")
    return Path(home) if home else Path.home() / ".cache" / "cnnkit"


def sha256_of(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, read in chunks (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def mirrored(url: str) -> str:
    """``url`` with its origin replaced by ``$CNNKIT_DATA_MIRROR`` (the file name kept), or
    ``url`` itself when no mirror is set.

    Example:
        >>> import os
        >>> from cnnkit._download import mirrored
        >>> os.environ["CNNKIT_DATA_MIRROR"] = "http://mirror.lan/cnnkit/"
        >>> mirrored("https://ossci-datasets.s3.amazonaws.com/mnist/t10k-labels-idx1-ubyte.gz")
        'http://mirror.lan/cnnkit/t10k-labels-idx1-ubyte.gz'
        >>> del os.environ["CNNKIT_DATA_MIRROR"]
    """
    mirror = os.environ.get("CNNKIT_DATA_MIRROR", "").strip()
    if not mirror:
        return url
    name = Path(urlsplit(url).path).name
    if "://" not in mirror:  # a local folder
        return Path(mirror).resolve().joinpath(name).as_uri()
    return mirror.rstrip("/") + "/" + name


def fetch(url: str, dest: str | os.PathLike, sha256: str, *,
          progress: bool | None = None, timeout: float = 30.0) -> Path:
    """``dest``, downloaded from ``url`` (or its mirror) unless already there with the hash
    ``sha256``; returns its path.

    Raises:
        ValueError: the downloaded bytes do not have the hash ``sha256``, or the disk has
            no room for the file (``.part`` removed in both cases).
        ConnectionError: the file could not be downloaded and is not in the cache; the
            message says where to put it by hand.
    """
    dest = Path(dest)
    if dest.is_file():
        if sha256_of(dest) == sha256:
            return dest
        dest.unlink()  # a corrupt or stale cache entry (ours): fetch it again
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    source = mirrored(url)
    try:
        _download(source, part, progress, timeout)
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        reason = getattr(e, "reason", e)
        raise ConnectionError(
            f"could not download {source} ({reason}); on a machine without network, put the "
            f"file at {dest} (sha256 {sha256}) or set CNNKIT_DATA_MIRROR to a folder or URL "
            "holding it") from None
    got = sha256_of(part)
    if got != sha256:
        part.unlink()
        raise ValueError(f"{source} has sha256 {got}, expected {sha256}: the download is "
                         "damaged or the server changed the file; nothing was kept, try again "
                         "or use another mirror (CNNKIT_DATA_MIRROR)")
    os.replace(part, dest)
    return dest


def _download(url: str, part: Path, progress: bool | None, timeout: float) -> None:
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "cnnkit"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
        resumed = have and getattr(response, "status", 200) == 206
        if not resumed:  # a fresh start, or a server that sent the whole file again
            have = 0
        length = response.headers.get("Content-Length")
        remaining = int(length) if length and length.isdigit() else None
        if remaining is not None:
            free = shutil.disk_usage(part.parent).free
            if remaining > free:
                part.unlink(missing_ok=True)
                raise ValueError(f"{url} needs {remaining / 1e6:.1f} MB but {part.parent} has "
                                 f"{free / 1e6:.1f} MB free; free some space or set "
                                 "CNNKIT_HOME to a disk with room")
        total = None if remaining is None else have + remaining
        with open(part, "ab" if resumed else "wb") as f, \
                tqdm(total=total, initial=have, unit="B", unit_scale=True,
                     desc=Path(urlsplit(url).path).name, leave=False,
                     disable=None if progress is None else not progress) as bar:
            try:
                while chunk := response.read(_CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
            except http.client.IncompleteRead:
                pass  # the size check below says so; the .part stays for a resume
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    part.unlink(missing_ok=True)
                    raise ValueError(f"the disk holding {part.parent} is full; free some "
                                     "space or set CNNKIT_HOME to a disk with room") from None
                raise
    if total is not None and part.stat().st_size < total:
        raise ConnectionError(f"the connection closed after {part.stat().st_size} of {total} "
                              "bytes; run again to resume from there")
