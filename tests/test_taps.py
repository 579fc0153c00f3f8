"""Tap summaries against values recomputed from the recorded tensors, on real swapped ResNet-18s."""

from __future__ import annotations

import pytest
import torch
from torchvision.models import resnet18

from plugconv.surgery import swap_convs
from viz.models import make_analysis_copy
from viz.recorder import Recorder
from viz.taps import SMALL_RULE, acb_fuse_difference, summarize_taps


def _record(variant: str, size: int = 64, **kw):
    torch.manual_seed(0)
    base = resnet18(num_classes=10).eval()
    res = swap_convs(base, variant, include=kw.pop("include", None), probe_size=size)
    model = make_analysis_copy(res.model)
    torch.manual_seed(1)
    x = torch.randn(2, 3, size, size)
    with Recorder(model, layers=["layer4"], taps="*") as rec:
        model(x)
    return model, x, rec.finish(), res


def _by_local(summaries, local):
    return [s for s in summaries if s.local == local]


def test_saconv_switch_true_range_and_small_share():
    model, x, record, res = _record("saconv")
    sums = summarize_taps(record, model)
    sw = _by_local(sums, "switch")
    assert len(sw) == len(res.swapped) > 0
    for s in sw:
        v = record.taps[(s.name, 0)].value
        assert s.stats["share_small"] == pytest.approx(float((v > 0.5).double().mean()))
        assert s.stats["share_small"] + s.stats["share_large"] == pytest.approx(1.0)
        assert s.stats["rule"] == SMALL_RULE
        assert s.min == pytest.approx(float(v.min())) and s.max == pytest.approx(float(v.max()))
        assert s.spatial.shape == (2,) + tuple(v.shape[-2:])  # N×h×w, true values (not squashed)
        torch.testing.assert_close(torch.from_numpy(s.spatial), v[:, 0])
    # SAConv's two branches share energy; shares per site sum to 1
    for site in res.swapped:
        shares = [s.stats["energy_share"] for s in sums if s.site == site and s.local in ("small", "large")]
        assert sum(shares) == pytest.approx(1.0)


def test_scconv_gate_and_mask_informative_fraction():
    model, x, record, res = _record("scconv")
    sums = summarize_taps(record, model)
    masks = _by_local(sums, "sru_mask")
    gates = _by_local(sums, "sru_gate")
    assert masks and gates
    for s in masks:
        v = record.taps[(s.name, 0)].value
        assert s.stats["informative_fraction"] == pytest.approx(float(v.double().mean()))
        per_c = v.double().mean(dim=(0, 2, 3))
        assert s.stats["informative_fraction_per_channel"] == pytest.approx(per_c.tolist(), abs=1e-4)
    for s in gates:
        v = record.taps[(s.name, 0)].value
        assert s.min > 0 and s.max < 1
        assert s.stats["informative_fraction"] == pytest.approx(float((v > 0.5).double().mean()))
        torch.testing.assert_close(torch.from_numpy(s.spatial), v.double().mean(1).float())


def test_spconv_fusion_weights_sum_to_one():
    model, x, record, res = _record("spconv")
    fw = _by_local(summarize_taps(record, model), "fusion_weights")
    assert fw
    for s in fw:
        assert s.stats["mean_beta"] + s.stats["mean_gamma"] == pytest.approx(1.0, abs=1e-5)
        assert 0 < s.stats["mean_beta"] < 1


def test_acb_branch_energy_after_exact_transfer_and_fusion():
    model, x, record, res = _record("acb")
    sums = summarize_taps(record, model)
    for site in res.swapped:
        share = {s.local: s.stats["energy_share"] for s in sums if s.site == site}
        assert share["square"] == pytest.approx(1.0) and share["vertical"] == 0 and share["horizontal"] == 0
    from plugconv.surgery import fuse_model

    diff = acb_fuse_difference(record.logits, fuse_model(model), x)
    assert diff < 1e-4 * float(record.logits.abs().max())


def test_selfcal_channel_attention_note_when_t1_is_1x1():
    model, x, record, res = _record("selfcal", size=112)
    cal = [s for s in summarize_taps(record, model) if s.local == "calibration"]
    lows = {t.site: t.value for t in record.taps.values() if t.local == "low_res"}
    assert cal
    for s in cal:
        one = tuple(lows[s.site].shape[-2:]) == (1, 1)
        assert bool(s.stats.get("channel_attention")) == one
        assert any("channel attention" in n for n in s.notes) == one
    assert any(s.stats.get("channel_attention") for s in cal)  # layer4 at 112 px: 4×4 map, T1 1×1
