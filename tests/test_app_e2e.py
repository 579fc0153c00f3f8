"""End to end: launch ``build_demo`` on 127.0.0.1 and call ``/analyze`` through gradio_client.

A real photo from assets/ goes through the queue (the UI's route), every output comes back
well-formed, and the queue bypass ``/gradio_api/run/analyze`` is closed (404).
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import app  # noqa: E402

PHOTO = ROOT / "assets" / "coffee.jpg"
VARIANTS = ["conv", "saconv"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    mp = pytest.MonkeyPatch()
    for k, v in {"GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(tmp / "gr"),
                 "GRADIO_EXAMPLES_CACHE": str(tmp / "ex"), "NO_PROXY": "127.0.0.1,localhost",
                 "no_proxy": "127.0.0.1,localhost"}.items():
        mp.setenv(k, v)
    cfg = app.AppConfig(backbones=("resnet18", "efficientnet_lite0"), default_backbone="resnet18",
                        default_weights="random", default_variants=tuple(VARIANTS), input_size=64,
                        weights_dir=tmp / "weights", profile_repeats=2, profile_warmup=1,
                        queue_max_size=4, max_file_size="2mb")
    app.MODELS.clear()  # fresh models: no latency measured by earlier tests in this process
    demo = app.build_demo(cfg)
    _, url, _ = app.launch(demo, prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    from gradio_client import Client

    client = Client(url, verbose=False, analytics_enabled=False, download_files=str(tmp / "dl"))
    try:
        yield url, client
    finally:
        client.close()
        demo.close()
        mp.undo()


def test_named_endpoints(served):
    _, client = served
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/analyze", "/maps", "/profile", "/calibrate"} <= names


def test_analyze_through_the_client(served):
    from gradio_client import handle_file

    _, client = served
    preset = app.preset_choices("resnet18")[0]
    out = client.predict(handle_file(str(PHOTO)), "resnet18", "random", VARIANTS, preset, app.ALL_STAGES,
                         "per panel", "cpu", True, api_name="/analyze")
    assert len(out) == len(app.ANALYZE_OUTPUTS)
    got = dict(zip(app.ANALYZE_OUTPUTS, out))
    assert got["status"].startswith("Analysed 2 models on resnet18")
    assert got["overview"].count('class="pc-card"') == 2
    # images come back as downloaded files that really are pictures
    from PIL import Image

    # the Redundancy and Receptive field figures come from /maps (the page calls it when a tab opens)
    assert all(got[k] is None for k in app.MAP_OUTPUTS)
    maps = client.predict(got["report_id"], "all", api_name="/maps")
    assert len(maps) == len(app.MAP_OUTPUTS)
    got.update(dict(zip(app.MAP_OUTPUTS, maps)))
    for key in ("gradcam", "taps", "erf"):
        path = got[key]
        assert path and Path(path).is_file(), key
        with Image.open(path) as im:
            assert im.size[0] > 50 and im.size[1] > 50
    # tables: {"headers", "data"}
    for key, first_col in (("summary", "model"), ("erf_table", "model"), ("profile_table", "model"),
                           ("taps_table", "model")):
        table = got[key]
        assert table["headers"][0] == first_col, key
        assert table["data"], key
    assert [row[0] for row in got["summary"]["data"]] == VARIANTS
    # plots: {"type": "plotly", "plot": "<figure JSON>"}
    for key in ("redundancy", "similarity", "cka", "profile_summary", "profile_params", "profile_flops"):
        plot = got[key]
        assert plot["type"] == "plotly", key
        assert json.loads(plot["plot"])["data"], key
    assert got["profile_latency"] is None and "open the **Profile** tab" in got["status"]  # timed on demand
    # the first click gives report.json; /prepare_downloads adds report.html, the figures and a zip
    assert [Path(p).name for p in got["downloads"]] == ["report.json"]
    report = json.loads(Path(got["downloads"][0]).read_text())
    assert [m["label"] for m in report["models"]] == VARIANTS
    assert report["models"][1]["provenance"] and set(report["models"][1]["provenance"].values()) == {"exact"}
    files = client.predict(got["report_id"], api_name="/prepare_downloads")
    names = {Path(p if isinstance(p, str) else p["path"]).name for p in files}
    assert {"report.json", "report.html", "plugconv-report.zip", "gradcam.png"} <= names
    # the Profile endpoint times the models; the latency chart appears
    prof = client.predict("resnet18", "random", VARIANTS, preset, "cpu", True, api_name="/profile")
    assert "not measured" not in prof[0]
    lat = prof[1 + app.PROFILE_OUTPUTS.index("profile_latency")]
    assert lat["type"] == "plotly" and json.loads(lat["plot"])["data"]


def test_user_error_comes_back_readable(served):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    _, client = served
    with pytest.raises(AppError) as excinfo:
        client.predict(handle_file(str(PHOTO)), "resnet18", "random", ["conv", "nosuchconv"],
                       app.preset_choices("resnet18")[0], app.ALL_STAGES, "per panel", "cpu", True,
                       api_name="/analyze")
    assert "nosuchconv" in str(excinfo.value)


def test_queue_bypass_is_closed(served):
    url, _ = served
    req = urllib.request.Request(url.rstrip("/") + "/gradio_api/run/analyze", data=b'{"data": []}',
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as excinfo:
        urllib.request.urlopen(req, timeout=10)
    assert excinfo.value.code == 404
