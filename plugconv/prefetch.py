"""Download the default torchvision ImageNet weights of every ResNet backbone into ``$TORCH_HOME``.

Run as ``python -m plugconv.prefetch`` (the Docker image does this at build time, so the container
never downloads at runtime). Files land where torchvision looks for them,
``$TORCH_HOME/hub/checkpoints/<name>-<hash>.pth`` (default ``~/.cache/torch``), and torchvision
verifies each file's hash prefix while downloading.

Offline, every download fails with one clear line per backbone and the command exits with status 1
(the app still runs on the bundled offline model, ``efficientnet_lite0``).

Usage::

    python -m plugconv.prefetch                      # all torchvision backbones
    python -m plugconv.prefetch resnet18 resnet50    # only these
    python -m plugconv.prefetch --list               # names and whether each file is cached
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
from collections.abc import Sequence
from pathlib import Path

from plugconv.backbones import TORCHVISION_BACKBONES  # backbones with downloadable default weights


def checkpoint_dir() -> Path:
    """Where torchvision stores downloaded checkpoints: ``$TORCH_HOME/hub/checkpoints``."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def default_weights_url(name: str) -> str:
    """URL of the default (``DEFAULT``) torchvision weights of backbone ``name``.

    Raises:
        ValueError: ``name`` is not one of ``TORCHVISION_BACKBONES``.
    """
    if name not in TORCHVISION_BACKBONES:
        raise ValueError(f"unknown backbone {name!r} for prefetch; choose from {', '.join(TORCHVISION_BACKBONES)}")
    from torchvision.models import get_model_weights

    return get_model_weights(name).DEFAULT.url


def cached_path(name: str) -> Path:
    """Path the default weights file of ``name`` has (or will have) in the checkpoint directory."""
    return checkpoint_dir() / os.path.basename(default_weights_url(name))


def fetch(name: str) -> tuple[bool, str]:
    """Download the default weights of ``name`` unless cached.

    Returns:
        ``(ok, message)``; ``ok`` is False when the file could not be downloaded, and the message says
        why in plain words (offline, HTTP error, hash mismatch).
    """
    path = cached_path(name)
    if path.is_file():
        return True, f"{name}: cached at {path}"
    url = default_weights_url(name)
    from torchvision.models import get_model_weights

    try:
        get_model_weights(name).DEFAULT.get_state_dict(progress=sys.stderr.isatty(), check_hash=True)
    except urllib.error.URLError as e:  # includes HTTPError; offline machines land here
        reason = getattr(e, "reason", e)
        return False, (
            f"{name}: cannot download {url} ({reason}); no network access to download.pytorch.org? "
            "The app still runs offline on the bundled efficientnet_lite0."
        )
    except (OSError, RuntimeError) as e:  # socket errors, disk full, hash mismatch
        return False, f"{name}: download of {url} failed: {e}"
    return True, f"{name}: downloaded to {path}"


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 all fetched, 1 some failed)."""
    parser = argparse.ArgumentParser(prog="python -m plugconv.prefetch", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"backbones (default: all of {', '.join(TORCHVISION_BACKBONES)})")
    parser.add_argument("--list", action="store_true", help="list backbones and their cache state, download nothing")
    args = parser.parse_args(argv)
    names = list(args.names) or list(TORCHVISION_BACKBONES)
    try:
        for n in names:
            default_weights_url(n)
    except ValueError as e:
        parser.error(str(e))
    print(f"TORCH_HOME checkpoints: {checkpoint_dir()}")
    if args.list:
        for n in names:
            print(f"{n}: {'cached' if cached_path(n).is_file() else 'not cached'} ({default_weights_url(n)})")
        return 0
    failed = 0
    for n in names:
        ok, msg = fetch(n)
        print(msg, file=sys.stdout if ok else sys.stderr, flush=True)
        failed += not ok
    if failed:
        print(f"prefetch: {failed} of {len(names)} backbone weights could not be downloaded", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
