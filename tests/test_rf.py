"""Theoretical receptive field: analytic chains, residual branches, ResNet-50, variant notes."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import plugconv
from viz.rf import default_stages, rf_from_layers, theoretical_rf, variant_rf


def _chain_rf(specs):
    """Independent closed form: r = 1 + Σ_i (k_eff,i − 1)·Π_{l<i} s_l."""
    r, j = 1, 1
    for k, s, d in specs:
        r += d * (k - 1) * j
        j *= s
    return r, j


@pytest.mark.parametrize(
    "specs",
    [
        [(3, 1, 1)] * 3,  # 3 stacked 3×3: 7
        [(7, 2, 1), (3, 2, 1), (3, 1, 1)],  # stem-like: r 7, 11, 19; j 2, 4, 4
        [(3, 1, 2), (3, 1, 4), (5, 2, 1), (1, 1, 1)],  # dilations and a 1×1
    ],
)
def test_stack_of_known_convs(specs):
    layers = []
    for k, s, d in specs:
        layers += [nn.Conv2d(4, 4, k, stride=s, dilation=d, padding=d * (k // 2)), nn.BatchNorm2d(4), nn.ReLU()]
    model = nn.Sequential(*layers)
    r, j = _chain_rf(specs)
    out = theoretical_rf(model, None, input_size=512)
    assert out["r"] == r and out["j"] == j
    assert rf_from_layers(specs)["r"] == r
    assert out["global_via"] == [] and not out["global"]
    # hand values for the first two cases
    if specs == [(3, 1, 1)] * 3:
        assert r == 7
    if specs[0] == (7, 2, 1):
        assert r == 19 and j == 4


class _TwoBranch(nn.Module):
    """A residual add of a deep branch (two 3×3) and a shallow one (one 5×5 dilated 2 → 9)."""

    def __init__(self) -> None:
        super().__init__()
        self.a1 = nn.Conv2d(3, 4, 3, padding=1)
        self.a2 = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 5, padding=4, dilation=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.gate = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.a2(self.a1(x)) + self.b(x)  # max(5, 9) = 9
        return y * torch.sigmoid(self.gate(self.pool(y)))  # SE-style gate: global


def test_max_over_branches_and_global_pool_feedback():
    m = _TwoBranch()
    res = theoretical_rf(m, None, input_size=32)
    assert res["r"] == 9
    assert res["global"] and any("global pooling (pool)" in g for g in res["global_via"])
    # before the gate the field is local
    assert theoretical_rf(m, "b", input_size=32)["r"] == 9
    assert theoretical_rf(m, "a2", input_size=32)["r"] == 5
    assert theoretical_rf(m, "a2", input_size=32)["global_via"] == []


def test_groupnorm_is_global_batchnorm_is_local():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Conv2d(4, 4, 3))
    res = theoretical_rf(m, None, input_size=16)
    assert res["r"] == 5 and any("GroupNorm" in g for g in res["global_via"])
    m2 = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3))
    assert theoretical_rf(m2, None, input_size=16)["global_via"] == []


def test_resnet50_layer4_published_value():
    """ResNet-50 (torchvision, stride on the 3×3) layer4, conv-only along the deepest path.

    Hand calculation, r ← r + (k−1)·j, j ← j·s:
      conv1 7×7/2: r = 1 + 6·1 = 7, j = 2;  maxpool 3×3/2: r = 7 + 2·2 = 11, j = 4
      layer1: 3 blocks × one 3×3 at j=4: r = 11 + 3·8 = 35
      layer2: 3×3/2 at j=4: r = 35 + 8 = 43, j = 8; 3 more blocks: r = 43 + 3·16 = 91
      layer3: 3×3/2 at j=8: r = 91 + 16 = 107, j = 16; 5 more: r = 107 + 5·32 = 267
      layer4: 3×3/2 at j=16: r = 267 + 32 = 299, j = 32; 2 more: r = 299 + 2·64 = 427
    (1×1 convs and the 1×1/2 downsample shortcuts add nothing.)
    """
    m = torchvision.models.resnet50()
    res = theoretical_rf(m, "layer4", input_size=224)
    assert res["r"] == 427 and res["j"] == 32
    assert res["r_clipped"] == 224 and "clipped" in res["label"]
    stages = {s["name"]: (s["r"], s["j"]) for s in res["stages"]}
    assert stages["layer1"] == (35, 4)
    assert stages["layer2"] == (91, 8)
    assert stages["layer3"] == (267, 16)
    assert stages["layer4"] == (427, 32)
    assert res["global_via"] == []
    # the logits see the whole image through the global average pool
    assert theoretical_rf(m, None, input_size=224)["global"]
    assert "layer4" in default_stages(m)


@pytest.mark.parametrize(
    "variant,k_local,is_global",
    [("conv", 3, False), ("acb", 3, False), ("saconv", 7, True), ("selfcal", 14, False), ("spconv", 3, True),
     ("scconv", 3, True)],
)
def test_variant_local_contribution(variant, k_local, is_global):
    mod = plugconv.create_conv(variant, 16, 16, 3)
    info = variant_rf(mod)
    assert info["k_local"] == k_local
    assert bool(info["global_via"]) == is_global
    if variant == "saconv":
        assert "3d(k−1)+1" in info["note"] and "5×5" in info["note"]
    if variant == "selfcal":
        assert "r(1+2d) = 12" in info["note"]


def test_swapped_network_rf_and_notes():
    """One SAConv site at layer1.0.conv2 of ResNet-18: +(7−3)·j = +16 over the vanilla value."""
    m = torchvision.models.resnet18()
    base = theoretical_rf(m, "layer1", input_size=224)
    sw = plugconv.swap_convs(m, "saconv", include="layer1.0.conv2", probe_size=64)
    res = theoretical_rf(sw.model, "layer1", input_size=224)
    assert res["r"] == base["r"] + 4 * 4
    assert res["global"] and "SAConv GAP" in res["label"]
    assert [v["site"] for v in res["variants"]] == ["layer1.0.conv2"]
    assert res["variants"][0]["j_in"] == 4


def test_unknown_layer_raises():
    with pytest.raises(ValueError, match="not a module"):
        theoretical_rf(nn.Sequential(nn.Conv2d(3, 3, 3)), "nope", input_size=8)


def test_timm_efficientnet_lite0_traces():
    """timm blocks (BatchNormAct2d, depthwise convs) trace; stages grow monotonically to j = 32."""
    timm = pytest.importorskip("timm")
    m = timm.create_model("efficientnet_lite0", pretrained=False)
    res = theoretical_rf(m, None, input_size=224)
    rs = [s["r"] for s in res["stages"]]
    assert rs == sorted(rs) and res["stages"][0]["name"] == "conv_stem" and res["stages"][0]["r"] == 3
    assert [s["name"] for s in res["stages"] if s["name"].startswith("blocks.")] == [f"blocks.{i}" for i in range(7)]
    assert res["j"] == 32 and res["global"]  # logits: global average pool


@pytest.mark.parametrize("pooling_r,dilation,k_local", [(2, 1, 8), (2, 2, 14), (4, 1, 14)])
def test_selfcal_pooling_r_local_contribution(pooling_r, dilation, k_local):
    """k_local = r(1+2d) + 2d follows ``pooling_r``; the gradient support of a centre output unit
    is at least that and at most r pixels more (the grid-aligned pooled path, analysis.md §2.5)."""
    mod = plugconv.create_conv("selfcal", 16, 16, 3, padding=dilation, dilation=dilation, pooling_r=pooling_r).eval()
    info = variant_rf(mod)
    assert info["k_local"] == k_local
    assert f"r(1+2d) = {pooling_r * (1 + 2 * dilation)}" in info["note"]
    assert not info["global_via"]
    x = torch.randn(1, 16, 64, 64, requires_grad=True)
    y = mod(x)
    c = y.shape[-1] // 2
    y[0, :, c, c].sum().backward()
    g = x.grad.abs().sum((0, 1)) > 0
    rows, cols = g.any(1).nonzero(), g.any(0).nonzero()
    side = max(int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1))
    assert k_local <= side <= k_local + pooling_r
