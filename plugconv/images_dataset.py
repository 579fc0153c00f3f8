"""Calibration images: loading, hashing and deterministic augmentation.

Calibration needs no labels, only images that look like what the backbone was trained on. The
example photos in ``assets/`` are the default set; users add a directory or files. Augmentation
(random resized crops and horizontal flips, driven by a seeded ``torch.Generator``) turns a handful
of photos into as many distinct network inputs as calibration asks for.

This module uses PIL directly (``plugconv`` must not import ``viz``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

#: ImageNet normalisation used by every torchvision / timm backbone in plugconv
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: file suffixes taken from a directory
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")

#: refuse decompression bombs: at most this many pixels per calibration image
MAX_PIXELS = 40_000_000

ImageLike = Image.Image | np.ndarray | torch.Tensor


def assets_dir() -> Path:
    """The repository's ``assets/`` folder (example photos with their licences)."""
    return Path(__file__).resolve().parent.parent / "assets"


def example_image_paths() -> list[Path]:
    """Sorted paths of the example photos in ``assets/`` (empty when the folder is absent)."""
    d = assets_dir()
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def open_image(path: str | Path) -> Image.Image:
    """Open one image file as an RGB PIL image, EXIF orientation applied.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the file is not a readable image or is larger than ``MAX_PIXELS``; the
            message names the file.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"calibration image {str(p)!r} does not exist")
    try:
        with Image.open(p) as im:
            if im.width * im.height > MAX_PIXELS:
                raise ValueError(
                    f"calibration image {str(p)!r} has {im.width}x{im.height} pixels, "
                    f"more than the limit of {MAX_PIXELS}"
                )
            im.load()
            out = ImageOps.exif_transpose(im).convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"calibration image {str(p)!r} is not a readable image: {e}") from e
    return out


def load_images(
    sources: str | Path | Iterable[str | Path] | None = None, *, include_examples: bool = True
) -> list[Image.Image]:
    """Load calibration images: the ``assets/`` examples plus directories and files.

    Args:
        sources: a directory (its image files, sorted by name, non-recursive), a file, or an
            iterable of those; None for none.
        include_examples: prepend the example photos from ``assets/``.

    Returns:
        RGB PIL images, examples first, then the sources in the order given.

    Raises:
        FileNotFoundError: a source path does not exist.
        ValueError: a file is not an image, a directory holds no image, or the result is empty.
    """
    paths: list[Path] = list(example_image_paths()) if include_examples else []
    if sources is not None:
        items = [sources] if isinstance(sources, (str, Path)) else list(sources)
        for item in items:
            p = Path(item)
            if p.is_dir():
                found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
                if not found:
                    raise ValueError(
                        f"directory {str(p)!r} holds no image file (suffixes {', '.join(IMAGE_SUFFIXES)})"
                    )
                paths.extend(found)
            elif p.exists():
                paths.append(p)
            else:
                raise FileNotFoundError(f"calibration image source {str(p)!r} does not exist")
    if not paths:
        raise ValueError("no calibration images: pass a directory or files (assets/ has no examples here)")
    return [open_image(p) for p in paths]


def to_tensor(image: ImageLike) -> torch.Tensor:
    """One image as a float tensor 3×H×W in [0, 1].

    Accepts an RGB(A)/L PIL image, an H×W×3 uint8 or float ([0, 1]) array, or a 3×H×W tensor
    in [0, 1].

    Raises:
        ValueError: an unsupported shape or type (the message names it).
    """
    if isinstance(image, Image.Image):
        arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image array must be H×W×3, got shape {image.shape}")
        t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        return t.float().div_(255.0) if image.dtype == np.uint8 else t.float()
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensor must be 3×H×W in [0, 1], got shape {tuple(image.shape)}")
        return image.detach().float().cpu()
    raise ValueError(f"unsupported image type {type(image).__name__}; pass PIL images, arrays or tensors")


def images_sha256(images: Sequence[ImageLike]) -> str:
    """sha256 over the decoded pixels of ``images`` (order matters), as hex.

    Each image contributes its shape and its RGB bytes (uint8 for PIL/uint8 arrays, float32
    otherwise), so the same photos give the same hash whatever file they were read from.
    """
    h = hashlib.sha256()
    for im in images:
        if isinstance(im, Image.Image):
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        elif isinstance(im, np.ndarray):
            arr = np.ascontiguousarray(im)
        else:
            arr = to_tensor(im).numpy()
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def augmented_crops(
    images: Sequence[ImageLike],
    n: int,
    size: int,
    *,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.25, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """``n`` random resized crops (torchvision ``RandomResizedCrop`` semantics) with random flips.

    Images are used in turn (crop i comes from image i mod len(images)), so every photo is
    represented equally. All randomness comes from ``generator``: the same generator state gives
    the same crops.

    Args:
        images: source images (PIL, H×W×3 arrays or 3×H×W tensors in [0, 1]).
        n: number of crops (≥ 1).
        size: output side S in pixels (≥ 8).
        generator: CPU generator that drives the crop boxes and flips.
        scale: range of the crop area as a fraction of the image area.
        ratio: range of the crop aspect ratio (width / height).
        flip: flip each crop horizontally with probability 1/2.
        mean, std: per-channel normalisation applied after cropping.

    Returns:
        n×3×S×S float32 tensor on the CPU, normalised ((x − mean) / std, x in [0, 1]).

    Raises:
        ValueError: no images, ``n`` < 1 or ``size`` < 8.
    """
    if not images:
        raise ValueError("augmented_crops needs at least one image")
    if n < 1:
        raise ValueError(f"number of crops must be >= 1, got {n}")
    if size < 8:
        raise ValueError(f"crop size must be >= 8 pixels, got {size}")
    tensors = [to_tensor(im) for im in images]
    m = torch.tensor(list(mean), dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32).view(3, 1, 1)
    out = torch.empty(n, 3, size, size)
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for i in range(n):
        img = tensors[i % len(tensors)]
        h, w = img.shape[-2:]
        area = h * w
        box = None
        for _ in range(10):
            u = torch.rand(3, generator=generator).tolist()
            target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
            ar = math.exp(log_r[0] + (log_r[1] - log_r[0]) * u[1])
            cw, ch = round(math.sqrt(target * ar)), round(math.sqrt(target / ar))
            if 0 < cw <= w and 0 < ch <= h:
                top = int(torch.randint(0, h - ch + 1, (1,), generator=generator))
                left = int(torch.randint(0, w - cw + 1, (1,), generator=generator))
                box = (top, left, ch, cw)
                break
        if box is None:  # central crop, as torchvision falls back to
            c = min(h, w)
            box = ((h - c) // 2, (w - c) // 2, c, c)
        top, left, ch, cw = box
        crop = img[:, top : top + ch, left : left + cw].unsqueeze(0)
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        crop = crop.squeeze(0).clamp_(0.0, 1.0)
        if flip and bool(torch.rand(1, generator=generator) < 0.5):
            crop = crop.flip(-1)
        out[i] = (crop - m) / s
    return out
