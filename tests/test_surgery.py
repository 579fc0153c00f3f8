"""Surgery on torchvision ResNets: exact swaps (saconv, acb), fusion, no mutation, device/dtype/mode."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from plugconv import fuse_model, swap_convs
from plugconv.surgery import candidate_convs
from plugconv.variants.acb import ACBlock
from plugconv.variants.saconv import SAConv2d

SIZE = 96  # layer4 sees 3x3: the smallest ResNet input SAConv's reflect-padded switch takes everywhere
EXACT = {"saconv": SAConv2d, "acb": ACBlock}


def _randomise_bns(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affines, so a wrong BN transfer cannot pass unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model


def _build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _randomise_bns(getattr(torchvision.models, name)(weights=None), seed).eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, type]]:
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {n: type(m) for n, m in model.named_modules()},
    )


def _same(model: nn.Module, snap: tuple[dict[str, torch.Tensor], dict[str, type]]) -> bool:
    state, types = snap
    now = model.state_dict()
    return (
        now.keys() == state.keys()
        and all(torch.equal(now[k], state[k]) for k in state)
        and {n: type(m) for n, m in model.named_modules()} == types
    )


@pytest.fixture(scope="module")
def resnet50() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = _build("resnet50")
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
    return model, x, ref


@pytest.mark.parametrize("variant", ["saconv", "acb"])
def test_resnet50_every_default_site_is_exact(resnet50, variant: str) -> None:
    model, x, ref = resnet50
    snap = _snapshot(model)
    res = swap_convs(model, variant, probe_size=SIZE)
    assert _same(model, snap)  # input untouched
    default_sites = [f"layer{i}.{j}.conv2" for i, n in zip(range(1, 5), (3, 4, 6, 3)) for j in range(n)]
    assert list(res.swapped) == default_sites and res.skipped == ()
    assert res.exact and set(res.provenance.values()) == {"exact"}
    for site in default_sites:
        assert isinstance(res.model.get_submodule(site), EXACT[variant])
    with torch.no_grad():
        out = res.model(x)
    rel = _rel(out, ref)
    print(f"resnet50 {variant}: max relative logit difference {rel:.3e}")
    assert rel <= 1e-5
    if variant == "acb":  # the paired BN is absorbed
        for site in default_sites:
            assert isinstance(res.model.get_submodule(site.replace("conv2", "bn2")), nn.Identity)
        assert isinstance(res.model.get_submodule("layer1.0.bn1"), nn.BatchNorm2d)
    else:
        assert isinstance(res.model.get_submodule("layer1.0.bn2"), nn.BatchNorm2d)


def test_resnet50_acb_fused_equals_unfused(resnet50) -> None:
    model, x, ref = resnet50
    swapped = swap_convs(model, "acb", probe_size=SIZE).model
    with torch.no_grad():  # grow the asymmetric branches so fusion has something to fold
        for m in swapped.modules():
            if isinstance(m, ACBlock):
                for bn in (m.ver_bn, m.hor_bn):
                    bn.weight.uniform_(0.1, 0.3)
                    bn.bias.normal_(0, 0.05)
    snap = _snapshot(swapped)
    fused = fuse_model(swapped)
    assert _same(swapped, snap)  # fuse_model returns a new model
    assert not any(isinstance(m, ACBlock) for m in fused.modules())
    assert sum(isinstance(m, ACBlock) for m in swapped.modules()) == 16
    assert not fused.training
    with torch.no_grad():
        unfused_out, fused_out = swapped(x), fused(x)
    assert _rel(unfused_out, ref) > 1e-3  # the branches now matter
    assert _rel(fused_out, unfused_out) <= 1e-5
    # deploy form has exactly the original parameter count plus one bias per fused conv
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    bn2 = sum(model.get_submodule(f"{s.rsplit('.', 1)[0]}.bn2").num_features for s in candidate_convs(model))
    assert n(fused) == n(model) - 2 * bn2 + bn2


ARCH_CASES = [  # every architecture, each exact variant on several; resnet50 is covered at 96 px above
    ("resnet18", "saconv"),
    ("resnet18", "acb"),
    ("resnet34", "acb"),
    ("resnet101", "saconv"),
    ("resnext50_32x4d", "saconv"),
    ("resnext50_32x4d", "acb"),
    ("wide_resnet50_2", "acb"),
]


@pytest.mark.parametrize(("arch", "variant"), ARCH_CASES, ids=[f"{a}-{v}" for a, v in ARCH_CASES])
def test_torchvision_resnets_swap_exactly(arch: str, variant: str) -> None:
    """64 px input: layer4 sees 2x2, which saconv must skip with a reason (and acb takes)."""
    model = _build(arch, seed=3)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(x)
    res = swap_convs(model, variant, probe_size=64)
    sites = candidate_convs(model)
    assert set(res.swapped) | {s for s, _ in res.skipped} == set(sites)
    if variant == "acb":
        assert res.skipped == () and len(res.swapped) == len(sites)
    else:  # exactly the layer4 sites that see 2x2 are skipped (the stride-2 one sees 4x4)
        small = {s for s in sites if s.startswith("layer4.") and model.get_submodule(s).stride == (1, 1)}
        assert len(small) == sum(s.startswith("layer4.") for s in sites) - 1
        assert {s for s, _ in res.skipped} == small and all("2x2 too small" in r for _, r in res.skipped)
    assert res.exact and all(isinstance(res.model.get_submodule(s), EXACT[variant]) for s in res.swapped)
    if arch == "resnext50_32x4d":  # grouped 3x3 convs are swapped, groups kept
        assert res.model.get_submodule("layer1.0.conv2").groups == 32
    with torch.no_grad():
        assert _rel(res.model(x), ref) <= 1e-5


def test_swap_never_mutates_input_unless_inplace() -> None:
    model = _build("resnet18")
    snap = _snapshot(model)
    for variant in ("acb", "saconv", "conv"):
        res = swap_convs(model, variant, probe_size=64)
        assert res.model is not model
        assert _same(model, snap), variant
    res = swap_convs(model, "acb", inplace=True, probe_size=64)
    assert res.model is model
    assert isinstance(model.layer1[0].conv1, ACBlock) and isinstance(model.layer1[0].bn1, nn.Identity)


def test_skipped_sites_carry_reasons() -> None:
    model = _build("resnet18")
    res = swap_convs(model, "saconv", include=["layer2.0.downsample.0", "layer2.0.conv1"], probe_size=64)
    assert res.swapped == ("layer2.0.conv1",)
    assert len(res.skipped) == 1
    site, reason = res.skipped[0]
    assert site == "layer2.0.downsample.0" and "kernel_size 1" in reason
    # size constraints come from the probe pass: at 48 px layer4.0.conv1 sees 3x3, the rest 2x2
    small = swap_convs(model, "saconv", include="layer4.*.conv*", probe_size=48)
    assert small.swapped == ("layer4.0.conv1",)
    assert [s for s, _ in small.skipped] == ["layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2"]
    assert all("2x2 too small" in r for _, r in small.skipped)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_keeps_dtype_and_mode_float64(mode: str) -> None:
    model = _build("resnet18", seed=5).double().train(mode == "train")
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    for variant in ("acb", "saconv"):
        res = swap_convs(model, variant, probe_size=48)
        assert all(p.dtype == torch.float64 for p in res.model.parameters())
        assert all(b.dtype == torch.float64 for b in res.model.buffers() if b.is_floating_point())
        assert all(m.training == (mode == "train") for m in res.model.modules())
        a, b = copy.deepcopy(model), res.model
        with torch.no_grad():
            out, ref = b(x), a(x)  # train mode: BN batch statistics, exact for both variants
        assert out.dtype == torch.float64
        assert _rel(out, ref) <= 1e-10, variant
        if mode == "train":  # running statistics moved identically (ACB's square BN is the host BN)
            bn = b.layer1[0].conv1.square_bn if variant == "acb" else b.layer1[0].bn1
            torch.testing.assert_close(bn.running_mean, a.layer1[0].bn1.running_mean)
            assert not torch.equal(a.layer1[0].bn1.running_mean, model.layer1[0].bn1.running_mean)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_keeps_device_cuda() -> None:
    model = _build("resnet18").cuda()
    for variant in ("acb", "saconv"):
        res = swap_convs(model, variant, probe_size=64)
        assert all(p.is_cuda for p in res.model.parameters()) and all(b.is_cuda for b in res.model.buffers())
        x = torch.randn(1, 3, 64, 64, device="cuda")
        with torch.no_grad():
            assert _rel(res.model(x), model(x)) <= 1e-4


def test_keeps_device_cpu() -> None:
    model = _build("resnet18")
    res = swap_convs(model, "saconv", probe_size=64)
    assert {p.device for p in res.model.parameters()} == {torch.device("cpu")}
    assert {b.device for b in res.model.buffers()} == {torch.device("cpu")}
