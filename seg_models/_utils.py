"""Shared pieces: the segmentation wrapper, crop/pad helpers and option parsing."""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SegmentationModel(nn.Module):
    """torchvision's ``_SimpleSegmentationModel``: ``backbone`` returns a dict of features,
    ``classifier`` / ``aux_classifier`` map them to logits, bilinear to the input size.

    ``in_key`` is the feature the classifier reads; ``None`` hands it the whole dict (LRASPP).
    """

    def __init__(self, backbone: nn.Module, classifier: nn.Module,
                 aux_classifier: Optional[nn.Module] = None, in_key: Optional[str] = "out") -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.aux_classifier = aux_classifier
        self.in_key = in_key

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        size = x.shape[-2:]
        features = self.backbone(x)
        head_input = features if self.in_key is None else features[self.in_key]
        result = OrderedDict(out=resize(self.classifier(head_input), size))
        if self.aux_classifier is not None:
            result["aux"] = resize(self.aux_classifier(features["aux"]), size)
        return result


def no_autocast(x: Tensor):
    """Autocast off for ``x``'s device (a no-op where autocast does not exist: the meta device)."""
    if not torch.amp.is_autocast_available(x.device.type):
        return contextlib.nullcontext()
    return torch.autocast(x.device.type, enabled=False)


def resize(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear to ``size``, in fp32 outside autocast (it resizes class scores)."""
    with no_autocast(x):
        return F.interpolate(x.float(), size=tuple(size), mode="bilinear", align_corners=False)


class ScoreConv2d(nn.Conv2d):
    """A convolution whose outputs are class scores: it runs in fp32 outside autocast (input cast up),
    so the logits the loss and the argmax read are never rounded to bf16 / fp16 (where near-ties
    become ties, and the argmax picks by class index). Same parameters and state-dict keys as
    ``nn.Conv2d``."""

    def forward(self, x: Tensor) -> Tensor:
        with no_autocast(x):
            return super().forward(x.float())


def fit(x: Tensor, size: Sequence[int]) -> Tensor:
    """Crop (or zero-pad) the bottom/right of ``x`` so its spatial size is ``size``."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    x = x[..., : size[0], : size[1]]
    return F.pad(x, (0, size[1] - x.shape[-1], 0, size[0] - x.shape[-2]))


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Zero-pad the bottom/right so height and width are multiples of ``multiple``."""
    h, w = x.shape[-2:]
    return F.pad(x, (0, -w % multiple, 0, -h % multiple))


# --------------------------------------------------------------------------- options
@dataclass(frozen=True)
class Option:
    """One constructor option: default, allowed values (a list, or a description) and a parser that
    returns the normalised value or raises ValueError naming the option."""

    default: Any
    allowed: Any
    parse: Callable[[str, Any], Any]

    @classmethod
    def choice(cls, default: Any, values: Sequence[Any]) -> "Option":
        def parse(name: str, value: Any) -> Any:
            if not any(value == v and type(value) is type(v) for v in values):
                raise ValueError(f"{name} must be one of {', '.join(map(repr, values))}, got {value!r}")
            return value
        return cls(default, list(values), parse)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def positive_int(name: str, value: Any) -> int:
    if not _is_int(value) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def unit_fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)


def three_positive_ints(name: str, value: Any) -> Optional[tuple[int, int, int]]:
    if value is None:
        return None
    if (isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 3
            or not all(_is_int(v) and v > 0 for v in value)):
        shown = tuple(value) if isinstance(value, (list, tuple)) else value
        raise ValueError(f"{name} must be three positive ints, got {shown!r}")
    return tuple(value)


def file_path(name: str, value: Any) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not os.path.isfile(value):
        raise ValueError(f"{name}: no such file {value!r} (weights are never downloaded at run time)")
    return os.fspath(value)


def init_conv(module: nn.Module) -> None:
    """torchvision ResNet's initialisation for freshly added convs/BNs."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["SegmentationModel", "resize", "fit", "pad_to_multiple", "Option", "positive_int", "three_positive_ints", "file_path", "init_conv", "count_params"]
