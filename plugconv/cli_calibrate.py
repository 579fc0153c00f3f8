"""The ``calibrate`` subcommand of ``python -m plugconv``.

::

    python -m plugconv calibrate --backbone resnet50 --weights default --variant scconv \\
        --images photos/ --out resnet50-scconv.safetensors [--steps N] [--json]

Loads the backbone, swaps the variant in, calibrates the swapped sites on the example photos in
``assets/`` plus ``--images`` (directories or files), and writes the calibrated site weights as
safetensors with a JSON metadata record (``plugconv.calibrate.read_calibration`` reads it back,
``apply_calibration`` loads it into a fresh swap). ``plugconv.cli`` registers this subcommand with
``add_calibrate_parser``; ``main`` runs it on its own.

With ``--weights default`` and a torchvision backbone whose weights are neither cached nor
downloadable, the bundled offline model is calibrated instead (a note on stderr, ``"fallback"`` in
the JSON; ``--no-fallback`` makes it an error). ``--json`` prints ``{"out", "backbone", "weights",
"fallback", "provenance": {"backbone_weights": {...}, "sites": {site: "calibrated" | "initialised"
| ...}}, "report"}``; a site the guard kept at its initial parameters stays "initialised".
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from plugconv.calibrate import DEFAULTS

COMMAND = "calibrate"
HELP = "fit a non-exact variant's swapped sites to the original convs (layer-wise distillation)"


def configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``calibrate`` options to ``p`` and set ``func`` to :func:`run`."""
    p.add_argument("--backbone", required=True, help="backbone name, e.g. resnet50 (see list_backbones())")
    p.add_argument("--weights", default="default",
                   help="'default', 'random' or a .safetensors/.pth/.pt file (default: %(default)s)")
    p.add_argument("--variant", required=True, help="registry key of the variant, e.g. scconv, selfcal, spconv")
    p.add_argument("--images", nargs="*", default=[], metavar="DIR_OR_FILE",
                   help="extra calibration images: directories and/or files (added to the assets/ examples)")
    p.add_argument("--no-examples", action="store_true", help="do not use the example photos in assets/")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--include", nargs="*", default=None, help="fnmatch patterns of conv sites (default: block 3x3s)")
    p.add_argument("--exclude", nargs="*", default=None, help="fnmatch patterns of conv sites to leave alone")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="layer-wise Adam steps (%(default)s)")
    p.add_argument("--e2e-steps", type=int, default=DEFAULTS["e2e_steps"],
                   help="end-to-end logit-distillation steps (%(default)s)")
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="layer-wise learning rate (%(default)s)")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="crops per batch (%(default)s)")
    p.add_argument("--crop", type=int, default=DEFAULTS["crop"], help="crop side in pixels (%(default)s)")
    p.add_argument("--samples", type=int, default=DEFAULTS["samples"], help="training crops (%(default)s)")
    p.add_argument("--eval-samples", type=int, default=DEFAULTS["eval_samples"],
                   help="held-out crops for the report (%(default)s)")
    p.add_argument("--seed", type=int, default=0, help="augmentation / batch-order seed (%(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (%(default)s)")
    p.add_argument("--no-fallback", action="store_true",
                   help="with --weights default: fail instead of using the bundled offline model when the "
                        "backbone's weights are neither cached nor downloadable")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=run)
    return p


def add_calibrate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``calibrate`` on an ``argparse`` subparsers object; returns its parser."""
    p = subparsers.add_parser(COMMAND, help=HELP, description=HELP)
    return configure_parser(p)


def run(args: argparse.Namespace) -> int:
    """Run the subcommand. Returns the exit status (0 = written; 2 = a user error, on stderr)."""
    import dataclasses

    from plugconv.backbones import BackboneUnavailable, load_backbone_or_fallback
    from plugconv.calibrate import calibrate, save_calibration
    from plugconv.images_dataset import load_images
    from plugconv.registry import UnknownVariantError
    from plugconv.surgery import swap_convs

    def progress(frac: float, msg: str) -> None:
        if not args.quiet:
            print(f"[{frac * 100:5.1f}%] {msg}", file=sys.stderr, flush=True)

    try:
        backbone, note = load_backbone_or_fallback(args.backbone, weights=args.weights, device=args.device,
                                                   fallback=not args.no_fallback)
        if note:
            print(f"plugconv calibrate: note: {note}", file=sys.stderr, flush=True)
        images = load_images(args.images or None, include_examples=not args.no_examples)
        swap = swap_convs(backbone.model, args.variant, include=args.include, exclude=args.exclude,
                          probe_size=backbone.input_size)
        if not swap.swapped:
            reasons = "; ".join(f"{s}: {r}" for s, r in swap.skipped[:5]) or "no candidate sites"
            on = f" of the fallback model {backbone.name}" if note else ""
            raise ValueError(f"variant {args.variant!r} could not be placed at any site{on} ({reasons})")
        report = calibrate(
            backbone.model, swap, images,
            steps=args.steps, e2e_steps=args.e2e_steps, lr=args.lr, batch_size=args.batch_size,
            crop=args.crop, samples=args.samples, eval_samples=args.eval_samples,
            mean=backbone.mean, std=backbone.std, seed=args.seed, device=args.device, progress=progress,
        )
        meta = {"backbone": backbone.name, "weights": backbone.weights.to_dict()}
        if note:
            meta["requested_backbone"] = args.backbone
            meta["fallback"] = note
        out = save_calibration(args.out, report, meta)
    except (UnknownVariantError, ValueError, FileNotFoundError, BackboneUnavailable) as e:
        print(f"plugconv calibrate: error: {e}", file=sys.stderr)
        return 2
    report = dataclasses.replace(report, cache_path=str(out))
    if args.json:
        provenance = {
            "backbone_weights": backbone.weights.to_dict(),
            "sites": dict(report.swap.provenance) if report.swap is not None else {},
        }
        print(json.dumps({"out": str(out), **meta, "fallback": note, "provenance": provenance,
                          "report": report.to_dict()}, indent=2))
    else:
        print(f"wrote {out}")
        prov = report.swap.provenance if report.swap is not None else {}
        print("relative error ||s - t|| / ||t|| per site on held-out crops")
        print(f"{'site':<24}{'error before':>14}{'error after':>14}  status")
        for s in report.sites:
            print(f"{s.site:<24}{s.error_before:>14.4f}{s.error_after:>14.4f}  {prov.get(s.site, '?')}")
        print(f"top-1 agreement with the teacher: {report.agreement_before:.3f} -> {report.agreement_after:.3f}")
        print(f"KL(teacher || student): {report.kl_before:.4f} -> {report.kl_after:.4f} nats")
        print(f"wall time {report.wall_time_s:.1f} s on {report.device}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``calibrate`` on its own: ``python -m plugconv.cli_calibrate --backbone ...``."""
    p = configure_parser(argparse.ArgumentParser(prog="plugconv calibrate", description=HELP))
    args = p.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
