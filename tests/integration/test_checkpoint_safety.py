"""Checkpoints are data, never code (issue 13): every torch.load is weights_only=True, so a
checkpoint whose pickle carries a malicious __reduce__ is refused with one `error:` line (exit 2)
and its payload never runs, both for `segpipe predict --model FILE.pt` and for a resumed
`segpipe train` (a crafted state.pt on ray.storage_path)."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest

from tests.support.cli import assert_user_error, run_cli
from tests.support.paths import ROOT


class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_checkpoint(path: Path, marker: Path) -> None:
    import torch

    from seg_models import build_model

    model = build_model("unet", num_classes=21, base_channels=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model_name": "unet", "options": {"base_channels": 8}, "model": model.state_dict(), "epoch": 1,
                "optimizer": Payload(marker)}, path)


def test_the_payload_is_real(tmp_path):
    """The crafted file does run its payload under a plain pickle load (weights_only=False)."""
    import torch

    marker = tmp_path / "pwned"
    _evil_checkpoint(tmp_path / "evil.pt", marker)
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


def test_predict_refuses_a_malicious_checkpoint(tmp_path):
    marker = tmp_path / "pwned"
    _evil_checkpoint(tmp_path / "evil.pt", marker)
    image = next((ROOT / "assets").rglob("*.jpg"), None)
    if image is None:
        from PIL import Image

        image = tmp_path / "x.jpg"
        Image.new("RGB", (32, 32)).save(image)
    proc = run_cli("predict", "-p", str(ROOT / "params.yaml"), "--model", str(tmp_path / "evil.pt"), str(image),
                   "--out", str(tmp_path / "out"), "--device", "cpu",
                   "-S", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", cwd=tmp_path)
    assert_user_error(proc, "refusing to load", "evil.pt", "--model")
    assert not marker.exists(), "the checkpoint's payload ran"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fault", ["wrong shape", "bad option", "unknown model"])
def test_predict_refuses_a_checkpoint_that_does_not_fit_its_model(tmp_path, fault):
    """A well-formed file whose tensors do not fit the model it names: one `error:` line, no traceback."""
    import torch

    from seg_models import build_model

    state = build_model("unet", num_classes=21, base_channels=8).state_dict()
    ckpt = {"model_name": "unet", "options": {"base_channels": 8}, "model": state, "epoch": 1}
    if fault == "wrong shape":
        first = next(iter(state))
        state[first] = torch.zeros(3, 3)
    elif fault == "bad option":
        ckpt["options"] = {"base_channels": 8, "no_such_option": 1}
    else:
        ckpt["model_name"] = "no_such_net"
    torch.save(ckpt, tmp_path / "odd.pt")
    image = tmp_path / "x.jpg"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(image)
    proc = run_cli("predict", "-p", str(ROOT / "params.yaml"), "--model", str(tmp_path / "odd.pt"), str(image),
                   "--out", str(tmp_path / "out"), "--device", "cpu",
                   "-S", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", cwd=tmp_path)
    assert_user_error(proc, "odd.pt", "segpipe can build")
    assert not (tmp_path / "out").exists()


def test_predict_still_loads_a_real_checkpoint(tmp_path):
    """The safe loader reads what segpipe itself writes (model, options, epoch, run id, eval size)."""
    import torch

    from pipeline.training.checkpoint import load_checkpoint_model
    from seg_models import build_model

    model = build_model("unet", num_classes=21, base_channels=8)
    torch.save({"model_name": "unet", "options": {"base_channels": 8}, "model": model.state_dict(), "epoch": 3,
                "mlflow_run_id": "abc", "eval_size": 64, "rng": {"torch": torch.get_rng_state(),
                                                                   "python": random.getstate()}}, tmp_path / "ok.pt")
    loaded, state = load_checkpoint_model(tmp_path / "ok.pt")
    assert state["epoch"] == 3 and not loaded.training
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x)["out"], model.eval()(x)["out"])


def test_resume_refuses_a_malicious_checkpoint_before_ray_starts(tmp_path, synthetic_shards):
    from tests.support.training import tiny_overrides

    marker = tmp_path / "pwned"
    run_dir = tmp_path / "ray" / "unet-unet-seed0-20260101-000000"
    _evil_checkpoint(run_dir / "checkpoint_2026-01-01_00-00-00.000000" / "state.pt", marker)
    before = sorted(str(p) for p in (tmp_path / "ray").rglob("*"))
    sets = sum((["-S", o] for o in tiny_overrides(synthetic_shards, tmp_path) + ["train.resume=true", "train.epochs=2"]), [])
    proc = run_cli("train", "-p", str(ROOT / "params.yaml"), "--family", "unet", *sets, cwd=tmp_path, no_ray=True)
    assert_user_error(proc, "refusing to load", "state.pt", "train.resume")
    assert not marker.exists(), "the checkpoint's payload ran"
    assert sorted(str(p) for p in (tmp_path / "ray").rglob("*")) == before
    assert not (tmp_path / "mlflow.db").exists()
    shutil.rmtree(tmp_path / "ray")


def test_a_non_torch_file_is_not_called_malicious(tmp_path):
    from PIL import Image

    from pipeline.errors import UserError
    from pipeline.training.checkpoint import load_state

    Image.new("RGB", (8, 8)).save(tmp_path / "x.jpg")
    with pytest.raises(UserError, match="is not a segpipe checkpoint") as exc:
        load_state(tmp_path / "x.jpg")
    assert "refusing" not in str(exc.value)


def test_predict_from_the_tracking_store_never_unpickles_code(tmp_path):
    """`--model runs:/…` / `models:/…` load the run's checkpoint artifact with weights_only=True, not the
    pickled MLflow model: a crafted checkpoint logged to a run is refused and its payload never runs."""
    from PIL import Image

    from pipeline.tracking import CHECKPOINT_ARTIFACT, client

    marker = tmp_path / "pwned"
    _evil_checkpoint(tmp_path / "ckpt" / "unet-seed0.pt", marker)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = client(uri)
    exp = c.create_experiment("x", artifact_location=(tmp_path / "mlruns").as_uri())
    run = c.create_run(exp).info.run_id
    c.log_artifact(run, str(tmp_path / "ckpt" / "unet-seed0.pt"), artifact_path=CHECKPOINT_ARTIFACT)
    image = tmp_path / "x.jpg"
    Image.new("RGB", (32, 32)).save(image)
    proc = run_cli("predict", "-p", str(ROOT / "params.yaml"), "--model", f"runs:/{run}/model", str(image),
                   "--out", str(tmp_path / "out"), "--device", "cpu", "-S", f"mlflow.tracking_uri={uri}", cwd=tmp_path)
    assert_user_error(proc, "refusing to load", f"the checkpoint of run {run}", "--model")
    assert not marker.exists(), "the checkpoint's payload ran"
    assert not (tmp_path / "out").exists()
    assert "segpipe-ckpt-" not in proc.stderr  # no temp path in the message
