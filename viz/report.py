"""``write_report(analysis, out_dir)``: report.json, PNG figures and a self-contained report.html.

Layout of ``out_dir``::

    report.json                      the Analysis.to_dict() structure (with PNG paths filled in)
    report.html                      opens offline: PNGs embedded as base64, plotly inlined once
    figures/gradcam.png              Grad-CAM grid (rows: layers, columns: models), in ``mode`` (image 1)
    figures/taps.png, figures/erf.png
    gradcam/<model>/<layer>.png      one overlay per model and layer (shared limits per layer)
    taps/<model>/<tap>.png           spatial taps over the crop; channel weights as a strip
    erf/<model>.png                  log-scaled ERF map

report.json keys: ``backbone``, ``weights`` (provenance), ``device``, ``input_size``,
``n_images``, ``layers``, ``target``, ``erf_layer``, ``cka``, ``timings``, ``figures`` and
``models`` — per model ``label``, ``variant``, ``swapped``, ``skipped`` (with reasons),
``provenance``, ``top5`` (``{label, prob}``), ``params``, ``flops``, ``macs``, ``latency_ms``,
``layers`` (``{name, params, flops, latency_ms, redundancy}``), ``gradcam`` (per layer: min,
max, png), ``taps`` (per tap: kind, shape, min, max, mean, png, stats), ``erf`` (area ratios,
r50/r90), ``theoretical_rf``, ``timings`` (load, record, backward, erf, profile, render).
"""

from __future__ import annotations

import base64
import html
import json
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from viz import figures as vf

if TYPE_CHECKING:  # pragma: no cover
    from viz.analysis import Analysis


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "x"


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _charts(analysis: Analysis) -> list[tuple[str, Any]]:
    """(title, plotly Figure) pairs from viz.charts; failures become notes, never crashes."""
    out: list[tuple[str, Any]] = []
    try:
        from viz import charts
    except Exception as e:  # pragma: no cover - charts is a sibling module
        return [("charts unavailable", str(e))]
    profiles = {m.label: m.cost for m in analysis.models if m.cost}
    if profiles:
        for title, fn in (("latency by layer", charts.latency_chart), ("parameters by layer", charts.params_chart),
                          ("FLOPs by layer", charts.flops_chart), ("cost summary", charts.cost_summary)):
            try:
                out.append((title, fn(profiles)))
            except Exception as e:
                out.append((title, f"{type(e).__name__}: {e}"))
    red = {m.label: m.redundancy for m in analysis.models if m.redundancy}
    if red:
        try:
            out.append(("redundancy by depth", charts.redundancy_by_depth(red)))
        except Exception as e:
            out.append(("redundancy by depth", f"{type(e).__name__}: {e}"))
    if analysis.cka:
        cols = sorted({c for row in analysis.cka.values() for c in row}, key=lambda c: [m.label for m in analysis.models].index(c))
        mat = np.array([[analysis.cka[r].get(c, np.nan) for c in cols] for r in analysis.cka], dtype=float)
        data = {"rows": list(analysis.cka), "cols": cols, "matrix": mat, "mode": "positions", "unbiased": True,
                "estimator": "unbiased HSIC", "notes": {}}
        try:
            out.append(("CKA vs " + analysis.models[0].label,
                        charts.cka_heatmap(data, row_title="stage", col_title="model",
                                           title=f"linear CKA ({analysis.models[0].label} vs each model, same stage; "
                                                 "positions, unbiased)")))
        except Exception as e:
            out.append(("CKA", f"{type(e).__name__}: {e}"))
    return out


def write_report(analysis: Analysis, out_dir: str | Path, *, mode: str = "shared", html_report: bool = True,
                 reuse_figures: bool = False) -> Path:
    """Write report.json, PNG figures and report.html for ``analysis`` into ``out_dir``.

    Args:
        analysis: result of :func:`viz.analysis.analyze`.
        out_dir: directory (created).
        mode: Grad-CAM colour mode for the figures ("per-panel" | "shared" | "global").
        html_report: also write the self-contained report.html.
        reuse_figures: keep a composite figure already listed in ``analysis.files`` and present in
            ``out_dir`` (drawn earlier with the same ``mode``) instead of drawing it again.

    Returns:
        Path of report.json.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    files = analysis.files
    lims = vf.cam_limits(analysis, 0, mode=mode) if analysis.models else {}
    crop = analysis.images[0]
    for m in analysis.models:
        t = time.perf_counter()
        lab = _safe(m.label)
        for layer, cam in m.cams.items():
            rel = f"gradcam/{lab}/{_safe(layer)}.png"
            _write(out / rel, vf.png_bytes(vf.overlay_array(crop, cam.raw[0].numpy(), lims[(m.label, layer)])))
            files[f"gradcam/{m.label}/{layer}"] = rel
        for tap in m.taps:
            arr = vf.tap_overlay(crop, tap)
            if arr is None and tap.channels is not None and np.asarray(tap.channels).size:
                arr = vf.channel_strip(tap.channels)
            if arr is None:
                continue
            rel = f"taps/{lab}/{_safe(tap.name)}.png"
            _write(out / rel, vf.png_bytes(arr))
            files[f"tap/{m.label}/{tap.name}"] = rel
        if m.erf is not None:
            rel = f"erf/{lab}.png"
            _write(out / rel, vf.png_bytes(vf.erf_panel(m.erf)))
            files[f"erf/{m.label}"] = rel
        m.timings["render"] = time.perf_counter() - t
    figs: dict[str, Any] = {}
    if analysis.models and analysis.layers:
        figs["gradcam"] = lambda: vf.gradcam_grid(analysis, 0, mode=mode)
    if any(m.taps for m in analysis.models):
        figs["taps"] = lambda: vf.tap_maps(analysis, 0)
    erfs = {m.label: m.erf for m in analysis.models if m.erf is not None}
    if erfs:
        figs["erf"] = lambda: vf.erf_figure(erfs, theoretical={m.label: m.theoretical_rf for m in analysis.models},
                                            provenance={m.label: _prov_text(m.swap) for m in analysis.models})
    for name, build in figs.items():
        rel = f"figures/{name}.png"
        if reuse_figures and files.get(f"figure/{name}") == rel and (out / rel).is_file():
            continue
        _write(out / rel, vf.figure_png(build()))
        files[f"figure/{name}"] = rel
    analysis.timings["render"] = time.perf_counter() - t_all
    d = analysis.to_dict()
    path = out / "report.json"
    path.write_text(json.dumps(d, indent=1, allow_nan=False, default=str), encoding="utf-8")
    if html_report:
        (out / "report.html").write_text(render_html(analysis, d, out, mode=mode), encoding="utf-8")
    return path


def _prov_text(swap: dict[str, Any]) -> str:
    prov = swap.get("provenance", {}) or {}
    if not prov:
        return "unchanged"
    kinds = sorted(set(prov.values()))
    return "/".join(kinds)


def _img_tag(out: Path, rel: str | None, alt: str, width: int | None = None) -> str:
    if not rel:
        return ""
    data = base64.b64encode((out / rel).read_bytes()).decode("ascii")
    w = f' width="{width}"' if width else ""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"{w}>'


#: how each Grad-CAM colour mode sets the limits (analysis.md §1.2)
MODE_TEXT = {
    "per-panel": "per-panel colour scale (each map its own limits)",
    "shared": "shared colour scale per layer (across the models compared)",
    "global": "global colour scale (one scale over every layer and model)",
}


def _latency_cell(m: dict[str, Any]) -> str:
    """Whole-model latency with the sum of the per-layer latencies beside it (analysis.md §2)."""
    if m.get("latency_ms") is None:
        return ""
    per_sum = m.get("latency_per_layer_sum_ms")
    cell = f"{m['latency_ms']:.2f}"
    if per_sum is not None:
        cell += f"<br><span class='small'>Σ layers {per_sum:.2f} (hooked)</span>"
    return cell


def _deploy_cell(m: dict[str, Any]) -> str:
    """ACB deploy form (branches fused into one conv): params / FLOPs / latency, or empty."""
    dep = m.get("deploy")
    if not dep:
        return ""
    bits = []
    if dep.get("params") is not None:
        bits.append(f"{dep['params'] / 1e6:.3f} M params")
    if dep.get("flops") is not None:
        bits.append(f"{dep['flops'] / 1e9:.3f} GFLOPs")
    if dep.get("latency_ms") is not None:
        bits.append(f"{dep['latency_ms']:.2f} ms")
    return "<br>".join(bits)


def render_html(analysis: Analysis, d: dict[str, Any], out: Path, *, mode: str = "shared") -> str:
    """Self-contained HTML (PNGs as base64, plotly.js inlined once, no CDN, no external requests).

    ``mode`` is the Grad-CAM colour mode the figures were drawn with (named in the heading).
    """
    e = html.escape
    n_img = int(d.get("n_images") or len(getattr(analysis, "images", ()) or ()) or 1)
    which = f" — showing image 1 of {n_img}" if n_img > 1 else ""
    has_deploy = any(m.get("deploy") for m in d["models"])
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>plugconv report: {e(d['backbone'])}</title>",
        "<style>body{font-family:sans-serif;margin:1.5em;max-width:1400px}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}img{max-width:100%}"
        ".warn{color:#a50}.small{font-size:12px;color:#555}</style></head><body>",
        f"<h1>plugconv report — {e(d['backbone'])}</h1>",
        f"<p>Weights: {e(str(d['weights'].get('description', d['weights'])))} (source: {e(str(d['weights'].get('source')))}) · "
        f"device {e(d['device'])} · input {d['input_size']}×{d['input_size']} · {d['n_images']} image(s) · "
        f"Grad-CAM target: {e(', '.join(f'{c} ({lbl})' for c, lbl in zip(d['target']['classes'], d['target']['labels'])))} "
        f"({e(d['target']['rule'])}; score: pre-softmax logit)</p>",
        "<h2>Models</h2><table><tr><th>model</th><th>swapped</th><th>skipped</th><th>provenance</th><th>top-5</th>"
        "<th>params</th><th>FLOPs</th><th>latency (ms)</th>"
        + ("<th>deploy form (ACB fused)</th>" if has_deploy else "") + "</tr>",
    ]
    for m in d["models"]:
        top = "<br>".join(f"{e(t['label'])}: {t['prob']:.3f}" for t in m["top5"])
        skipped = "<br>".join(f"{e(s['site'])}: {e(s['reason'])}" for s in m["skipped"][:8])
        if len(m["skipped"]) > 8:
            skipped += f"<br>… {len(m['skipped']) - 8} more"
        prov = ", ".join(sorted(set(m["provenance"].values()))) or "unchanged"
        fl = "" if m["flops"] is None else f"{m['flops'] / 1e9:.3f} G"
        pr = "" if m["params"] is None else f"{m['params'] / 1e6:.3f} M"
        la = _latency_cell(m)
        dep = f"<td class='small'>{_deploy_cell(m)}</td>" if has_deploy else ""
        parts.append(f"<tr><td>{e(m['label'])}</td><td>{len(m['swapped'])}</td><td class='small'>{skipped}</td>"
                     f"<td>{e(prov)}</td><td class='small'>{top}</td><td>{pr}</td><td>{fl}</td><td>{la}</td>{dep}</tr>")
    parts.append("</table>")
    labels = next((m.get("latency_labels") for m in d["models"] if m.get("latency_labels")), None)
    if labels:
        parts.append(
            f"<p class='small'>Latency: {e(str(labels.get('statistic')))} after {e(str(labels.get('warmup')))} "
            f"warm-up passes, unhooked · {e(str(labels.get('device')))} · {e(str(labels.get('dtype')))} · batch "
            f"{e(str(labels.get('batch')))} · {e(str(labels.get('input_size')))} · {e(str(labels.get('threads')))} "
            "threads. Σ layers: sum of per-layer medians from a separate hooked pass (includes hook overhead).</p>")
    for m in d["models"]:
        if m.get("errors"):
            parts.append(f"<p class='warn'>{e(m['label'])}: " + "; ".join(f"{e(k)}: {e(v)}" for k, v in m["errors"].items()) + "</p>")
    mode_text = MODE_TEXT.get(mode, f"{mode} colour scale")
    erf_n = f" (mean over {n_img} images)" if n_img > 1 else ""
    for key, title in (("figure/gradcam", f"Grad-CAM (raw signed maps, {mode_text}){which}"),
                       ("figure/taps", f"Variant taps{which}"), ("figure/erf", f"Effective receptive field{erf_n}")):
        rel = analysis.files.get(key)
        if rel:
            parts.append(f"<h2>{e(title)}</h2>{_img_tag(out, rel, title)}")
    charts = _charts(analysis)
    if charts:
        parts.append("<h2>Cost, redundancy and CKA</h2>")
        first = True
        for title, fig in charts:
            if isinstance(fig, str):
                parts.append(f"<p class='warn'>{e(title)}: {e(fig)}</p>")
                continue
            parts.append(fig.to_html(full_html=False, include_plotlyjs=first))
            first = False
    parts.append("<h2>Numbers</h2><pre class='small'>" + e(json.dumps(
        {"erf": {m["label"]: m["erf"] for m in d["models"]}, "cka": d["cka"], "timings": {m["label"]: m["timings"] for m in d["models"]}},
        indent=1, default=str)) + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)
