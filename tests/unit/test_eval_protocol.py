"""Evaluation follows the protocol: every label pixel is scored at the label's own resolution,
whatever `train.eval_size` (the logits of the shrunk image are resized back before the argmax,
as `segpipe predict` does), and the logits the argmax reads are fp32."""

import torch
from torch.utils.data import DataLoader
from torchvision import tv_tensors

from pipeline.data.loaders import collate_eval
from pipeline.data.transforms import eval_transform
from pipeline.training import engine
from pipeline.training.inference import predict_mask
from pipeline.training.metrics import confusion_matrix
from seg_models import build_model

SIZES = [(100, 80), (64, 48), (90, 120)]  # two larger than the eval size (shrunk), one that fits
EVAL = 64


def _items():
    g = torch.Generator().manual_seed(0)
    out = []
    for h, w in SIZES:
        image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        mask = torch.randint(0, 4, (h, w), dtype=torch.uint8, generator=g)
        mask[:3] = 255  # a void band
        out.append((image, mask))
    return out


def test_evaluation_scores_every_label_pixel_at_its_own_resolution():
    torch.manual_seed(0)
    model = build_model("unet", num_classes=21, base_channels=8).eval()
    items = _items()
    t = eval_transform(EVAL, normalize=False, full_mask=True)
    dataset = [t(tv_tensors.Image(image), tv_tensors.Mask(mask)) for image, mask in items]
    assert [tuple(m.shape) for _, m in dataset] == SIZES  # masks untouched: full size, no padding
    loader = DataLoader(dataset, batch_size=3, collate_fn=collate_eval)
    cm = engine.evaluate(model, loader, engine.StepOptions(device=torch.device("cpu"), channels_last=False), 21)
    # every non-void pixel of every label, not the pixels of a nearest-resized 64 px mask
    assert int(cm.sum()) == sum(int((m != 255).sum()) for _, m in items)
    # the same predictions as `segpipe predict` makes of each image (logits resized back, then argmax)
    ref = sum(confusion_matrix(torch.from_numpy(predict_mask(model, image, EVAL)), mask, 21) for image, mask in items)
    assert torch.equal(cm, ref)


def test_to_label_size_is_the_identity_for_an_image_that_was_not_shrunk():
    logits = torch.randn(1, 21, EVAL, EVAL)
    assert torch.equal(engine.to_label_size(logits, (48, 64), EVAL), logits[..., :48, :64])
    big = engine.to_label_size(logits, (100, 80), EVAL)  # shrunk to 64 x 51, resized back
    assert big.shape[-2:] == (100, 80) and big.dtype == torch.float32


def test_short_side_evaluation_resizes_up_or_down_and_scores_at_the_label_size():
    """eval_resize short_side (mmsegmentation's and torchvision's test resize): the short side to the
    eval size, upscaling a small image too; the logits come back to the label's size."""
    t = eval_transform(EVAL, normalize=False, full_mask=True, resize="short_side")
    for (h, w), expect in [((100, 80), (80, 64)), ((30, 40), (64, 85)), ((64, 200), (64, 200))]:
        image, mask = t(tv_tensors.Image(torch.zeros(3, h, w, dtype=torch.uint8)), tv_tensors.Mask(torch.zeros(h, w)))
        assert tuple(image.shape[-2:]) == expect and tuple(mask.shape) == (h, w)
        assert engine.to_label_size(torch.randn(1, 21, *expect), (h, w), EVAL, "short_side").shape[-2:] == (h, w)
    # the long side is capped at 4x the eval size (mmsegmentation's 2048 for 512)
    image, _ = t(tv_tensors.Image(torch.zeros(3, 20, 400, dtype=torch.uint8)), tv_tensors.Mask(torch.zeros(20, 400)))
    assert tuple(image.shape[-2:]) == (13, 256)
    torch.manual_seed(0)
    model = build_model("unet", num_classes=21, base_channels=8).eval()
    items = _items()
    loader = DataLoader([t(tv_tensors.Image(i), tv_tensors.Mask(m)) for i, m in items], batch_size=1, collate_fn=collate_eval)
    cm = engine.evaluate(model, loader, engine.StepOptions(device=torch.device("cpu"), channels_last=False), 21,
                         EVAL, "short_side")
    assert int(cm.sum()) == sum(int((m != 255).sum()) for _, m in items)
