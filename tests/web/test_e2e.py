"""``cnnkit serve`` end to end in headless Chromium (Debian's ``chromium``, driven by
Playwright for Python through ``executable_path``; no browser download): open the page,
pick an input, click a channel and then a neuron, and check that the numbers shown are
the model's own activation, computed here directly."""

from __future__ import annotations

import contextlib
import os
import re
import shutil

import numpy as np
import pytest

CHROMIUM = "/usr/bin/chromium"
# No network for the browser's own services: the page must work offline.
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CONV_2_1 = 5  # TinyVGG's fifth layer call: features.conv_2_1


def _missing(reason: str) -> None:
    """Skip where the browser is not installed, but fail in CI, which installs it."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI runs the README's test command, which installs it")
    pytest.skip(reason)


@pytest.fixture
def sync_api():
    """Playwright's sync API, once Chromium and Playwright are known to be there."""
    try:
        from playwright import sync_api
    except ImportError:
        _missing("Playwright for Python is missing: pip install playwright")
    if not os.access(CHROMIUM, os.X_OK):
        _missing(f"{CHROMIUM} is missing: apt-get install chromium (Debian's package)")
    return sync_api


@contextlib.contextmanager
def _open(sync_api, app):
    """The explorer page of ``app`` in headless Chromium, once it says it is ready."""
    from cnnkit.web import running

    with running(app) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.problems = []  # errors in the page and requests that leave the server
        page.on("pageerror", lambda e: page.problems.append(f"page error: {e}"))
        page.on("console", lambda m: m.type == "error" and page.problems.append(m.text))
        page.on("request", lambda r: r.url.startswith((url, "data:"))
                or page.problems.append(f"request outside the server: {r.url}"))
        page.goto(url)
        page.wait_for_selector("body[data-ready=true]", timeout=30_000)
        try:
            yield page
        finally:
            browser.close()


@pytest.fixture
def page(sync_api, explorer):  # sync_api first: a missing browser skips before any training
    from cnnkit.web import create_app

    with _open(sync_api, create_app(explorer, allowed_hosts=["127.0.0.1"])) as page:
        yield page


def test_clicked_neuron_shows_the_models_activation(page, reference, tmp_path):
    from playwright.sync_api import expect

    # Locator waits, not wait_for_function: the page's CSP forbids the eval that needs.
    page.click(".thumb[data-input='test:6']")
    expect(page.locator("#input-caption strong").first).to_have_text("test:6")
    page.click(f"#layer-{CONV_2_1} canvas.map[data-channel='3']")
    zoom = page.wait_for_selector(f"#zoom-canvas[data-layer='{CONV_2_1}'][data-channel='3']")
    cell = int(zoom.get_attribute("data-cell"))
    y, x = 1, 2
    zoom.click(position={"x": (x + 0.5) * cell, "y": (y + 0.5) * cell})
    expect(page.locator("#arithmetic h3")).to_have_text(
        f"features.conv_2_1: channel 3, row {y}, column {x}")

    import torch
    with torch.no_grad():
        expected = reference.model.features[:CONV_2_1 + 1](reference.x(6))[0, 3, y, x].item()
    shown = page.locator("#neuron-value")
    assert np.float32(shown.get_attribute("data-value")) == np.float32(expected)
    assert float(shown.text_content()) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert float(page.text_content("#neuron-result")) == pytest.approx(expected, rel=1e-5,
                                                                      abs=1e-6)
    assert "equal" in page.text_content(".verdict")
    assert page.locator(".conv-row").count() == 6  # 10 input channels, 6 drawn, all summed

    page.click("#prediction .class-row[data-class='0']")
    expect(page.locator("#arithmetic h3")).to_have_text(
        f"softmax: class {reference.preprocess.classes[0]}")
    with torch.no_grad():
        p0 = torch.softmax(reference.model(reference.x(6))[0], 0)[0].item()
    assert float(page.get_attribute("#neuron-value", "data-value")) == pytest.approx(p0, rel=1e-6)

    shot = tmp_path / "explorer.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 20_000
    assert page.problems == []


def test_weights_replaced_on_disk_show_a_banner_and_reload(sync_api, run_path, tmp_path,
                                                           replace_weights):
    from playwright.sync_api import expect

    from cnnkit.web import create_app, load_explorer

    run = tmp_path / "run"
    shutil.copytree(run_path, run)
    with _open(sync_api, create_app(load_explorer(run), allowed_hosts=["127.0.0.1"])) as page:
        expect(page.locator("#run-info")).to_contain_text("best weights of ")
        expect(page.locator("#stale")).to_be_hidden()
        replace_weights(run / "model.safetensors")
        page.click(".thumb[data-input='test:1']")  # every input shown checks the weights
        expect(page.locator("#stale")).to_be_visible()
        expect(page.locator("#stale-text")).to_contain_text("model.safetensors changed on disk")
        page.click("#reload")
        page.wait_for_selector("body[data-ready=true]", timeout=30_000)
        expect(page.locator("#stale")).to_be_hidden()
        assert page.problems == []


def test_moving_the_slider_shows_another_slice_of_a_volume(sync_api, seg3d_path):
    """A 3D U-Net's page: the slider moves every map to its slice at the new depth, and a
    neuron clicked on the shown slice is the model's activation at that depth."""
    import torch
    from playwright.sync_api import expect

    from cnnkit.run import run_test_split
    from cnnkit.training import load_run
    from cnnkit.web import create_app, load_explorer

    explorer = load_explorer(seg3d_path)
    layer = next(la for la in explorer.layers if len(la.shape) == 4 and la.shape[1] == 4
                 and la.kind != "identity")  # a layer pooled to half the depth
    with _open(sync_api, create_app(explorer, allowed_hosts=["127.0.0.1"])) as page:
        expect(page.locator("#depth-control")).to_be_visible()
        expect(page.locator("#depth-text")).to_have_text("5 of 8")  # the middle slice first
        page.click(f"#layer-{layer.index} canvas.map[data-channel='1']")
        page.wait_for_selector(f"#zoom-canvas[data-layer='{layer.index}'][data-slice='2']")
        page.locator("#depth").fill("7")
        expect(page.locator("#depth-text")).to_have_text("8 of 8")
        zoom = page.wait_for_selector(f"#zoom-canvas[data-layer='{layer.index}'][data-slice='3']")
        expect(page.locator(f"#layer-{layer.index}")).to_have_attribute("data-slice", "3")
        expect(page.locator("#layer-input")).to_have_attribute("data-slice", "7")
        cell = int(zoom.get_attribute("data-cell"))
        y, x = 2, 1
        zoom.click(position={"x": (x + 0.5) * cell, "y": (y + 0.5) * cell})
        expect(page.locator("#arithmetic h3")).to_have_text(
            f"{layer.name}: channel 1, slice 3, row {y}, column {x}")

        run = load_run(seg3d_path)
        images, _ = run_test_split(run)
        calls = []  # the module's outputs, one per call (a pool is called at every level)
        module = run.model.get_submodule(layer.module)
        handle = module.register_forward_hook(lambda m, a, out: calls.append(out.clone()))
        with torch.no_grad():
            run.model(run.preprocess(images[0])[None])
        handle.remove()
        call = int(layer.name.partition("#")[2] or 1) - 1
        expected = calls[call][0, 1, 3, y, x].item()
        shown = page.locator("#neuron-value")
        assert np.float32(shown.get_attribute("data-value")) == np.float32(expected)
        expect(page.locator("#mask-canvas")).to_be_visible()
        assert page.problems == []


# What may not be wider than the window at 1400 px: the page itself (the network scrolls
# inside its own panel).
PAGE_WIDTH = "() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]"
OVERVIEW_WIDTH = "() => document.querySelector('#overview').scrollWidth"


def test_a_wide_network_fits_the_window_with_full_names_and_folding_stages(sync_api,
                                                                           resnet18_path):
    from playwright.sync_api import expect

    from cnnkit.web import create_app, load_explorer

    explorer = load_explorer(resnet18_path)
    with _open(sync_api, create_app(explorer, allowed_hosts=["127.0.0.1"])) as page:
        scroll, client = page.evaluate(PAGE_WIDTH)
        assert scroll <= client == 1400
        wide = page.evaluate(OVERVIEW_WIDTH)
        assert wide > client  # the network is wider than the window: it scrolls in its panel

        names = page.locator(".layer-name")
        assert names.count() > 40
        for i in range(names.count()):  # every name in full on hover, the stage's or not
            full = names.nth(i).get_attribute("data-name")
            assert names.nth(i).get_attribute("title").split("\n")[0] == full
            assert full.endswith(names.nth(i).text_content())
        conv = next(la for la in explorer.layers if la.name == "layer1.0.conv1")
        expect(page.locator(f"#layer-{conv.index} .layer-name")).to_have_text("0.conv1")

        header = page.locator(".stage-name[data-stage='layer1']")
        maps = page.locator(f"#layer-{conv.index} canvas.map")
        expect(header).to_have_attribute("aria-expanded", "true")
        expect(maps.first).to_be_visible()
        header.click()
        expect(header).to_have_attribute("aria-expanded", "false")
        expect(maps.first).to_be_hidden()
        expect(page.locator(".stage-name[data-stage='layer2']")).to_have_attribute(
            "aria-expanded", "true")
        assert page.evaluate(OVERVIEW_WIDTH) < wide
        header.click()
        expect(maps.first).to_be_visible()

        page.click(f"#layer-{conv.index} canvas.map[data-channel='0']")  # details shown
        page.wait_for_selector(f"#zoom-canvas[data-layer='{conv.index}']")
        scroll, client = page.evaluate(PAGE_WIDTH)
        assert scroll <= client
        assert page.problems == []


def test_a_segmentation_page_overlays_its_classes_with_a_legend(sync_api, seg2d_path):
    from playwright.sync_api import expect

    from cnnkit.web import create_app, load_explorer

    explorer = load_explorer(seg2d_path)
    classes = explorer.run.preprocess.classes
    with _open(sync_api, create_app(explorer, allowed_hosts=["127.0.0.1"])) as page:
        expect(page.locator("#mask-controls")).to_be_visible()
        expect(page.locator("#mask-legend .legend-item")).to_have_text(classes)
        swatch = page.locator("#mask-legend .legend-item[data-class='1'] .swatch")
        r, g, b = explorer.head.info()["palette"][1]
        expect(swatch).to_have_css("background-color", f"rgb({r}, {g}, {b})")
        canvas = page.locator("#mask-canvas")
        expect(canvas).to_be_visible()
        expect(canvas).to_have_attribute("data-shows", "predicted")
        page.select_option("#mask-mode", "truth")
        expect(canvas).to_have_attribute("data-shows", "truth")
        page.select_option("#mask-mode", "none")
        expect(canvas).to_be_hidden()

        page.click("#mask-legend .legend-item[data-class='2']")  # explain that class's region
        expect(page.locator("#explain-note")).to_contain_text(f"for class {classes[2]} (")
        expect(page.locator("#explain-note")).to_contain_text(re.compile(
            f"its region: the [0-9.]+% of positions predicted as {classes[2]}|no position is "
            f"predicted as {classes[2]}"))
        expect(page.locator("#overlay-canvas")).to_be_visible()
        assert page.locator("#explain-show").is_checked()
        scroll, client = page.evaluate(PAGE_WIDTH)
        assert scroll <= client
        assert page.problems == []
