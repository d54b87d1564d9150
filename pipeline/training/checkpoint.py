"""The checkpoint format, written once: what a Ray checkpoint's state.pt and a
<models_dir>/<family>-seed<N>.pt hold, how they are written and how they are read back safely.

state.pt (rank 0, every epoch, inside a Ray Train checkpoint): model, optimizer, scheduler, scaler
state dicts, epoch (done), model_name, options, rng {torch: ByteTensor, python: random.getstate()}.
<family>-seed<N>.pt (the DVC output, also the run's `checkpoint` MLflow artifact): model_name,
options, model, epoch, mlflow_run_id, eval_size.

Every read goes through :func:`load_state` (torch.load weights_only=True): data never runs code.
"""

from __future__ import annotations

import io
import pickle
import random
from pathlib import Path

import torch

from pipeline import storage
from pipeline.data.voc import NUM_CLASSES
from pipeline.errors import UserError
from pipeline.training.setup import Setup
from seg_models import build_model


def load_state(path, map_location="cpu", name: str | None = None) -> dict:
    """Read a segpipe checkpoint (a Ray checkpoint's state.pt or a <family>-seed<N>.pt) safely.

    torch.load(weights_only=True): the unpickler builds only tensors, plain containers and
    numbers/strings (plus torch's own allow-list); any other global (a class, a function such as
    os.system named by a crafted __reduce__) is refused before anything runs. The checkpoints
    segpipe writes hold nothing else (model/optimizer/scheduler/scaler state dicts, epoch, model
    name and options, RNG state as a tensor + Python's getstate() tuple), so no extra globals are
    allow-listed. Anything unreadable is a UserError naming the file (`name`, default `path`)."""
    name = name or str(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only's unpickler names the global / class / call it refused; other failures
        # (e.g. "Unsupported operand" for a JPEG) mean the file is no pickle at all
        why = next((line.strip() for line in str(exc).splitlines()
                    if any(k in line for k in ("GLOBAL", "global", "reduce", "class", "allowed"))
                    and "documentation" not in line and "weights_only" not in line), None)
        if why is None:
            raise UserError(f"{name} is not a segpipe checkpoint (not a torch file)") from None
        raise UserError(f"refusing to load {name}: it holds objects other than tensors and plain containers "
                        f"(weights_only=True: {why[:160]}); only load checkpoints you trust") from None
    except Exception as exc:  # not a torch file, truncated, ...
        raise UserError(f"{name} is not a readable segpipe checkpoint ({exc.__class__.__name__})") from None
    if not isinstance(state, dict) or not {"model", "model_name", "options"} <= set(state):
        raise UserError(f"{name} is not a segpipe checkpoint (no model / model_name / options)")
    return state


def check_resume_checkpoints(storage_path: str, run_name: str) -> None:
    """Before Ray starts: every checkpoint a resumed run could restore loads with weights_only=True
    (a crafted state.pt on shared storage is refused here, with one `error:` line)."""
    run_dir = storage.join(storage_path, run_name)
    if not storage.exists(run_dir):
        return
    for d in storage.list_dirs(run_dir):
        if not d.startswith("checkpoint_"):
            continue
        path = storage.join(run_dir, d, "state.pt")
        if not storage.exists(path):
            continue
        try:
            if storage.is_uri(path):
                fs, inner = storage.filesystem(path)
                with fs.open_input_stream(inner) as f:
                    load_state(io.BytesIO(f.read()), name=path)
            else:
                load_state(path)
        except UserError as exc:
            raise UserError(f"{exc} (train.resume, ray.storage_path)") from None


def load_checkpoint_model(path: str | Path):
    """A state.pt of a Ray checkpoint or a <family>-seed<N>.pt -> (eval-mode model, state dict)."""
    state = load_state(path)
    try:
        model = build_model(state["model_name"], num_classes=NUM_CLASSES, **state["options"])
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # a missing key, a wrong shape or name
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} does not hold a model segpipe can build ({first}): re-train it or pass another "
                        f"checkpoint") from None
    return model.eval(), state


def save_state(path: Path, s: Setup, epoch: int, spec, history: dict[int, dict[str, float]]) -> None:
    """The per-epoch training state (rank 0 writes it into the Ray checkpoint directory), with the
    run's epoch history so far (a resumed run returns every epoch, not only its own)."""
    torch.save({"model": s.core.state_dict(), "optimizer": s.optimizer.state_dict(),
                "scheduler": s.scheduler.state_dict(), "scaler": s.scaler.state_dict(), "epoch": epoch,
                "history": history,
                "model_name": spec.model, "options": dict(spec.options),
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}, path)


def restore_state(s: Setup, state: dict) -> int:
    """Put a state.pt back into the set-up (and the RNGs); returns the epochs already done (the
    epoch history is ``state["history"]``)."""
    s.core.load_state_dict(state["model"])
    s.optimizer.load_state_dict(state["optimizer"])
    s.scheduler.load_state_dict(state["scheduler"])
    s.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    return state["epoch"]


def save_model_file(path: Path, *, model_name: str, options: dict, state: dict, run_id: str, eval_size: int) -> Path:
    """<models_dir>/<family>-seed<N>.pt, written to a temporary name and renamed (never half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with storage.atomic_path(path) as tmp:
        torch.save({"model_name": model_name, "options": options, "model": state["model"], "epoch": state["epoch"],
                    "mlflow_run_id": run_id, "eval_size": eval_size}, tmp)
    return path
