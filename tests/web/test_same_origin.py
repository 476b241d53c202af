"""Cross-site requests: a page on another site must not make the user's browser drive the
explorer (upload, reload) or read its API; scripts without browser headers still pass."""

from __future__ import annotations

import io

import pytest
from PIL import Image
from starlette.datastructures import Headers

from cnnkit.web.security import cross_site

FOREIGN = [
    {"Origin": "http://evil.example"},
    {"Origin": "null"},  # a sandboxed frame or a file:// page
    {"Origin": "http://testserver:8080"},  # another port is another origin
    {"Origin": "https://testserver"},  # another scheme too
    {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "same-site"},  # localhost:3000 -> localhost:8000
    {"Sec-Fetch-Site": "cross-site", "Origin": "http://testserver"},
]
OWN = [
    {},  # curl, scripts
    {"Sec-Fetch-Site": "same-origin", "Origin": "http://testserver"},
    {"Sec-Fetch-Site": "none"},  # the user typed the URL
    {"Origin": "http://testserver:80"},  # the default port, spelled out
    {"Origin": "http://TestServer"},
]


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8, 8), 5).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("headers", FOREIGN)
def test_a_cross_site_upload_is_refused_before_it_is_read(client, explorer, headers):
    before = len(explorer.inputs._uploads)
    r = client.post("/api/upload", files={"file": ("a.png", _png(), "image/png")},
                    headers=headers)
    assert r.status_code == 403 and "refused" in r.json()["error"]
    assert r.headers["connection"] == "close"
    assert len(explorer.inputs._uploads) == before


@pytest.mark.parametrize("headers", FOREIGN)
@pytest.mark.parametrize(("method", "path"), [("POST", "/api/reload"), ("GET", "/api/model"),
                                              ("GET", "/api/activations?input=test:0")])
def test_every_api_route_refuses_cross_site_requests(client, headers, method, path):
    r = client.request(method, path, headers=headers)
    assert r.status_code == 403 and r.json()["error"]


@pytest.mark.parametrize("headers", OWN)
def test_the_pages_own_requests_and_scripts_pass(client, headers):
    r = client.post("/api/upload", files={"file": ("a.png", _png(), "image/png")},
                    headers=headers)
    assert r.status_code == 201, r.text
    assert client.get("/api/model", headers=headers).status_code == 200


def test_the_page_itself_may_be_linked_from_anywhere(client):
    r = client.get("/", headers={"Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 200


@pytest.mark.parametrize(("host", "origin", "foreign"), [
    ("127.0.0.1:8000", "http://127.0.0.1:8000", False),
    ("[::1]:8000", "http://[::1]:8000", False),
    ("localhost:8000", "http://127.0.0.1:8000", True),  # the same machine, another origin
    ("127.0.0.1:8000", "http://127.0.0.1:8000.evil.example", True),
    ("127.0.0.1:8000", "http://127.0.0.1:notaport", True),
    ("127.0.0.1:8000", "127.0.0.1:8000", True),  # not an origin at all
])
def test_origins_are_compared_by_scheme_host_and_port(host, origin, foreign):
    reason = cross_site(Headers({"host": host, "origin": origin}), "http")
    assert (reason is not None) == foreign
