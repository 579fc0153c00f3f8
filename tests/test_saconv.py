"""saconv (SAConv2d, DetectoRS switchable atrous conv): formula, exact transfer, constraints, taps."""

from __future__ import annotations

import re
import threading

import pytest
import torch
from torch import nn

from plugconv import create_conv, get_conv
from plugconv.variants.saconv import SAConv2d

# (in, out, k, stride, dilation, groups, bias)
CONFIGS = [
    (8, 8, 3, 1, 1, 1, False),
    (8, 16, 3, 2, 1, 1, True),
    (8, 8, 3, 1, 2, 1, True),
    (8, 12, 3, 2, 1, 4, False),
    (8, 8, 3, 2, 1, 8, True),  # depthwise
    (6, 6, 5, 1, 1, 3, True),
]


def _randomise(m: SAConv2d, scale: float = 0.3) -> None:
    """Give every parameter and buffer of a SAConv2d non-trivial values."""
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, scale)
        m.weight_gamma.uniform_(0.5, 1.5)
        m.weight_beta.normal_(0, 0.05)


def _reference(m: SAConv2d, x: torch.Tensor) -> torch.Tensor:
    """Independent re-implementation with stock modules (the mmcv structure, bias added once)."""
    k, s, p, d, g = m.kernel_size[0], m.stride[0], m.padding[0], m.dilation[0], m.groups
    pre = nn.Conv2d(m.in_channels, m.in_channels, 1).to(x.dtype)
    pre.load_state_dict(m.pre_context_conv.state_dict())
    x = x + pre(nn.AdaptiveAvgPool2d(1)(x)).expand_as(x)
    sw = nn.Conv2d(m.in_channels, 1, 1, stride=s).to(x.dtype)
    sw.load_state_dict(m.switch_conv.state_dict())
    switch = sw(nn.AvgPool2d(5, stride=1)(nn.ReflectionPad2d(2)(x)))
    w = m.weight
    wf = w.flatten(1)
    w_hat = (w - wf.mean(1)[:, None, None, None]) / (wf.var(1)[:, None, None, None] + 1e-5).sqrt()
    w_hat = m.weight_gamma * w_hat + m.weight_beta
    small = nn.Conv2d(m.in_channels, m.out_channels, k, s, p, d, g, bias=False).to(x.dtype)
    large = nn.Conv2d(m.in_channels, m.out_channels, k, s, 3 * p, 3 * d, g, bias=False).to(x.dtype)
    with torch.no_grad():
        small.weight.copy_(w_hat)
        large.weight.copy_(w_hat + m.weight_diff)
    out = switch * small(x) + (1 - switch) * large(x)
    if m.bias is not None:
        out = out + m.bias[None, :, None, None]
    post = nn.Conv2d(m.out_channels, m.out_channels, 1).to(x.dtype)
    post.load_state_dict(m.post_context_conv.state_dict())
    return out + post(nn.AdaptiveAvgPool2d(1)(out)).expand_as(out)


def test_registered() -> None:
    assert get_conv("saconv") is SAConv2d
    assert SAConv2d.exact_transfer and not SAConv2d.absorbs_bn


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_forward_matches_independent_reference(cfg) -> None:
    cin, cout, k, s, d, g, b = cfg
    torch.manual_seed(0)
    m = create_conv("saconv", cin, cout, k, stride=s, dilation=d, groups=g, bias=b).double()
    _randomise(m)
    x = torch.randn(2, cin, 11, 9, dtype=torch.float64)
    with torch.no_grad():
        mixed = m(x)
        torch.testing.assert_close(mixed, _reference(m, x), rtol=1e-10, atol=1e-10)
        # the large branch and the switch matter: forcing S ≡ 1 changes the output
        m.switch_conv.weight.zero_()
        m.switch_conv.bias.fill_(1.0)
        only_small = m(x)
        torch.testing.assert_close(only_small, _reference(m, x), rtol=1e-10, atol=1e-10)
        assert (only_small - mixed).abs().max() > 1e-3


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_from_conv_is_exact(cfg, mode) -> None:
    cin, cout, k, s, d, g, b = cfg
    torch.manual_seed(1)
    conv = nn.Conv2d(cin, cout, k, s, d * (k - 1) // 2, d, g, bias=b)
    with torch.no_grad():
        conv.weight.mul_(3.0).add_(0.1)  # non-zero filter means, non-unit stds
        if b:
            conv.bias.normal_(0, 2.0)  # large bias: dropping it (mmcv bug) would be visible
    conv.train(mode == "train")
    m = SAConv2d.from_conv(conv)
    assert m.training == (mode == "train")
    x = torch.randn(3, cin, 10, 13)
    ref = conv(x)
    out = m(x)
    assert out.shape == ref.shape
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    assert rel <= 1e-6, rel
    # S ≡ 1, ΔW = 0, contexts 0 at transfer
    rec: dict[str, torch.Tensor] = {}
    hooks = [t.register_forward_hook(lambda mod, i, o, n=n: rec.__setitem__(n, o)) for n, t in m.taps().items()]
    try:
        m(x)
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(rec["switch"], torch.ones_like(rec["switch"]))
    assert rec["pre_context"].abs().max() == 0 and rec["post_context"].abs().max() == 0


def test_bias_is_added_once_not_dropped() -> None:
    torch.manual_seed(2)
    conv = nn.Conv2d(4, 4, 3, padding=1, bias=True)
    with torch.no_grad():
        conv.bias.copy_(torch.tensor([5.0, -3.0, 0.5, 2.0]))
    m = SAConv2d.from_conv(conv)
    x = torch.randn(1, 4, 6, 6)
    out = m(x)
    torch.testing.assert_close(out, conv(x), rtol=1e-5, atol=1e-5)
    # what mmcv on torch >= 1.8 computes (bias dropped) is off by exactly the bias
    no_bias = out - conv.bias.view(1, -1, 1, 1)
    assert (no_bias - conv(x)).abs().amax(dim=(0, 2, 3)).sub(conv.bias.abs()).abs().max() < 1e-4


def test_exact_in_float64_and_without_aws() -> None:
    torch.manual_seed(3)
    conv = nn.Conv2d(8, 16, 3, 2, 1, bias=True).double()
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(SAConv2d.from_conv(conv)(x), conv(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(SAConv2d.from_conv(conv, aws=False)(x), conv(x), rtol=1e-12, atol=1e-12)


def test_naive_weight_copy_is_not_exact_and_state_dict_round_trips() -> None:
    """The known pitfall: copying ``.weight`` leaves γ=1, β=0 (Ŵ = standardised W)."""
    torch.manual_seed(4)
    conv = nn.Conv2d(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 8, 8)
    naive = SAConv2d(4, 4, 3, bias=True)
    with torch.no_grad():
        naive.weight.copy_(conv.weight)
        naive.bias.copy_(conv.bias)
    assert (naive(x) - conv(x)).abs().max() > 0.1
    exact = SAConv2d.from_conv(conv)
    # γ/β are buffers: saved in the state dict, a fresh module loading it is exact too (strict load)
    fresh = SAConv2d(4, 4, 3, bias=True)
    fresh.load_state_dict(exact.state_dict())
    torch.testing.assert_close(fresh(x), conv(x), rtol=1e-5, atol=1e-6)
    assert {"weight_gamma", "weight_beta"} <= {n for n, _ in exact.named_buffers()}
    assert "weight_gamma" not in {n for n, _ in exact.named_parameters()}


def test_forward_never_mutates_and_is_thread_safe() -> None:
    torch.manual_seed(5)
    m = SAConv2d(8, 8, 3, dilation=2)
    _randomise(m)
    before = (m.padding, m.dilation)
    xs = [torch.randn(2, 8, 12, 12) for _ in range(4)]
    with torch.no_grad():
        expected = [m(x) for x in xs]
    assert (m.padding, m.dilation) == before == ((2, 2), (2, 2))
    results: dict[int, list[torch.Tensor]] = {}

    def work(i: int) -> None:
        with torch.no_grad():
            results[i] = [m(x) for x in xs for _ in range(3)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for outs in results.values():
        for j, out in enumerate(outs):
            assert torch.equal(out, expected[j // 3])
    with pytest.raises(ValueError, match="2x5"):
        m(torch.randn(1, 8, 2, 5))
    assert (m.padding, m.dilation) == before


def test_gradients_at_transfer() -> None:
    """While S ≡ 1, ΔW gets zero gradient and the switch learns first (gradient y_s − y_l)."""
    torch.manual_seed(6)
    m = SAConv2d.from_conv(nn.Conv2d(4, 4, 3, padding=1))
    m(torch.randn(2, 4, 8, 8)).square().sum().backward()
    assert m.weight_diff.grad is not None and m.weight_diff.grad.abs().max() == 0
    assert m.switch_conv.bias.grad.abs() > 0
    assert m.weight_gamma.grad is None  # buffer


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kernel_size": 1, "padding": 0}, "kernel_size 1"),
        ({"kernel_size": 4, "padding": 2}, "kernel_size 4"),
        ({"kernel_size": 3, "padding": 0}, "padding 0"),
        ({"kernel_size": 3, "padding": 1, "dilation": 2}, "padding 1.*dilation 2"),
        ({"kernel_size": 3, "padding": 1, "padding_mode": "reflect"}, "padding_mode 'reflect'"),
    ],
)
def test_check_rejects_with_named_value(kwargs, match) -> None:
    conv = nn.Conv2d(4, 4, **kwargs)
    reason = SAConv2d.check(conv)
    assert reason is not None
    assert re.search(match, reason), reason
    with pytest.raises(ValueError, match=match):
        SAConv2d.from_conv(conv)
    if "padding_mode" not in kwargs:
        with pytest.raises(ValueError, match=match):
            SAConv2d(4, 4, **kwargs)


def test_check_input_and_options() -> None:
    conv = nn.Conv2d(4, 4, 3, padding=1)
    assert SAConv2d.check(conv) is None
    assert SAConv2d.check_input(conv, (3, 3)) is None
    assert "2x7" in SAConv2d.check_input(conv, (2, 7))
    assert SAConv2d(4, 4)(torch.randn(1, 4, 3, 3)).shape == (1, 4, 3, 3)
    with pytest.raises(ValueError, match="deform"):
        SAConv2d.from_conv(conv, deform=True)


def test_taps_shapes_kinds_at_batch_one() -> None:
    torch.manual_seed(7)
    m = SAConv2d(6, 10, 3, stride=2, groups=2)
    _randomise(m)
    kinds = {n: t.kind for n, t in m.taps().items()}
    assert kinds == {
        "switch": "spatial_gate",
        "pre_context": "channel_weights",
        "post_context": "channel_weights",
        "small": "branch",
        "large": "branch",
    }
    rec: dict[str, torch.Tensor] = {}
    hooks = [t.register_forward_hook(lambda mod, i, o, n=n: rec.__setitem__(n, o)) for n, t in m.taps().items()]
    try:
        out = m(torch.randn(1, 6, 9, 7))
    finally:
        for h in hooks:
            h.remove()
    assert out.shape == (1, 10, 5, 4)
    assert rec["switch"].shape == (1, 1, 5, 4)
    assert rec["pre_context"].shape == (1, 6)
    assert rec["post_context"].shape == (1, 10)
    assert rec["small"].shape == rec["large"].shape == (1, 10, 5, 4)
    # S is unbounded (no sigmoid): with random switch weights it leaves [0, 1]
    big = SAConv2d(6, 10, 3)
    with torch.no_grad():
        big.switch_conv.weight.fill_(1.0)
    seen = []
    h = big.switch.register_forward_hook(lambda mod, i, o: seen.append(o))
    try:
        big(torch.randn(1, 6, 8, 8) * 5)
    finally:
        h.remove()
    assert seen[0].max() > 1 or seen[0].min() < 0
