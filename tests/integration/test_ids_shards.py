"""Issue 15, items 2 and 3: split-list ids are checked; shards are verified against the manifest
before Ray starts (train and tune)."""

import json

import pytest

from pipeline.data.loaders import verify_shards
from pipeline.errors import UserError
from tests.support.cli import assert_user_error, run_cli
from tests.support.files import copy_sample_voc, no_debris, tree_snapshot


@pytest.mark.parametrize("bad", ["../../../../tmp/x", "a/b", "..", "2008_000123\\..\\x", "/etc/passwd", ".hidden"])
def test_bad_split_id_names_file_and_line(tmp_path, params_file, bad):
    src = copy_sample_voc(tmp_path)
    d = tmp_path / "D"
    common = ["-q", "-p", str(params_file), "-S", f"data.dir={d}", "-S", f"data.source={src}", "-S", "data.workers=1"]
    assert run_cli("fetch", *common).returncode == 0
    assert run_cli("preprocess", *common).returncode == 0
    before = tree_snapshot(d)
    lst = src / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "train.txt"
    ids = lst.read_text().split()
    lst.write_text("\n".join(ids[:2] + [bad] + ids[2:]) + "\n")
    (tmp_path / "x.jpg").write_bytes(b"never read")
    proc = run_cli("preprocess", *common)
    assert_user_error(proc, f"{lst} line 3", "bad image id")
    assert tree_snapshot(d) == before
    no_debris(d)


def test_generated_ids_are_accepted(tmp_path, params_file):
    from pipeline.data.voc import ID_PATTERN

    for sid in ("2008_000123", "2011_003276", "syn_000001", "2007_000032"):
        assert ID_PATTERN.fullmatch(sid)


def _train(params_file, d, *extra):
    return run_cli("train", "-q", "-p", str(params_file), "-S", f"data.dir={d}",
                   "-S", f"mlflow.tracking_uri=sqlite:///{d.parent / 'mlflow.db'}",
                   "-S", f"ray.storage_path={d.parent / 'ray_results'}", "-S", "train.model=unet",
                   "-S", "train.model_options={base_channels: 4}", *extra, timeout=120)


def _corrupt(d, how):
    manifest = json.loads((d / "shards" / "manifest.json").read_text())
    rel = sorted(r for r in manifest["shards"] if r.startswith("train/"))[0]
    shard = d / "shards" / rel
    data = bytearray(shard.read_bytes())
    if how == "flip":
        mid = len(data) // 2
        data[mid:mid + 256] = bytes(b ^ 0xFF for b in data[mid:mid + 256])
    else:
        data = data[: len(data) // 2]
    shard.write_bytes(bytes(data))
    return shard


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_corrupt_shard_stops_train_before_ray(tmp_path, params_file, sample_dir, how):
    shard = _corrupt(sample_dir, how)
    before = tree_snapshot(tmp_path)
    proc = _train(params_file, sample_dir)
    assert_user_error(proc, str(shard), "segpipe preprocess")
    assert "ray" not in proc.stdout.lower()  # nothing started
    assert tree_snapshot(tmp_path) == before
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray_results").exists()


def test_corrupt_shard_stops_tune_before_ray(tmp_path, params_file, sample_dir):
    shard = _corrupt(sample_dir, "flip")
    proc = run_cli("tune", "-q", "-p", str(params_file), "-S", f"data.dir={sample_dir}", "--family", "lraspp", "-S", "families.lraspp.options={}",
                   "-S", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                   "-S", f"ray.storage_path={tmp_path / 'ray_results'}", timeout=120)
    assert_user_error(proc, str(shard), "segpipe preprocess")
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray_results").exists()


def test_verify_checks_rows_and_accepts_intact_shards(sample_dir):
    got = verify_shards(sample_dir)
    m = sample_dir / "shards" / "manifest.json"
    manifest = json.loads(m.read_text())
    assert got["shards"] == len(manifest["shards"]) == 3 and got["bytes"] > 0  # train, val, tune (data.tune_split)
    rel = sorted(manifest["shards"])[0]
    manifest["shards"][rel]["rows"] += 1
    m.write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"rows, manifest.json says .*segpipe preprocess"):
        verify_shards(sample_dir)
    (sample_dir / "shards" / rel).unlink()
    with pytest.raises(UserError, match="is missing"):
        verify_shards(sample_dir)


def test_bench_verify_reports_the_cost(tmp_path):
    proc = run_cli("bench", "verify", "--quick", "--out", str(tmp_path / "bench"), "--workdir", str(tmp_path / "w"),
                   timeout=300, fresh=True)
    assert proc.returncode == 0, proc.stderr
    got = json.loads((tmp_path / "bench" / "verify.json").read_text())
    names = [g["name"] for g in got["goals"]]
    assert names == ["verify time / loader-only epoch", "verify throughput GB/s"]
    assert got["goals"][1]["value"] > 0


def test_damaged_source_json(params_file, sample_dir):
    (sample_dir / "raw" / "source.json").write_text('{"source": "sample", "voc_root": ')
    before = tree_snapshot(sample_dir)
    proc = run_cli("preprocess", "-q", "-p", str(params_file), "-S", f"data.dir={sample_dir}")
    assert_user_error(proc, "source.json is damaged", "segpipe fetch")
    assert tree_snapshot(sample_dir) == before
    no_debris(sample_dir)
