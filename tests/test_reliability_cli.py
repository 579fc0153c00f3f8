"""The bad-input corpus through the CLI: ``python -m viz analyze BADFILE ...`` exits 2 with a
one-line message naming the problem (no traceback); the good files all go through one analysis
whose per-image predictions equal a forward pass on ``viz.images.load_image`` of each file."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.corpus import BAD, CASES, GOOD

ROOT = Path(__file__).resolve().parents[1]
CHEAP = ["--backbone", "resnet18", "--weights", "random", "--variants", "conv", "--device", "cpu",
         "--no-erf", "--no-redundancy", "--no-profile", "--quiet"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("cli_corpus")
    return {name: case.write(folder) for name, case in CASES.items()}


def _one_line_error(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize("name", BAD)
def test_bad_file_exits_2_with_one_line(name: str, corpus: dict[str, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from viz.__main__ import main

    rc = main(["analyze", str(corpus[name]), *CHEAP, "--out", str(tmp_path / "out")])
    cap = capsys.readouterr()
    assert rc == 2
    line = _one_line_error(cap.err)
    assert re.search(CASES[name].error, line), line  # type: ignore[arg-type]
    assert not (tmp_path / "out" / "report.json").exists()


@pytest.mark.parametrize("name", ["bomb_20000"])
def test_bad_file_in_a_real_process(name: str, corpus: dict[str, Path], tmp_path: Path) -> None:
    """The same through ``python -m viz`` in a subprocess: exit status 2, one line on stderr."""
    r = subprocess.run([sys.executable, "-m", "viz", "analyze", str(corpus[name]), *CHEAP, "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert re.search(CASES[name].error, _one_line_error(r.stderr))  # type: ignore[arg-type]


@pytest.mark.parametrize(("arg", "pattern"), [("https://example.com/cat.jpg", "URLs are not fetched"),
                                              ("no/such/file.jpg", "file not found: file.jpg")])
def test_urls_and_missing_files(arg: str, pattern: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from viz.__main__ import main

    assert main(["analyze", arg, *CHEAP, "--out", str(tmp_path)]) == 2
    assert re.search(pattern, _one_line_error(capsys.readouterr().err))


def test_one_bad_file_among_good_ones_stops_before_any_model_work(corpus: dict[str, Path], tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from viz.__main__ import main

    rc = main(["analyze", str(corpus["jpeg_ok"]), str(corpus["truncated_png"]), *CHEAP, "--out", str(tmp_path)])
    assert rc == 2
    assert "truncated PNG" in _one_line_error(capsys.readouterr().err)


def test_good_files_reach_the_model_with_the_right_pixels(corpus: dict[str, Path], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """All good corpus files in one CLI analysis; each image's top-5 equals an independent forward
    pass of the same random-weight backbone on load_image(file) (whose pixels test_images checks)."""
    from plugconv.backbones import load_backbone
    from viz.__main__ import main
    from viz.images import load_image

    torch.manual_seed(0)
    files = [str(corpus[n]) for n in GOOD]
    # the CLI builds its own random backbone: give it the same weights through a file so that the
    # reference pass below sees exactly the model the CLI ran
    bb = load_backbone("resnet18", weights="random", device="cpu")
    wfile = tmp_path / "r18.pth"
    torch.save(bb.model.state_dict(), wfile)
    args = [a if a != "random" else str(wfile) for a in CHEAP]
    rc = main(["analyze", *files, *args, "--out", str(tmp_path / "out")])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    (model,) = report["models"]
    per_image = model["top5_per_image"]
    assert len(per_image) == len(files)
    for f, got in zip(files, per_image):
        x, _ = bb.prepare_input(load_image(f))
        with torch.no_grad():
            p = torch.softmax(bb.model(x), -1)[0]
        vals, idx = p.topk(5)
        assert [g["label"] for g in got] == [bb.categories[i] for i in idx.tolist()], f
        assert [g["prob"] for g in got] == pytest.approx(vals.tolist(), rel=1e-4), f
