"""Calibration: layer-wise distillation that gives non-exact variants meaningful parameters.

``scconv``, ``selfcal`` and ``spconv`` cannot reproduce a pretrained convolution at
initialisation, so a freshly swapped network is a perturbed network, and its Grad-CAM or
redundancy says little about the module. Calibration fits each swapped *site* to the original one
without labels:

1. **Layer-wise distillation.** For augmented crops of a few photos, forward hooks on a private
   copy of the teacher capture the INPUT x of every calibrated site and the teacher's output there,
   t(x) = conv(x) (or BN(conv(x)) for variants that absorb the BN the probe paired with the
   conv). Given the teacher's inputs the sites are independent, so all of them are fitted in one
   loop over mini-batches with Adam on the *squared* relative error ‖s(x) − t(x)‖² / ‖t(x)‖²
   (summed over sites; each site only sees its own term's gradient; the square is the smooth
   training loss, the report gives the norm ratio). The student runs in eval mode, so what is
   fitted is exactly the function the app later shows; BatchNorms inside a variant that were never
   used (running stats still 0/1) first get their statistics estimated on the captured inputs.
2. **End-to-end logit distillation** (optional, ``e2e_steps``): the swapped sites, and only they,
   are tuned so that the student's logits match the teacher's (KL(teacher ‖ student) at a
   temperature T, scaled by T²).

The report gives, on held-out crops (a separate augmentation stream of the same photos), the
per-site relative error ‖s(x) − t(x)‖ / ‖t(x)‖ (norm ratio, Frobenius norms over the whole held-out
set; its square is reported too) and the whole-model top-1 agreement and KL divergence with the
teacher, before and after. ``calibrate_cached`` stores calibrated site weights as safetensors (with a JSON
metadata record in the header) keyed by backbone, weights, variant, options, sites, image set and
calibration options, so each configuration is calibrated once.

The teacher is never modified (it is deep-copied); the student's model is modified in place (it is
the caller's copy from ``swap_convs``), returned in eval mode on its original device. Results are
deterministic for a fixed seed on the CPU (same thread count); on CUDA, cuDNN may add run-to-run
noise of float-rounding size.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from plugconv.images_dataset import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageLike,
    augmented_crops,
    images_sha256,
)
from plugconv.registry import get_conv
from plugconv.surgery import SwapResult, probe_sites

ProgressFn = Callable[[float, str], None]

#: format tag written into every calibration file (/2: per-site ``error_*`` is the norm ratio
#: ‖s − t‖ / ‖t‖; /1 files stored the squared ratio there and are converted when read)
FORMAT = "plugconv-calibration/2"
#: older format tags ``read_calibration`` still accepts (their report is converted)
OLD_FORMATS = ("plugconv-calibration/1",)
#: safetensors header key that holds the JSON metadata record
META_KEY = "plugconv_calibration"
#: provenance statuses that calibration (re)fits by default
CALIBRATABLE = ("initialised", "calibrated")

#: default calibration options (also part of the cache key)
DEFAULTS: dict[str, Any] = {
    "steps": 300,
    "e2e_steps": 0,
    "lr": 3e-3,
    "e2e_lr": 3e-4,
    "batch_size": 8,
    "crop": 160,
    "samples": 32,
    "eval_samples": 16,
    "temperature": 2.0,
    "vector_lr_mult": 10.0,
}


# ----------------------------------------------------------------------------------------------
# report


@dataclass(frozen=True)
class SiteCalibration:
    """Relative reconstruction error of one site on the held-out crops.

    The norms are Frobenius norms over all held-out crops together (every output element of the
    site), so the error is ‖S − T‖ / ‖T‖ for the stacked outputs S of the student site and T of the
    teacher site.

    Attributes:
        site: module path of the swapped conv.
        error_before: relative error ‖s(x) − t(x)‖ / ‖t(x)‖ before calibration (≥ 0; 1.0 is as
            bad as predicting zeros; 0.1 means the residual has a tenth of the target's norm).
        error_after: the same after calibration.
        bn: module path of the teacher BN included in the target (absorbing variants), or None.
        calibrated: False when the layer-wise fit ended with a larger error on the training crops
            than the site started with (too few steps); the site then keeps its initial parameters
            and its provenance (only checked without the end-to-end phase, which trades per-site
            error for model-level agreement on purpose).
        sq_error_before, sq_error_after: the squared ratio ‖s(x) − t(x)‖² / ‖t(x)‖² (the
            quantity the layer-wise phase minimises), i.e. ``error_*`` squared.
    """

    site: str
    error_before: float
    error_after: float
    bn: str | None = None
    calibrated: bool = True
    sq_error_before: float | None = None
    sq_error_after: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class CalibrationReport:
    """What ``calibrate`` (or ``calibrate_cached``) did.

    Attributes:
        variant: registry key of the calibrated variant.
        sites: per calibrated site, the held-out relative error before/after.
        agreement_before, agreement_after: whole-model top-1 agreement with the teacher on the
            held-out crops, in [0, 1].
        kl_before, kl_after: mean KL(teacher ‖ student) of the softmax outputs (T = 1) on the
            held-out crops, in nats (≥ 0).
        wall_time_s: seconds the calibration took (capture, fitting, evaluation).
        steps, e2e_steps: optimisation steps of the layer-wise and end-to-end phases.
        seed: seed of the augmentation and mini-batch order.
        device: device the fit ran on ("cpu", "cuda:0").
        samples, eval_samples: number of training / held-out augmented crops.
        image_sha256: sha256 of the calibration images' pixels.
        options: every calibration option used (lr, batch_size, crop, temperature, ...).
        from_cache: True when the weights were loaded from a cache file instead of fitted.
        cache_path: the cache file written or read, when ``calibrate_cached`` was used.
        swap: the updated ``SwapResult`` (same model object, provenance "calibrated" for the
            calibrated sites); not part of ``to_dict``.
    """

    variant: str
    sites: tuple[SiteCalibration, ...]
    agreement_before: float
    agreement_after: float
    kl_before: float
    kl_after: float
    wall_time_s: float
    steps: int
    e2e_steps: int
    seed: int
    device: str
    samples: int
    eval_samples: int
    image_sha256: str
    options: dict[str, Any] = field(default_factory=dict)
    from_cache: bool = False
    cache_path: str | None = None
    swap: SwapResult | None = field(default=None, compare=False, repr=False)

    @property
    def max_error_after(self) -> float:
        """Largest per-site relative error after calibration (0.0 without sites)."""
        return max((s.error_after for s in self.sites), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (everything but ``swap``)."""
        return {
            "variant": self.variant,
            "sites": [s.to_dict() for s in self.sites],
            "top1_agreement": {"before": self.agreement_before, "after": self.agreement_after},
            "kl": {"before": self.kl_before, "after": self.kl_after},
            "wall_time_s": self.wall_time_s,
            "steps": self.steps,
            "e2e_steps": self.e2e_steps,
            "seed": self.seed,
            "device": self.device,
            "samples": self.samples,
            "eval_samples": self.eval_samples,
            "image_sha256": self.image_sha256,
            "options": dict(self.options),
            "from_cache": self.from_cache,
            "cache_path": self.cache_path,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], **overrides: Any) -> CalibrationReport:
        """Inverse of ``to_dict`` (``swap`` and any other field can be given as overrides)."""
        kw: dict[str, Any] = {
            "variant": d["variant"],
            "sites": tuple(SiteCalibration(**s) for s in d["sites"]),
            "agreement_before": float(d["top1_agreement"]["before"]),
            "agreement_after": float(d["top1_agreement"]["after"]),
            "kl_before": float(d["kl"]["before"]),
            "kl_after": float(d["kl"]["after"]),
            "wall_time_s": float(d["wall_time_s"]),
            "steps": int(d["steps"]),
            "e2e_steps": int(d["e2e_steps"]),
            "seed": int(d["seed"]),
            "device": str(d["device"]),
            "samples": int(d["samples"]),
            "eval_samples": int(d["eval_samples"]),
            "image_sha256": str(d["image_sha256"]),
            "options": dict(d.get("options", {})),
            "from_cache": bool(d.get("from_cache", False)),
            "cache_path": d.get("cache_path"),
        }
        kw.update(overrides)
        return cls(**kw)


# ----------------------------------------------------------------------------------------------
# helpers


def _resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda[:N]'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    return dev


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _bn_eval(bn: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """The normalisation of ``bn`` in eval mode (no activation, even for timm ``BatchNormAct2d``)."""
    return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def _sq_rel_error(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Squared relative error ‖s − t‖² / ‖t‖² (the smooth training loss of the layer-wise phase)."""
    return (s - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-12)


def rel_error(s: torch.Tensor, t: torch.Tensor) -> float:
    """Relative error ‖s − t‖ / ‖t‖ (Frobenius norms over all elements, in float64), as reported."""
    d = (s.detach().double() - t.detach().double()).pow(2).sum()
    return math.sqrt(float(d / t.detach().double().pow(2).sum().clamp_min(1e-30)))


def _kl(t_logits: torch.Tensor, s_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over the batch of KL(softmax(t/T) ‖ softmax(s/T)) in nats."""
    log_p = F.log_softmax(t_logits / temperature, dim=-1)
    log_q = F.log_softmax(s_logits / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    raise ValueError(f"cannot read logits from a model output of type {type(out).__name__}")


def _fresh_bns(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """BatchNorms inside ``module`` whose running statistics were never updated (still 0 / 1)."""
    out = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            nbt = m.num_batches_tracked
            fresh = (nbt is None or int(nbt) == 0) and bool(
                (m.running_mean == 0).all() and (m.running_var == 1).all()
            )
            if fresh:
                out.append(m)
    return out


def _param_groups(params: Sequence[torch.Tensor], lr: float, vector_mult: float) -> list[dict[str, Any]]:
    """Adam groups: kernels (ndim >= 2) at ``lr``; vectors (norm affines, biases, gates) at ``lr * vector_mult``.

    Kernels have entries of size ~sqrt(2 / fan_in) (0.06 for a 64-channel 3x3) while norm scales sit
    near 1 and often must move by O(1) (e.g. when the fitted site must output a smaller scale than its
    freshly normalised branches); Adam's steps are about ``lr`` in every coordinate, so one rate is
    either too large for kernels or too slow for scales.
    """
    mats = [p for p in params if p.ndim >= 2]
    vecs = [p for p in params if p.ndim < 2]
    groups = [{"params": mats, "lr": lr}] if mats else []
    if vecs:
        groups.append({"params": vecs, "lr": lr * vector_mult})
    return groups


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _check_images(images: Sequence[ImageLike]) -> list[ImageLike]:
    if isinstance(images, (str, os.PathLike)):
        raise ValueError(
            "calibrate takes loaded images; load files with plugconv.images_dataset.load_images(path)"
        )
    imgs = list(images)
    if not imgs:
        raise ValueError("calibrate needs at least one image")
    return imgs


# ----------------------------------------------------------------------------------------------
# capture


def _capture(
    teacher: nn.Module,
    crops: torch.Tensor,
    sites: Sequence[str],
    bns: Mapping[str, str | None],
    batch_size: int,
    device: torch.device,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """Teacher inputs X and targets T per site, and teacher logits, for every crop.

    Returns:
        (inputs {site: N×C_in×H×W}, targets {site: N×C_out×H'×W'}, logits N×K), on ``device``.
    """
    modules = dict(teacher.named_modules())
    xs: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
    ts: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
    calls: dict[str, int] = {}
    logits: list[torch.Tensor] = []

    def hook(name: str):
        bn = modules[bns[name]] if bns.get(name) else None

        def fn(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            calls[name] = calls.get(name, 0) + 1
            y = out.detach()
            xs[name].append(inp[0].detach())
            ts[name].append(_bn_eval(bn, y) if bn is not None else y)

        return fn

    handles = []
    try:
        for s in sites:
            handles.append(modules[s].register_forward_hook(hook(s)))
        with torch.no_grad():
            for sl in _chunks(crops.shape[0], batch_size):
                calls.clear()
                logits.append(_logits(teacher(crops[sl].to(device))).detach().float())
                for s in sites:
                    if calls.get(s, 0) != 1:
                        raise ValueError(
                            f"site {s!r} ran {calls.get(s, 0)} times in one forward pass; "
                            "calibration needs each site to run exactly once"
                        )
    finally:
        for h in handles:
            h.remove()
    return (
        {s: torch.cat(v) for s, v in xs.items()},
        {s: torch.cat(v) for s, v in ts.items()},
        torch.cat(logits),
    )


@torch.no_grad()
def _site_errors(
    student: nn.Module, sites: Sequence[str], xs: Mapping[str, torch.Tensor], ts: Mapping[str, torch.Tensor],
    batch_size: int,
) -> dict[str, float]:
    """Per site, the SQUARED relative error ‖S − T‖² / ‖T‖² over all crops (sqrt for the report)."""
    out = {}
    for s in sites:
        mod = student.get_submodule(s)
        num = torch.zeros((), dtype=torch.float64, device=xs[s].device)
        den = torch.zeros((), dtype=torch.float64, device=xs[s].device)
        for sl in _chunks(xs[s].shape[0], batch_size):
            y = mod(xs[s][sl])
            num += (y - ts[s][sl]).double().pow(2).sum()
            den += ts[s][sl].double().pow(2).sum()
        out[s] = float(num / den.clamp_min(1e-30))
    return out


@torch.no_grad()
def _model_agreement(
    student: nn.Module, crops: torch.Tensor, t_logits: torch.Tensor, batch_size: int, device: torch.device
) -> tuple[float, float]:
    s_logits = torch.cat(
        [_logits(student(crops[sl].to(device))).float() for sl in _chunks(crops.shape[0], batch_size)]
    )
    agree = float((s_logits.argmax(-1) == t_logits.argmax(-1)).float().mean())
    return agree, float(_kl(t_logits, s_logits))


# ----------------------------------------------------------------------------------------------
# calibrate


def calibrate(
    teacher: nn.Module,
    student: SwapResult,
    images: Sequence[ImageLike],
    *,
    steps: int = DEFAULTS["steps"],
    e2e_steps: int = DEFAULTS["e2e_steps"],
    lr: float = DEFAULTS["lr"],
    e2e_lr: float = DEFAULTS["e2e_lr"],
    batch_size: int = DEFAULTS["batch_size"],
    crop: int = DEFAULTS["crop"],
    samples: int = DEFAULTS["samples"],
    eval_samples: int = DEFAULTS["eval_samples"],
    temperature: float = DEFAULTS["temperature"],
    vector_lr_mult: float = DEFAULTS["vector_lr_mult"],
    sites: Sequence[str] | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    seed: int = 0,
    device: str | torch.device = "auto",
    progress: ProgressFn | None = None,
) -> CalibrationReport:
    """Fit the swapped sites of ``student`` to the teacher's original sites, without labels.

    Args:
        teacher: the original network (N×3×S×S normalised images → N×K logits); never modified.
        student: ``swap_convs(teacher, variant)``'s result; its model is modified in place and
            left in eval mode on its original device.
        images: calibration photos (PIL images, H×W×3 arrays or 3×H×W tensors in [0, 1]); a few
            are enough, augmentation makes ``samples`` crops of them.
        steps: Adam steps of the layer-wise phase (0 = evaluate only).
        e2e_steps: Adam steps of the end-to-end logit-distillation phase (0 = skip).
        lr: Adam learning rate of the layer-wise phase (cosine-annealed to 0).
        e2e_lr: Adam learning rate of the end-to-end phase (cosine-annealed to 0).
        batch_size: crops per mini-batch (also the chunk size of the capture passes).
        crop: side S of the augmented crops in pixels.
        samples: number of training crops (random resized crops + flips of ``images``).
        eval_samples: number of held-out crops (a separate augmentation stream) for the report.
        temperature: softmax temperature T of the end-to-end phase (the loss is scaled by T²).
        vector_lr_mult: learning-rate multiplier for 1-D parameters (norm scales and shifts,
            biases) relative to kernels; see ``_param_groups``.
        sites: site paths to calibrate; default every swapped site whose provenance is
            "initialised" or "calibrated" (exact and trained sites are left alone).
        mean, std: input normalisation of the teacher.
        seed: seed of augmentation and mini-batch order (same seed → same weights on the CPU).
        device: "auto" (CUDA when available), "cpu", "cuda", or a ``torch.device``.
        progress: ``progress(fraction in [0, 1], message)``, called as the work proceeds.

    Returns:
        CalibrationReport; its ``swap`` is ``student`` with provenance "calibrated" for the
        calibrated sites (``dataclasses.replace``; the model object is the same). Without the
        end-to-end phase, a site whose fit ended worse than it started on the training crops (e.g.
        a 2-step run) keeps its initial parameters and provenance (``SiteCalibration.calibrated``).

    Raises:
        ValueError: a bad option, an unknown site, no images, or a site that runs more than once
            per forward pass; the message names the value.
        FloatingPointError: the fit diverged (non-finite loss); the message names the step.
    """
    t0 = time.perf_counter()
    if not isinstance(student, SwapResult):
        raise ValueError(f"student must be the SwapResult from swap_convs, got {type(student).__name__}")
    for name, v, lo in (("steps", steps, 0), ("e2e_steps", e2e_steps, 0), ("batch_size", batch_size, 1),
                        ("crop", crop, 8), ("samples", samples, 1), ("eval_samples", eval_samples, 1)):
        if not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    for name, fv in (("lr", lr), ("e2e_lr", e2e_lr), ("temperature", temperature),
                     ("vector_lr_mult", vector_lr_mult)):
        if not (isinstance(fv, (int, float)) and math.isfinite(fv) and fv > 0):
            raise ValueError(f"{name} must be a positive number, got {fv!r}")
    imgs = _check_images(images)
    if sites is None:
        chosen = [s for s in student.swapped if student.provenance.get(s) in CALIBRATABLE]
    else:
        chosen = list(sites)
        unknown = [s for s in chosen if s not in student.swapped]
        if unknown:
            raise ValueError(
                f"sites {unknown} were not swapped; choose from {list(student.swapped)}"
            )
    dev = _resolve_device(device)
    options = {
        "steps": steps, "e2e_steps": e2e_steps, "lr": lr, "e2e_lr": e2e_lr, "batch_size": batch_size,
        "crop": crop, "samples": samples, "eval_samples": eval_samples, "temperature": temperature,
        "vector_lr_mult": vector_lr_mult, "mean": list(mean), "std": list(std),
    }

    def report(frac: float, msg: str) -> None:
        if progress is not None:
            progress(min(max(frac, 0.0), 1.0), msg)

    model = student.model
    home = _model_device(model)
    grad_flags = {id(p): p.requires_grad for p in model.parameters()}
    cls = get_conv(student.variant)
    fork_devices = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        try:
            report(0.0, "preparing teacher copy and crops")
            tcopy = copy.deepcopy(teacher).to(dev).eval()
            tcopy.requires_grad_(False)
            bns: dict[str, str | None] = dict.fromkeys(chosen)
            if cls.absorbs_bn and chosen:
                probed = probe_sites(tcopy, chosen, probe_size=crop)
                bns = {s: (probed[s].bn_name if s in probed else None) for s in chosen}
            gen = torch.Generator().manual_seed(seed)
            train_x = augmented_crops(imgs, samples, crop, generator=gen, mean=mean, std=std)
            eval_gen = torch.Generator().manual_seed(seed + 7919)
            eval_x = augmented_crops(imgs, eval_samples, crop, generator=eval_gen, mean=mean, std=std)

            report(0.02, f"capturing teacher inputs at {len(chosen)} sites")
            tr_in, tr_tg, tr_logits = _capture(tcopy, train_x, chosen, bns, batch_size, dev)
            ev_in, ev_tg, ev_logits = _capture(tcopy, eval_x, chosen, bns, batch_size, dev)
            del tcopy

            model.to(dev).eval()
            model.requires_grad_(False)
            report(0.08, "measuring errors before calibration")
            err_before = _site_errors(model, chosen, ev_in, ev_tg, batch_size)
            agree_before, kl_before = _model_agreement(model, eval_x, ev_logits, batch_size, dev)

            site_mods = {s: model.get_submodule(s) for s in chosen}
            # the guard below restores a site whose layer-wise fit ended worse than it started
            init_state = {s: copy.deepcopy(mod.state_dict()) for s, mod in site_mods.items()}
            fit_before = _site_errors(model, chosen, tr_in, tr_tg, batch_size) if not e2e_steps else {}
            # BatchNorms inside a variant that never saw data: estimate their statistics first
            with torch.no_grad():
                for s, mod in site_mods.items():
                    fresh = _fresh_bns(mod)
                    if not fresh:
                        continue
                    saved = [(bn, bn.momentum) for bn in fresh]
                    for bn in fresh:
                        bn.momentum = None  # cumulative average over all batches
                        bn.train()
                    try:
                        for sl in _chunks(samples, batch_size):
                            mod(tr_in[s][sl])
                    finally:
                        for bn, m in saved:
                            bn.momentum = m
                            bn.eval()

            params = [p for mod in site_mods.values() for p in mod.parameters() if p.is_floating_point()]
            for p in params:
                p.requires_grad_(True)
            fit_span = 0.85 if e2e_steps else 0.9
            if steps and params:
                opt = torch.optim.Adam(_param_groups(params, lr, vector_lr_mult))
                sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
                order = torch.randperm(samples, generator=gen)
                pos = 0
                every = max(1, steps // 50)
                for step in range(steps):
                    if pos + batch_size > samples:
                        order, pos = torch.randperm(samples, generator=gen), 0
                    idx = order[pos : pos + batch_size].to(dev)
                    pos += batch_size
                    opt.zero_grad(set_to_none=True)
                    losses = [_sq_rel_error(mod(tr_in[s][idx]), tr_tg[s][idx]) for s, mod in site_mods.items()]
                    loss = torch.stack(losses).sum()
                    if not torch.isfinite(loss):
                        bad = [s for s, v in zip(site_mods, losses) if not torch.isfinite(v)]
                        raise FloatingPointError(
                            f"layer-wise calibration diverged at step {step} (sites {bad}); lower lr={lr}"
                        )
                    loss.backward()
                    opt.step()
                    sched.step()
                    if step % every == 0 or step == steps - 1:
                        report(
                            0.1 + (fit_span - 0.1) * (step + 1) / steps,
                            f"fitting sites: step {step + 1}/{steps}, "
                            f"mean squared relative error {float(loss.detach()) / len(losses):.4f}",
                        )
            if e2e_steps and params:
                opt = torch.optim.Adam(_param_groups(params, e2e_lr, vector_lr_mult))
                sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=e2e_steps)
                order, pos = torch.randperm(samples, generator=gen), 0
                every = max(1, e2e_steps // 20)
                for step in range(e2e_steps):
                    if pos + batch_size > samples:
                        order, pos = torch.randperm(samples, generator=gen), 0
                    idx = order[pos : pos + batch_size]
                    pos += batch_size
                    opt.zero_grad(set_to_none=True)
                    s_logits = _logits(model(train_x[idx].to(dev))).float()
                    loss = _kl(tr_logits[idx.to(dev)], s_logits, temperature) * temperature**2
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"end-to-end calibration diverged at step {step}; lower e2e_lr={e2e_lr}"
                        )
                    loss.backward()
                    opt.step()
                    sched.step()
                    if step % every == 0 or step == e2e_steps - 1:
                        report(
                            fit_span + (0.95 - fit_span) * (step + 1) / e2e_steps,
                            f"end-to-end distillation: step {step + 1}/{e2e_steps}, KL {float(loss.detach()):.4f}",
                        )
            for p in params:
                p.grad = None
            model.requires_grad_(False)
            reverted: list[str] = []
            if not e2e_steps and chosen:
                fit_after = _site_errors(model, chosen, tr_in, tr_tg, batch_size)
                reverted = [s for s in chosen if not fit_after[s] < fit_before[s]]
                for s in reverted:
                    site_mods[s].load_state_dict(init_state[s])
            report(0.95, "measuring errors after calibration")
            err_after = _site_errors(model, chosen, ev_in, ev_tg, batch_size)
            agree_after, kl_after = _model_agreement(model, eval_x, ev_logits, batch_size, dev)
        finally:
            for p in model.parameters():
                p.grad = None
                p.requires_grad_(grad_flags.get(id(p), p.requires_grad))
            model.to(home).eval()

    provenance = dict(student.provenance)
    provenance.update({s: "calibrated" for s in chosen if s not in reverted})
    new_swap = dataclasses.replace(student, provenance=provenance)
    report(1.0, "calibration done" + (f"; {len(reverted)} site(s) kept their initial parameters" if reverted else ""))
    return CalibrationReport(
        variant=student.variant,
        sites=tuple(
            SiteCalibration(
                s, math.sqrt(err_before[s]), math.sqrt(err_after[s]), bns.get(s), s not in reverted,
                sq_error_before=err_before[s], sq_error_after=err_after[s],
            )
            for s in chosen
        ),
        agreement_before=agree_before,
        agreement_after=agree_after,
        kl_before=kl_before,
        kl_after=kl_after,
        wall_time_s=time.perf_counter() - t0,
        steps=steps,
        e2e_steps=e2e_steps,
        seed=seed,
        device=str(dev),
        samples=samples,
        eval_samples=eval_samples,
        image_sha256=images_sha256(imgs),
        options=options,
        swap=new_swap,
    )


# ----------------------------------------------------------------------------------------------
# files and cache


def plugconv_version() -> str:
    """The plugconv version (package metadata, else pyproject.toml, else "unknown")."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("plugconv")
    except (ImportError, PackageNotFoundError):
        pass
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        import tomllib

        return str(tomllib.loads(pyproject.read_text())["project"]["version"])
    except (ImportError, OSError, KeyError, ValueError):
        return "unknown"


def default_cache_dir() -> Path:
    """``$PLUGCONV_CACHE`` if set, else ``~/.cache/plugconv/calibrated``."""
    env = os.environ.get("PLUGCONV_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "plugconv" / "calibrated"


def state_sha256(module: nn.Module) -> str:
    """sha256 over a module's state_dict (names, dtypes, shapes and bytes, in order)."""
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _jsonable(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return repr(v)


def _weights_dict(weights_info: Any) -> dict[str, Any]:
    if weights_info is None:
        return {}
    if hasattr(weights_info, "to_dict"):
        return dict(weights_info.to_dict())
    if isinstance(weights_info, Mapping):
        return dict(weights_info)
    raise ValueError(f"weights_info must be a WeightsInfo, a dict or None, got {type(weights_info).__name__}")


def site_state(swap: SwapResult, sites: Sequence[str]) -> dict[str, torch.Tensor]:
    """Flat ``{"<site>.<param>": tensor}`` of the given sites' state (CPU, contiguous copies)."""
    out: dict[str, torch.Tensor] = {}
    for s in sites:
        for k, v in swap.model.get_submodule(s).state_dict().items():
            out[f"{s}.{k}"] = v.detach().cpu().contiguous().clone()
    return out


def save_calibration(path: str | Path, report: CalibrationReport, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write the calibrated sites of ``report.swap`` as safetensors with a JSON metadata record.

    The header metadata key ``"plugconv_calibration"`` holds a JSON object: format, variant,
    swap options, sites, report, plugconv version, plus ``metadata`` (backbone, weights, ...).
    The file is written atomically (temporary file, then rename).

    Returns:
        The path written.
    """
    from safetensors.torch import save_file

    if report.swap is None:
        raise ValueError("report has no swap result to save (was it built by calibrate?)")
    swap = report.swap
    sites = [s.site for s in report.sites if s.calibrated]
    record = {
        "format": FORMAT,
        "variant": swap.variant,
        "options": _jsonable(swap.options),
        "sites": sites,
        "report": {**report.to_dict(), "from_cache": False, "cache_path": None},
        "plugconv_version": plugconv_version(),
        **_jsonable(dict(metadata or {})),
    }
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        save_file(site_state(swap, sites), str(tmp), metadata={META_KEY: json.dumps(record, sort_keys=True)})
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()
    return p


def read_calibration(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a calibration file: (flat site state, metadata record).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a safetensors file, or no plugconv calibration record in its header.
    """
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"calibration file {str(p)!r} does not exist")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"calibration file {str(p)!r} is not a readable safetensors file: {e}") from e
    if META_KEY not in meta:
        raise ValueError(f"calibration file {str(p)!r} has no {META_KEY!r} metadata record")
    try:
        record = json.loads(meta[META_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"calibration file {str(p)!r} has a corrupt metadata record: {e}") from e
    if record.get("format") in OLD_FORMATS:
        record = _upgrade_record(record)
    if record.get("format") != FORMAT:
        raise ValueError(f"calibration file {str(p)!r} has format {record.get('format')!r}, expected {FORMAT!r}")
    return state, record


def _upgrade_record(record: dict[str, Any]) -> dict[str, Any]:
    """A /1 record (per-site ``error_*`` held the squared ratio) in the current format."""
    rec = dict(record)
    report = dict(rec.get("report") or {})
    sites = []
    for s in report.get("sites", []):
        s = dict(s)
        if "sq_error_before" not in s:
            for k in ("before", "after"):
                sq = float(s[f"error_{k}"])
                s[f"sq_error_{k}"] = sq
                s[f"error_{k}"] = math.sqrt(max(sq, 0.0))
        sites.append(s)
    if report:
        report["sites"] = sites
        rec["report"] = report
    rec["format"] = FORMAT
    return rec


def apply_calibration(swap: SwapResult, path: str | Path) -> CalibrationReport:
    """Load a calibration file into ``swap.model`` (in place) and mark its sites "calibrated".

    Raises:
        ValueError: the file's variant or sites do not match ``swap``, or a tensor's shape does
            not match the site (the message names it).
    """
    state, record = read_calibration(path)
    if record["variant"] != swap.variant:
        raise ValueError(f"calibration file {str(path)!r} is for variant {record['variant']!r}, not {swap.variant!r}")
    sites = list(record["sites"])
    missing = [s for s in sites if s not in swap.swapped]
    if missing:
        raise ValueError(f"calibration file {str(path)!r} has sites {missing} that this swap does not have")
    subs: dict[str, dict[str, torch.Tensor]] = {}
    for s in sites:  # check every site before touching any, so a bad file changes nothing
        prefix = f"{s}."
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        own = swap.model.get_submodule(s).state_dict()
        if set(sub) != set(own):
            raise ValueError(
                f"calibration file {str(path)!r} does not fit site {s!r}: tensors "
                f"{sorted(set(sub) ^ set(own))} missing or unexpected"
            )
        bad = [k for k, v in sub.items() if tuple(v.shape) != tuple(own[k].shape)]
        if bad:
            raise ValueError(f"calibration file {str(path)!r} does not fit site {s!r}: shapes of {bad} differ")
        subs[s] = sub
    for s, sub in subs.items():
        swap.model.get_submodule(s).load_state_dict(sub, strict=True)
    provenance = dict(swap.provenance)
    provenance.update(dict.fromkeys(sites, "calibrated"))
    new_swap = dataclasses.replace(swap, provenance=provenance)
    return CalibrationReport.from_dict(record["report"], from_cache=True, cache_path=str(path), swap=new_swap)


def cache_record(
    backbone_name: str,
    weights_info: Any,
    swap: SwapResult,
    teacher: nn.Module,
    images: Sequence[ImageLike],
    options: Mapping[str, Any],
) -> dict[str, Any]:
    """The fields that identify one calibration (the cache key is the sha256 of their JSON)."""
    w = _weights_dict(weights_info)
    return {
        "backbone": backbone_name,
        "weights": {"source": w.get("source"), "sha256": w.get("sha256")},
        "teacher_sha256": state_sha256(teacher),
        "variant": swap.variant,
        "options": _jsonable(swap.options),
        "sites": list(swap.swapped),
        "image_sha256": images_sha256(list(images)),
        "calibration": _jsonable(dict(options)),
        "plugconv_version": plugconv_version(),
    }


def calibrate_cached(
    backbone_name: str,
    weights_info: Any,
    swap_result: SwapResult,
    teacher: nn.Module,
    images: Sequence[ImageLike],
    *,
    cache_dir: str | Path | None = None,
    **kw: Any,
) -> CalibrationReport:
    """``calibrate`` once per configuration: load from the cache when present, else fit and save.

    The cache key is the sha256 of: backbone name, weights source and sha256, a sha256 of the
    teacher's state (so two random-weight teachers never share an entry), variant, swap options,
    swapped sites, sha256 of the image pixels, every calibration option (defaults filled in,
    ``device`` and ``progress`` excluded) and the plugconv version. A file that cannot be read or
    does not fit is ignored (with a warning) and replaced.

    Args:
        backbone_name: e.g. "resnet50".
        weights_info: the backbone's ``WeightsInfo`` (or its dict, or None).
        swap_result: ``swap_convs``'s result; its model is modified in place.
        teacher: the original network (never modified).
        images: calibration photos.
        cache_dir: folder of the cache files; default ``default_cache_dir()``.
        **kw: options of ``calibrate``.

    Returns:
        CalibrationReport with ``from_cache`` True when loaded and ``cache_path`` set; ``swap`` has
        provenance "calibrated" for the calibrated sites.
    """
    unknown = set(kw) - set(DEFAULTS) - {"seed", "device", "progress", "sites", "mean", "std"}
    if unknown:
        raise ValueError(f"unknown calibration options {sorted(unknown)}; choose from {sorted(DEFAULTS)}")
    imgs = _check_images(images)
    opts = {**DEFAULTS, "seed": 0, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "sites": None}
    opts.update({k: v for k, v in kw.items() if k not in ("device", "progress")})
    record = cache_record(backbone_name, weights_info, swap_result, teacher, imgs, opts)
    key = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    safe_name = "".join(c if c.isalnum() or c in "-_" else "_" for c in f"{backbone_name}-{swap_result.variant}")
    path = folder / f"{safe_name}-{key[:24]}.safetensors"
    progress: ProgressFn | None = kw.get("progress")
    if path.is_file():
        try:
            _, rec = read_calibration(path)
            if rec.get("key") != key:
                raise ValueError(f"cache file {str(path)!r} has key {rec.get('key')!r}, expected {key!r}")
            rep = apply_calibration(swap_result, path)
            if progress is not None:
                progress(1.0, f"loaded calibrated weights from cache {path.name}")
            return rep
        except (ValueError, OSError, KeyError) as e:
            warnings.warn(f"ignoring unusable calibration cache file: {e}", RuntimeWarning, stacklevel=2)
    rep = calibrate(teacher, swap_result, imgs, **kw)
    w = _weights_dict(weights_info)
    save_calibration(
        path, rep,
        {"key": key, "backbone": backbone_name, "weights": _jsonable(w), "cache_record": record},
    )
    return dataclasses.replace(rep, cache_path=str(path))
