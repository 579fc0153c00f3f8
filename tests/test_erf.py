"""Effective receptive field: analytic supports, truncated forward, RepLKNet area ratios, radial profile."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from viz.erf import (
    area_ratios,
    effective_receptive_field,
    log_scale,
    radial_profile,
    support,
    truncated_forward,
)


def _positive(conv: nn.Conv2d) -> nn.Conv2d:
    with torch.no_grad():
        conv.weight.uniform_(0.1, 1.0)
    return conv


def _box(m: np.ndarray) -> tuple[int, int, int, int]:
    rs, cs = support(m)
    return rs.start, rs.stop, cs.start, cs.stop


def test_single_3x3_conv_support_is_3x3():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)  # random signed weights
    x = torch.randn(2, 3, 21, 21)
    r = effective_receptive_field(conv, "", x, grad_rule="abs")
    assert _box(r.mean_map) == (9, 12, 9, 12)  # rows/cols 10 ± 1
    assert (r.mean_map[9:12, 9:12] > 0).all()
    assert r.n_images == 2 and r.feature_hw == (21, 21)
    pos = effective_receptive_field(_positive(nn.Conv2d(3, 4, 3, padding=1, bias=False)), "", x.abs() + 0.1)
    assert _box(pos.mean_map) == (9, 12, 9, 12) and (pos.mean_map[9:12, 9:12] > 0).all()


def test_dilated_conv_has_holes():
    conv = _positive(nn.Conv2d(3, 2, 3, padding=2, dilation=2, bias=False))
    r = effective_receptive_field(conv, "", torch.rand(1, 3, 15, 15) + 0.1)
    nz = set(map(tuple, np.argwhere(r.mean_map > 0)))
    assert nz == {(7 + dy, 7 + dx) for dy in (-2, 0, 2) for dx in (-2, 0, 2)}


def test_stack_matches_analytic_support_and_truncation():
    torch.manual_seed(0)

    class Never(nn.Module):
        def forward(self, x):  # the truncated forward must never reach this
            raise AssertionError("ran past the chosen stage")

    net = nn.Sequential(
        _positive(nn.Conv2d(3, 4, 3, padding=1, bias=False)), nn.ReLU(),
        _positive(nn.Conv2d(4, 4, 3, padding=1, bias=False)), nn.ReLU(),
        _positive(nn.Conv2d(4, 4, 5, padding=4, dilation=2, bias=False)),
        Never(),
    )
    r = effective_receptive_field(net, "4", torch.rand(1, 3, 31, 31) + 0.1)
    # r = 1 + 2 + 2 + (2·(5−1)+1 − 1) = 13: rows/cols 15 ± 6, all filled
    assert _box(r.mean_map) == (9, 22, 9, 22)
    assert (r.mean_map[9:22, 9:22] > 0).all()
    with pytest.raises(KeyError, match="layer 'nope' not found"):
        truncated_forward(net, "nope", torch.zeros(1, 3, 8, 8))


def test_area_ratios_known_answers():
    d = np.ones((21, 21))
    got = area_ratios(d)
    # squares 3², 5², … over 441: first side with share > t
    assert got[0.2] == (11, 121 / 441)   # 81/441 = 0.18, 121/441 = 0.27
    assert got[0.3] == (13, 169 / 441)   # 121/441 = 0.27, 169/441 = 0.38
    assert got[0.5] == (15, 225 / 441)   # 169/441 = 0.38, 225/441 = 0.51
    assert got[0.99] is None             # i stops at ⌊H/2⌋−1 = 9 (side 19 holds 361/441)
    delta = np.zeros((21, 21))
    delta[10, 10] = 5.0
    assert area_ratios(log_scale(delta))[0.99] == (3, 9 / 441)  # the smallest square is 3×3
    assert area_ratios(np.zeros((5, 5)))[0.2] is None
    np.testing.assert_allclose(log_scale(np.array([[0.0, 9.0], [99.0, 0.0]])), [[0, 0.5], [1, 0]])


def test_radial_profile_known_answers():
    delta = np.zeros((11, 11))
    delta[5, 5] = 1.0
    p = radial_profile(delta)
    assert p["r50"] == 0 and p["r90"] == 0 and p["profile"][0] == 1.0
    ring = np.zeros((11, 11))
    ring[5, 5] = 1.0
    ring[5, 9] = ring[5, 1] = ring[1, 5] = ring[9, 5] = 1.0  # four pixels at r = 4
    p = radial_profile(ring)
    assert p["r50"] == 4 and p["r90"] == 4 and p["cumulative"][0] == pytest.approx(0.2)
    assert p["r90_frac"] == pytest.approx(4 / 5.5)


def test_erf_from_maps_matches_effective_receptive_field():
    from viz.erf import contribution_maps, erf_from_maps

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    x = torch.randn(3, 3, 17, 17)
    ref = effective_receptive_field(net, "2", x, batch_size=2)
    maps = torch.cat([contribution_maps(net, "2", x[i:i + 2])[0] for i in (0, 2)])
    got = erf_from_maps(maps, "2", (17, 17), (17, 17))
    assert np.array_equal(got.mean_map, ref.mean_map) and got.ratios == ref.ratios and got.n_images == 3
    nan = maps.clone()
    nan[1, 0, 0] = float("nan")
    skipped = erf_from_maps(nan, "2", (17, 17), (17, 17))
    assert skipped.n_images == 2 and skipped.skipped == 1
    np.testing.assert_allclose(skipped.mean_map, ((maps[0] + maps[2]) / 2).numpy())
    with pytest.raises(ValueError, match="unknown grad_rule 'x'"):
        contribution_maps(net, "2", x, grad_rule="x")
