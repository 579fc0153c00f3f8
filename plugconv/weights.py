"""Reading weight files safely, and resolving them inside a configured weights directory.

Weight files are untrusted input (an app user may point at any file in the weights directory, a
downloaded checkpoint may be a trap), so:

- ``.safetensors`` files are read with ``safetensors.torch.load_file`` (no code can run);
- ``.pth``/``.pt``/``.bin`` files are read with ``torch.load(..., weights_only=True)``: a pickle
  that would import and call arbitrary Python (``os.system``, ...) is refused with a
  :class:`WeightsError`, before anything runs;
- a truncated or corrupted file gives a :class:`WeightsError` naming the file and the problem;
- a state dict that does not fit the model gives a readable list of missing keys, unexpected keys
  and shape mismatches (:func:`load_state_dict_checked`);
- :func:`resolve_weights_file` only hands out files that really live inside the weights
  directory: ``..``, absolute paths and symlinks that leave it are refused.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: file suffixes read as weight files
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")

#: container keys unwrapped by :func:`load_state_dict_file`, in this order
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "params")

_MAX_LISTED = 12


class WeightsError(ValueError):
    """A weights file that is missing, unsafe, corrupted or does not fit the model.

    The message names the file and the problem in plain words.
    """


def sha256_file(path: str | Path, *, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in ``chunk``-byte pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _pickle_globals(path: Path, limit: int = 64 << 20) -> list[str] | None:
    """Names a plain (non-zip) pickle file imports, read with ``pickletools`` (nothing executes).

    Returns None when the file is not a parsable pickle (or is a zip archive / too large).
    """
    import pickletools

    if zipfile.is_zipfile(path) or path.stat().st_size > limit:
        return None
    names: list[str] = []
    strings: list[str] = []
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name == "GLOBAL" and isinstance(arg, str):
                    names.append(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # not a pickle (HTML, random bytes, ...)
        return names or None
    return names


_SAFE_GLOBAL_PREFIXES = ("torch.", "collections.OrderedDict", "builtins.set", "_codecs.encode", "numpy.")


def _load_torch_file(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = str(e).strip().splitlines()
        detail = next((ln.strip() for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), "")
        imports = _pickle_globals(path)
        unsafe = [g for g in imports or [] if not g.startswith(_SAFE_GLOBAL_PREFIXES)]
        if "GLOBAL" in detail or unsafe:
            what = f" ({', '.join(dict.fromkeys(unsafe))})" if unsafe else ""
            raise WeightsError(
                f"refused to load {path.name}: it is a pickle that would import and run Python code "
                f"on load{what}, which weights files never need (torch.load weights_only=True refused it"
                f"{': ' + detail if detail else ''}). Re-save the weights as a plain state dict or "
                f"as .safetensors."
            ) from None
        raise WeightsError(
            f"cannot read {path.name}: not a PyTorch weights file (the weights-only loader stopped at: "
            f"{detail or (lines[0] if lines else type(e).__name__)})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError) as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "central directory" in text or "zip archive" in text or isinstance(e, EOFError):
            problem = f"the file is truncated or corrupted ({text})"
        else:
            problem = f"not a readable PyTorch weights file ({text})"
        raise WeightsError(f"cannot read {path.name}: {problem}") from None


def _load_safetensors_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise WeightsError(
            f"cannot read {path.name}: the safetensors file is truncated or corrupted ({e})"
        ) from None


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    # unwrap {"state_dict": {...}, "epoch": ...}-style containers (possibly nested once or twice)
    for _ in range(3):
        if isinstance(obj, nn.Module):  # pragma: no cover - weights_only never returns modules
            obj = obj.state_dict()
        if not isinstance(obj, Mapping):
            raise WeightsError(
                f"cannot use {path.name}: it holds a {type(obj).__name__}, not a state dict "
                f"(a mapping of parameter names to tensors)"
            )
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in CONTAINER_KEYS if k in obj and isinstance(obj[k], (Mapping, nn.Module))), None)
        if inner is None:
            break
        obj = inner
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        keys = ", ".join(map(str, list(obj)[:_MAX_LISTED]))
        raise WeightsError(f"cannot use {path.name}: no tensors found (top-level keys: {keys or 'none'})")
    others = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if others:
        raise WeightsError(
            f"cannot use {path.name}: the state dict mixes tensors with other values "
            f"({_listing(others)})"
        )
    # DataParallel / DistributedDataParallel checkpoints prefix every key with "module."
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file into a flat ``{name: tensor}`` dict on the CPU.

    Args:
        path: a ``.safetensors`` file, or a ``.pth``/``.pt``/``.bin`` PyTorch file (zip or legacy
            format). Containers like ``{"state_dict": ..., "epoch": ...}`` or ``{"model": ...}``
            are unwrapped; a ``module.`` prefix on every key (DataParallel) is removed.

    Returns:
        The state dict (CPU tensors, dtypes as stored).

    Raises:
        WeightsError: missing file, unknown suffix, a pickle that would run code on load,
            truncated/corrupted file, or contents that are not a state dict.
    """
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"weights file {str(p)!r} does not exist or is not a file")
    suffix = p.suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise WeightsError(
            f"weights file {p.name!r} has suffix {suffix or '(none)'!r}; expected one of {', '.join(WEIGHT_SUFFIXES)}"
        )
    if suffix == ".safetensors":
        return _unwrap(_load_safetensors_file(p), p)
    return _unwrap(_load_torch_file(p), p)


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return f"{shown}, ... and {more} more" if more > 0 else shown


def state_dict_mismatch(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """Describe how ``state_dict`` fails to fit ``model``, or ``None`` when it fits exactly.

    Returns:
        A readable multi-line text: missing keys, unexpected keys, shape mismatches
        (``key: file (a, b) vs model (c, d)``), each list truncated after a dozen entries.
    """
    target = model.state_dict()
    missing = [k for k in target if k not in state_dict]
    unexpected = [k for k in state_dict if k not in target]
    shapes = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(target[k].shape)}"
        for k in target
        if k in state_dict and tuple(state_dict[k].shape) != tuple(target[k].shape)
    ]
    if not (missing or unexpected or shapes):
        return None
    lines = []
    if missing:
        lines.append(f"missing keys ({len(missing)}): {_listing(missing)}")
    if unexpected:
        lines.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    if shapes:
        lines.append(f"shape mismatches ({len(shapes)}): {_listing(shapes)}")
    if any(".conv1_a." in k or k.endswith("conv1_a.weight") for k in unexpected):
        lines.append(
            "hint: this looks like an official SCNet checkpoint; load it with "
            "plugconv.checkpoints.load_scnet_checkpoint(path, arch=...)"
        )
    return "\n".join(lines)


def load_state_dict_checked(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, what: str = "weights") -> None:
    """Load ``state_dict`` into ``model`` strictly, with a readable error when it does not fit.

    Args:
        model: the target module (modified in place).
        state_dict: ``{name: tensor}``; every key must exist in ``model`` with the same shape.
        what: how to name the source in the message (e.g. the file name).

    Raises:
        WeightsError: listing missing keys, unexpected keys and shape mismatches.
    """
    problem = state_dict_mismatch(model, state_dict)
    if problem is not None:
        raise WeightsError(f"{what} do not fit {type(model).__name__}:\n{problem}")
    model.load_state_dict(dict(state_dict), strict=True)


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def resolve_weights_file(name: str | os.PathLike[str], weights_dir: str | os.PathLike[str]) -> Path:
    """The real path of weights file ``name`` inside ``weights_dir``.

    Args:
        name: a file name or a relative path below ``weights_dir`` (e.g. ``"resnet50_ft.pth"``).
        weights_dir: the only directory weight files may be read from.

    Returns:
        The resolved path (symlinks followed; still inside ``weights_dir``).

    Raises:
        WeightsError: absolute paths, ``..`` components, symlinks that leave the directory,
            missing files, or a suffix other than ``WEIGHT_SUFFIXES``.
    """
    root = Path(weights_dir)
    if not root.is_dir():
        raise WeightsError(f"weights directory {str(root)!r} does not exist")
    raw = os.fspath(name)
    if not raw or raw.strip() != raw:
        raise WeightsError(f"invalid weights file name {raw!r}")
    rel = Path(raw)
    if rel.is_absolute() or raw.startswith(("/", "\\")) or (len(raw) > 1 and raw[1] == ":"):
        raise WeightsError(f"weights file {raw!r} must be a name inside the weights directory, not an absolute path")
    if ".." in rel.parts or ".." in raw.replace("\\", "/").split("/"):
        raise WeightsError(f"weights file {raw!r} may not contain '..'")
    real_root = root.resolve()
    real = (root / rel).resolve()
    if not _inside(real, real_root):
        raise WeightsError(f"weights file {raw!r} points outside the weights directory (symlink to {str(real)!r})")
    if not real.is_file():
        choices = ", ".join(list_weights_files(root)) or "none"
        raise WeightsError(f"weights file {raw!r} not found in the weights directory; available: {choices}")
    if real.suffix.lower() not in WEIGHT_SUFFIXES:
        raise WeightsError(f"weights file {raw!r} has suffix {real.suffix!r}; expected one of {', '.join(WEIGHT_SUFFIXES)}")
    return real


def confine_weights_path(path: str | os.PathLike[str], weights_dir: str | os.PathLike[str] | None) -> Path:
    """``path`` checked against ``weights_dir`` (no check when ``weights_dir`` is None).

    A relative name goes through :func:`resolve_weights_file`; an absolute path is accepted only
    when its real path (symlinks followed) lies inside ``weights_dir`` (e.g. a path the app already
    resolved), and then passes the same checks.

    Raises:
        WeightsError: as :func:`resolve_weights_file`, or an absolute path outside the directory.
    """
    if weights_dir is None:
        return Path(path)
    p = Path(path)
    if not p.is_absolute():
        return resolve_weights_file(path, weights_dir)
    root = Path(weights_dir).resolve()
    real = p.resolve()
    if not _inside(real, root):
        raise WeightsError(f"weights file {str(p)!r} is outside the weights directory; pass a name inside it")
    return resolve_weights_file(real.relative_to(root).as_posix(), root)


def list_weights_files(weights_dir: str | os.PathLike[str] | None) -> list[str]:
    """Weight files available in ``weights_dir`` (relative names, sorted), for the app's dropdown.

    Only regular files with a ``WEIGHT_SUFFIXES`` suffix whose real path stays inside the
    directory are listed (symlinks out of it are left out). A missing directory lists nothing.
    """
    if weights_dir is None:
        return []
    root = Path(weights_dir)
    if not root.is_dir():
        return []
    real_root = root.resolve()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and _inside(Path(dirpath, d).resolve(), real_root))
        for fn in filenames:
            p = Path(dirpath, fn)
            if fn.startswith(".") or p.suffix.lower() not in WEIGHT_SUFFIXES:
                continue
            real = p.resolve()
            if _inside(real, real_root) and real.is_file():
                out.append(p.relative_to(root).as_posix())
    return sorted(out)
