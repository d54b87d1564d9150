"""Segmentation metrics from a confusion matrix.

Accumulate `confusion_matrix` per worker, all-reduce (sum) the matrices, then call `scores`:
ratios are only ever taken on the summed matrix, so N workers give exactly the numbers one
process gives on the same data. Void (255) pixels are ignored, and so is every other label outside
0..num_classes-1 (torchvision's ``(t >= 0) & (t < n)`` mask): a stray label is dropped, not counted
as some other class and not a bincount crash.
"""

from __future__ import annotations

import torch

from pipeline.data.voc import IGNORE_INDEX, VOC_CLASSES


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """cm[t, p] = number of pixels of true class t predicted as p (int64, num_classes²).

    Pixels whose label is ``ignore_index`` or outside ``0..num_classes-1`` are dropped."""
    t = target.long()
    keep = (t != ignore_index) & (t >= 0) & (t < num_classes)
    t = t[keep]
    p = pred[keep].long()
    idx = t * num_classes + p
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes).cpu()


def scores(cm: torch.Tensor, class_names: tuple[str, ...] = VOC_CLASSES) -> dict[str, float]:
    """pixel_acc, mean_acc, mIoU, fwIoU and iou/<class> from a summed confusion matrix.

    mIoU and mean_acc average over the classes present in the target or the prediction; a class
    absent from both has IoU NaN in the per-class entries and is left out of the means.
    """
    cm = cm.double()
    tp = cm.diag()
    gt = cm.sum(1)
    pred = cm.sum(0)
    union = gt + pred - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, float("nan")))
    total = cm.sum()
    out = {
        "pixel_acc": float(tp.sum() / total) if total > 0 else float("nan"),
        "mean_acc": float(acc[gt > 0].mean()) if (gt > 0).any() else float("nan"),
        "mIoU": float(iou[present].mean()) if present.any() else float("nan"),
        "fwIoU": float(((gt / total) * torch.nan_to_num(iou))[present].sum()) if total > 0 else float("nan"),
    }
    names = class_names if len(class_names) == cm.shape[0] else tuple(str(i) for i in range(cm.shape[0]))
    for name, v in zip(names, iou.tolist()):
        out[f"iou/{name}"] = v
    return out
