"""Summaries of the variants' internal maps (the ``Tap`` records of one pass).

Every tap gets its raw statistics (shape, min, max, mean) and, by kind:

- ``spatial_gate`` (N×C×H×W or N×1×H×W): a spatial map per image (channel mean when C > 1) for
  overlays. SAConv's switch S (N×1×H×W) is shown in its **true range** — it is an unbounded
  linear output, not a sigmoid — with the share of positions preferring the small dilation under
  the rule "S > 0.5 → small rate" (the output is S·y_small + (1−S)·y_large) and the rest large.
  SCConv's SRU gate W ∈ (0, 1) gets the informative fraction (W > 0.5) per channel and overall.
  The self-calibrated conv's calibration map σ(X1 + Up(K2(T1))) is shown as its channel mean;
  when the site's low-resolution map T1 is 1×1 the gate is channel attention, not spatial — the
  summary says so.
- ``mask`` ({0, 1}): informative fraction per channel and overall, and the mean map.
- ``channel_weights`` (N×C): mean, and for SCConv's CRU in softmax-over-2C form (N×2C) the mass on
  the Y1 half vs the Y2 half; for SPConv's fusion weights the mean β (representative) / γ.
- ``branch`` (N×C×H×W): per-site energy share ‖b_i‖² / Σ_j ‖b_j‖² over the site's branch taps
  (ACB square / vertical / horizontal; SAConv small / large; SPConv representative / redundant).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from viz.recorder import Record, TapRecord

SMALL_RULE = "S > 0.5 → small dilation (output = S·y_small + (1−S)·y_large); S ≤ 0.5 → large"


@dataclass
class TapSummary:
    """One tap's numbers and display map.

    Attributes:
        name: module path of the tap; site / variant / local: its swapped site, variant, local name.
        kind, description: from the Tap.
        shape: tensor shape as fired.
        min, max, mean: over the whole tensor (raw values).
        spatial: N×h×w float map for overlays (spatial taps and masks), else None.
        channels: per-channel vector (C,) worth plotting (channel weights averaged over images,
            informative fraction per channel for masks), else None.
        stats: kind/variant-specific numbers (JSON-ready).
        notes: plain-language caveats.
    """

    name: str
    site: str
    variant: str
    local: str
    kind: str
    description: str
    shape: tuple[int, ...]
    min: float
    max: float
    mean: float
    spatial: np.ndarray | None = None
    channels: np.ndarray | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (no arrays)."""
        return {
            "name": self.name, "site": self.site, "variant": self.variant, "local": self.local,
            "kind": self.kind, "description": self.description, "shape": list(self.shape),
            "min": self.min, "max": self.max, "mean": self.mean, "stats": self.stats, "notes": list(self.notes),
        }


def _is_switch(t: TapRecord) -> bool:
    return t.variant == "saconv" and "switch" in t.local


def _spatial(v: torch.Tensor) -> np.ndarray | None:
    if v.dim() == 4:
        return v.double().mean(1).float().numpy()
    if v.dim() == 3:
        return v.float().numpy()
    return None


def summarize_tap(t: TapRecord) -> TapSummary:
    """Summary of one tap firing (see the module docstring)."""
    v = t.value.detach().float()
    s = TapSummary(
        name=t.name, site=t.site, variant=t.variant, local=t.local, kind=t.kind, description=t.description,
        shape=tuple(v.shape), min=float(v.min()) if v.numel() else float("nan"),
        max=float(v.max()) if v.numel() else float("nan"),
        mean=float(v.double().mean()) if v.numel() else float("nan"),
    )
    if v.numel() == 0:
        s.notes.append("empty tensor")
        return s
    if t.kind in ("spatial_gate", "mask") and v.dim() >= 3:
        s.spatial = _spatial(v)
    if _is_switch(t):
        small = float((v > 0.5).double().mean())
        s.stats.update({"share_small": small, "share_large": 1.0 - small, "rule": SMALL_RULE,
                        "range": "unbounded (linear switch, not a sigmoid)"})
    elif t.kind == "mask":
        per_c = v.double().mean(dim=tuple(i for i in range(v.dim()) if i != 1)) if v.dim() >= 2 else v.double()
        s.channels = per_c.float().numpy()
        s.stats.update({"informative_fraction": float(v.double().mean()),
                        "informative_fraction_per_channel": [round(float(c), 4) for c in per_c]})
    elif t.kind == "spatial_gate" and t.variant == "scconv":
        inf = v > 0.5
        per_c = inf.double().mean(dim=(0, 2, 3)) if v.dim() == 4 else inf.double().mean(0)
        s.channels = per_c.float().numpy()
        s.stats.update({"informative_fraction": float(inf.double().mean()), "rule": "W > 0.5 → informative",
                        "informative_fraction_per_channel": [round(float(c), 4) for c in per_c]})
    elif t.kind == "channel_weights":
        if v.dim() == 3 and v.shape[1] == 2:
            # paired weights N×2×C: [beta, gamma] (SPConv) or [beta1, beta2] (SCConv CRU, channel mode)
            first, second = v[:, 0].double(), v[:, 1].double()
            s.channels = first.mean(0).float().numpy()
            names = ("beta", "gamma") if t.variant == "spconv" else ("beta1", "beta2")
            s.stats.update({f"mean_{names[0]}": float(first.mean()), f"mean_{names[1]}": float(second.mean())})
            if t.variant == "spconv":
                s.stats["rule"] = "beta weighs the representative branch Y3, gamma the redundant branch Y1"
        else:
            flat = v.reshape(v.shape[0], -1) if v.dim() >= 2 else v.reshape(1, -1)
            s.channels = flat.double().mean(0).float().numpy()
            s.stats["mean"] = float(flat.double().mean())
            if t.variant == "scconv" and "cru" in t.local and flat.shape[1] % 2 == 0:
                c = flat.shape[1] // 2
                tot = flat.double().sum(1).clamp_min(1e-12)
                s.stats["mass_y1"] = float((flat[:, :c].double().sum(1) / tot).mean())
                s.stats["mass_y2"] = float((flat[:, c:].double().sum(1) / tot).mean())
    elif t.kind == "spatial_gate" and t.variant == "selfcal":
        s.stats["display"] = "channel mean of σ(X1 + Up(K2(T1)))"
    if t.kind == "branch":
        s.stats["energy"] = float(v.double().pow(2).sum())
    return s


def summarize_taps(record: Record, model: nn.Module | None = None) -> list[TapSummary]:
    """Summaries of every tap in ``record`` (forward order), with per-site branch energy shares.

    Adds to each ``branch`` tap ``stats["energy_share"]`` = ‖b_i‖² / Σ_j ‖b_j‖² over the branch taps
    of the same site and shape (ACB's three branches; SAConv small / large; SCConv Y1 / Y2), and to self-calibrated calibration maps a note when the site's low-resolution
    map is 1×1 (channel attention, not spatial).
    """
    out = [summarize_tap(t) for t in record.taps.values()]
    by_site: dict[str, list[TapSummary]] = {}
    for s in out:
        if s.kind == "branch":
            by_site.setdefault(f"{s.site or s.name}|{s.shape}", []).append(s)
    for group in by_site.values():
        tot = sum(s.stats["energy"] for s in group)
        for s in group:
            s.stats["energy_share"] = s.stats["energy"] / tot if tot > 0 else float("nan")
    low = {t.site: t for t in record.taps.values() if t.variant == "selfcal" and "low" in t.local}
    for s in out:
        if s.variant == "selfcal" and s.kind == "spatial_gate":
            lr = low.get(s.site)
            if lr is not None and lr.value.dim() == 4 and tuple(lr.value.shape[-2:]) == (1, 1):
                s.notes.append("T1 is 1×1 at this input size: the gate is σ(x + per-channel constant), "
                               "i.e. channel attention, not spatial")
                s.stats["channel_attention"] = True
    return out


def acb_fuse_difference(logits: torch.Tensor, fused: nn.Module, x: torch.Tensor) -> float:
    """Max |logits − fused(x)|: the recorded (training-form) logits against the deploy form.

    Args:
        logits: N×K logits of the unfused model on ``x`` (e.g. ``Record.logits``).
        fused: ``plugconv.fuse_model(model)`` (ACB branches folded into one conv).
        x: the same N×3×H×W input.

    Exact fusion means this is at float rounding level; anything larger is a bug.
    """
    with torch.no_grad():
        out = fused(x)
    return float((logits.to(out.device) - out).abs().max())
