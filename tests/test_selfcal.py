"""Tests of ``selfcal`` (SelfCalibratedConv2d, SCNet CVPR 2020): constraints, known answers, taps, surgery."""

from __future__ import annotations

import itertools
import re

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from plugconv import Tap, create_conv, get_conv, swap_convs
from plugconv.variants.selfcal import SelfCalibratedConv2d


def record_taps(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward ``x`` with a hook on every Tap; hooks removed in ``finally``."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name, m in module.named_modules():
            if isinstance(m, Tap):
                handles.append(
                    m.register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, out.detach().clone()))
                )
        out = module(x)
    finally:
        for h in handles:
            h.remove()
    return out, seen


def randomise_bn(m: nn.Module) -> nn.Module:
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_(0, 0.3)
                bn.running_mean.normal_(0, 0.3)
                bn.running_var.uniform_(0.5, 2.0)
    return m


def oracle_forward(m: SelfCalibratedConv2d, x: torch.Tensor, mode: str, r: int = 4) -> torch.Tensor:
    """Independent eval-mode forward from the paper's equations (reads parameters only)."""

    def k(seq: nn.Sequential, t: torch.Tensor, stride: int = 1) -> torch.Tensor:
        conv, bn = [mod for mod in seq if isinstance(mod, (nn.Conv2d, nn.BatchNorm2d))]
        t = F.conv2d(t, conv.weight, stride=stride, padding=conv.dilation[0], dilation=conv.dilation[0], groups=conv.groups)
        s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        return (t - bn.running_mean[:, None, None]) * s[:, None, None] + bn.bias[:, None, None]

    half = x.shape[1] // 2
    x2, x1 = x[:, :half], x[:, half:]  # first half -> K1, second half -> calibrated path
    h, w = x.shape[-2:]
    t1 = F.avg_pool2d(x1, r, r)
    low = k(m.k2, t1)
    if mode == "nearest":
        # nearest: source index floor(i * in / out)
        rows = (torch.arange(h) * low.shape[-2]) // h
        cols = (torch.arange(w) * low.shape[-1]) // w
        up = low[:, :, rows][:, :, :, cols]
    else:
        up = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    gate = torch.sigmoid(x1 + up)
    y1 = k(m.k4, k(m.k3, x1) * gate, m.stride)
    y2 = k(m.k1, x2, m.stride)
    return torch.cat([y2, y1], dim=1)


# --------------------------------------------------------------------------- accepted configurations
ACCEPTED = list(
    itertools.product((8, 16), (1, 2), (1, 2), (1, 2), (1, 4), (8, 9))
)  # channels, stride, groups, dilation, batch, size


@pytest.mark.parametrize("channels,stride,groups,dilation,batch,size", ACCEPTED)
def test_forward_backward(channels: int, stride: int, groups: int, dilation: int, batch: int, size: int) -> None:
    torch.manual_seed(0)
    m = create_conv("selfcal", channels, channels, 3, stride=stride, dilation=dilation, groups=groups)
    assert isinstance(m, SelfCalibratedConv2d)
    conv = nn.Conv2d(channels, channels, 3, stride=stride, padding=dilation, dilation=dilation, groups=groups, bias=False)
    assert SelfCalibratedConv2d.check(conv) is None
    m.train()  # T1 is at least 2×2 here, so BN batch statistics work even at batch 1
    x = torch.randn(batch, channels, size, size, requires_grad=True)
    x_before = x.detach().clone()
    y = m(x)
    out = (size - 1) // stride + 1
    assert y.shape == (batch, channels, out, out)
    y.square().mean().backward()
    assert torch.equal(x.detach(), x_before)
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("size", [4, 5, 7])
def test_smallest_sizes_eval(size: int) -> None:
    m = SelfCalibratedConv2d(8, 8).eval()
    assert SelfCalibratedConv2d.check_input(nn.Conv2d(8, 8, 3, padding=1), (size, size)) is None
    assert m(torch.randn(1, 8, size, size)).shape == (1, 8, size, size)


# --------------------------------------------------------------------------- rejected configurations
REJECTED = [
    # (in, out, k, stride, padding, dilation, groups, bias, pattern naming the value)
    (16, 32, 3, 1, 1, 1, 1, False, r"in_channels 16 != out_channels 32"),
    (9, 9, 3, 1, 1, 1, 1, False, r"channels 9"),
    (16, 16, 5, 1, 2, 1, 1, False, r"kernel_size 5"),
    (16, 16, 3, 1, 0, 1, 1, False, r"padding 0"),
    (16, 16, 3, 1, 1, 2, 1, False, r"padding 1 .*dilation 2"),
    (12, 12, 3, 1, 1, 1, 4, False, r"groups 4 .*C/2 = 6"),
    (16, 16, 3, 1, 1, 1, 1, True, r"bias=True"),
]


@pytest.mark.parametrize("cin,cout,k,stride,padding,dilation,groups,bias,pattern", REJECTED)
def test_rejected_configurations(cin, cout, k, stride, padding, dilation, groups, bias, pattern) -> None:
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias)
    reason = SelfCalibratedConv2d.check(conv)
    assert reason is not None and re.search(pattern, reason), reason
    kwargs = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups, "bias": bias}
    with pytest.raises(ValueError, match=pattern):
        SelfCalibratedConv2d(cin, cout, k, **kwargs)
    with pytest.raises(ValueError, match=pattern):
        create_conv("selfcal", cin, cout, k, **kwargs)
    with pytest.raises(ValueError, match=pattern):
        SelfCalibratedConv2d.from_conv(conv, nn.BatchNorm2d(cout))


def test_too_small_input() -> None:
    conv = nn.Conv2d(8, 8, 3, padding=1)
    reason = SelfCalibratedConv2d.check_input(conv, (3, 8))
    assert reason is not None and "3x8" in reason
    with pytest.raises(ValueError, match="3x3"):
        SelfCalibratedConv2d(8, 8)(torch.randn(1, 8, 3, 3))


@pytest.mark.parametrize(
    "options,pattern",
    [({"upsample": "bicubic"}, r"'bicubic'"), ({"pooling_r": 0}, r"pooling_r .*0"), ({"warm_start": True}, r"warm_start")],
)
def test_bad_options(options: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        create_conv("selfcal", 8, 8, **options)


# --------------------------------------------------------------------------- known answers
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
@pytest.mark.parametrize("stride,size", [(1, 8), (1, 10), (2, 9)])
def test_forward_matches_independent_oracle(mode: str, stride: int, size: int) -> None:
    torch.manual_seed(1)
    m = randomise_bn(SelfCalibratedConv2d(8, 8, stride=stride, upsample=mode)).eval()
    x = torch.randn(2, 8, size, size + 3)
    torch.testing.assert_close(m(x), oracle_forward(m, x, mode), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("channels,groups", [(32, 1), (16, 1), (16, 2)])
def test_parameter_count(channels: int, groups: int) -> None:
    m = SelfCalibratedConv2d(channels, channels, groups=groups)
    expected = 9 * channels * channels // groups + 4 * 2 * (channels // 2)  # 9C²/g + 4 BNs of C/2
    assert sum(p.numel() for p in m.parameters()) == expected
    if groups == 1:
        assert nn.Conv2d(channels, channels, 3, bias=False).weight.numel() == 9 * channels * channels


def test_gate_range_and_shape() -> None:
    torch.manual_seed(2)
    m = randomise_bn(SelfCalibratedConv2d(16, 16, stride=2)).eval()
    _, taps = record_taps(m, torch.randn(1, 16, 12, 10))
    gate = taps["calibration"]
    assert gate.shape == (1, 8, 12, 10)  # input resolution, even at stride 2
    assert ((gate > 0) & (gate < 1)).all()


def test_nearest_and_bilinear_differ() -> None:
    torch.manual_seed(3)
    near = randomise_bn(SelfCalibratedConv2d(8, 8, upsample="nearest")).eval()
    bil = SelfCalibratedConv2d(8, 8, upsample="bilinear").eval()
    bil.load_state_dict(near.state_dict())
    x = torch.randn(2, 8, 12, 12)
    with torch.no_grad():
        a, b = near(x), bil(x)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(a[:, :4], b[:, :4])  # the plain half does not upsample


@pytest.mark.parametrize("size,out", [(8, 4), (9, 5), (16, 8)])
def test_stride2_output_size(size: int, out: int) -> None:
    m = SelfCalibratedConv2d(8, 8, stride=2).eval()
    assert m(torch.randn(1, 8, size, size)).shape == (1, 8, out, out)


def test_half_routing() -> None:
    """First input half feeds only the first (K1) output half; second half only the calibrated half."""
    torch.manual_seed(4)
    m = randomise_bn(SelfCalibratedConv2d(16, 16)).eval()
    x = torch.randn(2, 16, 8, 8)
    zero_first, zero_second = x.clone(), x.clone()
    zero_first[:, :8] = 0
    zero_second[:, 8:] = 0
    with torch.no_grad():
        y, y_zf, y_zs = m(x), m(zero_first), m(zero_second)
    assert torch.equal(y[:, 8:], y_zf[:, 8:]) and not torch.allclose(y[:, :8], y_zf[:, :8])
    assert torch.equal(y[:, :8], y_zs[:, :8]) and not torch.allclose(y[:, 8:], y_zs[:, 8:])


def test_seven_by_seven_gate_is_channel_attention() -> None:
    """At 7×7 T1 is 1×1: logit(gate) − X1 is one constant per channel (not spatial)."""
    torch.manual_seed(5)
    m = randomise_bn(SelfCalibratedConv2d(8, 8)).eval().double()
    x = torch.randn(1, 8, 7, 7, dtype=torch.float64)
    _, taps = record_taps(m, x)
    assert taps["low_res"].shape == (1, 4, 1, 1)
    g = taps["calibration"]
    shift = torch.log(g / (1 - g)) - x[:, 4:]
    torch.testing.assert_close(shift, shift[:, :, :1, :1].expand_as(shift))


# --------------------------------------------------------------------------- taps
def test_taps_at_batch_one() -> None:
    torch.manual_seed(6)
    m = randomise_bn(SelfCalibratedConv2d(16, 16, stride=2)).eval()
    names = dict(m.named_modules())
    assert names["calibration"].kind == "spatial_gate"
    assert names["low_res"].kind == names["calibrated"].kind == names["plain"].kind == "branch"
    out, taps = record_taps(m, torch.randn(1, 16, 13, 9))
    assert set(taps) == {"calibration", "low_res", "calibrated", "plain"}
    assert taps["calibration"].shape == (1, 8, 13, 9)
    assert taps["low_res"].shape == (1, 8, 3, 2)
    assert taps["calibrated"].shape == taps["plain"].shape == (1, 8, 7, 5)
    assert torch.equal(out, torch.cat([taps["plain"], taps["calibrated"]], 1))


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_recording_taps_does_not_change_output(mode: str) -> None:
    torch.manual_seed(7)
    m = randomise_bn(SelfCalibratedConv2d(16, 16, upsample=mode)).eval()
    x = torch.randn(2, 16, 9, 9)
    with torch.no_grad():
        plain = m(x)
        recorded, taps = record_taps(m, x)
    assert len(taps) == 4
    assert torch.equal(plain, recorded)


def test_forward_does_not_mutate_module() -> None:
    m = SelfCalibratedConv2d(16, 16).eval()
    before = {k: v for k, v in vars(m).items() if not k.startswith("_")}
    state = {k: v.clone() for k, v in m.state_dict().items()}
    m(torch.randn(2, 16, 8, 8))
    assert {k: v for k, v in vars(m).items() if not k.startswith("_")} == before
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())


# --------------------------------------------------------------------------- structure and transfer
def test_official_layout() -> None:
    """Parameter names follow MCG-NKU/SCNet (k1.0/.1, k2.1/.2 after the pool, k3.0/.1, k4.0/.1)."""
    m = SelfCalibratedConv2d(16, 16, stride=2)
    assert isinstance(m.k2[0], nn.AvgPool2d) and m.k2[0].kernel_size == 4 and m.k2[0].stride == 4
    assert {k for k in m.state_dict() if not k.endswith("num_batches_tracked")} == {
        f"{seq}.{suffix}"
        for seq, (ci, bi) in {"k1": (0, 1), "k2": (1, 2), "k3": (0, 1), "k4": (0, 1)}.items()
        for suffix in (
            f"{ci}.weight", f"{bi}.weight", f"{bi}.bias", f"{bi}.running_mean", f"{bi}.running_var"
        )
    }
    assert m.k1[0].stride == (2, 2) and m.k4[0].stride == (2, 2)
    assert m.k2[1].stride == (1, 1) and m.k3[0].stride == (1, 1)
    assert all(m.get_submodule(f"{s}.{i}").bias is None for s, i in (("k1", 0), ("k2", 1), ("k3", 0), ("k4", 0)))


def test_registry_and_class_attributes() -> None:
    cls = get_conv("selfcal")
    assert cls is SelfCalibratedConv2d and cls.name == "selfcal"
    assert cls.absorbs_bn is True and cls.exact_transfer is False


def test_from_conv_fresh_by_default() -> None:
    torch.manual_seed(8)
    conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
    bn = randomise_bn(nn.BatchNorm2d(16))
    m = SelfCalibratedConv2d.from_conv(conv, bn)
    assert not torch.equal(m.k1[0].weight, conv.weight[:8, :8])
    assert torch.equal(m.k1[1].running_var, torch.ones(8))


def test_from_conv_warm_start() -> None:
    torch.manual_seed(9)
    conv = nn.Conv2d(16, 16, 3, padding=1, bias=False).double()
    bn = randomise_bn(nn.BatchNorm2d(16)).double()
    m = SelfCalibratedConv2d.from_conv(conv, bn, warm_start=True)
    assert m.k1[0].weight.dtype == torch.float64
    assert torch.equal(m.k1[0].weight, conv.weight[:8, :8])
    assert torch.equal(m.k4[0].weight, conv.weight[8:, 8:])
    for attr in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(m.k1[1], attr), getattr(bn, attr)[:8])
        assert torch.equal(getattr(m.k4[1], attr), getattr(bn, attr)[8:])
    # the plain half then reproduces the block-diagonal part of conv + BN exactly
    m.eval()
    bn.eval()
    x = torch.randn(1, 16, 8, 8, dtype=torch.float64)
    x[:, 8:] = 0
    with torch.no_grad():
        torch.testing.assert_close(m(x)[:, :8], bn(conv(x))[:, :8])
    with pytest.raises(ValueError, match="groups 2"):
        SelfCalibratedConv2d.from_conv(nn.Conv2d(16, 16, 3, padding=1, groups=2, bias=False), warm_start=True)


# --------------------------------------------------------------------------- surgery
@pytest.fixture(scope="module")
def resnets() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "resnet18": torchvision.models.resnet18(weights=None).eval(),
        "resnet50": torchvision.models.resnet50(weights=None).eval(),
    }


def test_swap_into_resnet18(resnets: dict[str, nn.Module]) -> None:
    res = swap_convs(resnets["resnet18"], "selfcal", probe_size=64)
    skipped = dict(res.skipped)
    # width-changing first convs, and at 64 px layer4's 2×2 maps (< r = 4)
    assert set(skipped) == {
        "layer2.0.conv1", "layer3.0.conv1", "layer4.0.conv1", "layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2"
    }
    assert "in_channels 64 != out_channels 128" in skipped["layer2.0.conv1"]
    assert "2x2" in skipped["layer4.1.conv1"]
    assert len(res.swapped) == 10
    assert all(v == "initialised" for v in res.provenance.values()) and not res.exact
    # the BN after each swapped conv is absorbed
    assert isinstance(res.model.get_submodule("layer1.0.conv2"), SelfCalibratedConv2d)
    assert isinstance(res.model.get_submodule("layer1.0.bn2"), nn.Identity)
    assert isinstance(res.model.get_submodule("layer2.0.bn1"), nn.BatchNorm2d)  # skipped site keeps its BN
    with torch.no_grad():
        y = res.model(torch.randn(1, 3, 64, 64))
    assert y.shape == (1, 1000) and torch.isfinite(y).all()


def test_swap_into_resnet50(resnets: dict[str, nn.Module]) -> None:
    res = swap_convs(resnets["resnet50"], "selfcal", probe_size=64)
    skipped = dict(res.skipped)
    # at 64 px layer4's later conv2s see 2×2 < r = 4
    assert set(skipped) == {"layer4.1.conv2", "layer4.2.conv2"}
    assert all("2x2" in r for r in skipped.values())
    assert "layer4.0.conv2" in res.swapped  # stride 2 at 4×4 input
    assert len(res.swapped) == 14
    with torch.no_grad():
        y = res.model(torch.randn(2, 3, 64, 64))
    assert y.shape == (2, 1000) and torch.isfinite(y).all()
