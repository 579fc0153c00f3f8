"""``scconv``: Spatial and Channel reconstruction Convolution (SCConv).

Paper: J. Li, Y. Wen, L. He, "SCConv: Spatial and Channel Reconstruction Convolution for Feature
Redundancy", CVPR 2023. There is no official code; the module was checked against the widely used
*unofficial* cheng-haha/ScConv (``ScConv.py``, HEAD cf3b372) and against the paper's equations as
summarised in ``shared/reference/variants.md`` §1. Not to be confused with SCNet's self-calibrated
conv (registry key ``selfcal``), which its repository also calls ``SCConv``.

Computation (X: N×C×H×W → N×C×H×W, no BN or activation inside):

* **SRU** (spatial reconstruction unit). ``GN`` is ``nn.GroupNorm(gn_groups, C)`` (γ initialised
  to 1, β to 0, ε inside the square root). ``w_γ = γ / Σγ`` (C). ``W = σ(w_γ ⊙ GN(X))``
  (N×C×H×W, in (0, 1)). Soft gates at ``gate_threshold`` (0.5): ``W1 = where(W > 0.5, 1, W)``,
  ``W2 = where(W > 0.5, 0, W)``; ``X1 = W1 ⊙ X``, ``X2 = W2 ⊙ X`` (the **raw** input); split both
  in channel halves and reconstruct ``cat(X11 + X22, X12 + X21)``.
* **CRU** (channel reconstruction unit), α = 1/2, squeeze r = 2, GWC groups g = 2, k = 3. Split
  into αC "up" and (1−α)C "low" channels, squeeze each with a bias-free 1×1 conv by r;
  ``Y1 = GWC(up) + PWC1(up)`` (GWC: k×k, g groups, with bias as in the reference code; PWC1:
  1×1), ``Y2 = cat(PWC2(low), low)``. Fuse per channel: ``S_m = GAP(Y_m)``,
  ``[β1, β2] = softmax([S1, S2])`` across the two branches (β1 + β2 = 1 per channel),
  ``Y = β1 ⊙ Y1 + β2 ⊙ Y2``.

Parameters: 29/16·C² (≈ 0.20× a dense 3×3) + C (GWC bias) + 2C (GN) with the defaults, e.g.
1,952 against 9,216 at C = 32.

Taps (``plugconv.base.Tap`` submodules, local names):

* ``w_gamma`` (channel_weights): w_γ, shape C, sums to 1 (1/C at initialisation; can flip sign
  or explode when Σγ ≈ 0 after training).
* ``sru_gate`` (spatial_gate): W, N×C×H×W in (0, 1). Untrained: W ≈ 0.5 everywhere.
* ``sru_mask`` (mask): ``(W > gate_threshold)`` as float, N×C×H×W in {0, 1}.
* ``cru_weights`` (channel_weights): ``[β1, β2]`` stacked, **N×2×C**, in (0, 1), summing to 1
  over dim 1. In ``fuse="softmax2c"`` mode: the softmax over the 2C pooled channels, **N×2C**,
  summing to 1 over dim 1 (mean 1/(2C)); the first C entries weight Y1, the last C weight Y2.
* ``cru_y1``, ``cru_y2`` (branch): Y1 and Y2, N×C×H×W, unbounded.

Limits: in == out, stride 1, dilation 1, "same" padding, a dense host conv (``groups=1``; the
GWC grouping is the module's own hyper-parameter, option ``gwc_groups``). Channel counts must
split evenly: C even, C % gn_groups == 0, αC an integer, αC and (1−α)C divisible by r,
αC/r and C divisible by gwc_groups; with the defaults this is **C % 8 == 0**. Stride-2 sites
are rejected (the maintainer's advice, cheng-haha/ScConv#2, is pooling or a 1×1 conv outside
the module). ``exact_transfer = False``: different kernel shapes and non-linear gates, so no
setting reproduces a dense 3×3; ``from_conv`` keeps nothing but the shapes (fresh
initialisation; calibrate or train before reading its maps as meaningful).
``absorbs_bn = False``: the host BN and ReLU stay.

Where popular copies differ (we follow the paper):

* the 2023-07-27 copies (the "``info_mask * x``" blog code) use *hard* binary masks
  ``(W > 0.5) * x``, dropping the gate magnitudes; 3f33756 multiplies the hard masks with
  ``GN(x)`` instead of ``x``; the first upload gates whole channels with softmax(γ) > 0.5;
* their custom ``GroupBatchnorm2d`` draws γ from ``randn`` (Σγ can be negative) and adds ε = 1e-10
  *outside* the square root of an unbiased std (a constant group divides by ~1e-10; NaN/inf in
  fp16); we use ``nn.GroupNorm`` (γ = 1, ε inside the sqrt);
* the CRU fusion is a softmax over **all 2C** pooled channels, then the halves are added: the
  weights then compete across channels instead of between the branches and average 1/(2C), so
  the output shrinks by roughly 1/C. Available as ``fuse="softmax2c"`` to reproduce the copy.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from plugconv.base import ConvVariant, Tap, conv_args
from plugconv.registry import register_conv

FUSE_MODES = ("channel", "softmax2c")

_DEFAULTS: dict[str, Any] = {
    "alpha": 0.5,
    "squeeze_ratio": 2,
    "gwc_groups": 2,
    "gn_groups": 4,
    "gate_threshold": 0.5,
    "fuse": "channel",
}


def _options(options: dict[str, Any]) -> dict[str, Any]:
    """Merge ``options`` over the defaults and validate them (ValueError naming the value)."""
    unknown = sorted(set(options) - set(_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown scconv option(s) {unknown}; choose from {sorted(_DEFAULTS)}")
    opts = {**_DEFAULTS, **options}
    alpha = opts["alpha"]
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise ValueError(f"scconv alpha must be a number in (0, 1); got {alpha!r}")
    for key in ("squeeze_ratio", "gwc_groups", "gn_groups"):
        v = opts[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"scconv {key} must be a positive integer; got {v!r}")
    thr = opts["gate_threshold"]
    if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not 0 < thr < 1:
        raise ValueError(f"scconv gate_threshold must be a number in (0, 1); got {thr!r}")
    if opts["fuse"] not in FUSE_MODES:
        raise ValueError(f"scconv fuse must be one of {FUSE_MODES}; got {opts['fuse']!r}")
    return opts


def _split(channels: int, alpha: float) -> tuple[int, int]:
    """(αC, (1−α)C), αC rounded to the nearest integer (``_reason`` rejects non-integer αC)."""
    up = round(alpha * channels)
    return up, channels - up


@register_conv("scconv")
class SCConv2d(ConvVariant):
    """SCConv (CVPR 2023): SRU spatial gating followed by CRU channel reconstruction.

    Args:
        in_channels: C (must equal ``out_channels``).
        out_channels: C.
        kernel_size: the GWC kernel k (odd; default 3).
        stride: must be 1.
        padding: ``None`` or k // 2 (the GWC's "same" padding).
        dilation: must be 1.
        groups: the host conv's groups; must be 1 (set the GWC groups with ``gwc_groups``).
        bias: accepted for ``nn.Conv2d`` compatibility and ignored: as in the reference code, the
            GWC always has a bias and the other convs none.
        **options: ``alpha`` (0.5), ``squeeze_ratio`` r (2), ``gwc_groups`` g (2), ``gn_groups``
            (4), ``gate_threshold`` (0.5), ``fuse`` ("channel" = per-channel two-way softmax as
            in the paper; "softmax2c" = the popular copy's softmax over all 2C channels).

    Shape:
        input N×C×H×W → output N×C×H×W (any H, W ≥ 1).

    Raises:
        ValueError: a configuration the module cannot take; the message names the value.
    """

    paper = "Li, Wen, He: SCConv: Spatial and Channel Reconstruction Convolution, CVPR 2023"
    year = 2023
    exact_transfer = False
    absorbs_bn = False
    constraints = (
        "in == out, stride 1, dilation 1, same padding, groups 1; C even, divisible by gn_groups, "
        "alpha*C and (1-alpha)*C divisible by squeeze_ratio, alpha*C/squeeze_ratio and C divisible "
        "by gwc_groups (C % 8 == 0 with the defaults)"
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
        opts = _options(options)
        reason = self._reason(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, opts)
        if reason is not None:
            raise ValueError(reason)
        c = in_channels
        r, g = opts["squeeze_ratio"], opts["gwc_groups"]
        up, low = _split(c, opts["alpha"])
        self.channels = c
        self.up_channels = up
        self.low_channels = low
        self.gate_threshold = float(opts["gate_threshold"])
        self.fuse_mode: str = opts["fuse"]
        self.options = dict(opts)

        # SRU
        self.gn = nn.GroupNorm(opts["gn_groups"], c, eps=1e-5, affine=True)
        self.w_gamma = Tap("channel_weights", "SRU w_gamma = gamma / sum(gamma), shape C, sums to 1")
        self.sru_gate = Tap("spatial_gate", "SRU gate W = sigmoid(w_gamma * GN(x)), N×C×H×W in (0, 1)")
        self.sru_mask = Tap("mask", "SRU informative mask (W > threshold) as float, N×C×H×W in {0, 1}")
        # CRU
        self.squeeze1 = nn.Conv2d(up, up // r, 1, bias=False)
        self.squeeze2 = nn.Conv2d(low, low // r, 1, bias=False)
        self.gwc = nn.Conv2d(up // r, c, kernel_size, padding=kernel_size // 2, groups=g, bias=True)
        self.pwc1 = nn.Conv2d(up // r, c, 1, bias=False)
        self.pwc2 = nn.Conv2d(low // r, c - low // r, 1, bias=False)
        if self.fuse_mode == "channel":
            desc = "CRU fusion weights [beta1, beta2], N×2×C in (0, 1), sum to 1 over dim 1"
        else:
            desc = "CRU softmax over 2C pooled channels (copy's behaviour), N×2C, sums to 1, mean 1/(2C)"
        self.cru_weights = Tap("channel_weights", desc)
        self.cru_y1 = Tap("branch", "CRU upper branch Y1 = GWC + PWC1, N×C×H×W")
        self.cru_y2 = Tap("branch", "CRU lower branch Y2 = cat(PWC2, low), N×C×H×W")

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
        opts: dict[str, Any],
    ) -> str | None:
        if stride != 1:
            return f"stride {stride} not supported by scconv (paper places it in stride-1 3x3 convs)"
        if in_channels != out_channels:
            return (
                f"in_channels {in_channels} != out_channels {out_channels}: scconv keeps the width "
                "(use a 1x1 conv outside the module to change it)"
            )
        if dilation != 1:
            return f"dilation {dilation} not supported by scconv (only 1)"
        if groups != 1:
            return (
                f"groups {groups} not supported by scconv (host conv must be dense; the GWC groups "
                f"are the option gwc_groups={opts['gwc_groups']})"
            )
        if kernel_size < 1 or kernel_size % 2 == 0:
            return f"kernel_size {kernel_size} not supported by scconv (odd GWC kernel, e.g. 3)"
        if padding is not None and padding != kernel_size // 2:
            return f"padding {padding} not supported by scconv (only same padding {kernel_size // 2})"
        c = in_channels
        r, g, gn = opts["squeeze_ratio"], opts["gwc_groups"], opts["gn_groups"]
        up, low = _split(c, opts["alpha"])
        if c % 2:
            return f"channels {c} not supported by scconv: SRU splits them in halves (C must be even)"
        if c % gn:
            return f"channels {c} not divisible by gn_groups {gn} (scconv GroupNorm)"
        if up < 1 or low < 1 or not math.isclose(up, opts["alpha"] * c):
            return f"channels {c} do not split evenly at alpha {opts['alpha']} (alpha*C = {opts['alpha'] * c})"
        if up % r or low % r:
            return (
                f"channels {c} not supported by scconv: alpha*C = {up} and (1-alpha)*C = {low} must be "
                f"divisible by squeeze_ratio {r}"
            )
        if (up // r) % g or c % g:
            return (
                f"channels {c} not supported by scconv: GWC input alpha*C/r = {up // r} and output {c} "
                f"must be divisible by gwc_groups {g}"
            )
        return None

    @classmethod
    def check(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None, **options: Any) -> str | None:
        """Why ``conv`` cannot become an SCConv (``None`` = it can); ``options`` as the constructor."""
        try:
            args = conv_args(conv)
            opts = _options(options)
        except ValueError as e:
            return f"{e} (scconv)"
        return cls._reason(
            args["in_channels"], args["out_channels"], args["kernel_size"], args["stride"],
            args["padding"], args["dilation"], args["groups"], opts,
        )

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None, **options: Any) -> SCConv2d:
        """A freshly initialised SCConv with ``conv``'s shapes (nothing else is transferred).

        No parameter setting reproduces a dense 3×3 (different kernel shapes, non-linear gates),
        so ``exact_transfer`` is False; calibrate or train the result. ``bn`` is ignored (it stays
        in the host network).

        Raises:
            ValueError: the site cannot take the variant (the ``check`` message) or bad options.
        """
        reason = cls.check(conv, bn, **options)
        if reason is not None:
            raise ValueError(reason)
        args = conv_args(conv)
        m = cls(**args, **options)
        return m.to(device=conv.weight.device, dtype=conv.weight.dtype)

    # ------------------------------------------------------------------ forward
    def _sru(self, x: torch.Tensor) -> torch.Tensor:
        gn_x = self.gn(x)
        gamma = self.gn.weight
        w_gamma = self.w_gamma(gamma / gamma.sum())
        w = self.sru_gate(torch.sigmoid(gn_x * w_gamma.view(1, -1, 1, 1)))
        mask = self.sru_mask((w > self.gate_threshold).to(w.dtype))
        informative = mask > 0
        w1 = torch.where(informative, torch.ones_like(w), w)
        w2 = torch.where(informative, torch.zeros_like(w), w)
        x1 = w1 * x
        x2 = w2 * x
        half = self.channels // 2
        x11, x12 = x1[:, :half], x1[:, half:]
        x21, x22 = x2[:, :half], x2[:, half:]
        return torch.cat([x11 + x22, x12 + x21], dim=1)

    def _cru(self, x: torch.Tensor) -> torch.Tensor:
        up, low = x[:, : self.up_channels], x[:, self.up_channels :]
        up, low = self.squeeze1(up), self.squeeze2(low)
        y1 = self.cru_y1(self.gwc(up) + self.pwc1(up))
        y2 = self.cru_y2(torch.cat([self.pwc2(low), low], dim=1))
        n, c = y1.shape[:2]
        s1 = F.adaptive_avg_pool2d(y1, 1).reshape(n, c)
        s2 = F.adaptive_avg_pool2d(y2, 1).reshape(n, c)
        if self.fuse_mode == "channel":
            beta = self.cru_weights(torch.softmax(torch.stack([s1, s2], dim=1), dim=1))  # N×2×C
            return beta[:, 0].view(n, c, 1, 1) * y1 + beta[:, 1].view(n, c, 1, 1) * y2
        weights = self.cru_weights(torch.softmax(torch.cat([s1, s2], dim=1), dim=1))  # N×2C
        return weights[:, :c].view(n, c, 1, 1) * y1 + weights[:, c:].view(n, c, 1, 1) * y2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """SRU then CRU.

        Args:
            x: N×C×H×W.

        Returns:
            N×C×H×W.
        """
        return self._cru(self._sru(x))

    def extra_repr(self) -> str:
        o = self.options
        return (
            f"channels={self.channels}, alpha={o['alpha']}, squeeze_ratio={o['squeeze_ratio']}, "
            f"gwc_groups={o['gwc_groups']}, gn_groups={o['gn_groups']}, fuse={self.fuse_mode!r}"
        )
