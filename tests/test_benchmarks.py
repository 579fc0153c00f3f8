"""Smoke test of the benchmark harness: a tiny configuration end to end, JSON schema only.

Timings are never asserted (they belong in ``python -m benchmarks.run``'s table); this checks that
every benchmark runs, produces one well-formed entry, and that the numbers are self-consistent.
"""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import _util
from benchmarks.run import NAMES, Config, format_markdown, format_table, main, run

TINY = {
    "backbone": "resnet18", "size": 64, "variants": ("conv", "acb"), "repeats": 1, "warmup": 0,
    "toolchain_repeats": 1, "toolchain_warmup": 0, "app_warm_calls": 1, "memory_iterations": 2, "latency_repeats": 2,
    "latency_warmup": 1, "calib_variant": "scconv", "calib_images": 2, "calib_size": 64, "calib_steps": 2,
    "quick": True, "app_overrides": {"profile_repeats": 1, "profile_warmup": 0},
}
KEYS = {"name", "value", "unit", "target", "met", "device", "details"}


@pytest.fixture(scope="module")
def tiny_run() -> dict:
    return run(Config(**TINY), echo=lambda s: None)


def test_every_benchmark_has_one_wellformed_entry(tiny_run: dict) -> None:
    results = tiny_run["results"]
    assert [r["name"] for r in results] == sorted((r["name"] for r in results), key=lambda n: [
        "app_cold", "app_warm", "memory", "memory_growth", "recorded_pass_vs_floor", "vs_toolchain",
        "layer_latency_consistency", "calibration"].index(n))
    assert {r["name"] for r in results} == set(NAMES)
    for r in results:
        assert set(r) == KEYS, r["name"]
        assert "error" not in r["details"], (r["name"], r["details"].get("error"))
        assert isinstance(r["value"], float) and math.isfinite(r["value"]), r["name"]
        assert isinstance(r["met"], bool) and isinstance(r["details"], dict)
        assert r["device"] == "cpu" and r["unit"] and r["target"]
        assert "loadavg_end" in r["details"]
    json.dumps(tiny_run)  # JSON-ready throughout


def test_ratios_are_consistent_with_their_medians(tiny_run: dict) -> None:
    by = {r["name"]: r for r in tiny_run["results"]}
    rec = by["recorded_pass_vs_floor"]["details"]
    assert rec["basis"] in ("wall", "cpu")
    assert by["recorded_pass_vs_floor"]["value"] == pytest.approx(rec["median_ours_s"] / rec["median_floor_s"])
    assert set(rec["median_floor_per_model_s"]) == {"conv", "acb"}
    assert rec["median_floor_s"] == pytest.approx(sum(rec["median_floor_per_model_s"].values()))
    assert by["recorded_pass_vs_floor"]["value"] == pytest.approx(rec[f"ratio_{rec['basis']}"])
    tool = by["vs_toolchain"]["details"]
    assert by["vs_toolchain"]["value"] == pytest.approx(tool["median_toolchain_s"] / tool["median_ours_s"])
    assert tool["calls_per_run"] == 2 * 4
    # the same Grad-CAM maps as pytorch-grad-cam, up to OpenCV vs torch bilinear resizing
    assert tool["max_abs_diff"] < 0.1
    app_warm = by["app_warm"]["details"]
    assert app_warm["warm_over_cold"] == pytest.approx(by["app_warm"]["value"] / by["app_cold"]["value"])
    mem = by["memory_growth"]["details"]
    assert mem["reduced"] is True and len(mem["rss_samples_bytes"]) >= 2
    assert by["memory"]["value"] * 1e9 == pytest.approx(by["memory"]["details"]["peak_rss_bytes"])
    assert by["memory"]["details"]["models_cached"] == 2
    cal = by["calibration"]["details"]
    assert cal["reduced"] is True and "REDUCED" in cal["configuration"]
    lat = by["layer_latency_consistency"]["details"]
    assert set(lat["per_model"]) == {"conv", "acb"}
    assert by["layer_latency_consistency"]["value"] == pytest.approx(lat["per_model"][lat["worst_model"]]["rel_diff"])


def test_met_follows_the_target(tiny_run: dict) -> None:
    by = {r["name"]: r for r in tiny_run["results"]}
    assert by["recorded_pass_vs_floor"]["met"] == (by["recorded_pass_vs_floor"]["value"] <= 1.3)
    assert by["vs_toolchain"]["met"] == (by["vs_toolchain"]["value"] >= 3)
    assert by["memory"]["met"] == (by["memory"]["value"] <= 2.5)
    for r in tiny_run["results"]:
        if not r["met"]:
            assert r["details"].get("why"), r["name"]


def test_table_and_cli_selection(tiny_run: dict, tmp_path, capsys) -> None:
    table = format_table(tiny_run)
    md = format_markdown(tiny_run)
    for name in NAMES:
        assert name in table
        assert f"| `{name}` |" in md
    with pytest.raises(ValueError, match="unknown benchmark"):
        run(Config(**TINY, only=("nope",)), echo=lambda s: None)
    out = tmp_path / "b.json"
    assert main(["--quick", "--backbone", "resnet18", "--size", "64", "--variants", "conv", "--repeats", "1",
                 "--only", "layer_latency_consistency", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["name"] for r in data["results"]] == ["layer_latency_consistency"]
    assert data["config"]["quick"] is True and data["machine"]["cores"] >= 1
    assert "layer_latency_consistency" in capsys.readouterr().out


def test_basis_switches_to_cpu_time_under_load() -> None:
    assert _util.basis("cpu", [1e6, 0, 0])[0] == "cpu"
    assert _util.basis("cpu", [0.0, 0, 0])[0] == "wall"
