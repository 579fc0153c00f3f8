"""Command line: ``python -m viz analyze ...`` (the full report) and ``python -m viz profile ...`` (cost only).

Examples::

    python -m viz analyze assets/chelsea.jpg --backbone resnet18 --weights random \\
        --variants conv,scconv,saconv,selfcal,spconv,acb --out report_dir
    python -m viz profile --backbone resnet50 --variants conv,acb --input-size 224 --json

Errors a user can cause (bad image, unknown backbone / variant / preset / layer, unavailable
weights) print one line ``error: ...`` to stderr and exit with status 2. A failure inside the
analysis itself (a ``RuntimeError`` from torch or the recorder, e.g. an activation modified in
place) prints one line ``error: analysis failed: ...`` and exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def _split(s: str | None) -> list[str]:
    return [v.strip() for v in (s or "").split(",") if v.strip()]


def _load_image(path: str):
    try:
        from viz.images import load_image
    except ImportError:  # pragma: no cover - reliability helper's module
        from PIL import Image

        def load_image(src):  # type: ignore[no-redef]
            with Image.open(src) as im:
                im.load()
                return im.convert("RGB")

    return load_image(path)


def _latency_args(p: argparse.ArgumentParser) -> None:
    from viz.cost import DEFAULT_REPEATS, DEFAULT_WARMUP

    p.add_argument("--repeats", type=_positive, default=DEFAULT_REPEATS,
                   help=f"timed latency passes, median reported (default {DEFAULT_REPEATS}, analysis.md §5)")
    p.add_argument("--warmup", type=_non_negative, default=DEFAULT_WARMUP,
                   help=f"untimed warm-up passes before timing (default {DEFAULT_WARMUP})")


def _positive(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _non_negative(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m viz", description="plugconv analysis engine")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("analyze", help="one recorded pass per model -> report.json, PNGs, report.html")
    a.add_argument("images", nargs="+", help="image files")
    a.add_argument("--backbone", default="efficientnet_lite0", help="backbone name (see plugconv.backbones.list_backbones)")
    a.add_argument("--weights", default="default", help="'default', 'random' or a weights file")
    a.add_argument("--variants", default="conv", help="comma-separated registry keys, e.g. conv,scconv,saconv")
    a.add_argument("--layers", default=None, help="comma-separated module paths (default: the stage outputs)")
    a.add_argument("--preset", default=None, help="site preset label (see viz.models.site_presets)")
    a.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    a.add_argument("--target", type=int, default=None, help="class index to explain (default: first model's top-1)")
    a.add_argument("--topk", type=int, default=5)
    a.add_argument("--mode", default="shared", choices=("per-panel", "shared", "global"), help="Grad-CAM colour mode")
    a.add_argument("--erf-layer", default=None, help="stage for the ERF (default: the last layer)")
    a.add_argument("--no-erf", action="store_true")
    a.add_argument("--no-redundancy", action="store_true")
    a.add_argument("--no-profile", action="store_true")
    a.add_argument("--no-latency", action="store_true", help="profile params/FLOPs only")
    _latency_args(a)
    a.add_argument("--out", required=True, help="output directory")
    a.add_argument("--quiet", action="store_true")
    pr = sub.add_parser("profile", help="params / FLOPs / latency only")
    pr.add_argument("--backbone", default="efficientnet_lite0")
    pr.add_argument("--weights", default="random", help="cost does not depend on weights; default 'random'")
    pr.add_argument("--variants", default="conv")
    pr.add_argument("--preset", default=None)
    pr.add_argument("--device", default="cpu")
    pr.add_argument("--input-size", type=int, default=None, help="H = W (default: the backbone's)")
    _latency_args(pr)
    pr.add_argument("--no-latency", action="store_true")
    pr.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


class UsageError(Exception):
    """A user-caused problem: printed as one line, exit status 2."""


class AnalysisError(Exception):
    """The analysis itself failed (torch / recorder ``RuntimeError``): one line, exit status 1."""


def _backbone(name: str, weights: str, device: str):
    from plugconv.backbones import load_backbone

    try:
        return load_backbone(name, weights=weights, device=device)
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        raise UsageError(f"backbone {name!r}: {e}") from e


def _entries(backbone, variants: Sequence[str], preset: str | None) -> list:
    from viz.models import prepare_model

    out = []
    if not variants:
        raise UsageError("no variants given; e.g. --variants conv,scconv")
    for v in variants:
        try:
            out.append(prepare_model(backbone, v, preset=preset))
        except (KeyError, ValueError) as e:
            raise UsageError(str(e).strip("'\"")) from e
    return out


def cmd_analyze(args: argparse.Namespace) -> int:
    from viz.analysis import analyze
    from viz.report import write_report

    images = []
    for p in args.images:
        try:
            images.append(_load_image(p))
        except (OSError, ValueError) as e:
            # viz.images.load_image's messages already name the file: print them as they are
            msg = str(e)
            raise UsageError(msg if Path(p).name in msg else f"{p}: {msg}") from e
    t0 = time.perf_counter()
    bb = _backbone(args.backbone, args.weights, args.device)
    t_backbone = time.perf_counter() - t0
    t0 = time.perf_counter()
    entries = _entries(bb, _split(args.variants), args.preset)
    t_prepare = time.perf_counter() - t0

    def progress(f: float, msg: str) -> None:
        if not args.quiet:
            print(f"[{f:4.0%}] {msg}", file=sys.stderr)

    try:
        a = analyze(images, bb, entries, layers=_split(args.layers) or None, target=args.target, topk=args.topk,
                    erf=not args.no_erf, redundancy=not args.no_redundancy, profile=not args.no_profile,
                    latency=not args.no_latency, erf_layer=args.erf_layer, progress=progress,
                    latency_repeats=args.repeats, latency_warmup=args.warmup)
        # where the rest of the run went: loading the backbone and building the swapped models
        a.timings.update({"load_backbone": t_backbone, "prepare_models": t_prepare})
    except (KeyError, ValueError) as e:
        raise UsageError(str(e).strip("'\"")) from e
    except RuntimeError as e:
        raise AnalysisError(f"analysis failed ({args.backbone}, variants {args.variants}, layers "
                            f"{args.layers or 'default'}): {e}") from e
    path = write_report(a, args.out, mode=args.mode)
    for m in a.models:
        if not m.swap.get("swapped") and m.variant != "conv":
            reasons = sorted({r["reason"] for r in m.swap.get("skipped", [])})
            print(f"note: {m.label}: no site could take the variant (all skipped: {'; '.join(reasons)[:300]})",
                  file=sys.stderr)
    print(path)
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from viz.analysis import cached_profile, cost_summary

    bb = _backbone(args.backbone, args.weights, args.device)
    size = args.input_size or bb.input_size
    entries = _entries(bb, _split(args.variants), args.preset)
    rows: list[dict[str, Any]] = []
    for e in entries:
        t = time.perf_counter()
        with e.lock:
            prof = cached_profile(e.model, size, device=bb.device, latency=not args.no_latency,
                                  repeats=args.repeats, warmup=args.warmup)
        s = cost_summary(prof)
        rows.append({
            "variant": e.variant, "label": e.label, "swapped": list(e.swap.swapped),
            "skipped": [{"site": a, "reason": b} for a, b in e.swap.skipped],
            "params": s["params"], "flops": s["flops"], "macs": s["macs"], "flops_status": s.get("flops_status"),
            "latency_ms": s["latency_ms"], "latency_iqr_ms": s.get("latency_iqr_ms"),
            # Σ of the per-layer medians (hooked pass) next to the whole-model (unhooked) median
            "latency_per_layer_sum_ms": (prof.get("latency") or {}).get("per_layer_sum_ms"),
            "latency_hooked_total_ms": (prof.get("latency") or {}).get("hooked_total_ms"),
            "latency_labels": s.get("latency_labels"),
            "deploy": cost_summary(prof["deploy"]) if prof.get("deploy") else None,
            "profile": prof, "seconds": time.perf_counter() - t,
        })
    out = {"backbone": bb.name, "weights": bb.weights.to_dict(), "device": str(bb.device), "input_size": size,
           "models": rows}
    if args.json:
        from viz.analysis import _jsonable

        print(json.dumps(_jsonable(out), indent=1))
    else:
        print(f"{bb.name} @ {size}px on {bb.device}")
        print(f"{'variant':10s} {'swapped':>7s} {'params (M)':>11s} {'GFLOPs':>8s} {'latency ms':>11s} "
              f"{'Σ layers ms':>12s}")
        for r in rows:
            lat = "-" if r["latency_ms"] is None else f"{r['latency_ms']:.2f}"
            tot = "-" if r["latency_per_layer_sum_ms"] is None else f"{r['latency_per_layer_sum_ms']:.2f}"
            print(f"{r['label']:10s} {len(r['swapped']):7d} {r['params'] / 1e6:11.3f} {r['flops'] / 1e9:8.3f} {lat:>11s} "
                  f"{tot:>12s}")
        if rows and rows[0]["latency_labels"]:
            lb = rows[0]["latency_labels"]
            print(f"latency: {lb.get('statistic')} after {lb.get('warmup')} warm-up, {lb.get('device')}, "
                  f"{lb.get('dtype')}, batch {lb.get('batch')}, {lb.get('input_size')}, {lb.get('threads')} threads; "
                  "Σ layers = sum of per-layer medians from a hooked pass (includes hook overhead)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for user errors, with a one-line message)."""
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "analyze":
            return cmd_analyze(args)
        return cmd_profile(args)
    except UsageError as e:
        msg = " ".join(str(e).split())
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except AnalysisError as e:
        msg = " ".join(str(e).split())
        print(f"error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    sys.exit(main())
