"""Pure formatting helpers for the app: numbers, provenance in plain words, HTML cards, tables.

Everything here takes plain data (the ``Analysis.to_dict()`` structure, ``SwapResult.to_dict()``,
``WeightsInfo.to_dict()``) and returns strings or pandas DataFrames, so it is testable without
Gradio or a model. Every string that can come from outside (class names, file names, skip
reasons) is HTML-escaped.
"""

from __future__ import annotations

import html
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

#: plain words for each per-site parameter status (``plugconv.surgery.PARAM_STATUSES``)
PROVENANCE_WORDS: dict[str, str] = {
    "exact": "exact (function-preserving transfer from the original conv)",
    "calibrated": "calibrated (distilled layer-wise from the original conv)",
    "trained": "trained (loaded from a checkpoint)",
    "initialised": "initialised only (fresh parameters: a perturbed network, not a trained one)",
}

#: plain words for the backbone weights source (``plugconv.backbones.WeightsInfo.source``)
WEIGHTS_WORDS: dict[str, str] = {
    "torchvision": "torchvision ImageNet weights",
    "file": "weights from a local file",
    "bundled": "bundled offline ImageNet weights",
    "random": "random initialisation (untrained: predictions are meaningless)",
}

_UNITS = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


def human(n: float | int | None, unit: str = "") -> str:
    """Engineering format with a metric prefix: ``11689512 -> "11.69 M"``; ``None -> "–"``."""
    if n is None:
        return "–"
    x = float(n)
    for scale, prefix in _UNITS:
        if abs(x) >= scale:
            return f"{x / scale:.2f} {prefix}{unit}".rstrip()
    return f"{x:.3g} {unit}".rstrip()


def fmt_ms(ms: float | None) -> str:
    """Milliseconds with sensible precision; ``None -> "–"``."""
    if ms is None:
        return "–"
    return f"{ms:.1f} ms" if ms >= 10 else f"{ms:.2f} ms"


def provenance_counts(provenance: Mapping[str, str]) -> dict[str, int]:
    """Number of swapped sites per status, in ``PROVENANCE_WORDS`` order (zero counts dropped)."""
    c = Counter(provenance.values())
    return {k: c[k] for k in (*PROVENANCE_WORDS, *sorted(set(c) - set(PROVENANCE_WORDS))) if c[k]}


def provenance_sentence(variant: str, provenance: Mapping[str, str], n_skipped: int = 0) -> str:
    """One plain sentence about a model's swapped sites, e.g.
    ``"saconv: 8 sites swapped, all exact (function-preserving transfer ...); 0 skipped."``."""
    if variant == "conv":
        return "conv: the unchanged baseline network."
    counts = provenance_counts(provenance)
    n = sum(counts.values())
    if n == 0:
        parts = "no site could take this variant (see the skipped list)"
    elif len(counts) == 1:
        (status,) = counts
        parts = f"{n} site{'s' if n != 1 else ''} swapped, all {PROVENANCE_WORDS.get(status, status)}"
    else:
        parts = f"{n} sites swapped: " + ", ".join(f"{k} {PROVENANCE_WORDS.get(s, s)}" for s, k in
                                                   ((s, counts[s]) for s in counts))
    return f"{variant}: {parts}; {n_skipped} skipped."


def weights_sentence(weights: Mapping[str, Any] | None) -> str:
    """Plain words for the backbone weights (uses the record's own description when it has one)."""
    if not weights:
        return "backbone weights: unknown"
    desc = weights.get("description") or WEIGHTS_WORDS.get(str(weights.get("source")), str(weights.get("source")))
    sha = weights.get("sha256")
    return f"{desc}" + (f" (sha256 {str(sha)[:12]}…)" if sha else "")


#: plain words for the optional analysis phases that can fail (``ModelResult.errors`` keys)
_PHASE_WORDS: dict[str, str] = {
    "gradcam": "Grad-CAM",
    "fuse": "ACB fusion check",
    "redundancy": "redundancy metrics",
    "erf": "effective receptive field",
    "theoretical_rf": "theoretical receptive field",
    "profile": "cost profile",
    "cka": "CKA similarity",
}


def _short(message: Any, limit: int = 200) -> str:
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _error_items(errors: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``ModelResult.errors`` as ``[(what, message)]``: "gradcam/layer4" -> "Grad-CAM at layer4"."""
    out = []
    for k, v in errors.items():
        phase, _, where = str(k).partition("/")
        out.append((_PHASE_WORDS.get(phase, phase) + (f" at {where}" if where else ""), _short(v)))
    return out


def banners(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Warnings the user must see at a glance: ``[(level, text)]`` with level ``"warn"`` or ``"info"``.

    - backbone weights random: every model is untrained;
    - a variant with initialised-only sites: perturbed network, not trained (offer Calibrate);
    - an optional phase that failed for a model (``errors``): its panel is empty or partial;
    - a variant that swapped nothing: it is identical to the baseline here.
    """
    out: list[tuple[str, str]] = []
    w = report.get("weights") or {}
    if w.get("source") == "random":
        out.append(("warn", "Backbone weights are random: every column shows an untrained network; "
                            "predictions and maps are not meaningful ImageNet evidence."))
    for m in report.get("models", []):
        variant = m.get("label") or m.get("variant", "?")
        prov = m.get("provenance") or {}
        n_init = sum(1 for v in prov.values() if v == "initialised")
        if n_init:
            out.append(("warn", f"{variant}: {n_init} of {len(prov)} swapped sites are only initialised — "
                                "perturbed network, not trained. Use Calibrate to distil them from the original "
                                "convs, or load trained weights."))
        errors = m.get("errors") or {}
        if errors:
            parts = "; ".join(f"{what}: {msg}" for what, msg in _error_items(errors))
            out.append(("warn", f"{variant}: some panels could not be computed, so they are empty or partial "
                                f"for this model — {parts}"))
        if m.get("variant") != "conv" and not m.get("swapped"):
            out.append(("info", f"{variant}: no site could take this variant on this backbone, so the column "
                                "equals the baseline (reasons in Overview → swap report)."))
    return out


def banners_html(report: Mapping[str, Any]) -> str:
    """``banners(report)`` as HTML (empty string when there is nothing to say)."""
    items = banners(report)
    if not items:
        return ""
    return "".join(f'<div class="pc-banner pc-{lvl}">{html.escape(text)}</div>' for lvl, text in items)


def _top5_html(top5: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for t in top5:
        p = float(t.get("prob", 0.0))
        label = html.escape(str(t.get("label", "?")))
        rows.append(
            f'<div class="pc-pred"><span class="pc-pred-label" title="{label}">{label}</span>'
            f'<span class="pc-bar"><span style="width:{max(0.0, min(p, 1.0)) * 100:.1f}%"></span></span>'
            f'<span class="pc-pred-p">{p * 100:.1f}%</span></div>'
        )
    return "".join(rows) or '<div class="pc-muted">no predictions</div>'


#: what a card shows while latency has not been measured (it is timed on demand in the Profile tab)
_LATENCY_PENDING = '<span class="pc-muted" title="latency is timed on demand">not measured yet — open Profile</span>'


def model_card_html(m: Mapping[str, Any]) -> str:
    """One column of the Overview: predictions, cost, swap report and provenance of one model."""
    label = html.escape(str(m.get("label") or m.get("variant", "?")))
    prov = m.get("provenance") or {}
    skipped = m.get("skipped") or []
    counts = provenance_counts(prov)
    badges = "".join(f'<span class="pc-badge pc-{html.escape(s)}">{k} {html.escape(s)}</span>'
                     for s, k in counts.items())
    if m.get("variant") == "conv":
        badges = '<span class="pc-badge pc-exact">baseline</span>'
    skipped_html = ""
    if skipped:
        items = "".join(
            f"<li><code>{html.escape(str(s.get('site', s) if isinstance(s, Mapping) else s[0]))}</code>: "
            f"{html.escape(str(s.get('reason', '') if isinstance(s, Mapping) else s[1]))}</li>"
            for s in skipped
        )
        skipped_html = f"<details><summary>{len(skipped)} skipped</summary><ul>{items}</ul></details>"
    swapped = m.get("swapped") or []
    swapped_html = ""
    if swapped:
        items = "".join(f"<li><code>{html.escape(str(s))}</code>: {html.escape(str(prov.get(s, '?')))}</li>"
                        for s in swapped)
        swapped_html = f"<details><summary>{len(swapped)} swapped</summary><ul>{items}</ul></details>"
    lat = m.get("latency_ms")
    errors = m.get("errors") or {}
    errors_html = ""
    if errors:
        items = "".join(f"<li>{html.escape(what)}: {html.escape(msg)}</li>" for what, msg in _error_items(errors))
        errors_html = (f'<div class="pc-banner pc-warn pc-errors">Not computed for this model:'
                       f"<ul>{items}</ul></div>")
    return (
        f'<div class="pc-card"><div class="pc-card-head">{label}</div>'
        f'<div class="pc-badges">{badges}</div>{errors_html}'
        f'<div class="pc-section">Top-5</div>{_top5_html(m.get("top5") or [])}'
        f'<div class="pc-section">Cost</div>'
        f'<table class="pc-cost"><tr><td>params</td><td>{human(m.get("params"))}</td></tr>'
        f'<tr><td>FLOPs</td><td>{human(m.get("flops"))}</td></tr>'
        f'<tr><td>latency</td><td>{fmt_ms(lat) if lat is not None else _LATENCY_PENDING}</td></tr></table>'
        f'<div class="pc-section">Swap report</div>'
        f'<div class="pc-prov">{html.escape(provenance_sentence(str(m.get("variant", "?")), prov, len(skipped)))}</div>'
        f"{swapped_html}{skipped_html}</div>"
    )


def overview_html(report: Mapping[str, Any]) -> str:
    """The Overview panel: a header line (backbone, weights, device, input size), then one card per
    model side by side."""
    head = (
        f'<div class="pc-head"><b>{html.escape(str(report.get("backbone", "?")))}</b> · '
        f"{html.escape(weights_sentence(report.get('weights')))} · device "
        f"{html.escape(str(report.get('device', '?')))} · input {html.escape(str(report.get('input_size', '?')))} px</div>"
    )
    cards = "".join(model_card_html(m) for m in report.get("models", []))
    return f'{head}<div class="pc-cards">{cards}</div>'


def summary_frame(report: Mapping[str, Any]) -> pd.DataFrame:
    """One row per model: top-1, its probability, params, FLOPs, latency, sites swapped/skipped,
    provenance counts (the sortable table under the Overview cards)."""
    rows = []
    for m in report.get("models", []):
        top5 = m.get("top5") or [{}]
        counts = provenance_counts(m.get("provenance") or {})
        rows.append({
            "model": m.get("label") or m.get("variant"),
            "top-1": top5[0].get("label", ""),
            "p(top-1) %": round(100 * float(top5[0].get("prob", 0.0)), 2),
            "params (M)": None if m.get("params") is None else round(m["params"] / 1e6, 3),
            "FLOPs (G)": None if m.get("flops") is None else round(m["flops"] / 1e9, 3),
            "latency (ms)": None if m.get("latency_ms") is None else round(float(m["latency_ms"]), 2),
            "swapped": len(m.get("swapped") or []),
            "skipped": len(m.get("skipped") or []),
            "provenance": ", ".join(f"{k} {s}" for s, k in counts.items()) or ("baseline" if m.get("variant") == "conv" else "–"),
        })
    return pd.DataFrame(rows)


#: CSS for the classes used above (passed to ``launch(css=...)``)
CSS = """
.pc-cards {display:flex; gap:12px; overflow-x:auto; align-items:stretch}
.pc-card {flex:1 1 0; min-width:220px; border:1px solid var(--border-color-primary); border-radius:10px;
          padding:10px 12px; background:var(--block-background-fill)}
.pc-card-head {font-weight:700; font-size:1.1em; margin-bottom:4px}
.pc-section {margin-top:8px; font-size:.8em; text-transform:uppercase; letter-spacing:.05em; opacity:.7}
.pc-pred {display:grid; grid-template-columns: 1fr 70px 48px; gap:6px; align-items:center; font-size:.9em}
.pc-pred-label {overflow:hidden; text-overflow:ellipsis; white-space:nowrap}
.pc-bar {height:8px; background:var(--neutral-200); border-radius:4px; overflow:hidden}
.pc-bar span {display:block; height:100%; background:var(--color-accent)}
.pc-pred-p {text-align:right; font-variant-numeric:tabular-nums}
.pc-cards table.pc-cost, .pc-cards table.pc-cost td, .pc-cards table.pc-cost tr {border:none !important;
  background:none !important; padding:1px 10px 1px 0 !important; margin:0 !important; font-size:.9em}
.pc-cards table.pc-cost {width:auto !important}
.pc-badge {display:inline-block; padding:1px 7px; border-radius:9px; font-size:.8em; margin-right:4px}
.pc-exact {background:#d1fae5; color:#065f46} .pc-calibrated {background:#dbeafe; color:#1e40af}
.pc-trained {background:#ede9fe; color:#5b21b6} .pc-initialised {background:#fee2e2; color:#991b1b}
.pc-banner {padding:8px 12px; border-radius:8px; margin:4px 0}
.pc-warn {background:#fff7ed; border:1px solid #fdba74; color:#9a3412}
.pc-info {background:#eff6ff; border:1px solid #93c5fd; color:#1e3a8a}
.pc-head {margin-bottom:8px} .pc-muted {opacity:.6}
.pc-prov {font-size:.9em}
"""
