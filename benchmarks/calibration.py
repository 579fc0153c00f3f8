"""Calibration benchmark: how well and how fast each non-exact variant is fitted to ResNet-18.

``python -m benchmarks.calibration [--weights PATH] [--images N] [--size 160] [--device cpu|cuda]
[--threads N] [--json OUT]`` swaps ``scconv``, ``selfcal`` and ``spconv`` in turn into every default site of a
ResNet-18, calibrates on N augmented crops of the example photos in ``assets/`` at the given size,
and prints wall time, per-site relative error ‖s − t‖ / ‖t‖ (norm ratio on held-out crops; target
≤ 0.1) before and after calibration, and top-1 agreement and KL divergence with the teacher on
held-out crops.

Offline (no ``--weights``) the teacher is ResNet-18 with seeded *random* weights: the site-level
numbers are meaningful (each site is fitted to a fixed random conv + BN), the model-level agreement
much less so (a random network's logits are nearly input-independent). Pass a real weights file when
one is at hand. This is a script that prints numbers, not a timed test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any

import torch

VARIANTS = ("scconv", "selfcal", "spconv")

#: structural reasons a variant's site may stay away from a dense 3x3 conv (+BN); printed when a run
#: misses the 0.1 target (norm ratio). How far each limit matters depends on how structured the
#: teacher's kernels and the site's inputs are: a seeded random teacher has unstructured, full-rank
#: kernels that a reduced-capacity module can only approximate (see docs/calibration.md)
CAPACITY = {
    "scconv": (
        "CRU gives the upper alpha*C channels a 3x3 only through a group-wise conv (gwc_groups) after a "
        "squeeze by squeeze_ratio and the lower channels only 1x1 convs, and SRU gates the input: the dense "
        "kernel's cross-group spatial taps have no direct counterpart (more steps, or e2e, may still help)"
    ),
    "selfcal": (
        "block-diagonal: each output half sees only its own input half (K1 on the first, the calibrated "
        "path K2..K4 on the second), so the off-diagonal blocks of the dense kernel are reproduced only "
        "as far as one input half predicts the other (more steps may still help)"
    ),
    "spconv": (
        "only the representative alpha*C input channels get a 3x3 (group-wise + point-wise); the "
        "redundant channels get a 1x1, so their spatial taps in the dense kernel are lost except as far "
        "as other channels predict them (more steps may still help)"
    ),
}


#: appended to ``why_not`` when the teacher has random weights
RANDOM_TEACHER = (
    "; and the teacher has seeded random weights: its 3x3 kernels are unstructured and full-rank, with no "
    "low-rank or channel-redundant structure for a reduced or block-structured module to exploit, unlike "
    "trained kernels (see docs/calibration.md)"
)


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def run_calibration_benchmark(
    variant: str,
    *,
    images: int = 32,
    size: int = 160,
    device: str = "cpu",
    weights: str | None = None,
    steps: int | None = None,
    lr: float | None = None,
    e2e_steps: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Calibrate ``variant`` in ResNet-18 and return the numbers.

    Args:
        variant: registry key ("scconv", "selfcal", "spconv", ...).
        images: number of augmented training crops of the ``assets/`` photos.
        size: crop side in pixels.
        device: "cpu", "cuda" or "auto".
        weights: a ResNet-18 weights file; None = seeded random weights (offline).
        steps, lr, e2e_steps: override the calibration defaults.
        seed: seed of the random teacher, the variant initialisation and the calibration.

    Returns:
        JSON-ready dict: variant, teacher, sites, wall time, per-site errors, max/mean error,
        agreement and KL before/after, machine (cores, threads, load average, torch version).
    """
    from plugconv.backbones import load_backbone
    from plugconv.calibrate import calibrate
    from plugconv.images_dataset import load_images
    from plugconv.surgery import swap_convs

    torch.manual_seed(seed)
    backbone = load_backbone("resnet18", weights=weights or "random", device=device)
    photos = load_images()
    torch.manual_seed(seed + 1)
    swap = swap_convs(backbone.model, variant, probe_size=size)
    load_before = _loadavg()
    kw: dict[str, Any] = {}
    if steps is not None:
        kw["steps"] = steps
    if lr is not None:
        kw["lr"] = lr
    if e2e_steps is not None:
        kw["e2e_steps"] = e2e_steps
    t0 = time.perf_counter()
    rep = calibrate(backbone.model, swap, photos, samples=images, crop=size, device=device,
                    mean=backbone.mean, std=backbone.std, seed=seed, **kw)
    wall = time.perf_counter() - t0
    errors = [s.error_after for s in rep.sites]  # norm ratio ‖s − t‖ / ‖t‖
    max_err = max(errors, default=0.0)
    n_params = {
        "dense": sum(p.numel() for s in rep.sites for p in backbone.model.get_submodule(s.site).parameters()),
        "variant": sum(p.numel() for s in rep.sites for p in swap.model.get_submodule(s.site).parameters()),
    }
    return {
        "variant": variant,
        "teacher": {
            "backbone": "resnet18",
            "weights": backbone.weights.to_dict(),
            "random": weights is None,
        },
        "images": len(photos),
        "crops": images,
        "size": size,
        "device": rep.device,
        "steps": rep.steps,
        "e2e_steps": rep.e2e_steps,
        "lr": rep.options["lr"],
        "batch_size": rep.options["batch_size"],
        "sites": len(rep.sites),
        "skipped": len(swap.skipped),
        "wall_time_s": wall,
        "per_site": [s.to_dict() for s in rep.sites],
        "max_error_after": max_err,
        "mean_error_after": sum(errors) / len(errors) if errors else 0.0,
        "mean_error_before": sum(s.error_before for s in rep.sites) / len(errors) if errors else 0.0,
        "max_error_before": max((s.error_before for s in rep.sites), default=0.0),
        "error_metric": "norm ratio ||s - t|| / ||t|| on the held-out crops (sq_error_*: its square)",
        "site_params": n_params,
        "target_error": 0.1,
        "target_met": max_err <= 0.1,
        "why_not": None if max_err <= 0.1 else (
            CAPACITY.get(variant, "see the variant's docstring")
            + (RANDOM_TEACHER if weights is None else "")
        ),
        "agreement": {"before": rep.agreement_before, "after": rep.agreement_after},
        "kl": {"before": rep.kl_before, "after": rep.kl_after},
        "machine": {
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "loadavg_1min_before": load_before,
            "loadavg_1min_after": _loadavg(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
        },
    }


def format_table(results: list[dict[str, Any]]) -> str:
    """A plain-text table of benchmark results."""
    lines = [
        f"{'variant':<9}{'sites':>6}{'wall s':>8}{'err before':>12}{'err after (mean/max)':>22}"
        f"{'top-1 agree':>14}{'KL before→after':>20}{'load':>7}",
    ]
    for r in results:
        lines.append(
            f"{r['variant']:<9}{r['sites']:>6}{r['wall_time_s']:>8.1f}{r['mean_error_before']:>12.3f}"
            f"{r['mean_error_after']:>12.3f} / {r['max_error_after']:<7.3f}"
            f"{r['agreement']['before']:>6.2f}→{r['agreement']['after']:<6.2f}"
            f"{r['kl']['before']:>10.3f}→{r['kl']['after']:<9.3f}"
            f"{(r['machine']['loadavg_1min_after'] or 0):>7.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.calibration", description=__doc__.split("\n")[0])
    p.add_argument("--weights", default=None, help="ResNet-18 weights file (default: seeded random weights)")
    p.add_argument("--images", type=int, default=32, help="augmented training crops (%(default)s)")
    p.add_argument("--size", type=int, default=160, help="crop side in pixels (%(default)s)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (%(default)s)")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), help="variants (%(default)s)")
    p.add_argument("--steps", type=int, default=None, help="override calibration steps")
    p.add_argument("--lr", type=float, default=None, help="override the layer-wise learning rate")
    p.add_argument("--e2e-steps", type=int, default=None, help="override end-to-end steps")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 avoids OpenMP spin-waiting on a busy machine)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.weights is None:
        print("teacher: ResNet-18 with seeded RANDOM weights (offline; pass --weights for a real one)", flush=True)
    results = []
    for v in args.variants:
        r = run_calibration_benchmark(v, images=args.images, size=args.size, device=args.device,
                                      weights=args.weights, steps=args.steps, lr=args.lr, e2e_steps=args.e2e_steps)
        results.append(r)
        print(f"{v}: {r['sites']} sites, {r['wall_time_s']:.1f} s, relative error ||s-t||/||t|| mean "
              f"{r['mean_error_before']:.3f} -> {r['mean_error_after']:.3f} "
              f"(max {r['max_error_before']:.3f} -> {r['max_error_after']:.3f}), "
              f"site params {r['site_params']['variant']:,} vs dense {r['site_params']['dense']:,}, "
              f"top-1 agreement {r['agreement']['before']:.2f} -> {r['agreement']['after']:.2f}, "
              f"KL {r['kl']['before']:.3f} -> {r['kl']['after']:.3f}", flush=True)
        for s in r["per_site"]:
            print(f"    {s['site']:<18} {s['error_before']:.3f} -> {s['error_after']:.4f}")
        if r["why_not"]:
            print(f"    target 0.1 not met: {r['why_not']}")
    m = results[0]["machine"] if results else {}
    print()
    print(format_table(results))
    print(f"\nmachine: {m.get('cores')} cores, {m.get('torch_threads')} torch threads, torch {m.get('torch')}, "
          f"load average {m.get('loadavg_1min_before')} before / {m.get('loadavg_1min_after')} after the last run")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
