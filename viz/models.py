"""Analysis copies of models: ``ModelEntry``, ``prepare_model`` and the site presets.

An *analysis copy* is the swapped model in eval mode, with every in-place activation turned off
(``inplace=False``, so the recorder's saved activations are never overwritten) and every parameter
frozen (``requires_grad=False``: the recorded pass takes gradients with respect to activations,
never weights). It is made once per (backbone, variant, preset) and shared read-only; the
``lock`` serialises passes on it (hooks on a shared model would otherwise see each other's
activations).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from plugconv.surgery import SwapResult, swap_convs

if TYPE_CHECKING:  # pragma: no cover
    from plugconv.backbones import Backbone

#: the default preset label (what every paper replaces)
DEFAULT_PRESET = "all k×k convs in residual blocks"

_RESNET_RE = re.compile(r"^(resnet|resnext|wide_resnet)")
_RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")
_EFFNET_STAGES = tuple(f"blocks.{i}" for i in range(7))


@dataclass(frozen=True)
class ModelEntry:
    """One prepared model, ready for :func:`viz.analysis.analyze`.

    Attributes:
        label: column header in the UI / report, e.g. ``"scconv"``.
        variant: registry key of the variant (``"conv"`` for the baseline).
        model: the analysis copy: eval mode, no in-place ops, parameters ``requires_grad=False``.
        swap: the ``SwapResult`` (swapped / skipped sites with reasons, per-site provenance).
        lock: held while a pass (recording, ERF, profiling) runs on ``model``.
        preset: the site preset label used, or None for explicit options.
        backbone: backbone name the entry was built from.
    """

    label: str
    variant: str
    model: nn.Module
    swap: SwapResult
    lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)
    preset: str | None = None
    backbone: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no model)."""
        d = self.swap.to_dict()
        d.update({"label": self.label, "preset": self.preset, "backbone": self.backbone})
        return d


def stage_names(backbone_name: str) -> tuple[str, ...]:
    """Module paths of the stages of a known backbone (ResNet ``layer1..4``, EfficientNet ``blocks.0..6``).

    Returns an empty tuple for an unknown name; :func:`default_layers` then inspects the model.
    """
    if _RESNET_RE.match(backbone_name):
        return _RESNET_STAGES
    if backbone_name.startswith("efficientnet"):
        return _EFFNET_STAGES
    return ()


def default_layers(model: nn.Module) -> list[str]:
    """The stage outputs of ``model``: ``layer1..4`` (torchvision ResNets), ``blocks.i`` (timm
    EfficientNet/MobileNet style), else the top-level children that contain convolutions.
    """
    names = dict(model.named_modules())
    if all(s in names for s in _RESNET_STAGES):
        return list(_RESNET_STAGES)
    blocks = names.get("blocks")
    if isinstance(blocks, nn.Sequential):
        return [f"blocks.{i}" for i in range(len(blocks))]
    out = []
    for n, m in model.named_children():
        if any(isinstance(s, nn.Conv2d) for s in m.modules()):
            out.append(n)
    return out


def site_presets(backbone_name: str) -> dict[str, dict]:
    """Site presets for ``backbone_name``: label -> ``{"include": ..., "exclude": ...}``.

    Labels: ``"all k×k convs in residual blocks"`` (default, the first key), ``"last stage only"``
    and ``"first stage only"``. The restricted presets keep the default rule (k×k convs inside
    residual blocks) and exclude the other stages, so 1×1 and downsample convs never enter.
    Unknown backbones get only the default preset.
    """
    presets: dict[str, dict] = {DEFAULT_PRESET: {"include": None, "exclude": None}}
    stages = stage_names(backbone_name)
    if stages:
        presets["last stage only"] = {"include": None, "exclude": [f"{s}.*" for s in stages[:-1]]}
        presets["first stage only"] = {"include": None, "exclude": [f"{s}.*" for s in stages[1:]]}
    return presets


def make_analysis_copy(model: nn.Module) -> nn.Module:
    """Turn ``model`` (already a private copy) into an analysis copy, in place, and return it.

    Sets eval mode, ``inplace=False`` on every module that has an ``inplace`` flag (ReLU, ReLU6,
    SiLU, Hardswish, Dropout, timm activations) and ``requires_grad=False`` on every parameter.
    """
    model.eval()
    for m in model.modules():
        if isinstance(getattr(m, "inplace", None), bool):
            m.inplace = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def prepare_model(
    backbone: Backbone,
    variant: str,
    *,
    preset: str | None = None,
    options: dict | None = None,
    label: str | None = None,
) -> ModelEntry:
    """Swap ``variant`` into ``backbone.model`` and make the analysis copy.

    Args:
        backbone: a loaded ``plugconv.backbones.Backbone`` (never modified).
        variant: registry key (``plugconv.list_convs()``); ``"conv"`` is the baseline.
        preset: a key of :func:`site_presets` (default: all k×k convs in residual blocks).
        options: variant options passed to ``from_conv``; may also hold ``"include"`` /
            ``"exclude"`` patterns overriding the preset.
        label: column label (default: the variant name).

    Returns:
        ModelEntry: with the swap result (sites that cannot take the variant are listed in
        ``entry.swap.skipped`` with reasons; zero swapped sites is not an error).

    Raises:
        KeyError: unknown preset (message lists the choices).
        plugconv.UnknownVariantError: unknown variant.
        ValueError: invalid variant options.
    """
    presets = site_presets(backbone.name)
    key = preset if preset is not None else DEFAULT_PRESET
    if key not in presets:
        raise KeyError(f"unknown site preset {preset!r} for {backbone.name}; choose one of {', '.join(presets)}")
    opts = dict(options or {})
    include = opts.pop("include", presets[key]["include"])
    exclude = opts.pop("exclude", presets[key]["exclude"])
    probe = int(getattr(backbone, "input_size", 224) or 224)
    result = swap_convs(backbone.model, variant, include=include, exclude=exclude, inplace=False,
                        probe_size=probe, **opts)
    make_analysis_copy(result.model)
    return ModelEntry(
        label=label or variant,
        variant=variant,
        model=result.model,
        swap=result,
        preset=key,
        backbone=backbone.name,
    )
