"""Downloads against an HTTP server on 127.0.0.1 started by the test: cache hits, resumed and
interrupted transfers, corrupt cache entries, checksums, 403 / 404 / no server, mirrors."""

from __future__ import annotations

import hashlib
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from minivit import checkpoint
from minivit.fetch import FetchError, cache_path, fetch, to_https

PAYLOAD = np.random.default_rng(0).integers(0, 256, 3 * (1 << 20) + 12345, np.uint8).tobytes()


class Server:
    """Serves `files` (path -> bytes) with Range support; records (path, Range) per request."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.status: dict[str, int] = {}  # path -> forced error status
        self.cut_after: dict[str, int] = {}  # path -> bytes sent before the connection drops
        self.ignore_range = False
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                if self.path in server.status:
                    self.send_error(server.status[self.path])
                    return
                if self.path not in server.files:
                    self.send_error(404)
                    return
                server.reply(self, self.path)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def reply(self, handler: BaseHTTPRequestHandler, path: str) -> None:
        data = self.files[path]
        match = re.fullmatch(r"bytes=(\d+)-", handler.headers.get("Range") or "")
        start = int(match[1]) if match and not self.ignore_range else 0
        if start >= len(data) and start:
            handler.send_error(416)
            return
        handler.send_response(206 if start else 200)
        if start:
            handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        handler.send_header("Content-Length", str(len(data) - start))
        handler.end_headers()
        body = data[start:]
        if path in self.cut_after:
            body = body[: self.cut_after.pop(path)]
            handler.close_connection = True
        handler.wfile.write(body)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    running = Server()
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def no_mirror(monkeypatch):
    monkeypatch.delenv("MINIVIT_MIRROR", raising=False)


def test_download_then_cache_hit(server, tmp_path):
    server.files["/models/ViT-B_16.npz"] = PAYLOAD
    url = server.url + "/models/ViT-B_16.npz"
    path = fetch(url, cache_dir=tmp_path, progress=False)
    assert path == cache_path(url, tmp_path) and path.read_bytes() == PAYLOAD
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    assert path.with_name("ViT-B_16.npz.sha256").read_text().split()[0] == digest
    assert fetch(url, cache_dir=tmp_path, progress=False, sha256=digest) == path
    assert len(server.requests) == 1  # the second fetch was served by the cache
    assert not path.with_name("ViT-B_16.npz.part").exists()


def test_cache_dir_from_environment(server, tmp_path, monkeypatch):
    server.files["/a.npz"] = b"abc"
    monkeypatch.setenv("MINIVIT_CACHE", str(tmp_path / "env-cache"))
    path = fetch(server.url + "/a.npz", progress=False)
    assert path.is_relative_to(tmp_path / "env-cache") and path.read_bytes() == b"abc"


def test_resume_from_partial_file(server, tmp_path):
    server.files["/f.npz"] = PAYLOAD
    url = server.url + "/f.npz"
    part = cache_path(url, tmp_path).with_name("f.npz.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(PAYLOAD[:1_000_000])
    path = fetch(url, cache_dir=tmp_path, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert server.requests == [("/f.npz", "bytes=1000000-")]


def test_interrupted_download_resumes(server, tmp_path):
    server.files["/f.npz"] = PAYLOAD
    server.cut_after["/f.npz"] = 1_500_000
    url = server.url + "/f.npz"
    with pytest.raises(FetchError, match="stopped at 1500000 of .* run again to resume"):
        fetch(url, cache_dir=tmp_path, progress=False)
    target = cache_path(url, tmp_path)
    assert not target.exists()
    assert target.with_name("f.npz.part").read_bytes() == PAYLOAD[:1_500_000]
    assert fetch(url, cache_dir=tmp_path, progress=False).read_bytes() == PAYLOAD
    assert server.requests[-1] == ("/f.npz", "bytes=1500000-")


def test_server_ignoring_range_restarts(server, tmp_path):
    server.files["/f.npz"] = PAYLOAD
    server.ignore_range = True
    url = server.url + "/f.npz"
    part = cache_path(url, tmp_path).with_name("f.npz.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x" * 1000)  # not even a prefix of the file
    assert fetch(url, cache_dir=tmp_path, progress=False).read_bytes() == PAYLOAD


def test_corrupt_cached_file_is_downloaded_again(server, tmp_path):
    server.files["/f.npz"] = PAYLOAD
    url = server.url + "/f.npz"
    path = fetch(url, cache_dir=tmp_path, progress=False)
    damaged = bytearray(PAYLOAD)
    damaged[12345] ^= 0xFF
    path.write_bytes(bytes(damaged))
    assert fetch(url, cache_dir=tmp_path, progress=False).read_bytes() == PAYLOAD
    assert len(server.requests) == 2


def test_file_placed_by_hand_is_used(server, tmp_path):
    url = server.url + "/manual.npz"
    target = cache_path(url, tmp_path)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"placed by the user")
    assert fetch(url, cache_dir=tmp_path, progress=False).read_bytes() == b"placed by the user"
    assert server.requests == []


def test_checksum_mismatch_discards_download(server, tmp_path):
    server.files["/f.npz"] = PAYLOAD
    url = server.url + "/f.npz"
    with pytest.raises(FetchError, match="not the expected"):
        fetch(url, cache_dir=tmp_path, progress=False, sha256="0" * 64)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize(("status", "phrase"), [(403, "HTTP 403"), (404, "HTTP 404")])
def test_http_errors_say_what_to_download(server, tmp_path, status, phrase):
    server.status["/vit_models/imagenet21k/ViT-B_16.npz"] = status
    url = server.url + "/vit_models/imagenet21k/ViT-B_16.npz"
    with pytest.raises(FetchError) as error:
        fetch(url, cache_dir=tmp_path, progress=False)
    message = str(error.value)
    for text in (phrase, "ViT-B_16.npz", "gs://vit_models", "minivit convert",
                 str(cache_path(url, tmp_path))):  # fmt: skip
        assert text in message
    assert "\n" not in message
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_no_server(tmp_path):
    with socket.socket() as probe:  # a port that nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/ViT-B_16.npz"
    with pytest.raises(FetchError, match="no connection.*put it at"):
        fetch(url, cache_dir=tmp_path, progress=False)


def test_gs_url_through_mirror(server, tmp_path, monkeypatch):
    server.files["/mirror/vit_models/augreg/S_16.npz"] = b"mirrored"
    monkeypatch.setenv("MINIVIT_MIRROR", server.url + "/mirror/")
    assert to_https("gs://vit_models/augreg/S_16.npz") == (
        "https://storage.googleapis.com/vit_models/augreg/S_16.npz"
    )
    path = fetch("gs://vit_models/augreg/S_16.npz", cache_dir=tmp_path, progress=False)
    assert path.read_bytes() == b"mirrored"
    assert path == cache_path("https://storage.googleapis.com/vit_models/augreg/S_16.npz", tmp_path)
    assert server.requests == [("/mirror/vit_models/augreg/S_16.npz", None)]


def test_progress_goes_to_stderr(server, tmp_path, capsys):
    server.files["/f.npz"] = PAYLOAD
    fetch(server.url + "/f.npz", cache_dir=tmp_path, progress=True)
    captured = capsys.readouterr()
    assert captured.out == "" and "f.npz" in captured.err


def test_local_paths(tmp_path):
    local = tmp_path / "model.npz"
    local.write_bytes(b"x")
    assert fetch(local) == local and fetch(str(local)) == local
    with pytest.raises(FetchError, match="does not exist"):
        fetch(tmp_path / "missing.npz")


def test_load_from_url(server, tmp_path, golden_tiny, monkeypatch):
    pytest.importorskip("minivit.models", reason="minivit.models not built yet")
    monkeypatch.setenv("MINIVIT_CACHE", str(tmp_path))
    server.files["/vit.npz"] = (golden_tiny / "vit_tiny_token" / "model.npz").read_bytes()
    model = checkpoint.load(server.url + "/vit.npz", num_classes=3)
    assert model.num_classes == 3 and model.image_size == 32
