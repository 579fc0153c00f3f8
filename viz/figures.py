"""Matplotlib figure builders (no pyplot: ``matplotlib.figure.Figure``, thread-safe) and fast PNG panels.

Builders take data (an :class:`viz.analysis.Analysis` or plain arrays) and return a ``Figure``;
nothing here touches a model. Colour rules follow analysis.md §1.2: signed maps use a diverging
colormap centred on 0 (±max|M|), non-negative maps a perceptually uniform sequential one
(viridis) on [0, max]; every panel's legend states the numeric limits, the colour mode and the
score.
"""

from __future__ import annotations

import io
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image

from viz.gradcam import EPS, Limits, color_limits, upsample

if TYPE_CHECKING:  # pragma: no cover
    from viz.analysis import Analysis
    from viz.erf import ErfResult
    from viz.taps import TapSummary


def _img_array(img: Image.Image | np.ndarray) -> np.ndarray:
    a = np.asarray(img.convert("RGB") if isinstance(img, Image.Image) else img)
    return a.astype(np.float64) / (255.0 if a.dtype == np.uint8 else 1.0)


def colorize(m: np.ndarray, limits: Limits) -> np.ndarray:
    """H×W map -> H×W×4 RGBA floats under ``limits`` (its colormap)."""
    norm = Normalize(vmin=limits.vmin, vmax=max(limits.vmax, limits.vmin + EPS), clip=True)
    return colormaps[limits.cmap](norm(np.asarray(m, dtype=np.float64)))


def overlay_array(image: Image.Image | np.ndarray, m: np.ndarray, limits: Limits, *, alpha: float = 0.5) -> np.ndarray:
    """RGB uint8 overlay of a layer-resolution map (bilinearly upsampled) on the S×S crop."""
    base = _img_array(image)
    h, w = base.shape[:2]
    up = upsample(m, (h, w)) if np.asarray(m).shape != (h, w) else np.asarray(m, dtype=np.float64)
    rgba = colorize(up, limits)
    out = (1 - alpha) * base[..., :3] + alpha * rgba[..., :3]
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)


def png_bytes(arr: np.ndarray) -> bytes:
    """Encode an RGB(A) uint8 array as PNG (fast path for per-panel files; no Figure)."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


#: figures whose builder fixed the margins itself: saved without ``bbox_inches="tight"`` (which
#: draws the whole figure twice: once to measure it, once to render)
_FIXED_LAYOUT: weakref.WeakSet[Figure] = weakref.WeakSet()


def figure_png(fig: Figure, *, dpi: int = 100, compress_level: int = 1) -> bytes:
    """PNG bytes of a Figure (Agg canvas; no pyplot).

    ``compress_level`` is zlib's 0–9 (PNG is lossless at every level): 1 encodes the large overlay
    grids several times faster than PIL's default 6 for files ≈ 15 % larger. Figures laid out by
    their builder (the Grad-CAM grid) are drawn once; the others are cropped to their tight box.
    """
    buf = io.BytesIO()
    tight = None if fig in _FIXED_LAYOUT else "tight"
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches=tight, pil_kwargs={"compress_level": int(compress_level)})
    return buf.getvalue()


def cam_panels(analysis: Analysis, image_index: int = 0, *, relu: bool = False) -> dict[tuple[str, str], np.ndarray]:
    """(model label, layer) -> h×w Grad-CAM map of one image (signed M, or ReLU'd)."""
    out = {}
    for m in analysis.models:
        for layer, cam in m.cams.items():
            mm = cam.relu if relu else cam.raw
            out[(m.label, layer)] = mm[image_index].numpy()
    return out


def cam_limits(
    analysis: Analysis, image_index: int = 0, *, mode: str = "shared", relu: bool = False, robust: bool = False,
) -> dict[tuple[str, str], Limits]:
    """Colour limits per (model, layer) panel; "shared" shares limits across models per layer."""
    panels = cam_panels(analysis, image_index, relu=relu)
    raw = cam_panels(analysis, image_index, relu=False)
    group = {k: k[1] for k in panels}
    return color_limits(panels, mode=mode, signed=not relu, group=group, robust=robust, raw=raw)


def gradcam_grid(
    analysis: Analysis,
    image_index: int = 0,
    *,
    mode: str = "shared",
    relu: bool = False,
    robust: bool = False,
    alpha: float = 0.55,
    panel_size: float = 2.4,
) -> Figure:
    """Grad-CAM overlay grid: one column per model (side by side, as in the app), rows = layers.

    Args:
        analysis: the result of :func:`viz.analysis.analyze`.
        image_index: which image.
        mode: colour mode "per-panel" | "shared" (default: per layer across models) | "global".
        relu: draw the paper's ReLU'd map (sequential) instead of the raw signed map (diverging).
        robust: limits at the 99th percentile of |M| ("clipped at p99").
        alpha: overlay opacity.
        panel_size: inches per panel.

    Returns:
        Figure with ``len(layers)`` rows × ``len(models)`` columns of S×S overlays; column titles
        name the model, row labels the layer, every panel states its colour range.
    """
    models = analysis.models
    layers = list(analysis.layers)
    panels = cam_panels(analysis, image_index, relu=relu)
    lims = cam_limits(analysis, image_index, mode=mode, relu=relu, robust=robust)
    crop = analysis.images[image_index]
    nr, nc = max(len(layers), 1), max(len(models), 1)
    fig = Figure(figsize=(panel_size * nc + 0.8, panel_size * nr + 1.2))
    axes = fig.subplots(nr, nc, squeeze=False)
    for i, m in enumerate(models):
        for j, layer in enumerate(layers):
            ax = axes[j][i]
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(layer, fontsize=9)
            key = (m.label, layer)
            head = f"{m.label}\n" if j == 0 else ""
            if key not in panels:
                ax.set_title(f"{head}no map", fontsize=7)
                ax.text(0.5, 0.5, "no map", ha="center", va="center", transform=ax.transAxes)
                continue
            lim = lims[key]
            ax.imshow(overlay_array(crop, panels[key], lim, alpha=alpha))
            rng = f"±{lim.vmax:.3g}" if lim.signed else f"[0, {lim.vmax:.3g}]"
            sub = rng if lim.status == "ok" else lim.status
            ax.set_title(f"{head}{layer}: {sub}", fontsize=7 if j else 8)
            # one colour bar per row when the row shares its limits ("shared"/"global"), else per panel
            row = [lims.get((mm.label, layer)) for mm in models if (mm.label, layer) in panels]
            same = all(r is not None and (r.vmin, r.vmax, r.cmap) == (lim.vmin, lim.vmax, lim.cmap) for r in row)
            last = all((mm.label, layer) not in panels for mm in models[i + 1:])
            if not same or last:
                _inset_colorbar(fig, ax, lim, labelsize=6)
    cls = analysis.targets[image_index] if image_index < len(analysis.targets) else None
    what = "ReLU'd Grad-CAM max(M,0)" if relu else "raw signed Grad-CAM M"
    cname = analysis.label_of(cls) if cls is not None else "?"
    # fixed margins in inches (a two-line suptitle and two-line column titles on top, layer labels on
    # the left, the colour bars' tick labels on the right), so the PNG is drawn once, not measured
    # first; a title wider than the figure (narrow grid, long class name) falls back to the tight box
    w_in, h_in = fig.get_size_inches()
    fig.subplots_adjust(left=0.42 / w_in, right=1 - 0.62 / w_in, bottom=0.12 / h_in, top=1 - 0.92 / h_in,
                        wspace=0.12, hspace=0.22)
    title = fig.suptitle(f"{what} · class {cls} ({cname})" "\n" f"score: pre-softmax logit · colour: {mode}"
                         f"{' · clipped at p99' if robust else ''} · units: score × activation", fontsize=9,
                         y=1 - 0.1 / h_in, va="top")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    box = title.get_window_extent(FigureCanvasAgg(fig).get_renderer())
    if box.x0 >= 0 and box.x1 <= fig.bbox.width:
        _FIXED_LAYOUT.add(fig)
    return fig


def _inset_colorbar(fig: Figure, ax: Any, lim: Limits, *, labelsize: int) -> None:
    """A thin colour bar just right of ``ax`` (an inset axes: no re-layout of the grid, cheap)."""
    cax = ax.inset_axes((1.03, 0.0, 0.05, 1.0))
    fig.colorbar(_mappable(colormaps[lim.cmap], lim), cax=cax).ax.tick_params(labelsize=labelsize)


def _mappable(cmap: Any, lim: Limits) -> Any:
    from matplotlib.cm import ScalarMappable

    sm = ScalarMappable(norm=Normalize(vmin=lim.vmin, vmax=max(lim.vmax, lim.vmin + EPS)), cmap=cmap)
    sm.set_array([])
    return sm


def tap_limits(t: TapSummary) -> Limits:
    """Limits for a tap's spatial map in its **true range** (SAConv's switch is unbounded).

    Gates in (0, 1) and masks use [0, 1] sequential; signed maps (switch S, branches) use a
    diverging scale ±max|value| when they have negative values, else [0, max].
    """
    m = t.spatial if t.spatial is not None else np.zeros((1, 1))
    lo, hi = float(np.min(m)), float(np.max(m))
    if t.kind == "mask" or (t.kind == "spatial_gate" and lo >= 0 and hi <= 1 and "switch" not in t.local):
        return Limits(0.0, 1.0, False, "fixed [0, 1]")
    if lo < 0:
        e = max(abs(lo), abs(hi), EPS)
        return Limits(-e, e, True, "per-panel")
    return Limits(0.0, max(hi, EPS), False, "per-panel")


def tap_overlay(crop: Image.Image, t: TapSummary, image_index: int = 0, *, alpha: float = 0.6) -> np.ndarray | None:
    """RGB overlay of a spatial tap upsampled to the crop (None for taps without a spatial map)."""
    if t.spatial is None:
        return None
    return overlay_array(crop, t.spatial[min(image_index, len(t.spatial) - 1)], tap_limits(t), alpha=alpha)


def channel_strip(values: np.ndarray, *, height: int = 24, width: int = 256) -> np.ndarray:
    """RGB strip of per-channel values (viridis on [min, max]) for channel-weight taps."""
    v = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(v.min()), float(v.max())
    lim = Limits(lo, hi if hi > lo else lo + EPS, False, "per-panel")
    idx = np.minimum((np.arange(width) * len(v)) // width, len(v) - 1)
    row = colorize(v[idx], lim)[..., :3]
    return (np.repeat(row[None], height, axis=0) * 255).astype(np.uint8)


def _tap_title(t: TapSummary) -> str:
    s = f"{t.site} · {t.local} ({t.kind})\n[{t.min:.3g}, {t.max:.3g}]"
    st = t.stats
    if "share_small" in st:
        s += f" · small {st['share_small']:.0%} / large {st['share_large']:.0%} (S>0.5→small)"
    elif "informative_fraction" in st:
        s += f" · informative {st['informative_fraction']:.0%}"
    elif "mean_beta" in st:
        s += f" · mean β {st['mean_beta']:.3f}"
    if st.get("channel_attention"):
        s += " · T1 1×1: channel attention"
    return s


def _branch_shares(taps: Sequence[TapSummary]) -> tuple[list[str], dict[str, list[float]]]:
    """Sites (forward order) and, per branch local name, its energy share at each site (NaN = absent)."""
    sites: list[str] = []
    for t in taps:
        if t.site not in sites:
            sites.append(t.site)
    locals_: list[str] = []
    for t in taps:
        if t.local not in locals_:
            locals_.append(t.local)
    shares = {loc: [float("nan")] * len(sites) for loc in locals_}
    for t in taps:
        v = t.stats.get("energy_share")
        if isinstance(v, (int, float)):
            shares[t.local][sites.index(t.site)] = float(v)
    return sites, shares


def _draw_branch_shares(ax: Any, label: str, taps: Sequence[TapSummary]) -> None:
    """Stacked bars: per swapped site, each branch's energy share ‖b_i‖² / Σ_j ‖b_j‖² (sums to 1)."""
    sites, shares = _branch_shares(taps)
    x = np.arange(len(sites))
    bottom = np.zeros(len(sites))
    palette = ("#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee", "#aa3377")
    for k, (loc, vals) in enumerate(shares.items()):
        v = np.nan_to_num(np.asarray(vals, dtype=np.float64), nan=0.0)
        ax.bar(x, v, bottom=bottom, color=palette[k % len(palette)], label=loc, width=0.8)
        bottom += v
    ax.set_ylim(0, 1)
    ax.set_xticks(x)
    ax.set_xticklabels([str(i + 1) for i in range(len(sites))], fontsize=4)
    ax.tick_params(labelsize=5)
    ax.set_xlabel("swapped site (forward order)", fontsize=5)
    ax.set_ylabel("energy share", fontsize=5)
    ax.legend(fontsize=4, loc="lower right", framealpha=0.6)
    mean = {loc: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for loc, v in
            ((loc, np.asarray(vals, dtype=np.float64)) for loc, vals in shares.items())}
    means = " / ".join(f"{loc} {v:.0%}" for loc, v in mean.items())
    ax.set_title(f"{label}: branch energy shares ‖b_i‖²/Σ‖b_j‖²\n{len(sites)} sites · mean {means}", fontsize=5)


def tap_maps(
    analysis: Analysis, image_index: int = 0, *, models: Sequence[str] | None = None, max_panels: int = 8,
    panel_size: float = 2.3,
) -> Figure:
    """Spatial taps (gates, masks, switches) over the image, one row per model (up to ``max_panels``).

    Channel-weight taps are drawn as histograms of their per-channel means. Models with branch taps
    (ACB square / vertical / horizontal, SAConv small / large, SPConv representative / redundant)
    get one panel of stacked bars: each branch's energy share per swapped site — so a model whose
    only taps are branches (ACB) still has a visible panel.
    """
    rows = [m for m in analysis.models if (models is None or m.label in models) and m.taps]
    crop = analysis.images[image_index]
    per_row: list[tuple[Any, list[Any]]] = []
    for m in rows:
        sp = [t for t in m.taps if t.spatial is not None and t.kind in ("spatial_gate", "mask")]
        cw = [t for t in m.taps if t.kind == "channel_weights" and t.channels is not None]
        br = [t for t in m.taps if t.kind == "branch"]
        items: list[Any] = list((sp + cw)[: max_panels - 1 if br else max_panels])
        if br:
            items.append(("branches", br))
        if items:
            per_row.append((m, items))
    nc = max([len(p) for _, p in per_row] + [1])
    nr = max(len(per_row), 1)
    fig = Figure(figsize=(panel_size * min(nc, 8) + 0.5, panel_size * nr * max(1, -(-nc // 8)) + 0.8))
    if not per_row:
        ax = fig.add_subplot(1, 1, 1)
        ax.axis("off")
        ax.text(0.5, 0.5, "no taps (the baseline has none; variants expose their maps through taps)",
                ha="center", va="center", fontsize=9)
        return fig
    cols = min(nc, 8)
    total_rows = sum(-(-max(len(p), 1) // cols) for _, p in per_row)
    r0 = 0
    for m, items in per_row:
        for k, t in enumerate(items):
            ax = fig.add_subplot(total_rows, cols, (r0 + k // cols) * cols + k % cols + 1)
            if isinstance(t, tuple):
                _draw_branch_shares(ax, m.label, t[1])
                continue
            if t.spatial is not None and t.kind in ("spatial_gate", "mask"):
                lim = tap_limits(t)
                ax.imshow(tap_overlay(crop, t, image_index))
                ax.set_xticks([])
                ax.set_yticks([])
                _inset_colorbar(fig, ax, lim, labelsize=5)
            else:
                ax.hist(np.asarray(t.channels).ravel(), bins=20, color="#4477aa")
                ax.tick_params(labelsize=5)
            ax.set_title(f"{m.label}: {_tap_title(t)}", fontsize=5)
        r0 += -(-max(len(items), 1) // cols)
    # above the top row's two-line titles (the tight bounding box keeps it in the PNG)
    fig.suptitle("variant taps (true ranges; spatial maps bilinearly upsampled to the input crop)", fontsize=8,
                 y=1.0, va="bottom")
    return fig


def erf_figure(
    results: dict[str, ErfResult],
    *,
    theoretical: dict[str, dict | None] | None = None,
    panel_size: float = 2.6,
    provenance: dict[str, str] | None = None,
) -> Figure:
    """ERF maps (log-scaled, D = log10(1+m)/max) per model plus one radial-profile axis for all.

    Args:
        results: model label -> :class:`viz.erf.ErfResult`.
        theoretical: model label -> ``viz.rf.theoretical_rf`` dict (shown beside the ERF).
        provenance: model label -> short provenance text for the caption.
    """
    labels = list(results)
    n = max(len(labels), 1)
    fig = Figure(figsize=(panel_size * (n + 1.3), panel_size + 1.4))
    axes = fig.subplots(1, n + 1, squeeze=False)[0]
    for ax, lbl in zip(axes, labels):
        r = results[lbl]
        ax.imshow(r.scaled, cmap="magma", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        rat = r.ratios
        txt = " ".join(f"{t:g}:{'n/r' if v is None else f'{v[1]:.3f}'}" for t, v in rat.items())
        th = (theoretical or {}).get(lbl) or {}
        trf = _rf_short(th)
        ax.set_title(f"{lbl}\nratios {txt}\nr50 {r.radial['r50']} px · r90 {r.radial['r90']} px\n"
                     f"theoretical RF: {trf}", fontsize=6)
    pax = axes[-1]
    for lbl in labels:
        r = results[lbl]
        pax.plot(r.radial["r"], r.radial["profile"], label=lbl, lw=1)
    pax.set_xlabel("radius (input px)", fontsize=7)
    pax.set_ylabel("mean contribution / max", fontsize=7)
    pax.tick_params(labelsize=6)
    if labels:
        pax.legend(fontsize=6)
        first = results[labels[0]]
        prov = "; ".join(f"{k}: {v}" for k, v in (provenance or {}).items())
        fig.suptitle(f"ERF at {first.layer} · {first.n_images} image(s) · input {first.input_hw[0]}×{first.input_hw[1]} · "
                     f"grad rule {first.grad_rule} · log scaling · area ratios at t = 0.2/0.3/0.5/0.99"
                     f"{' · ' + prov if prov else ''}", fontsize=7)
    return fig


def _rf_short(th: dict | None) -> str:
    """Short theoretical-RF caption: local value (clipped to the input) and whether it is global."""
    if not th:
        return "n/a"
    r = th.get("r_clipped", th.get("r"))
    via = th.get("global_via") or []
    g = f", global via {via[0]}{' …' if len(via) > 1 else ''}" if th.get("global") and via else ""
    return f"{r} px local{g}"[:60]


def erf_panel(r: ErfResult) -> np.ndarray:
    """RGB uint8 image of one log-scaled ERF map (magma on [0, 1])."""
    rgba = colormaps["magma"](np.clip(r.scaled, 0, 1))
    return (rgba[..., :3] * 255).astype(np.uint8)
