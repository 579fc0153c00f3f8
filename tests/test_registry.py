"""Registry-wide tests, parametrised over ``list_convs()`` so every variant is covered."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import plugconv
from plugconv import create_conv, get_conv, list_convs
from plugconv.base import TAP_KINDS, ConvVariant, Tap

EXPECTED = ["acb", "conv", "saconv", "scconv", "selfcal", "spconv"]
VARIANTS = list_convs()

# (id, in, out, stride, groups, size, substrings a rejection message must contain (one of them))
GRID = [
    ("base", 16, 16, 1, 1, 8, []),
    ("wider", 16, 32, 1, 1, 8, ["32"]),
    ("stride2", 16, 16, 2, 1, 8, ["stride 2"]),
    ("stride2-wider", 16, 32, 2, 1, 10, ["stride 2", "32"]),
    ("groups2", 16, 16, 1, 2, 8, ["groups 2"]),
    ("depthwise", 16, 16, 1, 16, 8, ["groups 16"]),
    ("odd-size", 16, 16, 1, 1, 9, ["9x9"]),
    ("stride2-odd-size", 16, 16, 2, 1, 9, ["stride 2", "9x9"]),
]


def _host(cin: int, cout: int, stride: int, groups: int) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    return nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=False), nn.BatchNorm2d(cout)


def _rejection(cls: type[ConvVariant], cin: int, cout: int, stride: int, groups: int, size: int) -> str | None:
    conv, bn = _host(cin, cout, stride, groups)
    return cls.check(conv, bn if cls.absorbs_bn else None) or cls.check_input(conv, (size, size))


def test_list_convs_is_the_full_registry() -> None:
    assert list_convs() == EXPECTED
    assert plugconv.list_convs() == sorted(plugconv.list_convs())


def test_unknown_variant_names_value_and_choices() -> None:
    with pytest.raises(KeyError) as ei:
        get_conv("nope")
    msg = str(ei.value)
    assert "'nope'" in msg
    assert all(name in msg for name in list_convs())
    with pytest.raises(ValueError, match="nope"):  # also a ValueError, for `except ValueError`
        create_conv("nope", 8, 8)


@pytest.mark.parametrize("name", VARIANTS)
def test_class_metadata(name: str) -> None:
    cls = get_conv(name)
    assert issubclass(cls, ConvVariant) and cls.name == name
    assert isinstance(cls.paper, str) and cls.paper
    assert isinstance(cls.year, int)
    assert isinstance(cls.exact_transfer, bool) and isinstance(cls.absorbs_bn, bool)
    assert isinstance(cls.constraints, str) and cls.constraints


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("cfg", GRID, ids=[g[0] for g in GRID])
def test_forward_backward_or_clear_rejection(name: str, cfg) -> None:
    _, cin, cout, stride, groups, size, names_value = cfg
    cls = get_conv(name)
    reason = _rejection(cls, cin, cout, stride, groups, size)
    conv, bn = _host(cin, cout, stride, groups)
    conv_reason = cls.check(conv, bn if cls.absorbs_bn else None)
    torch.manual_seed(0)
    if conv_reason is not None:
        with pytest.raises(ValueError) as ei:
            create_conv(name, cin, cout, 3, stride=stride, groups=groups)
        assert str(ei.value) == conv_reason  # constructor and check() agree
    else:
        m = create_conv(name, cin, cout, 3, stride=stride, groups=groups)
    if reason is not None:
        assert any(s in reason for s in names_value), f"{name} rejects {cfg[0]} without naming the value: {reason!r}"
        return
    ref_shape = nn.Conv2d(cin, cout, 3, stride, 1, groups=groups)(torch.zeros(1, cin, size, size)).shape[1:]
    m.train()
    for batch in (1, 4):
        m.zero_grad()
        x = torch.randn(batch, cin, size, size, requires_grad=True)
        out = m(x)
        assert out.shape == (batch, *ref_shape)
        assert torch.isfinite(out).all()
        out.square().mean().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().max() > 0
        for pname, p in m.named_parameters():
            assert p.grad is not None, f"{name}.{pname} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{name}.{pname} has a non-finite gradient"


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("size", [2, 3, 5])
@pytest.mark.parametrize("stride", [1, 2])
def test_small_inputs_run_or_are_refused_by_check_input(name: str, size: int, stride: int) -> None:
    cls = get_conv(name)
    conv, bn = _host(16, 16, stride, 1)
    if cls.check(conv, bn if cls.absorbs_bn else None) is not None:
        pytest.skip(f"{name} does not take stride {stride}")
    reason = cls.check_input(conv, (size, size))
    if reason is not None:
        assert f"{size}x{size}" in reason, reason
        return
    m = create_conv(name, 16, 16, 3, stride=stride).eval()
    with torch.no_grad():
        out = m(torch.randn(1, 16, size, size))
    assert out.shape == conv(torch.zeros(1, 16, size, size)).shape


@pytest.mark.parametrize("name", VARIANTS)
def test_from_conv_shape_and_declared_exactness(name: str) -> None:
    cls = get_conv(name)
    torch.manual_seed(1)
    conv, bn = _host(16, 16, 1, 1)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    conv.eval()
    bn.eval()
    m = cls.from_conv(conv, bn if cls.absorbs_bn else None).eval()
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        ref = bn(conv(x)) if cls.absorbs_bn else conv(x)
        out = m(x)
    assert out.shape == ref.shape
    if cls.exact_transfer:
        assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-5


def _record_taps(m: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    rec: dict[str, torch.Tensor] = {}
    handles = []
    for n, t in m.named_modules():
        if isinstance(t, Tap):
            handles.append(t.register_forward_hook(lambda mod, i, o, n=n: rec.__setitem__(n, o.detach().clone())))
    try:
        with torch.no_grad():
            out = m(x)
    finally:
        for h in handles:
            h.remove()
    return out, rec


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("stride", [1, 2])
def test_recording_taps_never_changes_output(name: str, stride: int) -> None:
    cls = get_conv(name)
    conv, bn = _host(16, 16, stride, 1)
    if cls.check(conv, bn if cls.absorbs_bn else None) is not None:
        pytest.skip(f"{name} does not take stride {stride}")
    torch.manual_seed(2)
    m = create_conv(name, 16, 16, 3, stride=stride).eval()
    with torch.no_grad():  # move every parameter off its (often symmetric) init
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    for batch in (1, 3):
        x = torch.randn(batch, 16, 8, 8)
        with torch.no_grad():
            plain = m(x)
        recorded, rec = _record_taps(m, x)
        assert torch.equal(plain, recorded)
        taps = {n: t for n, t in m.named_modules() if isinstance(t, Tap)}
        assert set(rec) == set(taps), f"taps that did not fire: {set(taps) - set(rec)}"
        for n, t in rec.items():
            kind = taps[n].kind
            if kind == "channel_weights" and t.dim() == 1:
                continue  # input-independent weights (e.g. scconv's w_gamma, C)
            assert t.shape[0] == batch, (n, t.shape)
            if kind != "channel_weights":  # channel weights: N×C or N×branches×C
                assert t.dim() == 4, (n, kind, t.shape)
        # no hook left behind
        assert all(not t._forward_hooks for t in taps.values())


@pytest.mark.parametrize("name", VARIANTS)
def test_every_tap_has_valid_kind_and_description(name: str) -> None:
    cls = get_conv(name)
    conv, bn = _host(16, 16, 1, 1)
    m = cls.from_conv(conv, bn if cls.absorbs_bn else None)
    taps = m.taps() if isinstance(m, ConvVariant) else {}
    if name != "conv":
        assert taps, f"{name} exposes no taps"
    for local, t in taps.items():
        assert t.kind in TAP_KINDS, (local, t.kind)
        assert isinstance(t.description, str) and t.description.strip(), local
