"""`segpipe bench model`: our models vs torchvision's identical ones (same weights), fwd+bwd and inference."""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.common import goal, median, report
from pipeline import system
from pipeline.errors import UserError
from pipeline.training.engine import loss_fn
from seg_models import FAMILIES

# the models torchvision has an identical copy of (seg_models' registry), in family order
TV_IDENTICAL = tuple(m for f in FAMILIES.values() for m in f.torchvision_identical)


def _tv_model(name: str):
    from torchvision.models import segmentation as tvs

    return getattr(tvs, name)(weights=None, weights_backbone=None, num_classes=21)


def _time_step(model, x, y, train: bool, sync, clock) -> float:
    import torch

    t0 = clock()
    if train:
        loss = loss_fn(model(x), y, aux_weight=0.5)  # the training loss (out + aux where the model has one)
        loss.backward()
    else:
        with torch.no_grad():
            model(x)
    sync()
    return clock() - t0


def bench_model(args, out: Path) -> dict:
    names = args.models.split(",") if args.models else (["lraspp_mobilenet_v3_large"] if args.quick else list(TV_IDENTICAL))
    bad = [n for n in names if n not in TV_IDENTICAL]
    if bad:
        raise UserError(f"{', '.join(bad)}: not a model torchvision has an identical copy of; choose from "
                        f"{', '.join(TV_IDENTICAL)} (--models)")
    import torch

    from seg_models import build_model
    device = system.pick_device(args.device, "--device")
    batch = args.batch_size or 2
    size = args.crop or (64 if args.quick else 96)
    repeats = args.repeats or (1 if args.quick else 4)
    threads = args.threads or (1 if device.type == "cpu" else torch.get_num_threads())
    if device.type == "cuda":
        sync, clock, clock_name = torch.cuda.synchronize, time.perf_counter, "wall ms (CUDA synchronised)"
    else:  # single-threaded and on this process's CPU time: other work on a shared machine barely moves it
        sync, clock, clock_name = (lambda: None), time.process_time, "CPU ms of this process"
    compile_modes = [False, True] if args.compile else [False]
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows, results, ratios = [], [], []
    torch.manual_seed(0)
    x0 = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 21, (batch, size, size), device=device)
    print(f"{device}, {threads} thread(s), batch {batch} x {size}x{size}, {repeats} alternating round(s), {clock_name}",
          flush=True)
    try:
        for name in names:
            tv = _tv_model(name).to(device)
            ours = build_model(name, num_classes=21).to(device)
            ours.load_state_dict(tv.state_dict(), strict=True)
            for compiled in compile_modes:
                for cl in (False, True):
                    fmt_ = torch.channels_last if cl else torch.contiguous_format
                    x = x0.contiguous(memory_format=fmt_)
                    pair, compile_s = {}, {}
                    for label, m in (("torchvision", tv), ("ours", ours)):
                        m = m.to(memory_format=fmt_)
                        if compiled:
                            t0 = time.perf_counter()
                            m = torch.compile(m)
                            for mode in (True, False):
                                m.train(mode)
                                _time_step(m, x, y, mode, sync, clock)
                            compile_s[label] = round(time.perf_counter() - t0, 1)
                        pair[label] = m
                    for mode in ("train", "infer"):
                        train = mode == "train"
                        for m in pair.values():  # warm-up
                            m.train(train)
                            _time_step(m, x, y, train, sync, clock)
                        times = {lab: [] for lab in pair}
                        for r in range(repeats):  # A B, B A, ...: neither always goes first
                            for lab in (("torchvision", "ours") if r % 2 == 0 else ("ours", "torchvision")):
                                times[lab].append(_time_step(pair[lab], x, y, train, sync, clock) * 1e3)
                            ours.zero_grad(set_to_none=True)
                            tv.zero_grad(set_to_none=True)
                        ratio = median([o / t for o, t in zip(times["ours"], times["torchvision"])])
                        ratios.append(ratio)
                        t_tv, t_ours = median(times["torchvision"]), median(times["ours"])
                        label = "fwd+bwd" if train else "inference"
                        rows.append([name, label, "on" if cl else "off", "on" if compiled else "off",
                                     round(t_tv, 1), round(t_ours, 1), round(ratio, 3)])
                        results.append({"model": name, "mode": mode, "channels_last": cl, "compile": compiled,
                                         "torchvision_ms": [round(v, 2) for v in times["torchvision"]],
                                         "ours_ms": [round(v, 2) for v in times["ours"]], "compile_s": compile_s})
                        print(f"  {name:<30} {label:<9} cl={'on ' if cl else 'off'} compile={'on ' if compiled else 'off'} "
                              f"torchvision {t_tv:8.1f} ms  ours {t_ours:8.1f} ms  ratio {ratio:.3f}", flush=True)
            del tv, ours
    finally:
        torch.set_num_threads(old_threads)
    columns = ["model", "pass", "channels_last", "compile", "torchvision ms", "ours ms", "ours / torchvision"]
    goals = [goal("model: median ours / torchvision (ms per batch)", median(ratios), 1.05, False),
             goal("model: worst ours / torchvision (ms per batch)", max(ratios), 1.05, False)]
    notes = [f"{device.type}, {threads} thread(s), batch {batch} at {size}x{size}, fp32, {clock_name}; ours loads "
             "torchvision's state_dict (strict), so both run the same weights; the two models alternate step by step, "
             f"in turn going first ({repeats} timed rounds after a warm-up); ms = median round, ratio = median of the "
             "rounds' ratios.",
             "fwd+bwd = forward, cross-entropy on 'out', backward (no optimizer step)."]
    if not args.compile:
        notes.append("torch.compile not timed here (compiling each model takes minutes on this CPU): "
                     "`segpipe bench model --compile` adds it; `segpipe bench gpu --compile` times it on a GPU.")
    settings = {"device": device.type, "threads": threads, "batch_size": batch, "size": size, "repeats": repeats,
                "models": names, "compile": args.compile, "clock": clock_name}
    return report("model", out, columns, rows, goals, settings, notes, extra={"results": results})
