"""ZeroGPU: the ``spaces.GPU`` functions run in a forked worker whose module state is discarded, so
they must not fill the app's caches; backbones and prepared models are cached before them, in the
main process, and the calibrated entry is inserted there from the returned state."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import app  # noqa: E402
from tests.corpus import small_app_config  # noqa: E402

PHOTO = ROOT / "assets" / "chelsea.jpg"


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> app.AppConfig:
    root = tmp_path_factory.mktemp("zerogpu")
    return small_app_config(root, default_variants=("conv", "scconv"), profile=True, examples=(PHOTO,),
                            profile_repeats=1, profile_warmup=0, calibration_dir=root / "cal",
                            calibration_options=(("steps", 1), ("crop", 64), ("samples", 2), ("eval_samples", 1),
                                                 ("batch_size", 2)))


def _snapshot() -> tuple:
    return (tuple(app.BACKBONES.keys()), tuple(app.MODELS.keys()), tuple(app.REPORTS.keys()))


def _spy(monkeypatch, name: str, seen: list) -> None:
    real = getattr(app, name)

    def wrapper(*args, **kwargs):
        before = _snapshot()
        seen.append((name, before))
        out = real(*args, **kwargs)
        assert _snapshot() == before, f"{name} changed an app cache (lost on ZeroGPU)"
        return out

    monkeypatch.setattr(app, name, wrapper)


def test_gpu_functions_do_not_touch_the_caches(cfg, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gr"))
    seen: list = []
    for name in ("analyze_on_device", "profile_on_device", "calibrate_on_device"):
        _spy(monkeypatch, name, seen)
    app.MODELS.clear()
    app.BACKBONES.clear()
    preset = app.preset_choices("resnet18")[0]
    variants = ["conv", "scconv"]
    app.analyze_panels(cfg, str(PHOTO), "resnet18", "random", variants, preset, app.ALL_STAGES,
                       next(iter(app.SCALE_MODES)), "cpu")
    name, (bbs, models, _) = seen[-1]
    assert name == "analyze_on_device"
    assert len(bbs) == 1 and len(models) == 2  # backbone and both models cached before the passes
    app.profile_panels(cfg, "resnet18", "random", variants, preset, "cpu")
    assert seen[-1][0] == "profile_on_device"
    app.calibrate_panel(cfg, "resnet18", "random", variants, preset, "cpu")
    assert seen[-1][0] == "calibrate_on_device"
    cal = [k for k in app.MODELS.keys() if k[2] == "scconv" and k[4]]  # noqa: SIM118
    assert len(cal) == 1, "the calibrated entry is inserted by the main process"
    assert app.MODELS.peek(cal[0]).label == "scconv (calibrated)"
