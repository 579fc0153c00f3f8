"""Headless Debian Chromium: load the page, run an example, wait for the panels, check they are not blank.

Uses playwright's bundled driver with ``executable_path="/usr/bin/chromium"`` (never
``playwright install``); skipped when the browser is missing.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHROMIUM = shutil.which("chromium")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium not installed (not on PATH)"),
]

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    import app

    tmp = tmp_path_factory.mktemp("browser")
    mp = pytest.MonkeyPatch()
    for k, v in {"GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(tmp / "gr"),
                 "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}.items():
        mp.setenv(k, v)
    cfg = app.AppConfig(backbones=("resnet18", "efficientnet_lite0"), default_backbone="resnet18",
                        default_weights="random", default_variants=("conv", "saconv"), input_size=64,
                        weights_dir=tmp / "weights", profile_repeats=2, profile_warmup=1)
    demo = app.build_demo(cfg)
    _, local_url, _ = app.launch(demo, prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    try:
        yield local_url
    finally:
        demo.close()
        mp.undo()


def _region_std(png: Path, box: dict) -> float:
    import numpy as np
    from PIL import Image

    with Image.open(png) as im:
        crop = im.convert("L").crop((int(box["x"]), int(box["y"]), int(box["x"] + box["width"]),
                                     int(box["y"] + box["height"])))
        return float(np.asarray(crop, dtype=float).std())


def _picture_not_blank(page, selector: str, shot: Path) -> bool:
    """Wait for the image at ``selector`` to load, screenshot the viewport, check its region varies."""
    img = page.locator(selector).first
    img.wait_for(state="visible", timeout=30_000)
    page.wait_for_function(f"() => {{ const i = document.querySelector({selector!r});"
                           " return i && i.complete && i.naturalWidth > 50; }", timeout=30_000)
    img.scroll_into_view_if_needed()
    page.screenshot(path=str(shot), full_page=False)
    box = img.bounding_box()
    assert box and box["width"] > 100 and box["height"] > 100, (selector, box)
    std = _region_std(shot, box)
    assert std > 10, f"{selector} looks blank (std {std:.1f})"
    return True


def test_example_run_renders_panels(url, tmp_path):
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url, wait_until="domcontentloaded")
            page.wait_for_selector("#run-btn", timeout=60_000)
            # the example gallery fills the image input
            page.locator("#examples button, #examples td, #examples img").first.click()
            page.wait_for_selector("#input-image img", timeout=30_000)
            page.locator("#run-btn").click()
            page.wait_for_selector("#overview .pc-card", timeout=240_000)
            page.screenshot(path=str(tmp_path / "overview.png"), full_page=True)
            overview = page.locator("#overview").inner_text().lower()
            assert "conv" in overview and "saconv" in overview and "top-5" in overview
            assert page.locator("#overview .pc-card").count() == 2
            assert "Analysed 2 models" in page.locator("#status").inner_text()
            # the Grad-CAM tab shows a real picture
            page.get_by_role("tab", name="Grad-CAM").click()
            img = page.locator("#gradcam img").first
            img.wait_for(state="visible", timeout=30_000)
            page.wait_for_function("() => { const i = document.querySelector('#gradcam img');"
                                   " return i && i.complete && i.naturalWidth > 50; }", timeout=30_000)
            img.scroll_into_view_if_needed()
            shot = tmp_path / "gradcam.png"
            page.screenshot(path=str(shot), full_page=False)
            box = img.bounding_box()
            assert box and box["width"] > 100 and box["height"] > 100
            assert _region_std(shot, box) > 10, "Grad-CAM panel looks blank"
            # the Redundancy tab: module maps picture and the plotly redundancy-by-depth chart
            page.get_by_role("tab", name="Redundancy").click()
            page.wait_for_selector("#redundancy .js-plotly-plot", timeout=30_000)
            assert _picture_not_blank(page, "#taps img", tmp_path / "taps.png")
            # the Receptive field tab: the ERF figure is a real picture
            page.get_by_role("tab", name="Receptive field").click()
            assert _picture_not_blank(page, "#erf img", tmp_path / "erf.png")
            # the Profile tab draws plotly charts
            page.get_by_role("tab", name="Profile").click()
            page.wait_for_selector("#profile-latency .js-plotly-plot", timeout=30_000)
            page.screenshot(path=str(tmp_path / "profile.png"), full_page=True)
        finally:
            browser.close()
    assert not errors, errors
    print(f"screenshots in {tmp_path}")
