"""Running a trained model on images: the eval-size prediction of one image, the val samples of the
shards and the rows of a prediction grid (numpy out; the drawing is :mod:`pipeline.figures`, the
palette renderings :mod:`pipeline.data.palette`). Used by train (its grid artifact), report (the
qualitative grid) and predict."""

from __future__ import annotations

import numpy as np
import torch
from torchvision import tv_tensors

from pipeline.data.loaders import ShardDataset, decode_image, decode_mask
from pipeline.data.transforms import eval_transform
from pipeline.training.engine import to_label_size


def predict_mask(model, image, eval_size: int) -> np.ndarray:
    """One image (uint8 tensor 3xHxW) -> predicted class ids HxW uint8 at the image's own size.

    The image goes through the eval transform (shrink to fit eval_size, pad to a square); the
    logits of the unpadded part are resized back to HxW before the argmax."""
    h, w = image.shape[-2:]
    x, _ = eval_transform(eval_size)(tv_tensors.Image(image), tv_tensors.Mask(torch.zeros(h, w, dtype=torch.uint8)))
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(x.unsqueeze(0).to(device))["out"]
    pred = to_label_size(logits, (h, w), eval_size)[0].argmax(0)
    return pred.cpu().numpy().astype(np.uint8)


def val_samples(data_dir, count: int):
    """The first `count` val images of the shards: (id, uint8 3xHxW image tensor, truth HxW array)."""
    raw = ShardDataset(data_dir, "val")
    out = []
    for i in range(min(count, len(raw))):
        sid, img_b, mask_b = raw.raw(i)
        out.append((sid, decode_image(img_b), decode_mask(mask_b).numpy()))
    return out


def predict_images(model, data_dir, eval_size: int, count: int):
    """The first `count` val images: (id, uint8 HxWx3 image, truth HxW, prediction HxW)."""
    model.eval()
    return [(sid, image.permute(1, 2, 0).numpy(), truth, predict_mask(model, image, eval_size))
            for sid, image, truth in val_samples(data_dir, count)]
