"""Surgery: find convolution sites in a host network, swap them for a variant, fuse for deploy.

A *site* is a conv module path (``"layer1.0.conv2"``) plus, for variants that absorb BN, the
BatchNorm that directly consumes the conv's output. The pairing is found by a probe forward pass
(hooks match the BN's input tensor to the conv's output tensor), so it does not depend on naming
conventions; the same pass records the spatial size each site sees, for size constraints.
"""

from __future__ import annotations

import copy
import fnmatch
import inspect
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from plugconv.base import ConvVariant
from plugconv.registry import get_conv

#: module class names that mark a residual / inverted-residual block (torchvision and timm)
BLOCK_CLASS_RE = re.compile(r"(Block|Bottleneck|Residual|DepthwiseSeparable)")

#: per-site parameter status, see ``SwapResult.provenance``
PARAM_STATUSES = ("exact", "calibrated", "trained", "initialised")


@dataclass(frozen=True)
class Site:
    """One convolution site of a host network.

    Attributes:
        name: module path of the conv.
        conv: the conv module (in the model it was found in).
        bn_name: module path of the BatchNorm that consumes the conv output directly, or None.
        input_hw: spatial size (H, W) of the conv input in the probe pass, or None if not probed.
    """

    name: str
    conv: nn.Conv2d
    bn_name: str | None = None
    input_hw: tuple[int, int] | None = None


@dataclass(frozen=True)
class SwapResult:
    """What ``swap_convs`` did.

    Attributes:
        model: the swapped model (a copy unless ``inplace=True``).
        variant: registry key of the variant.
        swapped: module paths of the sites that now hold the variant.
        skipped: ``(site, reason)`` for each default/included site that could not take it.
        exact: True when every swapped site reproduces the original exactly (vacuously for none).
        provenance: per swapped site, one of ``PARAM_STATUSES``.
        options: the variant options used.
    """

    model: nn.Module
    variant: str
    swapped: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]
    exact: bool
    provenance: dict[str, str] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no model)."""
        return {
            "variant": self.variant,
            "swapped": list(self.swapped),
            "skipped": [{"site": s, "reason": r} for s, r in self.skipped],
            "exact": self.exact,
            "provenance": dict(self.provenance),
            "options": {k: repr(v) if not isinstance(v, (int, float, str, bool)) else v for k, v in self.options.items()},
        }


def _patterns(p: str | Sequence[str] | None) -> list[str]:
    if p is None:
        return []
    return [p] if isinstance(p, str) else list(p)


def _in_block(name: str, modules: dict[str, nn.Module]) -> bool:
    parts = name.split(".")
    for i in range(1, len(parts)):
        parent = modules.get(".".join(parts[:i]))
        if parent is not None and BLOCK_CLASS_RE.search(type(parent).__name__):
            return True
    return False


def candidate_convs(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> list[str]:
    """Module paths of the convs to consider, in module order.

    Default (``include=None``): every ``nn.Conv2d`` with a kernel larger than 1×1 inside a
    residual block (torchvision ``BasicBlock``/``Bottleneck``, timm ``InvertedResidual``/
    ``DepthwiseSeparableConv``), i.e. the 3×3 (or depthwise k×k) convs the papers replace; never
    the stem. ``include``: ``fnmatch`` patterns over all ``nn.Conv2d`` paths (any kernel).
    ``exclude``: patterns removed afterwards. Modules that already are variants are not candidates.
    """
    modules = dict(model.named_modules())
    inc, exc = _patterns(include), _patterns(exclude)
    out = []
    for name, m in modules.items():
        if not isinstance(m, nn.Conv2d) or isinstance(m, ConvVariant) or _inside_variant(name, modules):
            continue
        if inc:
            if not any(fnmatch.fnmatchcase(name, p) for p in inc):
                continue
        elif max(m.kernel_size) <= 1 or not _in_block(name, modules):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exc):
            continue
        out.append(name)
    return out


def _inside_variant(name: str, modules: dict[str, nn.Module]) -> bool:
    parts = name.split(".")
    return any(isinstance(modules.get(".".join(parts[:i])), ConvVariant) for i in range(1, len(parts)))


def _first_param(model: nn.Module) -> torch.Tensor | None:
    for t in model.parameters():
        return t
    for t in model.buffers():
        return t
    return None


def probe_sites(model: nn.Module, conv_names: Iterable[str], *, probe_size: int = 224) -> dict[str, Site]:
    """Run one forward pass (eval mode, no grad, modes restored) to pair convs with BNs.

    Args:
        model: host network taking N×3×H×W images.
        conv_names: conv module paths to describe.
        probe_size: H = W of the probe input (the sizes sites see are recorded at this size).

    Returns:
        ``{name: Site}`` for every requested conv that ran in the probe (convs that did not run
        are absent).
    """
    modules = dict(model.named_modules())
    wanted = set(conv_names)
    outputs: dict[int, str] = {}
    keep: list[torch.Tensor] = []  # keeps output tensors alive so ids stay unique
    hw: dict[str, tuple[int, int]] = {}
    bn_of: dict[str, str] = {}
    handles = []

    def conv_hook(name: str):
        def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            hw[name] = (int(inp[0].shape[-2]), int(inp[0].shape[-1]))
            outputs[id(out)] = name
            keep.append(out)

        return hook

    def bn_hook(name: str):
        def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...]) -> None:
            src = outputs.get(id(inp[0]))
            if src is not None and src not in bn_of:
                bn_of[src] = name

        return hook

    modes = {n: m.training for n, m in modules.items()}
    ref = _first_param(model)
    x = torch.zeros(1, 3, probe_size, probe_size)
    if ref is not None:
        x = x.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else torch.float32)
    try:
        for n, m in modules.items():
            if n in wanted:
                handles.append(m.register_forward_hook(conv_hook(n)))
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                handles.append(m.register_forward_pre_hook(bn_hook(n)))
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        for n, m in modules.items():
            m.training = modes[n]
    return {n: Site(n, modules[n], bn_of.get(n), hw.get(n)) for n in conv_names if n in hw}


def find_sites(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    *,
    probe_size: int = 224,
) -> list[Site]:
    """The sites ``swap_convs`` would consider, with their BN pairing and input sizes."""
    names = candidate_convs(model, include, exclude)
    probed = probe_sites(model, names, probe_size=probe_size)
    return [probed.get(n, Site(n, model.get_submodule(n))) for n in names]


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, new)


def _bn_remainder(bn: nn.Module) -> nn.Module:
    """What stays when a variant absorbs ``bn``: Identity, or timm ``BatchNormAct2d``'s drop + act."""
    tail = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if isinstance(m, nn.Module)]
    tail = [m for m in tail if not isinstance(m, nn.Identity)]
    if not tail:
        return nn.Identity()
    return tail[0] if len(tail) == 1 else nn.Sequential(*tail)


def swap_convs(
    model: nn.Module,
    variant: str,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    inplace: bool = False,
    probe_size: int = 224,
    **options: Any,
) -> SwapResult:
    """Replace the convolution sites of ``model`` by ``variant``.

    Args:
        model: host network (N×3×H×W → logits); never modified unless ``inplace=True``.
        variant: registry key (``plugconv.list_convs()``); ``"conv"`` returns an unchanged copy.
        include, exclude: ``fnmatch`` patterns over conv module paths (see ``candidate_convs``).
        inplace: modify ``model`` itself.
        probe_size: input H = W for the probe pass that pairs convs with BNs and checks sizes.
        **options: passed to the variant's ``from_conv``.

    Returns:
        SwapResult: the model (same device, dtype and train/eval mode as the input), the swapped
        sites, the skipped sites with reasons, whether the transfer is exact, per-site provenance.

    Raises:
        UnknownVariantError: unknown ``variant`` (message lists the choices).
        ValueError: invalid options (message from the variant).
    """
    cls = get_conv(variant)
    work = model if inplace else copy.deepcopy(model)
    if variant == "conv":
        return SwapResult(work, variant, (), (), True, {}, dict(options))
    names = candidate_convs(work, include, exclude)
    sites = probe_sites(work, names, probe_size=probe_size)
    swapped: list[str] = []
    skipped: list[tuple[str, str]] = []
    provenance: dict[str, str] = {}
    for name in names:
        site = sites.get(name)
        if site is None:
            skipped.append((name, "not reached by a forward pass"))
            continue
        bn = work.get_submodule(site.bn_name) if (cls.absorbs_bn and site.bn_name) else None
        reason = cls.check(site.conv, bn, **_accepted(cls.check, options))
        if reason is None and site.input_hw is not None:
            reason = cls.check_input(site.conv, site.input_hw, **_accepted(cls.check_input, options))
        if reason is not None:
            skipped.append((name, reason))
            continue
        new = cls.from_conv(site.conv, bn, **options)
        ref = site.conv.weight
        new = new.to(device=ref.device, dtype=ref.dtype)
        new.train(site.conv.training)
        _set_module(work, name, new)
        if bn is not None and site.bn_name is not None:
            _set_module(work, site.bn_name, _bn_remainder(bn).train(bn.training))  # keep eval mode
        swapped.append(name)
        provenance[name] = "exact" if cls.exact_transfer else "initialised"
    exact = all(v == "exact" for v in provenance.values())
    return SwapResult(work, variant, tuple(swapped), tuple(skipped), exact, provenance, dict(options))


def _accepted(fn: Any, options: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``options`` that ``fn`` accepts (all of them if it takes ``**kwargs``)."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return options
    names = {p.name for p in params}
    return {k: v for k, v in options.items() if k in names}


def fuse_model(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Deploy form: every re-parameterisable variant (ACB) replaced by its fused ``nn.Conv2d``.

    The input model is not modified unless ``inplace=True``; train/eval mode is kept.
    """
    work = model if inplace else copy.deepcopy(model)
    targets = [
        (n, m) for n, m in work.named_modules()
        if isinstance(m, ConvVariant) and type(m).fuse is not ConvVariant.fuse
    ]
    for name, m in targets:
        fused = m.fuse()
        fused.train(m.training)
        _set_module(work, name, fused)
    return work
