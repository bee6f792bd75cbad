"""Fetch checkpoints from `https://` or `gs://` into a local cache, resumable and checked.

`gs://bucket/path` is read over HTTPS from `https://storage.googleapis.com/bucket/path` (the
official files live in `gs://vit_models`). The cache (`$MINIVIT_CACHE`, default
`~/.cache/minivit`) is keyed by URL: `<cache>/<sha256(url)[:16]>/<file name>`, next to it a
`.sha256` sidecar with the digest of the completed file and, while downloading, a `.part` file
that a later call resumes with an HTTP `Range` request. `$MINIVIT_MIRROR` replaces the scheme
and host of every URL (`https://storage.googleapis.com/vit_models/x.npz` with
`MINIVIT_MIRROR=http://mirror/gcs` is read from `http://mirror/gcs/vit_models/x.npz`).
Only `urllib` is used.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

CHUNK = 1 << 20  # bytes per read and per progress update
TIMEOUT_S = 60  # socket timeout of each request
GCS_HOST = "https://storage.googleapis.com"


class FetchError(OSError):
    """A file that could not be fetched; the message says what to download and where to put it."""


def default_cache_dir() -> Path:
    """`$MINIVIT_CACHE`, else `~/.cache/minivit`."""
    return Path(os.environ.get("MINIVIT_CACHE") or "~/.cache/minivit").expanduser()


def to_https(url: str) -> str:
    """`gs://bucket/path` -> `https://storage.googleapis.com/bucket/path`; others unchanged."""
    if url.startswith("gs://"):
        return f"{GCS_HOST}/{url[len('gs://') :]}"
    return url


def mirrored(url: str) -> str:
    """The URL to request: scheme and host replaced by `$MINIVIT_MIRROR` when it is set."""
    mirror = os.environ.get("MINIVIT_MIRROR", "").rstrip("/")
    if not mirror:
        return url
    parts = urlsplit(url)
    return mirror + parts.path + (f"?{parts.query}" if parts.query else "")


def cache_path(url: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the file of `url` (https form) is cached."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    name = Path(urlsplit(url).path).name or "download"
    return root / hashlib.sha256(url.encode()).hexdigest()[:16] / name


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _write_sidecar(path: Path, digest: str) -> None:
    tmp = path.with_name(path.name + ".sha256.tmp")
    tmp.write_text(f"{digest}  {path.name}\n")
    os.replace(tmp, _sidecar(path))


def _cached_ok(path: Path, expected: str | None) -> bool:
    """True when a cached file matches its sidecar digest (and `expected`, if given).

    A file without a sidecar was put there by hand (as the download errors suggest): it is
    accepted and its digest recorded.
    """
    digest = sha256_of(path)
    sidecar = _sidecar(path)
    recorded = sidecar.read_text().split()[0] if sidecar.is_file() else None
    if recorded is None and expected in (None, digest):
        _write_sidecar(path, digest)
        return True
    return digest == recorded and expected in (None, digest)


class _Progress:
    """Bytes-done display on stderr: tqdm when installed, else one rewritten line."""

    def __init__(self, label: str, total: int | None, done: int, enabled: bool):
        self.label, self.total, self.done, self.enabled = label, total, done, enabled
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm  # noqa: PLC0415  (optional)
            except ImportError:
                return
            self.bar = tqdm(
                total=total, initial=done, unit="B", unit_scale=True, desc=label, file=sys.stderr
            )

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled:
            total = f"/{self.total / 1e6:.1f}" if self.total else ""
            sys.stderr.write(f"\r{self.label}: {self.done / 1e6:.1f}{total} MB")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            sys.stderr.write("\n")


def _advice(url: str, reason: str, target: Path) -> str:
    """The one sentence for a download that failed: what to get, from where, where to put it."""
    name = target.name
    source = url
    if url.startswith(GCS_HOST + "/"):
        source = "gs://" + url[len(GCS_HOST) + 1 :]
    return (
        f"could not download {url} ({reason}); the official bucket gs://vit_models refuses "
        f"anonymous downloads, so get {name} yourself (`gsutil cp {source} .` with a Google "
        f"account, or the timm/Hugging Face copy converted with `minivit convert IN.safetensors "
        f"{Path(name).stem}.npz`) and put it at {target}, or pass its local path"
    )


def _request(url: str, start: int) -> urllib.request.Request:
    headers = {"User-Agent": "minivit"}
    if start:
        headers["Range"] = f"bytes={start}-"
    return urllib.request.Request(url, headers=headers)


def _expected_total(response, start: int) -> int | None:
    """Full file size from Content-Range (206) or Content-Length (200), None if not sent."""
    content_range = response.headers.get("Content-Range", "")
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+)", content_range.strip())
    if response.status == 206 and match and int(match[1]) == start:
        return int(match[2])
    length = response.headers.get("Content-Length")
    return None if length is None else start + int(length)


def _download(url: str, part: Path, progress: bool, label: str) -> None:
    """Append the rest of `url` to `part` (or start it over when the server ignores Range).

    Raises FetchError when the body ends before the announced length; what arrived stays in
    `part` for the next call to resume.
    """
    start = part.stat().st_size if part.exists() else 0
    with urllib.request.urlopen(_request(url, start), timeout=TIMEOUT_S) as response:
        if start and response.status != 206:  # Range ignored: the body is the whole file
            start = 0
        total = _expected_total(response, start)
        bar = _Progress(label, total, start, progress)
        try:
            with open(part, "ab" if start else "wb") as f:
                for block in iter(lambda: response.read(CHUNK), b""):
                    f.write(block)
                    bar.update(len(block))
                f.flush()
                os.fsync(f.fileno())
        finally:
            bar.close()
    size = part.stat().st_size
    if total is not None and size != total:
        raise FetchError(
            f"the download of {url} stopped at {size} of {total} bytes; run again to resume it"
        )


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on a cache directory (POSIX), so processes download a file once."""
    try:
        import fcntl  # noqa: PLC0415  (POSIX only)
    except ImportError:
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _fetch_url(url: str, target: Path, progress: bool, sha256: str | None) -> Path:
    part = target.with_name(target.name + ".part")
    try:
        _download(mirrored(url), part, progress, target.name)
    except urllib.error.HTTPError as e:
        if e.code == 416 and part.exists():  # the partial file is not a prefix any more
            part.unlink()
            return _fetch_url(url, target, progress, sha256)
        raise FetchError(_advice(url, f"HTTP {e.code} {e.reason}", target)) from None
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        raise FetchError(_advice(url, f"no connection: {reason}", target)) from None
    digest = sha256_of(part)
    if sha256 is not None and digest != sha256:
        part.unlink()
        raise FetchError(
            f"the download of {url} has SHA-256 {digest}, not the expected "
            f"{sha256}; the file was discarded, check the URL or the expected hash"
        )
    os.replace(part, target)
    _write_sidecar(target, digest)
    return target


def fetch(
    url_or_path: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    sha256: str | None = None,
) -> Path:
    """A local path for a checkpoint given as a path, an `https://` URL or `gs://bucket/path`.

    URLs are downloaded once into the cache and checked: the announced length must arrive, the
    SHA-256 must equal `sha256` when given, and a cached file whose digest no longer matches its
    sidecar is downloaded again. An interrupted download resumes from its `.part` file. A 403,
    404 or missing network raises `FetchError` saying what to download and where to put it.
    """
    text = os.fspath(url_or_path)
    if not re.match(r"(https?|gs)://", text):
        path = Path(text).expanduser()
        if not path.is_file():
            raise FetchError(
                f"{path} does not exist; pass an existing file, an https:// URL or gs://bucket/path"
            )
        if sha256 is not None and sha256_of(path) != sha256:
            raise FetchError(f"{path} does not have the expected SHA-256 {sha256}")
        return path
    url = to_https(text)
    target = cache_path(url, cache_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent):
        if target.is_file() and _cached_ok(target, sha256):
            return target
        target.unlink(missing_ok=True)
        _sidecar(target).unlink(missing_ok=True)
        return _fetch_url(url, target, progress, sha256)
