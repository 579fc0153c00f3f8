"""HTTP-level security checks against the launched app (127.0.0.1 only), with the app's own
``launch()`` settings: file-route traversal, the queue bypass, upload size, monitoring, payload
paths and URLs the server must not read or fetch, and weights names that must not escape the
weights directory."""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

import httpx
import pytest

from tests.corpus import CASES, LaunchedApp, small_app_config

APP_PY = Path(__file__).resolve().parents[1] / "app.py"


@pytest.fixture(scope="module")
def la(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("sec")
    with LaunchedApp(small_app_config(tmp), tmp) as launched:
        yield launched


def _get(la: LaunchedApp, path: str) -> httpx.Response:
    # a fresh connection per request (a 500 from a bad route resets a kept-alive connection)
    return httpx.get(la.url.rstrip("/") + path, trust_env=False, timeout=30)


def _post(la: LaunchedApp, path: str, **kw) -> httpx.Response:
    return httpx.post(la.url.rstrip("/") + path, trust_env=False, timeout=60, **kw)


SECRET_MARKERS = ("root:", "def build_demo", "PATH=", "HOME=")


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("/gradio_api/file=/etc/passwd", {403}),
        ("/gradio_api/file=%2Fetc%2Fpasswd", {403}),
        ("/gradio_api/file=../../etc/passwd", {403, 404}),
        ("/gradio_api/file=..%2F..%2Fetc%2Fpasswd", {403, 404}),
        ("/gradio_api/file=%2E%2E/%2E%2E/etc/passwd", {403, 404}),
        ("/gradio_api/file=/proc/self/environ", {403}),
        ("/gradio_api/file=app.py", {403}),
        (f"/gradio_api/file={APP_PY}", {403}),
        ("/gradio_api/file=.env", {403, 404}),
        ("/file=/etc/passwd", {403, 404}),
        ("/static/../../../etc/passwd", {403, 404}),
        ("/assets/../app.py", {403, 404}),
    ],
)
def test_file_route_does_not_serve_outside_files(la: LaunchedApp, path: str, allowed: set[int]) -> None:
    r = _get(la, path)
    assert r.status_code in allowed, (path, r.status_code, r.text[:200])
    assert not any(m in r.text for m in SECRET_MARKERS)


def test_gradio_temp_dir_itself_is_not_listed(la: LaunchedApp) -> None:
    r = _get(la, f"/gradio_api/file={la.tmp / 'gr'}")
    assert r.status_code in (403, 404)


def test_queue_cannot_be_bypassed(la: LaunchedApp) -> None:
    """api_open=False: POST /gradio_api/run/<api_name> is refused, for every named endpoint."""
    api = la.client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert "/analyze" in api
    for name in api:
        r = _post(la, f"/gradio_api/run{name}", json={"data": []})
        assert r.status_code == 404, (name, r.status_code, r.text[:200])


def test_oversized_upload_is_rejected_with_413(la: LaunchedApp) -> None:
    big = b"\0" * (10 * 1024 * 1024 + 1)  # max_file_size="10mb" = 10485760 bytes
    r = _post(la, "/gradio_api/upload", files={"files": ("big.png", big, "image/png")})
    assert r.status_code == 413, r.text[:200]
    ok = _post(la, "/gradio_api/upload", files={"files": ("small.png", b"\0" * 1000, "image/png")})
    assert ok.status_code == 200
    # uploads land in the Gradio temp dir of this app, under a content hash, never where the user says
    (saved,) = ok.json()
    assert Path(saved).resolve().is_relative_to((la.tmp / "gr").resolve())


def test_client_refuses_oversized_upload_before_sending(la: LaunchedApp, tmp_path: Path) -> None:
    from gradio_client import handle_file

    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (10 * 1024 * 1024 + 1))
    with pytest.raises(ValueError, match="(?i)size"):
        la.client.predict(handle_file(str(big)), api_name="/analyze")


@pytest.mark.parametrize("path", ["/gradio_api/monitoring", "/gradio_api/monitoring/summary", "/monitoring"])
def test_monitoring_is_disabled(la: LaunchedApp, path: str) -> None:
    r = _get(la, path)
    assert r.status_code in (403, 404), (path, r.status_code)


@pytest.mark.parametrize("path", ["/gradio_api/run-history/records", "/gradio_api/run-history/buckets"])
def test_run_history_records_are_not_served(la: LaunchedApp, path: str) -> None:
    """Run history is kept in each user's browser; the server lists no one's runs (needs sign-in)."""
    r = _get(la, path)
    assert r.status_code in (401, 403, 404), (path, r.status_code, r.text[:200])


def _join(la: LaunchedApp, api_name: str, data: list) -> dict:
    """Submit raw data through the queue (what a hand-written HTTP client can send) and return
    the ``process_completed`` message."""
    deps = _get(la, "/config").json()["dependencies"]
    idx = next(i for i, d in enumerate(deps) if d.get("api_name") == api_name)
    sh = "sec" + uuid.uuid4().hex[:10]
    r = _post(la, "/gradio_api/queue/join", json={"data": data, "fn_index": idx, "session_hash": sh,
                                                  "event_data": None})
    assert r.status_code == 200, r.text[:200]
    with httpx.stream("GET", la.url.rstrip("/") + f"/gradio_api/queue/data?session_hash={sh}",
                      trust_env=False, timeout=120) as s:
        for line in s.iter_lines():
            if line.startswith("data:"):
                msg = json.loads(line[5:])
                if msg.get("msg") == "process_completed":
                    return msg
    raise AssertionError("no process_completed message")


@pytest.mark.parametrize(
    "filedata",
    [
        {"path": "/etc/passwd"},
        {"path": str(APP_PY)},
        {"path": "../../../../etc/passwd"},
        {"path": "http://169.254.169.254/latest/meta-data/iam.png"},
        {"path": "x.png", "url": "file:///etc/passwd"},
        {"path": "x.png", "url": "http://127.0.0.1:1/x.png"},
    ],
)
def test_payload_paths_and_urls_are_not_read(la: LaunchedApp, filedata: dict) -> None:
    """A FileData naming a server file (not uploaded) or a URL is refused by the server."""
    api = la.client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/analyze"]
    defaults = [p.get("parameter_default") for p in api["parameters"]]
    msg = _join(la, "analyze", [{**filedata, "meta": {"_type": "gradio.FileData"}}, *defaults[1:]])
    assert msg["success"] is False
    assert not any(m in json.dumps(msg) for m in SECRET_MARKERS)


def test_app_has_no_url_input(la: LaunchedApp) -> None:
    """No text box that could take an image URL: the only image input is a file."""
    for name, ep in la.client.view_api(print_info=False, return_format="dict")["named_endpoints"].items():
        for p in ep["parameters"]:
            label = (p.get("label") or "").lower()
            assert "url" not in label and "link" not in label, (name, p)


def test_server_errors_do_not_leak_internals(la: LaunchedApp) -> None:
    """show_error=False: an unexpected exception reaches the client as a generic error."""
    msg = _join(la, "analyze", [{"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}])
    assert msg["success"] is False
    text = json.dumps(msg)
    assert "Traceback" not in text and "/etc/passwd" not in text and os.getcwd() not in text


# ---- weights: only names inside the weights directory ---------------------------------------------


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "../weights/x.pth", "..", "sub/../../x.pth"])
def test_weights_name_cannot_escape_through_the_api(la: LaunchedApp, name: str) -> None:
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    img = la.tmp / "ok.jpg"
    img.write_bytes(CASES["jpeg_ok"].build())

    with pytest.raises(AppError) as info:
        la.client.predict(handle_file(str(img)), api_name="/analyze", **{la.param_name("Weights"): name})
    assert name in str(info.value) or "not in the list of choices" in str(info.value)


def test_weights_resolution_refuses_traversal_absolute_and_symlinks(la: LaunchedApp, tmp_path: Path) -> None:
    """The app's own resolver (behind the dropdown) with names a crafted request could carry."""
    import gradio as gr

    app = la.module
    wdir = Path(la.cfg.weights_dir)
    outside = tmp_path / "evil.pth"
    outside.write_bytes(b"not weights")
    link = wdir / "link.pth"
    if not link.exists():
        link.symlink_to(outside)
    for name, pattern in [("../evil.pth", r"'\.\.'"), (str(outside), "absolute path"), ("link.pth", "outside the weights directory"),
                          ("missing.pth", "not found")]:
        with pytest.raises(Exception) as info:
            app.resolve_weights(la.cfg, name)
        err = app.to_gr_error(info.value)
        assert isinstance(err, gr.Error)
        assert re.search(pattern, str(err.message)), (name, err.message)
    assert "link.pth" not in [v for _, v in app.weights_choices(la.cfg)]


@pytest.mark.parametrize("url", ["https://public-host.invalid/x.jpg", "http://public-host.invalid/x.png"])
def test_public_url_payload_is_not_fetched(la: LaunchedApp, url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A FileData whose path is a public URL skips Gradio's upload check; the image input refuses it
    before Gradio's downloader runs (no fetch is attempted; the user reads why)."""
    from gradio import processing_utils

    calls: list[str] = []

    async def fake_async_download(u, *a, **k):
        calls.append(u)
        raise AssertionError("the server tried to download a user-given URL")

    def fake_download(u, *a, **k):
        calls.append(u)
        raise AssertionError("the server tried to download a user-given URL")

    monkeypatch.setattr(processing_utils, "async_ssrf_protected_download", fake_async_download)
    monkeypatch.setattr(processing_utils, "ssrf_protected_download", fake_download)
    monkeypatch.setattr(processing_utils, "save_url_to_cache", fake_download)
    api = la.client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/analyze"]
    defaults = [p.get("parameter_default") for p in api["parameters"]]
    msg = _join(la, "analyze", [{"path": url, "meta": {"_type": "gradio.FileData"}}, *defaults[1:]])
    assert calls == []
    assert msg["success"] is False
    assert "URLs are not fetched" in (msg.get("output") or {}).get("error", ""), msg
    # the sync path (used outside routes, e.g. example caching) refuses too
    import gradio as gr

    image = next(b for b in la.demo.blocks.values() if getattr(b, "elem_id", None) == "input-image")
    with pytest.raises(gr.Error, match="URLs are not fetched"):
        image.move_resource_to_block_cache(url)
    assert calls == []


def test_run_history_is_disabled(la: LaunchedApp) -> None:
    """launch(run_history=False): the page records no runs and offers no run-history page."""
    assert _get(la, "/config").json().get("run_history") is False
