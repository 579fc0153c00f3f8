"""Grad-CAM: captum oracle (raw signed maps), colour modes and degenerate maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.models import resnet18

from viz.gradcam import cam_from_record, color_limits, gradcam, map_status, upsample
from viz.models import make_analysis_copy
from viz.recorder import Recorder


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return make_analysis_copy(resnet18(num_classes=10))


@pytest.mark.parametrize("layer", ["layer3", "layer4", "layer2.1.conv2"])
def test_matches_captum_layergradcam(model, layer):
    captum_attr = pytest.importorskip("captum.attr")
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    target = 7
    with Recorder(model, layers=[layer]) as rec:
        model(x)
    ours = cam_from_record(rec.finish(target=target), layer)
    oracle = captum_attr.LayerGradCam(model, model.get_submodule(layer)).attribute(x, target=target)
    assert oracle.shape == (2, 1) + tuple(ours.raw.shape[1:])
    ref = oracle[:, 0].detach()
    assert (ref < 0).any(), "the oracle map should be signed (relu_attributions=False)"
    torch.testing.assert_close(ours.raw, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert ours.targets == (target, target)
    torch.testing.assert_close(ours.relu, ref.clamp_min(0), rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_methods_known_answer():
    a = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [0.0, 1.0]]]])  # 1×2×2×2
    g = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]], [[-2.0, 2.0], [0.0, -4.0]]]])
    m, alpha = gradcam(a, g)
    torch.testing.assert_close(alpha, torch.tensor([[1.0, -1.0]]))
    torch.testing.assert_close(m, torch.tensor([[[1.0, 1.0], [3.0, 3.0]]]))
    hires, _ = gradcam(a, g, method="hirescam")
    torch.testing.assert_close(hires, torch.tensor([[[1.0, 4.0], [3.0, 0.0]]]))
    layer, _ = gradcam(a, g, method="layercam")
    torch.testing.assert_close(layer, torch.tensor([[[1.0, 4.0], [3.0, 4.0]]]))
    with pytest.raises(ValueError, match="unknown CAM method 'x'"):
        gradcam(a, g, method="x")


def test_upsample_is_bilinear_align_corners_false():
    m = torch.arange(16.0).reshape(4, 4)
    up = upsample(m, 16)
    ref = F.interpolate(m[None, None], size=(16, 16), mode="bilinear", align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(up, ref)
    assert not np.allclose(up, F.interpolate(m[None, None], size=(16, 16), mode="nearest")[0, 0].numpy())


def test_colour_modes():
    panels = {("a", "l1"): np.array([[-1.0, 2.0]]), ("b", "l1"): np.array([[0.5, -4.0]]),
              ("a", "l2"): np.array([[10.0, 0.0]])}
    group = {k: k[1] for k in panels}
    per = color_limits(panels, mode="per-panel", group=group)
    assert per[("a", "l1")].vmax == 2.0 and per[("a", "l1")].vmin == -2.0 and per[("b", "l1")].vmax == 4.0
    shared = color_limits(panels, mode="shared", group=group)
    assert shared[("a", "l1")].vmax == shared[("b", "l1")].vmax == 4.0 and shared[("a", "l2")].vmax == 10.0
    glob = color_limits(panels, mode="global", group=group)
    assert {v.vmax for v in glob.values()} == {10.0}
    seq = color_limits({k: np.clip(v, 0, None) for k, v in panels.items()}, mode="per-panel", signed=False)
    assert seq[("b", "l1")].vmin == 0.0 and seq[("b", "l1")].vmax == 0.5 and seq[("b", "l1")].cmap == "viridis"
    assert shared[("a", "l1")].cmap == "berlin"  # perceptually uniform diverging (Crameri)
    assert "±4" in shared[("a", "l1")].legend() and "shared" in shared[("a", "l1")].legend()
    with pytest.raises(ValueError, match="unknown colour mode 'local'"):
        color_limits(panels, mode="local")


def test_degenerate_maps_are_labelled_not_stretched():
    neg = np.full((3, 3), -1.0)
    neg[0, 0] = -0.25
    assert map_status(neg, relu=True) == "all values ≤ 0 (max = -0.25)"
    assert map_status(np.full((2, 2), 3.0), relu=False) == "constant (= 3)"
    lim = color_limits({"x": np.zeros((3, 3))}, mode="per-panel", signed=False, raw={"x": neg})["x"]
    assert lim.vmax > 0 and lim.vmax < 1e-9  # guarded, not a division by zero
    assert lim.status.startswith("all values ≤ 0")
    assert "all values ≤ 0" in lim.legend()


@pytest.fixture(scope="module")
def tiny_backbone():
    from plugconv.backbones import Backbone, WeightsInfo

    torch.manual_seed(0)
    net = resnet18(num_classes=10).eval()
    return Backbone("resnet18", net, 64, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                    tuple(f"c{i}" for i in range(10)), WeightsInfo("random", None, None, "test"),
                    torch.device("cpu"))


@pytest.mark.parametrize("variant", ["acb", "selfcal"])
def test_gradcam_at_a_swapped_site_matches_captum(tiny_backbone, variant):
    """ACB / selfcal absorb the block's BN, so torchvision's ``out += identity`` edits the site's
    output in place: the recorder must hand the forward a copy and give the site a gradient."""
    captum_attr = pytest.importorskip("captum.attr")
    from PIL import Image

    from viz.analysis import analyze, prepare_inputs
    from viz.models import prepare_model

    site = "layer3.0.conv2"
    entry = prepare_model(tiny_backbone, variant)
    assert site in entry.swap.swapped
    torch.manual_seed(4)
    img = Image.fromarray((torch.rand(64, 64, 3) * 255).byte().numpy())
    layers = ["layer3", site, "layer4"]
    a = analyze([img], tiny_backbone, [entry], layers=layers, erf=False, redundancy=False, profile=False)
    res = a.models[0]
    assert set(res.cams) == set(layers) and not res.errors
    assert not any(site in n for n in res.record.notes)
    x, _ = prepare_inputs([img], tiny_backbone)
    target = res.record.targets[0]
    for layer in (site, "layer3"):
        oracle = captum_attr.LayerGradCam(entry.model, entry.model.get_submodule(layer)).attribute(x, target=target)
        ref = oracle[:, 0].detach()
        torch.testing.assert_close(res.cams[layer].raw, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_colormaps_exist_and_diverging_is_perceptually_uniform():
    from matplotlib import colormaps

    from viz.gradcam import DIVERGING_CMAP, SEQUENTIAL_CMAP

    assert DIVERGING_CMAP in {"berlin", "vanimo", "managua"} and SEQUENTIAL_CMAP == "viridis"
    cmap = colormaps[DIVERGING_CMAP]
    # diverging: the two ends differ in hue, and lightness is symmetric about the centre
    lo, mid, hi = (np.asarray(cmap(v)[:3]) for v in (0.0, 0.5, 1.0))
    lum = lambda c: float(c @ np.array([0.2126, 0.7152, 0.0722]))  # noqa: E731
    assert np.abs(lo - hi).max() > 0.3 and abs(lum(lo) - lum(hi)) < 0.15 and lum(mid) < min(lum(lo), lum(hi))
