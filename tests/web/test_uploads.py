"""Uploads under abuse: a decompression bomb is refused from its header, big images are
decoded reduced and shrunk at once, decodes and upload handlers are bounded, and what is
kept still equals the training preprocessing of the image (``cnnkit.data.load_image``)."""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from cnnkit.data import load_image
from cnnkit.web import inputs as web_inputs
from cnnkit.web.inputs import (
    MAX_UPLOAD_PIXELS,
    DecodeBudget,
    UploadTooLarge,
    decode_upload,
    release_memory,
)


def _encoded(im: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **options)
    return buf.getvalue()


def _bomb(side: int = 6300) -> bytes:
    """A few tens of KB of PNG that decodes to side x side pixels (38 KB at 6300)."""
    return _encoded(Image.new("L", (side, side)))


def _declared(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header declares ``width`` x ``height`` (only the header is read)."""
    data = bytearray(_encoded(Image.new("L", (1, 1))))
    data[16:24] = struct.pack(">II", width, height)  # IHDR's first fields, after its type
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _pattern(mode: str, size: tuple[int, int]) -> Image.Image:
    """A smooth image in ``mode`` (gradients, so averaging is visible and checkable)."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    rgba = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h), 128 + x * 127 // w],
                    -1).astype(np.uint8)
    im = Image.fromarray(rgba, "RGBA")
    if mode == "I;16":
        return Image.fromarray((x * 65535 // w).astype(np.uint16))
    if mode == "P":
        return im.convert("RGB").quantize(64)
    return im.convert(mode)


def test_a_decompression_bomb_is_refused_from_its_header_before_any_decoding(monkeypatch):
    data = _bomb()
    assert len(data) < 40_000
    monkeypatch.setattr(ImageFile.ImageFile, "load",
                        lambda self: pytest.fail("a bomb was decoded"))
    with pytest.raises(UploadTooLarge, match=r"6300x6300 pixels, over the limit of 16,000,000"):
        decode_upload(data, (8, 8), 1)
    assert 6300 * 6300 > MAX_UPLOAD_PIXELS


@pytest.mark.parametrize(("width", "height"), [(5000, 4000), (30000, 30000), (1, 2**31 - 1)])
def test_any_declared_size_over_the_budget_is_a_413(width, height):
    """Over the budget, over Pillow's own bomb limit (180 MP), or absurd: one message."""
    with pytest.raises(UploadTooLarge, match="pixels"):
        decode_upload(_declared(width, height), (8, 8), 1)


def test_a_bomb_upload_gets_a_413_with_a_message(client):
    r = client.post("/api/upload", files={"file": ("bomb.png", _bomb(), "image/png")})
    assert r.status_code == 413 and "6300x6300" in r.json()["error"]


def test_a_jpeg_over_the_budget_decodes_reduced_by_draft(monkeypatch):
    seen = []
    monkeypatch.setattr(web_inputs, "load_image",
                        lambda im, size, channels: seen.append(im.size) or load_image(im, size,
                                                                                     channels))
    data = _encoded(_pattern("RGB", (6000, 3000)), "JPEG", quality=90)  # 18 MP > the budget
    image = decode_upload(data, (8, 8), 3)
    assert image.shape == (3, 8, 8) and image.dtype == torch.uint8
    # draft() decodes at 1/8 (750x375), then a whole-factor reduction to >= 4x the model's side.
    assert seen and max(seen[0]) <= 4 * 8 * 2 * 2 and min(seen[0]) >= 4 * 8


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "RGBA", "LA", "I;16", "transparent P"])
def test_a_big_image_is_shrunk_first_and_still_preprocessed_as_in_training(mode):
    """Shrinking by a whole factor before load_image's own resize changes the numbers
    only by resampling: compared with load_image of the full image, a few grey levels."""
    im = _pattern(mode.split()[-1], (1030, 770))
    if mode == "transparent P":
        im.info["transparency"] = 0
    data = _encoded(im)
    for size in ((8, 8), (24, 16)):
        got = decode_upload(data, size, 3).float()
        with Image.open(io.BytesIO(data)) as full:
            want = load_image(full, size, 3).float()
        assert got.shape == want.shape
        assert (got - want).abs().mean() < 3 and (got - want).abs().max() < 40, mode


def test_a_small_image_is_not_shrunk_so_numbers_are_exact(reference):
    image = reference.images[7, 0].numpy()
    got = decode_upload(_encoded(Image.fromarray(image)), (8, 8), 1)
    np.testing.assert_array_equal(got[0].numpy(), image)


def test_the_decode_budget_bounds_the_pixels_decoded_at_once(monkeypatch):
    budget, inflight, peak, lock = DecodeBudget(2_000_000), [0], [0], threading.Lock()
    real_held = budget.held

    def spying_held(pixels):
        class Spy:
            def __enter__(self):
                self.inner = real_held(pixels)
                self.inner.__enter__()
                with lock:
                    inflight[0] += pixels
                    peak[0] = max(peak[0], inflight[0])
                time.sleep(0.02)

            def __exit__(self, *exc):
                with lock:
                    inflight[0] -= pixels
                return self.inner.__exit__(*exc)
        return Spy()

    monkeypatch.setattr(budget, "held", spying_held)
    big, small = _encoded(Image.new("L", (1000, 1000))), _encoded(Image.new("L", (100, 100)))
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda d: decode_upload(d, (8, 8), 1, budget=budget),
                      [big, small] * 8))
    assert peak[0] <= 2_000_000 and budget.used == 0
    assert peak[0] > 1_000_000  # small decodes ran beside a big one


def test_a_decode_larger_than_the_budget_runs_alone_instead_of_waiting_forever():
    budget = DecodeBudget(100)
    with budget.held(10_000):
        assert budget.used == 100
    assert budget.used == 0


def test_releasing_memory_is_harmless():
    release_memory()
    release_memory()


def test_a_big_form_field_gets_a_413(client):
    r = client.post("/api/upload", data={"note": "a" * 200_000},
                    files={"file": ("x.png", _bomb(8), "image/png")})
    assert r.status_code == 413 and "field" in r.json()["error"]
    assert r.headers["connection"] == "close"


def test_upload_handlers_are_bounded_and_the_rest_wait(explorer, monkeypatch):
    import urllib.request

    from cnnkit.web import create_app, running

    inflight, peak, lock = [0], [0], threading.Lock()
    real_add = explorer.inputs.add_upload

    def slow_add(data, name):
        with lock:
            inflight[0] += 1
            peak[0] = max(peak[0], inflight[0])
        time.sleep(0.05)
        with lock:
            inflight[0] -= 1
        return real_add(data, name)

    monkeypatch.setattr(explorer.inputs, "add_upload", slow_add)
    data = _encoded(Image.new("L", (8, 8), 3))
    boundary = "xyz"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\""
            f"\r\nContent-Type: image/png\r\n\r\n").encode() + data + \
        f"\r\n--{boundary}--\r\n".encode()
    with running(create_app(explorer, concurrent_uploads=2)) as url:
        def post(_):
            req = urllib.request.Request(url + "api/upload", data=body, headers={
                "Content-Type": f"multipart/form-data; boundary={boundary}"})
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status

        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(post, range(8)))
    assert codes == [201] * 8 and peak[0] == 2


def test_an_upload_that_waits_too_long_gets_a_503(explorer, monkeypatch):
    from starlette.testclient import TestClient

    from cnnkit.web import create_app

    gate = threading.Event()
    real_add = explorer.inputs.add_upload
    monkeypatch.setattr(explorer.inputs, "add_upload",
                        lambda data, name: gate.wait(10) and real_add(data, name))
    app = create_app(explorer, concurrent_uploads=1, upload_wait=0.3)
    data = _encoded(Image.new("L", (8, 8)))
    with TestClient(app) as c, ThreadPoolExecutor(2) as pool:
        first = pool.submit(c.post, "/api/upload", files={"file": ("a.png", data)})
        time.sleep(0.2)
        second = c.post("/api/upload", files={"file": ("b.png", data)})
        gate.set()
        assert first.result().status_code == 201
    assert second.status_code == 503 and "try again" in second.json()["error"]
