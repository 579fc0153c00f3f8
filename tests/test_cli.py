"""``python -m plugconv``: list, swap, error handling (exit 2, one line, no traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from plugconv import get_conv, list_convs
from plugconv.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def _run_module(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "plugconv", *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300
    )


def test_list_json_describes_every_variant(capsys) -> None:
    assert main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list_convs()
    for r in rows:
        cls = get_conv(r["name"])
        assert r["paper"] == cls.paper and r["constraints"] == cls.constraints
        assert r["exact_transfer"] is cls.exact_transfer and r["absorbs_bn"] is cls.absorbs_bn
        assert r["year"] == (cls.year or None)


def test_list_table(capsys) -> None:
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:2] == ["name", "paper"] and "constraints" in lines[0]
    body = lines[2:]
    assert [ln.split()[0] for ln in body] == list_convs()
    acb = next(ln for ln in body if ln.startswith("acb "))
    assert "2019" in acb and "ICCV" in acb


def test_module_entry_point_list_json() -> None:
    proc = _run_module("list", "--json")
    assert proc.returncode == 0, proc.stderr
    assert [r["name"] for r in json.loads(proc.stdout)] == list_convs()


def test_swap_json_acb_resnet18_known_param_count(capsys) -> None:
    assert main(["swap", "--backbone", "resnet18", "--variant", "acb", "--weights", "random", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"backbone", "variant", "swapped", "skipped", "params_before", "params_after", "exact", "provenance"} <= set(out)
    assert out["backbone"] == "resnet18" and out["variant"] == "acb"
    ref = torchvision.models.resnet18(weights=None)
    sites = [n for n, m in ref.named_modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) and n.startswith("layer")]
    assert out["swapped"] == sites and out["skipped"] == []
    assert out["params_before"] == sum(p.numel() for p in ref.parameters()) == 11_689_512
    # ACB adds a k×1 and a 1×k kernel and two affine BNs per site; the host BN moves inside
    extra = sum(6 * m.in_channels * m.out_channels + 4 * m.out_channels for n, m in ref.named_modules() if n in sites)
    assert out["params_after"] == out["params_before"] + extra
    assert out["exact"] is True
    assert out["provenance"]["backbone_weights"]["source"] == "random"
    assert out["provenance"]["sites"] == {s: "exact" for s in sites}


def test_swap_include_exclude_skipped_reasons_and_options(capsys) -> None:
    argv = ["swap", "--backbone", "resnet18", "--variant", "saconv", "--json",
            "--include", "layer2.*", "--exclude", "layer2.1.*", "--option", "aws=False"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["swapped"] == ["layer2.0.conv1", "layer2.0.conv2"]
    assert out["skipped"] == [
        {"site": "layer2.0.downsample.0", "reason": get_conv("saconv").check(torch.nn.Conv2d(64, 128, 1, 2))}
    ]
    assert "kernel_size 1" in out["skipped"][0]["reason"]
    assert out["options"] == {"aws": False}


def test_swap_text_output(capsys) -> None:
    assert main(["swap", "--backbone", "resnet18", "--variant", "spconv", "--include", "layer1.0.conv1"]) == 0
    text = capsys.readouterr().out
    assert "layer1.0.conv1" in text and "initialised" in text and "NOT exact" in text
    assert "params" in text and "->" in text


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["swap", "--backbone", "resnet18", "--variant", "nope"], ["'nope'", "acb", "saconv", "spconv"]),
        (["swap", "--backbone", "resnet5", "--variant", "acb"], ["'resnet5'", "resnet50", "efficientnet_lite0"]),
        (["swap", "--backbone", "resnet18", "--variant", "saconv", "--option", "deform=True"], ["deform"]),
        (["swap", "--backbone", "resnet18", "--variant", "acb", "--option", "novalue"], ["novalue"]),
        (["swap", "--backbone", "resnet18", "--variant", "acb", "--weights", "/nonexistent/w.safetensors"], ["w.safetensors"]),
    ],
)
def test_user_errors_one_line_exit_2(capsys, argv, needles) -> None:
    assert main(argv) == 2
    cap = capsys.readouterr()
    assert cap.out == ""
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1, cap.err
    assert lines[0].startswith("plugconv swap: error: ")
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_default_weights_offline_falls_back_to_the_bundled_model(tmp_path) -> None:
    proc = _run_module(
        "swap", "--backbone", "resnet50", "--variant", "acb", "--weights", "default", "--json",
        env={"PLUGCONV_OFFLINE": "1", "TORCH_HOME": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["backbone"] == "efficientnet_lite0" and out["requested_backbone"] == "resnet50"
    assert out["provenance"]["backbone_weights"]["source"] == "bundled"
    note = out["fallback"]
    assert "resnet50" in note and "efficientnet_lite0" in note and "resnet50-11ad3fa6.pth" in note
    assert out["swapped"] and set(out["provenance"]["sites"].values()) == {"exact"}
    assert "Traceback" not in proc.stderr
    assert f"plugconv swap: note: {note}" in proc.stderr


def test_no_fallback_for_random_weights_or_files(tmp_path, capsys, monkeypatch) -> None:
    from plugconv.cli import swap_summary

    monkeypatch.setenv("PLUGCONV_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    out = swap_summary("resnet18", "acb", weights="random")
    assert out["fallback"] is None and out["backbone"] == "resnet18"
    # an explicit file stays strict even offline with an empty cache: a bad file is an error
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    assert main(["swap", "--backbone", "resnet18", "--variant", "acb", "--weights", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.pth" in err and "note" not in err and "efficientnet_lite0" not in err


def test_default_weights_offline_no_fallback_is_a_readable_error(tmp_path) -> None:
    proc = _run_module(
        "swap", "--backbone", "resnet50", "--variant", "acb", "--weights", "default", "--no-fallback",
        env={"PLUGCONV_OFFLINE": "1", "TORCH_HOME": str(tmp_path)},
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "resnet50" in err[0] and "--weights" in err[0], proc.stderr


def test_no_command_prints_help_and_exits_2(capsys) -> None:
    assert main([]) == 2
    assert "swap" in capsys.readouterr().err


def test_subcommands_are_registered() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    names = set(sub.choices)
    assert {"list", "swap"} <= names
    if (ROOT / "plugconv" / "cli_calibrate.py").is_file():
        assert "calibrate" in names


def _param_table_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("param_table", ROOT / "scripts" / "param_table.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def test_param_table_doc_is_current_and_known_answers() -> None:
    """docs/params.md equals what scripts/param_table.py computes now; exact variants match closed forms."""
    pt = _param_table_module()
    rows, _ = pt.compute_rows()
    doc = pt.parse((ROOT / "docs" / "params.md").read_text())
    assert pt.comparable(doc) == pt.comparable(rows), "docs/params.md is stale: run scripts/param_table.py"
    by = {r["variant"]: r for r in rows}
    assert {r["variant"] for r in rows} >= {"conv (baseline)", *list_convs()} - {"conv"}
    widths = [m.out_channels for n, m in torchvision.models.resnet50().named_modules() if n.endswith("conv2")]
    assert len(widths) == 16 and by["conv (baseline)"]["params"] == 25_557_032
    # saconv: ΔW (9C²) + two C×C contexts with bias + the C→1 switch with bias, per site
    assert by["saconv"]["delta"] == sum(9 * c * c + 2 * (c * c + c) + c + 1 for c in widths)
    # acb: a 3×1 and a 1×3 kernel + two affine BNs per site; fused: a bias (C) replaces the BN affine (2C)
    assert by["acb"]["delta"] == sum(6 * c * c + 4 * c for c in widths)
    assert by["acb (fused, deploy)"]["delta"] == -sum(widths)
