"""What the report measures itself on each family's best logged model: parameters, GFLOPs and
latency (batch 1, the eval size, the local device), and the predictions of the qualitative grid."""

from __future__ import annotations

import logging
import statistics
import sys
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.training.inference import predict_mask
from pipeline.reporting.predict import load_run_checkpoint

log = logging.getLogger(__name__)


def measure(model, size: int, device, warmup: int, repeats: int) -> dict:
    """params (M), GFLOPs (FlopCounterMode: a multiply-add is 2 FLOPs) and latency (median ms of
    `repeats` timed forward passes after `warmup`), batch 1, size x size."""
    x = torch.randn(1, 3, size, size, device=device)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode():
        with counter:
            model(x)
        for _ in range(warmup):
            model(x)
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append((time.perf_counter() - t0) * 1000.0)
    return {"params_M": sum(t.numel() for t in model.parameters()) / 1e6,
            "gflops": counter.get_total_flops() / 1e9,
            "latency_ms": statistics.median(times),
            "latency_p90_ms": float(np.percentile(times, 90)),
            "size": size}


def load_logged_model(uri: str, run_id: str, device):
    """A train run's model from its checkpoint artifact (weights_only=True: no pickle of a module is
    ever loaded), eval mode, on `device`."""
    model, _ = load_run_checkpoint(uri, run_id, f"run {run_id}")
    return model.to(device).eval()


def measure_groups(groups, uri: str, device, p, samples, progress: bool = True) -> dict[str, list[np.ndarray]]:
    """Fill each group's ``measured`` (params_M, gflops, latency_ms, latency_p90_ms, size; or a
    ``note`` saying why not) from its best run's logged model; returns family -> its predicted masks
    of ``samples`` (empty without samples). A model that cannot be loaded is a warning on stderr."""
    say = log.info if progress else (lambda *a, **k: None)
    predictions: dict[str, list[np.ndarray]] = {}
    for g in groups:
        best = g.best
        if not best.model_id:
            g.measured = {"note": "no logged model in MLflow"}
            continue
        try:
            model = load_logged_model(uri, best.run_id, device)
        except Exception as exc:  # artifacts deleted or moved: the report goes on without measurements
            g.measured = {"note": f"logged model not loadable: {exc.__class__.__name__}"}
            print(f"report: warning: {g.family}: cannot load the logged model of run {best.run_id} "
                  f"({exc.__class__.__name__}: {str(exc)[:150]}); no params/GFLOPs/latency for it", file=sys.stderr)
            continue
        size = best.eval_size or p.train.eval_size
        g.measured = measure(model, size, device, p.report.latency_warmup, p.report.latency_repeats)
        say(f"report: {g.family:<10} {g.measured['params_M']:.2f} M params, {g.measured['gflops']:.2f} GFLOPs, "
            f"{g.measured['latency_ms']:.1f} ms/image at {size}x{size} on {device.type}")
        if samples:
            predictions[g.family] = [predict_mask(model, img, size) for _, img, _ in samples]
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return predictions
