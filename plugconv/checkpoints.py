"""Official variant checkpoints mapped onto our swapped hosts: SCNet (self-calibrated convolutions).

SCNet's released ImageNet checkpoints (MCG-NKU/SCNet, ``scnet.py`` @ 9f28392 / c0b5bd6; see
``shared/reference/variants.md`` §3.2 and §3.6) load into a ResNet whose bottleneck ``conv2``
sites hold our ``selfcal`` module (:class:`plugconv.variants.selfcal.SelfCalibratedConv2d`),
reproducing the official network's outputs (tested against a transcription of the official
architecture; eval mode).

Hosts:

- ``scnet50`` / ``scnet101``: torchvision ``resnet50`` / ``resnet101`` (7×7 stem, stride in the
  3×3 conv, 1×1-strided downsample: the official ``SCNet(deep_stem=False, avg_down=False,
  avd=False)``).
- ``scnet50_v1d``: timm ``resnet50d`` (deep 3×3 stem of widths 32, 32, 64; average-pool
  downsample ``AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)`` then 1×1 conv) with
  timm's anti-aliasing slot set to ``AvgPool2d(3, stride 2, padding 1)``. In timm's bottleneck
  that slot sits after ``conv2 → bn2 → act2`` and the 3×3 conv then runs at stride 1, which is
  exactly the official ``avd`` layer (``avd_layer`` applied to both halves after their ReLUs, the
  convs at stride 1) in the first block of ``layer2``–``layer4``. (timm would also put that pool
  in the stem; the stem's ``MaxPool2d(3, 2, 1)`` is restored.)

Key mapping, per bottleneck ``layerX.Y.`` (official → ours):

- ``conv1_a.weight`` and ``conv1_b.weight`` stacked row-wise (a first) → ``conv1.weight``;
  ``bn1_a.*`` and ``bn1_b.*`` concatenated → ``bn1.*`` (exact: BN and ReLU act per channel, and
  our module sends the first half of the channels to ``k1`` and the second to the calibrated
  path, as the official block feeds ``out_a`` to ``k1`` and ``out_b`` to ``scconv``);
- ``k1.0/.1`` → ``conv2.k1.0/.1``; ``scconv.k2.1/.2`` → ``conv2.k2.1/.2`` (index 0 is the pool);
  ``scconv.k3.0/.1`` → ``conv2.k3.0/.1``; ``scconv.k4.0/.1`` → ``conv2.k4.0/.1``;
  ``bn2`` becomes Identity (absorbed);
- ``conv3``, ``bn3``, ``downsample.*``, the stem and ``fc`` keep their names.

First-commit copies of ``scnet.py`` have a ReLU inside ``k1``/``k4`` and halve ``planes``; their
state dicts have the same names and shapes, and the ReLUs coincide with the block's ReLU after
each half, so they map the same way. The ``scnet50`` URL of that first version pointed to the
scnet101 file (issue #1): :func:`detect_scnet_arch` reads the architecture from the file, and a
file of another architecture is refused with a message saying which one it is.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from plugconv.backbones import Backbone, WeightsInfo
from plugconv.surgery import SwapResult, swap_convs
from plugconv.weights import (
    WeightsError,
    confine_weights_path,
    load_state_dict_checked,
    load_state_dict_file,
    sha256_file,
)

__all__ = [
    "SCNET_ARCHS",
    "ScnetArch",
    "build_scnet_host",
    "detect_scnet_arch",
    "load_scnet_backbone",
    "load_scnet_checkpoint",
    "map_scnet_state_dict",
]


@dataclass(frozen=True)
class ScnetArch:
    """One released SCNet checkpoint (variants.md §3.6).

    Attributes:
        name: factory name in the official code.
        layers: bottlenecks per stage.
        v1d: deep stem + average-pool downsampling + ``avd`` (ResNet-D style).
        filename: released file under ``url_base``.
        params: parameter count of the official model.
        top1: reported ImageNet top-1 (%).
    """

    name: str
    layers: tuple[int, int, int, int]
    v1d: bool
    filename: str
    params: int
    top1: float

    url_base = "https://backseason.oss-cn-beijing.aliyuncs.com/scnet/"

    @property
    def url(self) -> str:
        return self.url_base + self.filename


SCNET_ARCHS: dict[str, ScnetArch] = {
    "scnet50": ScnetArch("scnet50", (3, 4, 6, 3), False, "scnet50-dc6a7e87.pth", 25_564_584, 77.81),
    "scnet101": ScnetArch("scnet101", (3, 4, 23, 3), False, "scnet101-44c5b751.pth", 44_565_416, 78.94),
    "scnet50_v1d": ScnetArch("scnet50_v1d", (3, 4, 6, 3), True, "scnet50_v1d-4109d1e1.pth", 25_583_816, 80.47),
}

_BLOCK_RE = re.compile(r"^(layer[1-4]\.\d+)\.(.+)$")
_BN_STATS = ("weight", "bias", "running_mean", "running_var")


def _arch(arch: str) -> ScnetArch:
    try:
        return SCNET_ARCHS[arch]
    except (KeyError, TypeError):
        raise ValueError(f"unknown SCNet architecture {arch!r}; choose one of {', '.join(SCNET_ARCHS)}") from None


class _AvdPool(nn.AvgPool2d):
    """The official SCNet ``avd_layer``: ``AvgPool2d(3, stride, padding=1)`` (count_include_pad),
    built through timm's anti-aliasing factory (which passes ``channels`` and ``stride``)."""

    def __init__(self, channels: int | None = None, stride: int = 2, **_: object) -> None:
        super().__init__(kernel_size=3, stride=stride, padding=1)


def build_scnet_host(arch: str) -> nn.Module:
    """The plain ResNet host whose ``conv2`` sites take ``selfcal`` to become ``arch``.

    Returns:
        torchvision ``resnet50``/``resnet101`` (scnet50/101) or timm ``resnet50d`` with the avd
        pool (scnet50_v1d); random initialisation, train mode as built.
    """
    a = _arch(arch)
    if a.v1d:
        import timm

        host = timm.create_model("resnet50d", pretrained=False, num_classes=1000, aa_layer=_AvdPool)
        # timm also routes the stem pool through aa_layer (an AvgPool2d subclass replaces the max
        # pool); the official v1d stem keeps MaxPool2d(3, 2, 1)
        host.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        return host
    import torchvision

    return torchvision.models.get_model("resnet50" if a.layers[2] == 6 else "resnet101", weights=None)


def detect_scnet_arch(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Which released SCNet architecture an official-layout state dict belongs to.

    Raises:
        WeightsError: not an official SCNet state dict (no ``layerX.Y.conv1_a.weight`` keys), or a
            layout none of ``SCNET_ARCHS`` has.
    """
    if not any(k.endswith(".conv1_a.weight") for k in state_dict):
        sample = ", ".join(list(state_dict)[:6])
        raise WeightsError(
            f"not an official SCNet checkpoint: no 'layerX.Y.conv1_a.weight' keys (first keys: {sample})"
        )
    blocks = []
    for stage in range(1, 5):
        idx = {int(m.group(1)) for k in state_dict if (m := re.match(rf"^layer{stage}\.(\d+)\.", k))}
        blocks.append(max(idx) + 1 if idx else 0)
    v1d = "conv1.0.weight" in state_dict
    for a in SCNET_ARCHS.values():
        if tuple(blocks) == a.layers and a.v1d == v1d:
            return a.name
    kind = "deep (v1d) stem" if v1d else "7x7 stem"
    raise WeightsError(
        f"SCNet checkpoint with blocks per stage {tuple(blocks)} and a {kind} matches none of "
        f"{', '.join(f'{a.name} {a.layers}' for a in SCNET_ARCHS.values())}"
    )


def map_scnet_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Re-key an official SCNet state dict to our ``selfcal``-swapped ResNet (see module doc).

    Args:
        state_dict: official key layout (``layer1.0.conv1_a.weight``, ``layer1.0.scconv.k2.1.weight``, ...).

    Returns:
        The state dict in our layout (``layer1.0.conv1.weight``, ``layer1.0.conv2.k2.1.weight``, ...).

    Raises:
        WeightsError: a block with ``conv1_a``/``bn1_a`` but no ``conv1_b``/``bn1_b`` partner (or
            halves of different shapes).
    """
    out: dict[str, torch.Tensor] = {}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        m = _BLOCK_RE.match(key)
        if m is None:
            out[key] = value
            continue
        block, rest = m.groups()
        if rest.startswith(("conv1_a.", "conv1_b.", "bn1_a.", "bn1_b.")):
            pairs.setdefault(block, {})[rest] = value
        elif rest.startswith("k1."):
            out[f"{block}.conv2.{rest}"] = value
        elif rest.startswith("scconv."):
            out[f"{block}.conv2.{rest[len('scconv.'):]}"] = value
        else:
            out[key] = value
    for block, parts in pairs.items():
        for a_name, b_name, dst in (
            ("conv1_a.weight", "conv1_b.weight", "conv1.weight"),
            *((f"bn1_a.{s}", f"bn1_b.{s}", f"bn1.{s}") for s in _BN_STATS),
        ):
            if a_name not in parts and b_name not in parts:
                continue
            if a_name not in parts or b_name not in parts:
                have, lack = (a_name, b_name) if a_name in parts else (b_name, a_name)
                raise WeightsError(f"SCNet checkpoint has {block}.{have} but not {block}.{lack}")
            a, b = parts[a_name], parts[b_name]
            if a.shape[1:] != b.shape[1:]:
                raise WeightsError(
                    f"SCNet checkpoint halves {block}.{a_name} {tuple(a.shape)} and {block}.{b_name} "
                    f"{tuple(b.shape)} cannot be stacked"
                )
            out[f"{block}.{dst}"] = torch.cat([a, b], dim=0)
        if "bn1_a.num_batches_tracked" in parts:
            out[f"{block}.bn1.num_batches_tracked"] = parts["bn1_a.num_batches_tracked"]
    return out


def load_scnet_checkpoint(
    path_or_state_dict: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    arch: str = "scnet50",
    *,
    device: str | torch.device = "cpu",
    weights_dir: str | os.PathLike[str] | None = None,
) -> SwapResult:
    """Build ``arch`` as a ``selfcal``-swapped ResNet and load an official SCNet checkpoint into it.

    Args:
        path_or_state_dict: the released ``.pth`` (read with ``weights_only=True``), a
            ``.safetensors`` file, or an already loaded state dict in the official key layout.
        arch: ``"scnet50"``, ``"scnet101"`` or ``"scnet50_v1d"``; must match the file.
        device: where the model goes.
        weights_dir: when set, a path must be a name inside this directory (or an absolute path
            that really lies inside it), as in ``load_backbone``.

    Returns:
        SwapResult: eval-mode model (N×3×H×W ImageNet-normalised images, H, W ≥ 128 so that
        ``layer4`` sees ≥ 4×4 → N×1000 logits), ``variant="selfcal"``, every ``conv2`` site with
        provenance ``"trained"``, ``exact=False``, options ``{"upsample": "nearest",
        "checkpoint": <file name or "state_dict">, "sha256": <of the file or None>, "arch": arch}``.

    Raises:
        ValueError: unknown ``arch``.
        WeightsError: unreadable/unsafe file, not an SCNet checkpoint, a checkpoint of another
            architecture (the message names it), or keys/shapes that do not fit.
    """
    a = _arch(arch)
    digest: str | None = None
    if isinstance(path_or_state_dict, Mapping):
        sd = dict(path_or_state_dict)
        label = "state_dict"
    else:
        path = confine_weights_path(path_or_state_dict, weights_dir)
        sd = load_state_dict_file(path)
        label = path.name
        digest = sha256_file(path)
    found = detect_scnet_arch(sd)
    if found != a.name:
        raise WeightsError(
            f"{label} is an {found} checkpoint (blocks per stage {SCNET_ARCHS[found].layers}"
            f"{', deep stem' if SCNET_ARCHS[found].v1d else ''}), not {a.name} {a.layers}; "
            f"pass arch={found!r} (note: the first scnet.py pointed its scnet50 URL at the scnet101 file)"
        )
    from plugconv.backbones import resolve_device

    dev = resolve_device(device)
    mapped = map_scnet_state_dict(sd)
    # Build and swap on the meta device (no initialisation, no real probe pass: every tensor is
    # then overwritten by the checkpoint), then materialise on the target device.
    with torch.device("meta"):
        host = build_scnet_host(a.name)
        result = swap_convs(host, "selfcal", include="layer*.*.conv2", inplace=True, upsample="nearest")
    expected = sum(a.layers)
    if len(result.swapped) != expected or result.skipped:
        raise RuntimeError(
            f"selfcal swapped {len(result.swapped)} of {expected} conv2 sites in the {a.name} host; "
            f"skipped: {list(result.skipped)}"
        )
    model = result.model
    keys = set(model.state_dict())
    uncovered = [n for n, _ in (*model.named_parameters(), *model.named_buffers()) if n not in keys]
    if uncovered:  # a non-persistent buffer would stay uninitialised after to_empty
        raise RuntimeError(f"SCNet host has tensors outside its state dict: {uncovered[:5]}")
    model = model.to_empty(device=dev)
    load_state_dict_checked(model, mapped, what=f"SCNet weights {label} (mapped)")
    model.eval()
    return dataclasses.replace(
        result,
        model=model,
        provenance=dict.fromkeys(result.swapped, "trained"),
        options={"upsample": "nearest", "checkpoint": label, "sha256": digest, "arch": a.name},
    )


def load_scnet_backbone(
    path: str | os.PathLike[str],
    arch: str = "scnet50",
    *,
    device: str | torch.device = "auto",
    weights_dir: str | os.PathLike[str] | None = None,
) -> tuple[Backbone, SwapResult]:
    """An official SCNet checkpoint as a :class:`~plugconv.backbones.Backbone` (ImageNet
    preprocessing, as the SCNet README asks), plus the ``SwapResult`` that says which sites are
    ``selfcal`` with provenance ``"trained"``.

    Raises:
        Same as :func:`load_scnet_checkpoint`.
    """
    from plugconv.backbones import IMAGENET_MEAN, IMAGENET_STD, imagenet_categories, resolve_device

    dev = resolve_device(device)
    result = load_scnet_checkpoint(path, arch, device=dev, weights_dir=weights_dir)
    where = confine_weights_path(path, weights_dir)
    info = WeightsInfo(
        source="file",
        location=str(where),
        sha256=result.options["sha256"],
        description=(
            f"official SCNet checkpoint {where.name} ({arch}, reported ImageNet top-1 "
            f"{SCNET_ARCHS[arch].top1:.2f} %), mapped onto a selfcal-swapped ResNet"
        ),
    )
    backbone = Backbone(arch, result.model, 224, IMAGENET_MEAN, IMAGENET_STD, imagenet_categories(), info, dev)
    return backbone, result
