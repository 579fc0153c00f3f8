"""``selfcal``: self-calibrated convolution (SCNet).

Paper: J.-J. Liu, Q. Hou, M.-M. Cheng, C. Wang, J. Feng, "Improving Convolutional Networks with
Self-Calibrated Convolutions", CVPR 2020. Checked against the official code MCG-NKU/SCNet
``scnet.py`` (classes ``SCConv`` and ``SCBottleneck``, @ c0b5bd6) and ``shared/reference/variants.md``
§3. Its repository calls the module ``SCConv``; the CVPR 2023 SCConv is registry key ``scconv``.

Computation (X: N×C×H×W → N×C×H_out×W_out, r = ``pooling_r`` = 4, stride s):

* the first channel half ``X2 = X[:, :C/2]`` takes the plain path ``Y2 = K1(X2)`` (strided);
* the second half ``X1 = X[:, C/2:]`` is self-calibrated: ``T1 = AvgPool_r(X1)`` (kernel r,
  stride r), ``X1' = Up(K2(T1))`` to X1's size, ``gate = σ(X1 + X1')``,
  ``Y1' = K3(X1) ⊙ gate``, ``Y1 = K4(Y1')`` (strided);
* output ``cat[Y2, Y1]`` (plain half first, calibrated half second, as the official bottleneck
  concatenates ``[out_a, out_b]``).

Each K is a C/2→C/2 3×3 conv (bias-free, padding = dilation, ``groups`` applied to all four)
followed by its own BatchNorm, so the module replaces conv + BN (``absorbs_bn = True``). The module
structure matches the official code so released checkpoints map by name:
``k1 = Sequential(conv, BN)``, ``k2 = Sequential(AvgPool2d(r, r), conv, BN)``,
``k3 = Sequential(conv, BN)``, ``k4 = Sequential(conv, BN)`` (the official ``k1``/``k4`` may carry
a trailing parameter-free ReLU; the host block's ReLU follows our module instead).

``Up`` is option ``upsample``: ``"nearest"`` (default) is what the official code does
(``F.interpolate`` with its default mode), so released checkpoints reproduce; ``"bilinear"``
(``align_corners=False``) follows the paper's wording. Upsampling is uneven when H % r ≠ 0.

Parameters: 4·9·(C/2)²/groups = 9C²/groups (the dense 3×3's count) plus 4 BNs (4·C).

Taps (``plugconv.base.Tap`` submodules, local names):

* ``calibration`` (spatial_gate): ``σ(X1 + Up(K2(T1)))``, N×C/2×H×W (the input size), in (0, 1).
  At small sizes it is not spatial: at 7×7 (ResNet ``layer4`` at 224 px) T1 is 1×1, so the gate
  is σ(x + per-channel constant), i.e. channel attention.
* ``low_res`` (branch): K2(T1), N×C/2×⌊H/r⌋×⌊W/r⌋, unbounded.
* ``calibrated`` (branch): Y1, N×C/2×H_out×W_out, unbounded.
* ``plain`` (branch): Y2, N×C/2×H_out×W_out, unbounded.

Limits: in == out = C, C even (and C/2 divisible by ``groups``), kernel 3, "same" padding
(padding == dilation), no bias (a biased conv is rejected: every K ends in a BN), and input H, W ≥ r
(``check_input``). ``exact_transfer = False``: there is **no exact mapping** from a dense conv
(the off-diagonal blocks of its weight are lost and the calibrated half is a product of paths).
``from_conv`` initialises fresh by default; ``warm_start=True`` applies the heuristic of
variants.md §3.4 (K1 ← W[:C/2, :C/2] with the first half of the host BN, K4 ← W[C/2:, C/2:] with
the second half, K2 and K3 fresh; dense host convs only). Prefer released weights or calibration.

Where copies differ: the official code splits the input with two 1×1 convs (``conv1_a``/``conv1_b``)
in the bottleneck, we split one tensor into halves (stacking those convs row-wise maps exactly);
first-commit copies have a ReLU inside ``k4`` and halved ``planes``; ``SCBottleneck`` applies an
in-place ReLU to this module's output (hooks must clone). The official Up is nearest, not the
paper's bilinear (see ``upsample``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from plugconv.base import ConvVariant, Tap, conv_args
from plugconv.registry import register_conv

UPSAMPLE_MODES = ("nearest", "bilinear")
_DEFAULTS: dict[str, Any] = {"pooling_r": 4, "upsample": "nearest", "warm_start": False}


def _options(options: dict[str, Any], *, allow_warm_start: bool = False) -> dict[str, Any]:
    """Merge ``options`` over the defaults and validate them (ValueError naming the value)."""
    allowed = set(_DEFAULTS) if allow_warm_start else set(_DEFAULTS) - {"warm_start"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"unknown selfcal option(s) {unknown}; choose from {sorted(allowed)}")
    opts = {**_DEFAULTS, **options}
    r = opts["pooling_r"]
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"selfcal pooling_r must be a positive integer; got {r!r}")
    if opts["upsample"] not in UPSAMPLE_MODES:
        raise ValueError(f"selfcal upsample must be one of {UPSAMPLE_MODES}; got {opts['upsample']!r}")
    if not isinstance(opts["warm_start"], bool):
        raise ValueError(f"selfcal warm_start must be True or False; got {opts['warm_start']!r}")
    return opts


def _conv3x3(planes: int, stride: int, dilation: int, groups: int) -> nn.Conv2d:
    return nn.Conv2d(
        planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, groups=groups, bias=False
    )


@register_conv("selfcal")
class SelfCalibratedConv2d(ConvVariant):
    """SCNet's self-calibrated convolution (CVPR 2020); replaces a 3×3 conv and its BN.

    Args:
        in_channels: C (even; must equal ``out_channels``).
        out_channels: C.
        kernel_size: must be 3.
        stride: stride of K1 and K4 (≥ 1).
        padding: ``None`` or ``dilation`` (same padding).
        dilation: dilation of all four kernels.
        groups: groups of all four kernels (must divide C/2).
        bias: must be False (every kernel is followed by a BatchNorm).
        **options: ``pooling_r`` r (4), ``upsample`` ("nearest" as the official code, or
            "bilinear" as the paper's wording).

    Shape:
        input N×C×H×W (H, W ≥ r) → output N×C×H_out×W_out with H_out = ⌊(H − 1)/s⌋ + 1.

    Raises:
        ValueError: a configuration the module cannot take; the message names the value.
    """

    paper = "Liu, Hou, Cheng, Wang, Feng: Improving Convolutional Networks with Self-Calibrated Convolutions, CVPR 2020"
    year = 2020
    exact_transfer = False
    absorbs_bn = True
    constraints = "in == out, C even (C/2 divisible by groups), kernel 3, padding == dilation, no bias, H, W >= 4"

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
        opts = _options(options)
        reason = self._reason(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        if reason is not None:
            raise ValueError(reason)
        half = in_channels // 2
        r = opts["pooling_r"]
        self.channels = in_channels
        self.stride = stride
        self.pooling_r = r
        self.upsample: str = opts["upsample"]
        # layout as the official SCNet code (k2/k3/k4 live in its ``scconv`` submodule there)
        self.k1 = nn.Sequential(_conv3x3(half, stride, dilation, groups), nn.BatchNorm2d(half))
        self.k2 = nn.Sequential(
            nn.AvgPool2d(kernel_size=r, stride=r),
            _conv3x3(half, 1, dilation, groups),
            nn.BatchNorm2d(half),
        )
        self.k3 = nn.Sequential(_conv3x3(half, 1, dilation, groups), nn.BatchNorm2d(half))
        self.k4 = nn.Sequential(_conv3x3(half, stride, dilation, groups), nn.BatchNorm2d(half))
        self.calibration = Tap(
            "spatial_gate", "calibration gate sigmoid(X1 + Up(K2(AvgPool(X1)))), N×C/2×H×W in (0, 1)"
        )
        self.low_res = Tap("branch", "low-resolution K2(AvgPool_r(X1)), N×C/2×(H/r)×(W/r)")
        self.calibrated = Tap("branch", "calibrated half Y1 = K4(K3(X1) * gate), N×C/2×H_out×W_out")
        self.plain = Tap("branch", "plain half Y2 = K1(X2), N×C/2×H_out×W_out")

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
        bias: bool,
    ) -> str | None:
        if in_channels != out_channels:
            return (
                f"in_channels {in_channels} != out_channels {out_channels}: selfcal keeps the width "
                "(four C/2 -> C/2 kernels)"
            )
        if in_channels % 2:
            return f"channels {in_channels} not supported by selfcal: must be even (split in halves)"
        if kernel_size != 3:
            return f"kernel_size {kernel_size} not supported by selfcal (only 3)"
        if stride < 1:
            return f"stride {stride} not supported by selfcal (must be >= 1)"
        if dilation < 1:
            return f"dilation {dilation} not supported by selfcal (must be >= 1)"
        if padding is not None and padding != dilation:
            return f"padding {padding} not supported by selfcal (only same padding = dilation {dilation})"
        if groups < 1 or (in_channels // 2) % groups:
            return (
                f"groups {groups} not supported by selfcal at {in_channels} channels "
                f"(groups must divide C/2 = {in_channels // 2})"
            )
        if bias:
            return "bias=True not supported by selfcal (its kernels are bias-free, each followed by a BatchNorm)"
        return None

    @classmethod
    def check(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None, **options: Any) -> str | None:
        """Why ``conv`` (+ ``bn``) cannot become a self-calibrated conv (``None`` = it can)."""
        try:
            args = conv_args(conv)
            _options(options, allow_warm_start=True)
        except ValueError as e:
            return f"{e} (selfcal)"
        return cls._reason(
            args["in_channels"], args["out_channels"], args["kernel_size"], args["stride"],
            args["padding"], args["dilation"], args["groups"], args["bias"],
        )

    @classmethod
    def check_input(cls, conv: nn.Conv2d, hw: tuple[int, int], **options: Any) -> str | None:
        """Input H and W must be at least ``pooling_r`` (4) for the average pool."""
        r = options.get("pooling_r", _DEFAULTS["pooling_r"])
        h, w = hw
        if h < r or w < r:
            return f"input size {h}x{w} too small for selfcal (H and W must be >= pooling_r {r})"
        return None

    @classmethod
    def from_conv(
        cls, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None, **options: Any
    ) -> SelfCalibratedConv2d:
        """A self-calibrated conv at ``conv``'s site (replacing ``conv`` and ``bn``).

        No exact mapping exists. Default: fresh initialisation (nothing but shapes kept).
        ``warm_start=True``: K1 ← W[:C/2, :C/2] and K1's BN ← the first half of ``bn``;
        K4 ← W[C/2:, C/2:] and K4's BN ← the second half of ``bn``; K2, K3 fresh (heuristic,
        dense host convs only).

        Raises:
            ValueError: the site cannot take the variant (the ``check`` message), bad options, or
                ``warm_start`` on a grouped conv.
        """
        opts = _options(options, allow_warm_start=True)
        reason = cls.check(conv, bn)
        if reason is not None:
            raise ValueError(reason)
        warm = opts.pop("warm_start")
        args = conv_args(conv)
        m = cls(**args, **opts)
        if warm:
            if args["groups"] != 1:
                raise ValueError(
                    f"warm_start not supported for groups {args['groups']} (selfcal warm start needs a dense conv)"
                )
            half = args["in_channels"] // 2
            w = conv.weight.detach()
            with torch.no_grad():
                m.k1[0].weight.copy_(w[:half, :half])
                m.k4[0].weight.copy_(w[half:, half:])
                if bn is not None:
                    for dst, sl in ((m.k1[1], slice(0, half)), (m.k4[1], slice(half, 2 * half))):
                        if bn.affine:
                            dst.weight.copy_(bn.weight.detach()[sl])
                            dst.bias.copy_(bn.bias.detach()[sl])
                        if bn.running_mean is not None and bn.running_var is not None:
                            dst.running_mean.copy_(bn.running_mean[sl])
                            dst.running_var.copy_(bn.running_var[sl])
                        dst.eps = bn.eps
        return m.to(device=conv.weight.device, dtype=conv.weight.dtype)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Plain half and self-calibrated half, concatenated.

        Args:
            x: N×C×H×W with H, W ≥ ``pooling_r``.

        Returns:
            N×C×H_out×W_out.

        Raises:
            ValueError: H or W smaller than ``pooling_r``.
        """
        h, w = x.shape[-2:]
        if h < self.pooling_r or w < self.pooling_r:
            raise ValueError(
                f"input size {h}x{w} too small for selfcal (H and W must be >= pooling_r {self.pooling_r})"
            )
        half = self.channels // 2
        x_plain, x_cal = x[:, :half], x[:, half:]
        plain = self.plain(self.k1(x_plain))
        low = self.low_res(self.k2(x_cal))
        if self.upsample == "nearest":
            up = F.interpolate(low, size=(h, w), mode="nearest")
        else:
            up = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
        gate = self.calibration(torch.sigmoid(x_cal + up))
        calibrated = self.calibrated(self.k4(self.k3(x_cal) * gate))
        return torch.cat([plain, calibrated], dim=1)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, stride={self.stride}, pooling_r={self.pooling_r}, upsample={self.upsample!r}"
