"""SCNet official checkpoints → our selfcal-swapped ResNets (plugconv.checkpoints).

The oracle below is a transcription of the official architecture in MCG-NKU/SCNet ``scnet.py`` at
commit 9f28392c3f92276e9d31b7d161fa4512c7aaea10 (classes ``SCConv``, ``SCBottleneck``, ``SCNet``,
factories ``scnet50``/``scnet101``/``scnet50_v1d``), written out independently with the official
module names, so that a state dict in the official layout loads into it with ``strict=True``. It
is the ground truth: random weights in that layout must give the same logits through it and
through ``load_scnet_checkpoint``.
"""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from plugconv import list_convs
from plugconv.checkpoints import (
    SCNET_ARCHS,
    build_scnet_host,
    detect_scnet_arch,
    load_scnet_backbone,
    load_scnet_checkpoint,
    map_scnet_state_dict,
)
from plugconv.weights import WeightsError

needs_selfcal = pytest.mark.skipif("selfcal" not in list_convs(), reason="selfcal variant not registered yet")


# ----------------------------------------------------------------------------- the oracle
# Official SCNet (scnet.py @ 9f28392): SCConv = k2 (avgpool r, conv, BN), k3 (conv, BN), k4 (conv
# stride s, BN); out = k4(k3(x) * sigmoid(x + interpolate(k2(x), size)))  [nearest: F.interpolate
# default]. SCBottleneck: two 1x1 convs conv1_a/conv1_b (width planes/2 each, bottleneck_width 32),
# BN + ReLU each; a -> k1 (conv stride s, BN), b -> scconv; ReLU each; avd pool (3, s, 1) in v1d
# stride-2 blocks (then the 3x3 convs run at stride 1); conv3(cat[a, b]), bn3, + downsample, ReLU.


class OfficialSCConv(nn.Module):
    def __init__(self, width: int, stride: int, pooling_r: int = 4) -> None:
        super().__init__()

        def conv(s: int) -> nn.Conv2d:
            return nn.Conv2d(width, width, 3, stride=s, padding=1, bias=False)

        self.k2 = nn.Sequential(nn.AvgPool2d(pooling_r, pooling_r), conv(1), nn.BatchNorm2d(width))
        self.k3 = nn.Sequential(conv(1), nn.BatchNorm2d(width))
        self.k4 = nn.Sequential(conv(stride), nn.BatchNorm2d(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(x + F.interpolate(self.k2(x), x.shape[2:]))
        return self.k4(self.k3(x) * gate)


class OfficialSCBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 avd: bool = False, is_first: bool = False) -> None:
        super().__init__()
        width = int(planes * (32 / 64.0))
        self.conv1_a = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1_a = nn.BatchNorm2d(width)
        self.conv1_b = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1_b = nn.BatchNorm2d(width)
        self.avd = avd and (stride > 1 or is_first)
        if self.avd:
            self.avd_layer = nn.AvgPool2d(3, stride, padding=1)
            stride = 1
        self.k1 = nn.Sequential(nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(width))
        self.scconv = OfficialSCConv(width, stride)
        self.conv3 = nn.Conv2d(width * 2, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu(self.bn1_a(self.conv1_a(x)))
        b = self.relu(self.bn1_b(self.conv1_b(x)))
        a = self.relu(self.k1(a))
        b = self.relu(self.scconv(b))
        if self.avd:
            a, b = self.avd_layer(a), self.avd_layer(b)
        out = self.bn3(self.conv3(torch.cat([a, b], dim=1)))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(out + residual)


class OfficialSCNet(nn.Module):
    def __init__(self, layers: tuple[int, ...], deep_stem: bool = False, stem_width: int = 32,
                 avg_down: bool = False, avd: bool = False, num_classes: int = 1000) -> None:
        super().__init__()
        self.inplanes = stem_width * 2 if deep_stem else 64
        self.avg_down, self.avd = avg_down, avd
        if deep_stem:
            self.conv1 = nn.Sequential(
                nn.Conv2d(3, stem_width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(stem_width), nn.ReLU(),
                nn.Conv2d(stem_width, stem_width, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(stem_width),
                nn.ReLU(),
                nn.Conv2d(stem_width, stem_width * 2, 3, stride=1, padding=1, bias=False),
            )
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0], is_first=False)
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * 4, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1, is_first: bool = True) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            down: list[nn.Module] = []
            if self.avg_down:
                down.append(nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False))
                down.append(nn.Conv2d(self.inplanes, planes * 4, 1, stride=1, bias=False))
            else:
                down.append(nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False))
            down.append(nn.BatchNorm2d(planes * 4))
            downsample = nn.Sequential(*down)
        out = [OfficialSCBottleneck(self.inplanes, planes, stride, downsample, avd=self.avd, is_first=is_first)]
        self.inplanes = planes * 4
        out += [OfficialSCBottleneck(self.inplanes, planes, avd=self.avd) for _ in range(1, blocks)]
        return nn.Sequential(*out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def official(arch: str, device: str = "meta") -> OfficialSCNet:
    """The official network for ``arch``; on the meta device unless asked (no initialisation cost:
    ``randomise`` fills every tensor)."""
    a = SCNET_ARCHS[arch]
    with torch.device("meta"):
        if a.v1d:
            model = OfficialSCNet(a.layers, deep_stem=True, stem_width=32, avg_down=True, avd=True)
        else:
            model = OfficialSCNet(a.layers, deep_stem=False, stem_width=32 if arch == "scnet50" else 64)
    return model if device == "meta" else model.to_empty(device=device)


def randomise(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Random weights and BN statistics, so that every entry matters; returns the state dict."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.zero_()
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.75)
            elif name.endswith(("running_mean", "bias")):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif t.dim() == 1:  # BN weight; small on the residual branch so logits stay O(10)
                scale = 0.2 if name.endswith("bn3.weight") else 1.0
                t.copy_((torch.rand(t.shape, generator=g) * 0.5 + 0.75) * scale)
            else:
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=g) * (2.0 / fan_in) ** 0.5)
    return {k: v.clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("arch", list(SCNET_ARCHS))
def test_oracle_parameter_counts_match_released_checkpoints(arch: str) -> None:
    # variants.md §3.6 (README): scnet50 25.56M, scnet50_v1d 25.58M, scnet101 44.57M
    model = official(arch)
    assert sum(p.numel() for p in model.parameters()) == SCNET_ARCHS[arch].params


@pytest.mark.parametrize("arch", list(SCNET_ARCHS))
def test_detect_arch_from_official_layout(arch: str) -> None:
    assert detect_scnet_arch(official(arch).state_dict()) == arch


@needs_selfcal
@pytest.mark.parametrize("arch", ["scnet50", "scnet50_v1d", "scnet101"])
def test_mapping_reproduces_official_outputs(arch: str, tmp_path) -> None:
    torch.manual_seed(0)
    oracle = official(arch, "cpu")
    sd = randomise(oracle, seed=1)
    oracle.load_state_dict(sd, strict=True)
    oracle.eval()
    if arch == "scnet50":  # through a file (weights_only torch.load), as a Backbone
        source = tmp_path / f"{arch}.pth"
        torch.save(sd, source)
        backbone, result = load_scnet_backbone(source, arch=arch, device="cpu")
        assert backbone.model is result.model and backbone.name == arch
        assert backbone.weights.source == "file" and backbone.weights.location == str(source)
        assert backbone.weights.sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
        assert result.options["sha256"] == backbone.weights.sha256
    else:  # straight from memory
        result = load_scnet_checkpoint(sd, arch=arch)
        assert result.options["sha256"] is None
    assert result.variant == "selfcal"
    assert len(result.swapped) == sum(SCNET_ARCHS[arch].layers)
    assert set(result.provenance.values()) == {"trained"}
    assert not result.exact
    assert result.options["arch"] == arch
    model = result.model
    assert not model.training
    # same parameter count as the official network
    assert sum(p.numel() for p in model.parameters()) == SCNET_ARCHS[arch].params

    # 128 px is the smallest size at which layer4's k2 pooling (r = 4) still has a 1x1 output;
    # one image for the 101-layer network keeps it cheap
    x = torch.randn(1 if arch == "scnet101" else 2, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = oracle(x)
        got = model(x)
    diff = (got - want).abs().max().item()
    print(f"{arch}: max |logit difference| = {diff:.3g} (logit scale {want.abs().max().item():.3g})")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def fill_distinct(model: nn.Module) -> dict[str, torch.Tensor]:
    """Cheap stand-in weights: tensor i of the state dict is filled with i (tells tensors apart)."""
    with torch.no_grad():
        for i, t in enumerate(model.state_dict().values()):
            t.fill_(i)
    return dict(model.state_dict())


@needs_selfcal
def test_scnet101_maps_from_state_dict() -> None:
    sd = fill_distinct(official("scnet101", "cpu"))
    result = load_scnet_checkpoint(sd, arch="scnet101")
    assert len(result.swapped) == 33
    assert sum(p.numel() for p in result.model.parameters()) == SCNET_ARCHS["scnet101"].params
    # spot-check the stacking of one block: conv1 = [conv1_a; conv1_b], k2 conv from scconv.k2.1
    blk = result.model.layer3[22]
    torch.testing.assert_close(blk.conv1.weight, torch.cat([sd["layer3.22.conv1_a.weight"], sd["layer3.22.conv1_b.weight"]]))
    torch.testing.assert_close(blk.bn1.running_var, torch.cat([sd["layer3.22.bn1_a.running_var"], sd["layer3.22.bn1_b.running_var"]]))
    torch.testing.assert_close(blk.conv2.k2[1].weight, sd["layer3.22.scconv.k2.1.weight"])
    assert isinstance(blk.bn2, nn.Identity)


@needs_selfcal
def test_wrong_architecture_file_is_refused_with_its_name(tmp_path) -> None:
    # the first scnet.py pointed scnet50 at the scnet101 file (MCG-NKU/SCNet issue #1)
    # only the key layout tells architectures apart; tiny tensors keep the file small
    sd = {k: torch.zeros(1) for k in official("scnet101").state_dict()}
    path = tmp_path / "scnet50-dc6a7e87.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsError, match=r"scnet101 checkpoint .* not scnet50"):
        load_scnet_checkpoint(path, arch="scnet50")


def test_unknown_arch_and_non_scnet_file(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"unknown SCNet architecture 'scnet18'.*scnet50"):
        load_scnet_checkpoint({}, arch="scnet18")
    import torchvision

    path = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    with pytest.raises(WeightsError, match="not an official SCNet checkpoint"):
        load_scnet_checkpoint(path, arch="scnet50")


@needs_selfcal
def test_damaged_checkpoint_lists_missing_and_mismatching_keys() -> None:
    sd = {k: torch.zeros_like(v, device="cpu") for k, v in official("scnet50").state_dict().items()}
    del sd["layer2.1.scconv.k3.0.weight"]
    sd["fc.weight"] = torch.zeros(10, 2048)
    with pytest.raises(WeightsError) as info:
        load_scnet_checkpoint(sd, arch="scnet50")
    msg = str(info.value)
    assert "layer2.1.conv2.k3.0.weight" in msg and "missing" in msg
    assert "fc.weight: file (10, 2048) vs model (1000, 2048)" in msg


def test_lone_half_is_reported() -> None:
    sd = {"layer1.0.conv1_a.weight": torch.zeros(32, 64, 1, 1)}
    with pytest.raises(WeightsError, match="conv1_a.weight but not layer1.0.conv1_b.weight"):
        map_scnet_state_dict(sd)


def test_v1d_host_has_the_avd_pool_in_stride_two_blocks_only() -> None:
    host = build_scnet_host("scnet50_v1d")
    pools = {n for n, m in host.named_modules() if n.endswith(".aa") and isinstance(m, nn.AvgPool2d)}
    assert pools == {"layer2.0.aa", "layer3.0.aa", "layer4.0.aa"}
    assert all(host.get_submodule(p[:-3]).conv2.stride == (1, 1) for p in pools)
    assert type(host.maxpool) is nn.MaxPool2d and host.maxpool.kernel_size == 3 and host.maxpool.stride == 2
    assert os.path.basename(SCNET_ARCHS["scnet50_v1d"].url) == "scnet50_v1d-4109d1e1.pth"
