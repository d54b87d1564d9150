"""Issue 15, items 6 and 8: size bounds with their reason, predict's pixel budget, and messages
that name what the user wrote (never a temp path, the right params key)."""

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from tests.support.cli import assert_user_error, run_cli
from tests.support.files import no_debris, tree_snapshot
from tests.support.paths import SAMPLE_TAR


@pytest.mark.parametrize("key", ["train.crop_size", "train.eval_size"])
def test_size_upper_bound_with_reason(params_file, key):
    proc = run_cli("train", "-q", "-p", str(params_file), "-S", f"{key}=100000000", timeout=60)
    assert_user_error(proc, key, "must be <= 4096", "tens of GB")


def _checkpoint(path):
    import torch

    from seg_models import build_model

    model = build_model("unet", num_classes=21, base_channels=4)
    torch.save({"model_name": "unet", "options": {"base_channels": 4}, "model": model.state_dict(), "epoch": 1,
                "mlflow_run_id": None, "eval_size": 64}, path)
    return path


def test_predict_size_bound(tmp_path):
    ckpt = _checkpoint(tmp_path / "m.pt")
    Image.new("RGB", (40, 30)).save(tmp_path / "a.jpg")
    proc = run_cli("predict", "--model", str(ckpt), str(tmp_path / "a.jpg"), "--out", str(tmp_path / "out"),
                   "--size", "1000000", cwd=tmp_path, timeout=60)
    assert_user_error(proc, "size must be <= 4096", "(--size)")
    assert not (tmp_path / "out").exists()


def test_predict_pixel_budget_downsizes_and_says_so(tmp_path):
    ckpt = _checkpoint(tmp_path / "m.pt")
    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 255, (2000, 3000, 3), dtype=np.uint8))
    big.save(tmp_path / "big.jpg", quality=80)
    Image.new("RGB", (50, 40), (200, 10, 10)).save(tmp_path / "small.png")
    proc = run_cli("predict", "-q", "--model", str(ckpt), str(tmp_path / "big.jpg"), str(tmp_path / "small.png"),
                   "--out", str(tmp_path / "out"), "--max-pixels", "600000", "--size", "64", cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    notes = [ln for ln in proc.stderr.splitlines() if ln.startswith("note: ")]
    assert len(notes) == 1 and "big.jpg is 3000x2000" in notes[0] and "--max-pixels" in notes[0], proc.stderr
    w, h = Image.open(tmp_path / "out" / "big_mask.png").size
    assert w * h <= 600_000 and w * h > 500_000 and abs(w / h - 1.5) < 0.01
    assert Image.open(tmp_path / "out" / "small_mask.png").size == (50, 40)  # under the budget: as it is


def test_predict_refuses_undecodably_large_png(tmp_path):
    ckpt = _checkpoint(tmp_path / "m.pt")
    Image.new("L", (3000, 3000)).save(tmp_path / "huge.png")  # 9 MP > 8 x 1 MP: not decoded at all
    proc = run_cli("predict", "-q", "--model", str(ckpt), str(tmp_path / "huge.png"), "--out", str(tmp_path / "o"),
                   "--max-pixels", "1000000", "--size", "64", cwd=tmp_path, timeout=60)
    assert_user_error(proc, "huge.png (too large", "(IMAGE)")


def test_family_model_typo_names_the_family_key(tmp_path, params_file, sample_dir):
    proc = run_cli("train", "-q", "-p", str(params_file), "-S", f"data.dir={sample_dir}", "--family", "fcn",
                   "-S", "families.fcn.model=fcn8s_vgg61", timeout=60)
    assert_user_error(proc, "fcn8s_vgg61", "(families.fcn.model)")
    assert "train.model" not in proc.stderr


def _tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("kind", ["no_layout", "no_split_list"])
def test_messages_never_name_a_temp_path(tmp_path, params_file, sample_dir, kind):
    if kind == "no_layout":
        t = _tar(tmp_path / "odd.tar", {"hello.txt": b"hi"})
        needles = ("odd.tar", "VOC layout")
    else:
        t = _tar(tmp_path / "odd.tar", {"VOCdevkit/VOC2012/JPEGImages/": None,
                                        "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt": b"2007_000032\n"})
        needles = ("odd.tar", "VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt is missing")
    before = tree_snapshot(sample_dir)
    proc = run_cli("fetch", "-q", "-p", str(params_file), "-S", f"data.dir={sample_dir}", "-S", f"data.source={t}")
    assert_user_error(proc, *needles)
    assert ".raw-new" not in proc.stderr and ".tmp-" not in proc.stderr
    assert tree_snapshot(sample_dir) == before
    no_debris(sample_dir)
    assert SAMPLE_TAR.is_file()
