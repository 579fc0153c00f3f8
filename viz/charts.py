"""Plotly figure builders for cost, redundancy and CKA (no pyplot; every builder returns a Figure).

Inputs are the plain dicts produced by :mod:`viz.cost` (``profile_model``), :mod:`viz.redundancy`
(``redundancy_metrics``, ``cka_matrix``) — or the same structures read back from report.json — so
the figures can be rebuilt without the tensors. Colour scales are perceptually uniform: cmocean
"balance" (diverging, centred at 0) for signed similarities, Viridis for values in [0, 1]; model
traces use the colour-blind-safe qualitative palette.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative, sequential
from plotly.subplots import make_subplots

try:  # plotly >= 5 ships cmocean
    from plotly.colors import cmocean as _cmocean

    DIVERGING = _cmocean.balance
except ImportError:  # pragma: no cover
    DIVERGING = "RdBu_r"
SEQUENTIAL = sequential.Viridis
MODEL_COLORS = qualitative.Safe

#: metric -> (axis title, unit suffix for hover, value key in profile "units" rows)
COST_METRICS: dict[str, tuple[str, str, str]] = {
    "latency": ("latency (ms)", "ms", "latency_ms"),
    "params": ("parameters", "params", "params"),
    "flops": ("FLOPs", "FLOPs", "flops"),
    "macs": ("MACs", "MACs", "macs"),
}

#: redundancy keys and their axis titles
REDUNDANCY_LABELS: dict[str, str] = {
    "near_duplicate_fraction": "near-duplicate fraction",
    "mean_abs_cos": "mean |cos|",
    "mean_abs_cos_plain": "mean |cos| (plain)",
    "mean_abs_cos_centred": "mean |cos| (centred)",
    "share_pairs_above_tau": "share of pairs |S|>τ",
    "distinct_fraction": "distinct channels / C′",
    "erank_ratio": "effective rank / C′",
    "pr_ratio": "participation ratio / C′",
    "k90_ratio": "k90 / C′",
    "dead_fraction": "dead fraction",
    "sparsity": "sparsity",
}


def _color(i: int) -> str:
    return MODEL_COLORS[i % len(MODEL_COLORS)]


def _si(v: float | None, unit: str) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "n/a"
    if unit == "ms":
        return f"{v:.3f} ms"
    for scale, p in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:.3f} {p}{unit} ({int(round(v)):,})"
    return f"{v:g} {unit}"


def _units(profile: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    if "units" in profile:
        return list(profile["units"])
    raise ValueError(f"not a profile_model() dict: keys {sorted(profile)[:8]}")


def cost_by_layer(
    profiles: Mapping[str, Mapping[str, Any]],
    metric: str = "latency",
    *,
    kind: str = "bar",
    title: str | None = None,
    height: int = 420,
) -> go.Figure:
    """Per-layer cost of several models, by depth (grouped bars or lines).

    Args:
        profiles: model label -> :func:`viz.cost.profile_model` dict (uses its ``"units"``
            rows; the layers of the first model define the x order).
        metric: "latency" (ms, per-layer medians from the hooked pass, IQR error bars), "params",
            "flops" or "macs".
        kind: "bar" (grouped) or "line".
        title: figure title; default names the metric and, for latency, the settings.
        height: figure height in px.

    Returns:
        Figure with one trace per model; hover shows exact values with units.

    Raises:
        ValueError: unknown metric or kind, or inputs that are not profile dicts.
    """
    if metric not in COST_METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {sorted(COST_METRICS)}")
    if kind not in ("bar", "line"):
        raise ValueError(f"unknown kind {kind!r}; choose 'bar' or 'line'")
    axis, unit, key = COST_METRICS[metric]
    order: list[str] = []
    for prof in profiles.values():
        for row in _units(prof):
            if row["name"] not in order:
                order.append(row["name"])
    fig = go.Figure()
    notes = []
    for i, (label, prof) in enumerate(profiles.items()):
        rows = {r["name"]: r for r in _units(prof)}
        ys = [rows.get(n, {}).get(key) for n in order]
        text = [_si(v, unit) for v in ys]
        err = None
        if metric == "latency" and prof.get("latency"):
            iqr = {p["name"]: p["iqr_ms"] for p in prof["latency"].get("per_layer", [])}
            err = {"type": "data", "array": [iqr.get(n, 0.0) for n in order], "visible": True}
            lat = prof["latency"]
            notes.append(
                f"{label}: whole {lat['median_ms']:.2f} ms (IQR {lat['iqr_ms']:.2f}) vs "
                f"Σ per-layer {lat['per_layer_sum_ms'] or 0:.2f} ms"
            )
        common = {
            "name": label,
            "x": order,
            "y": ys,
            "customdata": text,
            "hovertemplate": f"<b>{label}</b><br>%{{x}}<br>%{{customdata}}<extra></extra>",
        }
        if kind == "bar":
            fig.add_trace(go.Bar(marker_color=_color(i), error_y=err, **common))
        else:
            fig.add_trace(go.Scatter(mode="lines+markers", line={"color": _color(i)}, error_y=err, **common))
    if title is None:
        title = f"per-layer {axis}"
        if metric == "latency":
            first = next((p for p in profiles.values() if p.get("latency")), None)
            if first is not None:
                lb = first["latency"]["labels"]
                title += (
                    f" — {lb['device']}, {lb['dtype']}, batch {lb['batch']}, {lb['input_size']}, "
                    f"{lb['threads']} threads, {lb['statistic']}; includes hook overhead"
                )
        if metric in ("flops", "macs"):
            first = next(iter(profiles.values()), None)
            if first is not None and not first["flops"].get("complete", True):
                title += " — conv/matmul only (partial)"
    fig.update_layout(
        title={"text": title, "font": {"size": 13}},
        barmode="group",
        height=height,
        xaxis_title="layer (depth order)",
        yaxis_title=axis,
        legend={"orientation": "h", "y": -0.3},
        margin={"l": 60, "r": 20, "t": 60, "b": 120},
    )
    if notes:
        fig.add_annotation(
            text="<br>".join(notes), xref="paper", yref="paper", x=1, y=1, xanchor="right", yanchor="top",
            showarrow=False, align="right", font={"size": 10}, bgcolor="rgba(255,255,255,0.7)",
        )
    return fig


def latency_chart(profiles: Mapping[str, Mapping[str, Any]], **kw: Any) -> go.Figure:
    """Per-layer latency (ms) by depth; see :func:`cost_by_layer`."""
    return cost_by_layer(profiles, "latency", **kw)


def params_chart(profiles: Mapping[str, Mapping[str, Any]], **kw: Any) -> go.Figure:
    """Per-layer parameter counts by depth; see :func:`cost_by_layer`."""
    return cost_by_layer(profiles, "params", **kw)


def flops_chart(profiles: Mapping[str, Mapping[str, Any]], *, unit: str = "MACs", **kw: Any) -> go.Figure:
    """Per-layer FLOPs or MACs (``unit`` "FLOPs" | "MACs"; FLOPs = 2 × MACs) by depth."""
    if unit not in ("FLOPs", "MACs"):
        raise ValueError(f"unknown unit {unit!r}; choose 'FLOPs' or 'MACs'")
    return cost_by_layer(profiles, "flops" if unit == "FLOPs" else "macs", **kw)


def cost_summary(profiles: Mapping[str, Mapping[str, Any]], *, height: int = 360) -> go.Figure:
    """Whole-model params (M), GMACs and latency (ms, median with IQR) side by side per model."""
    fig = make_subplots(rows=1, cols=3, subplot_titles=("params (M)", "GMACs", "latency (ms)"))
    labels = list(profiles)
    params = [p["params"]["total"] / 1e6 for p in profiles.values()]
    macs = [p["flops"]["total_macs"] / 1e9 for p in profiles.values()]
    lat = [p["latency"]["median_ms"] if p.get("latency") else None for p in profiles.values()]
    iqr = [p["latency"]["iqr_ms"] if p.get("latency") else 0.0 for p in profiles.values()]
    colors = [_color(i) for i in range(len(labels))]
    fig.add_trace(go.Bar(x=labels, y=params, marker_color=colors, name="params",
                         hovertemplate="%{x}: %{y:.4f} M params<extra></extra>"), 1, 1)
    fig.add_trace(go.Bar(x=labels, y=macs, marker_color=colors, name="GMACs",
                         hovertemplate="%{x}: %{y:.4f} GMACs<extra></extra>"), 1, 2)
    fig.add_trace(go.Bar(x=labels, y=lat, marker_color=colors, name="latency",
                         error_y={"type": "data", "array": iqr, "visible": True},
                         hovertemplate="%{x}: %{y:.3f} ms (median)<extra></extra>"), 1, 3)
    missing = [lb for lb, v in zip(labels, lat) if v is None]
    if missing:
        # latency is measured on demand (the app's Profile tab): say so instead of an empty axis
        text = ("not measured yet<br>(open the Profile tab)" if len(missing) == len(labels)
                else "not measured yet: " + ", ".join(missing))
        fig.add_annotation(text=text, xref="x3 domain", yref="y3 domain", x=0.5, y=0.5, showarrow=False,
                           font={"size": 12, "color": "#9a3412"})
    fig.update_layout(height=height, showlegend=False, margin={"l": 50, "r": 20, "t": 50, "b": 60})
    return fig


def redundancy_by_depth(
    metrics: Mapping[str, Mapping[str, Mapping[str, Any]]],
    keys: Sequence[str] = ("near_duplicate_fraction", "mean_abs_cos", "erank_ratio", "pr_ratio"),
    *,
    title: str | None = None,
    height_per_row: int = 220,
) -> go.Figure:
    """Redundancy metrics by depth, one subplot per metric, one line per model.

    Args:
        metrics: model label -> layer name (depth order) -> :func:`viz.redundancy.redundancy_metrics`
            dict (or its :func:`~viz.redundancy.summary`).
        keys: metric keys to plot (see ``REDUNDANCY_LABELS``).
        title: figure title; default names τ, the cosine and the pooling mode.
        height_per_row: px per subplot row.

    Returns:
        Figure with len(models)·len(keys) traces (hover: exact value, C′, M, warnings).

    Raises:
        ValueError: empty ``keys`` or an unknown key.
    """
    if not keys:
        raise ValueError("keys must name at least one metric")
    unknown = [k for k in keys if k not in REDUNDANCY_LABELS]
    if unknown:
        raise ValueError(f"unknown redundancy metrics {unknown}; choose from {sorted(REDUNDANCY_LABELS)}")
    fig = make_subplots(rows=len(keys), cols=1, shared_xaxes=True, vertical_spacing=0.06,
                        subplot_titles=[REDUNDANCY_LABELS[k] for k in keys])
    sample = None
    for i, (model, layers) in enumerate(metrics.items()):
        names = list(layers)
        for r, key in enumerate(keys, start=1):
            ys = [layers[n].get(key) for n in names]
            info = [
                f"C′={layers[n].get('C_kept')}, M={layers[n].get('M')}"
                + (f"<br>⚠ {layers[n]['warning']}" if layers[n].get("warning") else "")
                for n in names
            ]
            fig.add_trace(
                go.Scatter(
                    x=names, y=ys, mode="lines+markers", name=model, legendgroup=model, showlegend=(r == 1),
                    line={"color": _color(i)}, customdata=info,
                    hovertemplate=f"<b>{model}</b> %{{x}}<br>{REDUNDANCY_LABELS[key]} = %{{y:.4f}}"
                    "<br>%{customdata}<extra></extra>",
                ),
                row=r, col=1,
            )
            if sample is None and names:
                sample = layers[names[0]]
    for r, key in enumerate(keys, start=1):
        if key.endswith(("fraction", "ratio")) or key.startswith("mean_abs_cos") or key == "sparsity":
            fig.update_yaxes(range=[0, 1.02], row=r, col=1)
    if title is None:
        title = "redundancy by depth"
        if sample is not None:
            title += (
                f" — τ = {sample.get('tau')}, {'centred' if sample.get('centred') else 'plain'} cosine, "
                f"{sample.get('mode')}, {sample.get('scale')}"
            )
    fig.update_layout(title={"text": title, "font": {"size": 13}}, height=max(250, height_per_row * len(keys) + 80),
                      margin={"l": 60, "r": 20, "t": 70, "b": 40}, legend={"orientation": "h", "y": 1.08})
    return fig


def cka_heatmap(
    cka: Mapping[str, Any],
    *,
    title: str | None = None,
    row_title: str = "baseline stage",
    col_title: str = "variant stage",
    height: int = 420,
) -> go.Figure:
    """Heatmap of a :func:`viz.redundancy.cka_matrix` result (rows × columns, values in [0, 1]).

    Args:
        cka: {"rows", "cols", "matrix" (R×K, NaN = undefined), "mode", "estimator", "notes"}.
        title: default names the estimator and the example mode.
        row_title, col_title: axis titles.
        height: px.

    Returns:
        Figure with one Heatmap trace (Viridis, zmin 0, zmax 1, values printed in cells).
    """
    z = np.asarray(cka["matrix"], dtype=float)
    if z.shape != (len(cka["rows"]), len(cka["cols"])):
        raise ValueError(f"CKA matrix shape {z.shape} does not match {len(cka['rows'])} rows × {len(cka['cols'])} cols")
    text = [["n/a" if not np.isfinite(v) else f"{v:.2f}" for v in row] for row in z]
    zz = [[None if not np.isfinite(v) else float(v) for v in row] for row in z]
    fig = go.Figure(
        go.Heatmap(
            z=zz, x=list(cka["cols"]), y=list(cka["rows"]), colorscale=SEQUENTIAL, zmin=0.0, zmax=1.0,
            text=text, texttemplate="%{text}", colorbar={"title": "CKA"},
            hovertemplate="row %{y}<br>col %{x}<br>CKA = %{z:.4f}<extra></extra>",
        )
    )
    if title is None:
        title = f"linear CKA — {cka.get('estimator', '')}, examples: {cka.get('mode', '')}"
    fig.update_layout(title={"text": title, "font": {"size": 13}}, height=height, xaxis_title=col_title,
                      yaxis_title=row_title, yaxis={"autorange": "reversed"},
                      margin={"l": 80, "r": 20, "t": 60, "b": 60})
    return fig


def _sim_parts(sim: Any) -> tuple[np.ndarray, list[int] | None, bool]:
    if isinstance(sim, Mapping):
        return np.asarray(sim["matrix"], dtype=float), sim.get("channels"), bool(sim.get("centred", True))
    return np.asarray(sim, dtype=float), None, True


def subsample_square(z: np.ndarray, channels: Sequence[int] | None, max_shown: int | None) -> tuple[np.ndarray, list[int], int]:
    """Principal sub-matrix on every ``step``-th channel so at most ``max_shown`` rows are drawn.

    Args:
        z: K×K similarity matrix.
        channels: original channel index of each row (None = ``0..K-1``).
        max_shown: most rows/columns kept (None or ≥ K: all).

    Returns:
        ``(sub-matrix, kept original channel indices, step)``; ``step == 1`` means nothing dropped.
        The kept entries are exact values of ``z`` (no averaging), so colours stay true cosines.
    """
    k = z.shape[0]
    ch = list(channels) if channels is not None else list(range(k))
    if max_shown is None or k <= max_shown:
        return z, ch, 1
    if max_shown < 1:
        raise ValueError(f"max_shown must be >= 1, got {max_shown}")
    step = -(-k // max_shown)
    idx = np.arange(0, k, step)
    return z[np.ix_(idx, idx)], [ch[i] for i in idx], step


def _shown_note(k: int, kept: int, step: int) -> str:
    if step == 1:
        return ""
    suffix = "th" if 10 <= step % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(step % 10, "th")
    return f" (every {step}{suffix} channel: {kept} of {k} shown)"


def similarity_heatmap(
    sim: Mapping[str, Any] | np.ndarray,
    *,
    title: str | None = None,
    signed: bool = True,
    height: int = 420,
    max_shown: int | None = 128,
) -> go.Figure:
    """Channel-similarity matrix heatmap.

    Args:
        sim: K×K array in [−1, 1] (NaN = excluded channel), or the ``"similarity"`` dict of
            :func:`viz.redundancy.redundancy_metrics` (matrix + original channel indices).
        title: figure title.
        signed: True: signed cosine on a diverging scale centred at 0 (cmocean balance, −1…1);
            False: |cos| on Viridis, 0…1.
        height: px.
        max_shown: matrices with more channels show the principal sub-matrix on every k-th
            channel (:func:`subsample_square`), labelled in the title; None draws all.

    Returns:
        Figure with one Heatmap trace.
    """
    z, channels, centred = _sim_parts(sim)
    if z.ndim != 2 or z.shape[0] != z.shape[1]:
        raise ValueError(f"similarity matrix must be square, got shape {z.shape}")
    k = z.shape[0]
    z, channels, step = subsample_square(z, channels, max_shown)
    fig = go.Figure(_sim_trace(z, channels, signed=signed, showscale=True))
    if title is None:
        title = f"channel similarity ({'centred' if centred else 'plain'} cosine, {k} channels)"
    title += _shown_note(k, len(channels), step)
    fig.update_layout(title={"text": title, "font": {"size": 13}}, height=height,
                      yaxis={"autorange": "reversed", "scaleanchor": "x"},
                      margin={"l": 50, "r": 20, "t": 60, "b": 40})
    return fig


def _sim_trace(z: np.ndarray, channels: list[int] | None, *, signed: bool, showscale: bool) -> go.Heatmap:
    labels = [str(c) for c in (channels if channels is not None else range(z.shape[0]))]
    zz = np.asarray(z if signed else np.abs(z), dtype=np.float64)
    zz = np.where(np.isfinite(zz), zz, np.nan)  # NaN (excluded channel) is a gap; JSON carries it as null
    return go.Heatmap(
        z=zz, x=labels, y=labels,
        colorscale=DIVERGING if signed else SEQUENTIAL,
        zmin=-1.0 if signed else 0.0, zmax=1.0, zmid=0.0 if signed else None,
        showscale=showscale, colorbar={"title": "cos" if signed else "|cos|"},
        hovertemplate="ch %{y} × ch %{x}<br>%{z:.3f}<extra></extra>",
    )


def similarity_grid(
    sims: Mapping[str, Mapping[str, Any] | np.ndarray],
    *,
    signed: bool = True,
    title: str | None = None,
    height: int = 380,
    max_shown: int | None = 128,
) -> go.Figure:
    """Several similarity matrices side by side (e.g. one stage, vanilla vs variants), one shared scale.

    Matrices with more than ``max_shown`` channels show the principal sub-matrix on every k-th
    channel (exact values, :func:`subsample_square`); each subplot title says how many are shown.
    """
    if not sims:
        raise ValueError("sims is empty: pass {label: similarity matrix}")
    names = list(sims)
    parts = []
    for name in names:
        z, ch, _ = _sim_parts(sims[name])
        k = z.shape[0]
        z, ch, step = subsample_square(z, ch, max_shown)
        parts.append((z, ch, f"{name}{_shown_note(k, len(ch), step)}"))
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=[p[2] for p in parts], horizontal_spacing=0.04)
    for i, (z, ch, _) in enumerate(parts, start=1):
        fig.add_trace(_sim_trace(z, ch, signed=signed, showscale=(i == len(names))), row=1, col=i)
        fig.update_yaxes(autorange="reversed", showticklabels=(i == 1), row=1, col=i)
        fig.update_xaxes(showticklabels=False, row=1, col=i)
    fig.update_layout(title={"text": title or ("channel similarity (signed cosine)" if signed else "|cos|"),
                             "font": {"size": 13}}, height=height, margin={"l": 50, "r": 20, "t": 70, "b": 30})
    return fig
