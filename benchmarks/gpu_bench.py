#!/usr/bin/env python3
"""GPU training benchmark in pure PyTorch: img/s and peak memory of every family's training step at
the full recipe's crop (513) and batch (8) with AMP (bf16) + channels_last (+ torch.compile),
beside torchvision's own model of the same architecture in the same loop.

    python benchmarks/gpu_bench.py                    # eager, every family
    python benchmarks/gpu_bench.py --compile          # + torch.compile rows, while --budget-s lasts
    segpipe bench gpu [--compile]                     # the same through the CLI (also rewrites bench.md)

It needs a CUDA GPU and only torch and torchvision (pyarrow/pandas are not even imported): the
step is pipeline.engine.train_epoch, the one `segpipe train` runs (SGD + poly LR, cross-entropy with
ignore 255 + 0.5 x aux loss, autocast, a loss sync per step), the models come from seg_models;
neither imports Ray, MLflow, DVC or the params schema. The batch is random data already on the GPU,
so the figures are the model step's alone (the loader's are `segpipe bench loader`'s).

Writes <out>/gpu.json (default reports/bench) after every row, so a run cut short keeps what it
measured.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pipeline.training import engine  # noqa: E402  (imports torch only)
from pipeline.stages.bench import goal, machine_info, report, write_json  # noqa: E402  (stdlib only)
from seg_models import build_model  # noqa: E402  (torch + torchvision only)

# The families of params.yaml (the full recipe) without their backbone_weights (initial weights do not
# change the speed, and a bare GPU machine has not fetched them); tests/test_bench.py checks they agree.
RECIPE = {
    "fcn": ("fcn8s_vgg16", {"upsample": "transposed"}),
    "deeplabv3": ("deeplabv3_resnet50", {"atrous_rates": [6, 12, 18], "atrous_rates_at": 16, "output_stride": 8,
                                         "aux_loss": True}),  # (12, 24, 36) at OS 8
    "lraspp": ("lraspp_mobilenet_v3_large", {}),
    "unet": ("unet_resnet50", {"upsample": "bilinear"}),
}
# (family, our model, its options, torchvision's identical builder or None, its kwargs), in the order
# they run; torch.compile rows follow the same order while the budget lasts.
ROWS = [
    ("deeplabv3", *RECIPE["deeplabv3"], "deeplabv3_resnet50", {"aux_loss": True}),
    ("lraspp", *RECIPE["lraspp"], "lraspp_mobilenet_v3_large", {}),
    ("fcn", "fcn_resnet50", {"aux_loss": True}, "fcn_resnet50", {"aux_loss": True}),
    ("deeplabv3", "deeplabv3_mobilenet_v3_large", {"aux_loss": True}, "deeplabv3_mobilenet_v3_large", {"aux_loss": True}),
    ("fcn", *RECIPE["fcn"], None, None),
    ("unet", *RECIPE["unet"], None, None),
]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="reports/bench", help="gpu.json goes here (default reports/bench)")
    ap.add_argument("--batch-size", type=int, default=None, help="per step (default 8, the recipe's)")
    ap.add_argument("--crop", type=int, default=None, help="square crop (default 513, the recipe's)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per model (default 20)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; compile happens here)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds, ours and torchvision alternating (default 3)")
    ap.add_argument("--name", default="gpu", help="the result file: <out>/<name>.json (default gpu)")
    ap.add_argument("--amp", choices=("bf16", "fp16", "off"), default="bf16")
    ap.add_argument("--no-channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    ap.add_argument("--budget-s", type=float, default=420, help="no new compiled row starts after this many seconds")
    ap.add_argument("--models", help="comma-separated subset of our model names")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: only to check the script runs")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (2 x 64px, 2 steps): checks that it runs")
    ap.add_argument("--no-md", action="store_true", help="do not rewrite bench.md beside --out")
    args = ap.parse_args(argv)
    args.batch_size = args.batch_size or (2 if args.quick else 8)
    args.crop = args.crop or (64 if args.quick else 513)
    args.steps = args.steps or (2 if args.quick else 20)
    args.warmup = args.warmup or (1 if args.quick else 5)
    args.rounds = 1 if args.quick else max(1, args.rounds)
    return args


def _tv_model(name: str, kwargs: dict):
    from torchvision.models import segmentation as tvs

    return getattr(tvs, name)(weights=None, weights_backbone=None, num_classes=21, **kwargs)


class Runner:
    """One model's training step (pipeline.engine.train_epoch) on a fixed random batch on the device."""

    def __init__(self, model: torch.nn.Module, args, device: torch.device, compiled: bool):
        self.args, self.device = args, device
        amp = None if args.amp == "off" else (torch.bfloat16 if args.amp == "bf16" else torch.float16)
        cl = not args.no_channels_last
        self.base = torch.cuda.memory_allocated() if device.type == "cuda" else 0  # what others hold
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        model = model.to(device)
        if cl:
            model = model.to(memory_format=torch.channels_last)
        self.params = sum(p.numel() for p in model.parameters())
        self.model = torch.compile(model) if compiled else model
        self.opts = engine.StepOptions(device=device, amp_dtype=amp, aux_weight=0.5, channels_last=cl)
        self.optimizer = engine.make_optimizer(model, 0.01, 0.9, 1e-4)
        self.scheduler = engine.poly_schedule(self.optimizer, 10**6)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
        gen = torch.Generator(device=device).manual_seed(0)
        self.x = torch.randn(args.batch_size, 3, args.crop, args.crop, device=device, generator=gen)
        if cl:
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.y = torch.randint(0, 21, (args.batch_size, args.crop, args.crop), device=device, generator=gen)
        self.y[:, : args.crop // 16] = 255  # some void, as real masks have

    def steps(self, n: int) -> dict:
        return engine.train_epoch(self.model, [(self.x, self.y)] * n, self.optimizer, self.scheduler, self.scaler,
                                  self.opts, 1)

    def warm_up(self) -> dict:
        """The untimed steps (torch.compile compiles here, cuDNN picks its algorithms); the peak memory
        of this model alone = the peak since it was built minus what other models held before."""
        t0 = time.perf_counter()
        stats = self.steps(self.args.warmup)
        warmup_s = time.perf_counter() - t0
        peak = (torch.cuda.max_memory_allocated() - self.base) / 2**30 if self.device.type == "cuda" else float("nan")
        return {"warmup_s": round(warmup_s, 1), "peak_mem_gib": round(peak, 2), "params_m": round(self.params / 1e6, 2),
                "loss": round(stats["loss"], 4)}


def _free(device):
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU here (gpu_bench needs one; --device cpu --quick only checks that it runs)")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rows_spec = ROWS
    if args.models:
        want = args.models.split(",")
        rows_spec = [r for r in ROWS if r[1] in want]
        if not rows_spec:
            sys.exit(f"error: --models names none of {', '.join(r[1] for r in ROWS)}")
    started = time.perf_counter()
    results, notes = [], []
    settings = {"batch_size": args.batch_size, "crop": args.crop, "steps": args.steps, "warmup": args.warmup,
                "amp": args.amp, "channels_last": not args.no_channels_last, "compile": args.compile,
                "device": str(device)}
    print(f"{machine_info().get('gpu', device)}: batch {args.batch_size} x {args.crop}x{args.crop}, amp {args.amp}, "
          f"channels_last {'off' if args.no_channels_last else 'on'}, {args.warmup} warm-up + {args.steps} timed steps",
          flush=True)
    plan = [(spec, False) for spec in rows_spec] + ([(spec, True) for spec in rows_spec] if args.compile else [])
    for (family, name, opts, tv_name, tv_kwargs), compiled in plan:
        if compiled and time.perf_counter() - started > args.budget_s:
            notes.append(f"torch.compile of {name} not timed: the {args.budget_s:.0f}s budget was spent")
            print(f"skip compiled {name}: budget spent", flush=True)
            continue
        runners, recs = {}, {}
        for impl in ("ours", "torchvision") if tv_name else ("ours",):
            recs[impl] = {"family": family, "model": name, "impl": impl, "compile": compiled,
                          "options": opts if impl == "ours" else tv_kwargs}
            try:
                torch.manual_seed(0)
                model = build_model(name, num_classes=21, **opts) if impl == "ours" else _tv_model(tv_name, tv_kwargs)
                runners[impl] = Runner(model, args, device, compiled)
                recs[impl].update(runners[impl].warm_up())
            except Exception as exc:  # one model failing (e.g. out of memory) does not stop the others
                recs[impl]["error"] = f"{exc.__class__.__name__}: {str(exc)[:300]}"
                runners.pop(impl, None)
                traceback.print_exc()
            model = None
        # timed rounds, the two models alternating: both see the same clocks and host load
        rates: dict[str, list[float]] = {impl: [] for impl in runners}
        for _ in range(args.rounds):
            for impl, r in runners.items():
                try:
                    rates[impl].append(r.steps(args.steps)["img_per_s"])
                except Exception as exc:
                    recs[impl]["error"] = f"{exc.__class__.__name__}: {str(exc)[:300]}"
        for impl, rec in recs.items():
            if rates.get(impl) and "error" not in rec:
                rec["img_per_s_rounds"] = [round(v, 2) for v in rates[impl]]
                rec["img_per_s"] = round(statistics.median(rates[impl]), 2)
                rec["ms_per_step"] = round(1000 * args.batch_size / rec["img_per_s"], 2)
            if impl == "ours" and "torchvision" in rates and rates["torchvision"] and rates.get("ours"):
                rec["ours_over_tv_ms"] = round(statistics.median(
                    [t / o for o, t in zip(rates["ours"], rates["torchvision"])]), 3)  # time ratio = inverse rate ratio
            results.append(rec)
            print(f"  {name:<30} {impl:<11} compile={'on ' if compiled else 'off'} "
                  + (f"{rec['img_per_s']:8.1f} img/s  {rec['ms_per_step']:8.1f} ms/step  {rec['peak_mem_gib']:6.2f} GiB peak"
                     f"  warm-up {rec['warmup_s']:.1f}s" if "error" not in rec else rec["error"]), flush=True)
        runners = None
        _free(device)
        write_json(out / f"{args.name}.json", {"benchmark": args.name, "partial": True, "machine": machine_info(),
                                               "settings": settings, "results": results})
    columns = ["family", "model", "compile", "ours img/s", "torchvision img/s", "ours / tv (ms)", "ours peak GiB",
               "tv peak GiB", "warm-up s"]
    rows, ratios = [], []
    by = {(r["model"], r["impl"], r["compile"]): r for r in results}
    for (family, name, _, tv_name, _), compiled in plan:
        o, t = by.get((name, "ours", compiled)), by.get((name, "torchvision", compiled))
        if o is None:
            continue
        ratio = o.get("ours_over_tv_ms")
        if ratio is not None:
            ratios.append(ratio)
        rows.append([family, name, "on" if compiled else "off", o.get("img_per_s", o.get("error", "-")[:40]),
                     t.get("img_per_s", t.get("error", "-")[:40]) if t else "-", round(ratio, 3) if ratio else "-",
                     o.get("peak_mem_gib", "-"), t.get("peak_mem_gib", "-") if t else "-", o.get("warmup_s", "-")])
    goals = [goal("gpu: worst ours / torchvision (ms per training step)", max(ratios), 1.05, False)] if ratios else []
    notes.insert(0, f"pipeline.engine.train_epoch (SGD, poly LR, CE + 0.5 aux, autocast {args.amp}, "
                    f"channels_last {'off' if args.no_channels_last else 'on'}), batch {args.batch_size} at "
                    f"{args.crop}x{args.crop}, random data on the GPU; {args.warmup} warm-up steps, then {args.rounds} "
                    f"rounds of {args.steps} timed steps with ours and torchvision's model alternating; img/s is the "
                    "median round, ours / tv the median of the rounds' ratios. Peak memory = "
                    "torch.cuda.max_memory_allocated of that model alone (since it was built, minus what the other "
                    "held). The warm-up column includes cuDNN autotuning and torch.compile's compilation.")
    notes.append("The recipe's models: " + ", ".join(f"{f} = {m} {o}" for f, (m, o) in RECIPE.items())
                 + "; fcn_resnet50 and deeplabv3_mobilenet_v3_large are the torchvision-identical siblings.")
    return report(args.name, out, columns, rows, goals, settings, notes, extra={"results": results},
                  command="python benchmarks/gpu_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  md=not args.no_md)


if __name__ == "__main__":
    main()
