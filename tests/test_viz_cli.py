"""`python -m viz`: analyze on real photos (ResNet-18 random, bundled EfficientNet-Lite0), bad input, profile,
and report.html opened in headless Chromium without console errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from viz.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT / "assets" / "chelsea.jpg"
ALL = "conv,scconv,saconv,selfcal,spconv,acb"
MODEL_KEYS = ("variant", "swapped", "skipped", "provenance", "top5", "params", "flops", "latency_ms", "layers",
              "gradcam", "taps", "erf", "timings")


def _check_report(out: Path, variants: list[str]) -> dict:
    d = json.loads((out / "report.json").read_text())
    for key in ("backbone", "weights", "device", "input_size", "models"):
        assert key in d
    assert [m["variant"] for m in d["models"]] == variants
    for m in d["models"]:
        for key in MODEL_KEYS:
            assert key in m, (m["variant"], key)
        assert m["gradcam"] and all((out / g["png"]).is_file() for g in m["gradcam"])
        assert all(t["png"] is None or (out / t["png"]).is_file() for t in m["taps"])
        assert m["erf"]["area_ratios"] and m["params"] > 0 and m["flops"] > 0
        assert not m["errors"], m["errors"]
    assert (out / "report.html").is_file() and (out / "figures" / "gradcam.png").is_file()
    # where the time went, outside the per-model phases: backbone, swaps, CKA, drawing
    assert {"load_backbone", "prepare_models", "render"} <= set(d["timings"]) and d["timings"]["prepare_models"] > 0
    return d


@pytest.fixture(scope="module")
def resnet_report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rep_resnet")
    rc = main(["analyze", str(PHOTO), "--backbone", "resnet18", "--weights", "random", "--variants", ALL,
               "--no-latency", "--out", str(out), "--quiet"])
    assert rc == 0
    return out


def test_analyze_resnet18_all_variants(resnet_report):
    d = _check_report(resnet_report, ALL.split(","))
    assert d["backbone"] == "resnet18" and d["weights"]["source"] == "random"
    by = {m["variant"]: m for m in d["models"]}
    assert by["conv"]["swapped"] == [] and len(by["saconv"]["swapped"]) == 16
    assert by["acb"]["extra"]["fuse_max_abs_diff"] < 1e-3
    assert any(t["local"] == "switch" for t in by["saconv"]["taps"])


@pytest.fixture(scope="module")
def lite0_report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rep_lite0")
    rc = main(["analyze", str(PHOTO), "--backbone", "efficientnet_lite0", "--variants", ALL, "--no-latency",
               "--out", str(out), "--quiet"])
    assert rc == 0
    return out


def test_analyze_efficientnet_lite0_bundled(lite0_report):
    d = _check_report(lite0_report, ALL.split(","))  # ERF and redundancy on
    assert d["weights"]["source"] == "bundled" and len(d["layers"]) == 7
    by = {m["variant"]: m for m in d["models"]}
    # variants that cannot take a site list it as skipped with a reason, never a crash
    for v in ("scconv", "selfcal", "spconv"):
        assert by[v]["skipped"], v
        assert all(isinstance(s["reason"], str) and s["reason"].strip() for s in by[v]["skipped"]), v
    for v in ("acb", "saconv"):
        assert by[v]["swapped"], v
    assert by["conv"]["swapped"] == []
    for m in by.values():
        assert m["gradcam"] and m["top5"]
        assert all(r["redundancy"] for r in m["layers"])


def test_bad_image_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "page.jpg"
    bad.write_text("<!DOCTYPE html><html><body>not an image</body></html>")
    rc = main(["analyze", str(bad), "--backbone", "resnet18", "--weights", "random", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and err.count("page.jpg") == 1 and "\n" not in err
    assert not (tmp_path / "o" / "report.json").exists()
    rc = main(["analyze", str(PHOTO), "--backbone", "resnet18", "--weights", "random", "--variants", "conv,nope",
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "nope" in err and "\n" not in err


def test_profile_json(capsys):
    rc = main(["profile", "--backbone", "resnet18", "--variants", "conv,acb", "--input-size", "64", "--no-latency",
               "--json"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    by = {m["variant"]: m for m in d["models"]}
    assert by["conv"]["params"] == 11689512  # torchvision resnet18
    from torchvision.models import resnet18

    ref = resnet18()
    c_out = sum(ref.get_submodule(site).out_channels for site in by["acb"]["swapped"])
    assert by["acb"]["params"] > by["conv"]["params"]
    # deploy form = the plain conv plus a bias: each fused site trades its BN (2·C) for a bias (C)
    assert by["acb"]["deploy"]["params"] == by["conv"]["params"] - c_out


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.mark.parametrize("report", ["resnet_report", "lite0_report"])
def test_report_html_opens_offline_without_errors(report, request):
    if CHROMIUM is None:
        pytest.skip("chromium not installed")
    sync_api = pytest.importorskip("playwright.sync_api")
    _open_in_chromium(request.getfixturevalue(report), sync_api)


def _open_in_chromium(out: Path, sync_api) -> None:
    html = (out / "report.html").read_text()
    assert '<script src="http' not in html and html.count("* plotly.js v") <= 1  # inlined once, no CDN tag
    errors: list[str] = []
    requests: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto((out / "report.html").as_uri())
            page.wait_for_selector(".plotly-graph-div .main-svg", timeout=30000)
            n_plots = page.locator(".plotly-graph-div").count()
            n_rendered = page.evaluate("Array.from(document.querySelectorAll('.plotly-graph-div'))"
                                       ".filter(d => d.querySelector('.main-svg')).length")
            imgs_ok = page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
        finally:
            browser.close()
    assert not errors, errors
    assert n_plots >= 3 and n_rendered == n_plots
    assert imgs_ok
    assert all(u.startswith(("file:", "data:", "about:")) for u in requests), requests


def test_analysis_runtime_error_is_one_line_exit_1(tmp_path, capsys, monkeypatch):
    import viz.analysis

    def boom(*a, **k):
        raise RuntimeError("activation of layer3.0.conv2[0] was modified in place\nsecond line")

    monkeypatch.setattr(viz.analysis, "analyze", boom)
    rc = main(["analyze", str(PHOTO), "--backbone", "resnet18", "--weights", "random", "--variants", "conv",
               "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.startswith("error: analysis failed (resnet18") and "layer3.0.conv2" in err
    assert "\n" not in err and not (tmp_path / "o" / "report.json").exists()


def test_profile_latency_end_to_end(capsys):
    rc = main(["profile", "--backbone", "resnet18", "--variants", "conv,acb", "--input-size", "64", "--repeats", "2",
               "--warmup", "1", "--json"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    assert d["input_size"] == 64
    for m in d["models"]:
        assert m["latency_ms"] > 0 and m["latency_iqr_ms"] >= 0
        lat = m["profile"]["latency"]
        assert len(lat["times_ms"]) == 2
        per = lat["per_layer"]
        assert per and all(isinstance(p["median_ms"], float) and p["median_ms"] >= 0 for p in per)
        assert any(p["median_ms"] > 0 for p in per)
        # the sum of the per-layer medians next to the whole-model figure
        assert m["latency_per_layer_sum_ms"] == pytest.approx(sum(p["median_ms"] for p in per))
        assert m["latency_per_layer_sum_ms"] > 0 and m["latency_hooked_total_ms"] > 0
        assert lat["per_layer_sum_ms"] == m["latency_per_layer_sum_ms"] and lat["median_ms"] == m["latency_ms"]
        lb = m["latency_labels"]
        assert lb["device_type"] == "cpu" and lb["device"] and lb["dtype"] == "float32"
        assert lb["batch"] == 1 and lb["input_size"] == "64×64"
        assert lb["repeats"] == 2 and lb["warmup"] == 1 and lb["statistic"] == "median of 2"
    acb = {m["variant"]: m for m in d["models"]}["acb"]
    assert acb["deploy"]["latency_ms"] > 0 and acb["profile"]["deploy"]["latency"]["per_layer_sum_ms"] > 0
    rc = main(["profile", "--backbone", "resnet18", "--variants", "conv", "--input-size", "64", "--repeats", "2",
               "--warmup", "0"])
    out = capsys.readouterr().out
    assert rc == 0 and "Σ layers ms" in out and "median of 2 after 0 warm-up" in out


def test_latency_defaults_follow_the_reference():
    from viz.__main__ import _parser
    from viz.cost import DEFAULT_REPEATS, DEFAULT_WARMUP

    assert DEFAULT_WARMUP >= 10 and DEFAULT_REPEATS >= 30  # analysis.md §5
    for argv in (["profile"], ["analyze", "x.jpg", "--out", "o"]):
        args = _parser().parse_args(argv)
        assert (args.repeats, args.warmup) == (DEFAULT_REPEATS, DEFAULT_WARMUP)
    with pytest.raises(SystemExit):
        _parser().parse_args(["profile", "--repeats", "0"])


def test_analyze_latency_uses_repeats_and_warmup(tmp_path):
    rc = main(["analyze", str(PHOTO), "--backbone", "resnet18", "--weights", "random", "--variants", "conv",
               "--no-erf", "--no-redundancy", "--layers", "layer4", "--repeats", "2", "--warmup", "0",
               "--out", str(tmp_path), "--quiet"])
    assert rc == 0
    m = json.loads((tmp_path / "report.json").read_text())["models"][0]
    assert m["latency_ms"] > 0
    assert m["latency_labels"]["repeats"] == 2 and m["latency_labels"]["warmup"] == 0
    assert m["latency_labels"]["input_size"] == "224×224" and m["latency_labels"]["batch"] == 1
    assert m["timings"]["profile"] > 0


def test_report_html_names_the_mode_deploy_cost_latency_sum_and_image_count(tmp_path):
    import re

    import torch
    from PIL import Image
    from torchvision.models import resnet18

    from plugconv.backbones import Backbone, WeightsInfo
    from viz.analysis import analyze, cached_profile
    from viz.models import prepare_model
    from viz.report import render_html, write_report

    torch.manual_seed(0)
    bb = Backbone("resnet18", resnet18(num_classes=10).eval(), 64, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                  tuple(f"c{i}" for i in range(10)), WeightsInfo("random", None, None, "test"), torch.device("cpu"))
    entries = [prepare_model(bb, v) for v in ("conv", "acb")]
    imgs = [Image.new("RGB", (64, 64), c) for c in ((200, 30, 30), (30, 30, 200))]
    a = analyze(imgs, bb, entries, layers=["layer3", "layer4"], erf=False, redundancy=False, profile=True,
                latency_repeats=2, latency_warmup=0)  # cheap latency settings
    # the cost cache is keyed by the latency settings: the same profile is read back, not re-timed
    assert cached_profile(entries[1].model, 64, device="cpu", latency=True, repeats=2, warmup=0) is a.models[1].cost
    write_report(a, tmp_path, mode="global")
    page = (tmp_path / "report.html").read_text()
    d = json.loads((tmp_path / "report.json").read_text())
    heading = re.search(r"<h2>(Grad-CAM[^<]*)</h2>", page).group(1)
    assert "global colour scale" in heading and "shared" not in heading
    assert "showing image 1 of 2" in heading and "showing image 1 of 2" in page.split("Variant taps")[1][:80]
    acb = {m["variant"]: m for m in d["models"]}["acb"]
    assert acb["deploy"]["params"] is not None
    assert "deploy form (ACB fused)" in page and f"{acb['deploy']['params'] / 1e6:.3f} M params" in page
    assert f"{acb['deploy']['flops'] / 1e9:.3f} GFLOPs" in page
    assert page.count("Σ layers ") >= 2 and "median of 2 after 0 warm-up" in page
    assert page.count("* plotly.js v") <= 1 and '<script src="http' not in page
    per_panel = render_html(a, d, tmp_path, mode="per-panel")
    assert "per-panel colour scale" in re.search(r"<h2>(Grad-CAM[^<]*)</h2>", per_panel).group(1)
