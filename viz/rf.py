"""Theoretical receptive field along the module graph (``reference/analysis.md`` §2.5).

Starting from the input with r = 1 and jump j = 1, every conv or pool (k, s, d) applies
k_eff = d(k−1)+1, r ← r + (k_eff−1)·j, j ← j·s; at adds / concats / products the maximum r over
the branches is kept (and the finest jump). The graph comes from a ``torch.fx`` trace in which
convolutions, pools, norms and plug-and-play variants are leaves, never from hook execution order
(which is how torchscan gets partial results on residual nets).

Global operations make the theoretical field the whole image; they are reported next to the
local, conv-only value as "global (via …)": global pooling whose result flows back into a
spatial map (SE gates, SAConv's contexts), GroupNorm / InstanceNorm statistics (eval-mode
BatchNorm is a per-channel affine map and stays local), and variants whose internals are global.

Variants are leaves with a per-variant local contribution (for a 3×3 site, d = 1):

=========  ==========================================================  =================================
variant    local k_eff                                                 global
=========  ==========================================================  =================================
conv/acb   d(k−1)+1 (ACB's 1×k and k×1 lie inside the square)          no
saconv     max(3d(k−1)+1 large branch, 5 switch pool)  → 7             GAP pre/post context
selfcal    r_p(1+2d) + 2d (pooled path, then K4)        → 14 (r_p=4)   no (grid-aligned, Up adds ~r_p)
spconv     d(k−1)+1 (GWC); pooled 1×1 paths 2 at stride 2              GAP fusion weights
scconv     k of the GWC                                                GroupNorm (SRU), GAP (CRU)
=========  ==========================================================  =================================
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from viz._locks import PROCESS_STATE_LOCK

_POOLS = (nn.MaxPool2d, nn.AvgPool2d)
_GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_GLOBAL_NORMS = (nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm)


def _pair(v: Any) -> int:
    """Largest entry of an int or tuple (non-square kernels: the longer side bounds the field)."""
    if isinstance(v, (tuple, list)):
        return int(max(v))
    return int(v)


@dataclass(frozen=True)
class _State:
    r: float  # local receptive field (input pixels, unclipped)
    j: float  # jump (effective stride)
    global_via: frozenset[str] = frozenset()


def variant_rf(module: nn.Module) -> dict[str, Any]:
    """Local receptive-field contribution of one variant module (analysis.md §2.5 table).

    Args:
        module: a registered variant (``plugconv.ConvVariant``) or an ``nn.Conv2d``.

    Returns:
        {"variant", "kernel", "stride", "dilation", "k_local" (local k_eff in input pixels of
        that layer), "global_via": [...], "note"}.
    """
    name = getattr(type(module), "name", "") or type(module).__name__
    k, s, d = _kernel_stride_dilation(module)
    base = d * (k - 1) + 1
    note = ""
    glob: list[str] = []
    if name in ("conv", "acb") or isinstance(module, nn.Conv2d) and name not in _VARIANT_NAMES:
        k_local = base
        if name == "acb":
            note = "ACB: the 1×k and k×1 branches lie inside the k×k square"
    elif name == "saconv":
        k_local = max(3 * d * (k - 1) + 1, 5)
        note = f"large branch (dilation 3d) k_eff = 3d(k−1)+1 = {3 * d * (k - 1) + 1}; switch path: 5×5 avg pool"
        glob = ["SAConv GAP pre/post context"]
    elif name == "selfcal":
        rp = int(getattr(module, "pooling_r", getattr(module, "r", 4)) or 4)
        k_local = rp * (1 + 2 * d) + 2 * d
        note = (
            f"calibrated half: pooled path r(1+2d) = {rp * (1 + 2 * d)}, then +2d from K4 → {k_local} "
            f"(grid-aligned, not centred; bilinear Up adds up to ~{rp} px); plain half {base}"
        )
    elif name == "spconv":
        k_local = base
        note = "GWC k×k on the representative part; pooled 1×1 paths 2 at stride 2"
        glob = ["SPConv GAP fusion weights"]
    elif name == "scconv":
        k_local = base
        note = "GWC k×k in CRU"
        glob = ["SCConv GroupNorm statistics (SRU)", "SCConv GAP (CRU)"]
    else:
        k_local = base
        note = f"unknown variant {name!r}: assumed a plain k×k conv"
    return {
        "variant": name,
        "kernel": k,
        "stride": s,
        "dilation": d,
        "k_local": int(k_local),
        "global_via": glob,
        "note": note,
    }


_VARIANT_NAMES = ("saconv", "selfcal", "spconv", "scconv")


def _kernel_stride_dilation(module: nn.Module) -> tuple[int, int, int]:
    """(k, s, d) of a conv or variant: its own attributes, else its largest inner conv."""
    k = getattr(module, "kernel_size", None)
    s = getattr(module, "stride", None)
    d = getattr(module, "dilation", None)
    if k is not None and s is not None:
        return _pair(k), _pair(s), _pair(d if d is not None else 1)
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d) and m is not module]
    if not convs:
        return 1, 1, 1
    big = max(convs, key=lambda c: _pair(c.kernel_size))
    stride = max(_pair(c.stride) for c in convs)
    return _pair(big.kernel_size), stride, _pair(big.dilation)


def _is_variant(m: nn.Module) -> bool:
    try:
        from plugconv.base import ConvVariant
    except ImportError:  # pragma: no cover
        return False
    return isinstance(m, ConvVariant)


class _RFTracer(fx.Tracer):
    """FX tracer with convs, pools, norms and variants as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:  # noqa: D102
        if isinstance(m, (nn.Conv2d, *_POOLS, *_GLOBAL_POOLS, *_GLOBAL_NORMS, nn.Upsample)) or _is_variant(m):
            return True
        return super().is_leaf_module(m, qualname)


def _trace(model: nn.Module) -> fx.Graph:
    try:
        # fx patches nn.Module.__call__ process-wide while it traces: one trace (or FLOP count) at a time
        with PROCESS_STATE_LOCK:
            return _RFTracer().trace(model)
    except Exception as e:  # fx raises many types (TraceError, TypeError, ...)
        raise ValueError(
            f"cannot trace {type(model).__name__} with torch.fx for the theoretical RF "
            f"({type(e).__name__}: {e})"
        ) from e


def _combine(states: Sequence[_State]) -> _State | None:
    if not states:
        return None
    return _State(
        max(s.r for s in states),
        min(s.j for s in states),
        frozenset().union(*(s.global_via for s in states)),
    )


def _arg_states(node: fx.Node, st: dict[fx.Node, _State]) -> list[_State]:
    out: list[_State] = []

    def visit(a: Any) -> None:
        if isinstance(a, fx.Node):
            if a in st:
                out.append(st[a])
        elif isinstance(a, (list, tuple)):
            for b in a:
                visit(b)
        elif isinstance(a, dict):
            for b in a.values():
                visit(b)

    visit(node.args)
    visit(node.kwargs)
    return out


def _arg(node: fx.Node, i: int, name: str, default: Any) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _is_global_reduce(node: fx.Node) -> bool:
    """x.mean((2, 3)) / torch.mean(x, dim=(2, 3)) / F.adaptive_*_pool2d: spatial reductions."""
    if node.op == "call_function" and node.target in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d):
        return True
    if (node.op == "call_method" and node.target in ("mean", "sum", "amax", "max")) or (
        node.op == "call_function" and node.target in (torch.mean, torch.sum, torch.amax)
    ):
        dims = _arg(node, 1, "dim", None)
        if isinstance(dims, (tuple, list)) and {int(d) % 4 for d in dims if isinstance(d, int)} >= {2, 3}:
            return True
        if isinstance(dims, (tuple, list)) and (-1 in dims and -2 in dims):
            return True
    return False


def _propagate(model: nn.Module, graph: fx.Graph) -> tuple[dict[fx.Node, _State], list[dict[str, Any]]]:
    modules = dict(model.named_modules())
    st: dict[fx.Node, _State] = {}
    variants: list[dict[str, Any]] = []
    for node in graph.nodes:
        ins = _arg_states(node, st)
        if node.op == "placeholder":
            if not st:  # the first input is the image
                st[node] = _State(1.0, 1.0)
            continue
        if node.op in ("get_attr", "output"):
            continue
        cur = _combine(ins)
        if cur is None:
            continue
        if node.op == "call_module":
            m = modules[node.target]
            if _is_variant(m) and (getattr(type(m), "name", "") in _VARIANT_NAMES or not isinstance(m, nn.Conv2d)):
                info = variant_rf(m)
                r = cur.r + (info["k_local"] - 1) * cur.j
                glob = cur.global_via | {f"{g} ({node.target})" for g in info["global_via"]}
                variants.append({"site": node.target, **info, "r_in": cur.r, "j_in": cur.j, "r_out": r})
                st[node] = _State(r, cur.j * info["stride"], glob)
            elif isinstance(m, nn.Conv2d):
                k, s, d = _kernel_stride_dilation(m)
                if _is_variant(m):
                    info = variant_rf(m)
                    variants.append({"site": node.target, **info, "r_in": cur.r, "j_in": cur.j,
                                     "r_out": cur.r + (d * (k - 1)) * cur.j})
                st[node] = _State(cur.r + d * (k - 1) * cur.j, cur.j * s, cur.global_via)
            elif isinstance(m, _POOLS):
                k, s = _pair(m.kernel_size), _pair(m.stride if m.stride is not None else m.kernel_size)
                d = _pair(getattr(m, "dilation", 1))
                st[node] = _State(cur.r + d * (k - 1) * cur.j, cur.j * s, cur.global_via)
            elif isinstance(m, _GLOBAL_POOLS):
                st[node] = _State(cur.r, cur.j, cur.global_via | {f"global pooling ({node.target})"})
            elif isinstance(m, _GLOBAL_NORMS):
                st[node] = _State(cur.r, cur.j, cur.global_via | {f"{type(m).__name__} statistics ({node.target})"})
            elif isinstance(m, nn.LayerNorm) and len(m.normalized_shape) >= 2:
                st[node] = _State(cur.r, cur.j, cur.global_via | {f"LayerNorm statistics ({node.target})"})
            elif isinstance(m, nn.Upsample):
                sf = m.scale_factor
                sf = _pair(sf) if sf is not None else 1
                st[node] = _State(cur.r, cur.j / max(sf, 1), cur.global_via)
            else:
                st[node] = cur
        elif node.op == "call_function" and node.target in (F.max_pool2d, F.avg_pool2d):
            k = _arg(node, 1, "kernel_size", 1)
            s = _arg(node, 2, "stride", None) or k
            if isinstance(k, (int, tuple, list)) and isinstance(s, (int, tuple, list)):
                st[node] = _State(cur.r + (_pair(k) - 1) * cur.j, cur.j * _pair(s), cur.global_via)
            else:
                st[node] = cur
        elif node.op == "call_function" and node.target is F.conv2d:
            w = _arg(node, 1, "weight", None)
            s = _pair(_arg(node, 3, "stride", 1))
            d = _pair(_arg(node, 5, "dilation", 1))
            k = 1
            if isinstance(w, fx.Node) and w.op == "get_attr":
                try:
                    k = _pair(tuple(model.get_parameter(w.target).shape[2:]))
                except (AttributeError, KeyError):
                    k = 1
            st[node] = _State(cur.r + d * (k - 1) * cur.j, cur.j * s, cur.global_via)
        elif _is_global_reduce(node):
            st[node] = _State(cur.r, cur.j, cur.global_via | {f"global pooling ({node.name})"})
        elif node.op == "call_function" and node.target is F.group_norm:
            st[node] = _State(cur.r, cur.j, cur.global_via | {f"group_norm statistics ({node.name})"})
        elif node.op == "call_function" and node.target is F.interpolate:
            sf = _arg(node, 2, "scale_factor", None)
            st[node] = _State(cur.r, cur.j / max(_pair(sf), 1) if isinstance(sf, (int, float)) else cur.j,
                              cur.global_via)
        elif node.op in ("call_function", "call_method") and node.target in (operator.getitem, "size", "dim"):
            if node.target in ("size", "dim"):
                continue
            st[node] = cur
        else:
            st[node] = cur
    return st, variants


def default_stages(model: nn.Module) -> list[str]:
    """Top-level children; a child whose own children are all containers (timm ``blocks``) is expanded."""
    out = []
    for name, child in model.named_children():
        kids = list(child.named_children())
        if kids and all(isinstance(c, (nn.Sequential, nn.ModuleList)) for _, c in kids):
            out += [f"{name}.{k}" for k, _ in kids]
        else:
            out.append(name)
    return out


def _clip(r: float, size: tuple[int, int]) -> int:
    return int(min(r, max(size)))


def theoretical_rf(
    model: nn.Module,
    layer: str | None = None,
    input_size: int | tuple[int, int] = 224,
    *,
    stages: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Theoretical receptive field of ``layer``'s output and of each stage, in input pixels.

    Args:
        model: N×3×H×W -> logits; traced with ``torch.fx`` (not run).
        layer: module path whose output is reported (e.g. "layer4"); None: the model output.
        input_size: H = W or (H, W) of the input, for clipping.
        stages: module paths reported per stage; default :func:`default_stages`.

    Returns:
        {"layer", "input_size": [H, W], "r" (local, conv/pool-only, unclipped), "r_clipped"
        (min(r, max(H, W))), "j" (jump in input pixels), "global": bool, "global_via": [...],
        "label" (e.g. "427 px (local), global via …"), "stages": [{"name", "r", "r_clipped", "j",
        "global_via"}], "variants": [per swapped site: {"site", "variant", "kernel", "stride",
        "dilation", "k_local", "r_in", "j_in", "r_out", "global_via", "note"}], "method": "torch.fx"}.

    Raises:
        ValueError: the model cannot be traced, or ``layer``/a stage is not a module that ran.
    """
    size = (input_size, input_size) if isinstance(input_size, int) else (int(input_size[0]), int(input_size[1]))
    graph = _trace(model)
    st, variants = _propagate(model, graph)
    # the output of module M = the last node (graph order) created inside M's scope that has a state
    last: dict[str, fx.Node] = {}
    for node in graph.nodes:
        if node not in st:
            continue
        scopes = list(node.meta.get("nn_module_stack", {}) or {})
        if node.op == "call_module":
            scopes.append(str(node.target))
        for path in scopes:
            last[path] = node
    out_node = None
    for node in graph.nodes:
        if node.op == "output":
            out_node = node
    final = _combine(_arg_states(out_node, st)) if out_node is not None else None

    def describe(name: str | None) -> dict[str, Any]:
        if name is None:
            s = final
        else:
            if name not in last:
                raise ValueError(
                    f"layer {name!r} is not a module on the traced path; e.g. {default_stages(model)}"
                )
            s = st[last[name]]
        if s is None:
            raise ValueError("the model output does not depend on the input image")
        glob = sorted(s.global_via)
        return {
            "name": name,
            "r": int(round(s.r)),
            "r_clipped": _clip(s.r, size),
            "j": s.j if not float(s.j).is_integer() else int(s.j),
            "global_via": glob,
        }

    main = describe(layer)
    stage_rows = []
    for name in stages if stages is not None else default_stages(model):
        if stages is None and name not in last:
            continue
        stage_rows.append(describe(name))
    label = f"{main['r']} px local" + (f" (clipped to {main['r_clipped']})" if main["r"] > max(size) else "")
    if main["global_via"]:
        label += f"; global (via {_summarise(main['global_via'])})"
    return {
        "layer": layer,
        "input_size": list(size),
        "r": main["r"],
        "r_clipped": main["r_clipped"],
        "j": main["j"],
        "global": bool(main["global_via"]),
        "global_via": main["global_via"],
        "label": label,
        "stages": stage_rows,
        "variants": [v for v in variants if layer is None or _before(v["site"], last.get(layer), graph)],
        "method": "torch.fx",
    }


def _summarise(sources: Sequence[str]) -> str:
    """"SAConv GAP pre/post context (layer1.0.conv2)" ×13 -> "SAConv GAP pre/post context (13 sites)"."""
    counts: dict[str, list[str]] = {}
    for g in sources:
        key = g.rsplit(" (", 1)[0] if g.endswith(")") else g
        counts.setdefault(key, []).append(g)
    return ", ".join(v[0] if len(v) == 1 else f"{k} ({len(v)} sites)" for k, v in counts.items())


def _before(site: str, node: fx.Node | None, graph: fx.Graph) -> bool:
    if node is None:
        return True
    for n in graph.nodes:
        if n.op == "call_module" and n.target == site:
            return True
        if n is node:
            return False
    return False


def rf_from_layers(layers: Sequence[tuple[int, int, int]], input_size: int | None = None) -> dict[str, float]:
    """The recursion on a plain chain of (k, s, d) layers (a reference for tests and docs).

    Returns:
        {"r", "j", "r_clipped"} (r_clipped = r when ``input_size`` is None).
    """
    r, j = 1.0, 1.0
    for k, s, d in layers:
        r += (d * (k - 1)) * j
        j *= s
    return {"r": r, "j": j, "r_clipped": min(r, input_size) if input_size else r}


__all__ = ["default_stages", "rf_from_layers", "theoretical_rf", "variant_rf"]

