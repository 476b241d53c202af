"""cnnkit._download against a real HTTP server on 127.0.0.1 that the tests control."""

import hashlib
import http.server
import os
import threading
from collections import namedtuple

import pytest

from cnnkit._download import cache_dir, fetch, mirrored

PAYLOAD = os.urandom(3 * (1 << 20) + 12345)  # several chunks, not a multiple of one
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD at /file.bin; honours Range unless told not to; can cut a response
    half-way (``cut``), as a dropped connection does."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        server = self.server
        server.requests.append(dict(self.headers))
        if self.path != "/file.bin":
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and server.ranges:
            start = int(rng.split("=")[1].rstrip("-"))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        else:
            self.send_response(200)
        body = PAYLOAD[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.cut:
            self.wfile.write(body[:server.cut])
            server.cut = 0
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


Server = namedtuple("Server", "url httpd")


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.requests, httpd.ranges, httpd.cut = [], True, 0
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield Server(f"http://127.0.0.1:{httpd.server_port}", httpd)
    httpd.shutdown()
    httpd.server_close()


def test_download_is_verified_and_published_whole(server, tmp_path):
    dest = tmp_path / "cache" / "file.bin"
    assert fetch(server.url + "/file.bin", dest, SHA, progress=False) == dest
    assert dest.read_bytes() == PAYLOAD
    assert not dest.with_name("file.bin.part").exists()


def test_a_cached_file_is_used_without_the_network(server, tmp_path):
    dest = tmp_path / "file.bin"
    fetch(server.url + "/file.bin", dest, SHA, progress=False)
    server.httpd.shutdown()
    server.httpd.server_close()
    assert fetch(server.url + "/file.bin", dest, SHA, progress=False).read_bytes() == PAYLOAD


def test_a_hash_mismatch_is_refused_and_nothing_is_kept(server, tmp_path):
    dest = tmp_path / "file.bin"
    with pytest.raises(ValueError, match="expected 0+: the download is damaged"):
        fetch(server.url + "/file.bin", dest, "0" * 64, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_download_resumes_with_a_range_request(server, tmp_path):
    dest = tmp_path / "file.bin"
    server.httpd.cut = 1_500_000
    with pytest.raises(ConnectionError, match="run again to resume"):
        fetch(server.url + "/file.bin", dest, SHA, progress=False)
    part = tmp_path / "file.bin.part"
    assert part.stat().st_size == 1_500_000 and not dest.exists()
    fetch(server.url + "/file.bin", dest, SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.httpd.requests[-1]["Range"] == "bytes=1500000-"


def test_a_server_without_ranges_restarts_the_download(server, tmp_path):
    dest = tmp_path / "file.bin"
    (tmp_path / "file.bin.part").write_bytes(b"x" * 1000)  # not a prefix of the payload
    server.httpd.ranges = False
    fetch(server.url + "/file.bin", dest, SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_a_corrupt_cached_file_is_fetched_again(server, tmp_path):
    dest = tmp_path / "file.bin"
    dest.write_bytes(PAYLOAD[:-1] + b"!")
    fetch(server.url + "/file.bin", dest, SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD and len(server.httpd.requests) == 1


def test_no_network_and_no_cache_says_where_to_put_the_file(server, tmp_path):
    dest = tmp_path / "file.bin"
    url = server.url + "/file.bin"
    server.httpd.shutdown()
    server.httpd.server_close()
    with pytest.raises(ConnectionError) as e:
        fetch(url, dest, SHA, progress=False)
    message = str(e.value)
    assert "\n" not in message and str(dest) in message and SHA in message
    assert "CNNKIT_DATA_MIRROR" in message


def test_a_missing_file_on_the_server_is_one_line(server, tmp_path):
    with pytest.raises(ConnectionError, match="HTTP Error 404|Not Found"):
        fetch(server.url + "/nothing.bin", tmp_path / "nothing.bin", SHA, progress=False)


def test_no_room_on_the_disk_is_refused_before_writing(server, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda path: usage(10, 10, 1000))
    with pytest.raises(ValueError, match="MB free; free some space or set CNNKIT_HOME"):
        fetch(server.url + "/file.bin", tmp_path / "file.bin", SHA, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_mirror_folder_or_url_replaces_the_origin(server, tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "file.bin").write_bytes(PAYLOAD)
    monkeypatch.setenv("CNNKIT_DATA_MIRROR", str(mirror))
    dest = tmp_path / "cache" / "file.bin"
    fetch("https://example.invalid/official/file.bin", dest, SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD
    monkeypatch.setenv("CNNKIT_DATA_MIRROR", server.url + "/")
    assert mirrored("https://example.invalid/a/b/file.bin") == server.url + "/file.bin"
    dest.unlink()
    fetch("https://example.invalid/official/file.bin", dest, SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD and server.httpd.requests


def test_the_cache_is_cnnkit_home_or_the_users_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("CNNKIT_HOME", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("CNNKIT_HOME")
    assert cache_dir().parts[-2:] == (".cache", "cnnkit")
