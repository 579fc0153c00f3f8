"""plugconv: faithful plug-and-play convolutions that swap into pretrained CNNs.

Public API: the registry (``list_convs``, ``get_conv``, ``create_conv``), the ``Tap``,
surgery (``swap_convs``, ``fuse_model``, ``find_sites``), backbones (``load_backbone``) and
calibration (``calibrate``). ``plugconv`` never imports gradio, matplotlib, plotly or captum.
"""

from plugconv.backbones import Backbone, WeightsInfo, list_backbones, load_backbone
from plugconv.base import ConvVariant, Tap
from plugconv.calibrate import CalibrationReport, calibrate, calibrate_cached
from plugconv.registry import UnknownVariantError, create_conv, get_conv, list_convs, register_conv
from plugconv.surgery import Site, SwapResult, find_sites, fuse_model, swap_convs

__all__ = [
    "Backbone",
    "WeightsInfo",
    "list_backbones",
    "load_backbone",
    "CalibrationReport",
    "calibrate",
    "calibrate_cached",
    "ConvVariant",
    "Site",
    "SwapResult",
    "Tap",
    "UnknownVariantError",
    "create_conv",
    "find_sites",
    "fuse_model",
    "get_conv",
    "list_convs",
    "register_conv",
    "swap_convs",
]
