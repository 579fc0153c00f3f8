"""App callbacks called as plain functions on a small model (resnet18, random weights, 64 px).

One analysis (baseline + two variants) is shared by the output checks; errors the user can cause
must come back as ``gr.Error`` with the library's readable message.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import gradio as gr
import pandas as pd
import plotly.graph_objects as go
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import app  # noqa: E402

PHOTO = ROOT / "assets" / "chelsea.jpg"
VARIANTS = ["conv", "saconv", "scconv"]


def small_config(tmp_path: Path, **kw) -> app.AppConfig:
    base = dict(
        backbones=("resnet18", "efficientnet_lite0"), default_backbone="resnet18", default_weights="random",
        default_variants=tuple(VARIANTS), input_size=64, weights_dir=tmp_path / "weights",
        profile_repeats=2, profile_warmup=1, calibration_dir=tmp_path / "calibrated",
        calibration_options=(("steps", 2), ("crop", 64), ("samples", 4), ("eval_samples", 2), ("batch_size", 4)),
    )
    base.update(kw)
    return app.AppConfig(**base)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> app.AppConfig:
    root = tmp_path_factory.mktemp("app")
    (root / "weights").mkdir()
    return small_config(root)


@pytest.fixture(scope="module")
def fast(cfg) -> app.AppConfig:
    """The same app without the optional phases (ERF, redundancy, profile): for error and cache tests."""
    import dataclasses

    return dataclasses.replace(cfg, erf=False, redundancy=False, profile=False)


@pytest.fixture(scope="module")
def panels(cfg, tmp_path_factory):
    """One /analyze call's outputs, by name."""
    import os

    os.environ.setdefault("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))
    preset = app.preset_choices("resnet18")[0]
    out = app.analyze_panels(cfg, str(PHOTO), "resnet18", "random", VARIANTS, preset, app.ALL_STAGES,
                             next(iter(app.SCALE_MODES)), "cpu")
    assert len(out) == len(app.ANALYZE_OUTPUTS)
    return dict(zip(app.ANALYZE_OUTPUTS, out))


def test_import_and_build_are_cheap(tmp_path):
    # importing and building the UI loads no model (models are prepared lazily on the first request)
    app.MODELS.clear()
    app.BACKBONES.clear()
    demo = app.build_demo(small_config(tmp_path))
    assert isinstance(demo, gr.Blocks)
    assert len(app.MODELS) == 0 and len(app.BACKBONES) == 0
    assert not hasattr(app, "demo")  # no module-level demo: the server starts only under __main__
    # the named endpoints exist, and the queue is configured closed to the /run bypass
    names = {d.api_name for d in demo.fns.values()}
    assert {"analyze", "profile", "calibrate", "prepare_downloads"} <= names
    assert demo.api_open is False


def test_lru_cache_bounds_builds_once_and_retries_failures():
    cache = app.LRUCache(maxsize=2)
    calls = []

    def make(v):
        def f():
            calls.append(v)
            return v
        return f

    assert cache.get("a", make(1)) == 1
    assert cache.get("a", make(99)) == 1  # cached
    cache.get("b", make(2))
    cache.get("a", make(99))  # a becomes most recent
    cache.get("c", make(3))  # evicts b (least recently used)
    assert cache.keys() == ["a", "c"]
    assert calls == [1, 2, 3]

    def boom():
        raise ValueError("nope")

    with pytest.raises(ValueError):
        cache.get("d", boom)
    assert cache.peek("d") is None
    assert cache.get("d", make(4)) == 4  # a failed build caches nothing

    # concurrent requests for one key build it once
    slow_calls = []
    gate = threading.Event()

    def slow():
        slow_calls.append(1)
        gate.wait(5)
        return "x"

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get("e", slow))) for _ in range(4)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join(10)
    assert results == ["x"] * 4 and len(slow_calls) == 1


def test_analyze_outputs_are_well_formed(panels):
    report_files = [Path(p) for p in panels["downloads"]]
    report_json = next(p for p in report_files if p.name == "report.json")
    report = json.loads(report_json.read_text())
    labels = [m["label"] for m in report["models"]]
    assert labels == VARIANTS
    assert report["backbone"] == "resnet18" and report["input_size"] == 64
    # status names the models and the explained class
    assert "3 models" in panels["status"] and report["target"]["labels"][0] in panels["status"]
    # Overview: one card per model with 5 predictions each, cost numbers, provenance words
    html = panels["overview"]
    assert html.count('class="pc-card"') == 3
    assert html.count('class="pc-pred"') == 15
    for m in report["models"]:
        assert len(m["top5"]) == 5
        assert abs(sum(t["prob"] for t in m["top5"])) <= 1.0 + 1e-6
        assert m["params"] > 1e6 and m["flops"] > 0
        assert m["latency_ms"] is None  # latency is timed on demand (Profile tab), not on the first click
    assert html.count("not measured yet") == 3 and "Profile" in panels["status"]
    assert "initialised only" in html  # scconv cannot transfer exactly: the card says so
    # the banner warns about random weights and the merely initialised variant
    assert "Backbone weights are random" in panels["banners"]
    assert "scconv" in panels["banners"] and "perturbed network, not trained" in panels["banners"]
    assert "saconv:" not in panels["banners"]  # exact transfer: no warning
    # summary table: one row per model, params agree with the report
    summary = panels["summary"]
    assert isinstance(summary, pd.DataFrame) and list(summary["model"]) == VARIANTS
    assert summary["params (M)"].tolist() == [round(m["params"] / 1e6, 3) for m in report["models"]]
    # module maps: saconv and scconv have taps, the baseline none
    taps = panels["taps_table"]
    assert set(taps["model"]) == {"saconv", "scconv"}
    assert {"spatial_gate"} <= set(taps["kind"])
    # ERF table: one row per model with area ratios in (0, 1]
    erf = panels["erf_table"]
    assert list(erf["model"]) == VARIANTS
    ratios = erf["area 50%"].dropna()
    assert len(ratios) and ((ratios > 0) & (ratios <= 1)).all()
    # plotly charts serialise to JSON (what gr.Plot sends)
    assert panels["profile_latency"] is None  # nothing timed yet: no empty latency chart
    # the Redundancy and Receptive field tabs are drawn when opened (/maps), not on the click
    assert all(panels[k] is None for k in app.MAP_OUTPUTS)
    for key in ("profile_summary", "profile_params", "profile_flops"):
        fig = panels[key]
        assert isinstance(fig, go.Figure), key
        assert len(fig.data) >= 1, key
        json.loads(fig.to_json())
    # profile table: whole-model rows plus per-layer rows, for every model
    prof = panels["profile_table"]
    assert set(prof["model"]) == set(VARIANTS)
    whole = prof[prof["layer"] == "(whole model)"]
    assert len(whole) == 3 and (whole["params"] > 0).all()
    # saconv adds parameters (the switch and the pre/post context), visible in the table
    by = dict(zip(whole["model"], whole["params"]))
    assert by["saconv"] > by["conv"]
    # the first click writes report.json only; the rest comes with "Prepare downloads"
    assert [p.name for p in report_files] == ["report.json"]
    assert all(p.is_file() for p in report_files)
    assert not (report_json.parent / "report.html").exists()


def test_map_tabs_are_drawn_once_when_opened(panels, monkeypatch):
    rid = panels["report_id"]
    red = app.maps_panels(rid, "redundancy")
    assert set(red) == {"taps", "redundancy", "similarity", "cka"}
    assert red["taps"] and Path(red["taps"]).is_file()
    for key in ("redundancy", "similarity", "cka"):
        fig = red[key]
        assert isinstance(fig, go.Figure) and len(fig.data) >= 1, key
        json.loads(fig.to_json())
    # the similarity matrices are the displayed layer's (the last stage for "all stages")
    assert "layer4" in red["similarity"].layout.title.text
    rf = app.maps_panels(rid, "rf")
    assert set(rf) == {"erf"} and Path(rf["erf"]).is_file()
    # a second opening is served from the cache: nothing is drawn again
    from viz import figures as vf

    def no_redraw(*a, **k):
        raise AssertionError("drawn twice")

    monkeypatch.setattr(vf, "figure_png", no_redraw)
    monkeypatch.setattr(app, "redundancy_charts", no_redraw)
    again = app.maps_panels(rid, "all")
    assert again["taps"] == red["taps"] and again["erf"] == rf["erf"] and again["cka"] is red["cka"]
    for bad_rid, needle in (("", "Run Analyze first"), ("plugconv-nosuch", "no longer kept")):
        with pytest.raises(gr.Error, match=needle):
            app.maps_panels(bad_rid, "rf")
    with pytest.raises(gr.Error, match="unknown tab"):
        app.maps_panels(rid, "nosuch")


def test_prepare_downloads_writes_the_full_report_reusing_the_figures(panels):
    shown = Path(panels["gradcam"])
    before = shown.read_bytes()
    files = [Path(p) for p in app.prepare_downloads(panels["report_id"])]
    names = {p.name for p in files}
    assert {"report.json", "report.html", "plugconv-report.zip", "gradcam.png", "erf.png"} <= names
    assert all(p.is_file() and p.stat().st_size > 0 for p in files)
    assert shown in files and shown.read_bytes() == before  # the figure the page shows, not redrawn
    report = json.loads(next(p for p in files if p.name == "report.json").read_text())
    assert [m["label"] for m in report["models"]] == VARIANTS
    # per-panel PNGs are listed in report.json and exist
    pngs = [g["png"] for m in report["models"] for g in m["gradcam"]]
    assert pngs and all((shown.parent.parent / p).is_file() for p in pngs)
    import zipfile

    with zipfile.ZipFile(next(p for p in files if p.suffix == ".zip")) as z:
        assert {"report.json", "report.html", "figures/gradcam.png"} <= set(z.namelist())
    # the kept copy dropped the activations (memory) but the report still has every number
    kept = app.REPORTS.peek(panels["report_id"])[0]
    assert all(not hasattr(m.record, "activation") for m in kept.models)
    for bad in ("", None, "plugconv-nosuch"):
        with pytest.raises(gr.Error):
            app.prepare_downloads(bad)


def test_gradcam_grid_has_one_column_per_model(panels):
    from viz import figures as vf

    analysis = app.REPORTS.peek(panels["report_id"])[0]
    fig = vf.gradcam_grid(analysis, 0)
    image_axes = [ax for ax in fig.axes if ax.images]
    assert len(image_axes) == len(VARIANTS) * len(analysis.layers)
    xs = sorted({round(ax.get_position().x0, 3) for ax in image_axes})
    ys = sorted({round(ax.get_position().y0, 3) for ax in image_axes})
    assert len(xs) == len(VARIANTS) and len(ys) == len(analysis.layers)
    # the top row names the models left to right, the first column names the layers top to bottom
    top = sorted((ax for ax in image_axes if round(ax.get_position().y0, 3) == ys[-1]), key=lambda a: a.get_position().x0)
    assert [ax.get_title().splitlines()[0] for ax in top] == VARIANTS
    left = sorted((ax for ax in image_axes if round(ax.get_position().x0, 3) == xs[0]), key=lambda a: -a.get_position().y0)
    assert [ax.get_ylabel() for ax in left] == list(analysis.layers)


def test_branch_only_model_gets_a_module_map_panel(fast):
    """ACB exposes only branch taps: the module-map figure draws their energy shares as bars."""
    import numpy as np

    from viz import figures as vf

    preset = app.preset_choices("resnet18")[0]
    out = dict(zip(app.ANALYZE_OUTPUTS, app.analyze_panels(fast, str(PHOTO), "resnet18", "random", ["conv", "acb"],
                                                           preset, "layer4", "per panel", "cpu")))
    taps = app.maps_panels(out["report_id"], "redundancy")["taps"]
    assert taps is not None and Path(taps).is_file()
    analysis = app.REPORTS.peek(out["report_id"])[0]
    acb = analysis.models[1]
    branch = [t for t in acb.taps if t.kind == "branch"]
    assert branch and {t.kind for t in acb.taps} == {"branch"}
    fig = vf.tap_maps(analysis, 0)
    (ax,) = [a for a in fig.axes if a.patches]
    sites, shares = vf._branch_shares(branch)
    # one stacked bar per site, one layer per branch; the stack heights are the energy shares (sum 1)
    assert len(ax.patches) == len(sites) * len(shares)
    tops = np.zeros(len(sites))
    for rect in ax.patches:
        tops[int(round(rect.get_x() + rect.get_width() / 2))] += rect.get_height()
    assert np.allclose(tops, 1.0, atol=1e-6)
    # each share is the branch's squared norm over the site's total
    record_energy = {t.name: t.stats["energy"] for t in branch}
    for site in sites:
        names = [t.name for t in branch if t.site == site]
        tot = sum(record_energy[n] for n in names)
        for t in branch:
            if t.site == site:
                assert abs(t.stats["energy_share"] - record_energy[t.name] / tot) < 1e-9


@pytest.mark.parametrize("key", ["gradcam", "taps", "erf"])
def test_figure_panels_are_images(panels, key):
    path = panels[key] if key == "gradcam" else app.maps_panels(panels["report_id"], "all")[key]
    if path is None:
        pytest.skip("viz.figures not available yet")
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(path).convert("L"), dtype=float)
    assert img.shape[0] > 50 and img.shape[1] > 50
    assert img.std() > 5  # not blank


def test_second_analysis_reuses_cached_models(fast, panels):
    n = len(app.MODELS)
    keys = app.MODELS.keys()
    assert n >= 3
    preset = app.preset_choices("resnet18")[0]
    app.analyze_panels(fast, str(PHOTO), "resnet18", "random", ["conv", "saconv"], preset, "layer4",
                       "per panel", "cpu")
    assert app.MODELS.keys()[:n] != [] and set(keys) <= set(app.MODELS.keys())
    assert len(app.MODELS) == n  # nothing new was built


def _error_message(excinfo) -> str:
    return str(excinfo.value.message if hasattr(excinfo.value, "message") else excinfo.value)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"image_src": None}, "no image"),
        ({"variants": []}, "select at least one variant"),
        ({"variants": ["conv", "nosuchconv"]}, "nosuchconv"),
        ({"backbone": "vgg16"}, "unknown backbone 'vgg16'"),
        ({"weights": "../../etc/passwd"}, "passwd"),
        ({"weights": "/etc/passwd"}, "passwd"),
        ({"weights": "missing.safetensors"}, "missing.safetensors"),
        ({"weights": "sub/../../x.pt"}, "x.pt"),
        ({"preset": "every conv"}, "every conv"),
        ({"layer": "fc"}, "fc"),
        ({"scale": "rainbow"}, "rainbow"),
        ({"device": "tpu"}, "tpu"),
    ],
)
def test_user_errors_become_gr_error(fast, kwargs, needle):
    args = dict(image_src=str(PHOTO), backbone="resnet18", weights="random", variants=["conv"],
                preset=app.preset_choices("resnet18")[0], layer=app.ALL_STAGES, scale="per panel", device="cpu")
    args.update(kwargs)
    with pytest.raises(gr.Error) as excinfo:
        app.analyze_panels(fast, **args)
    assert needle in _error_message(excinfo)


def test_bad_image_files_give_readable_errors(fast, tmp_path):
    preset = app.preset_choices("resnet18")[0]
    html_file = tmp_path / "page.png"
    html_file.write_text("<!DOCTYPE html><html><body>not a picture</body></html>")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(PHOTO.read_bytes()[:2000])
    for path in (html_file, truncated):
        with pytest.raises(gr.Error) as excinfo:
            app.analyze_panels(fast, str(path), "resnet18", "random", ["conv"], preset, app.ALL_STAGES,
                               "per panel", "cpu")
        msg = _error_message(excinfo)
        assert msg and "Traceback" not in msg
    # and the app keeps serving afterwards
    out = app.analyze_panels(fast, str(PHOTO), "resnet18", "random", ["conv"], preset, "layer4", "per panel", "cpu")
    assert "Analysed 1 model" in out[0]


def test_profile_endpoint(cfg):
    preset = app.preset_choices("resnet18")[0]
    # a variant/device change shows params and FLOPs at once and says latency is not measured yet
    cheap = app.profile_panels(cfg, "resnet18", "random", ["conv", "acb"], preset, "cpu", measure_latency=False)
    assert "not measured yet" in cheap[0] and cheap[app.PROFILE_OUTPUTS.index("profile_latency") + 1] is None
    whole_cheap = cheap[-1][cheap[-1]["layer"] == "(whole model)"]
    assert cheap[-1]["latency (ms)"].isna().all() and len(whole_cheap) == 2 and (whole_cheap["params"] > 0).all()
    out = app.profile_panels(cfg, "resnet18", "random", ["conv", "acb"], preset, "cpu")
    assert len(out) == 1 + len(app.PROFILE_OUTPUTS)
    status, *figs, table = out
    assert "2 model" in status and "not measured" not in status
    assert all(isinstance(f, go.Figure) for f in figs)
    assert (table[table["layer"] == "(whole model)"]["latency (ms)"] > 0).all()
    # once measured, the latency is reused by later analyses and cheap refreshes (cached per model)
    again = app.profile_panels(cfg, "resnet18", "random", ["conv", "acb"], preset, "cpu", measure_latency=False)
    assert again[-1]["latency (ms)"].equals(table["latency (ms)"])
    res = dict(zip(app.ANALYZE_OUTPUTS, app.analyze_panels(cfg, str(PHOTO), "resnet18", "random", ["conv", "acb"],
                                                           preset, "layer4", "per panel", "cpu")))
    report = json.loads(Path(res["downloads"][0]).read_text())
    assert all(m["latency_ms"] > 0 for m in report["models"]) and "not measured" not in res["status"]
    assert set(table["model"]) == {"conv", "acb"}
    acb_whole = table[(table["model"] == "acb") & (table["layer"] == "(whole model)")]["params"].item()
    conv_whole = table[(table["model"] == "conv") & (table["layer"] == "(whole model)")]["params"].item()
    assert acb_whole > conv_whole  # ACB's extra 1×3 / 3×1 branches (training form)


def test_calibrate_then_analyze_uses_calibrated_weights(cfg, fast):
    preset = app.preset_choices("resnet18")[0]
    with pytest.raises(gr.Error) as excinfo:
        app.calibrate_panel(cfg, "resnet18", "random", ["conv", "saconv"], preset, "cpu")
    assert "nothing to calibrate" in _error_message(excinfo)
    text, reports = app.calibrate_panel(cfg, "resnet18", "random", ["conv", "scconv"], preset, "cpu")
    assert [r["label"] for r in reports] == ["scconv (calibrated)"]
    assert reports[0]["sites"] and "scconv (calibrated)" in text
    out = dict(zip(app.ANALYZE_OUTPUTS, app.analyze_panels(
        fast, str(PHOTO), "resnet18", "random", ["conv", "scconv"], preset, "layer4", "per panel", "cpu")))
    report = json.loads(Path(next(p for p in out["downloads"] if p.endswith("report.json"))).read_text())
    cal = report["models"][1]
    assert cal["label"] == "scconv (calibrated)"
    assert set(cal["provenance"].values()) == {"calibrated"}
    assert "perturbed network" not in out["banners"]
    # unticking "use calibrated" goes back to the initialised model
    out2 = app.analyze_panels(fast, str(PHOTO), "resnet18", "random", ["scconv"], preset, "layer4", "per panel",
                              "cpu", False)
    assert "perturbed network, not trained" in out2[1]


def test_weights_file_from_the_weights_directory(cfg):
    import torch
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(1)
    sd = {k: v.contiguous() for k, v in torchvision.models.resnet18().state_dict().items()}
    save_file(sd, str(cfg.weights_dir / "mine.safetensors"))
    assert ("file: mine.safetensors", "mine.safetensors") in app.weights_choices(cfg)
    bb = app.get_backbone(cfg, "resnet18", "mine.safetensors", "cpu")
    assert bb.weights.source == "file" and bb.weights.sha256
    assert torch.equal(bb.model.state_dict()["fc.weight"], sd["fc.weight"])
    assert bb.input_size == 64  # the app's size override


def test_trim_freed_memory_is_safe_to_call():
    """glibc's malloc_trim is found on Linux and returns pages without touching live objects."""
    import sys as _sys

    import torch

    keep = torch.ones(1000)
    garbage = [torch.empty(1 << 20) for _ in range(8)]
    del garbage
    app.trim_freed_memory()
    assert float(keep.sum()) == 1000.0
    if _sys.platform.startswith("linux"):
        assert app._MALLOC_TRIM is not None


def test_gradcam_grid_is_drawn_once_with_fixed_margins(panels):
    """The Grad-CAM grid lays itself out (no tight-bbox measuring pass): every axes and the title
    lie inside the figure, and the PNG has the figure's own size."""
    from PIL import Image

    from viz import figures as vf

    analysis = app.REPORTS.peek(panels["report_id"])[0]
    fig = vf.gradcam_grid(analysis, 0)
    assert fig in vf._FIXED_LAYOUT
    png = vf.figure_png(fig)
    import io

    w, h = (fig.get_size_inches() * 100).round().astype(int)
    assert Image.open(io.BytesIO(png)).size == (w, h)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    for artist in [*fig.axes, fig._suptitle]:  # axes with their titles, labels and tick labels
        bb = artist.get_tightbbox(renderer)
        assert bb.x0 >= -1 and bb.y0 >= -1 and bb.x1 <= w + 1 and bb.y1 <= h + 1, artist
    # a grid too narrow for its title (one model, a long class name) falls back to the tight box
    import dataclasses

    one = dataclasses.replace(analysis, models=analysis.models[:1], categories=tuple("x" * 90 for _ in range(1000)))
    narrow = vf.gradcam_grid(one, 0)
    assert narrow not in vf._FIXED_LAYOUT
    title = narrow._suptitle.get_window_extent(FigureCanvasAgg(narrow).get_renderer())
    assert Image.open(io.BytesIO(vf.figure_png(narrow))).size[0] >= title.width  # the title is not cut


def test_map_tab_asked_twice_at_once_is_drawn_once(fast, monkeypatch):
    """Two requests for the same tab of a new analysis (a double click): one draws, the other waits
    for that result; a failed drawing is not cached."""
    import time as _time

    preset = app.preset_choices("resnet18")[0]
    out = dict(zip(app.ANALYZE_OUTPUTS, app.analyze_panels(fast, str(PHOTO), "resnet18", "random", ["conv"],
                                                           preset, "layer4", "per panel", "cpu")))
    calls = []
    real = app.redundancy_charts

    def slow(*a, **k):
        calls.append(1)
        _time.sleep(0.3)
        return real(*a, **k)

    monkeypatch.setattr(app, "redundancy_charts", slow)
    got = []
    threads = [threading.Thread(target=lambda: got.append(app.maps_panels(out["report_id"], "redundancy")))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(got) == 2 and got[0] == got[1] and calls == [1]

    def boom(*a, **k):
        raise ValueError("no data")

    monkeypatch.setattr(app, "redundancy_charts", boom)
    rid2 = dict(zip(app.ANALYZE_OUTPUTS, app.analyze_panels(fast, str(PHOTO), "resnet18", "random", ["conv"],
                                                            preset, "layer4", "per panel", "cpu")))["report_id"]
    with pytest.raises(gr.Error, match="no data"):
        app.maps_panels(rid2, "redundancy")
    monkeypatch.setattr(app, "redundancy_charts", real)
    assert set(app.maps_panels(rid2, "redundancy")) == {"taps", "redundancy", "similarity", "cka"}
