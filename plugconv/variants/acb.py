"""``acb``: Asymmetric Convolution Block, ACNet (Ding, Guo, Ding, Han, ICCV 2019).

Paper: https://arxiv.org/abs/1908.03930. Checked against the reference code DingXiaoH/ACNet
``acnet/acb.py`` @ 8a93375 (module and key names ``square_conv``/``square_bn``/``ver_conv``/
``ver_bn``/``hor_conv``/``hor_bn`` as there, so its training-form checkpoints load).

Computation (paper = code): out = BN_sq(Conv_k×k(x)) + BN_ver(Conv_k×1(x)) + BN_hor(Conv_1×k(x)),
bias-free convs, each followed by its own BatchNorm. ACB replaces a conv **and its BN** (no BN
follows it): ``absorbs_bn = True``.

Padding / crop arithmetic (requested padding p, c = k//2), so the three sliding windows align:

- p ≥ c: the k×1 conv gets padding (p, p − c) and the 1×k conv (p − c, p), as (h, w);
- p < c: the input is cropped by c − p: the k×1 branch sees the width cropped (padding (p, 0)),
  the 1×k branch the height cropped (padding (0, p)).

Exact transfer (``from_conv(conv, bn)``): square conv ← conv, square BN ← bn (γ, β, running μ, σ²,
eps, momentum), vertical/horizontal BN γ = β = 0. The asymmetric branches then output exactly 0, in
eval **and** train mode, and their γ still get gradient so the branches can grow in. A site without
BN (a conv with or without bias) is exact **in eval mode only**: the square BN is an identity
(μ = 0, σ² = 1 − eps, γ = 1, β = bias or 0); in train mode it normalises with batch statistics.
Copying the kernel's centre cross into the asymmetric kernels with the pretrained BN on all three
branches is *not* exact (not done here).

Deploy form: :meth:`ACBlock.fuse` returns a **new** ``nn.Conv2d`` (k×k, same stride, padding,
groups, ``bias=True``) equal to the block in eval mode: each branch's BN folded into its kernel
(K·γ/σ, β − μγ/σ), the k×1 and 1×k kernels added into the centre column / row (the skeleton), the
biases summed. Unlike the reference ``switch_to_deploy``, the training form is left intact (the
reference deletes submodules in place, which leaves optimisers, EMAs and cached models stale).

Fresh initialisation: reference default γ = 1 on all three BNs (``gamma_init`` sets all three,
e.g. 1/3 as the README's CIFAR tip).

Taps:
    ``square``, ``vertical``, ``horizontal`` (branch): each branch's post-BN output,
        N×C_out×H_out×W_out, unbounded; the asymmetric ones are exactly 0 right after exact transfer.

Limits: square odd kernel k ≥ 3; dilation 1 (the reference padding uses p − k//2, not
p − d·(k//2)); 0 ≤ p; any stride, groups, in ≠ out; affine BN only (fusion needs γ, β).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from plugconv.base import ConvVariant, Tap, conv_args, same_padding
from plugconv.registry import register_conv

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


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
    if kernel_size < 3 or kernel_size % 2 == 0:
        return f"kernel_size {kernel_size} not supported by acb (odd kernel >= 3 required)"
    if dilation != 1:
        return f"dilation {dilation} not supported by acb (the branch alignment assumes dilation 1)"
    if stride < 1:
        return f"stride {stride} must be >= 1 for acb"
    if padding < 0:
        return f"padding {padding} must be >= 0 for acb"
    if padding_mode not in _PADDING_MODES:
        return f"padding_mode {padding_mode!r} not supported by acb; choose one of {', '.join(_PADDING_MODES)}"
    if padding_mode != "zeros" and padding < kernel_size // 2:
        return f"padding {padding} < kernel_size//2 (crop mode) needs padding_mode 'zeros' in acb, not {padding_mode!r}"
    if groups < 1 or in_channels % groups or out_channels % groups:
        return f"groups {groups} must divide in_channels {in_channels} and out_channels {out_channels}"
    return None


def _fold_bn(kernel: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(K·γ/σ, β − μγ/σ) with σ = sqrt(running_var + eps)."""
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(std)
    t = gamma / std
    return kernel * t.view(-1, 1, 1, 1), beta - bn.running_mean * t


@register_conv("acb")
class ACBlock(ConvVariant):
    """Asymmetric Convolution Block (ACNet): k×k + k×1 + 1×k convs, each with its own BN.

    Replaces a conv + BN pair (``absorbs_bn``).

    Args:
        in_channels, out_channels: C_in, C_out.
        kernel_size: odd k ≥ 3.
        stride: any s ≥ 1.
        padding: p ≥ 0 (``None`` = k//2); p < k//2 uses the paper's crop mode.
        dilation: must be 1.
        groups: as ``nn.Conv2d``, applied to all three branches.
        bias: ignored (the BN shifts replace the bias); accepted for ``nn.Conv2d`` compatibility.
        padding_mode: as ``nn.Conv2d``; non-zero modes need p ≥ k//2.
        gamma_init: initial γ of all three BNs (reference default 1).
        eps, momentum: of the three BatchNorms.

    Shapes:
        input N×C_in×H×W → output N×C_out×H_out×W_out, as ``nn.Conv2d(k, s, p)``.

    Raises:
        ValueError: a configuration ACB cannot take (message names the value).
    """

    paper = "ACNet: Asymmetric Convolution Block (Ding, Guo, Ding, Han), ICCV 2019"
    year = 2019
    exact_transfer = True
    absorbs_bn = True
    constraints = (
        "odd kernel >= 3; dilation 1; replaces conv+BN (exact in eval and train mode; a site without BN is "
        "exact in eval mode only); any stride, padding (crop mode for p < k//2), groups, in != out"
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
        padding_mode: str = "zeros",
        gamma_init: float | None = None,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        **options: Any,
    ) -> None:
        super().__init__()
        if options:
            raise ValueError(
                f"acb options are ['padding_mode', 'gamma_init', 'eps', 'momentum']; got unknown {sorted(options)}"
            )
        if padding is None:
            padding = same_padding(kernel_size, dilation)
        reason = _check_args(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode)
        if reason is not None:
            raise ValueError(reason)
        k, c = kernel_size, kernel_size // 2
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = (k, k)
        self.stride = (stride, stride)
        self.padding = (padding, padding)
        self.dilation = (1, 1)
        self.groups = groups
        self.padding_mode = padding_mode
        if padding >= c:
            self.crop = 0
            ver_padding, hor_padding = (padding, padding - c), (padding - c, padding)
        else:
            self.crop = c - padding
            ver_padding, hor_padding = (padding, 0), (0, padding)
        common = {"stride": stride, "groups": groups, "bias": False, "padding_mode": padding_mode}
        self.square_conv = nn.Conv2d(in_channels, out_channels, (k, k), padding=padding, **common)
        self.ver_conv = nn.Conv2d(in_channels, out_channels, (k, 1), padding=ver_padding, **common)
        self.hor_conv = nn.Conv2d(in_channels, out_channels, (1, k), padding=hor_padding, **common)
        self.square_bn = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum)
        self.ver_bn = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum)
        self.hor_bn = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum)
        if gamma_init is not None:
            for bn in (self.square_bn, self.ver_bn, self.hor_bn):
                nn.init.constant_(bn.weight, gamma_init)
        self.square = Tap("branch", "square k×k branch after its BN (N×C_out×H×W, unbounded)")
        self.vertical = Tap("branch", "vertical k×1 branch after its BN (N×C_out×H×W, unbounded; 0 after exact transfer)")
        self.horizontal = Tap(
            "branch", "horizontal 1×k branch after its BN (N×C_out×H×W, unbounded; 0 after exact transfer)"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """N×C_in×H×W → N×C_out×H_out×W_out (sum of the three post-BN branches)."""
        sq = self.square(self.square_bn(self.square_conv(x)))
        if self.crop > 0:
            ver_in = x[:, :, :, self.crop : -self.crop]
            hor_in = x[:, :, self.crop : -self.crop, :]
        else:
            ver_in = hor_in = x
        ver = self.vertical(self.ver_bn(self.ver_conv(ver_in)))
        hor = self.horizontal(self.hor_bn(self.hor_conv(hor_in)))
        return sq + ver + hor

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, groups={self.groups}, crop={self.crop}, padding_mode={self.padding_mode!r}"
        )

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        """The deploy form: a new k×k ``nn.Conv2d`` (bias=True) equal to this block in eval mode.

        Uses the BNs' running statistics; ``self`` is not modified. Same device and dtype.
        """
        k, c = self.kernel_size[0], self.kernel_size[0] // 2
        kernel, b = _fold_bn(self.square_conv.weight, self.square_bn)
        kernel = kernel.clone()
        kv, bv = _fold_bn(self.ver_conv.weight, self.ver_bn)
        kh, bh = _fold_bn(self.hor_conv.weight, self.hor_bn)
        kernel[:, :, :, c : c + 1] += kv
        kernel[:, :, c : c + 1, :] += kh
        ref = self.square_conv.weight
        fused = nn.Conv2d(
            self.in_channels, self.out_channels, k, stride=self.stride, padding=self.padding, groups=self.groups,
            bias=True, padding_mode=self.padding_mode, device=ref.device, dtype=ref.dtype,
        )
        fused.weight.copy_(kernel)
        fused.bias.copy_(b + bv + bh)
        fused.train(self.training)
        return fused

    # ---- contract -------------------------------------------------------------------------------

    @classmethod
    def check(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None) -> str | None:
        """Why ``conv`` (+ ``bn``) cannot become an ACBlock (``None`` = it can)."""
        if not isinstance(conv, nn.Conv2d):
            return f"{type(conv).__name__} is not an nn.Conv2d"
        try:
            a = conv_args(conv)
        except ValueError as e:
            return f"{e} (acb)"
        reason = _check_args(
            a["in_channels"], a["out_channels"], a["kernel_size"], a["stride"], a["padding"], a["dilation"],
            a["groups"], conv.padding_mode,
        )
        if reason is not None or bn is None:
            return reason
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.num_features != a["out_channels"]:
            return (
                f"{type(bn).__name__}({getattr(bn, 'num_features', '?')}) cannot be absorbed by acb: "
                f"needs a BatchNorm over the conv's {a['out_channels']} output channels"
            )
        if bn.running_mean is None or bn.running_var is None:
            return "BatchNorm without running statistics (track_running_stats=False) cannot be absorbed by acb"
        return None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None, **options: Any) -> ACBlock:
        """ACBlock equal to ``conv`` followed by ``bn``.

        With ``bn``: exact in eval and train mode (square ← conv + bn; asymmetric BN γ = β = 0).
        Without ``bn``: exact in eval mode (identity square BN carrying ``conv.bias``).

        Raises:
            ValueError: the site cannot take acb (see :meth:`check`) or unknown options.
        """
        reason = cls.check(conv, bn)
        if reason is not None:
            raise ValueError(reason)
        a = conv_args(conv)
        a.pop("bias")
        if bn is not None:
            options.setdefault("eps", bn.eps)
            options.setdefault("momentum", bn.momentum)
        m = cls(**a, padding_mode=conv.padding_mode, **options)
        m = m.to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            m.square_conv.weight.copy_(conv.weight.detach())
            sq = m.square_bn
            if bn is not None:
                # BN(conv(x) + b) = BN with running mean μ − b applied to conv(x) (train mode: b cancels)
                mean = bn.running_mean - conv.bias.detach() if conv.bias is not None else bn.running_mean
                sq.running_mean.copy_(mean)
                sq.running_var.copy_(bn.running_var)
                if bn.num_batches_tracked is not None:
                    sq.num_batches_tracked.copy_(bn.num_batches_tracked)
                sq.weight.copy_(bn.weight if bn.weight is not None else torch.ones_like(sq.weight))
                sq.bias.copy_(bn.bias if bn.bias is not None else torch.zeros_like(sq.bias))
            else:
                sq.running_mean.zero_()
                sq.running_var.fill_(1.0 - sq.eps)
                sq.weight.fill_(1.0)
                sq.bias.copy_(conv.bias.detach() if conv.bias is not None else torch.zeros_like(sq.bias))
            for b in (m.ver_bn, m.hor_bn):
                b.weight.zero_()
                b.bias.zero_()
        m.train(conv.training if bn is None else bn.training)
        return m
