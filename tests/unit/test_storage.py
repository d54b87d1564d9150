"""Shards and run markers through pyarrow.fs: a URI data.dir reads the same rows as a local path."""

from pipeline import storage
from pipeline.data.loaders import ShardDataset, list_shards, load_manifest


def test_uri_and_path_read_the_same_shards(synthetic_shards):
    uri = synthetic_shards.resolve().as_uri()  # file:///...: goes through pyarrow.fs.FileSystem.from_uri
    assert storage.is_uri(uri) and not storage.is_uri(str(synthetic_shards))
    assert load_manifest(uri) == load_manifest(synthetic_shards)
    assert all(s.startswith("file://") for s in list_shards(uri, "train"))
    a, b = ShardDataset(uri, "val", rank=1, world_size=2), ShardDataset(synthetic_shards, "val", rank=1, world_size=2)
    assert len(a) == len(b) > 0
    assert [a.raw(i) for i in range(len(a))] == [b.raw(i) for i in range(len(b))]


def test_text_and_dirs_roundtrip(tmp_path):
    base = tmp_path.as_uri()
    target = storage.join(base, "runs", "fcn-x-seed0-1", "segpipe_run.json")
    assert not storage.exists(target)
    storage.write_text(target, '{"mlflow_run_id": "abc"}\n')
    assert storage.exists(target) and (tmp_path / "runs/fcn-x-seed0-1/segpipe_run.json").is_file()
    assert storage.read_text(target) == '{"mlflow_run_id": "abc"}\n'
    (tmp_path / "runs" / "fcn-x-seed0-2").mkdir()
    assert storage.list_dirs(storage.join(base, "runs")) == ["fcn-x-seed0-1", "fcn-x-seed0-2"]
    assert storage.list_dirs(str(tmp_path / "nothing")) == []
    assert storage.resolve("rel") == str((__import__("pathlib").Path("rel")).resolve())


def test_atomic_path_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    try:
        with storage.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    except RuntimeError:
        pass
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    storage.write_text_atomic(target, "new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
