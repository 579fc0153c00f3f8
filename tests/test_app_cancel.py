"""Cooperative cancellation: a cancelled analysis stops at its next progress point (it does not run
the remaining models), releases every lock and caches nothing half-built."""

from __future__ import annotations

import asyncio
import inspect
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import app  # noqa: E402
from tests.corpus import small_app_config  # noqa: E402

PHOTO = ROOT / "assets" / "chelsea.jpg"
VARIANTS = ["conv", "acb", "saconv", "scconv"]


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> app.AppConfig:
    return small_app_config(tmp_path_factory.mktemp("cancel"), default_variants=tuple(VARIANTS))


def test_cancelled_analysis_stops_early(cfg, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gr"))
    preset = app.preset_choices("resnet18")[0]
    bb = app.get_backbone(cfg, "resnet18", "random", "cpu")
    entries = [app.get_entry(bb, "random", v, preset) for v in VARIANTS]
    forwards = dict.fromkeys(VARIANTS, 0)
    handles = [e.model.register_forward_pre_hook(lambda m, a, _v=e.variant: forwards.__setitem__(_v, forwards[_v] + 1))
               for e in entries]
    done = threading.Event()
    outcome: list[BaseException | object] = []
    messages: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        task: asyncio.Task | None = None

        def progress(fraction, desc=""):  # what gr.Progress receives, called in the worker thread
            messages.append(desc)
            if desc.startswith("acb: recording"):
                loop.call_soon_threadsafe(task.cancel)  # the user presses Stop while model 2 starts
                assert app._CANCEL.get().wait(10), "the cancel flag was not set"

        def work():
            try:
                outcome.append(app.analyze_panels(cfg, str(PHOTO), "resnet18", "random", VARIANTS, preset,
                                                  app.ALL_STAGES, next(iter(app.SCALE_MODES)), "cpu",
                                                  progress=progress))
            except BaseException as e:
                outcome.append(e)
                raise
            finally:
                done.set()

        task = asyncio.ensure_future(app.run_cancellable(work))
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        asyncio.run(main())
        assert done.wait(60), "the worker did not stop"
    finally:
        for h in handles:
            h.remove()
    assert len(outcome) == 1 and isinstance(outcome[0], app.Cancelled), outcome
    assert forwards["conv"] >= 1 and forwards["acb"] >= 1
    assert forwards["saconv"] == 0 and forwards["scconv"] == 0, forwards  # the rest never ran
    assert not any(m.startswith(("saconv", "scconv")) for m in messages)
    assert not app.MODELS._building
    for e in entries:
        assert not e.lock.locked()


def test_uncancelled_run_is_unaffected() -> None:
    assert asyncio.run(app.run_cancellable(lambda x: x + 1, 41)) == 42
    app.check_cancelled()  # outside a request: never raises


def test_model_handlers_are_cancellable(cfg) -> None:
    demo = app.build_demo(cfg)
    by_name = {fn.api_name: fn for fn in demo.fns.values()}
    for name in ("analyze", "profile", "profile_cheap", "calibrate"):
        assert inspect.iscoroutinefunction(by_name[name].fn), name
