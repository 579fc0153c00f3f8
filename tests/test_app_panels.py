"""Overview panels: per-model analysis errors are shown, not silently dropped; the Overview follows
latency measured later in the Profile tab; the theoretical-RF text keeps the library's label."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import app  # noqa: E402
from tests.corpus import small_app_config  # noqa: E402
from viz import ui  # noqa: E402

PHOTO = ROOT / "assets" / "chelsea.jpg"


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> app.AppConfig:
    return small_app_config(tmp_path_factory.mktemp("panels"), profile_repeats=2, profile_warmup=1)


def test_banners_and_cards_show_model_errors() -> None:
    report = {"weights": {"source": "torchvision"}, "models": [
        {"label": "conv", "variant": "conv", "errors": {}},
        {"label": "scconv", "variant": "scconv", "swapped": ["layer1.0.conv1"],
         "provenance": {"layer1.0.conv1": "exact"},
         "errors": {"redundancy": "RuntimeError: <boom>", "gradcam/layer4": "no gradient"}},
    ]}
    items = ui.banners(report)
    warn = [t for lvl, t in items if lvl == "warn" and "could not be computed" in t]
    assert len(warn) == 1 and warn[0].startswith("scconv:")
    assert "redundancy metrics: RuntimeError" in warn[0] and "Grad-CAM at layer4: no gradient" in warn[0]
    html = ui.banners_html(report)
    assert "&lt;boom&gt;" in html and "<boom>" not in html  # escaped
    card = ui.model_card_html(report["models"][1])
    assert "pc-errors" in card and "redundancy metrics" in card
    assert "pc-errors" not in ui.model_card_html(report["models"][0])


def test_analysis_error_reaches_the_banner(cfg, monkeypatch, tmp_path) -> None:
    """An optional phase that fails inside viz.analysis shows up in the page's banners and card."""
    import viz.redundancy

    def boom(*_a, **_k):
        raise RuntimeError("synthetic redundancy failure")

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gr"))
    monkeypatch.setattr(viz.redundancy, "redundancy_metrics", boom)
    c = dataclasses.replace(cfg, redundancy=True)
    out = dict(zip(app.ANALYZE_OUTPUTS, app.analyze_panels(
        c, str(PHOTO), "resnet18", "random", ["conv"], app.preset_choices("resnet18")[0], app.ALL_STAGES,
        next(iter(app.SCALE_MODES)), "cpu")))
    assert "synthetic redundancy failure" in out["banners"]
    assert "synthetic redundancy failure" in out["overview"]


def test_overview_follows_latency_measured_in_the_profile_tab(cfg, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gr"))
    preset = app.preset_choices("resnet18")[0]
    app.MODELS.clear()
    out = dict(zip(app.ANALYZE_OUTPUTS, app.analyze_panels(
        cfg, str(PHOTO), "resnet18", "random", ["conv"], preset, app.ALL_STAGES, next(iter(app.SCALE_MODES)), "cpu")))
    assert "not measured yet" in out["overview"]
    # nothing measured yet: nothing to update
    skipped = app.refresh_overview(cfg, out["report_id"], "resnet18", "random", ["conv"], preset, "cpu")
    assert all(not isinstance(x, str) for x in skipped)
    app.profile_panels(cfg, "resnet18", "random", ["conv"], preset, "cpu")
    overview, summary = app.refresh_overview(cfg, out["report_id"], "resnet18", "random", ["conv"], preset, "cpu")
    assert "not measured yet" not in overview and " ms</td>" in overview
    assert summary["latency (ms)"].notna().all()
    # the page chains it after the Profile event
    demo = app.build_demo(cfg)
    deps = demo.get_config_file()["dependencies"]
    prof = next(d for d in deps if d.get("api_name") == "profile")
    ref = next(d for d in deps if d.get("api_name") == "refresh_overview")
    assert ref["trigger_after"] == prof["id"] and ref["trigger_only_on_success"]
    overview_id = next(b._id for b in demo.blocks.values() if getattr(b, "elem_id", None) == "overview")
    assert overview_id in ref["outputs"]


def test_offline_note_shows_no_server_path(monkeypatch, tmp_path, caplog) -> None:
    torch_home = tmp_path / "empty-torch-home"
    torch_home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    with caplog.at_level("WARNING", logger="plugconv.app"):
        name, note = app.initial_backbone(app.AppConfig(weights_dir=tmp_path / "w", examples=()))
    assert name == "efficientnet_lite0"
    assert note and "the torch hub cache" in note and ".pth" in note
    assert str(tmp_path) not in note and "/" not in note.split("(", 1)[1].split(")", 1)[0]
    assert str(torch_home) in caplog.text  # the full path stays in the server log
    assert app.public_note("x (a.pth is not in /srv/th/hub/checkpoints); see /srv/data/w.pth") == \
        "x (a.pth is not in the torch hub cache); see w.pth"


def test_theoretical_rf_text_prefers_the_library_label() -> None:
    trf = {"r": 427, "r_clipped": 64, "global": True, "global_via": ["layer1.0.conv2.gap"],
           "label": "427 px local (clipped to 64); global (via layer1.0.conv2.gap)"}
    assert app._theoretical_rf_text(trf) == trf["label"]
    assert "global (via" in app.erf_frame({"models": [{"label": "saconv", "theoretical_rf": trf}]})["theoretical RF"][0]
    assert app._theoretical_rf_text({"r": 99}) == "99 px"  # no label: the number
    assert app._theoretical_rf_text(None) == "–"


def test_weights_dropdown_refreshes_at_page_load(cfg, tmp_path) -> None:
    demo = app.build_demo(cfg)
    weights_id = next(b._id for b in demo.blocks.values() if getattr(b, "elem_id", None) == "weights")
    loads = [fn for fn in demo.fns.values() if any(t[1] == "load" for t in fn.targets)
             and [o._id for o in fn.outputs] == [weights_id]]
    assert len(loads) == 1
    (Path(cfg.weights_dir) / "late.safetensors").write_bytes(b"{}")
    try:
        dd = loads[0].fn()
        assert ("file: late.safetensors", "late.safetensors") in [tuple(c) for c in dd.choices]
    finally:
        (Path(cfg.weights_dir) / "late.safetensors").unlink()


def test_run_history_is_off() -> None:
    assert app.launch_kwargs(app.AppConfig())["run_history"] is False
