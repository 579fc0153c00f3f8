"""``python app.py`` itself starts (the README's first command) on a machine with no cached
weights and no network: it serves the page, starts on the bundled efficientnet_lite0 and says so."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, str]:
    try:
        with _NO_PROXY.open(url, timeout=5) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, ""


@pytest.mark.timeout(240)
def test_python_app_py_starts_offline_on_the_bundled_model(tmp_path: Path) -> None:
    port = _free_port()
    torch_home = tmp_path / "torch"
    torch_home.mkdir()
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1",
           "TORCH_HOME": str(torch_home), "HF_HUB_OFFLINE": "1", "PLUGCONV_OFFLINE": "1",
           "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(tmp_path / "gr"),
           "GRADIO_EXAMPLES_CACHE": str(tmp_path / "ex"), "PLUGCONV_CACHE": str(tmp_path / "cal"),
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost", "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "app.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        status = None
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"app.py exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            try:
                status, _ = _get(base + "/")
            except OSError:
                status = None
            if status == 200:
                break
            time.sleep(1)
        assert status == 200, f"no answer on {base} within 120 s:\n{log.read_text()[-3000:]}"
        code, body = _get(base + "/config")
        assert code == 200
        config = json.loads(body)
        comps = {c.get("props", {}).get("elem_id"): c for c in config["components"]}
        assert comps["backbone"]["props"]["value"] == "efficientnet_lite0"
        note = comps["offline-note"]["props"]["value"]
        assert "bundled offline model efficientnet_lite0" in note and "download" in note
        assert str(torch_home) not in note  # no server path in the page
        assert str(torch_home) in log.read_text()  # ... it is in the server log
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
