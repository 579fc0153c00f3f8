"""Effective receptive field (RepLKNet procedure, analysis.md §2.1–2.4).

1. Truncated forward: run the model only up to the chosen stage (a forward hook raises a private
   exception once the stage has produced F, N×C×h×w — no head, nothing after the stage runs).
2. Seed s = Σ_c ReLU(F[n, c, h//2, w//2]) per image; one ``torch.autograd.grad(Σ_n s_n, x)``
   gives g (N×3×H×W); images are independent in eval mode, so one backward serves the batch.
3. Contribution m = Σ_rgb ReLU(g) (``grad_rule="relu"``, RepLKNet) or Σ_rgb |g| (``"abs"``, Luo's
   magnitude); images with NaN are skipped; the running **mean** over images is kept.
4. Display / metrics scaling D = log10(1 + m) / max log10(1 + m) (not scale-invariant: always the
   mean over images, same preprocessing for every model) or power m^p / max m^p.
5. High-contribution area ratios on D exactly as RepLKNet ``erf/analyze_erf.py``: the smallest
   centred square (side 2i+1, i = 1 … ⌊H/2⌋−1) whose share of Σ D is **>** t, ratio
   (side/H)·(side/W), for t ∈ {0.2, 0.3, 0.5, 0.99}; "not reached" (None) otherwise.
6. Radial profile on m: 1-pixel bins of r = √((y−y_c)² + (x−x_c)²) around (H//2, W//2), P(r) =
   mean m per bin / max, cumulative share C(r); r50 / r90 = smallest bin radius with C ≥ 0.5 / 0.9.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

THRESHOLDS = (0.2, 0.3, 0.5, 0.99)
GRAD_RULES = ("relu", "abs")
SEEDS = ("centre", "unit")


class _StopForward(Exception):
    """Raised from a forward hook to end the forward once the chosen stage has run."""

    def __init__(self, out: torch.Tensor) -> None:
        super().__init__("stop")
        self.out = out


def truncated_forward(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """Output of module ``layer`` of ``model`` on ``x``, without running anything after it.

    ``layer=""`` runs the whole model. The hook is removed in ``finally``.

    Raises:
        KeyError: ``layer`` is not a module path of ``model``.
        RuntimeError: the forward finished without running ``layer``.
    """
    if layer == "":
        return model(x)
    modules = dict(model.named_modules())
    if layer not in modules:
        top = [n for n, _ in model.named_children()]
        raise KeyError(f"layer {layer!r} not found in the model; top-level modules are: {', '.join(top)}")

    def hook(mod: nn.Module, inp: Any, out: Any) -> None:
        raise _StopForward(out)

    handle = modules[layer].register_forward_hook(hook)
    try:
        model(x)
    except _StopForward as stop:
        return stop.out
    finally:
        handle.remove()
    raise RuntimeError(f"the forward pass finished without running layer {layer!r}")


def log_scale(m: np.ndarray) -> np.ndarray:
    """D = log10(1 + m) / max(log10(1 + m)) (zeros stay zero; an all-zero map stays zero)."""
    d = np.log10(1.0 + np.asarray(m, dtype=np.float64))
    mx = d.max() if d.size else 0.0
    return d / mx if mx > 0 else d


def power_scale(m: np.ndarray, p: float = 0.25) -> np.ndarray:
    """D = m^p / max(m^p) (scale-invariant; VMamba uses p = 0.25 or 0.2)."""
    d = np.power(np.clip(np.asarray(m, dtype=np.float64), 0, None), p)
    mx = d.max() if d.size else 0.0
    return d / mx if mx > 0 else d


def area_ratios(d: np.ndarray, thresholds: Sequence[float] = THRESHOLDS) -> dict[float, tuple[int, float] | None]:
    """RepLKNet high-contribution area ratios of a (scaled) map D (H×W).

    Returns:
        t -> (side, ratio) for the first i in 1 … ⌊H/2⌋−1 with Σ_square D / Σ D > t, or None
        ("not reached", also for an all-zero map).
    """
    d = np.asarray(d, dtype=np.float64)
    h, w = d.shape
    total = d.sum()
    out: dict[float, tuple[int, float] | None] = {}
    for t in thresholds:
        out[t] = None
        if total <= 0:
            continue
        for i in range(1, h // 2):
            sq = d[h // 2 - i:h // 2 + i + 1, w // 2 - i:w // 2 + i + 1]
            if sq.sum() / total > t:
                side = 2 * i + 1
                out[t] = (side, (side / h) * (side / w))
                break
    return out


def radial_profile(m: np.ndarray) -> dict[str, Any]:
    """Radial profile of a contribution map m (H×W, ≥ 0) around (H//2, W//2), 1-pixel bins.

    Returns:
        ``{"r": bin radii (px), "profile": mean m per bin / max, "cumulative": C(r),
        "r50", "r90": px (None for an all-zero map), "r50_frac", "r90_frac": / (H/2)}``.
    """
    m = np.clip(np.asarray(m, dtype=np.float64), 0, None)
    h, w = m.shape
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.sqrt((yy - h // 2) ** 2 + (xx - w // 2) ** 2)
    b = np.floor(r).astype(np.int64).ravel()
    nb = int(b.max()) + 1
    sums = np.bincount(b, weights=m.ravel(), minlength=nb)
    counts = np.bincount(b, minlength=nb)
    prof = sums / np.maximum(counts, 1)
    pmax = prof.max()
    tot = sums.sum()
    cum = np.cumsum(sums) / tot if tot > 0 else np.zeros(nb)

    def radius(q: float) -> int | None:
        if tot <= 0:
            return None
        return int(np.argmax(cum >= q - 1e-12))

    r50, r90 = radius(0.5), radius(0.9)
    half = h / 2
    return {
        "r": np.arange(nb),
        "profile": prof / pmax if pmax > 0 else prof,
        "cumulative": cum,
        "r50": r50, "r90": r90,
        "r50_frac": None if r50 is None else r50 / half,
        "r90_frac": None if r90 is None else r90 / half,
    }


@dataclass
class ErfResult:
    """Effective receptive field of one model at one stage.

    Attributes:
        layer: the stage (module path; "" = whole model output).
        mean_map: H×W running mean of m over images (float64, ≥ 0).
        n_images: images averaged (NaN images excluded).
        skipped: images skipped for NaN.
        grad_rule: "relu" (RepLKNet) or "abs" (Luo).
        scaling: "log" (D = log10(1+m)/max) — what area ratios use.
        ratios: t -> (side, ratio) or None.
        radial: :func:`radial_profile` of ``mean_map``.
        input_hw, feature_hw: (H, W) of the input and of the stage output.
    """

    layer: str
    mean_map: np.ndarray
    n_images: int
    skipped: int
    grad_rule: str
    ratios: dict[float, tuple[int, float] | None]
    radial: dict[str, Any]
    input_hw: tuple[int, int]
    feature_hw: tuple[int, int]
    scaling: str = "log"
    notes: list[str] = field(default_factory=list)

    @property
    def scaled(self) -> np.ndarray:
        """D = log10(1 + m) / max (the map the area ratios are computed on)."""
        return log_scale(self.mean_map)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready numbers (no maps)."""
        rat = {f"{t:g}": (None if v is None else {"side": v[0], "ratio": v[1]}) for t, v in self.ratios.items()}
        return {
            "layer": self.layer, "n_images": self.n_images, "skipped_nan": self.skipped,
            "grad_rule": self.grad_rule, "scaling": "log10(1+m)/max", "area_ratios": rat,
            "r50": self.radial["r50"], "r90": self.radial["r90"],
            "r50_frac": self.radial["r50_frac"], "r90_frac": self.radial["r90_frac"],
            "input_hw": list(self.input_hw), "feature_hw": list(self.feature_hw), "notes": list(self.notes),
        }


def contribution_maps(
    model: nn.Module, layer: str, x: torch.Tensor, *, grad_rule: str = "relu", seed: str = "centre",
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Per-image contribution maps m (N×H×W) of the centre unit of ``layer`` (one backward).

    Args:
        model: eval-mode model (parameters may or may not require grad; only ∂/∂x is computed).
        layer: stage module path ("" = the model output, which must be N×C×h×w).
        x: N×3×H×W input (not modified; a grad-requiring copy is used).
        grad_rule: ``"relu"`` (Σ_rgb ReLU(g), RepLKNet) or ``"abs"`` (Σ_rgb |g|).
        seed: ``"centre"`` (Σ_c ReLU(F[n, c, h//2, w//2])) or ``"unit"`` (F[n, 0, h//2, w//2], Luo).

    Returns:
        (N×H×W float64 maps on CPU, (h, w) of the stage output).
    """
    _check_rules(grad_rule, seed)
    xi = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        f = truncated_forward(model, layer, xi)
        s, (h, w) = centre_seed(f, layer, seed=seed)
        if not s.requires_grad:
            raise RuntimeError(f"the output of {layer!r} does not depend on the input")
        (g,) = torch.autograd.grad(s, xi, allow_unused=True)
    return contribution(g if g is not None else torch.zeros_like(xi), grad_rule), (h, w)


def _check_rules(grad_rule: str, seed: str) -> None:
    if grad_rule not in GRAD_RULES:
        raise ValueError(f"unknown grad_rule {grad_rule!r}; choose one of {', '.join(GRAD_RULES)}")
    if seed not in SEEDS:
        raise ValueError(f"unknown seed {seed!r}; choose 'centre' or 'unit'")


def centre_seed(f: Any, layer: str, *, seed: str = "centre") -> tuple[torch.Tensor, tuple[int, int]]:
    """The scalar whose input gradient is the ERF: Σ_n Σ_c ReLU(F[n, c, h//2, w//2]) (``"centre"``)
    or Σ_n F[n, 0, h//2, w//2] (``"unit"``, Luo).

    Args:
        f: the stage output F, N×C×h×w (live, part of the autograd graph).
        layer: its module path (for the error message).
        seed: ``"centre"`` or ``"unit"``.

    Returns:
        (0-d tensor, (h, w)).

    Raises:
        ValueError: F is not a 4-D tensor, or an unknown seed.
    """
    if seed not in SEEDS:
        raise ValueError(f"unknown seed {seed!r}; choose 'centre' or 'unit'")
    if not isinstance(f, torch.Tensor) or f.dim() != 4:
        raise ValueError(f"layer {layer!r} output is not N×C×h×w (got {getattr(f, 'shape', type(f))})")
    h, w = f.shape[-2:]
    centre = f[:, :, h // 2, w // 2]
    s = centre.clamp_min(0).sum() if seed == "centre" else centre[:, 0].sum()
    return s, (int(h), int(w))


def contribution(g: torch.Tensor, grad_rule: str = "relu") -> torch.Tensor:
    """Contribution maps m (N×H×W float64, CPU) from input gradients g (N×3×H×W):
    Σ_rgb ReLU(g) (``"relu"``) or Σ_rgb |g| (``"abs"``)."""
    if grad_rule not in GRAD_RULES:
        raise ValueError(f"unknown grad_rule {grad_rule!r}; choose one of {', '.join(GRAD_RULES)}")
    g = g.detach().double()
    m = (g.clamp_min(0) if grad_rule == "relu" else g.abs()).sum(1)
    return m.cpu()


def effective_receptive_field(
    model: nn.Module,
    layer: str,
    images: torch.Tensor,
    *,
    grad_rule: str = "relu",
    batch_size: int = 8,
    thresholds: Sequence[float] = THRESHOLDS,
) -> ErfResult:
    """ERF of ``layer``'s centre unit, averaged over ``images`` (N×3×H×W, preprocessed).

    Runs the forward only up to ``layer`` (truncated) and one backward per batch of
    ``batch_size`` images. Images whose map has NaN are skipped (RepLKNet).

    Returns:
        ErfResult (mean map, area ratios on the log-scaled map, radial profile).

    Raises:
        ValueError: no images / not N×3×H×W, bad grad_rule.
        KeyError: unknown layer.
    """
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"need N×3×H×W images with N ≥ 1, got {tuple(images.shape)}")
    maps: list[torch.Tensor] = []
    fhw = (0, 0)
    for i in range(0, images.shape[0], batch_size):
        m, fhw = contribution_maps(model, layer, images[i:i + batch_size], grad_rule=grad_rule)
        maps.append(m)
    hw = (int(images.shape[-2]), int(images.shape[-1]))
    return erf_from_maps(torch.cat(maps), layer, hw, fhw, grad_rule=grad_rule, thresholds=thresholds)


def erf_from_maps(
    maps: torch.Tensor,
    layer: str,
    input_hw: tuple[int, int],
    feature_hw: tuple[int, int],
    *,
    grad_rule: str = "relu",
    thresholds: Sequence[float] = THRESHOLDS,
) -> ErfResult:
    """Aggregate per-image contribution maps (steps 3–6) into an :class:`ErfResult`.

    Shared by :func:`effective_receptive_field` (its own truncated pass) and
    ``viz.analysis.analyze`` (maps from the input gradient taken on the recorded graph,
    :class:`viz.recorder.Recorder` ``finish(erf_layer=..., erf_input=...)``), so both give the
    same numbers for the same gradients.

    Args:
        maps: N×H×W float64 contribution maps (:func:`contribution`), ≥ 0.
        layer: the stage the seed was taken at.
        input_hw, feature_hw: (H, W) of the input and (h, w) of the stage output.
        grad_rule: the rule the maps were made with (recorded in the result).
        thresholds: area-ratio thresholds.

    Returns:
        ErfResult: running mean over the images without NaN, area ratios, radial profile.
    """
    total = None
    n = skipped = 0
    for mi in maps:
        if torch.isnan(mi).any():
            skipped += 1
            continue
        n += 1
        total = mi.clone() if total is None else total + (mi - total) / n  # running mean
    hw = (int(input_hw[0]), int(input_hw[1]))
    fhw = (int(feature_hw[0]), int(feature_hw[1]))
    mean_map = total.numpy() if total is not None else np.zeros(hw)
    notes = []
    if max(hw) < 512:
        notes.append(f"input {hw[0]}×{hw[1]} < 512: the field may hit the border (RepLKNet#25); "
                     "compare models only at equal input size")
    if n == 0:
        notes.append("every image produced NaN gradients")
    ratios = area_ratios(log_scale(mean_map), thresholds)
    return ErfResult(layer, mean_map, n, skipped, grad_rule, ratios, radial_profile(mean_map), hw, fhw, "log", notes)


def support(m: np.ndarray, *, atol: float = 0.0) -> tuple[slice, slice] | None:
    """Bounding box (row slice, col slice) of the entries of m greater than ``atol``."""
    nz = np.argwhere(np.asarray(m) > atol)
    if nz.size == 0:
        return None
    (r0, c0), (r1, c1) = nz.min(0), nz.max(0)
    return slice(int(r0), int(r1) + 1), slice(int(c0), int(c1) + 1)

