"""Pure-PyTorch segmentation models: FCN, DeepLabV3, LRASPP and UNet on torchvision backbones.

>>> model = build_model("deeplabv3_resnet50", num_classes=21, atrous_rates=(6, 12, 18), aux_loss=True)
>>> model(images)["out"].shape  # N x 21 x H x W

See ``list_models()``, ``model_info(name)``, ``aspp_geometry(name, crop_size, **options)`` (what a
DeepLabV3 ASPP sees at a crop) and docs/models.md.
"""

from .backbones import BACKBONE_WEIGHTS
from .geometry import aspp_geometry, aspp_signature
from .registry import FAMILIES, build_model, effective_atrous_rates, family_info, list_models, model_info
from .summary import format_table, model_table

__all__ = ["BACKBONE_WEIGHTS", "FAMILIES", "aspp_geometry", "aspp_signature", "family_info", "build_model",
           "effective_atrous_rates", "format_table", "list_models", "model_info", "model_table"]
