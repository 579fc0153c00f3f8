"""Registry of convolution variants: ``register_conv``, ``get_conv``, ``list_convs``, ``create_conv``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from plugconv.base import ConvVariant

_REGISTRY: dict[str, type[ConvVariant]] = {}

T = TypeVar("T", bound=type[ConvVariant])


class UnknownVariantError(KeyError, ValueError):
    """An unknown variant name; a ``KeyError`` and a ``ValueError`` so either ``except`` works."""

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0]) if self.args else ""


def register_conv(name: str) -> Callable[[T], T]:
    """Class decorator: register a variant under ``name`` (also sets ``cls.name``)."""

    def deco(cls: T) -> T:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"variant {name!r} is already registered to {_REGISTRY[name].__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _ensure_loaded() -> None:
    # importing the package registers every built-in variant
    import plugconv.variants  # noqa: F401


def list_convs() -> list[str]:
    """Sorted registry keys, e.g. ``["acb", "conv", "saconv", "scconv", "selfcal", "spconv"]``."""
    _ensure_loaded()
    return sorted(_REGISTRY)


def get_conv(name: str) -> type[ConvVariant]:
    """The variant class registered as ``name``.

    Raises:
        UnknownVariantError: (a ``KeyError`` and ``ValueError``) naming the value and the choices.
    """
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownVariantError(
            f"unknown conv variant {name!r}; choose one of {', '.join(sorted(_REGISTRY))}"
        ) from None


def create_conv(
    name: str,
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    stride: int = 1,
    padding: int | None = None,
    dilation: int = 1,
    groups: int = 1,
    bias: bool = False,
    **options: Any,
) -> nn.Module:
    """Build variant ``name`` with ``nn.Conv2d``-like arguments (fresh initialisation).

    ``padding=None`` means "same" padding, d·(k−1)/2.

    Raises:
        UnknownVariantError: unknown ``name``.
        ValueError: a configuration the variant cannot take; the message names the value.
    """
    cls = get_conv(name)
    return cls(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=bias,
        **options,
    )
