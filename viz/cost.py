"""Honest cost of a model: parameters, dispatcher-level FLOPs/MACs, and latency with its settings.

Conventions (``reference/analysis.md`` §4–§5):

- **Params** are Σ numel of parameters (shared tensors once); buffers (BN statistics, SAConv's
  AWS γ/β) are listed separately and never added to the parameter count.
- **FLOPs** come from ``torch.utils.flop_counter.FlopCounterMode`` under ``no_grad`` (forward only).
  It counts at the dispatcher, so both convolutions inside SAConv, all three ACB branches and
  functional ``F.conv2d`` calls are seen (module-hook counters such as thop/ptflops miss them).
  FLOPs = 2 × MACs for conv/matmul; both are reported, labelled. Only conv/matmul/attention have
  formulas: every other aten op that does arithmetic (BN, ReLU, add, pooling, interpolate, ...) is
  listed per module as *uncounted*, and the total is then labelled "conv/matmul only (partial)".
- **Latency** is a separate, unhooked pass under ``torch.inference_mode`` (warm-up first, median and
  IQR of repeats, CUDA-synchronised on GPU); per-layer times come from a second, hooked pass and
  are labelled "includes hook overhead". Every figure carries device, dtype, batch, input size,
  threads, torch version and "median of n".

Nothing here leaves hooks or buffers on a model (no thop): hooks are registered per call and
removed in ``finally``; train/eval flags and thread counts are restored.
"""

from __future__ import annotations

import contextlib
import copy
import platform
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from viz._locks import PROCESS_STATE_LOCK

#: latency defaults for reported numbers (analysis.md §5: warm up with >= 10 iterations, repeat
#: >= 30 times, report the median); interactive callers (the app) pass cheaper values explicitly
DEFAULT_WARMUP = 10
DEFAULT_REPEATS = 30

#: aten ops that move, view or allocate data without arithmetic (never listed as uncounted)
_ZERO_COST_OPS = frozenset(
    {
        "alias", "as_strided", "cat", "chunk", "clone", "contiguous", "copy", "copy_", "detach",
        "empty", "empty_like", "empty_strided", "expand", "fill", "fill_", "flatten", "full",
        "full_like", "index", "index_select", "lift_fresh", "new_empty", "new_empty_strided",
        "new_zeros", "new_ones", "ones", "ones_like", "permute", "reshape", "select", "slice",
        "split", "split_with_sizes", "squeeze", "stack", "t", "transpose", "unbind", "unflatten",
        "unsqueeze", "view", "_reshape_alias", "_to_copy", "to", "zero_", "zeros", "zeros_like",
        "_unsafe_view", "arange", "scalar_tensor",
        "_local_scalar_dense", "item", "constant_pad_nd", "reflection_pad2d", "replication_pad2d",
        "pad", "narrow", "repeat", "roll", "flip", "gather", "scatter", "where", "masked_fill",
    }
)

PARTIAL_LABEL = "conv/matmul only (partial)"
COMPLETE_LABEL = "complete"


# ------------------------------------------------------------------------------------- params


@dataclass(frozen=True)
class ParamReport:
    """Parameter and buffer counts of a model.

    Attributes:
        total: Σ numel of unique parameters.
        total_buffers: Σ numel of unique buffers (not included in ``total``).
        per_module: module path ("" = root) -> {"params": inclusive, "params_exclusive": own
            parameters only, "buffers": inclusive, "buffers_exclusive", "type": class name}.
        buffers: one entry per buffer: {"name", "shape", "numel", "dtype"}.
        model: class name of the root module.
    """

    total: int
    total_buffers: int
    per_module: dict[str, dict[str, Any]]
    buffers: list[dict[str, Any]]
    model: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def count_params(model: nn.Module) -> ParamReport:
    """Exact parameter counts, per module (exclusive and inclusive) and in total.

    Args:
        model: any ``nn.Module`` (not modified).

    Returns:
        ParamReport (counts in number of scalars; buffers listed separately).
    """
    per: dict[str, dict[str, Any]] = {}
    for name, mod in model.named_modules():
        own_p = sum(p.numel() for p in mod.parameters(recurse=False))
        own_b = sum(b.numel() for b in mod.buffers(recurse=False))
        per[name] = {
            "type": type(mod).__name__,
            "params": sum(p.numel() for p in mod.parameters()),
            "params_exclusive": own_p,
            "buffers": sum(b.numel() for b in mod.buffers()),
            "buffers_exclusive": own_b,
        }
    bufs = [
        {"name": n, "shape": list(b.shape), "numel": b.numel(), "dtype": str(b.dtype).replace("torch.", "")}
        for n, b in model.named_buffers()
    ]
    return ParamReport(
        total=sum(p.numel() for p in model.parameters()),
        total_buffers=sum(b.numel() for b in model.buffers()),
        per_module=per,
        buffers=bufs,
        model=type(model).__name__,
    )


def param_deltas(model: nn.Module, reference: nn.Module) -> dict[str, Any]:
    """Per-module parameter deltas of ``model`` against ``reference`` (e.g. variant vs vanilla).

    Args:
        model: the compared model (e.g. a swapped copy).
        reference: the baseline with (mostly) the same module paths.

    Returns:
        {"total": model total, "reference_total", "delta": total − reference_total,
        "per_module": {path: {"params", "reference", "delta"}}} over the union of module paths,
        inclusive counts; a path missing on one side counts 0 there. Only changed paths are listed.
    """
    a, b = count_params(model), count_params(reference)
    per = {}
    for path in list(dict.fromkeys([*b.per_module, *a.per_module])):
        pa = a.per_module.get(path, {}).get("params", 0)
        pb = b.per_module.get(path, {}).get("params", 0)
        if pa != pb:
            per[path] = {"params": pa, "reference": pb, "delta": pa - pb}
    return {"total": a.total, "reference_total": b.total, "delta": a.total - b.total, "per_module": per}


# -------------------------------------------------------------------------------------- FLOPs


def _deform_conv2d_flop(x_shape, w_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
    """FLOPs of torchvision::deform_conv2d: the conv part, 2·N·C_out·H_out·W_out·(C_in/g)·k_h·k_w.

    The bilinear sampling and the modulation mask are not counted (listed in the report notes).
    """
    n, c_out, h, w = out_shape
    return 2 * n * c_out * h * w * w_shape[1] * w_shape[2] * w_shape[3]


def _custom_mapping() -> dict[Any, Any]:
    mapping: dict[Any, Any] = {}
    if "torchvision" not in sys.modules:  # its ops cannot run unless torchvision was imported
        return mapping
    with contextlib.suppress(AttributeError, RuntimeError):  # torchvision ops always registered
        mapping[torch.ops.torchvision.deform_conv2d] = _deform_conv2d_flop
    return mapping


class _UncountedOps(TorchDispatchMode):
    """Records, per innermost module, the aten ops that ran without a FLOP formula.

    Entered *before* (below) the FlopCounterMode, so it sees exactly the ops that the counter
    executes after its own decompositions, and reads the counter's module tracker.
    """

    def __init__(self, counter: FlopCounterMode) -> None:
        super().__init__()
        self.counter = counter
        self.ops: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.numel: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = getattr(func, "_overloadpacket", None)
        if packet is None or packet in self.counter.flop_registry:
            return out
        if getattr(func, "namespace", "aten") not in ("aten", "torchvision"):
            return out
        base = packet.__name__
        if base in _ZERO_COST_OPS or base.rstrip("_") in _ZERO_COST_OPS or base.startswith(("sym_", "is_")):
            return out
        if func in _IGNORED_FUNCS:
            return out
        parents = self.counter.mod_tracker.parents
        inner = max(parents, key=lambda p: (p != "Global", p.count("."), len(p)))
        name = f"{func.namespace}.{base}"
        self.ops[inner][name] += 1
        if isinstance(out, torch.Tensor):
            self.numel[inner] += out.numel()
        return out


_IGNORED_FUNCS = {
    torch.ops.aten.size.default,
    torch.ops.aten.stride.default,
    torch.ops.aten.numel.default,
    torch.ops.aten.dim.default,
}


@dataclass(frozen=True)
class FlopReport:
    """Forward FLOPs of one model at one input, counted at the dispatcher.

    Attributes:
        total_flops: FlopCounterMode total (2 per MAC for conv/matmul).
        total_macs: total_flops / 2.
        per_module: module path ("" = root) -> {"type", "flops" (inclusive), "flops_exclusive",
            "macs", "macs_exclusive", "by_op": {aten op: inclusive FLOPs}}; modules that ran.
        uncounted: module path -> {aten op: number of calls} of ops without a FLOP formula
            (attributed to the innermost running module).
        complete: True when no arithmetic op went uncounted.
        status: "complete" or "conv/matmul only (partial)".
        elementwise_estimate: Σ output numel of the uncounted ops: an *estimate* of their
            element-wise work (one op per output element), not added to the totals.
        input_shape: shape of the input (N×3×H×W).
        notes: plain-language caveats.
    """

    total_flops: int
    total_macs: float
    per_module: dict[str, dict[str, Any]]
    uncounted: dict[str, dict[str, int]]
    complete: bool
    status: str
    elementwise_estimate: int
    input_shape: list[int]
    notes: list[str] = field(default_factory=list)
    units: str = "FLOPs = 2 x MACs (one MAC = one multiply-accumulate)"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def _strip_root(key: str) -> str:
    return key.partition(".")[2] if "." in key else ""


def count_flops(model: nn.Module, x: torch.Tensor) -> FlopReport:
    """Forward FLOPs/MACs of ``model(x)`` via ``FlopCounterMode(display=False, depth=None)``.

    Runs one forward under ``torch.no_grad()`` (backward is never counted). The model's
    train/eval flags are not touched; run it serialised with other forwards on the same model.
    Module tracking uses process-wide hooks, so the counting holds
    :data:`viz._locks.PROCESS_STATE_LOCK` (take a model lock first, if any, then this one).

    Args:
        model: N×3×H×W -> anything.
        x: input batch on the model's device.

    Returns:
        FlopReport: total, per-module inclusive and exclusive counts, uncounted ops.
    """
    fc = FlopCounterMode(display=False, depth=None, custom_mapping=_custom_mapping())
    rec = _UncountedOps(fc)
    # FlopCounterMode's module tracker uses process-wide module hooks: one counting at a time
    with PROCESS_STATE_LOCK, torch.no_grad(), rec, fc:
        model(x)
    raw = fc.get_flop_counts()
    total = int(fc.get_total_flops())
    types = {n: type(m).__name__ for n, m in model.named_modules()}
    incl: dict[str, dict[str, int]] = {}
    for key, ops in raw.items():
        if key == "Global":
            continue
        incl[_strip_root(key)] = {str(op): int(v) for op, v in ops.items()}
    # exclusive = inclusive − Σ inclusive of the nearest descendants that were tracked
    excl = {k: sum(v.values()) for k, v in incl.items()}
    for k in incl:
        if k == "":
            continue
        parts = k.split(".")
        for i in range(len(parts) - 1, -1, -1):
            anc = ".".join(parts[:i])
            if anc in incl:
                excl[anc] -= sum(incl[k].values())
                break
    per = {}
    for k in sorted(incl, key=lambda s: list(types).index(s) if s in types else len(types)):
        f_in = sum(incl[k].values())
        per[k] = {
            "type": types.get(k, "?"),
            "flops": f_in,
            "flops_exclusive": excl[k],
            "macs": f_in / 2,
            "macs_exclusive": excl[k] / 2,
            "by_op": incl[k],
        }
    uncounted = {("" if k == "Global" else _strip_root(k)): dict(v) for k, v in rec.ops.items()}
    notes = []
    if any("torchvision.deform_conv2d" in ops for ops in per_ops(per)):
        notes.append("deform_conv2d counted as its convolution only (bilinear sampling not counted)")
    complete = not uncounted
    if not complete:
        notes.append(
            "only convolution/matmul/attention have FLOP formulas; element-wise ops, normalisation, "
            "pooling and interpolation are listed as uncounted"
        )
    return FlopReport(
        total_flops=total,
        total_macs=total / 2,
        per_module=per,
        uncounted=uncounted,
        complete=complete,
        status=COMPLETE_LABEL if complete else PARTIAL_LABEL,
        elementwise_estimate=int(sum(rec.numel.values())),
        input_shape=list(x.shape),
        notes=notes,
    )


def per_ops(per: dict[str, dict[str, Any]]) -> list[dict[str, int]]:
    """The ``by_op`` dicts of a FlopReport's ``per_module`` (helper for notes)."""
    return [v["by_op"] for v in per.values()]


# ------------------------------------------------------------------------------------ latency


def latency_units(model: nn.Module) -> list[str]:
    """Module paths that partition ``model`` for per-layer timing (no module counted twice).

    The root is expanded into its children; containers (``nn.Sequential``, ``nn.ModuleList``,
    ``nn.ModuleDict``) are expanded recursively, so a torchvision ResNet gives ``conv1, bn1, relu,
    maxpool, layer1.0, …, layer4.2, avgpool, fc`` and a timm EfficientNet its stem, every block
    and its head. A root with a single non-container child (a wrapper) is descended into.

    Returns:
        Module paths in registration order; no path is an ancestor of another.
    """
    prefix = ""
    root = model
    while True:
        kids = list(root.named_children())
        if len(kids) == 1 and not isinstance(kids[0][1], (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            if not list(kids[0][1].children()):
                break
            prefix = f"{prefix}{kids[0][0]}."
            root = kids[0][1]
            continue
        break
    out: list[str] = []

    def walk(mod: nn.Module, path: str) -> None:
        for name, child in mod.named_children():
            p = f"{path}{name}"
            if isinstance(child, (nn.Sequential, nn.ModuleList, nn.ModuleDict)) and len(child):
                walk(child, p + ".")
            else:
                out.append(p)

    walk(root, prefix)
    return out or [""]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def device_label(device: torch.device) -> str:
    """Human-readable device: CPU model name, or the GPU name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_name()


def _quantiles(v: Sequence[float]) -> tuple[float, float, float]:
    if len(v) == 1:
        return v[0], v[0], v[0]
    q = statistics.quantiles(v, n=4, method="inclusive")
    return q[0], statistics.median(v), q[2]


@dataclass(frozen=True)
class LatencyReport:
    """Latency of one model at one input.

    Attributes:
        median_ms, q1_ms, q3_ms, iqr_ms: whole-model forward time from the unhooked pass (ms).
        times_ms: every repeat of the unhooked pass (ms).
        per_layer: [{"name", "type", "median_ms", "iqr_ms", "calls"}] from the hooked pass, in
            execution order; the names partition the model (see :func:`latency_units`).
        per_layer_sum_ms: Σ of the per-layer medians (compare with ``median_ms``).
        hooked_total_ms: median wall time of the hooked pass (hook overhead included).
        labels: device, device_type, dtype, batch, input_size, threads, torch, memory_format,
            repeats, warmup, form, statistic ("median of n").
        per_layer_note: "includes hook overhead".
    """

    median_ms: float
    q1_ms: float
    q3_ms: float
    iqr_ms: float
    times_ms: list[float]
    per_layer: list[dict[str, Any]]
    per_layer_sum_ms: float | None
    hooked_total_ms: float | None
    labels: dict[str, Any]
    per_layer_note: str = "per-layer times from forward pre/post hooks: includes hook overhead"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    def label(self) -> str:
        """One line describing the measurement settings."""
        lb = self.labels
        return (
            f"{lb['device']} · {lb['dtype']} · batch {lb['batch']} · {lb['input_size']} · "
            f"{lb['threads']} threads · torch {lb['torch']} · {lb['statistic']}"
        )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(
    model: nn.Module,
    x: torch.Tensor,
    *,
    warmup: int = DEFAULT_WARMUP,
    repeats: int = DEFAULT_REPEATS,
    per_layer: bool = True,
    threads: int | None = None,
    layers: Sequence[str] | None = None,
    form: str | None = None,
) -> LatencyReport:
    """Time ``model(x)``: an unhooked whole-model pass, then (optionally) a hooked per-layer pass.

    Args:
        model: the model (run in eval mode; its flags are restored afterwards). Hold the
            model's lock while calling, so no other request runs meanwhile.
        x: input batch (N×3×H×W) on the model's device; its dtype/memory format are labelled.
        warmup: untimed iterations before each pass (lazy init, oneDNN/cuDNN setup); default
            ``DEFAULT_WARMUP`` = 10 (analysis.md §5). The app passes a smaller value.
        repeats: timed iterations per pass (median and IQR reported); default
            ``DEFAULT_REPEATS`` = 30.
        per_layer: also run the hooked pass for per-layer times.
        threads: CPU threads for the measurement (``torch.set_num_threads``, restored after);
            None keeps the current setting. Always labelled.
        layers: module paths to time (must not nest); default :func:`latency_units`.
        form: optional label, e.g. "train" / "deploy" for ACB.

    Returns:
        LatencyReport (milliseconds).

    Raises:
        ValueError: repeats < 1, warmup < 0, threads < 1, or nested/unknown ``layers``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    modules = dict(model.named_modules())
    units = list(layers) if layers is not None else latency_units(model)
    unknown = [u for u in units if u not in modules]
    if unknown:
        raise ValueError(f"unknown layers {unknown}; e.g. {list(modules)[1:6]}")
    for u in units:
        for v in units:
            if u != v and (u == "" or v.startswith(u + ".")):
                raise ValueError(f"layers must not nest: {u!r} contains {v!r}")
    device = x.device
    old_threads = torch.get_num_threads()
    modes = {n: m.training for n, m in modules.items()}
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        model.eval()
        with torch.inference_mode():
            for _ in range(warmup):
                model(x)
            _sync(device)
            times = []
            for _ in range(repeats):
                _sync(device)
                t0 = time.perf_counter()
                model(x)
                _sync(device)
                times.append((time.perf_counter() - t0) * 1e3)
            per: list[dict[str, Any]] = []
            per_sum = hooked_total = None
            if per_layer:
                per, hooked_total = _per_layer_pass(model, x, units, modules, warmup=max(1, warmup), repeats=repeats)
                per_sum = float(sum(p["median_ms"] for p in per))
        n_threads = torch.get_num_threads()
    finally:
        if threads is not None:
            torch.set_num_threads(old_threads)
        for n, m in modules.items():
            m.training = modes[n]
    q1, med, q3 = _quantiles(times)
    labels = {
        "device": device_label(device),
        "device_type": device.type,
        "dtype": str(x.dtype).replace("torch.", ""),
        "batch": int(x.shape[0]),
        "input_size": "×".join(str(int(s)) for s in x.shape[2:]) if x.dim() >= 3 else str(list(x.shape)),
        "threads": n_threads,
        "torch": torch.__version__,
        "memory_format": "channels_last"
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        else "contiguous",
        "repeats": repeats,
        "warmup": warmup,
        "form": form,
        "statistic": f"median of {repeats}",
        "timer": "CUDA synchronize + perf_counter" if device.type == "cuda" else "perf_counter",
    }
    return LatencyReport(
        median_ms=med,
        q1_ms=q1,
        q3_ms=q3,
        iqr_ms=q3 - q1,
        times_ms=times,
        per_layer=per,
        per_layer_sum_ms=per_sum,
        hooked_total_ms=hooked_total,
        labels=labels,
    )


def _per_layer_pass(
    model: nn.Module,
    x: torch.Tensor,
    units: Sequence[str],
    modules: dict[str, nn.Module],
    *,
    warmup: int,
    repeats: int,
) -> tuple[list[dict[str, Any]], float]:
    """Hooked pass: per-unit elapsed time per repeat (perf_counter on CPU, CUDA events on GPU)."""
    cuda = x.device.type == "cuda"
    order: list[str] = []
    calls: dict[str, int] = defaultdict(int)
    starts: dict[str, list[Any]] = defaultdict(list)
    pending: list[tuple[str, Any, Any]] = []  # CUDA: (name, start event, end event)
    acc: dict[str, float] = defaultdict(float)

    def pre(name: str):
        def hook(mod: nn.Module, args: Any) -> None:
            if cuda:
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                starts[name].append(ev)
            else:
                starts[name].append(time.perf_counter())

        return hook

    def post(name: str):
        def hook(mod: nn.Module, args: Any, out: Any) -> None:
            t0 = starts[name].pop()
            if cuda:
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                pending.append((name, t0, ev))
            else:
                acc[name] += (time.perf_counter() - t0) * 1e3
            calls[name] += 1
            if name not in order:
                order.append(name)

        return hook

    handles = []
    samples: dict[str, list[float]] = defaultdict(list)
    totals: list[float] = []
    try:
        for u in units:
            m = modules[u]
            handles.append(m.register_forward_pre_hook(pre(u)))
            handles.append(m.register_forward_hook(post(u)))
        for _ in range(warmup):
            model(x)
        _sync(x.device)
        for _ in range(repeats):
            acc.clear()
            pending.clear()
            calls.clear()
            _sync(x.device)
            t0 = time.perf_counter()
            model(x)
            _sync(x.device)
            totals.append((time.perf_counter() - t0) * 1e3)
            for name, a, b in pending:
                acc[name] += a.elapsed_time(b)
            for name in order:
                samples[name].append(acc.get(name, 0.0))
    finally:
        for h in handles:
            h.remove()
    per = []
    for name in order:
        q1, med, q3 = _quantiles(samples[name])
        per.append(
            {
                "name": name,
                "type": type(modules[name]).__name__,
                "median_ms": med,
                "iqr_ms": q3 - q1,
                "calls": calls.get(name, 0),
            }
        )
    return per, statistics.median(totals)


# ------------------------------------------------------------------------------------ profile


def _fusable(model: nn.Module) -> bool:
    try:
        from plugconv.base import ConvVariant
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(m, ConvVariant) and type(m).fuse is not ConvVariant.fuse for m in model.modules())


def _unit_of(path: str, units: Sequence[str]) -> str | None:
    for u in units:
        if u == "" or path == u or path.startswith(u + "."):
            return u
    return None


def _per_unit(units: Sequence[str], params: ParamReport, flops: FlopReport) -> list[dict[str, Any]]:
    rows = []
    for u in units:
        p = params.per_module.get(u, {})
        f = flops.per_module.get(u, {})
        rows.append(
            {
                "name": u,
                "type": p.get("type", "?"),
                "params": p.get("params", 0),
                "flops": f.get("flops", 0),
                "macs": f.get("macs", 0.0),
                "uncounted_ops": sorted(
                    {op for path, ops in flops.uncounted.items() if _unit_of(path, [u]) for op in ops}
                ),
            }
        )
    return rows


def profile_model(
    model: nn.Module,
    input_size: int | tuple[int, int],
    *,
    device: str | torch.device = "cpu",
    batch: int = 1,
    dtype: torch.dtype = torch.float32,
    warmup: int = DEFAULT_WARMUP,
    repeats: int = DEFAULT_REPEATS,
    per_layer: bool = True,
    threads: int | None = None,
    latency: bool = True,
    deploy: bool = True,
    reference: nn.Module | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Params, FLOPs and latency of ``model`` in one JSON-ready dict (``python -m viz profile``).

    Args:
        model: N×3×H×W -> logits. Used as is when already on ``device``/``dtype``; otherwise a
            copy is moved there (the caller's model is never moved).
        input_size: H = W, or (H, W), of the random input.
        device: "cpu", "cuda", "cuda:0", ... or a torch.device.
        batch: N of the input.
        dtype: input/model dtype (labelled).
        warmup, repeats, per_layer, threads: see :func:`measure_latency`.
        latency: set False to skip timing (params and FLOPs only).
        deploy: when the model holds re-parameterisable variants (ACB), also profile the
            deploy form ``plugconv.fuse_model(model)`` under ``"deploy"``.
        reference: optional baseline for per-module parameter deltas.
        seed: seed of the random input.

    Returns:
        {"model", "input": {"shape", "dtype", "device"}, "params": ParamReport dict,
        "flops": FlopReport dict, "latency": LatencyReport dict or None (its "median_ms" is the
        whole model, unhooked, beside "per_layer_sum_ms", the Σ of the per-unit medians of the
        hooked pass, and "hooked_total_ms"; the last two None without ``per_layer``), "units": per-unit rows
        {"name", "type", "params", "flops", "macs", "latency_ms", "uncounted_ops"} on the
        latency partition, "param_deltas" (if reference), "deploy" (same keys, or None),
        "form": "train" | None}.
    """
    dev = torch.device(device)
    if isinstance(input_size, int):
        hw = (input_size, input_size)
    else:
        hw = (int(input_size[0]), int(input_size[1]))
    ref = next(iter(model.parameters()), None)
    if ref is not None and (ref.device != dev or ref.dtype != dtype):
        model = copy.deepcopy(model).to(device=dev, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, *hw, generator=g, dtype=torch.float32).to(device=dev, dtype=dtype)
    fusable = _fusable(model)
    out = _profile_one(model, x, warmup=warmup, repeats=repeats, per_layer=per_layer, threads=threads,
                       latency=latency, form="train" if fusable else None)
    out["input"] = {"shape": list(x.shape), "dtype": str(dtype).replace("torch.", ""), "device": str(dev)}
    if reference is not None:
        out["param_deltas"] = param_deltas(model, reference)
    out["deploy"] = None
    if deploy and fusable:
        from plugconv.surgery import fuse_model

        fused = fuse_model(model)
        out["deploy"] = _profile_one(fused, x, warmup=warmup, repeats=repeats, per_layer=per_layer,
                                     threads=threads, latency=latency, form="deploy")
    return out


def _profile_one(
    model: nn.Module,
    x: torch.Tensor,
    *,
    warmup: int,
    repeats: int,
    per_layer: bool,
    threads: int | None,
    latency: bool,
    form: str | None,
) -> dict[str, Any]:
    params = count_params(model)
    flops = count_flops(model, x)
    units = latency_units(model)
    lat = (
        measure_latency(model, x, warmup=warmup, repeats=repeats, per_layer=per_layer, threads=threads, form=form)
        if latency
        else None
    )
    rows = _per_unit(units, params, flops)
    if lat is not None:
        by_name = {p["name"]: p["median_ms"] for p in lat.per_layer}
        for r in rows:
            r["latency_ms"] = by_name.get(r["name"])
    return {
        "model": type(model).__name__,
        "form": form,
        "params": params.to_dict(),
        "flops": flops.to_dict(),
        "latency": lat.to_dict() if lat is not None else None,
        "units": rows,
    }
