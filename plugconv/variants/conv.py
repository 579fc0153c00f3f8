"""``conv``: the unchanged baseline, a plain ``nn.Conv2d`` (registered so the UI can compare it)."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from plugconv.base import ConvVariant, same_padding
from plugconv.registry import register_conv


@register_conv("conv")
class Conv2d(nn.Conv2d, ConvVariant):
    """The baseline: ``nn.Conv2d`` with "same" padding by default.

    ``from_conv`` returns an exact copy of the site's conv (the BN stays in the host network).
    """

    paper = "baseline (unchanged nn.Conv2d)"
    year = 0
    exact_transfer = True
    absorbs_bn = False
    constraints = "none"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | None = None,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = False,
        **options: Any,
    ) -> None:
        if options:
            raise ValueError(f"conv takes no options; got {sorted(options)}")
        if padding is None:
            padding = same_padding(kernel_size, dilation)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)

    @classmethod
    def check(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None) -> str | None:
        return None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None, **options: Any) -> nn.Module:
        if options:
            raise ValueError(f"conv takes no options; got {sorted(options)}")
        return copy.deepcopy(conv)
