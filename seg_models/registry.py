"""The model registry: every name, its family, backbone and options, in one table."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Optional

from torch import nn

from . import deeplabv3, fcn, lraspp, unet
from ._utils import Option, file_path, positive_int, three_positive_ints, unit_fraction
from .upsample import METHODS


@dataclass(frozen=True)
class Entry:
    family: str
    backbone: Optional[str]  # key of BACKBONE_WEIGHTS, None when there is no pretrained backbone
    builder: Callable[..., nn.Module]
    options: dict[str, Option]
    output_stride: Optional[int] = None  # the fixed output stride of a model without that option (MobileNetV3)


AUX = Option.choice(False, (False, True))
WEIGHTS = Option(None, "local file: torchvision ImageNet state dict of the backbone (never downloaded)", file_path)
OUTPUT_STRIDE = Option.choice(8, (8, 16))
RATES = Option(None, "three positive ints; default (12, 24, 36) at output_stride 8, (6, 12, 18) at 16",
               three_positive_ints)
MULTI_GRID = Option(None, "three positive ints: block4 unit rates = rate * multi_grid; default torchvision's "
                          "block4 for aspp=parallel, (1, 2, 4) for aspp=cascade", three_positive_ints)
ASPP = Option.choice("parallel", ("parallel", "cascade"))
RATES_AT = Option.choice(None, (None, 16))  # 16: atrous_rates are at output stride 16 (paper), scaled to the model's
IMAGE_POOLING = Option.choice(True, (True, False))  # False: ASPP without its image-pooling branch (paper, Table 5)


def _fcn_vgg(stride: int) -> Entry:
    return Entry("fcn", "vgg16", partial(fcn.FCNVGG, stride=stride),
                 {"upsample": Option.choice("bilinear", METHODS),
                  "decoder": Option.choice("none", fcn.DECODERS),  # features: needed by upsample=unpool
                  "backbone_weights": WEIGHTS,
                  "width": Option(1.0, "channel multiplier in (0, 1]; 1 = the paper's VGG16 (CPU runs use less)",
                                  unit_fraction),
                  "batch_norm": Option.choice(False, (False, True))})


def _resnet(builder: Callable, family: str, arch: str, **extra: Option) -> Entry:
    return Entry(family, arch, partial(builder, arch=arch),
                 {"aux_loss": AUX, "output_stride": OUTPUT_STRIDE, **extra, "backbone_weights": WEIGHTS})


_DEEPLAB = {"atrous_rates": RATES, "aspp": ASPP, "multi_grid": MULTI_GRID, "atrous_rates_at": RATES_AT,
            "image_pooling": IMAGE_POOLING}

MODELS: dict[str, Entry] = {
    "fcn32s_vgg16": _fcn_vgg(32),
    "fcn16s_vgg16": _fcn_vgg(16),
    "fcn8s_vgg16": _fcn_vgg(8),
    "fcn_resnet50": _resnet(fcn.fcn_resnet, "fcn", "resnet50"),
    "fcn_resnet101": _resnet(fcn.fcn_resnet, "fcn", "resnet101"),
    "deeplabv3_resnet50": _resnet(deeplabv3.deeplabv3_resnet, "deeplabv3", "resnet50", **_DEEPLAB),
    "deeplabv3_resnet101": _resnet(deeplabv3.deeplabv3_resnet, "deeplabv3", "resnet101", **_DEEPLAB),
    "deeplabv3_mobilenet_v3_large": Entry(
        "deeplabv3", "mobilenet_v3_large", deeplabv3.deeplabv3_mobilenet,
        {"aux_loss": AUX, "atrous_rates": Option((12, 24, 36), "three positive ints", three_positive_ints),
         "atrous_rates_at": RATES_AT, "image_pooling": IMAGE_POOLING, "backbone_weights": WEIGHTS},
        output_stride=16),
    "deeplabv3_small": Entry("deeplabv3", None, deeplabv3.deeplabv3_small, {
        "width": Option(32, "positive int: channels of the first stage (2x, 4x in the next two; head 2x)",
                        positive_int),
        "output_stride": Option.choice(8, (8,)), "atrous_rates": RATES, "atrous_rates_at": RATES_AT,
        "image_pooling": IMAGE_POOLING}),
    "lraspp_mobilenet_v3_large": Entry("lraspp", "mobilenet_v3_large", lraspp.lraspp_mobilenet,
                                       {"backbone_weights": WEIGHTS}),
    "unet": Entry("unet", None, unet.UNet, {
        "upsample": Option.choice("transposed", METHODS),
        "base_channels": Option(64, "positive int: channels of the first level (doubled at each down)", positive_int),
        "batch_norm": Option.choice(True, (True, False))}),
    "unet_resnet50": Entry("unet", "resnet50", partial(unet.ResNetUNet, arch="resnet50"),
                           {"upsample": Option.choice("transposed", ("bilinear", "transposed")),
                            "backbone_weights": WEIGHTS}),
}


def list_models() -> list[str]:
    return list(MODELS)


def _entry(name: str) -> Entry:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name]


def model_info(name: str) -> dict[str, Any]:
    """family, backbone (key of BACKBONE_WEIGHTS or None), options (name -> list of allowed values or a
    description) and defaults."""
    entry = _entry(name)
    return {"family": entry.family, "backbone": entry.backbone,
            "options": {k: o.allowed for k, o in entry.options.items()},
            "defaults": {k: o.default for k, o in entry.options.items()}}


def _check_names(name: str, entry: Entry, options: dict[str, Any]) -> None:
    unknown = sorted(set(options) - set(entry.options))
    if unknown:
        raise ValueError(f"unknown option{'s' * (len(unknown) > 1)} {', '.join(unknown)} for model {name!r}; "
                         f"valid options: {', '.join(entry.options) or 'none'}")


def resolved_options(name: str, options: dict[str, Any], check_files: bool = True) -> dict[str, Any]:
    """Every option of ``name``: the given value parsed, else the default (what ``build_model`` passes
    to the builder). Unknown names and invalid values raise ValueError naming them. ``check_files=False``
    keeps a file option (``backbone_weights``) as given, unchecked."""
    entry = _entry(name)
    _check_names(name, entry, options)
    out = {}
    for k, o in entry.options.items():
        if k not in options:
            out[k] = o.default
        elif o.parse is file_path and not check_files:
            out[k] = os.fspath(options[k]) if options[k] is not None else None
        else:
            out[k] = o.parse(k, options[k])
    return out


def _output_stride(entry: Entry, parsed: dict[str, Any]) -> Optional[int]:
    if "output_stride" in entry.options:
        return parsed.get("output_stride", entry.options["output_stride"].default)
    return entry.output_stride


def model_output_stride(name: str, **options: Any) -> Optional[int]:
    """The output stride of ``build_model(name, **options)``'s last feature map where the registry
    records one (ResNet, MobileNetV3 and the small CNN), else None."""
    entry = _entry(name)
    option = entry.options.get("output_stride")
    if option is None:
        return entry.output_stride
    return option.parse("output_stride", options["output_stride"]) if "output_stride" in options else option.default


def effective_atrous_rates(name: str, **options: Any) -> Optional[tuple[int, ...]]:
    """The ASPP dilations ``build_model(name, **options)`` uses (None: no ASPP); options as given to it."""
    entry = _entry(name)
    if "atrous_rates" not in entry.options:
        return None
    kw = {k: entry.options[k].parse(k, options[k]) for k in ("atrous_rates", "atrous_rates_at", "output_stride", "aspp")
          if k in options and k in entry.options}
    fixed_stride = "output_stride" not in entry.options  # MobileNetV3: stride 16, torchvision's rates by default
    return deeplabv3.effective_rates(_output_stride(entry, kw), kw.get("atrous_rates"), kw.get("atrous_rates_at"),
                                     kw.get("aspp", "parallel"), (12, 24, 36) if fixed_stride else None)


def build_model(name: str, num_classes: int = 21, **options: Any) -> nn.Module:
    """Build a registered model; invalid names, options or values raise ValueError naming them."""
    entry = _entry(name)
    _check_names(name, entry, options)
    positive_int("num_classes", num_classes)
    return entry.builder(num_classes=num_classes, **resolved_options(name, options))


@dataclass(frozen=True)
class Family:
    """What the pipeline needs to know about a family, beyond its models: how to show it, its named
    variants (a tune `variant` entry picks one), which option applies only when another has given
    values, and which of its models match a torchvision builder exactly (benchmarks compare them)."""

    display: str
    color: str
    variants: dict[str, str]
    applies_only: dict[str, tuple[str, tuple[Any, ...]]]
    torchvision_identical: tuple[str, ...]


FAMILIES: dict[str, Family] = {
    "fcn": Family("FCN", "#1f77b4", {"32s": "fcn32s_vgg16", "16s": "fcn16s_vgg16", "8s": "fcn8s_vgg16"}, {},
                  ("fcn_resnet50",)),
    "deeplabv3": Family("DeepLabV3", "#ff7f0e", {},
                        {"atrous_rates": ("aspp", ("parallel",))},  # cascade DeepLabV3 has no ASPP, so no rates
                        ("deeplabv3_resnet50", "deeplabv3_mobilenet_v3_large")),
    "lraspp": Family("LRASPP", "#2ca02c", {}, {}, ("lraspp_mobilenet_v3_large",)),
    "unet": Family("UNet", "#d62728", {}, {}, ()),
}


def family_info(family: str) -> Family:
    """The Family record of a family name (ValueError naming the known ones)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[family]
