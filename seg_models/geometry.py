"""What the ASPP of a DeepLabV3 model sees at a given crop: feature-map side, each branch's field of
view, which branches degenerate to 1x1 convs, and a signature that tells equal computations apart.

At a ``crop x crop`` input the ASPP reads a feature map of side ``feature_size = ceil(crop /
output_stride)``: every stride-2 layer of ResNet (7x7 conv, 3x3 max-pool, 3x3 / 1x1 strided convs),
MobileNetV3 and the small CNN is padded so that out = ceil(in / 2) (tested against a forward pass).

The field of view of a 3x3 conv at dilation ``r`` is the span of its taps, -r, 0, +r feature cells:
``2r + 1`` cells per axis, ``field_px = (2r + 1) * output_stride`` input pixels (one feature cell per
``output_stride`` pixels; the backbone's own receptive field comes on top of it). When
``r >= feature_size``, at every position both off-centre taps of each axis land in the zero padding:
only the centre tap sees the map and the branch is a 1x1 conv (``degenerate``; the DeepLabV3 paper's
remark on large rates). Two degenerate rates are then the same computation: same parameter shapes,
same initial weights, same outputs and gradients (the off-centre weights get none).
"""

from __future__ import annotations

from typing import Any, Hashable, Optional

from ._utils import positive_int
from .deeplabv3 import DEFAULT_MULTI_GRID
from .registry import effective_atrous_rates, model_output_stride, resolved_options

#: what a degenerate rate becomes in ``aspp_signature``
ONE_BY_ONE = "1x1"
_ASPP_OPTIONS = ("atrous_rates", "atrous_rates_at", "image_pooling")  # what the geometry stands for


def feature_size(crop_size: int, output_stride: int) -> int:
    """Side of the last feature map of a ``crop_size`` square input at ``output_stride``."""
    return -(-crop_size // output_stride)


def aspp_geometry(name: str, crop_size: int, **options: Any) -> Optional[dict[str, Any]]:
    """The ASPP of ``build_model(name, **options)`` at a ``crop_size`` square input, None when the model
    has none (other families, ``aspp="cascade"``): ``output_stride``, ``feature_size``, ``rates`` (the
    dilations used, ``effective_atrous_rates``), ``branches`` (per rate: ``rate``, ``field_px`` = (2 rate
    + 1) x output_stride, ``degenerate`` = rate >= feature_size, i.e. a 1x1 conv at this crop) and
    ``image_pooling``. Invalid names, options or values raise ValueError as ``build_model`` does."""
    positive_int("crop_size", crop_size)
    parsed = resolved_options(name, options, check_files=False)
    rates = effective_atrous_rates(name, **options)
    if rates is None:
        return None
    stride = model_output_stride(name, **options)
    side = feature_size(crop_size, stride)
    return {"output_stride": stride, "feature_size": side, "rates": rates,
            "branches": [{"rate": r, "field_px": (2 * r + 1) * stride, "degenerate": r >= side} for r in rates],
            "image_pooling": parsed["image_pooling"]}


def _frozen(value: Any) -> Hashable:
    return tuple(_frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


def aspp_signature(name: str, crop_size: int, **options: Any) -> Hashable:
    """A hashable value, equal for two option sets of ``name`` iff they build the same computation at a
    ``crop_size`` crop: defaults filled in, values normalised, the ASPP described by its effective
    rates (a rate scaled by ``atrous_rates_at`` equals the same dilation given directly), every
    degenerate rate replaced by ``ONE_BY_ONE``, options that do not apply (the ASPP's under
    ``aspp="cascade"``) left out and cascade's default ``multi_grid`` written out. A tune refuses a
    grid with two points of one signature."""
    parsed = resolved_options(name, options, check_files=False)
    geometry = aspp_geometry(name, crop_size, **options)
    if geometry is None and "atrous_rates" not in parsed:
        return name, tuple(sorted((k, _frozen(v)) for k, v in parsed.items()))
    rest = tuple(sorted((k, _frozen(v)) for k, v in parsed.items() if k not in _ASPP_OPTIONS))
    if geometry is None:  # cascade: no ASPP, multi_grid defaults to (1, 2, 4)
        rest = tuple((k, v if (k, v) != ("multi_grid", None) else DEFAULT_MULTI_GRID) for k, v in rest)
        return name, rest, None
    branches = tuple(ONE_BY_ONE if b["degenerate"] else b["rate"] for b in geometry["branches"])
    return name, rest, (branches, geometry["image_pooling"])
