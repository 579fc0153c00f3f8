"""plugconv browser app: compare plug-and-play convolutions side by side inside a pretrained CNN.

A thin Gradio adapter over :mod:`viz` and :mod:`plugconv`:

- ``build_demo(config) -> gr.Blocks`` builds the UI (tests build it small); nothing heavy happens at
  import: models are prepared lazily on the first request and kept in a module-level bounded LRU
  (key: backbone, weights, variant, preset, calibrated, device), shared read-only by every session.
- Every event that touches a model shares one queue (``concurrency_id="model"``) whose concurrency
  limit keeps memory bounded; ``queue(api_open=False)`` closes the ``/gradio_api/run/*`` bypass.
- Named API endpoints ``/analyze``, ``/profile`` and ``/calibrate`` (``gradio_client``); one
  ``/analyze`` call returns everything the panels show.
- Errors the user can cause (bad image, unsupported combination, missing weights, offline default
  weights, out of memory) become ``gr.Error`` with the library's message; the server keeps serving.

Run: ``python app.py`` (``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT`` pick the address).
On a ZeroGPU Space the model-bound core runs under ``spaces.GPU``; elsewhere the shim is a no-op.
"""

from __future__ import annotations

# ZeroGPU: ``spaces`` must be imported before anything initialises CUDA. Off ZeroGPU (or without the
# package) the decorator is a no-op.
try:  # pragma: no cover - depends on the Space runtime
    import spaces

    gpu = spaces.GPU
except ImportError:  # pragma: no cover - the normal case off Spaces

    def gpu(fn=None, **_kwargs):
        """No-op stand-in for ``spaces.GPU`` (used bare or with arguments)."""
        return fn if fn is not None else (lambda f: f)


import asyncio
import collections
import contextlib
import contextvars
import dataclasses
import gc
import html
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import pandas as pd
import torch

logger = logging.getLogger("plugconv.app")

APP_DIR = Path(__file__).resolve().parent
ASSETS_DIR = APP_DIR / "assets"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")

#: labels of the colour-scale modes (value passed to the figures)
SCALE_MODES: dict[str, str] = {
    "shared across models (per layer)": "shared",
    "per panel": "per-panel",
    "global (all layers and models)": "global",
}
ALL_STAGES = "all stages"


# --------------------------------------------------------------------------------------------------
# configuration


def _env_path(name: str, default: Path) -> Path:
    value = os.environ.get(name)
    return Path(value).expanduser() if value else default


@dataclasses.dataclass(frozen=True)
class AppConfig:
    """Settings of one app instance (tests build small ones).

    Attributes:
        backbones: backbone choices; None = ``plugconv.backbones.list_backbones()``.
        default_backbone: initial backbone; None = the library's choice (a ResNet when its ImageNet
            weights are cached, else the bundled offline ``efficientnet_lite0``).
        default_weights: initial weights choice (``"default"``, ``"random"`` or a file name in
            ``weights_dir``).
        default_variants: variants ticked at start (the baseline ``conv`` first).
        input_size: override the backbone's input size (tests use e.g. 64); None keeps the backbone's.
        weights_dir: the only directory weight files are read from (``$PLUGCONV_WEIGHTS_DIR``,
            default ``./weights``); users pick a file name, never a path.
        examples: example image paths (default: the photos in ``assets/``).
        cache_examples: run the examples at startup (eager) — off by default (startup time).
        queue_max_size: waiting events accepted before "queue full".
        concurrency_limit: model events running at once (one queue for all of them).
        max_file_size: upload limit passed to ``launch``.
        max_models: prepared models kept in the LRU.
        max_pixels: images with more pixels are refused (checked from the header).
        erf, redundancy, profile: which parts ``/analyze`` computes; ``profile`` means params and
            FLOPs (one counted pass per model, cached), the Profile tab refreshes alone through
            ``/profile``.
        latency_on_analyze: also time each model inside ``/analyze`` (off by default: latency is
            measured on demand by the Profile tab / ``/profile`` and cached per model, so the first
            click does not pay ``profile_warmup + profile_repeats`` timed passes per model).
        profile_repeats, profile_warmup: timed and warm-up passes of the latency measurement.
        max_reports: analyses kept (without their activations) for "Prepare downloads".
        calibration_options: options for ``plugconv.calibrate`` as ``(name, value)`` pairs (e.g.
            ``(("steps", 2), ("crop", 64))`` in tests); empty = the library's defaults.
        calibration_dir: calibrated-weights cache (None = the library's default,
            ``$PLUGCONV_CACHE`` or ``~/.cache/plugconv/calibrated``).
    """

    backbones: tuple[str, ...] | None = None
    default_backbone: str | None = None
    default_weights: str = "default"
    default_variants: tuple[str, ...] = ("conv", "acb", "saconv", "scconv")
    input_size: int | None = None
    weights_dir: Path = dataclasses.field(default_factory=lambda: _env_path("PLUGCONV_WEIGHTS_DIR", APP_DIR / "weights"))
    examples: tuple[Path, ...] | None = None
    cache_examples: bool = False
    queue_max_size: int = 16
    concurrency_limit: int = 1
    max_file_size: int | str = "10mb"
    max_models: int = 12
    max_pixels: int = 40_000_000
    erf: bool = True
    redundancy: bool = True
    profile: bool = True
    latency_on_analyze: bool = False
    profile_repeats: int = 10
    profile_warmup: int = 3
    calibration_options: tuple[tuple[str, Any], ...] = ()
    calibration_dir: Path | None = None
    max_reports: int = 8

    def example_paths(self) -> list[Path]:
        """The example photos (sorted), only real image files."""
        if self.examples is not None:
            return [Path(p) for p in self.examples]
        if not ASSETS_DIR.is_dir():
            return []
        return sorted(p for p in ASSETS_DIR.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


# --------------------------------------------------------------------------------------------------
# bounded LRU of prepared models (module level: shared by every session, never in gr.State)


class LRUCache:
    """Thread-safe bounded LRU that builds each missing value once (per-key build lock).

    ``get(key, factory)`` returns the cached value or builds it with ``factory()``; concurrent calls
    for the same key wait for one build; a failed build caches nothing (the next call retries).
    """

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        self.maxsize = maxsize
        self._data: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._building: dict[Hashable, threading.Lock] = {}

    def get(self, key: Hashable, factory: Callable[[], Any]) -> Any:
        """Cached value for ``key``, built by ``factory()`` when missing."""
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
            build_lock = self._building.setdefault(key, threading.Lock())
        with build_lock:
            with self._lock:
                if key in self._data:
                    self._data.move_to_end(key)
                    return self._data[key]
            try:
                value = factory()
            except BaseException:
                with self._lock:
                    self._building.pop(key, None)
                raise
            # insert and retire the build lock in one critical section: a caller arriving in
            # between would otherwise find neither the value nor the lock and build it again
            with self._lock:
                self._data[key] = value
                self._data.move_to_end(key)
                self._building.pop(key, None)
                while len(self._data) > self.maxsize:
                    self._data.popitem(last=False)
            return value

    def put(self, key: Hashable, value: Any) -> None:
        """Insert or replace ``key``."""
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)

    def peek(self, key: Hashable) -> Any | None:
        """The cached value or None, without building or reordering."""
        with self._lock:
            return self._data.get(key)

    def keys(self) -> list[Hashable]:
        """Keys, least recently used first."""
        with self._lock:
            return list(self._data)

    def clear(self) -> None:
        """Drop everything."""
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)


BACKBONES = LRUCache(maxsize=3)
MODELS = LRUCache(maxsize=12)
#: report id -> (analysis without activations, colour mode, output folder): what "Prepare
#: downloads" writes the full report from (figures, report.html, zip) without re-running anything
REPORTS = LRUCache(maxsize=8)
_TEMP_DIRS: collections.deque[Path] = collections.deque()
_MAX_TEMP_DIRS = 32


# --------------------------------------------------------------------------------------------------
# errors: what a user can cause becomes gr.Error with the library's message


def _message(e: BaseException) -> str:
    # KeyError wraps its message in quotes; show the message itself
    if isinstance(e, KeyError) and e.args and isinstance(e.args[0], str):
        return e.args[0]
    return str(e) or type(e).__name__


def raw_image(**kwargs: Any) -> gr.Image:
    """A ``gr.Image(type="filepath")`` that hands the upload's server-side path to the handler unopened.

    Stock ``gr.Image`` preprocessing opens every upload with PIL before the handler runs, so a
    zero-byte file, text/HTML renamed to an image, an SVG, a HEIC or a decompression bomb would
    fail there with Gradio's generic "Error". Passing the path through lets
    ``viz.images.load_image`` name the problem. The path is one Gradio itself stored in its upload
    cache (Gradio refuses client payloads that name other server files before ``preprocess``).
    The override is bound to the instance rather than done by subclassing: Gradio writes a ``.pyi``
    stub next to the source file of every ``Component`` subclass, which fails on a read-only
    install and litters the tree.
    """
    comp = gr.Image(type="filepath", **kwargs)
    stock = comp.preprocess

    def preprocess(payload: Any) -> Any:
        if payload is not None and getattr(payload, "path", None):
            return str(payload.path)
        return stock(payload)

    comp.preprocess = preprocess  # type: ignore[method-assign]

    # A queued payload may name an http(s) URL as the file's path; Gradio then skips its "is this an
    # uploaded file" check and downloads the URL (``ssrf_protected_download`` refuses private
    # addresses, but public hosts are fetched, with no size cap). This app never fetches URLs:
    # refuse them before Gradio moves the resource into its cache (both the async path used by
    # queued events and the sync one used outside routes).
    stock_async_move = comp.async_move_resource_to_block_cache
    stock_move = comp.move_resource_to_block_cache

    async def async_move_resource_to_block_cache(url_or_file_path: Any) -> Any:
        _refuse_url(url_or_file_path)
        return await stock_async_move(url_or_file_path)

    def move_resource_to_block_cache(url_or_file_path: Any) -> Any:
        _refuse_url(url_or_file_path)
        return stock_move(url_or_file_path)

    comp.async_move_resource_to_block_cache = async_move_resource_to_block_cache  # type: ignore[method-assign]
    comp.move_resource_to_block_cache = move_resource_to_block_cache  # type: ignore[method-assign]
    return comp


URL_REFUSED = "URLs are not fetched; upload the file instead."


def _refuse_url(url_or_file_path: Any) -> None:
    """Raise ``gr.Error`` when a payload names a URL instead of an uploaded file."""
    from gradio_client.utils import is_http_url_like

    if url_or_file_path is not None and is_http_url_like(str(url_or_file_path)):
        raise gr.Error(URL_REFUSED, title="URL not accepted", print_exception=False)


def _is_oom(e: BaseException) -> bool:
    """CUDA OOM (``torch.OutOfMemoryError``) or a CPU allocator failure (a plain ``RuntimeError``)."""
    from viz.errors import is_out_of_memory

    return is_out_of_memory(e)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the request cannot be served as asked" (shown to the user)."""
    from plugconv.backbones import BackboneUnavailable
    from plugconv.weights import WeightsError
    from viz.images import ImageError

    return (ImageError, WeightsError, BackboneUnavailable, ValueError, KeyError, torch.OutOfMemoryError)


def _drop_frames(e: BaseException | None) -> None:
    """Clear the locals of the finished frames in ``e``'s traceback (and its causes') and detach the
    traceback, so the activations and gradients those frames held can be freed."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if e.__traceback__ is not None:
            traceback.clear_frames(e.__traceback__)  # frames still executing are skipped
            e.__traceback__ = None
        e = e.__cause__ or e.__context__


def _load_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` (Linux), or None elsewhere (musl, macOS, Windows)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _load_malloc_trim()


def trim_freed_memory() -> None:
    """Hand heap pages freed by a finished request back to the OS (glibc ``malloc_trim(0)``, ≈ 20 ms
    after a ResNet-50 × 4 analysis; a no-op where it does not exist).

    An analysis allocates and frees hundreds of MB of activations from several threads; glibc keeps
    the freed pages in its arenas, so without this the resident size creeps up by ~10 % over the
    first tens of requests before it levels off (measured: ResNet-50 × 4, 14 analyses, 2062 → 2198
    MB; with it 1855 → 1880 MB).
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def release_memory(e: BaseException | None = None) -> None:
    """After an out-of-memory failure: log it, drop the traceback frames that keep the failed pass's
    tensors alive, collect, then return cached CUDA blocks to the driver (when CUDA is present)."""
    if e is not None:
        logger.warning("out of memory while running the models: %s", _message(e).splitlines()[0][:300])
        _drop_frames(e)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trim_freed_memory()


def to_gr_error(e: BaseException) -> gr.Error:
    """The ``gr.Error`` shown for a user-caused failure (out of memory gets advice and a cache flush)."""
    if isinstance(e, gr.Error):
        return e
    if _is_oom(e):
        release_memory(e)
        return gr.Error("Out of memory while running the models: choose fewer variants, a smaller backbone or "
                        "the CPU device, then try again.", title="Out of memory")
    from plugconv.backbones import BackboneUnavailable

    title = "Weights not available offline" if isinstance(e, BackboneUnavailable) else "Cannot do that"
    return gr.Error(_message(e), title=title, print_exception=False)


class _UserErrors:
    """``with _UserErrors():`` turns user-caused library errors into ``gr.Error``."""

    def __enter__(self) -> _UserErrors:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None and not isinstance(exc, gr.Error) and (isinstance(exc, user_errors()) or _is_oom(exc)):
            err = to_gr_error(exc)
            # ``from None``: the user sees only the message; with an out-of-memory error its
            # frames were already cleared (the tensors they held are free before the next request)
            del exc, tb
            raise err from None
        return False


# --------------------------------------------------------------------------------------------------
# choices shown in the controls


def backbone_choices(cfg: AppConfig) -> list[str]:
    """Backbones offered (only these names are ever loaded)."""
    if cfg.backbones is not None:
        return list(cfg.backbones)
    from plugconv.backbones import list_backbones

    return list_backbones()


def initial_backbone(cfg: AppConfig) -> tuple[str, str | None]:
    """``(backbone, note)``: the configured default, else a ResNet-50 whose weights are cached, else
    the bundled offline model with a note saying the ImageNet ResNets download when online."""
    from plugconv.backbones import DEFAULT_OFFLINE_BACKBONE, choose_default_backbone

    if cfg.default_backbone is not None:
        return cfg.default_backbone, None
    name, note = choose_default_backbone("resnet50")
    choices = backbone_choices(cfg)
    if name not in choices:
        name = DEFAULT_OFFLINE_BACKBONE if DEFAULT_OFFLINE_BACKBONE in choices else choices[0]
    if note:
        logger.warning("default backbone: %s", note)  # the full note (with server paths) stays in the log
        note = public_note(note)
        note += ". The torchvision ResNets download their ImageNet weights on first use when a network is available."
    return name, note


_ABS_PATH = re.compile(r"(?<![\w.:/])(?:/|[A-Za-z]:[\\/])[^\s()\[\];,'\"]*")


def public_note(text: str) -> str:
    """``text`` without server filesystem paths: the torch hub checkpoints folder becomes "the torch
    hub cache", any other absolute path its file name."""
    with contextlib.suppress(Exception):
        hub = str(Path(torch.hub.get_dir()) / "checkpoints")
        text = text.replace(hub, "the torch hub cache")

    def short(m: re.Match) -> str:
        parts = re.split(r"[\\/]", m.group(0).rstrip("/\\"))
        if parts[-2:] == ["hub", "checkpoints"]:
            return "the torch hub cache"
        name = parts[-1]
        return name or "a server folder"

    return _ABS_PATH.sub(short, text)


def weights_choices(cfg: AppConfig) -> list[tuple[str, str]]:
    """``(label, value)`` pairs: pretrained default, random, and each file in the weights directory."""
    from plugconv.weights import list_weights_files

    out = [("pretrained (ImageNet / bundled)", "default"), ("random initialisation", "random")]
    try:
        files = list_weights_files(cfg.weights_dir) if cfg.weights_dir is not None else []
    except (OSError, ValueError):
        files = []
    out += [(f"file: {f}", f) for f in files]
    return out


def refresh_weights(cfg: AppConfig) -> gr.Dropdown:
    """The weights dropdown with the files in the weights directory now (run at every page load,
    so a file added after the server started can be chosen)."""
    return gr.Dropdown(choices=weights_choices(cfg))


def variant_choices() -> list[str]:
    """Registered conv variants, the baseline ``conv`` first."""
    from plugconv import list_convs

    names = list_convs()
    return ["conv", *[n for n in names if n != "conv"]] if "conv" in names else names


def device_choices() -> list[tuple[str, str]]:
    """``(label, value)``: auto, cpu, and cuda when present (with the GPU's name)."""
    out = [("auto", "auto"), ("cpu", "cpu")]
    if torch.cuda.is_available():
        out.append((f"cuda ({torch.cuda.get_device_name(0)})", "cuda"))
    return out


def preset_choices(backbone: str) -> list[str]:
    """Site presets of ``backbone`` (``viz.models.site_presets``), the default first."""
    from viz.models import site_presets

    return list(site_presets(backbone))


def layer_choices(backbone: str) -> list[str]:
    """``"all stages"`` then the stage names of ``backbone``."""
    from viz.models import stage_names

    return [ALL_STAGES, *stage_names(backbone)]


# --------------------------------------------------------------------------------------------------
# models: loaded lazily, cached module-wide, read-only


def _check_choice(what: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        shown = ", ".join(map(str, choices))
        raise ValueError(f"unknown {what} {value!r}; choose one of {shown}")


def resolve_weights(cfg: AppConfig, weights: str) -> str:
    """``"default"``/``"random"``, or the resolved path of a file name inside ``cfg.weights_dir``.

    Raises:
        WeightsError: a name with ``..``, an absolute path, a symlink out of the directory, or a
            missing file (never a user path).
    """
    if weights in ("default", "random"):
        return weights
    from plugconv.weights import WeightsError, resolve_weights_file

    if cfg.weights_dir is None:
        raise WeightsError(f"weights file {weights!r} requested but no weights directory is configured")
    return str(resolve_weights_file(weights, cfg.weights_dir))


def get_backbone(cfg: AppConfig, name: str, weights: str, device: str):
    """The cached ``Backbone`` for (name, weights, device), loaded on first use.

    Raises:
        ValueError: unknown backbone/device; WeightsError; BackboneUnavailable (offline).
    """
    from plugconv.backbones import load_backbone, resolve_device

    _check_choice("backbone", name, backbone_choices(cfg))
    dev = resolve_device(device)
    resolve_weights(cfg, weights)  # refuses names outside the weights directory before anything loads

    def build():
        file_dir = None if weights in ("default", "random") else cfg.weights_dir
        bb = load_backbone(name, weights=weights, device=dev, weights_dir=file_dir)
        if cfg.input_size is not None and cfg.input_size != bb.input_size:
            bb = dataclasses.replace(bb, input_size=int(cfg.input_size))
        return bb

    return BACKBONES.get((name, weights, str(dev), cfg.input_size), build)


def _model_key(backbone, weights: str, variant: str, preset: str, calibrated: bool) -> tuple:
    return (backbone.name, weights, variant, preset, bool(calibrated), str(backbone.device), backbone.input_size)


def get_entry(backbone, weights: str, variant: str, preset: str, *, calibrated: bool = False):
    """The cached analysis copy (``viz.models.ModelEntry``) of ``variant`` in ``backbone``.

    With ``calibrated=True`` only an entry made by :func:`calibrate_variant` is returned (never a
    fit here); None when there is none.
    """
    from viz.models import prepare_model

    key = _model_key(backbone, weights, variant, preset, calibrated)
    if calibrated:
        return MODELS.peek(key)
    return MODELS.get(key, lambda: prepare_model(backbone, variant, preset=preset))


def needs_calibration(variant: str) -> bool:
    """True for variants whose swap is not function-preserving (``exact_transfer`` False)."""
    from plugconv import get_conv

    return variant != "conv" and not get_conv(variant).exact_transfer


def _temp_dir() -> Path:
    """A fresh per-request folder under ``GRADIO_TEMP_DIR`` (or the system temp dir); the oldest of
    more than ``_MAX_TEMP_DIRS`` are removed."""
    root = os.environ.get("GRADIO_TEMP_DIR") or tempfile.gettempdir()
    Path(root).mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix="plugconv-", dir=root))
    _TEMP_DIRS.append(d)
    while len(_TEMP_DIRS) > _MAX_TEMP_DIRS:
        shutil.rmtree(_TEMP_DIRS.popleft(), ignore_errors=True)
    return d


class Cancelled(BaseException):
    """Raised at a progress point when the request was cancelled (Stop, or the client went away).

    A ``BaseException``, like ``KeyboardInterrupt``: the optional phases of ``viz.analysis`` catch
    ``Exception`` and must not swallow it. Locks are released by their ``with`` blocks and a model
    whose build is interrupted is not cached (``LRUCache`` retries on the next request).
    """


#: the cancel flag of the request running in this context (set by :func:`run_cancellable`)
_CANCEL: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("plugconv_cancel", default=None)


def check_cancelled() -> None:
    """Raise :class:`Cancelled` when the current request has been cancelled."""
    ev = _CANCEL.get()
    if ev is not None and ev.is_set():
        raise Cancelled("the request was cancelled")


async def run_cancellable(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run the blocking ``fn`` in a worker thread with a per-request cancel flag.

    Gradio stops an event (Stop button ``cancels=[...]``, a closed tab) by cancelling the asyncio
    task that awaits the handler; a plain sync handler's thread would run on to the end. Here the
    cancellation sets the flag, and the worker raises :class:`Cancelled` at its next progress
    point (``_Progress.__call__``: between models and phases, every calibration step), so it stops
    early and frees the model queue.
    """
    cancel = threading.Event()
    token = _CANCEL.set(cancel)
    try:
        # asyncio.to_thread copies the context: the worker sees this request's flag (and Gradio's
        # progress context)
        return await asyncio.to_thread(fn, *args, **kwargs)
    except asyncio.CancelledError:
        cancel.set()
        raise
    finally:
        _CANCEL.reset(token)


class _Progress:
    """Adapts ``gr.Progress`` (or None) to the library's ``progress(fraction, message)``, mapping the
    fraction into ``[lo, hi]``; every call is also a cancel point (:func:`check_cancelled`)."""

    def __init__(self, progress: Any, lo: float = 0.0, hi: float = 1.0) -> None:
        self.progress, self.lo, self.hi = progress, lo, hi

    def __call__(self, fraction: float, message: str = "") -> None:
        check_cancelled()
        if self.progress is None:
            return
        f = self.lo + (self.hi - self.lo) * min(max(float(fraction), 0.0), 1.0)
        with contextlib.suppress(Exception):  # progress is cosmetic: never fail a request because of it
            self.progress(f, desc=message)

    def sub(self, lo: float, hi: float) -> _Progress:
        span = self.hi - self.lo
        return _Progress(self.progress, self.lo + span * lo, self.lo + span * hi)


# --------------------------------------------------------------------------------------------------
# the model-bound core (the only part that runs under spaces.GPU on ZeroGPU)


def _variants(variants: Sequence[str] | str | None) -> list[str]:
    if variants is None:
        return []
    if isinstance(variants, str):
        variants = [v.strip() for v in variants.split(",") if v.strip()]
    out: list[str] = []
    for v in variants:
        if v not in out:
            out.append(v)
    return out


def collect_entries(cfg: AppConfig, backbone, weights: str, variants: Sequence[str], preset: str,
                    *, use_calibrated: bool = True, progress: _Progress | None = None) -> list:
    """Prepared models for the requested variants (baseline first when selected), calibrated ones
    where Calibrate has run for this configuration and ``use_calibrated`` is set.

    Raises:
        ValueError: no variant selected, an unknown variant or preset (message lists the choices).
    """
    names = _variants(variants)
    if not names:
        raise ValueError("select at least one variant to compare (the baseline is 'conv')")
    choices = variant_choices()
    for v in names:
        _check_choice("variant", v, choices)
    _check_choice("site preset", preset, preset_choices(backbone.name))
    entries = []
    for i, v in enumerate(names):
        if progress is not None:
            progress(i / len(names), f"preparing {v}")
        entry = get_entry(backbone, weights, v, preset, calibrated=True) if use_calibrated else None
        entries.append(entry if entry is not None else get_entry(backbone, weights, v, preset))
    return entries


def analyze_core(cfg: AppConfig, image_src: Any, backbone: str, weights: str, variants: Sequence[str] | str,
                 preset: str, layer: str, device: str, use_calibrated: bool = True,
                 progress: Any = None):
    """Load the image and models, then run ``viz.analysis.analyze`` once for all of them.

    The image, the backbone and the prepared models are loaded and cached here, in the main
    process; only the passes (:func:`analyze_on_device`) run under ``spaces.GPU``, which on ZeroGPU
    is a forked worker whose module state (the model caches) is thrown away.

    Args:
        cfg: app settings.
        image_src: a file path (what ``gr.Image(type="filepath")`` passes), a PIL image or an
            H×W×3 array; loaded with ``viz.images.load_image`` (clear ImageError messages).
        backbone, weights, variants, preset, layer, device: the controls' values.
        use_calibrated: use calibrated entries where Calibrate has made them.
        progress: ``gr.Progress`` or None.

    Returns:
        ``(analysis, profiles)``: the ``viz.analysis.Analysis`` (raw data on the CPU, picklable) and
        model label -> ``viz.cost.profile_model`` dict (empty when ``cfg.profile`` is off).

    Raises:
        gr.Error: for everything the user can cause.
    """
    from viz.images import load_image

    prog = _Progress(progress)
    with _UserErrors():
        if image_src is None:
            raise ValueError("no image: upload one, paste one, use the webcam or pick an example")
        image = load_image(image_src, max_pixels=cfg.max_pixels)
        prog(0.02, f"loading {backbone}")
        bb = get_backbone(cfg, backbone, weights, device)
        entries = collect_entries(cfg, bb, weights, variants, preset, use_calibrated=use_calibrated,
                                  progress=prog.sub(0.05, 0.2))
        if layer in (None, "", ALL_STAGES):
            layers, erf_layer = None, None
        else:
            _check_choice("layer", layer, layer_choices(bb.name))
            layers, erf_layer = [layer], layer
        return analyze_on_device(cfg, image, bb, entries, layers, erf_layer, progress)


@gpu(duration=120)
def analyze_on_device(cfg: AppConfig, image: Any, bb, entries: Sequence[Any], layers: list[str] | None,
                      erf_layer: str | None, progress: Any = None):
    """The passes of one analysis on prepared models (the part that needs the accelerator).

    Touches no app cache (``BACKBONES``, ``MODELS``, ``REPORTS``): on ZeroGPU this runs in a forked
    worker and only its return value comes back.
    """
    from viz.analysis import analyze

    prog = _Progress(progress)
    with _UserErrors():
        analysis = analyze([image], bb, entries, layers=layers, erf=cfg.erf, redundancy=cfg.redundancy,
                           profile=False, erf_layer=erf_layer, progress=prog.sub(0.2, 0.85 if cfg.profile else 0.9))
        profiles: dict[str, dict[str, Any]] = {}
        if cfg.profile:
            # cost is image-independent: one viz.cost profile per model, cached, feeds both the
            # Overview numbers (ModelResult.cost) and the Profile charts. Latency is timed only on
            # demand (Profile tab) unless configured; a latency measured earlier is reused.
            sub = prog.sub(0.85, 0.9)
            for i, (entry, res) in enumerate(zip(entries, analysis.models)):
                sub(i / len(entries), f"{entry.label}: params and FLOPs")
                profiles[entry.label] = model_profile(entry, bb, repeats=cfg.profile_repeats, warmup=cfg.profile_warmup,
                                                      latency=cfg.latency_on_analyze)
                res.cost = profiles[entry.label]
        return analysis, profiles


#: models whose latency has been measured: model -> {(device, input size)} (weak: dies with the model)
_TIMED: weakref.WeakKeyDictionary[torch.nn.Module, set[tuple[str, int]]] = weakref.WeakKeyDictionary()


def latency_measured(entry, backbone) -> bool:
    """True when ``entry``'s latency at the backbone's device and input size is already cached."""
    return (str(backbone.device), int(backbone.input_size)) in _TIMED.get(entry.model, set())


def model_profile(entry, backbone, *, repeats: int = 10, warmup: int = 3, latency: bool = True) -> dict[str, Any]:
    """``viz.cost.profile_model`` of a prepared model at the backbone's input size and device,
    through ``viz.analysis.cached_profile``: cached for as long as the model lives, shared with
    ``analyze`` (cost does not depend on the image).

    Args:
        entry: the prepared model.
        backbone: its backbone (device, input size).
        repeats, warmup: timed and warm-up passes when latency is measured.
        latency: measure latency (whole model and per layer) when not cached yet. With False the
            result has params and FLOPs only (one counted pass, ``"latency": None``, no ACB deploy form) — unless a
            latency was measured before, which is then returned (it is cached and still valid).
    """
    from viz.analysis import cached_profile

    key = (str(backbone.device), int(backbone.input_size))
    with entry.lock:
        if latency or latency_measured(entry, backbone):
            out = cached_profile(entry.model, key[1], device=backbone.device, repeats=repeats, warmup=warmup)
            _TIMED.setdefault(entry.model, set()).add(key)
            return out
        # params and FLOPs for the Overview: the deploy form of ACB (fused copy + its own FLOP count,
        # ≈ 0.7 s for ResNet-50) comes with the latency profile, which the Profile tab shows
        return cached_profile(entry.model, key[1], device=backbone.device, latency=False, deploy=False)


def profile_core(cfg: AppConfig, backbone: str, weights: str, variants: Sequence[str] | str, preset: str,
                 device: str, use_calibrated: bool = True, progress: Any = None,
                 latency: bool = True) -> dict[str, dict[str, Any]]:
    """Cost profile (params, FLOPs, latency per layer and whole model) of each selected model.

    Args:
        latency: time the models whose latency is not cached yet; False gives params and FLOPs
            (plus any latency already measured).

    Returns:
        model label -> ``viz.cost.profile_model`` dict (what ``viz.charts`` draws).
    """
    prog = _Progress(progress)
    with _UserErrors():
        bb = get_backbone(cfg, backbone, weights, device)  # loaded and cached in the main process
        entries = collect_entries(cfg, bb, weights, variants, preset, use_calibrated=use_calibrated,
                                  progress=prog.sub(0.0, 0.2))
        return profile_on_device(cfg, bb, entries, latency, progress)


@gpu(duration=60)
def profile_on_device(cfg: AppConfig, bb, entries: Sequence[Any], latency: bool = True,
                      progress: Any = None) -> dict[str, dict[str, Any]]:
    """The counted and timed passes of :func:`profile_core` (touches no app model cache)."""
    prog = _Progress(progress)
    with _UserErrors():
        out = {}
        for i, e in enumerate(entries):
            prog(0.2 + 0.8 * i / len(entries), f"{e.label}: {'latency' if latency else 'params and FLOPs'}")
            out[e.label] = model_profile(e, bb, repeats=cfg.profile_repeats, warmup=cfg.profile_warmup,
                                         latency=latency)
        return out


def calibration_images(cfg: AppConfig) -> list:
    """The calibration photos: the example images (the same set every time, so results cache)."""
    from viz.images import load_image

    return [load_image(p) for p in cfg.example_paths()]


def calibrate_core(cfg: AppConfig, backbone: str, weights: str, variants: Sequence[str] | str, preset: str,
                   device: str, progress: Any = None) -> list[dict[str, Any]]:
    """Calibrate every selected variant without exact transfer (cached once per configuration on
    disk by ``plugconv.calibrate.calibrate_cached``) and keep the calibrated analysis copies in the
    model cache, so the next analysis uses them.

    Returns:
        One ``CalibrationReport.to_dict()`` per calibrated variant, with ``label`` added.
    """
    from viz.models import ModelEntry, make_analysis_copy, site_presets

    prog = _Progress(progress)
    with _UserErrors():
        bb = get_backbone(cfg, backbone, weights, device)
        names = [v for v in _variants(variants) if v in variant_choices()]
        _check_choice("site preset", preset, preset_choices(bb.name))
        todo = [v for v in names if needs_calibration(v)]
        if not todo:
            raise ValueError("nothing to calibrate: the selected variants transfer the original convs exactly "
                             f"({', '.join(names) or 'none selected'}); calibration applies to "
                             f"{', '.join(v for v in variant_choices() if needs_calibration(v))}")
        images = calibration_images(cfg)
        if not images:
            raise ValueError("no calibration images: the assets folder has no photos")
        from plugconv import swap_convs

        reports = []
        spec = site_presets(bb.name)[preset]
        for i, v in enumerate(todo):
            sub = prog.sub(i / len(todo), (i + 1) / len(todo))
            sub(0.0, f"{v}: swapping")
            swap = swap_convs(bb.model, v, include=spec["include"], exclude=spec["exclude"],
                              probe_size=bb.input_size)
            if not swap.swapped:
                reports.append({"label": v, "variant": v, "skipped": "no site could take this variant"})
                continue
            rep = calibrate_on_device(cfg, bb, swap, images, v, sub)
            # the calibrated state comes back from the (on ZeroGPU: forked) GPU worker; the entry is
            # made and cached here, in the main process
            result = rep.swap if rep.swap is not None else swap
            make_analysis_copy(result.model)
            entry = ModelEntry(label=f"{v} (calibrated)", variant=v, model=result.model, swap=result,
                               preset=preset, backbone=bb.name)
            MODELS.put(_model_key(bb, weights, v, preset, True), entry)
            reports.append({"label": entry.label, **rep.to_dict()})
        return reports


@gpu(duration=300)
def calibrate_on_device(cfg: AppConfig, bb, swap, images: Sequence[Any], variant: str, progress: _Progress):
    """Fit one swapped model (``plugconv.calibrate.calibrate_cached``, on-disk cache) and return the
    ``CalibrationReport`` with the calibrated swap; touches no app model cache."""
    from plugconv.calibrate import calibrate_cached

    with _UserErrors():
        kw: dict[str, Any] = {"mean": list(bb.mean), "std": list(bb.std), "device": bb.device,
                              "progress": lambda f, m: progress(f, f"{variant}: {m}")}
        kw.update(dict(cfg.calibration_options))
        return calibrate_cached(bb.name, bb.weights, swap, bb.model, images, cache_dir=cfg.calibration_dir, **kw)


# --------------------------------------------------------------------------------------------------
# rendering: Analysis -> what each panel shows (CPU only, outside the GPU context)


def taps_frame(report: dict[str, Any]) -> pd.DataFrame:
    """One row per tap of every model: site, kind, shape, range, mean and the headline statistic."""
    rows = []
    for m in report.get("models", []):
        for t in m.get("taps", []):
            stats = t.get("stats") or {}
            headline = "; ".join(f"{k} = {v:.3g}" if isinstance(v, float) else f"{k} = {v}"
                                 for k, v in stats.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool))
            rows.append({
                "model": m.get("label"), "site": t.get("site"), "tap": t.get("local"), "kind": t.get("kind"),
                "shape": "×".join(map(str, t.get("shape", []))),
                "min": _r(t.get("min")), "max": _r(t.get("max")), "mean": _r(t.get("mean")),
                "summary": headline[:300], "notes": "; ".join(t.get("notes") or []),
            })
    cols = ["model", "site", "tap", "kind", "shape", "min", "max", "mean", "summary", "notes"]
    return pd.DataFrame(rows, columns=cols)


def _r(x: Any, nd: int = 4) -> Any:
    return round(float(x), nd) if isinstance(x, (int, float)) and not isinstance(x, bool) else x


def erf_frame(report: dict[str, Any]) -> pd.DataFrame:
    """Per model: ERF area ratios at 20/30/50/99 %, r50/r90 (fraction of the input) and the
    theoretical RF at the same stage."""
    rows = []
    for m in report.get("models", []):
        e = m.get("erf") or {}
        rat = e.get("area_ratios") or {}
        row: dict[str, Any] = {"model": m.get("label"), "stage": e.get("layer", report.get("erf_layer"))}
        for t in ("0.2", "0.3", "0.5", "0.99"):
            v = rat.get(t)
            row[f"area {int(float(t) * 100)}%"] = None if v is None else _r(v.get("ratio"))
        row["r50 (frac)"] = _r(e.get("r50_frac"))
        row["r90 (frac)"] = _r(e.get("r90_frac"))
        trf = m.get("theoretical_rf") or {}
        row["theoretical RF"] = _theoretical_rf_text(trf)
        rows.append(row)
    return pd.DataFrame(rows)


def _theoretical_rf_text(trf: Any) -> str:
    if not trf:
        return "–"
    if isinstance(trf, dict):
        if isinstance(trf.get("label"), str) and trf["label"]:
            # the library's own wording: local size, clipping and "global (via …)" (SAConv's
            # global context, SCConv/self-calibration pooling), which the bare number hides
            return trf["label"][:200]
        for k in ("rf", "r", "size", "local_rf"):
            if isinstance(trf.get(k), (int, float)):
                s = f"{trf[k]:g} px"
                notes = trf.get("notes") or trf.get("note")
                return s + (f" ({'; '.join(notes) if isinstance(notes, list) else notes})" if notes else "")
    return str(trf)[:200]


def profile_frame(profiles: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """Per model and layer: params, FLOPs, MACs and latency (the sortable Profile table), each
    model's whole-network row first."""
    rows = []
    for label, p in profiles.items():
        lat = p.get("latency") or {}
        flops = p.get("flops") or {}
        rows.append({"model": label, "layer": "(whole model)", "type": "", "params": (p.get("params") or {}).get("total"),
                     "FLOPs": flops.get("total_flops"), "MACs": flops.get("total_macs"),
                     "latency (ms)": _r(lat.get("median_ms"), 3)})
        for u in p.get("units", []):
            rows.append({"model": label, "layer": u.get("name"), "type": u.get("type"), "params": u.get("params"),
                         "FLOPs": u.get("flops"), "MACs": u.get("macs"), "latency (ms)": _r(u.get("latency_ms"), 3)})
    return pd.DataFrame(rows, columns=["model", "layer", "type", "params", "FLOPs", "MACs", "latency (ms)"])


def profile_charts(profiles: dict[str, dict[str, Any]]) -> tuple[Any, Any, Any, Any]:
    """``(whole-model summary, per-layer latency, per-layer params, per-layer FLOPs)`` plotly figures
    (None each when there is nothing to draw)."""
    if not profiles:
        return None, None, None, None
    from viz import charts

    has_latency = any(p.get("latency") for p in profiles.values())
    return (
        charts.cost_summary(profiles),
        charts.latency_chart(profiles) if has_latency else None,
        charts.params_chart(profiles),
        charts.flops_chart(profiles, unit="FLOPs"),
    )


def _plot_or_none(build: Callable[[], Any]) -> Any:
    """A chart, or None when its data is missing (ValueError/KeyError from the builder)."""
    try:
        return build()
    except (ValueError, KeyError, TypeError):
        return None


def redundancy_charts(analysis, layer: str | None) -> tuple[Any, Any, Any]:
    """``(redundancy by depth, channel-similarity matrices at one layer, CKA vs the first model)``."""
    from viz import charts

    metrics = {m.label: {k: v for k, v in m.redundancy.items() if isinstance(v, dict) and "error" not in v}
               for m in analysis.models}
    metrics = {k: v for k, v in metrics.items() if v}
    red = _plot_or_none(lambda: charts.redundancy_by_depth(metrics)) if metrics else None
    at = layer if layer in analysis.layers else (analysis.layers[-1] if analysis.layers else None)
    sims = {m.label: m.redundancy[at]["similarity"] for m in analysis.models
            if at is not None and isinstance(m.redundancy.get(at), dict) and m.redundancy[at].get("similarity") is not None}
    sim = _plot_or_none(lambda: charts.similarity_grid(sims, title=f"channel similarity at {at} (cosine)")) if sims else None
    cka = None
    if analysis.cka and len(analysis.models) > 1:
        labels = [m.label for m in analysis.models[1:]]
        rows = [ly for ly in analysis.layers if ly in analysis.cka]
        matrix = [[analysis.cka[ly].get(lb, float("nan")) for lb in labels] for ly in rows]
        cka = _plot_or_none(lambda: charts.cka_heatmap(
            {"rows": rows, "cols": labels, "matrix": matrix, "mode": "positions", "estimator": "linear CKA",
             "notes": []},
            title=f"linear CKA with {analysis.models[0].label}, same stage", row_title="stage", col_title="model"))
    return red, sim, cka


def gradcam_legend(analysis, mode: str) -> str:
    """The markdown under the Grad-CAM grid: what is drawn, for which class, in which colour mode."""
    cls = analysis.targets[0] if analysis.targets else None
    return (
        "Raw signed Grad-CAM M = Σ_k α_k A_k over the crop the model sees (diverging colours centred on 0: "
        "red = evidence for the class, blue = against) for class "
        f"**{html.escape(analysis.label_of(cls)) if cls is not None else '?'}** ({html.escape(analysis.target_rule)}); "
        f"score = pre-softmax logit. Columns: models, rows: stages. Colour scale: **{html.escape(mode)}**; every "
        "panel states its numeric range."
    )


def _figure_builders(analysis, mode: str) -> dict[str, Callable[[], Any]]:
    """name -> builder of the composite figures an analysis has data for (gradcam, taps, erf)."""
    from viz import figures as vf

    figs: dict[str, Callable[[], Any]] = {}
    if analysis.models and analysis.layers and any(m.cams for m in analysis.models):
        figs["gradcam"] = lambda: vf.gradcam_grid(analysis, 0, mode=mode)
    if any(m.taps for m in analysis.models):
        figs["taps"] = lambda: vf.tap_maps(analysis, 0)
    erfs = {m.label: m.erf for m in analysis.models if m.erf is not None}
    if erfs:
        from viz.report import _prov_text

        figs["erf"] = lambda: vf.erf_figure(erfs, theoretical={m.label: m.theoretical_rf for m in analysis.models},
                                            provenance={m.label: _prov_text(m.swap) for m in analysis.models})
    return figs


def draw_figures(analysis, mode: str, out_dir: Path, names: Sequence[str]) -> dict[str, str | None]:
    """Draw the composite figures ``names`` (each once: one already in ``analysis.files`` and on disk
    is reused) as ``out_dir/figures/<name>.png``; returns name -> path (None when there is no data)."""
    from viz import figures as vf

    builders = _figure_builders(analysis, mode)
    out: dict[str, str | None] = {}
    for name in names:
        rel = f"figures/{name}.png"
        path = out_dir / rel
        if name not in builders:
            out[name] = None
            continue
        if analysis.files.get(f"figure/{name}") != rel or not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(vf.figure_png(builders[name]()))
            analysis.files[f"figure/{name}"] = rel
        out[name] = str(path)
    return out


def write_outputs(analysis, mode: str, out_dir: Path, figures: Sequence[str] = ("gradcam",)) -> dict[str, Any]:
    """Draw the figures the first view shows and write report.json into ``out_dir``.

    Only the Grad-CAM grid is drawn by default (``figures/gradcam.png``): the module maps and the
    ERF figure belong to tabs that :func:`maps_panels` draws when they are opened, and the rest of
    the downloadable report (per-panel PNGs, report.html, a zip) is written by
    :func:`prepare_downloads` when asked for, reusing every figure already drawn.

    Returns:
        ``{"gradcam", "taps", "erf"}``: composite figure PNG paths (None when not drawn or absent),
        ``"gradcam_legend"``: markdown, ``"downloads"``: ``[report.json]``, ``"report"``: its content.
    """
    out: dict[str, Any] = {"gradcam": None, "taps": None, "erf": None}
    out.update(draw_figures(analysis, mode, out_dir, figures))
    report_json = out_dir / "report.json"
    out["report"] = analysis.to_dict()
    report_json.write_text(json.dumps(out["report"], indent=1, allow_nan=False, default=str), encoding="utf-8")
    out["gradcam_legend"] = gradcam_legend(analysis, mode)
    out["downloads"] = [str(report_json)]
    return out


class _NotesOnly:
    """Stands in for a ``viz.recorder.Record`` in a kept analysis: ``Analysis.to_dict`` reads only
    ``record.notes``; the activations and gradients are dropped (they are large)."""

    def __init__(self, notes: Sequence[str]) -> None:
        self.notes = list(notes)


def similarity_layer(analysis, layer: str | None) -> str | None:
    """The layer whose channel-similarity matrices the Redundancy tab shows (the chosen one, else the last)."""
    return layer if layer in analysis.layers else (analysis.layers[-1] if analysis.layers else None)


def _light_copy(analysis, layer: str | None = None):
    """A copy of ``analysis`` kept for the lazily drawn tabs and "Prepare downloads": no activations,
    and only the similarity matrix of the displayed layer (float32, ≤ 256² per model)."""
    at = similarity_layer(analysis, layer)
    models = []
    for m in analysis.models:
        red = {}
        for k, v in m.redundancy.items():
            if not isinstance(v, dict):
                red[k] = v
                continue
            red[k] = {kk: vv for kk, vv in v.items() if kk != "similarity"}
            sim = v.get("similarity")
            if k == at and isinstance(sim, dict) and sim.get("matrix") is not None:
                red[k]["similarity"] = {**sim, "matrix": np.asarray(sim["matrix"], dtype=np.float32)}
        models.append(dataclasses.replace(m, record=_NotesOnly(getattr(m.record, "notes", ())), redundancy=red))
    return dataclasses.replace(analysis, models=models, files=dict(analysis.files))


def keep_for_downloads(analysis, mode: str, out_dir: Path, layer: str | None = None) -> str:
    """Keep a light copy of ``analysis`` under a new report id (what :func:`maps_panels` and
    :func:`prepare_downloads` take)."""
    rid = out_dir.name
    REPORTS.put(rid, (_light_copy(analysis, layer), mode, out_dir, layer))
    return rid


def prepare_downloads(report_id: str | None) -> list[str]:
    """The ``/prepare_downloads`` endpoint: write the full report of an earlier analysis.

    Writes (``viz.report.write_report``, reusing the figures already drawn) report.json, the
    per-panel PNGs and report.html into the analysis' folder, plus a zip of everything.

    Args:
        report_id: the id ``/analyze`` returned (its last output).

    Returns:
        Paths: report.json, report.html, the composite figures, the zip.

    Raises:
        gr.Error: no analysis yet, or one too old to be kept.
    """
    if not report_id:
        raise gr.Error("Run Analyze first: downloads are prepared from the last analysis.", title="Nothing to download")
    kept = REPORTS.peek(report_id)
    if kept is None or not kept[2].is_dir():
        raise gr.Error("That analysis is no longer kept on the server: run Analyze again, then prepare the downloads.",
                       title="Analysis expired")
    analysis, mode, out_dir, _ = kept
    from viz.report import write_report

    report_json = write_report(analysis, out_dir, mode=mode, reuse_figures=True)
    files = [str(report_json)]
    if (out_dir / "report.html").is_file():
        files.append(str(out_dir / "report.html"))
    for name in ("gradcam", "taps", "erf"):
        rel = analysis.files.get(f"figure/{name}")
        if rel and (out_dir / rel).is_file():
            files.append(str(out_dir / rel))
    final = out_dir / "plugconv-report.zip"
    final.unlink(missing_ok=True)
    archive = shutil.make_archive(str(out_dir.parent / f"{out_dir.name}-report"), "zip", root_dir=out_dir)
    shutil.move(archive, final)
    files.append(str(final))
    return files


#: the panels of the tabs that are drawn when opened (:func:`maps_panels`), per tab id
MAP_TABS: dict[str, tuple[str, ...]] = {"redundancy": ("taps", "redundancy", "similarity", "cka"), "rf": ("erf",)}
MAP_OUTPUTS = ("taps", "redundancy", "similarity", "cka", "erf")
TAB_IDS = ("overview", "gradcam", "redundancy", "rf", "profile", "calibration", "downloads")
#: (report id, tab) -> {output: value}: each tab of an analysis is drawn once (``LRUCache.get``
#: builds a key once even when two requests ask together, and caches no failed build)
_MAPS: LRUCache = LRUCache(16)


def render_panels(analysis, profiles: dict[str, dict[str, Any]], mode: str, out_dir: Path,
                  layer: str | None = None) -> dict[str, Any]:
    """The panels of one analysis that the first view needs (keys: ``ANALYZE_OUTPUTS`` without
    ``status``, plus ``report``, the ``Analysis.to_dict()``).

    Drawn now: the Overview, the Grad-CAM grid, the tables and the cost charts. The module maps,
    redundancy charts and ERF figure (``MAP_OUTPUTS``) are None here: the Redundancy and Receptive
    field tabs draw them when opened (:func:`maps_panels`, once per analysis), so a click on
    Analyze does not wait for pictures nobody looks at.
    """
    from viz import ui

    images = write_outputs(analysis, mode, out_dir)
    report = images["report"]
    summary, latency, params, flops = profile_charts(profiles)
    return {
        "report": report,
        "banners": ui.banners_html(report),
        "overview": ui.overview_html(report),
        "summary": ui.summary_frame(report),
        "gradcam": images["gradcam"],
        "gradcam_legend": images["gradcam_legend"],
        "taps": None,
        "taps_table": taps_frame(report),
        "redundancy": None,
        "similarity": None,
        "cka": None,
        "erf": None,
        "erf_table": erf_frame(report),
        "profile_summary": summary,
        "profile_latency": latency,
        "profile_params": params,
        "profile_flops": flops,
        "profile_table": profile_frame(profiles),
        "downloads": images["downloads"],
        "report_id": keep_for_downloads(analysis, mode, out_dir, layer),
    }


def maps_panels(report_id: str | None, tab: str = "all") -> dict[str, Any]:
    """The ``/maps`` endpoint: the figures of the Redundancy and Receptive field tabs of an analysis.

    Args:
        report_id: the id ``/analyze`` returned (its last output).
        tab: ``"redundancy"`` (module maps, redundancy by depth, similarity matrices, CKA), ``"rf"``
            (ERF figure) or ``"all"``.

    Returns:
        ``{output name: value}`` for the tab's ``MAP_OUTPUTS`` (figure paths, plotly figures; None
        where the analysis has no data). Each tab is drawn once per analysis and then served from
        a cache; the PNGs land in the analysis' folder, so "Prepare downloads" reuses them.

    Raises:
        gr.Error: no analysis yet, an analysis no longer kept, or an unknown tab.
    """
    if tab not in (*MAP_TABS, "all"):
        raise gr.Error(f"unknown tab {tab!r}; choose one of {[*MAP_TABS, 'all']}", title="Unknown tab")
    if not report_id:
        raise gr.Error("Run Analyze first: this tab is drawn from the last analysis.", title="Nothing to show")
    kept = REPORTS.peek(report_id)
    if kept is None or not kept[2].is_dir():
        raise gr.Error("That analysis is no longer kept on the server: run Analyze again.", title="Analysis expired")
    analysis, mode, out_dir, layer = kept

    def draw(t: str) -> dict[str, Any]:
        with _UserErrors():
            if t == "rf":
                return {"erf": draw_figures(analysis, mode, out_dir, ["erf"])["erf"]}
            red, sim, cka = redundancy_charts(analysis, similarity_layer(analysis, layer))
            return {"taps": draw_figures(analysis, mode, out_dir, ["taps"])["taps"], "redundancy": red,
                    "similarity": sim, "cka": cka}

    out: dict[str, Any] = {}
    for t in (MAP_TABS if tab == "all" else (tab,)):
        out.update(_MAPS.get((report_id, t), lambda t=t: draw(t)))
    return out


def status_line(report: dict[str, Any], seconds: float) -> str:
    """The one-line summary above the panels."""
    t = report.get("target") or {}
    labels = t.get("labels") or []
    target = f"Grad-CAM explains **{html.escape(labels[0])}** ({t.get('rule', '')})" if labels else ""
    n = len(report.get("models", []))
    untimed = [str(m.get("label")) for m in report.get("models", []) if m.get("latency_ms") is None]
    lat = ""
    if untimed and any(m.get("params") is not None for m in report.get("models", [])):
        lat = " Latency: not measured yet — open the **Profile** tab."
    return (f"Analysed {n} model{'s' if n != 1 else ''} on {report.get('backbone')} "
            f"({report.get('device')}, {report.get('input_size')} px) in {seconds:.1f} s. {target}{lat}")



def analyze_panels(cfg: AppConfig, image_src: Any, backbone: str, weights: str, variants: Sequence[str] | str,
                   preset: str, layer: str, scale: str, device: str, use_calibrated: bool = True,
                   progress: Any = None) -> tuple:
    """The ``/analyze`` endpoint: one analysis, the panels of the first view (``ANALYZE_OUTPUTS`` order).

    Every number is computed (predictions, Grad-CAM, taps, ERF, redundancy, CKA, params, FLOPs)
    and written to report.json, but only the first view's figures are drawn (the Grad-CAM grid,
    the tables, the cost charts): ``MAP_OUTPUTS`` come back None and the Redundancy and Receptive
    field tabs draw them when opened (``/maps`` with the returned ``report_id``). Latency is left to
    the Profile tab unless ``cfg.latency_on_analyze``; ``report_id`` is also what
    :func:`prepare_downloads` takes to write the full downloadable report.

    Raises:
        gr.Error: for everything the user can cause (bad image, unknown choice, offline weights,
            bad weights file, out of memory).
    """
    t0 = time.perf_counter()
    with _UserErrors():
        mode = SCALE_MODES.get(scale, scale)
        from viz.gradcam import COLOR_MODES

        _check_choice("colour scale", mode, COLOR_MODES)
    analysis, profiles = analyze_core(cfg, image_src, backbone, weights, variants, preset, layer, device, use_calibrated,
                            progress)
    prog = _Progress(progress, 0.9, 1.0)
    prog(0.0, "drawing")
    out_dir = _temp_dir()
    with _UserErrors():
        panels = render_panels(analysis, profiles, mode, out_dir, layer)
    report = panels["report"]
    prog(1.0, "done")
    trim_freed_memory()
    status = status_line(report, time.perf_counter() - t0)
    return tuple(panels[k] if k != "status" else status for k in ANALYZE_OUTPUTS)


def profile_panels(cfg: AppConfig, backbone: str, weights: str, variants: Sequence[str] | str, preset: str,
                   device: str, use_calibrated: bool = True, progress: Any = None, measure_latency: bool = True) -> tuple:
    """The ``/profile`` endpoint: status, then per-layer latency, params and FLOPs (``PROFILE_OUTPUTS``).

    Args:
        measure_latency: time the models (``cfg.profile_warmup`` + ``cfg.profile_repeats`` passes,
            cached per model); False shows params and FLOPs and any latency already measured.
    """
    t0 = time.perf_counter()
    profiles = profile_core(cfg, backbone, weights, variants, preset, device, use_calibrated, progress,
                            latency=measure_latency)
    trim_freed_memory()
    untimed = [k for k, p in profiles.items() if not p.get("latency")]
    status = f"Profiled {len(profiles)} model(s) in {time.perf_counter() - t0:.1f} s."
    if untimed:
        status += (f" Latency not measured yet for {', '.join(untimed)}: press **Measure latency** "
                   "(or open this tab again).")
    else:
        status += (f" Latency: median of {cfg.profile_repeats} timed passes after {cfg.profile_warmup} warm-up, "
                   "cached per model and device.")
    return (status, *profile_charts(profiles), profile_frame(profiles))


def refresh_overview(cfg: AppConfig, report_id: str | None, backbone: str, weights: str,
                     variants: Sequence[str] | str, preset: str, device: str, use_calibrated: bool = True) -> tuple:
    """After the Profile tab has timed the models: the Overview cards and summary table of the last
    analysis again, with the latency now cached for its models (no pass is run: params, FLOPs and
    any measured latency come from the cost cache).

    Only models of the kept analysis whose label, backbone, weights, device and input size match
    the current controls take the new numbers; with nothing to update both outputs are skipped.

    Returns:
        ``(overview HTML, summary DataFrame)`` or ``(gr.skip(), gr.skip())``.
    """
    from viz import ui

    kept = REPORTS.peek(report_id) if report_id else None
    if kept is None:
        return gr.skip(), gr.skip()
    analysis = kept[0]
    with _UserErrors():
        bb = get_backbone(cfg, backbone, weights, device)
    same = (analysis.backbone == bb.name and analysis.input_size == int(bb.input_size)
            and str(analysis.device) == str(bb.device)
            and (not analysis.weights or not hasattr(bb.weights, "to_dict") or analysis.weights == bb.weights.to_dict()))
    if not same:
        return gr.skip(), gr.skip()
    profiles = profile_core(cfg, backbone, weights, variants, preset, device, use_calibrated, None, latency=False)
    changed = False
    for m in analysis.models:
        p = profiles.get(m.label)
        if p is not None and p.get("latency") and m.cost is not p:
            m.cost = p
            changed = True
    if not changed:
        return gr.skip(), gr.skip()
    report = analysis.to_dict()
    return ui.overview_html(report), ui.summary_frame(report)


def calibrate_panel(cfg: AppConfig, backbone: str, weights: str, variants: Sequence[str] | str, preset: str,
                    device: str, progress: Any = None) -> tuple[str, list[dict[str, Any]]]:
    """The ``/calibrate`` endpoint: a plain-words summary and the reports."""
    reports = calibrate_core(cfg, backbone, weights, variants, preset, device, progress)
    trim_freed_memory()
    lines = []
    for r in reports:
        if "skipped" in r:
            lines.append(f"- **{html.escape(r['label'])}**: {html.escape(r['skipped'])}")
            continue
        agree = r.get("top1_agreement", {})
        worst = max((s.get("error_after", 0.0) for s in r.get("sites", [])), default=0.0)
        src = "loaded from the cache" if r.get("from_cache") else f"fitted in {r.get('wall_time_s', 0):.1f} s"
        lines.append(
            f"- **{html.escape(r['label'])}**: {len(r.get('sites', []))} sites {src}; worst site relative error "
            f"{worst:.3f}; top-1 agreement with the original network {agree.get('before', 0):.0%} → "
            f"{agree.get('after', 0):.0%}."
        )
    text = "Calibrated (analyses now use these weights while *Use calibrated weights* is ticked):\n" + "\n".join(lines)
    return text, reports


# --------------------------------------------------------------------------------------------------
# the UI

INTRO = """# plugconv · plug-and-play convolutions, side by side
Upload a photo, pick a backbone and the conv variants to compare — SCConv (`scconv`), SAConv (`saconv`),
self-calibrated conv (`selfcal`), SPConv (`spconv`), ACNet's ACB (`acb`) — next to the unchanged baseline (`conv`).
Each column is one network: predictions, Grad-CAM, the modules' internal maps, receptive fields and cost."""

PROFILE_OUTPUTS = ("profile_summary", "profile_latency", "profile_params", "profile_flops", "profile_table")
ANALYZE_OUTPUTS = (
    "status", "banners", "overview", "summary", "gradcam", "gradcam_legend", "taps", "taps_table",
    "redundancy", "similarity", "cka", "erf", "erf_table", *PROFILE_OUTPUTS, "downloads", "report_id",
)


def build_demo(config: AppConfig | None = None) -> gr.Blocks:
    """Build the app (nothing is loaded until the first request).

    Args:
        config: settings (default ``AppConfig()``); the queue (``api_open=False``, ``max_size``,
            one concurrency group for every model event) is configured here. Launch it with
            :func:`launch` (which adds ``max_file_size``, ``show_error=False``,
            ``enable_monitoring=False`` and the footer without the API link).

    Returns:
        gr.Blocks with the named endpoints ``/analyze``, ``/profile``, ``/calibrate`` and
        ``/prepare_downloads``.
    """
    cfg = config or AppConfig()
    if MODELS.maxsize != cfg.max_models:
        MODELS.maxsize = max(1, int(cfg.max_models))
    if REPORTS.maxsize != cfg.max_reports:
        REPORTS.maxsize = max(1, int(cfg.max_reports))
    _MAPS.maxsize = 2 * REPORTS.maxsize
    backbones = backbone_choices(cfg)
    start_backbone, offline_note = initial_backbone(cfg)
    variants = variant_choices()
    default_variants = [v for v in cfg.default_variants if v in variants] or variants[:1]
    presets = preset_choices(start_backbone)
    examples = cfg.example_paths()

    with gr.Blocks(title="plugconv", delete_cache=(3600, 3600), analytics_enabled=False) as demo:
        gr.Markdown(INTRO, elem_id="intro")
        if offline_note:
            gr.HTML(f'<div class="pc-banner pc-info">{html.escape(offline_note)}</div>', elem_id="offline-note")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=300):
                image = raw_image(label="Image", image_mode=None, sources=["upload", "clipboard", "webcam"],
                                 height=300, elem_id="input-image")
                if examples:
                    gr.Examples(examples=[[str(p)] for p in examples], inputs=[image], label="Example photos",
                                examples_per_page=8, cache_examples=False, elem_id="examples")
            with gr.Column(scale=2, min_width=360):
                with gr.Row():
                    backbone = gr.Dropdown(backbones, value=start_backbone, label="Backbone", elem_id="backbone")
                    weights = gr.Dropdown(weights_choices(cfg), value=cfg.default_weights, label="Weights",
                                          info="pretrained, random, or a file from the weights folder", elem_id="weights")
                    device = gr.Radio(device_choices(), value="auto", label="Device", elem_id="device")
                variants_box = gr.CheckboxGroup(variants, value=default_variants, label="Variants to compare",
                                                info="one column each; conv = the unchanged baseline", elem_id="variants")
                with gr.Row():
                    preset = gr.Dropdown(presets, value=presets[0], label="Sites to swap", elem_id="preset")
                    layer = gr.Dropdown(layer_choices(start_backbone), value=ALL_STAGES, label="Layer / stage for the maps",
                                        elem_id="layer")
                    scale = gr.Dropdown(list(SCALE_MODES), value=next(iter(SCALE_MODES)), label="Colour scale",
                                        elem_id="scale")
                use_cal = gr.Checkbox(value=True, label="Use calibrated weights where Calibrate has run",
                                      elem_id="use-calibrated")
                with gr.Row():
                    run_btn = gr.Button("Analyze", variant="primary", elem_id="run-btn")
                    cal_btn = gr.Button("Calibrate", elem_id="calibrate-btn")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-btn")
        status = gr.Markdown("Pick an image and press **Analyze**.", elem_id="status")
        banners = gr.HTML("", elem_id="banners")
        # the open tab (hidden): the Redundancy and Receptive field tabs are drawn when opened
        tab_box = gr.Textbox("overview", visible=False, elem_id="open-tab")
        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("Overview", id="overview") as overview_tab:
                overview = gr.HTML("", elem_id="overview")
                summary = gr.Dataframe(label="Summary", interactive=False, max_height=320, elem_id="summary")
            with gr.Tab("Grad-CAM", id="gradcam") as gradcam_tab:
                gr.Markdown("**Grad-CAM per layer** — columns: models, rows: stages")
                gradcam = gr.Image(label="Grad-CAM per layer", show_label=False, format="png",
                                   interactive=False, buttons=["download", "fullscreen"], elem_id="gradcam")
                gradcam_legend = gr.Markdown("", elem_id="gradcam-legend")
            with gr.Tab("Redundancy", id="redundancy") as redundancy_tab:
                gr.Markdown("**Module maps** — SCConv SRU gates/masks, SAConv switch (true range), self-calibration "
                            "maps, SPConv fusion weights, branch energy shares (ACB, SAConv, SPConv)")
                taps = gr.Image(label="Module maps", show_label=False, format="png", interactive=False,
                                buttons=["download", "fullscreen"], elem_id="taps")
                taps_table = gr.Dataframe(label="Module maps: numbers", interactive=False, max_height=320,
                                          elem_id="taps-table")
                redundancy = gr.Plot(label="Redundancy by depth", elem_id="redundancy")
                with gr.Row():
                    similarity = gr.Plot(label="Channel similarity matrices", elem_id="similarity")
                    cka = gr.Plot(label="Similarity to the baseline (linear CKA)", elem_id="cka")
            with gr.Tab("Receptive field", id="rf") as rf_tab:
                gr.Markdown("**Effective receptive field** per model (log-scaled contribution of each input pixel "
                            "to the centre unit of the stage), with the theoretical RF beside it")
                erf = gr.Image(label="Effective receptive field", show_label=False, format="png", interactive=False,
                               buttons=["download", "fullscreen"], elem_id="erf")
                erf_table = gr.Dataframe(label="ERF area ratios and theoretical RF", interactive=False,
                                         elem_id="erf-table")
            with gr.Tab("Profile", id="profile") as profile_tab:
                gr.Markdown("Params and FLOPs come with every analysis; latency is timed here, on demand "
                            "(opening this tab or **Measure latency**), and cached per model and device.")
                profile_summary = gr.Plot(label="Whole model: params, MACs, latency", elem_id="profile-summary")
                profile_latency = gr.Plot(label="Per-layer latency", elem_id="profile-latency")
                with gr.Row():
                    profile_params = gr.Plot(label="Per-layer params", elem_id="profile-params")
                    profile_flops = gr.Plot(label="Per-layer FLOPs", elem_id="profile-flops")
                profile_table = gr.Dataframe(label="Per-layer cost (sortable)", interactive=False, max_height=420,
                                             elem_id="profile-table")
                profile_btn = gr.Button("Measure latency", elem_id="profile-btn")
            with gr.Tab("Calibration", id="calibration") as calibration_tab:
                cal_out = gr.Markdown("Calibrate distils the non-exact variants (scconv, selfcal, spconv) from the "
                                      "original convs on the example photos, once per configuration (cached on disk).",
                                      elem_id="calibration")
                cal_json = gr.JSON(label="Calibration report", elem_id="calibration-json")
            with gr.Tab("Downloads", id="downloads") as downloads_tab:
                gr.Markdown("Every analysis gives report.json at once; **Prepare downloads** writes the rest "
                            "(per-panel PNGs, a self-contained report.html, a zip) from the same analysis.")
                downloads = gr.File(label="report.json, report.html and figures", file_count="multiple",
                                    interactive=False, elem_id="downloads")
                downloads_btn = gr.Button("Prepare downloads", elem_id="downloads-btn")
                report_id = gr.Textbox(visible=False, elem_id="report-id")

        outputs = {
            "status": status, "banners": banners, "overview": overview, "summary": summary, "gradcam": gradcam,
            "gradcam_legend": gradcam_legend, "taps": taps, "taps_table": taps_table, "redundancy": redundancy,
            "similarity": similarity, "cka": cka, "erf": erf, "erf_table": erf_table, "profile_summary": profile_summary,
            "profile_latency": profile_latency, "profile_params": profile_params, "profile_flops": profile_flops,
            "profile_table": profile_table, "downloads": downloads, "report_id": report_id,
        }
        controls = [backbone, weights, variants_box, preset, layer, scale, device, use_cal]

        # async handlers run the blocking work through run_cancellable: Stop (or a closed tab)
        # cancels the awaiting task, which makes the worker stop at its next progress point
        async def on_analyze(image_src, backbone_v, weights_v, variants_v, preset_v, layer_v, scale_v, device_v,
                             use_cal_v, progress=gr.Progress()):  # noqa: B008 - Gradio injects it
            return await run_cancellable(analyze_panels, cfg, image_src, backbone_v, weights_v, variants_v,
                                         preset_v, layer_v, scale_v, device_v, use_cal_v, progress=progress)

        async def on_profile(backbone_v, weights_v, variants_v, preset_v, device_v, use_cal_v,
                             progress=gr.Progress()):  # noqa: B008 - Gradio injects it
            return await run_cancellable(profile_panels, cfg, backbone_v, weights_v, variants_v, preset_v,
                                         device_v, use_cal_v, progress=progress)

        async def on_choice_change(backbone_v, weights_v, variants_v, preset_v, device_v, use_cal_v,
                                   progress=gr.Progress()):  # noqa: B008 - Gradio injects it
            # variant or device changed: params / FLOPs now, latency only where already measured
            return await run_cancellable(profile_panels, cfg, backbone_v, weights_v, variants_v, preset_v,
                                         device_v, use_cal_v, progress=progress, measure_latency=False)

        def on_refresh_overview(rid, backbone_v, weights_v, variants_v, preset_v, device_v, use_cal_v):
            return refresh_overview(cfg, rid, backbone_v, weights_v, variants_v, preset_v, device_v, use_cal_v)

        def on_downloads(rid):
            return prepare_downloads(rid)

        def on_maps(rid, tab):
            # the open tab's figures (drawn once per analysis); nothing for the other tabs
            if tab not in (*MAP_TABS, "all"):
                if tab in TAB_IDS:
                    return tuple(gr.skip() for _ in MAP_OUTPUTS)
                raise gr.Error(f"unknown tab {tab!r}; choose one of {[*MAP_TABS, 'all']}", title="Unknown tab")
            if not rid:
                return tuple(gr.skip() for _ in MAP_OUTPUTS)
            got = maps_panels(rid, tab)
            return tuple(got.get(k, gr.skip()) for k in MAP_OUTPUTS)

        async def on_calibrate(backbone_v, weights_v, variants_v, preset_v, device_v,
                               progress=gr.Progress()):  # noqa: B008 - Gradio injects it
            return await run_cancellable(calibrate_panel, cfg, backbone_v, weights_v, variants_v, preset_v,
                                         device_v, progress=progress)

        def on_backbone(name):
            try:
                p = preset_choices(name)
                layers = layer_choices(name)
            except (KeyError, ValueError) as e:
                raise to_gr_error(e) from e
            return gr.Dropdown(choices=p, value=p[0]), gr.Dropdown(choices=layers, value=ALL_STAGES)

        run_event = run_btn.click(
            on_analyze, [image, *controls], [outputs[k] for k in ANALYZE_OUTPUTS],
            api_name="analyze", concurrency_id="model", concurrency_limit=cfg.concurrency_limit,
        )
        map_outputs = [outputs[k] for k in MAP_OUTPUTS]
        map_kw = {"concurrency_id": "files", "concurrency_limit": 2, "show_progress": "minimal"}
        # after an analysis: draw the open tab's figures if it is the Redundancy or Receptive field tab
        run_event.success(on_maps, [report_id, tab_box], map_outputs, api_name="maps", **map_kw)
        for tid, tab in (("overview", overview_tab), ("gradcam", gradcam_tab), ("profile", profile_tab),
                         ("calibration", calibration_tab), ("downloads", downloads_tab)):
            tab.select(lambda tid=tid: tid, None, tab_box, queue=False, api_visibility="private", show_progress="hidden")
        for tid, tab in (("redundancy", redundancy_tab), ("rf", rf_tab)):
            tab.select(lambda tid=tid: tid, None, tab_box, queue=False, api_visibility="private",
                       show_progress="hidden").then(on_maps, [report_id, tab_box], map_outputs,
                                                    api_visibility="private", **map_kw)
        prof_inputs = [backbone, weights, variants_box, preset, device, use_cal]
        prof_outputs = [status, *(outputs[k] for k in PROFILE_OUTPUTS)]
        prof_event = gr.on(
            [profile_btn.click, profile_tab.select], on_profile, prof_inputs, prof_outputs,
            api_name="profile", concurrency_id="model", concurrency_limit=cfg.concurrency_limit,
            trigger_mode="always_last", show_progress="minimal",
        )
        # latency is timed in the Profile tab: the Overview cards and summary follow (cost cache only)
        prof_event.success(
            on_refresh_overview, [report_id, *prof_inputs], [overview, summary], api_name="refresh_overview",
            api_visibility="private", concurrency_id="model", concurrency_limit=cfg.concurrency_limit,
            show_progress="hidden",
        )
        change_event = gr.on(
            [device.change, variants_box.change], on_choice_change, prof_inputs, prof_outputs,
            api_name="profile_cheap", api_visibility="private", concurrency_id="model",
            concurrency_limit=cfg.concurrency_limit, trigger_mode="always_last", show_progress="minimal",
        )
        dl_event = downloads_btn.click(on_downloads, [report_id], [downloads], api_name="prepare_downloads",
                                       concurrency_id="files", concurrency_limit=2)
        cal_event = cal_btn.click(
            on_calibrate, [backbone, weights, variants_box, preset, device], [cal_out, cal_json],
            api_name="calibrate", concurrency_id="model", concurrency_limit=cfg.concurrency_limit,
        )
        demo.load(lambda: refresh_weights(cfg), None, [weights], api_visibility="private", queue=False,
                  show_progress="hidden")
        backbone.change(on_backbone, [backbone], [preset, layer], api_visibility="private", queue=False)
        stop_btn.click(None, None, None, cancels=[run_event, prof_event, change_event, cal_event, dl_event],
                       api_visibility="private")

    demo.queue(api_open=False, max_size=cfg.queue_max_size, default_concurrency_limit=cfg.concurrency_limit)
    demo.plugconv_config = cfg  # for launch(): max_file_size
    return demo


def launch_kwargs(cfg: AppConfig) -> dict[str, Any]:
    """The safe ``launch()`` settings (gradio.md §5)."""
    from viz.ui import CSS

    return {
        "max_file_size": cfg.max_file_size,
        "show_error": False,
        "enable_monitoring": False,
        "footer_links": ["gradio", "settings"],
        "run_history": False,  # no /gradio_api/runs page, nothing recorded in browsers (gradio.md §5)
        "allowed_paths": [],
        "theme": gr.themes.Soft(primary_hue="indigo", secondary_hue="purple"),
        "css": CSS,
    }


def warm_up() -> float:
    """Import the heavy libraries a first analysis needs (torchvision pulls in ``torch._dynamo``:
    ≈ 2.5 s on 2 cores; timm, the Agg canvas, plotly) so the first user does not wait for them.
    Loads no model (models stay lazy). Returns the seconds spent (0 when already imported)."""
    t = time.perf_counter()
    import matplotlib.backends.backend_agg  # noqa: F401
    import plotly.graph_objects  # noqa: F401
    import timm  # noqa: F401
    import torchvision  # noqa: F401

    import viz.analysis  # noqa: F401
    import viz.figures  # noqa: F401
    return time.perf_counter() - t


def launch(demo: gr.Blocks, **overrides: Any):
    """``demo.launch`` with the app's safe defaults (``overrides`` win); returns its result.

    The heavy imports (:func:`warm_up`) run in a background thread while the server starts, so
    the page is served at once and the first Analyze click does not pay for them."""
    cfg = getattr(demo, "plugconv_config", None) or AppConfig()
    threading.Thread(target=warm_up, name="plugconv-warm-up", daemon=True).start()
    return demo.launch(**{**launch_kwargs(cfg), **overrides})


if __name__ == "__main__":
    launch(build_demo())
