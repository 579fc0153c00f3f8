"""``analyze()``: one recorded pass per model, then ERF, redundancy and the (cached) cost profile.

For each model: ONE instrumented forward over the batch of images (the input requiring grad when
the ERF is asked for) gives the predictions, the taps and the activations for redundancy; on that
one graph, ``Recorder.finish`` takes the effective receptive field's input gradient
(``autograd.grad`` of Σ_c ReLU(F[:, :, h//2, w//2]) at the ERF stage, a recorded layer, with
``retain_graph=True``; analysis.md §2.1) and then ONE ``autograd.grad`` of the class score for
Grad-CAM at every chosen layer. So: one forward and two ``autograd.grad`` calls per model with the
ERF, one of each without. The cost profile is a separate unhooked pass (image-independent, cached
per model, device and input size), as are the ACB fusion check (cached per model and input) and
the theoretical receptive field (cached per model, layer and input size). Everything returned is
raw (CPU tensors / numpy); figures normalise for display only.
"""

from __future__ import annotations

import copy
import hashlib
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from viz.errors import is_out_of_memory
from viz.gradcam import CamMap, cam_from_record, summarize
from viz.models import ModelEntry, default_layers, stage_names
from viz.recorder import Record, Recorder
from viz.taps import TapSummary, acb_fuse_difference, summarize_taps

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from plugconv.backbones import Backbone
    from viz.erf import ErfResult

Progress = Callable[[float, str], None]


@dataclass
class ModelResult:
    """Everything analysed for one model.

    Attributes:
        label, variant: from the ``ModelEntry``.
        swap: ``SwapResult.to_dict()`` (swapped / skipped with reasons / provenance / exact).
        record: the raw :class:`viz.recorder.Record` (logits, activations, gradients, taps).
        cams: layer -> :class:`viz.gradcam.CamMap` (raw signed maps at layer resolution).
        taps: tap summaries (:class:`viz.taps.TapSummary`) in forward order.
        topk: per image, ``[(label, prob), ...]`` (softmax of the logits).
        redundancy: layer -> ``viz.redundancy.redundancy_metrics`` dict (or ``{"error": ...}``).
        erf: :class:`viz.erf.ErfResult` or None.
        theoretical_rf: ``viz.rf.theoretical_rf`` dict at the ERF layer, or None.
        cost: the ``viz.cost.profile_model`` dict (params / FLOPs / latency, per unit; ``"deploy"``
            for ACB) or None; see :func:`cost_summary`.
        timings: seconds per phase (record, backward, erf, profile, render).
        errors: phase -> message for optional phases that failed (never raised).
        extra: other numbers, e.g. ``fuse_max_abs_diff`` (ACB: max |logits(train form) −
            logits(deploy form)|).
    """

    label: str
    variant: str
    swap: dict[str, Any]
    record: Record
    cams: dict[str, CamMap]
    taps: list[TapSummary]
    topk: list[list[tuple[str, float]]]
    redundancy: dict[str, dict] = field(default_factory=dict)
    erf: ErfResult | None = None
    theoretical_rf: dict | None = None
    cost: dict | None = None
    timings: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Analysis:
    """Result of :func:`analyze`: raw data for figures plus ``to_dict()`` for report.json.

    Attributes:
        backbone: backbone name.
        weights: backbone weight provenance (``WeightsInfo.to_dict()``).
        device: device string the passes ran on.
        input_size: H = W of the analysis crop.
        images: the S×S RGB crops the models saw (PIL), for overlays.
        layers: the Grad-CAM / redundancy layers (module paths, stage outputs by default).
        targets: the class index per image every model's Grad-CAM explains.
        target_rule: how ``targets`` were chosen.
        categories: class names.
        models: one :class:`ModelResult` per entry, in order.
        cka: layer -> {label: CKA(first model, that model)} over positions.
        erf_layer: the stage whose ERF was computed.
        timings: global phases (load).
        files: figure/file paths filled in by ``viz.report.write_report`` (key -> relative path).
    """

    backbone: str
    weights: dict[str, Any]
    device: str
    input_size: int
    images: list[Image.Image]
    layers: list[str]
    targets: tuple[int, ...]
    target_rule: str
    categories: tuple[str, ...]
    models: list[ModelResult]
    cka: dict[str, dict[str, float]] = field(default_factory=dict)
    erf_layer: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    def label_of(self, cls: int) -> str:
        """Category name of class ``cls`` (or ``"class N"``)."""
        return self.categories[cls] if 0 <= cls < len(self.categories) else f"class {cls}"

    def to_dict(self) -> dict[str, Any]:
        """The report.json structure (see the module docstring of ``viz.report``)."""
        models = []
        for m in self.models:
            d: dict[str, Any] = {
                "label": m.label,
                "variant": m.variant,
                "swapped": list(m.swap.get("swapped", [])),
                "skipped": list(m.swap.get("skipped", [])),
                "exact": m.swap.get("exact"),
                "provenance": dict(m.swap.get("provenance", {})),
                "top5": [{"label": lbl, "prob": p} for lbl, p in (m.topk[0] if m.topk else [])],
                "top5_per_image": [[{"label": lbl, "prob": p} for lbl, p in t] for t in m.topk],
                "params": None, "flops": None, "macs": None, "latency_ms": None,
                "latency_per_layer_sum_ms": None, "latency_hooked_total_ms": None,
                "layers": [],
                "gradcam": [],
                "taps": [],
                "erf": None,
                "theoretical_rf": _jsonable(m.theoretical_rf),
                "timings": {k: round(v, 4) for k, v in {"load": self.timings.get("load", 0.0), **m.timings}.items()},
                "errors": dict(m.errors),
                "notes": list(m.record.notes),
                "extra": _jsonable(m.extra),
            }
            cost = cost_summary(m.cost, self.layers)
            for k in ("params", "flops", "macs", "latency_ms", "latency_iqr_ms", "latency_per_layer_sum_ms",
                      "latency_hooked_total_ms", "flops_status", "flops_units"):
                d[k] = _jsonable(cost.get(k))
            d["latency_labels"] = _jsonable(cost.get("latency_labels"))
            if m.cost and m.cost.get("deploy"):
                dep = cost_summary(m.cost["deploy"])
                d["deploy"] = {k: _jsonable(dep.get(k)) for k in ("params", "flops", "macs", "latency_ms")}
            per_layer = cost.get("layers", {}) or {}
            for layer in self.layers:
                row = {"name": layer}
                c = per_layer.get(layer, {})
                row.update({k: c.get(k) for k in ("params", "flops", "latency_ms")})
                red = m.redundancy.get(layer)
                row["redundancy"] = _jsonable({k: v for k, v in red.items() if k != "similarity"} if red else red)
                d["layers"].append(row)
            for layer, cam in m.cams.items():
                s = summarize(cam)
                s["png"] = self.files.get(f"gradcam/{m.label}/{layer}")
                d["gradcam"].append(s)
            for t in m.taps:
                td = t.to_dict()
                td["png"] = self.files.get(f"tap/{m.label}/{t.name}")
                d["taps"].append(td)
            if m.erf is not None:
                d["erf"] = m.erf.to_dict()
                d["erf"]["png"] = self.files.get(f"erf/{m.label}")
            models.append(d)
        return {
            "backbone": self.backbone,
            "weights": self.weights,
            "device": self.device,
            "input_size": self.input_size,
            "n_images": len(self.images),
            "layers": list(self.layers),
            "target": {
                "classes": list(self.targets),
                "labels": [self.label_of(c) for c in self.targets],
                "rule": self.target_rule,
                "score": "pre-softmax logit",
            },
            "erf_layer": self.erf_layer,
            "cka": _jsonable(self.cka),
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "models": models,
            "figures": {k: v for k, v in self.files.items() if k.startswith("figure/")},
        }


def _jsonable(x: Any) -> Any:
    """Plain JSON types (numpy / torch scalars and arrays converted, tuples -> lists, NaN -> None)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist() if x.dim() else x.item())
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    if isinstance(x, float):
        return None if (x != x or x in (float("inf"), float("-inf"))) else x
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if hasattr(x, "to_dict"):
        return _jsonable(x.to_dict())
    return str(x)


# --- cost cache -------------------------------------------------------------------------------
_COST_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, int, bool], dict]] = weakref.WeakKeyDictionary()


_RED_POOL: ThreadPoolExecutor | None = None
_RED_POOL_GUARD = threading.Lock()


def layer_redundancy(acts: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """``viz.redundancy.redundancy_metrics`` of each layer's activations, two layers at a time.

    The metrics run in NumPy with one BLAS thread (torch's OpenMP workers make a threaded BLAS
    stall), so one layer keeps one core busy; two worker threads use both cores of a small machine.
    The largest layers start first. Results are identical to a sequential loop (each layer's
    computation is independent and deterministic). The first failure is raised.
    """
    from viz.redundancy import redundancy_metrics, threadpool_limits

    global _RED_POOL
    if len(acts) < 2:
        return {k: redundancy_metrics(v, pair_dtype=torch.float32) for k, v in acts.items()}
    with _RED_POOL_GUARD:
        if _RED_POOL is None:
            _RED_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="plugconv-redundancy")
    order = sorted(acts, key=lambda k: -acts[k].numel() * acts[k].shape[1] if acts[k].dim() > 1 else 0)
    # one BLAS limit held around the whole block: the workers' own (nested) limits then restore 1,
    # never a value another worker set
    with threadpool_limits(1, user_api="blas"):
        futures = {k: _RED_POOL.submit(redundancy_metrics, acts[k], pair_dtype=torch.float32) for k in order}
        return {k: futures[k].result() for k in acts}


def cached_profile(
    model: nn.Module,
    input_size: int,
    *,
    device: str | torch.device = "cpu",
    latency: bool = True,
    cache: bool = True,
    **kwargs: Any,
) -> dict[str, Any]:
    """``viz.cost.profile_model`` (params, dispatcher FLOPs, latency from a separate unhooked pass),
    cached per (model, device, input size, latency on/off) for as long as the model lives.

    Cost is image-independent, so repeated analyses of the same prepared model never re-profile.
    Hold the model's lock while calling (latency and FLOP counting must not overlap other passes).
    """
    from viz.cost import DEFAULT_REPEATS, DEFAULT_WARMUP

    # latency depends on how it was timed: repeats and warm-up are part of the key (and whether
    # the deploy form of re-parameterisable variants was profiled too)
    key = (str(torch.device(device)), int(input_size), bool(latency), bool(kwargs.get("deploy", True))) + (
        (int(kwargs.get("repeats", DEFAULT_REPEATS)), int(kwargs.get("warmup", DEFAULT_WARMUP))) if latency else ())
    if cache:
        hit = _COST_CACHE.get(model, {}).get(key)
        if hit is not None:
            return hit
    from viz.cost import profile_model

    out = profile_model(model, int(input_size), device=device, latency=latency, **kwargs)
    if cache:
        _COST_CACHE.setdefault(model, {})[key] = out
    return out


def cost_summary(profile: dict[str, Any] | None, layers: Sequence[str] = ()) -> dict[str, Any]:
    """Whole-model and per-layer numbers from a ``viz.cost.profile_model`` dict.

    Returns:
        ``{"params", "flops", "macs", "latency_ms", "flops_status", "latency_label",
        "layers": {name: {"params", "flops", "latency_ms"}}}``; per-layer latency is the sum of
        the hooked per-unit medians inside that layer (includes hook overhead).
    """
    if not profile:
        return {"params": None, "flops": None, "macs": None, "latency_ms": None, "layers": {}}
    params = profile.get("params") or {}
    flops = profile.get("flops") or {}
    lat = profile.get("latency") or None
    pm, fm = params.get("per_module", {}), flops.get("per_module", {})
    units = profile.get("units") or []
    out: dict[str, Any] = {
        "params": params.get("total"),
        "flops": flops.get("total_flops"),
        "macs": flops.get("total_macs"),
        "flops_status": flops.get("status"),
        "flops_units": flops.get("units"),
        "latency_ms": lat.get("median_ms") if lat else None,
        "latency_iqr_ms": lat.get("iqr_ms") if lat else None,
        "latency_labels": lat.get("labels") if lat else None,
        "latency_per_layer_sum_ms": lat.get("per_layer_sum_ms") if lat else None,
        "latency_hooked_total_ms": lat.get("hooked_total_ms") if lat else None,
        "layers": {},
    }
    for layer in layers:
        ms = [u.get("latency_ms") for u in units if u.get("name") == layer or str(u.get("name", "")).startswith(layer + ".")]
        ms = [v for v in ms if v is not None]
        out["layers"][layer] = {
            "params": pm.get(layer, {}).get("params"),
            "flops": fm.get(layer, {}).get("flops"),
            "latency_ms": float(sum(ms)) if ms else None,
        }
    return out


_FUSED: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


def _fusable(model: nn.Module) -> bool:
    from plugconv.base import ConvVariant

    return any(isinstance(m, ConvVariant) and type(m).fuse is not ConvVariant.fuse for m in model.modules())


def _fused(model: nn.Module) -> nn.Module:
    """The deploy form of ``model`` (``plugconv.fuse_model``), made once per model and cached."""
    f = _FUSED.get(model)
    if f is None:
        from plugconv.surgery import fuse_model

        f = fuse_model(model)
        _FUSED[model] = f
    return f


#: per model: input digest -> max |logits − fused(x)| (a few recent inputs; see cached_fuse_difference)
_FUSE_DIFF: weakref.WeakKeyDictionary[nn.Module, dict[bytes, float]] = weakref.WeakKeyDictionary()
_FUSE_DIFF_KEEP = 8
#: per model: (layer, input size) -> viz.rf.theoretical_rf dict, or the exception it raised
_RF_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str | None, int], Any]] = weakref.WeakKeyDictionary()


def _digest(x: torch.Tensor) -> bytes:
    """A content key of a tensor (dtype, shape and bytes; BLAKE2b-128)."""
    t = x.detach().to("cpu").contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.digest()


def cached_fuse_difference(model: nn.Module, logits: torch.Tensor, x: torch.Tensor) -> float:
    """:func:`viz.taps.acb_fuse_difference` of ``model``'s deploy form (:func:`_fused`) on ``x``,
    cached per model (weakly, for as long as it lives) and input content.

    The value depends only on the (frozen) model and ``x`` — ``logits`` are the recorded logits of
    the same model on the same ``x`` — so a repeated analysis of the same image skips the fused
    forward and reports the identical number; a new image is checked afresh. The last
    ``_FUSE_DIFF_KEEP`` inputs per model are kept. Hold the model's lock while calling.
    """
    key = _digest(x)
    per = _FUSE_DIFF.setdefault(model, {})
    hit = per.get(key)
    if hit is not None:
        return hit
    val = acb_fuse_difference(logits, _fused(model), x)
    per[key] = val
    while len(per) > _FUSE_DIFF_KEEP:
        del per[next(iter(per))]
    return val


def cached_theoretical_rf(model: nn.Module, layer: str | None, input_size: int) -> dict[str, Any]:
    """``viz.rf.theoretical_rf(model, layer, input_size)``, computed once per model (weakly keyed),
    layer and input size — it is image-independent (an FX trace, 0.02–0.2 s for ResNet-50).

    Returns a deep copy, so callers may modify it. A failure is cached too and re-raised.
    """
    key = (layer, int(input_size))
    per = _RF_CACHE.setdefault(model, {})
    if key not in per:
        from viz.rf import theoretical_rf

        try:
            per[key] = theoretical_rf(model, layer, int(input_size))
        except Exception as e:  # cached: the trace fails the same way every time
            per[key] = e
    hit = per[key]
    if isinstance(hit, Exception):
        raise hit
    return copy.deepcopy(hit)


# --- the pass ---------------------------------------------------------------------------------
def prepare_inputs(images: Sequence[Image.Image], backbone: Backbone) -> tuple[torch.Tensor, list[Image.Image]]:
    """N×3×S×S normalised batch on the backbone's device and the S×S crops the model sees."""
    if not images:
        raise ValueError("analyze() needs at least one image")
    xs, crops = [], []
    for im in images:
        x, crop = backbone.prepare_input(im)
        xs.append(x)
        crops.append(crop)
    return torch.cat(xs, 0), crops


def _topk(logits: torch.Tensor, categories: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
    probs = logits.double().softmax(-1)
    k = min(k, probs.shape[-1])
    vals, idx = probs.topk(k, dim=-1)
    out = []
    for v, i in zip(vals.tolist(), idx.tolist()):
        out.append([(categories[j] if j < len(categories) else f"class {j}", float(p)) for p, j in zip(v, i)])
    return out


def _resolve_layers(model: nn.Module, backbone_name: str, layers: Sequence[str] | None) -> list[str]:
    if layers:
        return list(layers)
    names = dict(model.named_modules())
    st = [s for s in stage_names(backbone_name) if s in names]
    return st or default_layers(model)


def analyze(
    images: Sequence[Image.Image],
    backbone: Backbone,
    entries: Sequence[ModelEntry],
    *,
    layers: Sequence[str] | None = None,
    target: int | None = None,
    topk: int = 5,
    erf: bool = True,
    redundancy: bool = True,
    profile: bool = True,
    progress: Progress | None = None,
    erf_layer: str | None = None,
    latency: bool = True,
    latency_repeats: int | None = None,
    latency_warmup: int | None = None,
) -> Analysis:
    """Analyse ``images`` with every model in ``entries``.

    Args:
        images: RGB PIL images (any size; ``backbone.prepare_input`` resizes/crops them).
        backbone: the ``Backbone`` the entries were prepared from (preprocessing, categories).
        entries: prepared models (:func:`viz.models.prepare_model`); the first is the reference
            for CKA and, when ``target`` is None, for the explained class.
        layers: module paths for Grad-CAM and redundancy (default: the stage outputs, e.g.
            ResNet ``layer1..4``, EfficientNet ``blocks.0..6``).
        target: class explained by every Grad-CAM (pre-softmax logit); None = per image, the
            first model's top-1 class (so all models explain the same class).
        topk: predictions kept per image and model.
        erf: compute the effective receptive field at ``erf_layer`` (default: the last layer).
        redundancy: redundancy metrics per layer and CKA (first model vs each) per layer.
        profile: params / FLOPs / latency (cached per model, device, input size).
        progress: ``progress(fraction in [0, 1], message)``.
        erf_layer: stage for the ERF.
        latency: include latency in the profile (a separate timed pass).
        latency_repeats, latency_warmup: timed and warm-up passes (default ``viz.cost``'s 30 / 10).

    Returns:
        Analysis: raw data plus ``to_dict()``.

    Raises:
        ValueError: no images, no entries, target out of range.
        KeyError: a layer that is not in a model (message lists the choices).
    """
    if not entries:
        raise ValueError("analyze() needs at least one model entry")
    report = progress or (lambda f, m: None)
    t0 = time.perf_counter()
    x, crops = prepare_inputs(images, backbone)
    t_load = time.perf_counter() - t0
    cats = tuple(getattr(backbone, "categories", ()) or ())
    if target is not None and cats and not 0 <= int(target) < len(cats):
        raise ValueError(f"target class {target} out of range [0, {len(cats)})")
    chosen = _resolve_layers(entries[0].model, backbone.name, layers)
    erf_at = erf_layer or (chosen[-1] if chosen else None)
    steps = len(entries) * (1 + int(erf) + int(profile))
    done = 0
    results: list[ModelResult] = []
    targets: tuple[int, ...] | None = None if target is None else tuple([int(target)] * x.shape[0])
    rule = "first model's top-1 per image" if target is None else "given"

    for entry in entries:
        timings: dict[str, float] = {}
        errors: dict[str, str] = {}
        report(done / steps, f"{entry.label}: recording")
        # the ERF input gradient comes from the same recorded graph (a recorded layer, the input
        # requiring grad): one forward per model for every per-image panel
        erf_here = bool(erf and erf_at is not None and erf_at in dict(entry.model.named_modules()))
        rec_layers = chosen if not erf_here or erf_at in chosen else [*chosen, erf_at]
        xi = x.detach().clone().requires_grad_(True) if erf_here else x
        erf_kw: dict[str, Any] = {"erf_layer": erf_at, "erf_input": xi} if erf_here else {}
        with entry.lock:
            t = time.perf_counter()
            with Recorder(entry.model, layers=rec_layers, taps="*") as rec, torch.enable_grad():
                entry.model(xi)
            timings["record"] = time.perf_counter() - t
            t = time.perf_counter()
            if targets is None:
                record = rec.finish(target=None, **erf_kw)
                targets = record.targets
            else:
                record = rec.finish(target=list(targets), **erf_kw)
            timings["backward"] = time.perf_counter() - t
        del xi
        t = time.perf_counter()
        cams = {}
        for layer in chosen:
            try:
                cams[layer] = cam_from_record(record, layer)
            except ValueError as e:
                errors[f"gradcam/{layer}"] = str(e)
        taps = summarize_taps(record, entry.model)
        timings["maps"] = time.perf_counter() - t  # Grad-CAM maps + tap summaries from the record
        extra: dict[str, Any] = {}
        if _fusable(entry.model):
            t = time.perf_counter()
            try:
                with entry.lock:
                    extra["fuse_max_abs_diff"] = cached_fuse_difference(entry.model, record.logits, x)
            except Exception as e:
                if is_out_of_memory(e):
                    raise
                errors["fuse"] = f"{type(e).__name__}: {e}"
            timings["fuse"] = time.perf_counter() - t  # ACB fused-vs-unfused check (cached per model/input)
        red: dict[str, dict] = {}
        if redundancy:
            t = time.perf_counter()
            try:
                red = layer_redundancy({layer: record.activation(layer) for layer in chosen})
            except Exception as e:  # optional phase: report, never crash
                if is_out_of_memory(e):
                    raise
                errors["redundancy"] = f"{type(e).__name__}: {e}"
            timings["redundancy"] = time.perf_counter() - t
        done += 1
        res = ModelResult(
            label=entry.label, variant=entry.variant, swap=entry.swap.to_dict(), record=record, cams=cams,
            taps=taps, topk=_topk(record.logits, cats, topk), redundancy=red, timings=timings, errors=errors, extra=extra,
        )
        if erf and erf_at is not None:
            report(done / steps, f"{entry.label}: effective receptive field at {erf_at}")
            t = time.perf_counter()
            try:
                from viz.erf import contribution, effective_receptive_field, erf_from_maps

                if not erf_here:  # not a module: its own pass reports the error
                    with entry.lock:
                        res.erf = effective_receptive_field(entry.model, erf_at, x)
                elif record.input_grad is not None and record.erf_feature_hw is not None:
                    res.erf = erf_from_maps(contribution(record.input_grad), erf_at, tuple(x.shape[-2:]),
                                            record.erf_feature_hw)
                else:
                    errors["erf"] = f"ValueError: {record.erf_error}"
            except Exception as e:
                if is_out_of_memory(e):
                    raise
                errors["erf"] = f"{type(e).__name__}: {e}"
            try:
                res.theoretical_rf = cached_theoretical_rf(entry.model, erf_at, int(x.shape[-1]))
            except Exception as e:
                if is_out_of_memory(e):
                    raise
                errors["theoretical_rf"] = f"{type(e).__name__}: {e}"
            timings["erf"] = time.perf_counter() - t
            done += 1
        if profile:
            report(done / steps, f"{entry.label}: cost profile")
            t = time.perf_counter()
            try:
                with entry.lock:
                    lat_kw = {k: v for k, v in (("repeats", latency_repeats), ("warmup", latency_warmup)) if v is not None}
                    res.cost = cached_profile(entry.model, int(x.shape[-1]), device=x.device, latency=latency, **lat_kw)
            except Exception as e:
                if is_out_of_memory(e):
                    raise
                errors["profile"] = f"{type(e).__name__}: {e}"
            timings["profile"] = time.perf_counter() - t
            done += 1
        results.append(res)

    cka: dict[str, dict[str, float]] = {}
    global_timings = {"load": t_load}
    if redundancy and len(results) > 1:
        t = time.perf_counter()
        try:
            from viz.redundancy import linear_cka_many

            ref = results[0]
            for layer in chosen:
                a = ref.record.activation(layer)
                xa = a.permute(0, 2, 3, 1).reshape(-1, a.shape[1])
                labels, ys = [], []
                for r in results[1:]:
                    b = r.record.activation(layer)
                    if b.shape[0] != a.shape[0] or b.shape[2:] != a.shape[2:]:
                        continue
                    labels.append(r.label)
                    ys.append(b.permute(0, 2, 3, 1).reshape(-1, b.shape[1]))
                # the reference's features and self-HSIC once per layer; float32 products (display values, ~1e-6)
                cka[layer] = dict(zip(labels, linear_cka_many(xa, ys, dtype=torch.float32)))
        except Exception as e:
            if is_out_of_memory(e):
                raise
            for r in results:
                r.errors["cka"] = f"{type(e).__name__}: {e}"
        global_timings["cka"] = time.perf_counter() - t
    report(1.0, "done")
    weights = backbone.weights.to_dict() if hasattr(getattr(backbone, "weights", None), "to_dict") else {}
    return Analysis(
        backbone=backbone.name,
        weights=weights,
        device=str(x.device),
        input_size=int(x.shape[-1]),
        images=crops,
        layers=chosen,
        targets=tuple(targets or ()),
        target_rule=rule,
        categories=cats,
        models=results,
        cka=cka,
        erf_layer=erf_at if erf else None,
        timings=global_timings,
    )
