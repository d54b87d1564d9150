"""The knobs a published recipe needs beyond epochs and lr: mmsegmentation's photometric distortion
and cat_max_ratio crop, and a training length in iterations."""

import torch

from pipeline.data.transforms import IGNORE_INDEX, train_transform


def _half_and_sliver():
    """100 x 100: class 1 but for a 30 px band of class 2 on the right. A 40 px crop (offsets 0-60)
    holds both with neither over 75% only at offsets 40-59: 20 of 61."""
    image = torch.randint(0, 256, (3, 100, 100), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(100, 100, dtype=torch.uint8)
    mask[:, 70:] = 2
    return image, mask


def _mixed_share(ratio: float, draws: int = 200) -> float:
    t = train_transform(40, 1.0, 1.0, normalize=False, cat_max_ratio=ratio)
    image, mask = _half_and_sliver()
    torch.manual_seed(1)
    mixed = 0
    for _ in range(draws):
        _, m = t(image, mask)
        m = m[m != IGNORE_INDEX]
        counts = torch.bincount(m.long())[1:]
        mixed += int((counts > 0).sum() == 2 and counts.max() / counts.sum() < 0.75)
    return mixed / draws


def test_cat_max_ratio_redraws_crops_one_class_fills():
    """With 1.0 (off) a crop is mixed 1 time in 3 (20 / 61); with 0.75 up to 10 draws are made, so
    all but (41 / 61)**10 = 2% of the crops are."""
    off, on = _mixed_share(1.0), _mixed_share(0.75)
    assert 0.2 < off < 0.45 and on > 0.93, (off, on)


def test_photometric_distortion_changes_colours_not_geometry():
    image, mask = _half_and_sliver()
    plain = train_transform(40, 0.8, 1.2, normalize=False)
    photo = train_transform(40, 0.8, 1.2, normalize=False, photometric=True)
    changed = 0
    for seed in range(20):
        torch.manual_seed(seed)
        a_img, a_mask = plain(image, mask)
        torch.manual_seed(seed)
        b_img, b_mask = photo(image, mask)
        assert torch.equal(a_mask, b_mask) and b_img.dtype == torch.uint8  # same crop, scale and flip
        changed += int(not torch.equal(a_img, b_img))
    # each of the four steps is applied with p = 0.5: all four skipped 1 time in 16
    assert 12 <= changed <= 20, changed


def test_iterations_become_whole_epochs_of_the_train_split(sample_dir, params_file):
    """7 train images at a global batch of 2 (1 per worker x 2): 3 steps an epoch; 10 iterations
    round to 3 epochs, 11 to 4; 0 keeps train.epochs."""
    from pipeline.config import load_params
    from pipeline.training.job import with_iterations

    def epochs(iterations):
        p = load_params(params_file, [f"data.dir={sample_dir}", "train.batch_size=1", "ray.num_workers=2",
                                      "train.epochs=30", f"train.iterations={iterations}"])
        return with_iterations(p).train.epochs if iterations else p.train.epochs

    assert [epochs(0), epochs(10), epochs(11), epochs(1)] == [30, 3, 4, 1]
