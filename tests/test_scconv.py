"""Tests of ``scconv`` (SCConv2d, CVPR 2023): constraints, known answers, taps, surgery."""

from __future__ import annotations

import itertools
import re

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from plugconv import Tap, create_conv, get_conv, swap_convs
from plugconv.variants.scconv import SCConv2d


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


def oracle_forward(m: SCConv2d, x: torch.Tensor, fuse: str = "channel") -> tuple[torch.Tensor, torch.Tensor]:
    """Independent SCConv forward from the paper's equations (reads the module's parameters only).

    Returns (output, SRU gate W).
    """
    n, c, h, w = x.shape
    g = m.gn.num_groups
    xg = x.reshape(n, g, -1)
    mean = xg.mean(-1, keepdim=True)
    var = xg.var(-1, unbiased=False, keepdim=True)
    xhat = ((xg - mean) / torch.sqrt(var + 1e-5)).reshape(n, c, h, w)
    gamma, beta = m.gn.weight.reshape(1, c, 1, 1), m.gn.bias.reshape(1, c, 1, 1)
    gn = gamma * xhat + beta
    w_gamma = gamma / m.gn.weight.sum()
    gate = torch.sigmoid(w_gamma * gn)
    w1 = torch.where(gate > 0.5, 1.0, gate)
    w2 = torch.where(gate > 0.5, 0.0, gate)
    x1, x2 = w1 * x, w2 * x
    half = c // 2
    sru = torch.cat([x1[:, :half] + x2[:, half:], x1[:, half:] + x2[:, :half]], dim=1)
    up_c = c // 2
    up = F.conv2d(sru[:, :up_c], m.squeeze1.weight)
    low = F.conv2d(sru[:, up_c:], m.squeeze2.weight)
    k = m.gwc.kernel_size[0]
    y1 = F.conv2d(up, m.gwc.weight, m.gwc.bias, padding=k // 2, groups=m.gwc.groups) + F.conv2d(up, m.pwc1.weight)
    y2 = torch.cat([F.conv2d(low, m.pwc2.weight), low], dim=1)
    s1, s2 = y1.mean((2, 3)), y2.mean((2, 3))
    if fuse == "channel":
        e1, e2 = torch.exp(s1), torch.exp(s2)
        b1 = e1 / (e1 + e2)
        out = b1[..., None, None] * y1 + (1 - b1)[..., None, None] * y2
    else:
        wts = torch.softmax(torch.cat([s1, s2], 1), 1)
        out = wts[:, :c, None, None] * y1 + wts[:, c:, None, None] * y2
    return out, gate


def randomise(m: SCConv2d) -> SCConv2d:
    """Give the GN non-trivial positive γ and β so the gates move away from 0.5."""
    with torch.no_grad():
        m.gn.weight.uniform_(0.5, 1.5)
        m.gn.bias.normal_(0, 0.5)
    return m


# --------------------------------------------------------------------------- accepted configurations
ACCEPTED = list(itertools.product((8, 16, 32), (3, 5), (1, 4), (8, 13), ("channel", "softmax2c")))


@pytest.mark.parametrize("channels,k,batch,size,fuse", ACCEPTED)
def test_forward_backward(channels: int, k: int, batch: int, size: int, fuse: str) -> None:
    torch.manual_seed(0)
    m = create_conv("scconv", channels, channels, k, fuse=fuse)
    assert isinstance(m, SCConv2d)
    x = torch.randn(batch, channels, size, size, requires_grad=True)
    x_before = x.detach().clone()
    y = m(x)
    assert y.shape == (batch, channels, size, size)
    y.square().mean().backward()
    assert torch.equal(x.detach(), x_before)  # no in-place op on the input
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_check_accepts_dense_stride1_sites() -> None:
    for c in (8, 16, 24, 32, 64):
        assert SCConv2d.check(nn.Conv2d(c, c, 3, padding=1, bias=False)) is None


# --------------------------------------------------------------------------- rejected configurations
REJECTED = [
    # (in, out, k, stride, padding, dilation, groups, options, pattern naming the value)
    (32, 32, 3, 2, 1, 1, 1, {}, r"stride 2"),
    (32, 64, 3, 1, 1, 1, 1, {}, r"in_channels 32 != out_channels 64"),
    (32, 32, 3, 1, 2, 2, 1, {}, r"dilation 2"),
    (32, 32, 3, 1, 1, 1, 4, {}, r"groups 4"),
    (32, 32, 4, 1, 2, 1, 1, {}, r"kernel_size 4"),
    (32, 32, 3, 1, 0, 1, 1, {}, r"padding 0"),
    (20, 20, 3, 1, 1, 1, 1, {}, r"channels 20"),
    (30, 30, 3, 1, 1, 1, 1, {}, r"channels 30"),
    (36, 36, 3, 1, 1, 1, 1, {}, r"channels 36"),
    (12, 12, 3, 1, 1, 1, 1, {}, r"channels 12"),
    (9, 9, 3, 1, 1, 1, 1, {}, r"channels 9"),
    (32, 32, 3, 1, 1, 1, 1, {"gn_groups": 64}, r"gn_groups 64"),
    (32, 32, 3, 1, 1, 1, 1, {"gwc_groups": 16}, r"gwc_groups 16"),
    (32, 32, 3, 1, 1, 1, 1, {"alpha": 0.3}, r"alpha 0.3"),
]


@pytest.mark.parametrize("cin,cout,k,stride,padding,dilation,groups,options,pattern", REJECTED)
def test_rejected_configurations(cin, cout, k, stride, padding, dilation, groups, options, pattern) -> None:
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation, groups=groups)
    reason = SCConv2d.check(conv, **options)
    assert reason is not None and re.search(pattern, reason), reason
    with pytest.raises(ValueError, match=pattern):
        SCConv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation, groups=groups, **options)
    with pytest.raises(ValueError, match=pattern):
        create_conv("scconv", cin, cout, k, stride=stride, padding=padding, dilation=dilation, groups=groups, **options)
    with pytest.raises(ValueError, match=pattern):
        SCConv2d.from_conv(conv, **options)


@pytest.mark.parametrize(
    "options,pattern",
    [
        ({"fuse": "sum"}, r"fuse .*'sum'"),
        ({"alpha": 1.5}, r"alpha .*1\.5"),
        ({"squeeze_ratio": 0}, r"squeeze_ratio .*0"),
        ({"gate_threshold": 2}, r"gate_threshold .*2"),
        ({"bogus": 1}, r"bogus"),
    ],
)
def test_bad_options(options: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        create_conv("scconv", 32, 32, **options)


def test_non_default_options_divisibility() -> None:
    # gn_groups 8, r 4, g 2: C % 16 == 0 is required (alpha*C / r must be divisible by g)
    opts = {"gn_groups": 8, "squeeze_ratio": 4}
    assert SCConv2d.check(nn.Conv2d(16, 16, 3, padding=1), **opts) is None
    assert "channels 24" in SCConv2d.check(nn.Conv2d(24, 24, 3, padding=1), **opts)
    m = SCConv2d(16, 16, **opts)
    assert m(torch.randn(2, 16, 6, 6)).shape == (2, 16, 6, 6)


# --------------------------------------------------------------------------- known answers
@pytest.mark.parametrize("fuse", ["channel", "softmax2c"])
def test_forward_matches_independent_oracle(fuse: str) -> None:
    torch.manual_seed(1)
    m = randomise(SCConv2d(16, 16, fuse=fuse))
    x = torch.randn(3, 16, 7, 9)
    out, taps = record_taps(m, x)
    ref_out, ref_gate = oracle_forward(m, x, fuse)
    torch.testing.assert_close(taps["sru_gate"], ref_gate, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)


def test_sru_gate_is_soft_not_hard_mask() -> None:
    """The paper's soft reweighting keeps magnitudes; the popular hard ``info_mask * x`` would not."""
    torch.manual_seed(2)
    m = randomise(SCConv2d(16, 16))
    x = torch.randn(2, 16, 8, 8)
    _, taps = record_taps(m, x)
    gate, mask = taps["sru_gate"], taps["sru_mask"]
    low = gate[mask == 0]
    assert low.numel() > 0 and (low > 0).all() and (low <= 0.5).all()
    # gates below the threshold are strictly between 0 and 0.5: not a binary mask
    assert ((low > 0.01) & (low < 0.49)).any()


def test_cru_weights_sum_to_one_per_channel() -> None:
    torch.manual_seed(3)
    m = SCConv2d(32, 32)
    _, taps = record_taps(m, torch.randn(4, 32, 8, 8))
    beta = taps["cru_weights"]
    assert beta.shape == (4, 2, 32)
    assert ((beta > 0) & (beta < 1)).all()
    torch.testing.assert_close(beta.sum(1), torch.ones(4, 32))


@pytest.mark.parametrize("channels", [8, 32])
def test_softmax2c_mean_weight(channels: int) -> None:
    torch.manual_seed(4)
    m = SCConv2d(channels, channels, fuse="softmax2c")
    _, taps = record_taps(m, torch.randn(2, channels, 8, 8))
    wts = taps["cru_weights"]
    assert wts.shape == (2, 2 * channels)
    torch.testing.assert_close(wts.mean(1), torch.full((2,), 1 / (2 * channels)))
    torch.testing.assert_close(wts.sum(1), torch.ones(2))


def test_parameter_count_formula() -> None:
    c = 32
    expected = 29 * c * c // 16 + c + 2 * c  # 29/16·C² + C (GWC bias) + 2C (GN), variants.md §1.3
    m = SCConv2d(c, c)
    n_params = sum(p.numel() for p in m.parameters())
    assert n_params == expected == 1952
    assert nn.Conv2d(c, c, 3, bias=False).weight.numel() == 9 * c * c == 9216


def test_groupnorm_gamma_one_and_eps_inside_sqrt() -> None:
    m = SCConv2d(16, 16)
    assert isinstance(m.gn, nn.GroupNorm) and torch.equal(m.gn.weight, torch.ones(16))
    # a constant group: eps inside the sqrt keeps everything finite and GN(x) = β = 0 -> W = 0.5
    x = torch.full((1, 16, 6, 6), 3.0)
    out, taps = record_taps(m, x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(taps["sru_gate"], torch.full_like(x, 0.5))
    # a nearly constant group: (x - mean) / sqrt(var + eps) stays tiny (the copy's eps outside an
    # unbiased std would rescale the 1e-6 noise to unit size)
    x = 3.0 + 1e-6 * torch.randn(1, 16, 6, 6)
    out, taps = record_taps(m, x)
    assert torch.isfinite(out).all()
    assert (taps["sru_gate"] - 0.5).abs().max() < 1e-3


# --------------------------------------------------------------------------- taps
def test_taps_at_batch_one() -> None:
    torch.manual_seed(5)
    c, h, w = 16, 9, 7
    m = randomise(SCConv2d(c, c))
    names = dict(m.named_modules())
    for tap in ("w_gamma", "sru_gate", "sru_mask", "cru_weights", "cru_y1", "cru_y2"):
        assert isinstance(names[tap], Tap)
    assert {names[t].kind for t in ("w_gamma", "cru_weights")} == {"channel_weights"}
    assert names["sru_gate"].kind == "spatial_gate" and names["sru_mask"].kind == "mask"
    assert names["cru_y1"].kind == names["cru_y2"].kind == "branch"
    _, taps = record_taps(m, torch.randn(1, c, h, w))
    assert set(taps) == {"w_gamma", "sru_gate", "sru_mask", "cru_weights", "cru_y1", "cru_y2"}
    assert taps["w_gamma"].shape == (c,)
    torch.testing.assert_close(taps["w_gamma"].sum(), torch.tensor(1.0))
    assert taps["sru_gate"].shape == (1, c, h, w)
    assert ((taps["sru_gate"] > 0) & (taps["sru_gate"] < 1)).all()
    assert taps["sru_mask"].shape == (1, c, h, w)
    assert set(taps["sru_mask"].unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(taps["sru_mask"], (taps["sru_gate"] > 0.5).float())
    assert taps["cru_weights"].shape == (1, 2, c)
    assert taps["cru_y1"].shape == taps["cru_y2"].shape == (1, c, h, w)


def test_w_gamma_is_uniform_at_init() -> None:
    c = 32
    _, taps = record_taps(SCConv2d(c, c), torch.randn(1, c, 4, 4))
    torch.testing.assert_close(taps["w_gamma"], torch.full((c,), 1 / c))


@pytest.mark.parametrize("fuse", ["channel", "softmax2c"])
def test_recording_taps_does_not_change_output(fuse: str) -> None:
    torch.manual_seed(6)
    m = randomise(SCConv2d(16, 16, fuse=fuse))
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        plain = m(x)
        recorded, taps = record_taps(m, x)
    assert len(taps) == 6
    assert torch.equal(plain, recorded)


def test_forward_does_not_mutate_module() -> None:
    m = SCConv2d(16, 16)
    before = {k: v for k, v in vars(m).items() if not k.startswith("_")}
    state = {k: v.clone() for k, v in m.state_dict().items()}
    m(torch.randn(2, 16, 5, 5))
    assert {k: v for k, v in vars(m).items() if not k.startswith("_")} == before
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())


# --------------------------------------------------------------------------- transfer and registry
def test_registry_and_class_attributes() -> None:
    cls = get_conv("scconv")
    assert cls is SCConv2d and cls.name == "scconv"
    assert cls.exact_transfer is False and cls.absorbs_bn is False
    assert cls.year == 2023 and "CVPR 2023" in cls.paper


def test_from_conv_keeps_only_shapes() -> None:
    conv = nn.Conv2d(16, 16, 3, padding=1, bias=False).double()
    m = SCConv2d.from_conv(conv, nn.BatchNorm2d(16))
    assert isinstance(m, SCConv2d) and m.channels == 16
    assert m.gn.weight.dtype == torch.float64
    y = m(torch.randn(1, 16, 6, 6, dtype=torch.float64))
    assert y.shape == (1, 16, 6, 6) and y.dtype == torch.float64


# --------------------------------------------------------------------------- surgery
@pytest.fixture(scope="module")
def resnets() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "resnet18": torchvision.models.resnet18(weights=None).eval(),
        "resnet50": torchvision.models.resnet50(weights=None).eval(),
    }


def test_swap_into_resnet18(resnets: dict[str, nn.Module]) -> None:
    res = swap_convs(resnets["resnet18"], "scconv", probe_size=64)
    skipped = dict(res.skipped)
    # stride-2 first convs of layer2..4 are skipped with a reason naming the stride
    for site in ("layer2.0.conv1", "layer3.0.conv1", "layer4.0.conv1"):
        assert "stride 2" in skipped[site]
    assert "layer1.0.conv1" in res.swapped and "layer2.0.conv2" in res.swapped
    assert len(res.swapped) + len(res.skipped) == 16
    assert all(v == "initialised" for v in res.provenance.values()) and not res.exact
    assert isinstance(res.model.get_submodule("layer1.0.conv1"), SCConv2d)
    assert isinstance(res.model.get_submodule("layer1.0.bn1"), nn.BatchNorm2d)  # host BN stays
    with torch.no_grad():
        y = res.model(torch.randn(1, 3, 64, 64))
    assert y.shape == (1, 1000) and torch.isfinite(y).all()


def test_swap_into_resnet50(resnets: dict[str, nn.Module]) -> None:
    res = swap_convs(resnets["resnet50"], "scconv", probe_size=64)
    skipped = dict(res.skipped)
    assert set(skipped) == {"layer2.0.conv2", "layer3.0.conv2", "layer4.0.conv2"}
    assert all("stride 2" in r for r in skipped.values())
    assert len(res.swapped) == 13
    with torch.no_grad():
        y = res.model(torch.randn(2, 3, 64, 64))
    assert y.shape == (2, 1000) and torch.isfinite(y).all()
