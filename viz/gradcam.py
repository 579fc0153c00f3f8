"""Grad-CAM from a recorded pass, and the display rules for its maps (analysis.md §1).

Maps are kept raw (signed, unnormalised, at layer resolution); normalisation happens only when
drawing, in one of three colour modes:

- ``"per-panel"``: limits from that map only (its shape);
- ``"shared"``: limits shared by the panels compared side by side (same layer, all models) —
  the default for comparisons;
- ``"global"``: one limit for every panel in the view (magnitudes across depth).

Signed maps use a diverging colormap centred on 0 with limits ±max|M|; ReLU'd maps a sequential
perceptually uniform colormap on [0, max]. Degenerate maps are labelled, never stretched: an
all-zero ReLU'd map reads "all values ≤ 0 (max = …)", a constant map "constant (= …)".
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

COLOR_MODES = ("per-panel", "shared", "global")
EPS = 1e-12
#: signed maps: Crameri's ``berlin`` (matplotlib >= 3.10), a perceptually uniform diverging map
#: (blue < 0, dark at 0, red > 0); ``RdBu_r`` is not perceptually uniform
DIVERGING_CMAP = "berlin"
SEQUENTIAL_CMAP = "viridis"


@dataclass(frozen=True)
class CamMap:
    """Grad-CAM of one layer for a batch.

    Attributes:
        layer: module path of the hook point (the module's output).
        call: call index of that module in the forward.
        raw: N×h×w signed map M = Σ_k α_k A_k (score × activation units).
        weights: N×K channel weights α_k = mean over h, w of ∂y/∂A_k.
        targets: class index per image.
        score: the differentiated score ("logit" = pre-softmax logit of the target class).
    """

    layer: str
    call: int
    raw: torch.Tensor
    weights: torch.Tensor
    targets: tuple[int, ...]
    score: str = "logit"

    @property
    def relu(self) -> torch.Tensor:
        """N×h×w paper Grad-CAM max(M, 0) (≥ 0)."""
        return self.raw.clamp_min(0)


def gradcam(activation: torch.Tensor, gradient: torch.Tensor, *, method: str = "gradcam") -> tuple[torch.Tensor, torch.Tensor]:
    """Raw signed map from an activation and its gradient.

    Args:
        activation: N×K×h×w activations A.
        gradient: N×K×h×w gradients G = ∂y/∂A.
        method: ``"gradcam"`` (M = Σ_k α_k A_k, α = spatial mean of G), ``"hirescam"``
            (Σ_k G_k ⊙ A_k) or ``"layercam"`` (Σ_k ReLU(G_k) ⊙ A_k).

    Returns:
        (N×h×w map, N×K channel weights α — the spatial mean of the gradient for every method).

    Raises:
        ValueError: shapes differ, not 4-D, or an unknown method.
    """
    if activation.dim() != 4 or activation.shape != gradient.shape:
        raise ValueError(f"need N×K×h×w activation and gradient of the same shape, got "
                         f"{tuple(activation.shape)} and {tuple(gradient.shape)}")
    a = activation.double()
    g = gradient.double()
    alpha = g.mean(dim=(2, 3))
    if method == "gradcam":
        m = (alpha[:, :, None, None] * a).sum(1)
    elif method == "hirescam":
        m = (g * a).sum(1)
    elif method == "layercam":
        m = (g.clamp_min(0) * a).sum(1)
    else:
        raise ValueError(f"unknown CAM method {method!r}; choose one of gradcam, hirescam, layercam")
    return m.float(), alpha.float()


def cam_from_record(record, layer: str, call: int = 0, *, method: str = "gradcam") -> CamMap:
    """:class:`CamMap` of ``layer`` from a :class:`viz.recorder.Record`.

    Raises:
        KeyError: layer not recorded.
        ValueError: the layer has no gradient (see ``record.notes``).
    """
    a = record.activation(layer, call)
    g = record.gradient(layer, call)
    if g is None:
        raise ValueError(f"no gradient recorded for {layer!r}; notes: {'; '.join(record.notes) or 'none'}")
    raw, alpha = gradcam(a, g, method=method)
    return CamMap(layer, call, raw, alpha, tuple(record.targets), record.score)


def upsample(m: torch.Tensor | np.ndarray, size: tuple[int, int] | int) -> np.ndarray:
    """Bilinear (``align_corners=False``) upsampling of h×w or N×h×w maps to ``size`` (H, W)."""
    t = torch.as_tensor(np.asarray(m) if not isinstance(m, torch.Tensor) else m).float()
    hw = (size, size) if isinstance(size, int) else tuple(size)
    squeeze = t.dim() == 2
    if squeeze:
        t = t[None]
    out = F.interpolate(t[:, None], size=hw, mode="bilinear", align_corners=False)[:, 0]
    return (out[0] if squeeze else out).numpy()


@dataclass(frozen=True)
class Limits:
    """Colour limits of one panel.

    Attributes:
        vmin, vmax: colour limits (−m, m for signed maps; 0, max for ≥0 maps).
        signed: diverging (True) or sequential (False) colormap.
        mode: the colour mode the limits came from.
        clipped: limits at the 99th percentile of |M| ("clipped at p99").
        status: "ok", "all values ≤ 0 (max = …)" or "constant (= …)" for the panel's own data.
    """

    vmin: float
    vmax: float
    signed: bool
    mode: str
    clipped: bool = False
    status: str = "ok"

    @property
    def cmap(self) -> str:
        return DIVERGING_CMAP if self.signed else SEQUENTIAL_CMAP

    def legend(self, score: str = "logit", unit: str = "score × activation") -> str:
        """One line for the legend: numeric limits, mode, score, clipping, degenerate status."""
        rng = f"±{self.vmax:.3g}" if self.signed else f"[0, {self.vmax:.3g}]"
        s = f"{rng} ({unit}); colour: {self.mode}; score: {score}"
        if self.clipped:
            s += "; clipped at p99"
        if self.status != "ok":
            s += f"; {self.status}"
        return s


def map_status(m: np.ndarray | torch.Tensor, *, relu: bool) -> str:
    """``"ok"``, ``"all values ≤ 0 (max = …)"`` (ReLU'd map all zero) or ``"constant (= …)"``."""
    a = np.asarray(m, dtype=np.float64)
    if a.size == 0:
        return "empty"
    lo, hi = float(a.min()), float(a.max())
    if relu and hi <= 0:
        return f"all values ≤ 0 (max = {hi:.3g})"
    if hi - lo <= EPS * max(1.0, abs(hi), abs(lo)):
        return f"constant (= {hi:.3g})"
    return "ok"


def _extent(a: np.ndarray, *, signed: bool, robust: bool) -> float:
    v = np.abs(a) if signed else np.clip(a, 0, None)
    if v.size == 0:
        return 0.0
    return float(np.percentile(v, 99) if robust else v.max())


def color_limits(
    panels: Mapping[Hashable, np.ndarray | torch.Tensor],
    *,
    mode: str = "shared",
    signed: bool = True,
    group: Mapping[Hashable, Hashable] | None = None,
    robust: bool = False,
    raw: Mapping[Hashable, np.ndarray | torch.Tensor] | None = None,
) -> dict[Hashable, Limits]:
    """Colour limits for a set of panels.

    Args:
        panels: key -> map (any shape) as it will be drawn (signed M, or ReLU'd max(M, 0)).
        mode: ``"per-panel"``, ``"shared"`` (one limit per ``group``) or ``"global"``.
        signed: diverging ±max|M| limits (True) or sequential [0, max] (False).
        group: key -> group id for ``"shared"`` (e.g. the layer, so models compared at one layer
            share limits); default: one group (same as global).
        robust: use the 99th percentile of |M| instead of the max.
        raw: key -> signed map used for the degenerate-status message of ReLU'd panels.

    Returns:
        key -> :class:`Limits`; limits are never below ``EPS`` (divisions are guarded).

    Raises:
        ValueError: unknown mode.
    """
    if mode not in COLOR_MODES:
        raise ValueError(f"unknown colour mode {mode!r}; choose one of {', '.join(COLOR_MODES)}")
    arrs = {k: np.asarray(v, dtype=np.float64) for k, v in panels.items()}
    ext = {k: _extent(a, signed=signed, robust=robust) for k, a in arrs.items()}
    if mode == "per-panel":
        lim = dict(ext)
    elif mode == "global":
        g = max(ext.values(), default=0.0)
        lim = {k: g for k in arrs}
    else:
        grp = group or {}
        gmax: dict[Hashable, float] = {}
        for k, e in ext.items():
            gk = grp.get(k, None)
            gmax[gk] = max(gmax.get(gk, 0.0), e)
        lim = {k: gmax[grp.get(k, None)] for k in arrs}
    out = {}
    for k, a in arrs.items():
        m = max(lim[k], EPS)
        src = np.asarray(raw[k], dtype=np.float64) if raw is not None and k in raw else a
        status = map_status(src, relu=not signed)
        out[k] = Limits(-m if signed else 0.0, m, signed, mode, robust, status)
    return out


def normalise(m: np.ndarray, limits: Limits) -> np.ndarray:
    """Map values to [0, 1] for a colormap under ``limits`` (clipped)."""
    a = np.asarray(m, dtype=np.float64)
    return np.clip((a - limits.vmin) / max(limits.vmax - limits.vmin, EPS), 0.0, 1.0)


def summarize(cam: CamMap) -> dict[str, float | str]:
    """JSON-ready numbers of a CamMap: min/max of the raw map, max of the ReLU'd map, status."""
    r = cam.raw
    return {
        "layer": cam.layer,
        "min": float(r.min()),
        "max": float(r.max()),
        "relu_max": float(r.clamp_min(0).max()),
        "status": map_status(r.numpy(), relu=True),
        "score": cam.score,
        "shape": list(r.shape),
    }


def stack_panels(cams: Sequence[CamMap], image_index: int = 0, *, relu: bool = False) -> dict[str, np.ndarray]:
    """layer -> h×w map for one image (signed, or ReLU'd)."""
    out = {}
    for c in cams:
        m = c.relu if relu else c.raw
        out[c.layer] = m[image_index].numpy()
    return out
