"""acb (ACBlock, ACNet): branch alignment, exact conv+BN transfer, fusion, constraints, taps."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from plugconv import create_conv, get_conv
from plugconv.variants.acb import ACBlock

# (in, out, k, stride, padding, groups): p = k//2, p > k//2 (asymmetric padding), p < k//2 (crop)
CONFIGS = [
    (8, 8, 3, 1, 1, 1),
    (8, 16, 3, 2, 1, 1),
    (8, 8, 3, 1, 1, 4),
    (4, 8, 5, 1, 2, 1),
    (4, 4, 3, 1, 0, 1),  # crop mode
    (4, 6, 5, 2, 1, 2),  # crop mode, stride 2, groups 2
    (4, 4, 3, 1, 2, 1),  # p > k//2
    (6, 6, 3, 2, 1, 6),  # depthwise
]
IDS = ["-".join(map(str, c)) for c in CONFIGS]


def _random_bn(bn: nn.BatchNorm2d) -> None:
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0, 0.5)
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.5, 2.0)


def _bn_eval(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    v = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
    return (x - v(bn.running_mean)) / v(bn.running_var + bn.eps).sqrt() * v(bn.weight) + v(bn.bias)


def _reference(m: ACBlock, x: torch.Tensor) -> torch.Tensor:
    """Oracle: each asymmetric kernel embedded in the centre column/row of a zero k×k kernel and run
    with the square conv's padding (the alignment the paper's padding/crop arithmetic must achieve)."""
    c, s, p, g = m.kernel_size[0] // 2, m.stride, m.padding, m.groups
    kv = torch.zeros_like(m.square_conv.weight)
    kv[:, :, :, c] = m.ver_conv.weight[:, :, :, 0]
    kh = torch.zeros_like(m.square_conv.weight)
    kh[:, :, c, :] = m.hor_conv.weight[:, :, 0, :]
    out = _bn_eval(F.conv2d(x, m.square_conv.weight, None, s, p, 1, g), m.square_bn)
    out = out + _bn_eval(F.conv2d(x, kv, None, s, p, 1, g), m.ver_bn)
    return out + _bn_eval(F.conv2d(x, kh, None, s, p, 1, g), m.hor_bn)


def _randomised_block(cfg, dtype=torch.float32) -> ACBlock:
    cin, cout, k, s, p, g = cfg
    m = create_conv("acb", cin, cout, k, stride=s, padding=p, groups=g).to(dtype)
    for bn in (m.square_bn, m.ver_bn, m.hor_bn):
        _random_bn(bn)
    return m.eval()


def test_registered() -> None:
    assert get_conv("acb") is ACBlock
    assert ACBlock.exact_transfer and ACBlock.absorbs_bn


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_forward_matches_aligned_skeleton_oracle(cfg) -> None:
    torch.manual_seed(0)
    m = _randomised_block(cfg, torch.float64)
    x = torch.randn(2, cfg[0], 11, 10, dtype=torch.float64)
    with torch.no_grad():
        ref = _reference(m, x)
        out = m(x)
        # and the output has nn.Conv2d's size
        conv = nn.Conv2d(cfg[0], cfg[1], cfg[2], cfg[3], cfg[4], groups=cfg[5]).double()
        assert out.shape == conv(x).shape
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_fuse_equals_block_in_eval(cfg) -> None:
    torch.manual_seed(1)
    m = _randomised_block(cfg)
    before = copy.deepcopy(m.state_dict())
    x = torch.randn(2, cfg[0], 11, 10)
    fused = m.fuse()
    assert type(fused) is nn.Conv2d and fused.bias is not None
    assert fused.kernel_size == m.kernel_size and fused.stride == m.stride and fused.padding == m.padding
    assert fused.groups == m.groups and not fused.training
    with torch.no_grad():
        out, ref = m(x), fused(x)
    assert (out - ref).abs().max() <= 1e-5 * max(1.0, out.abs().max().item())
    # the training form is left intact
    after = m.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(m.ver_conv, nn.Conv2d)


def test_fuse_float64_and_padding_modes() -> None:
    torch.manual_seed(2)
    for mode in ("reflect", "circular"):
        m = ACBlock(4, 6, 3, padding_mode=mode).double()
        for bn in (m.square_bn, m.ver_bn, m.hor_bn):
            _random_bn(bn)
        m.eval()
        x = torch.randn(1, 4, 7, 8, dtype=torch.float64)
        fused = m.fuse()
        assert fused.weight.dtype == torch.float64 and fused.padding_mode == mode
        torch.testing.assert_close(fused(x), m(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_from_conv_bn_is_exact(cfg, mode) -> None:
    cin, cout, k, s, p, g = cfg
    torch.manual_seed(3)
    conv = nn.Conv2d(cin, cout, k, s, p, groups=g, bias=False)
    bn = nn.BatchNorm2d(cout, eps=1e-3, momentum=0.2)
    _random_bn(bn)
    conv.train(mode == "train")
    bn.train(mode == "train")
    m = ACBlock.from_conv(copy.deepcopy(conv), copy.deepcopy(bn))
    assert m.training == (mode == "train")
    assert m.square_bn.eps == 1e-3 and m.square_bn.momentum == 0.2
    x = torch.randn(3, cin, 10, 9)
    ref = bn(conv(x))
    out = m(x)
    assert torch.equal(out, ref)  # the zeroed branches add exactly 0
    if mode == "train":  # running statistics move identically
        assert torch.equal(m.square_bn.running_mean, bn.running_mean)
        assert torch.equal(m.square_bn.running_var, bn.running_var)
        # the zeroed γ still get gradient, so the branches can grow in
        out.square().sum().backward()
        assert m.ver_bn.weight.grad.abs().max() > 0 and m.hor_bn.weight.grad.abs().max() > 0


def test_from_conv_without_bn_is_exact_in_eval() -> None:
    torch.manual_seed(4)
    for bias in (True, False):
        conv = nn.Conv2d(4, 8, 3, 2, 1, bias=bias).eval()
        m = ACBlock.from_conv(conv)
        assert not m.training
        x = torch.randn(2, 4, 9, 9)
        torch.testing.assert_close(m(x), conv(x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(m.fuse()(x), conv(x), rtol=1e-5, atol=1e-5)


def test_from_biased_conv_with_bn_is_exact() -> None:
    torch.manual_seed(5)
    conv = nn.Conv2d(4, 4, 3, padding=1, bias=True)
    with torch.no_grad():
        conv.bias.normal_(0, 3.0)
    bn = nn.BatchNorm2d(4)
    _random_bn(bn)
    x = torch.randn(2, 4, 7, 7)
    m = ACBlock.from_conv(conv, bn.eval())
    torch.testing.assert_close(m.eval()(x), bn(conv(x)), rtol=1e-5, atol=1e-5)
    mt, bnt = ACBlock.from_conv(conv, copy.deepcopy(bn).train()), copy.deepcopy(bn).train()
    torch.testing.assert_close(mt(x), bnt(conv(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("conv", "bn", "match"),
    [
        (nn.Conv2d(4, 4, 3, padding=2, dilation=2), None, "dilation 2"),
        (nn.Conv2d(4, 4, 1), None, "kernel_size 1"),
        (nn.Conv2d(4, 4, 4, padding=2), None, "kernel_size 4"),
        (nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(8), r"BatchNorm2d\(8\).*4 output channels"),
        (nn.Conv2d(4, 4, (3, 1), padding=1), None, r"kernel_size \(3, 1\)"),
        (nn.Conv2d(4, 4, 3, padding=0, padding_mode="reflect"), None, "padding 0.*'reflect'"),
    ],
)
def test_check_rejects_with_named_value(conv, bn, match) -> None:
    reason = ACBlock.check(conv, bn)
    assert reason is not None
    with pytest.raises(ValueError, match=match):
        ACBlock.from_conv(conv, bn)


def test_constructor_errors_and_options() -> None:
    with pytest.raises(ValueError, match="dilation 2"):
        ACBlock(4, 4, 3, dilation=2)
    with pytest.raises(ValueError, match="kernel_size 2"):
        ACBlock(4, 4, 2)
    with pytest.raises(ValueError, match="use_affine"):
        ACBlock(4, 4, 3, use_affine=False)
    m = ACBlock(4, 4, 3, gamma_init=1 / 3)
    for bn in (m.square_bn, m.ver_bn, m.hor_bn):
        torch.testing.assert_close(bn.weight, torch.full((4,), 1 / 3))
    # checkpoint keys follow the reference acb.py
    keys = set(ACBlock(4, 4).state_dict())
    assert {"square_conv.weight", "ver_conv.weight", "hor_conv.weight", "ver_bn.running_var"} <= keys


def test_taps_shapes_and_zero_asymmetric_branches() -> None:
    torch.manual_seed(6)
    conv, bn = nn.Conv2d(4, 6, 3, 2, 1, bias=False), nn.BatchNorm2d(6)
    _random_bn(bn)
    m = ACBlock.from_conv(conv, bn.eval())
    assert {n: t.kind for n, t in m.taps().items()} == {
        "square": "branch",
        "vertical": "branch",
        "horizontal": "branch",
    }
    rec: dict[str, torch.Tensor] = {}
    hooks = [t.register_forward_hook(lambda mod, i, o, n=n: rec.__setitem__(n, o)) for n, t in m.taps().items()]
    try:
        out = m(torch.randn(1, 4, 9, 8))
    finally:
        for h in hooks:
            h.remove()
    assert out.shape == (1, 6, 5, 4)
    assert all(t.shape == (1, 6, 5, 4) for t in rec.values())
    assert rec["vertical"].abs().max() == 0 and rec["horizontal"].abs().max() == 0
    assert torch.equal(rec["square"], out)
