"""Plotly figure builders: built from real outputs of viz.cost / viz.redundancy on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from torch import nn

import plugconv
from viz.charts import (
    cka_heatmap,
    cost_by_layer,
    cost_summary,
    flops_chart,
    latency_chart,
    params_chart,
    redundancy_by_depth,
    similarity_grid,
    similarity_heatmap,
)
from viz.cost import profile_model
from viz.redundancy import cka_matrix, redundancy_metrics, summary


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.block(self.stem(x))), 1))


@pytest.fixture(scope="module")
def profiles():
    torch.manual_seed(0)
    base = Tiny().eval()
    acb = plugconv.swap_convs(base, "acb", include="block.0", probe_size=16).model
    return {
        "conv": profile_model(base, 16, warmup=0, repeats=2, threads=1),
        "acb": profile_model(acb, 16, warmup=0, repeats=2, threads=1),
    }


def _roundtrip(fig: go.Figure) -> dict:
    s = fig.to_json()
    return json.loads(s)


@pytest.mark.parametrize("metric", ["latency", "params", "flops", "macs"])
@pytest.mark.parametrize("kind", ["bar", "line"])
def test_cost_by_layer(profiles, metric, kind):
    fig = cost_by_layer(profiles, metric, kind=kind)
    assert isinstance(fig, go.Figure)
    assert [t.name for t in fig.data] == ["conv", "acb"]
    assert all(isinstance(t, go.Bar if kind == "bar" else go.Scatter) for t in fig.data)
    names = [r["name"] for r in profiles["conv"]["units"]]
    assert list(fig.data[0].x) == names
    key = {"latency": "latency_ms", "params": "params", "flops": "flops", "macs": "macs"}[metric]
    assert list(fig.data[1].y) == [r[key] for r in profiles["acb"]["units"]]
    assert fig.layout.height == 420
    d = _roundtrip(fig)
    assert len(d["data"]) == 2
    if metric == "latency":
        assert "median of 2" in fig.layout.title.text and "hook overhead" in fig.layout.title.text
        assert fig.data[0].error_y.array is not None
    if metric == "params":
        # the ACB block has 3 convs + 3 BNs where the baseline has 1 conv
        i = names.index("block.0")
        assert fig.data[1].y[i] == 8 * 8 * (9 + 3 + 3) + 3 * 16
        assert "params" in fig.data[1].customdata[i]


def test_wrappers_and_bad_arguments(profiles):
    assert latency_chart(profiles).data[0].name == "conv"
    assert params_chart(profiles, kind="line").data[0].mode == "lines+markers"
    f = flops_chart(profiles, unit="FLOPs")
    m = flops_chart(profiles, unit="MACs")
    assert f.data[0].y[0] == 2 * m.data[0].y[0]
    assert "partial" in f.layout.title.text
    with pytest.raises(ValueError, match="metric"):
        cost_by_layer(profiles, "watts")
    with pytest.raises(ValueError, match="unit"):
        flops_chart(profiles, unit="GMac")
    with pytest.raises(ValueError, match="profile_model"):
        cost_by_layer({"x": {"params": 1}}, "params")
    s = cost_summary(profiles, height=300)
    assert len(s.data) == 3 and s.layout.height == 300
    _roundtrip(s)


def _redundancy(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "stem": redundancy_metrics(torch.relu(torch.randn(2, 8, 8, 8, generator=g))),
        "block": summary(redundancy_metrics(torch.relu(torch.randn(2, 8, 4, 4, generator=g)))),
    }


def test_redundancy_by_depth():
    data = {"conv": _redundancy(0), "scconv": _redundancy(1)}
    keys = ("near_duplicate_fraction", "erank_ratio", "pr_ratio")
    fig = redundancy_by_depth(data, keys, height_per_row=200)
    assert len(fig.data) == 2 * len(keys)
    assert {t.name for t in fig.data} == {"conv", "scconv"}
    assert list(fig.data[1].y) == [data["conv"][n]["erank_ratio"] for n in ("stem", "block")]
    assert "τ = 0.9" in fig.layout.title.text and fig.layout.height == 200 * 3 + 80
    # the block layer has M = 32 < 10·C′ → the warning reaches the hover text
    assert any("⚠" in c for c in fig.data[0].customdata)
    _roundtrip(fig)
    with pytest.raises(ValueError, match="unknown redundancy"):
        redundancy_by_depth(data, ("bogus",))


def test_cka_heatmap():
    g = torch.Generator().manual_seed(2)
    base = {"s1": torch.randn(6, 4, 4, 4, generator=g), "s2": torch.randn(6, 8, 2, 2, generator=g)}
    var = {"s1": base["s1"] * 3, "s2": torch.randn(6, 8, 2, 2, generator=g)}
    cka = cka_matrix(base, var, mode="positions")
    fig = cka_heatmap(cka, height=350)
    (hm,) = fig.data
    assert isinstance(hm, go.Heatmap) and hm.zmin == 0 and hm.zmax == 1
    assert list(hm.x) == ["s1", "s2"] and list(hm.y) == ["s1", "s2"]
    assert hm.z[0][0] == pytest.approx(1.0) and hm.z[0][1] is None  # unequal h×w → undefined
    assert hm.text[0][1] == "n/a"
    assert "unbiased" in fig.layout.title.text and fig.layout.height == 350
    _roundtrip(fig)


def test_similarity_heatmaps():
    x = torch.randn(2, 1, 5, 5)
    acts = torch.cat([x, -x, torch.randn(2, 2, 5, 5), torch.zeros(2, 1, 5, 5)], dim=1)
    res = redundancy_metrics(acts)
    fig = similarity_heatmap(res["similarity"])
    (hm,) = fig.data
    assert hm.zmid == 0 and hm.zmin == -1 and hm.zmax == 1
    assert hm.z[0][1] == pytest.approx(-1.0)
    assert np.isnan(hm.z[4][4])  # dead channel: NaN → gap
    assert hm.colorscale[0][1] != hm.colorscale[-1][1]
    sent = _roundtrip(fig)["data"][0]["z"]  # what the browser gets: a typed array (plotly.js decodes it)
    if isinstance(sent, dict):
        import base64

        shape = tuple(int(v) for v in str(sent["shape"]).split(","))
        sent = np.frombuffer(base64.b64decode(sent["bdata"]), dtype=np.dtype(sent["dtype"])).reshape(shape)
    sent = np.asarray(sent, dtype=float)
    assert np.isnan(sent[4][4]) and sent[0][1] == pytest.approx(-1.0)
    unsigned = similarity_heatmap(np.asarray(res["similarity"]["matrix"]), signed=False)
    assert unsigned.data[0].zmin == 0 and unsigned.data[0].z[0][1] == pytest.approx(1.0)
    grid = similarity_grid({"conv": res["similarity"], "acb": res["similarity"]["matrix"]})
    assert len(grid.data) == 2 and [t.showscale for t in grid.data] == [False, True]
    _roundtrip(grid)
    with pytest.raises(ValueError, match="square"):
        similarity_heatmap(np.zeros((2, 3)))


def test_large_similarity_matrices_are_subsampled_and_labelled():
    from viz.charts import subsample_square

    k = 300
    z = np.add.outer(np.arange(k), 1000 * np.arange(k)).astype(float)  # z[i, j] = i + 1000 j: positions readable
    sub, kept, step = subsample_square(z, None, 128)
    assert step == 3 and kept == list(range(0, k, 3)) and sub.shape == (100, 100)
    assert sub[5, 7] == 15 + 1000 * 21  # exact entries of the principal sub-matrix, no averaging
    same, kept_all, one = subsample_square(z[:128, :128], list(range(10, 138)), 128)
    assert one == 1 and kept_all[0] == 10 and same.shape == (128, 128)
    with pytest.raises(ValueError, match="max_shown"):
        subsample_square(z, None, 0)
    sim = {"matrix": np.clip(z / z.max(), -1, 1), "channels": list(range(k)), "centred": True}
    fig = similarity_heatmap(sim)
    (hm,) = fig.data
    assert len(hm.z) == 100 and list(hm.x)[:3] == ["0", "3", "6"]
    assert "every 3rd channel: 100 of 300 shown" in fig.layout.title.text
    grid = similarity_grid({"conv": sim, "small": np.eye(4)})
    assert [len(t.z) for t in grid.data] == [100, 4]
    titles = [a.text for a in grid.layout.annotations]
    assert titles[0] == "conv (every 3rd channel: 100 of 300 shown)" and titles[1] == "small"
    assert len(similarity_heatmap(sim, max_shown=None).data[0].z) == k


def test_cost_summary_says_when_latency_is_not_measured(profiles):
    untimed = {k: {**p, "latency": None} for k, p in profiles.items()}
    fig = cost_summary(untimed)
    assert all(v is None for v in fig.data[2].y)
    assert any("not measured yet" in (a.text or "") for a in fig.layout.annotations)
    timed = cost_summary(profiles)
    assert not any("not measured" in (a.text or "") for a in timed.layout.annotations)


def test_building_figures_and_report_does_not_import_pyplot(tmp_path):
    """Figures are built with matplotlib's object API (thread-safe); pyplot's global state is never
    imported. Run in a fresh interpreter so other tests' imports do not mask it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = f"""
import sys, torch
from PIL import Image
from torchvision.models import resnet18
from plugconv.backbones import Backbone, WeightsInfo
from viz.analysis import analyze
from viz.models import prepare_model
from viz.report import write_report
torch.manual_seed(0)
bb = Backbone("resnet18", resnet18(num_classes=10).eval(), 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
              tuple(f"c{{i}}" for i in range(10)), WeightsInfo("random", None, None, "test"), torch.device("cpu"))
entries = [prepare_model(bb, v) for v in ("conv", "saconv", "acb")]
a = analyze([Image.new("RGB", (32, 32), (90, 140, 30))], bb, entries, erf=True, redundancy=True, profile=True,
            latency=False)
write_report(a, {str(tmp_path)!r}, mode="global")
import viz.figures, viz.charts
assert "matplotlib" in sys.modules, "the figures were not built with matplotlib"
print("PYPLOT", "matplotlib.pyplot" in sys.modules)
"""
    r = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(root), "MPLBACKEND": "agg"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "PYPLOT False" in r.stdout, r.stdout
    assert (tmp_path / "figures" / "gradcam.png").is_file() and (tmp_path / "report.html").is_file()
