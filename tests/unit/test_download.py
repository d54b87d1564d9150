"""pipeline.data.download: resumable, verified downloads against a local HTTP server, and tar
extraction that refuses anything that could write outside its target."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import random
import socket
import tarfile
import time
from pathlib import Path

import pytest

from pipeline.data.archive import safe_extract
from pipeline.data.download import download, md5sum, sha256sum
from pipeline.errors import UserError
from tests.support.servers import FileServer

PAYLOAD = random.Random(0).randbytes(300_000)
PAYLOAD_MD5 = hashlib.md5(PAYLOAD).hexdigest()


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    srv = FileServer(PAYLOAD)
    yield srv
    srv.stop()


def _part(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


# ------------------------------------------------------------------------------------- download
def test_full_download_md5_ok(server, tmp_path):
    dest = tmp_path / "sub" / "VOCtrainval.tar"
    assert download(server.url(), dest, md5=PAYLOAD_MD5, progress=False) == dest
    assert dest.read_bytes() == PAYLOAD
    assert not _part(dest).exists()
    assert server.requests == [{"path": "/VOCtrainval.tar", "range": None}]


def test_cut_midway_keeps_part_then_resumes(server, tmp_path):
    dest = tmp_path / "VOCtrainval.tar"
    server.cut_after = 100_000
    with pytest.raises(UserError, match="re-run to resume"):
        download(server.url(), dest, md5=PAYLOAD_MD5, progress=False)
    assert not dest.exists()
    assert _part(dest).read_bytes() == PAYLOAD[:100_000]

    server.cut_after = None
    assert download(server.url(), dest, md5=PAYLOAD_MD5, progress=False) == dest
    assert server.requests[-1]["range"] == "bytes=100000-"
    assert dest.read_bytes() == PAYLOAD
    assert not _part(dest).exists()


def test_connection_reset_keeps_part_then_resumes(server, tmp_path):
    dest = tmp_path / "VOCtrainval.tar"
    server.cut_after, server.cut_mode = 120_000, "reset"
    with pytest.raises(UserError, match="re-run to resume"):
        download(server.url(), dest, md5=PAYLOAD_MD5, progress=False)
    size = _part(dest).stat().st_size
    assert 0 < size < len(PAYLOAD)
    assert _part(dest).read_bytes() == PAYLOAD[:size]

    server.cut_after = None
    download(server.url(), dest, md5=PAYLOAD_MD5, progress=False)
    assert server.requests[-1]["range"] == f"bytes={size}-"
    assert dest.read_bytes() == PAYLOAD


def test_wrong_checksum_deletes_download(server, tmp_path):
    dest = tmp_path / "VOCtrainval.tar"
    wrong = "0" * 32
    with pytest.raises(UserError) as ei:
        download(server.url(), dest, md5=wrong, progress=False)
    msg = str(ei.value)
    assert server.url() in msg and wrong in msg and PAYLOAD_MD5 in msg
    assert not dest.exists() and not _part(dest).exists()
    assert list(tmp_path.iterdir()) == []


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    dest = tmp_path / "VOCtrainval.tar"
    _part(dest).write_bytes(b"\xff" * 50_000)  # garbage: appending to it would corrupt the file
    server.ignore_range = True
    download(server.url(), dest, md5=PAYLOAD_MD5, progress=False)
    assert server.requests[-1]["range"] == "bytes=50000-"
    assert dest.read_bytes() == PAYLOAD


def test_416_complete_part_is_verified(server, tmp_path):
    dest = tmp_path / "VOCtrainval.tar"
    _part(dest).write_bytes(PAYLOAD)
    download(server.url(), dest, md5=PAYLOAD_MD5, progress=False)
    assert server.requests[-1]["range"] == f"bytes={len(PAYLOAD)}-"
    assert dest.read_bytes() == PAYLOAD and not _part(dest).exists()


def test_416_complete_part_with_wrong_bytes_is_deleted(server, tmp_path):
    dest = tmp_path / "VOCtrainval.tar"
    _part(dest).write_bytes(b"\x00" * len(PAYLOAD))
    with pytest.raises(UserError, match="checksum mismatch"):
        download(server.url(), dest, md5=PAYLOAD_MD5, progress=False)
    assert not dest.exists() and not _part(dest).exists()


def test_dest_present_with_right_md5_makes_no_request(server, tmp_path):
    dest = tmp_path / "VOCtrainval.tar"
    dest.write_bytes(PAYLOAD)
    assert download(server.url(), dest, md5=PAYLOAD_MD5, progress=False) == dest
    assert server.requests == []


def test_dest_present_with_wrong_md5_is_downloaded_again(server, tmp_path):
    dest = tmp_path / "VOCtrainval.tar"
    dest.write_bytes(b"stale")
    download(server.url(), dest, md5=PAYLOAD_MD5, progress=False)
    assert len(server.requests) == 1
    assert dest.read_bytes() == PAYLOAD


def test_unreachable_fails_fast_with_hint(tmp_path, monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    url = f"http://127.0.0.1:{port}/VOCtrainval.tar"
    dest = tmp_path / "VOCtrainval.tar"
    t0 = time.monotonic()
    with pytest.raises(UserError) as ei:
        download(url, dest, md5=PAYLOAD_MD5, timeout=20.0, progress=False)
    assert time.monotonic() - t0 < 5
    msg = str(ei.value)
    assert "data.source" in msg and url in msg and str(dest) in msg
    assert "\n" not in msg
    assert not dest.exists() and not _part(dest).exists()


def test_http_error_is_user_error(server, tmp_path):
    with pytest.raises(UserError, match="HTTP 404"):
        download(server.url("/missing"), tmp_path / "x.tar", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_file_url_download_and_resume(tmp_path):
    src = tmp_path / "mirror" / "VOCtrainval.tar"
    src.parent.mkdir()
    src.write_bytes(PAYLOAD)
    dest = tmp_path / "raw" / "VOCtrainval.tar"
    assert download(src.as_uri(), dest, md5=PAYLOAD_MD5, progress=False) == dest
    assert dest.read_bytes() == PAYLOAD

    dest2 = tmp_path / "raw2" / "VOCtrainval.tar"
    dest2.parent.mkdir()
    _part(dest2).write_bytes(PAYLOAD[:1234])
    download(src.as_uri(), dest2, md5=PAYLOAD_MD5, progress=False)
    assert dest2.read_bytes() == PAYLOAD and not _part(dest2).exists()

    with pytest.raises(UserError, match="data.source"):
        download((tmp_path / "nope.tar").as_uri(), tmp_path / "y.tar", progress=False)


def test_hash_helpers(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(PAYLOAD)
    assert md5sum(p) == PAYLOAD_MD5
    assert sha256sum(p) == hashlib.sha256(PAYLOAD).hexdigest()


# ---------------------------------------------------------------------------------- safe_extract
def _info(name: str, type=tarfile.REGTYPE, data: bytes = b"", **attrs) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.type = type
    ti.size = len(data) if type == tarfile.REGTYPE else 0
    ti.mode = 0o755 if type == tarfile.DIRTYPE else 0o644
    for k, v in attrs.items():
        setattr(ti, k, v)
    return ti, data


def _make_tar(path: Path, members, mode: str = "w") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode, format=tarfile.GNU_FORMAT) as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    return path


def _snapshot(root: Path) -> dict:
    """Every path under root (symlinks not followed) with its kind and content."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            rel = str(p.relative_to(root))
            if p.is_symlink():
                snap[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                snap[rel] = ("dir", None)
            else:
                snap[rel] = ("file", p.read_bytes())
    return snap


@pytest.fixture
def area(tmp_path):
    """tmp_path/work/data/raw = dest_dir (holding an earlier VOCdevkit), tmp_path/work/outside.txt
    = a file the attacks aim at; archives live in tmp_path/archives."""
    dest = tmp_path / "work" / "data" / "raw"
    (dest / "VOCdevkit" / "VOC2012").mkdir(parents=True)
    (dest / "VOCdevkit" / "VOC2012" / "old.txt").write_text("earlier archive")
    (tmp_path / "work" / "outside.txt").write_text("keep")
    (tmp_path / "archives").mkdir()
    return tmp_path, dest


def test_safe_extract_good_tar_merges(area):
    root, dest = area
    (dest / "VOCdevkit" / "VOC2012" / "same.txt").write_text("old version")
    archive = _make_tar(
        root / "archives" / "good.tar.gz",
        [
            _info("VOCdevkit", tarfile.DIRTYPE),
            _info("VOCdevkit/VOC2012", tarfile.DIRTYPE),
            _info("./VOCdevkit/VOC2012/same.txt", data=b"new version"),
            _info("VOCdevkit/VOC2012/JPEGImages/a.jpg", data=b"jpeg"),
            _info("VOCdevkit/latest", tarfile.SYMTYPE, linkname="VOC2012"),
            _info("VOCdevkit/VOC2012/b.jpg", tarfile.LNKTYPE, linkname="VOCdevkit/VOC2012/JPEGImages/a.jpg"),
        ],
        mode="w:gz",
    )
    safe_extract(archive, dest, progress=False)
    v = dest / "VOCdevkit" / "VOC2012"
    assert (v / "old.txt").read_text() == "earlier archive"
    assert (v / "same.txt").read_text() == "new version"
    assert (v / "JPEGImages" / "a.jpg").read_bytes() == b"jpeg"
    assert (v / "b.jpg").read_bytes() == b"jpeg"
    assert os.readlink(dest / "VOCdevkit" / "latest") == "VOC2012"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["raw"]  # no temp dir left
    assert _snapshot(root / "work")["outside.txt"] == ("file", b"keep")


def test_safe_extract_creates_dest_and_replaces_dest_symlink(area):
    root, _ = area
    dest = root / "work" / "data" / "fresh"
    target = root / "work" / "elsewhere"
    target.mkdir()
    dest.mkdir()
    (dest / "VOCdevkit").symlink_to(target)  # must be replaced, never written through
    archive = _make_tar(root / "archives" / "a.tar", [_info("VOCdevkit/x.txt", data=b"x")])
    safe_extract(archive, dest, progress=False)
    assert not (dest / "VOCdevkit").is_symlink()
    assert (dest / "VOCdevkit" / "x.txt").read_bytes() == b"x"
    assert list(target.iterdir()) == []

    new_dest = root / "work" / "data" / "brand_new"
    safe_extract(archive, new_dest, progress=False)
    assert (new_dest / "VOCdevkit" / "x.txt").read_bytes() == b"x"


def _bad_members(root: Path) -> dict:
    outside = root / "work" / "outside.txt"
    return {
        "absolute": ([_info(str(root / "work" / "abs_evil.txt"), data=b"evil")], "abs_evil.txt"),
        "dotdot": ([_info("../evil.txt", data=b"evil")], "../evil.txt"),
        "dotdot_nested": ([_info("VOCdevkit/../../evil.txt", data=b"evil")], "VOCdevkit/../../evil.txt"),
        "symlink_outside": (
            [_info("VOCdevkit/link", tarfile.SYMTYPE, linkname="../../../outside.txt")],
            "VOCdevkit/link",
        ),
        "symlink_absolute": ([_info("link", tarfile.SYMTYPE, linkname=str(outside))], "link"),
        "write_through_symlink": (
            [
                _info("dirlink", tarfile.SYMTYPE, linkname="VOCdevkit"),
                _info("dirlink/x.txt", data=b"evil"),
            ],
            "dirlink/x.txt",
        ),
        "hardlink_outside": ([_info("VOCdevkit/hl", tarfile.LNKTYPE, linkname="../outside.txt")], "VOCdevkit/hl"),
        "hardlink_absolute": ([_info("VOCdevkit/hl", tarfile.LNKTYPE, linkname=str(outside))], "VOCdevkit/hl"),
        "char_device": ([_info("VOCdevkit/null", tarfile.CHRTYPE, devmajor=1, devminor=3)], "VOCdevkit/null"),
        "fifo": ([_info("VOCdevkit/fifo", tarfile.FIFOTYPE)], "VOCdevkit/fifo"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "absolute", "dotdot", "dotdot_nested", "symlink_outside", "symlink_absolute",
        "write_through_symlink", "hardlink_outside", "hardlink_absolute", "char_device", "fifo",
    ],
)
def test_safe_extract_refuses_and_changes_nothing(area, case):
    root, dest = area
    bad, member = _bad_members(root)[case]
    # a good member first: all-or-nothing means it must not appear either
    members = [_info("VOCdevkit/VOC2012/good.txt", data=b"good")] + bad
    archive = _make_tar(root / "archives" / f"{case}.tar", members)
    before = _snapshot(root)
    with pytest.raises(UserError) as ei:
        safe_extract(archive, dest, progress=False)
    msg = str(ei.value)
    assert msg.startswith(f"refused archive {archive}")
    assert member in msg
    assert "\n" not in msg
    assert _snapshot(root) == before  # nothing written anywhere, no temp dir left
    assert not (root / "work" / "evil.txt").exists() and not (root / "evil.txt").exists()


def _tar_bytes(members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("case", ["mid_data", "at_header", "no_end_marker", "junk_tail", "gz_cut", "not_a_tar", "empty"])
def test_safe_extract_truncated_or_corrupt(area, case):
    root, dest = area
    data_a = random.Random(1).randbytes(1000)
    data_b = random.Random(2).randbytes(20_000)
    full = _tar_bytes([_info("VOCdevkit/a.bin", data=data_a), _info("VOCdevkit/b.bin", data=data_b)])
    second_header = 512 + 1024  # header + 1000 bytes padded to 1024
    end_of_b = second_header + 512 + 20_480
    blob = {
        "mid_data": full[: second_header + 512 + 5_000],
        "at_header": full[:second_header],
        "no_end_marker": full[:end_of_b],
        "junk_tail": full[:end_of_b] + b"\x01" * 1024,  # tarfile alone stops there silently
        "gz_cut": gzip.compress(full)[:-2000],
        "not_a_tar": random.Random(3).randbytes(5000),
        "empty": b"",
    }[case]
    assert blob != full
    archive = root / "archives" / f"{case}.tar"
    archive.write_bytes(blob)
    before = _snapshot(root)
    with pytest.raises(UserError) as ei:
        safe_extract(archive, dest, progress=False)
    assert str(archive) in str(ei.value)
    assert "\n" not in str(ei.value)
    assert _snapshot(root) == before


def test_safe_extract_missing_archive(area):
    root, dest = area
    with pytest.raises(UserError, match="not found"):
        safe_extract(root / "archives" / "nope.tar", dest, progress=False)
