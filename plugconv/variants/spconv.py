"""``spconv``: SPConv, "Split to Be Slim" 3×3 convolution.

Paper: Q. Zhang, Z. Jiang, Q. Lu, J. Han, Z. Zeng, S.-H. Gao, A. Men, "Split to Be Slim: An
Overlooked Redundancy in Vanilla Convolution", IJCAI 2020 (arXiv:2006.12085). Checked against the
reference code qiulinzhang/SPConv.pytorch ``code/resnet_sp.py`` class ``SPConv_3x3`` (@ 2c8b6a0)
and ``shared/reference/variants.md`` §4. (PyPI's ``spconv`` is an unrelated sparse-conv library.)

Computation (X: N×C_in×H×W → N×C_out×H_out×W_out, stride s ∈ {1, 2}, no activation inside):

1. Split the input channels: representative ``x_r = X[:, :C_r]``, redundant ``x_u = X[:, C_r:]``,
   ``C_r = int(α·C_in)`` (α = ``ratio``, 1/2).
2. ``Y3 = BN1(GWC(x_r) + PWC(x_r'))``: GWC is 3×3, stride s, padding 1, **2 groups**,
   C_r → C_out; PWC is 1×1; ``x_r' = AvgPool(2, 2)(x_r)`` when s = 2, else ``x_r``.
3. ``Y1 = BN2(Conv1×1(x_u'))`` with the same pooling; this 1×1 conv has a bias.
4. Parameter-free fusion per channel: ``s3 = GAP(Y3)``, ``s1 = GAP(Y1)`` (N×C_out);
   ``[β, γ] = softmax([s3, s1])`` across the two branches (β + γ = 1);
   ``out = β ⊙ Y3 + γ ⊙ Y1``.

Parameters at C_in = C_out = 64: 13,632 at α = 1/2 (0.37× a dense 3×3's 36,864).

Taps (``plugconv.base.Tap`` submodules, local names):

* ``fusion_weights`` (channel_weights): ``[β, γ]`` stacked, **N×2×C_out**, in (0, 1), summing to
  1 over dim 1 (β weights the representative branch, γ the redundant one).
* ``representative`` (branch): Y3, N×C_out×H_out×W_out, unbounded.
* ``redundant`` (branch): Y1, N×C_out×H_out×W_out, unbounded.

There is no spatial map.

Limits: kernel 3, "same" padding 1, dilation 1 (the reference silently ignores a bottleneck's
dilation; we reject it), ``groups=1`` (the GWC's 2 groups are fixed as in the reference), stride
1 or 2, and at stride 2 even H and W (the GWC gives ceil(H/2), the pool floor(H/2); see
``check_input``). ``C_r`` must be even (2 GWC groups), ``C_out`` even, and both splits non-empty.
in ≠ out is allowed. ``exact_transfer = False``: the fusion is an input-dependent convex
combination, so no setting reproduces a dense 3×3; ``from_conv`` keeps nothing but the shapes
(fresh initialisation). ``absorbs_bn = False``: as in the reference ResNet, the host BN stays
(BN is applied after the module's own BNs). A host conv's bias is not transferred (the module's
BNs carry the shift; its redundant 1×1 always has a bias).

Where popular copies differ (we follow the fixed reference):

* copies before 2c8b6a0 call a bare ``.squeeze()`` on the pooled descriptors, so batch size 1
  loses the batch axis; we squeeze dims 3 and 2 only;
* revisions before 9ed191c pool an undefined ``x_1x1_se`` at stride 2 (NameError) — the stored
  reference at 2c8b6a0 still names that variable; we pool the redundant input itself;
* the reference stacks the descriptors as N×C×2; our tap is N×2×C (same values, transposed).
* About 2× slower than the dense conv at batch 1 (reference issue #7); the README speed-up is at
  batch 64.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from plugconv.base import ConvVariant, Tap, conv_args
from plugconv.registry import register_conv

GWC_GROUPS = 2


def _ratio(options: dict[str, Any]) -> float:
    """The validated ``ratio`` option (α in (0, 1), default 1/2)."""
    unknown = sorted(set(options) - {"ratio"})
    if unknown:
        raise ValueError(f"unknown spconv option(s) {unknown}; choose from ['ratio']")
    ratio = options.get("ratio", 0.5)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise ValueError(f"spconv ratio must be a number in (0, 1); got {ratio!r}")
    return float(ratio)


def _rep_channels(in_channels: int, ratio: float) -> int:
    """C_r = int(α·C_in), as the reference, tolerant of float rounding (0.29·100 → 29)."""
    x = ratio * in_channels
    return round(x) if math.isclose(x, round(x)) else int(x)


@register_conv("spconv")
class SPConv2d(ConvVariant):
    """SPConv (IJCAI 2020): representative/redundant channel split with softmax fusion.

    Args:
        in_channels: C_in (C_r = int(ratio·C_in) must be even and the rest non-empty).
        out_channels: C_out (even).
        kernel_size: must be 3.
        stride: 1 or 2 (at 2, H and W of the input must be even).
        padding: ``None`` or 1.
        dilation: must be 1.
        groups: must be 1 (the GWC's 2 groups are internal).
        bias: accepted for ``nn.Conv2d`` compatibility and ignored (see the module docstring).
        **options: ``ratio`` α (default 0.5), the representative fraction of the input channels.

    Shape:
        input N×C_in×H×W → output N×C_out×⌈H/s⌉×⌈W/s⌉.

    Raises:
        ValueError: a configuration the module cannot take; the message names the value.
    """

    paper = "Zhang et al.: Split to Be Slim: An Overlooked Redundancy in Vanilla Convolution, IJCAI 2020"
    year = 2020
    exact_transfer = False
    absorbs_bn = False
    constraints = (
        "kernel 3, padding 1, dilation 1, groups 1, stride 1 or 2 (even H, W at stride 2); "
        "int(ratio*C_in) even, C_out even; in != out allowed"
    )

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
        super().__init__()
        ratio = _ratio(options)
        reason = self._reason(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, ratio)
        if reason is not None:
            raise ValueError(reason)
        self.ratio = ratio
        self.stride = stride
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.inplanes_3x3 = c_r = _rep_channels(in_channels, ratio)
        self.inplanes_1x1 = c_u = in_channels - c_r
        # names as in the reference SPConv_3x3, so its checkpoints map by name
        self.gwc = nn.Conv2d(c_r, out_channels, 3, stride=stride, padding=1, groups=GWC_GROUPS, bias=False)
        self.pwc = nn.Conv2d(c_r, out_channels, 1, bias=False)
        self.conv1x1 = nn.Conv2d(c_u, out_channels, 1, bias=True)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.fusion_weights = Tap(
            "channel_weights",
            "fusion weights [beta (representative), gamma (redundant)], N×2×C_out in (0, 1), sum to 1",
        )
        self.representative = Tap("branch", "representative branch Y3 = BN1(GWC + PWC), N×C_out×H×W")
        self.redundant = Tap("branch", "redundant branch Y1 = BN2(1x1 conv), N×C_out×H×W")

    # ------------------------------------------------------------------ constraints
    @classmethod
    def _reason(
        cls,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        padding: int | None,
        dilation: int,
        groups: int,
        ratio: float,
    ) -> str | None:
        if kernel_size != 3:
            return f"kernel_size {kernel_size} not supported by spconv (only 3)"
        if stride not in (1, 2):
            return f"stride {stride} not supported by spconv (only 1 or 2)"
        if dilation != 1:
            return f"dilation {dilation} not supported by spconv (only 1)"
        if groups != 1:
            return f"groups {groups} not supported by spconv (only 1; its GWC uses 2 internal groups)"
        if padding is not None and padding != 1:
            return f"padding {padding} not supported by spconv (only same padding 1)"
        c_r = _rep_channels(in_channels, ratio)
        c_u = in_channels - c_r
        if c_r < 1 or c_u < 1:
            return (
                f"in_channels {in_channels} at ratio {ratio} leaves an empty split "
                f"(representative {c_r}, redundant {c_u}) in spconv"
            )
        if c_r % GWC_GROUPS:
            return (
                f"in_channels {in_channels} not supported by spconv: representative channels "
                f"int(ratio*C_in) = {c_r} must be even (2 GWC groups)"
            )
        if out_channels % GWC_GROUPS:
            return f"out_channels {out_channels} not supported by spconv: must be even (2 GWC groups)"
        return None

    @classmethod
    def check(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None, **options: Any) -> str | None:
        """Why ``conv`` cannot become an SPConv (``None`` = it can); ``options`` as the constructor."""
        try:
            args = conv_args(conv)
            ratio = _ratio(options)
        except ValueError as e:
            return f"{e} (spconv)"
        return cls._reason(
            args["in_channels"], args["out_channels"], args["kernel_size"], args["stride"],
            args["padding"], args["dilation"], args["groups"], ratio,
        )

    @classmethod
    def check_input(cls, conv: nn.Conv2d, hw: tuple[int, int]) -> str | None:
        """At stride 2 the input H and W must be even (GWC gives ceil(H/2), the pool floor(H/2))."""
        h, w = hw
        if conv.stride[0] == 2 and (h % 2 or w % 2):
            return f"input size {h}x{w} not supported by spconv at stride 2 (H and W must be even)"
        return None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None, **options: Any) -> SPConv2d:
        """A freshly initialised SPConv with ``conv``'s shapes (nothing else is transferred).

        No parameter setting reproduces a dense 3×3 (input-dependent fusion), so
        ``exact_transfer`` is False. ``bn`` is ignored (it stays in the host network).

        Raises:
            ValueError: the site cannot take the variant (the ``check`` message) or bad options.
        """
        reason = cls.check(conv, bn, **options)
        if reason is not None:
            raise ValueError(reason)
        m = cls(**conv_args(conv), **options)
        return m.to(device=conv.weight.device, dtype=conv.weight.dtype)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Split, transform, fuse.

        Args:
            x: N×C_in×H×W (H, W even at stride 2).

        Returns:
            N×C_out×H_out×W_out.

        Raises:
            ValueError: odd H or W at stride 2.
        """
        n = x.shape[0]
        if self.stride == 2 and (x.shape[-2] % 2 or x.shape[-1] % 2):
            raise ValueError(
                f"input size {x.shape[-2]}x{x.shape[-1]} not supported by spconv at stride 2 "
                "(H and W must be even)"
            )
        x_3x3 = x[:, : self.inplanes_3x3]
        x_1x1 = x[:, self.inplanes_3x3 :]
        out_gwc = self.gwc(x_3x3)
        if self.stride == 2:
            x_3x3 = F.avg_pool2d(x_3x3, kernel_size=2, stride=2)
            x_1x1 = F.avg_pool2d(x_1x1, kernel_size=2, stride=2)
        y3 = self.representative(self.bn1(out_gwc + self.pwc(x_3x3)))
        y1 = self.redundant(self.bn2(self.conv1x1(x_1x1)))
        s3 = F.adaptive_avg_pool2d(y3, 1).squeeze(3).squeeze(2)  # N×C_out, batch axis kept at N=1
        s1 = F.adaptive_avg_pool2d(y1, 1).squeeze(3).squeeze(2)
        weights = self.fusion_weights(torch.softmax(torch.stack([s3, s1], dim=1), dim=1))  # N×2×C_out
        c = self.out_channels
        return weights[:, 0].view(n, c, 1, 1) * y3 + weights[:, 1].view(n, c, 1, 1) * y1

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, stride={self.stride}, ratio={self.ratio}, "
            f"representative={self.inplanes_3x3}, redundant={self.inplanes_1x1}"
        )
