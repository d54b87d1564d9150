"""A sqlite MLflow store moves with its checkout: runs with artifacts, a logged model and a
registered version are made in a temp checkout, the directory is renamed, and the artifacts and
models:/ URI load from the new place (pipeline.tracking.rehome_store, run by preflight)."""

from __future__ import annotations

import os

import pytest
import torch

from pipeline import tracking
from pipeline.config import load_params


def _make_store(co):
    import mlflow

    uri = tracking.resolve_tracking_uri(f"sqlite:///{co / 'mlflow.db'}")
    c = tracking.client(uri)
    exp = tracking.experiment_id(c, "segpipe")
    run = c.create_run(exp, tags={"stage": "train"})
    (co / "note.txt").write_text("hello")
    c.log_artifact(run.info.run_id, str(co / "note.txt"))
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    with tracking.fluent_uri(uri), mlflow.start_run(run_id=run.info.run_id):
        info = mlflow.pytorch.log_model(net, name="model", serialization_format="pickle",
                                        pip_requirements=["torch"])
    from seg_models import build_model

    unet = build_model("unet", num_classes=21, base_channels=8)
    torch.save({"model_name": "unet", "options": {"base_channels": 8}, "model": unet.state_dict(), "epoch": 1,
                "mlflow_run_id": run.info.run_id, "eval_size": 64}, co / "unet-seed0.pt")
    c.log_artifact(run.info.run_id, str(co / "unet-seed0.pt"), artifact_path=tracking.CHECKPOINT_ARTIFACT)
    c.set_terminated(run.info.run_id)
    c.create_registered_model("segpipe-x")
    with tracking.fluent_uri(uri):  # MLflow resolves models:/m-... through the global URI
        mv = c.create_model_version("segpipe-x", info.model_uri, run_id=run.info.run_id)
    c.set_registered_model_alias("segpipe-x", "best", mv.version)
    return run.info.run_id, net


def test_moved_checkout_keeps_artifacts_and_models(tmp_path, params_file):
    import mlflow

    co = tmp_path / "checkout"
    co.mkdir()
    run_id, net = _make_store(co)
    assert (co / "mlruns").is_dir()
    moved = tmp_path / "elsewhere" / "renamed"
    moved.parent.mkdir()
    os.rename(co, moved)
    uri = tracking.resolve_tracking_uri(f"sqlite:///{moved / 'mlflow.db'}")
    c = tracking.client(uri)
    # without re-rooting the store still points at the old place
    assert str(co) in c.get_run(run_id).info.artifact_uri
    with pytest.raises(Exception):
        c.download_artifacts(run_id, "note.txt", str(tmp_path / "dl0"))

    # what train / tune / report run first
    p = load_params(params_file, [f"mlflow.tracking_uri={uri}"])
    tracking.preflight(p)
    run = c.get_run(run_id)
    assert run.info.artifact_uri.startswith((moved / "mlruns").as_uri())
    assert str(co) not in c.get_experiment(run.info.experiment_id).artifact_location
    (tmp_path / "dl").mkdir()
    assert open(c.download_artifacts(run_id, "note.txt", str(tmp_path / "dl"))).read() == "hello"
    with tracking.fluent_uri(uri):
        loaded = mlflow.pytorch.load_model("models:/segpipe-x@best")
    x = torch.ones(1, 3)
    assert torch.equal(loaded(x), net(x))
    assert tracking.rehome_store(uri) == 0  # idempotent: nothing left to move


def test_predict_resolves_models_uri_after_move(tmp_path, params_file):
    """`segpipe predict` re-roots by itself (no train/report in between)."""
    co = tmp_path / "checkout"
    co.mkdir()
    _make_store(co)
    moved = tmp_path / "moved"
    os.rename(co, moved)
    uri = f"sqlite:///{moved / 'mlflow.db'}"
    from pipeline.reporting.predict import load_model

    p = load_params(params_file, [f"mlflow.tracking_uri={uri}"])
    model, size, _ = load_model("models:/segpipe-x@best", p, torch.device("cpu"))  # the run's checkpoint artifact
    saved = torch.load(moved / "unet-seed0.pt", weights_only=True)["model"]
    assert size == 64 and all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
