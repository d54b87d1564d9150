"""Issue 15, item 1: bounded extraction and the removal of interrupted-extraction debris."""

import gzip
import io
import tarfile

from pipeline.storage import clean_debris
from pipeline.data.archive import ExtractLimits, safe_extract
from tests.support.cli import assert_user_error, run_cli
from tests.support.files import no_debris, tree_snapshot
from tests.support.paths import SAMPLE_TAR


def _bomb(path, size=256 << 20):
    """A .tar.gz holding one file of `size` zero bytes (~1000x compression), streamed (no big buffer)."""
    with gzip.open(path, "wb", compresslevel=1) as gz, tarfile.open(fileobj=gz, mode="w") as tf:
        info = tarfile.TarInfo("VOCdevkit/VOC2012/JPEGImages/zero.jpg")
        info.size = size

        class Zeros(io.RawIOBase):
            left = size

            def readinto(self, b):
                n = min(len(b), self.left)
                b[:n] = bytes(n)
                self.left -= n
                return n

        tf.addfile(info, Zeros())
    return path


def test_compression_bomb_refused_while_streaming(tmp_path, params_file, sample_dir):
    bomb = _bomb(tmp_path / "bomb.tar.gz")
    assert bomb.stat().st_size < 2 << 20  # ~1 MB that would expand to 256 MiB
    before = tree_snapshot(sample_dir)
    proc = run_cli("fetch", "-q", "-p", str(params_file), "-S", f"data.dir={sample_dir}", "-S", f"data.source={bomb}")
    assert_user_error(proc, "bomb.tar.gz", "data.extract_max_ratio")
    assert tree_snapshot(sample_dir) == before
    no_debris(sample_dir)


def test_total_bytes_limit(tmp_path, params_file, sample_dir):
    before = tree_snapshot(sample_dir)
    proc = run_cli("fetch", "-q", "-p", str(params_file), "-S", f"data.dir={sample_dir}", "-S", "data.source=sample",
                   "-S", "data.extract_max_gb=0.0001")  # ~107 KB: the 1 MB sample is over it
    assert_user_error(proc, "voc-mini.tar", "more than", "data.extract_max_gb")
    assert tree_snapshot(sample_dir) == before
    no_debris(sample_dir)


def test_member_count_limit(tmp_path, params_file, sample_dir):
    before = tree_snapshot(sample_dir)
    proc = run_cli("fetch", "-q", "-p", str(params_file), "-S", f"data.dir={sample_dir}", "-S", "data.source=sample",
                   "-S", "data.extract_max_members=5")
    assert_user_error(proc, "voc-mini.tar", "more than 5 members", "data.extract_max_members")
    assert tree_snapshot(sample_dir) == before
    no_debris(sample_dir)


def test_limits_stop_before_the_data_is_written(tmp_path):
    """The header is checked before its bytes are written: nothing of the bomb lands on disk."""
    bomb = _bomb(tmp_path / "b.tgz", size=64 << 20)
    dest = tmp_path / "out"
    import pytest

    from pipeline.errors import UserError

    with pytest.raises(UserError, match="extract_max_ratio"):
        safe_extract(bomb, dest, progress=False, limits=ExtractLimits(max_ratio=10))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.tgz"]
    # the defaults let the real sample through
    safe_extract(SAMPLE_TAR, dest, progress=False)
    assert (dest / "VOCdevkit" / "VOC2012" / "JPEGImages").is_dir()


def test_interrupted_fetch_debris_removed_by_next_fetch(tmp_path, params_file, sample_dir):
    # what a fetch / preprocess killed midway leaves (names from safe_extract and storage.swap_in)
    (sample_dir / "..raw-new.tmp-k1ll3d" / "VOCdevkit").mkdir(parents=True)
    (sample_dir / "..raw-new.tmp-k1ll3d" / "VOCdevkit" / "big.jpg").write_bytes(b"x" * 1000)
    (sample_dir / ".raw-new" / "VOCdevkit").mkdir(parents=True)
    (sample_dir / ".shards-new" / "train").mkdir(parents=True)
    (sample_dir / ".lock").write_text("999999\n")  # a dead holder's lock file: taken over
    proc = run_cli("fetch", "-q", "-p", str(params_file), "-S", f"data.dir={sample_dir}", "-S", "data.source=sample")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in sample_dir.iterdir()) == ["raw", "shards"]
    no_debris(sample_dir)


def test_interrupted_debris_removed_by_preprocess(tmp_path, params_file, sample_dir):
    (sample_dir / "..raw-new.tmp-abc").mkdir()
    (sample_dir / ".shards-new" / "val").mkdir(parents=True)
    (sample_dir / ".shards-new" / "val" / "part-00000.parquet.tmp").write_bytes(b"half")
    proc = run_cli("preprocess", "-q", "-p", str(params_file), "-S", f"data.dir={sample_dir}", "-S", "data.workers=1")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in sample_dir.iterdir()) == ["raw", "shards"]


def test_swap_cut_between_renames_restores_the_old_set(sample_dir):
    before = tree_snapshot(sample_dir / "raw")
    (sample_dir / "raw").rename(sample_dir / ".raw-old")  # killed right after the first rename
    clean_debris(sample_dir)
    assert tree_snapshot(sample_dir / "raw") == before
    no_debris(sample_dir)
