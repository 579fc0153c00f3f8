"""``saconv``: Switchable Atrous Convolution (SAC), DetectoRS (Qiao, Chen, Yuille, CVPR 2021).

Paper: https://arxiv.org/abs/2006.02334. Checked against the reference code: DetectoRS
``mmdet/ops/saconv.py`` and mmcv ``ops/saconv.py`` (``SAConv2d`` ⊂ ``ConvAWS2d`` ⊂ ``nn.Conv2d``).

Computation, for x (N×C_in×H×W), weight W (C_out×C_in/g×k×k), bias b, stride s, padding p,
dilation d:

1. pre-context: x ← x + PreCtx(GAP(x)) (1×1 C_in→C_in conv with bias, *added*, no sigmoid);
2. switch: S = Conv1×1(C_in→1, stride s, bias)(AvgPool5×5,stride 1(ReflectPad2(x))),
   N×1×H_out×W_out, **unbounded** (no sigmoid; S = 1 selects the small rate);
3. AWS weight: Ŵ_o = γ_o·(W_o − mean W_o)/sqrt(var_unbiased W_o + 1e-5) + β_o, with γ, β
   *buffers* ``weight_gamma``/``weight_beta`` (C_out×1×1×1);
4. y_s = conv(x, Ŵ; s, p, d), y_l = conv(x, Ŵ + ΔW; s, 3p, 3d) (ΔW = parameter ``weight_diff``);
5. y = S·y_s + (1 − S)·y_l, then + b once (if the conv has a bias);
6. post-context: out = y + PostCtx(GAP(y)) (1×1 C_out→C_out conv with bias).

Differences from the popular copies (we follow the paper / DetectoRS semantics):

- **bias**: mmcv on torch ≥ 1.8 passes a zero bias to both branches and never adds ``self.bias``
  (a known bug; the error equals max|b|, invisible in ResNets whose convs have no bias). DetectoRS
  master put b in both branches, which equals adding it once after the mix; we add it once.
- **dilated branch**: the references temporarily set ``self.padding``/``self.dilation`` to 3× inside
  ``forward`` (not thread-safe, breaks tracing, corrupts the module on an exception). We pass 3p and
  3d to ``F.conv2d`` directly and never mutate the module.
- **exact transfer**: mmcv sets γ/β only in ``_load_from_state_dict`` (γ = −1 sentinel, requires
  ``load_state_dict(strict=False)``); copying ``.weight`` by hand leaves γ = 1, β = 0, so Ŵ is the
  *standardised* W. :meth:`SAConv2d.from_conv` sets γ = sqrt(var_unbiased(W_o) + 1e-5) and
  β = mean(W_o) explicitly, the switch to weight 0 / bias 1 (S ≡ 1), ΔW = 0 and both contexts to 0,
  so the module reproduces the original conv (bias included) up to float rounding.
- **deformable** branches (used in the DetectoRS configs) are **not implemented**; the module is the
  plain SAC.
- The switch is routed through a tap instead of being a local variable invisible to hooks.

Parameter names follow mmcv where they can (``weight``, ``bias``, ``weight_diff``,
``weight_gamma``, ``weight_beta``); the switch and context convs are ``switch_conv``,
``pre_context_conv`` and ``post_context_conv`` (mmcv: ``switch``, ``pre_context``, ``post_context``)
because those names belong to the taps here.

Taps:
    ``switch`` (spatial_gate): S, N×1×H_out×W_out, unbounded, 1 at init (1 = small rate). Not a
        probability.
    ``pre_context`` (channel_weights): N×C_in, unbounded, 0 at init.
    ``post_context`` (channel_weights): N×C_out, unbounded, 0 at init.
    ``small`` / ``large`` (branch): y_s / y_l, N×C_out×H_out×W_out, unbounded.

Limits: square odd kernels k ≥ 3 with "same" padding p = d·(k−1)/2 (otherwise the switch and the
branches differ in size), ``padding_mode="zeros"``, H, W ≥ 3 (the reflect pad). Groups (depthwise
included) are supported.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from plugconv.base import ConvVariant, Tap, conv_args, same_padding
from plugconv.registry import register_conv

_AWS_EPS = 1e-5


def _check_args(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int,
    padding: int,
    dilation: int,
    groups: int,
    padding_mode: str = "zeros",
) -> str | None:
    if padding_mode != "zeros":
        return f"padding_mode {padding_mode!r} not supported by saconv (only 'zeros')"
    if kernel_size == 1:
        return "kernel_size 1 not supported by saconv (the atrous branch of a 1x1 conv is the same conv)"
    if kernel_size < 1 or kernel_size % 2 == 0:
        return f"kernel_size {kernel_size} not supported by saconv (odd kernel >= 3 required)"
    if stride < 1 or dilation < 1:
        return f"stride {stride} / dilation {dilation} must be >= 1 for saconv"
    want = same_padding(kernel_size, dilation)
    if padding != want:
        return (
            f"padding {padding} not supported by saconv: needs 'same' padding d*(k-1)/2 = {want} "
            f"for kernel_size {kernel_size}, dilation {dilation} (switch and branches must align)"
        )
    if groups < 1 or in_channels % groups or out_channels % groups:
        return f"groups {groups} must divide in_channels {in_channels} and out_channels {out_channels}"
    return None


@register_conv("saconv")
class SAConv2d(ConvVariant):
    """Switchable Atrous Convolution (DetectoRS), a drop-in for ``nn.Conv2d``.

    Args:
        in_channels, out_channels: C_in, C_out.
        kernel_size: odd k ≥ 3.
        stride: s ≥ 1 (applied to both branches and to the switch).
        padding: must be "same", d·(k−1)/2; ``None`` picks it.
        dilation: d of the small branch; the large branch uses 3d (and padding 3p).
        groups: as ``nn.Conv2d`` (depthwise included).
        bias: add a bias once after the switch mix.
        aws: weight standardisation (DetectoRS ``ConvAWS2d``); ``False`` uses W directly.

    Shapes:
        input N×C_in×H×W (H, W ≥ 3) → output N×C_out×H_out×W_out, as the equivalent ``nn.Conv2d``.

    Raises:
        ValueError: a configuration SAC cannot take (message names the value).
    """

    paper = "DetectoRS: Switchable Atrous Convolution (Qiao, Chen, Yuille), CVPR 2021"
    year = 2021
    exact_transfer = True
    absorbs_bn = False
    constraints = (
        "odd kernel >= 3 (1x1 rejected); 'same' padding d*(k-1)/2; padding_mode zeros; "
        "input H, W >= 3; any stride, dilation, groups, in != out"
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
        *,
        aws: bool = True,
        **options: Any,
    ) -> None:
        super().__init__()
        if options:
            raise ValueError(f"saconv options are ['aws']; got unknown {sorted(options)}")
        if padding is None:
            padding = same_padding(kernel_size, dilation)
        reason = _check_args(in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        if reason is not None:
            raise ValueError(reason)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = (kernel_size, kernel_size)
        self.stride = (stride, stride)
        self.padding = (padding, padding)
        self.dilation = (dilation, dilation)
        self.groups = groups
        self.aws = bool(aws)
        shape = (out_channels, in_channels // groups, kernel_size, kernel_size)
        self.weight = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.weight_diff = nn.Parameter(torch.zeros(shape))
        self.register_buffer("weight_gamma", torch.ones(out_channels, 1, 1, 1))
        self.register_buffer("weight_beta", torch.zeros(out_channels, 1, 1, 1))
        self.switch_conv = nn.Conv2d(in_channels, 1, kernel_size=1, stride=stride, bias=True)
        self.pre_context_conv = nn.Conv2d(in_channels, in_channels, kernel_size=1, bias=True)
        self.post_context_conv = nn.Conv2d(out_channels, out_channels, kernel_size=1, bias=True)
        self.pre_context = Tap("channel_weights", "pre-context added to the input (N×C_in, unbounded, 0 at init)")
        self.switch = Tap(
            "spatial_gate",
            "switch S (N×1×H×W), unbounded, 1 = small rate, 0 = large (3x dilated) rate; not a probability",
        )
        self.small = Tap("branch", "small-rate branch conv(x, W; d) (N×C_out×H×W, unbounded)")
        self.large = Tap("branch", "large-rate branch conv(x, W+dW; 3d) (N×C_out×H×W, unbounded)")
        self.post_context = Tap("channel_weights", "post-context added to the output (N×C_out, unbounded, 0 at init)")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Fresh init: W, b as ``nn.Conv2d``; γ = 1, β = 0; S ≡ 1 (switch 0/1); ΔW = 0; contexts 0."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)
        with torch.no_grad():
            self.weight_gamma.fill_(1.0)
            self.weight_beta.zero_()
        self.init_identity_state()

    @torch.no_grad()
    def init_identity_state(self) -> None:
        """Put the module in its DetectoRS initial state: S ≡ 1, ΔW = 0, both contexts 0.

        Re-apply after framework-wide init loops (e.g. kaiming on every ``nn.Conv2d``), which reset
        the switch bias to 0 and break the S ≡ 1 start.
        """
        self.switch_conv.weight.zero_()
        self.switch_conv.bias.fill_(1.0)
        self.weight_diff.zero_()
        for m in (self.pre_context_conv, self.post_context_conv):
            m.weight.zero_()
            m.bias.zero_()

    def aws_weight(self) -> torch.Tensor:
        """Ŵ: the standardised weight γ·(W − mean)/sqrt(var_unbiased + 1e-5) + β (W when aws=False)."""
        w = self.weight
        if not self.aws:
            return w
        flat = w.reshape(w.shape[0], -1)
        mean = flat.mean(dim=1).view(-1, 1, 1, 1)
        std = torch.sqrt(flat.var(dim=1) + _AWS_EPS).view(-1, 1, 1, 1)
        return self.weight_gamma * ((w - mean) / std) + self.weight_beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """N×C_in×H×W → N×C_out×H_out×W_out.

        Raises:
            ValueError: H or W < 3 (the switch's reflect padding needs at least 3 pixels).
        """
        h, w = x.shape[-2:]
        if h < 3 or w < 3:
            raise ValueError(f"input size {h}x{w} too small for saconv (H, W >= 3 for the 5x5 reflect-padded switch)")
        # pre-context
        ctx = self.pre_context(self.pre_context_conv(F.adaptive_avg_pool2d(x, 1)).flatten(1))
        x = x + ctx[:, :, None, None]
        # switch
        avg = F.avg_pool2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), kernel_size=5, stride=1)
        s = self.switch(self.switch_conv(avg))
        # two rates, same weights (+ ΔW on the large one); 3p and 3d passed, the module is not mutated
        weight = self.aws_weight()
        p, d = self.padding[0], self.dilation[0]
        y_s = self.small(F.conv2d(x, weight, None, self.stride, p, d, self.groups))
        y_l = self.large(F.conv2d(x, weight + self.weight_diff, None, self.stride, 3 * p, 3 * d, self.groups))
        y = s * y_s + (1 - s) * y_l
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        # post-context
        post = self.post_context(self.post_context_conv(F.adaptive_avg_pool2d(y, 1)).flatten(1))
        return y + post[:, :, None, None]

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation} (large: {3 * self.dilation[0]}), "
            f"groups={self.groups}, bias={self.bias is not None}, aws={self.aws}"
        )

    # ---- contract -------------------------------------------------------------------------------

    @classmethod
    def check(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None) -> str | None:
        """Why ``conv`` cannot become a SAConv2d (``None`` = it can); ``bn`` is ignored (kept in the host)."""
        if not isinstance(conv, nn.Conv2d):
            return f"{type(conv).__name__} is not an nn.Conv2d"
        try:
            a = conv_args(conv)
        except ValueError as e:
            return f"{e} (saconv)"
        return _check_args(
            a["in_channels"], a["out_channels"], a["kernel_size"], a["stride"], a["padding"], a["dilation"],
            a["groups"], conv.padding_mode,
        )

    @classmethod
    def check_input(cls, conv: nn.Conv2d, hw: tuple[int, int]) -> str | None:
        """Reject inputs smaller than 3×3 (the switch's reflect padding of 2 needs H, W ≥ 3)."""
        h, w = hw
        if h < 3 or w < 3:
            return f"input size {h}x{w} too small for saconv (H, W >= 3 for the 5x5 reflect-padded switch)"
        return None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None, **options: Any) -> SAConv2d:
        """SAConv2d that reproduces ``conv`` exactly (bias included), in train and eval mode.

        Sets W ← conv.weight, b ← conv.bias, γ = sqrt(var_unbiased(W_o) + 1e-5), β = mean(W_o)
        (so Ŵ = W), S ≡ 1 (switch weight 0, bias 1), ΔW = 0, contexts 0. ``bn`` stays in the host.

        Raises:
            ValueError: the site cannot take saconv (see :meth:`check`) or unknown options.
        """
        reason = cls.check(conv)
        if reason is not None:
            raise ValueError(reason)
        a = conv_args(conv)
        m = cls(**a, **options)
        m = m.to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            w = conv.weight.detach()
            m.weight.copy_(w)
            if conv.bias is not None:
                m.bias.copy_(conv.bias.detach())
            flat = w.reshape(w.shape[0], -1)
            m.weight_gamma.copy_(torch.sqrt(flat.var(dim=1) + _AWS_EPS).view(-1, 1, 1, 1))
            m.weight_beta.copy_(flat.mean(dim=1).view(-1, 1, 1, 1))
        m.init_identity_state()
        m.train(conv.training)
        return m
