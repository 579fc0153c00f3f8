"""The variant contract shared by every plug-and-play convolution, and the ``Tap``.

A *site* is one convolution of a host network, plus the BatchNorm that follows it when the
variant carries its own normalisation (``absorbs_bn``). Every variant class implements:

- ``check(conv, bn=None) -> str | None``: why the site cannot take the variant (``None`` = it can).
  The message names the offending value and the allowed ones.
- ``from_conv(conv, bn=None, **options)``: build the variant at that site and transfer what can be
  transferred (exactly, when ``exact_transfer`` is True).
- ``exact_transfer``: whether ``from_conv`` reproduces the original site (conv, plus BN when
  absorbed) in eval mode.
- ``absorbs_bn``: whether the variant replaces conv + BN (the BN then becomes ``Identity``).
- ``fuse()``: optional deploy-time re-parameterisation into one ``nn.Conv2d``.

Internal maps worth showing pass through :class:`Tap` submodules: identities that cost nothing
without hooks and are found by ``named_modules()``; the analysis engine hooks them.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

TAP_KINDS = ("spatial_gate", "mask", "channel_weights", "branch")


class Tap(nn.Module):
    """Identity submodule through which a variant routes an internal map.

    Args:
        kind: one of ``TAP_KINDS``: "spatial_gate" (N×C×H×W or N×1×H×W map), "mask" (binary
            map), "channel_weights" (N×C), "branch" (a branch output, N×C×H×W).
        description: one short sentence for the UI: what the map is, its range.
    """

    def __init__(self, kind: str, description: str) -> None:
        super().__init__()
        if kind not in TAP_KINDS:
            raise ValueError(f"tap kind {kind!r} is not one of {TAP_KINDS}")
        self.kind = kind
        self.description = description

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102 - identity
        return x

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


class ConvVariant(nn.Module):
    """Base class of every registered variant (the baseline ``conv`` included).

    Subclasses set the class attributes and implement ``check``/``from_conv``; their constructor
    takes ``nn.Conv2d``-like arguments ``(in_channels, out_channels, kernel_size=3, stride=1,
    padding=None, dilation=1, groups=1, bias=False, **options)`` and raises ``ValueError`` (with
    the ``check`` message) for a configuration the paper's module cannot take.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    year: ClassVar[int] = 0
    exact_transfer: ClassVar[bool] = False
    absorbs_bn: ClassVar[bool] = False
    constraints: ClassVar[str] = ""

    @classmethod
    def check(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None) -> str | None:
        """Return why ``conv`` (+ ``bn``) cannot become this variant, or ``None``."""
        raise NotImplementedError

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None, **options: Any) -> nn.Module:
        """Build the variant at a site and transfer the parameters that can be transferred."""
        raise NotImplementedError

    @classmethod
    def check_input(cls, conv: nn.Conv2d, hw: tuple[int, int]) -> str | None:
        """Return why the site cannot take the variant at input size ``hw`` (H, W), or ``None``.

        Called by surgery with the spatial size the site sees in a probe pass; the default
        accepts every size.
        """
        return None

    def fuse(self) -> nn.Conv2d:
        """Deploy form (one ``nn.Conv2d``); only re-parameterisable variants implement it."""
        raise NotImplementedError(f"{type(self).__name__} has no deploy-time fusion")

    def taps(self) -> dict[str, Tap]:
        """This module's taps by their local name."""
        return {n: m for n, m in self.named_modules() if isinstance(m, Tap)}


def conv_args(conv: nn.Conv2d) -> dict[str, Any]:
    """The constructor arguments of ``conv`` as plain Python values (square kernels only).

    Raises:
        ValueError: for a non-square kernel, stride, padding or dilation, a string padding, or a
            conv subclass with its own ``forward`` (timm's ``Conv2dSame`` pads asymmetrically,
            per input size; ``StdConv2d`` standardises its weight): its arguments do not describe
            what it computes, so no variant built from them can reproduce it.
    """
    if type(conv).forward is not nn.Conv2d.forward and not isinstance(conv, ConvVariant):
        raise ValueError(
            f"{type(conv).__name__} overrides nn.Conv2d.forward (e.g. dynamic TF 'same' padding); "
            "its constructor arguments do not describe what it computes, so it cannot be replaced"
        )
    if isinstance(conv.padding, str):
        raise ValueError(f"padding {conv.padding!r} is not supported; pass integer padding")
    for attr in ("kernel_size", "stride", "padding", "dilation"):
        v = getattr(conv, attr)
        if v[0] != v[1]:
            raise ValueError(f"non-square {attr} {tuple(v)} is not supported")
    return {
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "kernel_size": conv.kernel_size[0],
        "stride": conv.stride[0],
        "padding": conv.padding[0],
        "dilation": conv.dilation[0],
        "groups": conv.groups,
        "bias": conv.bias is not None,
    }


def same_padding(kernel_size: int, dilation: int = 1) -> int:
    """Padding that keeps H×W at stride 1 for an odd kernel: d·(k−1)/2."""
    return dilation * (kernel_size - 1) // 2
