"""Parameter counts of torchvision ResNet-50 with each variant in every default site; writes docs/params.md.

Usage::

    .venv/bin/python scripts/param_table.py            # (re)write docs/params.md
    .venv/bin/python scripts/param_table.py --check    # exit 1 if docs/params.md is stale

Counts are ``sum(p.numel() for p in model.parameters())``: learnable parameters only (BatchNorm
running statistics and SAConv's weight-standardisation γ/β buffers are not counted). Sites are
the surgery defaults (3×3 convs inside residual blocks: ResNet-50's 16 bottleneck ``conv2``),
probed at the backbone's 224×224 input. ``tests/test_cli.py::test_param_table_doc_is_current_and_known_answers`` checks
that the committed table equals what this script computes now.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import re
import sys
from pathlib import Path
from typing import Any

import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from plugconv import fuse_model, get_conv, list_convs, swap_convs  # noqa: E402

DOC = ROOT / "docs" / "params.md"
BACKBONE = "resnet50"
PROBE_SIZE = 224
COLUMNS = ("variant", "params", "ratio", "delta", "swapped", "skipped", "exact transfer")
EXPECTED_VARIANTS = ("acb", "saconv", "scconv", "selfcal", "spconv")
#: published ResNet-50 counts to cross-check against (shared/reference/variants.md §3.6, §4.5)
REFERENCE_COUNTS = (
    ("spconv", 18_345_448, "the reference SPConv `resnet50` (qiulinzhang/SPConv.pytorch, alpha 1/2)"),
    ("selfcal", 25_564_584, "SCNet's released `scnet50` checkpoint"),
)


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def compute_rows(probe_size: int = PROBE_SIZE) -> tuple[list[dict[str, Any]], dict[str, list[tuple[str, str]]]]:
    """Rows of the table (baseline first) and the skipped sites with reasons per variant.

    Each row: ``{"variant", "params", "ratio", "delta", "swapped", "skipped", "exact"}``.
    """
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    base = _count(model)
    rows = [{"variant": "conv (baseline)", "params": base, "ratio": 1.0, "delta": 0, "swapped": 0, "skipped": 0,
             "exact": "-"}]
    skipped: dict[str, list[tuple[str, str]]] = {}
    for name in list_convs():
        if name == "conv":
            continue
        res = swap_convs(model, name, probe_size=probe_size)
        n = _count(res.model)
        exact = "yes" if get_conv(name).exact_transfer else "no"
        rows.append({"variant": name, "params": n, "ratio": n / base, "delta": n - base,
                     "swapped": len(res.swapped), "skipped": len(res.skipped), "exact": exact})
        skipped[name] = list(res.skipped)
        if name == "acb":  # deploy form: every ACB fused into one conv with bias
            f = _count(fuse_model(res.model))
            rows.append({"variant": "acb (fused, deploy)", "params": f, "ratio": f / base, "delta": f - base,
                         "swapped": len(res.swapped), "skipped": len(res.skipped), "exact": exact})
    return rows, skipped


def render(rows: list[dict[str, Any]], skipped: dict[str, list[tuple[str, str]]], *, date: str | None = None) -> str:
    """The markdown of docs/params.md."""
    date = date or _dt.date.today().isoformat()
    missing = [v for v in EXPECTED_VARIANTS if v not in list_convs()]
    lines = [
        "# Parameter counts: ResNet-50 with each variant in every default site",
        "",
        f"Computed by `scripts/param_table.py` on {date} with torch {torch.__version__} / torchvision "
        f"{torchvision.__version__} (do not edit by hand; `tests/test_cli.py` checks the numbers are current).",
        "",
        f"Host: torchvision `{BACKBONE}` ({PROBE_SIZE}×{PROBE_SIZE} probe input). Sites: the surgery defaults, the 3×3 "
        "convs inside the bottlenecks (`layer*.*.conv2`, 16 sites). `params` counts learnable parameters only "
        "(BatchNorm running statistics and SAConv's γ/β buffers are buffers); variants that absorb the BN (acb, "
        "selfcal) count their own BNs and the host BN is gone. Each variant is in its fresh/transfer form with its "
        "default options.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['params']:,} | {r['ratio']:.3f} | {r['delta']:+,} | {r['swapped']} | "
            f"{r['skipped']} | {r['exact']} |"
        )
    lines.append("")
    by_name = {r["variant"]: r["params"] for r in rows}
    for name, ref, what in REFERENCE_COUNTS:
        if name in by_name:
            verdict = "equals" if by_name[name] == ref else f"differs from ({by_name[name]:,} here)"
            lines.append(f"- `{name}` {verdict} {what}: {ref:,}.")
    lines.append("")
    notes = [(v, s) for v, s in skipped.items() if s]
    if notes:
        lines.append("Skipped sites:")
        lines.append("")
        for v, s in notes:
            for site, reason in s:
                lines.append(f"- `{v}` `{site}`: {reason}")
        lines.append("")
    if missing:
        lines.append(f"Not registered when this table was computed: {', '.join(missing)}.")
        lines.append("")
    return "\n".join(lines)


_ROW = re.compile(r"^\| (?P<variant>[^|]+?) \| (?P<params>[\d,]+) \| (?P<ratio>[\d.]+) \| (?P<delta>[+\-\d,]+) \| "
                  r"(?P<swapped>\d+) \| (?P<skipped>\d+) \| (?P<exact>[^|]+?) \|$")


def parse(text: str) -> list[dict[str, Any]]:
    """The table rows of a rendered docs/params.md (numbers as ints/floats)."""
    rows = []
    for line in text.splitlines():
        m = _ROW.match(line.strip())
        if m:
            rows.append({
                "variant": m["variant"], "params": int(m["params"].replace(",", "")), "ratio": float(m["ratio"]),
                "delta": int(m["delta"].replace(",", "")), "swapped": int(m["swapped"]),
                "skipped": int(m["skipped"]), "exact": m["exact"],
            })
    return rows


def comparable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with the ratio rounded as rendered (for comparing a fresh computation with the document)."""
    return [{**r, "ratio": round(r["ratio"], 3)} for r in rows]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with docs/params.md instead of writing it")
    ap.add_argument("--out", type=Path, default=DOC, help="output markdown file (default: %(default)s)")
    args = ap.parse_args(argv)
    rows, skipped = compute_rows()
    if args.check:
        current = parse(args.out.read_text()) if args.out.is_file() else []
        if comparable(current) != comparable(rows):
            print(f"{args.out} is stale; run scripts/param_table.py", file=sys.stderr)
            return 1
        print(f"{args.out} is current")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(rows, skipped))
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
