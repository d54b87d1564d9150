"""`segpipe fetch --weights`: the backbone files the families name, from a local HTTP server."""

import hashlib
import json

import pytest

import seg_models
from pipeline.config import load_params
from pipeline.errors import UserError
from pipeline.data.weights import fetch_weights
from tests.support.paths import ROOT
from tests.support.servers import FileServer

PAYLOAD = b"not really a state dict, but hashed like one" * 1000
PREFIX = hashlib.sha256(PAYLOAD).hexdigest()[:8]
FNAME = f"mobilenet_v3_large-{PREFIX}.pth"


@pytest.fixture
def weights_server(monkeypatch, tmp_path):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    srv = FileServer(PAYLOAD)
    # point the registry's torchvision URL for this backbone at the local server
    monkeypatch.setitem(seg_models.BACKBONE_WEIGHTS, "mobilenet_v3_large", (srv.url(f"/{FNAME}"), FNAME))
    monkeypatch.chdir(tmp_path)
    yield srv
    srv.stop()


def _params(path: str, *extra: str):
    return load_params(ROOT / "params.yaml", ["families={lraspp: {model: lraspp_mobilenet_v3_large, "
                                              f"options: {{backbone_weights: {path}}}}}}}", *extra])


def test_downloads_checks_and_records(weights_server, tmp_path):
    files = fetch_weights(_params(f"weights/{FNAME}"), progress=False)
    assert [str(f) for f in files] == [f"weights/{FNAME}"]
    assert (tmp_path / "weights" / FNAME).read_bytes() == PAYLOAD
    assert json.loads((tmp_path / "weights" / "manifest.json").read_text()) == {"lraspp": f"weights/{FNAME}"}
    n = len(weights_server.requests)
    fetch_weights(_params(f"weights/{FNAME}"), progress=False)  # present and right: no request
    assert len(weights_server.requests) == n


def test_corrupt_file_is_refused(weights_server, tmp_path):
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / FNAME).write_bytes(b"truncated")
    with pytest.raises(UserError, match=f"sha256 does not start with {PREFIX}"):
        fetch_weights(_params(f"weights/{FNAME}"), progress=False)


def test_offline_says_where_to_put_it(weights_server, tmp_path):
    weights_server.stop()
    with pytest.raises(UserError, match=rf"put it at weights/{FNAME} \(families.lraspp.options.backbone_weights\)"):
        fetch_weights(_params(f"weights/{FNAME}", "data.download_timeout_s=2"), progress=False)
    assert not (tmp_path / "weights" / FNAME).exists()


def test_no_family_names_weights(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = load_params(ROOT / "params.yaml", ["families={unet: {model: unet, options: {}}}"])
    assert fetch_weights(p, progress=False) == []
    assert json.loads((tmp_path / "weights" / "manifest.json").read_text()) == {}
