"""The command line: ``python -m plugconv <command>``.

::

    python -m plugconv list [--json]
    python -m plugconv swap --backbone resnet50 --variant acb [--weights random|default|PATH]
                            [--include PAT ...] [--exclude PAT ...] [--option KEY=VALUE ...] [--json]
    python -m plugconv calibrate ...          (plugconv/cli_calibrate.py)

Each subcommand is registered by a small function ``add_<name>_parser(subparsers)`` listed in
:data:`SUBCOMMANDS`; it sets ``func`` (``args -> exit status``) on its parser. To add one, write
such a function (in this file or a ``cli_<name>.py`` module) and append it to ``SUBCOMMANDS``.

Offline fallback: ``--weights default`` for a torchvision backbone whose weights are neither cached
nor downloadable runs on the bundled offline model (``efficientnet_lite0``) instead, with a note on
stderr and ``"fallback": "<note>"`` in ``--json`` output (``--no-fallback`` makes it an error).
Explicit weights files are never replaced: a missing or bad file is an error.

Exit status: 0 on success, 2 for a user error (unknown variant or backbone, unavailable or bad
weights, bad option): one line on stderr naming the value and the choices, no traceback.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

PROG = "plugconv"


class CliError(Exception):
    """A user error: printed as one line on stderr, exit status 2."""


# ---- list -----------------------------------------------------------------------------------------


def variant_rows() -> list[dict[str, Any]]:
    """One dict per registered variant: name, class, paper, year, exact_transfer, absorbs_bn, constraints."""
    from plugconv.registry import get_conv, list_convs

    rows = []
    for name in list_convs():
        cls = get_conv(name)
        rows.append(
            {
                "name": name,
                "class": cls.__name__,
                "paper": cls.paper,
                "year": cls.year or None,
                "exact_transfer": bool(cls.exact_transfer),
                "absorbs_bn": bool(cls.absorbs_bn),
                "constraints": cls.constraints,
            }
        )
    return rows


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_list(args: argparse.Namespace) -> int:
    """``list``: the registered variants."""
    rows = variant_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    yes = {True: "yes", False: "no"}
    table = [("name", "paper", "year", "exact transfer", "absorbs BN", "constraints")]
    for r in rows:
        table.append(
            (r["name"], r["paper"], str(r["year"] or "-"), yes[r["exact_transfer"]], yes[r["absorbs_bn"]], r["constraints"])
        )
    print(_table(table))
    return 0


def add_list_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``list``."""
    help_ = "list the registered convolution variants (paper, exact transfer, BN, constraints)"
    p = subparsers.add_parser("list", help=help_, description=help_)
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.set_defaults(func=run_list)
    return p


# ---- swap -----------------------------------------------------------------------------------------


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers such as BN statistics or SAConv's γ/β are not counted)."""
    return sum(p.numel() for p in model.parameters())


def _parse_options(items: Sequence[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise CliError(f"--option {item!r} is not KEY=VALUE (e.g. --option aws=False)")
        try:
            value: Any = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        out[key.strip()] = value
    return out


def swap_summary(
    backbone: str,
    variant: str,
    *,
    weights: str = "random",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    device: str = "cpu",
    options: dict[str, Any] | None = None,
    fallback: bool = True,
) -> dict[str, Any]:
    """Swap ``variant`` into ``backbone`` and describe what happened (the ``swap --json`` object).

    Returns:
        ``{"backbone", "variant", "swapped": [site], "skipped": [{"site", "reason"}],
        "params_before", "params_after", "params_ratio", "exact", "provenance":
        {"backbone_weights": WeightsInfo dict, "sites": {site: status}}, "options", "device",
        "requested_backbone", "fallback"}``; ``fallback`` is None, or the note saying that the
        default weights of ``backbone`` were unavailable and the bundled offline model was used
        (then ``"backbone"`` names the bundled model; see ``load_backbone_or_fallback``).

    Raises:
        CliError: unknown variant/backbone, unavailable or bad weights, bad options (one-line message).
    """
    from plugconv.backbones import BackboneUnavailable, load_backbone_or_fallback
    from plugconv.registry import get_conv
    from plugconv.surgery import swap_convs

    try:
        get_conv(variant)  # before any model is built
        bb, note = load_backbone_or_fallback(backbone, weights=weights, device=device, fallback=fallback)
        res = swap_convs(
            bb.model, variant, include=include or None, exclude=exclude or None, probe_size=bb.input_size,
            **(options or {}),
        )
    except (KeyError, ValueError, BackboneUnavailable, FileNotFoundError) as e:
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        raise CliError(" ".join(msg.split())) from None
    before, after = count_params(bb.model), count_params(res.model)
    return {
        "backbone": bb.name,
        "variant": variant,
        "swapped": list(res.swapped),
        "skipped": [{"site": s, "reason": r} for s, r in res.skipped],
        "params_before": before,
        "params_after": after,
        "params_ratio": after / before if before else None,
        "exact": res.exact,
        "provenance": {"backbone_weights": bb.weights.to_dict(), "sites": dict(res.provenance)},
        "options": res.to_dict()["options"],
        "device": str(bb.device),
        "requested_backbone": backbone,
        "fallback": note,
    }


def run_swap(args: argparse.Namespace) -> int:
    """``swap``: sites swapped and skipped (with reasons), parameters before and after."""
    out = swap_summary(
        args.backbone, args.variant, weights=args.weights, include=args.include, exclude=args.exclude,
        device=args.device, options=_parse_options(args.option), fallback=not args.no_fallback,
    )
    if out["fallback"]:
        print(f"{PROG} swap: note: {out['fallback']}", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    w = out["provenance"]["backbone_weights"]
    print(f"backbone {out['backbone']} ({w['source']} weights: {w['description']})")
    print(f"variant  {out['variant']}  on {out['device']}")
    print(f"swapped  {len(out['swapped'])} site(s); transfer {'exact' if out['exact'] else 'NOT exact (initialised)'}")
    for s in out["swapped"]:
        print(f"  {s:<28} {out['provenance']['sites'][s]}")
    print(f"skipped  {len(out['skipped'])} site(s)")
    for s in out["skipped"]:
        print(f"  {s['site']:<28} {s['reason']}")
    ratio = f" ({out['params_ratio']:.3f}x)" if out["params_ratio"] is not None else ""
    print(f"params   {out['params_before']:,} -> {out['params_after']:,}{ratio}")
    return 0


def add_swap_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``swap``."""
    help_ = "swap a variant into a backbone's default (or chosen) sites and report what changed"
    p = subparsers.add_parser("swap", help=help_, description=help_)
    p.add_argument("--backbone", required=True, help="backbone name, e.g. resnet50 (plugconv.backbones.list_backbones())")
    p.add_argument("--variant", required=True, help="registry key, e.g. acb (see `python -m plugconv list`)")
    p.add_argument("--weights", default="random",
                   help="'random' (offline, default), 'default' (torchvision ImageNet weights) or a weights file")
    p.add_argument("--include", nargs="+", action="extend", metavar="PAT",
                   help="fnmatch patterns over conv paths to consider (default: 3x3 convs in residual blocks)")
    p.add_argument("--exclude", nargs="+", action="extend", metavar="PAT", help="fnmatch patterns to leave alone")
    p.add_argument("--option", nargs="+", action="extend", metavar="KEY=VALUE",
                   help="variant option, Python literal values (e.g. aws=False, fuse='softmax2c')")
    p.add_argument("--device", default="cpu", help="cpu (default), auto, cuda, cuda:N")
    p.add_argument("--no-fallback", action="store_true",
                   help="with --weights default: fail instead of using the bundled offline model when the "
                        "backbone's weights are neither cached nor downloadable")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_swap)
    return p


# ---- registration ---------------------------------------------------------------------------------


def _add_calibrate_parser(subparsers: Any) -> argparse.ArgumentParser | None:
    """Register ``calibrate`` from ``plugconv/cli_calibrate.py`` (the calibration helper's module)."""
    try:
        from plugconv.cli_calibrate import add_calibrate_parser
    except ImportError:  # calibration not installed in this checkout: list/swap still work
        return None
    return add_calibrate_parser(subparsers)


#: subcommand registrars, in help order; each takes the subparsers object and sets ``func``
SUBCOMMANDS: list[Callable[[Any], argparse.ArgumentParser | None]] = [
    add_list_parser,
    add_swap_parser,
    _add_calibrate_parser,
]


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m plugconv`` parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="plug-and-play convolutions inside pretrained CNNs (library CLI)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 user error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except CliError as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 2
