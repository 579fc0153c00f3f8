"""Tests of ``spconv`` (SPConv2d, IJCAI 2020): constraints, known answers, taps, surgery."""

from __future__ import annotations

import itertools
import re

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from plugconv import Tap, create_conv, get_conv, swap_convs
from plugconv.variants.spconv import SPConv2d


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
    """Non-trivial BN statistics and affine parameters (eval-mode answers then depend on them)."""
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_(0, 0.3)
                bn.running_mean.normal_(0, 0.3)
                bn.running_var.uniform_(0.5, 2.0)
    return m


def oracle_forward(m: SPConv2d, x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """Independent eval-mode SPConv forward from the paper/reference equations."""
    c_r = int(ratio * x.shape[1])
    xr, xu = x[:, :c_r], x[:, c_r:]

    def bn(t: torch.Tensor, b: nn.BatchNorm2d) -> torch.Tensor:
        s = b.weight / torch.sqrt(b.running_var + b.eps)
        return (t - b.running_mean[:, None, None]) * s[:, None, None] + b.bias[:, None, None]

    gwc = F.conv2d(xr, m.gwc.weight, stride=m.stride, padding=1, groups=2)
    if m.stride == 2:
        xr = F.avg_pool2d(xr, 2)
        xu = F.avg_pool2d(xu, 2)
    y3 = bn(gwc + F.conv2d(xr, m.pwc.weight), m.bn1)
    y1 = bn(F.conv2d(xu, m.conv1x1.weight, m.conv1x1.bias), m.bn2)
    e3, e1 = torch.exp(y3.mean((2, 3))), torch.exp(y1.mean((2, 3)))
    beta = e3 / (e3 + e1)
    return beta[..., None, None] * y3 + (1 - beta)[..., None, None] * y1


def expected_params(c_in: int, c_out: int, ratio: float) -> int:
    """GWC (2 groups, 3×3) + PWC + 1×1 with bias + two BNs."""
    c_r = int(ratio * c_in)
    c_u = c_in - c_r
    return 9 * (c_r // 2) * c_out + c_r * c_out + (c_u * c_out + c_out) + 2 * 2 * c_out


# --------------------------------------------------------------------------- accepted configurations
ACCEPTED = [
    (cin, cout, stride, batch, size, ratio)
    for (cin, cout), stride, batch, size, ratio in itertools.product(
        [(8, 8), (8, 16), (16, 8), (12, 12)], (1, 2), (1, 4), (8, 12), (0.5,)
    )
] + [
    (8, 8, 1, 1, 9, 0.5),  # odd size is fine at stride 1
    (8, 8, 1, 4, 7, 0.5),
    (16, 16, 2, 1, 8, 0.25),
    (16, 32, 1, 4, 6, 0.75),
]


@pytest.mark.parametrize("cin,cout,stride,batch,size,ratio", ACCEPTED)
def test_forward_backward(cin: int, cout: int, stride: int, batch: int, size: int, ratio: float) -> None:
    torch.manual_seed(0)
    m = create_conv("spconv", cin, cout, 3, stride=stride, ratio=ratio)
    assert isinstance(m, SPConv2d)
    assert SPConv2d.check(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), ratio=ratio) is None
    m.train(batch > 1)  # BN batch statistics need more than one value per channel
    x = torch.randn(batch, cin, size, size, requires_grad=True)
    x_before = x.detach().clone()
    y = m(x)
    out_size = (size - 1) // stride + 1
    assert y.shape == (batch, cout, out_size, out_size)
    y.square().mean().backward()
    assert torch.equal(x.detach(), x_before)
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


# --------------------------------------------------------------------------- rejected configurations
REJECTED = [
    # (in, out, k, stride, padding, dilation, groups, options, pattern naming the value)
    (16, 16, 5, 1, 2, 1, 1, {}, r"kernel_size 5"),
    (16, 16, 3, 3, 1, 1, 1, {}, r"stride 3"),
    (16, 16, 3, 1, 2, 2, 1, {}, r"dilation 2"),
    (16, 16, 3, 1, 1, 1, 2, {}, r"groups 2"),
    (16, 16, 3, 1, 0, 1, 1, {}, r"padding 0"),
    (10, 16, 3, 1, 1, 1, 1, {}, r"in_channels 10.*= 5"),
    (63, 64, 3, 1, 1, 1, 1, {}, r"in_channels 63"),
    (16, 9, 3, 1, 1, 1, 1, {}, r"out_channels 9"),
    (8, 8, 3, 1, 1, 1, 1, {"ratio": 0.1}, r"in_channels 8 at ratio 0.1"),
]


@pytest.mark.parametrize("cin,cout,k,stride,padding,dilation,groups,options,pattern", REJECTED)
def test_rejected_configurations(cin, cout, k, stride, padding, dilation, groups, options, pattern) -> None:
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation, groups=groups)
    reason = SPConv2d.check(conv, **options)
    assert reason is not None and re.search(pattern, reason), reason
    with pytest.raises(ValueError, match=pattern):
        SPConv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation, groups=groups, **options)
    with pytest.raises(ValueError, match=pattern):
        create_conv("spconv", cin, cout, k, stride=stride, padding=padding, dilation=dilation, groups=groups, **options)
    with pytest.raises(ValueError, match=pattern):
        SPConv2d.from_conv(conv, **options)


@pytest.mark.parametrize(
    "options,pattern",
    [({"ratio": 1.0}, r"ratio .*1\.0"), ({"ratio": 0}, r"ratio .*0"), ({"ratio": "half"}, r"'half'"), ({"alpha": 0.5}, r"alpha")],
)
def test_bad_options(options: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        create_conv("spconv", 16, 16, **options)


def test_odd_size_at_stride_2() -> None:
    conv = nn.Conv2d(16, 16, 3, stride=2, padding=1)
    assert SPConv2d.check(conv) is None
    reason = SPConv2d.check_input(conv, (15, 15))
    assert reason is not None and "15x15" in reason
    assert SPConv2d.check_input(conv, (16, 14)) is None
    assert SPConv2d.check_input(nn.Conv2d(16, 16, 3, padding=1), (15, 15)) is None
    with pytest.raises(ValueError, match="15x16"):
        SPConv2d(16, 16, stride=2)(torch.randn(1, 16, 15, 16))


# --------------------------------------------------------------------------- known answers
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("cin,cout", [(8, 8), (8, 12)])
def test_forward_matches_independent_oracle(stride: int, cin: int, cout: int) -> None:
    torch.manual_seed(1)
    m = randomise_bn(SPConv2d(cin, cout, stride=stride)).eval()
    x = torch.randn(3, cin, 8, 10)
    torch.testing.assert_close(m(x), oracle_forward(m, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("ratio,documented", [(0.5, 13_632), (0.25, 9_024), (0.125, 6_720)])
def test_parameter_count(ratio: float, documented: int) -> None:
    c = 64
    m = SPConv2d(c, c, ratio=ratio)
    n_params = sum(p.numel() for p in m.parameters())
    assert n_params == expected_params(c, c, ratio) == documented  # variants.md §4.2
    assert n_params < 9 * c * c


def test_beta_gamma_sum_to_one_and_batch_one() -> None:
    torch.manual_seed(2)
    m = randomise_bn(SPConv2d(16, 16)).eval()
    for n in (1, 3):
        _, taps = record_taps(m, torch.randn(n, 16, 8, 8))
        w = taps["fusion_weights"]
        assert w.shape == (n, 2, 16)
        assert ((w > 0) & (w < 1)).all()
        torch.testing.assert_close(w.sum(1), torch.ones(n, 16))


def test_batch_one_equals_batched_rows() -> None:
    """Batch 1 keeps its batch axis (the old bare ``.squeeze()`` bug) and matches batched rows."""
    torch.manual_seed(3)
    m = randomise_bn(SPConv2d(8, 16, stride=2)).eval()
    x = torch.randn(4, 8, 8, 8)
    with torch.no_grad():
        full = m(x)
        single = torch.cat([m(x[i : i + 1]) for i in range(4)])
    assert single.shape == (4, 16, 4, 4)
    torch.testing.assert_close(single, full, rtol=1e-5, atol=1e-6)


def test_stride2_output_shape() -> None:
    m = SPConv2d(16, 32, stride=2).eval()
    assert m(torch.randn(1, 16, 12, 8)).shape == (1, 32, 6, 4)


# --------------------------------------------------------------------------- taps
def test_taps_at_batch_one() -> None:
    torch.manual_seed(4)
    m = randomise_bn(SPConv2d(8, 12, stride=2)).eval()
    names = dict(m.named_modules())
    assert names["fusion_weights"].kind == "channel_weights"
    assert names["representative"].kind == names["redundant"].kind == "branch"
    out, taps = record_taps(m, torch.randn(1, 8, 10, 6))
    assert set(taps) == {"fusion_weights", "representative", "redundant"}
    assert taps["fusion_weights"].shape == (1, 2, 12)
    assert taps["representative"].shape == taps["redundant"].shape == (1, 12, 5, 3)
    beta = taps["fusion_weights"][:, 0, :, None, None]
    gamma = taps["fusion_weights"][:, 1, :, None, None]
    torch.testing.assert_close(out, beta * taps["representative"] + gamma * taps["redundant"])


def test_recording_taps_does_not_change_output() -> None:
    torch.manual_seed(5)
    m = randomise_bn(SPConv2d(16, 16, stride=2)).eval()
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        plain = m(x)
        recorded, taps = record_taps(m, x)
    assert len(taps) == 3
    assert torch.equal(plain, recorded)


def test_forward_does_not_mutate_module() -> None:
    m = SPConv2d(16, 16).eval()
    before = {k: v for k, v in vars(m).items() if not k.startswith("_")}
    state = {k: v.clone() for k, v in m.state_dict().items()}
    m(torch.randn(2, 16, 6, 6))
    assert {k: v for k, v in vars(m).items() if not k.startswith("_")} == before
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())


# --------------------------------------------------------------------------- transfer and registry
def test_registry_class_attributes_and_reference_names() -> None:
    cls = get_conv("spconv")
    assert cls is SPConv2d and cls.name == "spconv"
    assert cls.exact_transfer is False and cls.absorbs_bn is False
    keys = set(SPConv2d(8, 8).state_dict())
    # parameter names of the reference SPConv_3x3, so its checkpoints map by name
    for k in ("gwc.weight", "pwc.weight", "conv1x1.weight", "conv1x1.bias", "bn1.weight", "bn2.running_var"):
        assert k in keys


def test_from_conv_shapes_and_dtype() -> None:
    conv = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=True).double()
    m = SPConv2d.from_conv(conv)
    assert (m.in_channels, m.out_channels, m.stride) == (16, 32, 2)
    assert m.gwc.weight.dtype == torch.float64


# --------------------------------------------------------------------------- surgery
@pytest.fixture(scope="module")
def resnets() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "resnet18": torchvision.models.resnet18(weights=None).eval(),
        "resnet50": torchvision.models.resnet50(weights=None).eval(),
    }


def test_swap_into_resnet18(resnets: dict[str, nn.Module]) -> None:
    res = swap_convs(resnets["resnet18"], "spconv", probe_size=64)
    assert len(res.swapped) == 16 and res.skipped == ()  # every 3×3 in a block, in != out included
    assert "layer2.0.conv1" in res.swapped  # 64 -> 128, stride 2, even 16×16 input
    assert isinstance(res.model.get_submodule("layer2.0.bn1"), nn.BatchNorm2d)  # host BN stays
    with torch.no_grad():
        y = res.model(torch.randn(1, 3, 64, 64))
    assert y.shape == (1, 1000) and torch.isfinite(y).all()


def test_swap_skips_odd_stride2_inputs(resnets: dict[str, nn.Module]) -> None:
    # at 56 px layer3 receives 7×7 (odd): its stride-2 conv is skipped with the size in the reason
    res = swap_convs(resnets["resnet18"], "spconv", probe_size=56)
    skipped = dict(res.skipped)
    assert set(skipped) == {"layer3.0.conv1"}  # layer4 then sees 4×4
    assert "7x7" in skipped["layer3.0.conv1"] and "stride 2" in skipped["layer3.0.conv1"]
    with torch.no_grad():
        assert res.model(torch.randn(1, 3, 56, 56)).shape == (1, 1000)


def test_swap_into_resnet50(resnets: dict[str, nn.Module]) -> None:
    res = swap_convs(resnets["resnet50"], "spconv", probe_size=64)
    assert len(res.swapped) == 16 and res.skipped == ()
    assert all(v == "initialised" for v in res.provenance.values()) and not res.exact
    with torch.no_grad():
        y = res.model(torch.randn(2, 3, 64, 64))
    assert y.shape == (2, 1000) and torch.isfinite(y).all()
