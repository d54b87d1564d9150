#!/usr/bin/env python3
"""GPU training benchmark in pure PyTorch: img/s and peak memory of every family's training step at
the full recipe's crop (513) and batch (8) with AMP (bf16) + channels_last (+ torch.compile),
beside torchvision's own model of the same architecture in the same loop.

    python benchmarks/gpu_bench.py                    # eager, every family
    python benchmarks/gpu_bench.py --compile          # + torch.compile rows, while --budget-s lasts
    segpipe bench gpu [--compile]                     # the same through the CLI (also rewrites bench.md)

It needs a CUDA GPU and only torch, torchvision and pyyaml (pyarrow/pandas are not even imported):
the families, batch, crop and step settings are params.yaml's (read as YAML, not through the params
schema), the set-up is pipeline.training.setup.build and the step pipeline.training.engine.train_epoch,
the ones `segpipe train` runs (SGD + poly LR, cross-entropy with ignore 255 + aux loss, autocast, a
loss sync per step), the models and their torchvision twins come from seg_models' registry; none of
it imports Ray, MLflow or DVC. The batch is random data already on the GPU,
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
if sys.path and Path(sys.path[0]).resolve() == ROOT / "benchmarks":
    sys.path.pop(0)  # run as a script: benchmarks/ itself must not shadow top-level modules (common, data, ...)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

from benchmarks.common import goal, machine_info, report, write_json  # noqa: E402  (stdlib + pipeline.system)
from pipeline.training import engine  # noqa: E402  (torch only)
from pipeline.training.setup import build  # noqa: E402  (torch + seg_models only)
from pipeline.training.spec import WorkerSpec  # noqa: E402  (stdlib only)
from seg_models import FAMILIES, build_model, model_info  # noqa: E402  (torch + torchvision only)

PARAMS = ROOT / "params.yaml"


def recipe(params_path: Path = PARAMS) -> tuple[dict, dict]:
    """(families, train) of params.yaml (the full recipe): family -> (model, options) without
    backbone_weights (initial weights do not change the speed, and a bare GPU machine has not
    fetched them), and the train block (lr, momentum, batch_size, crop_size, ...)."""
    p = yaml.safe_load(Path(params_path).read_text())
    families = {f: (v["model"], {k: o for k, o in (v.get("options") or {}).items() if k != "backbone_weights"})
                for f, v in p["families"].items()}
    return families, p["train"]


def plan_rows(families: dict) -> list[tuple]:
    """(family, our model, its options, torchvision's identical builder or None, its kwargs), in the
    order they run: the recipe's models torchvision has too, then the torchvision-identical siblings
    of each family (seg_models' registry), then the recipe's models without a torchvision twin."""
    aux = lambda m: {"aux_loss": True} if "aux_loss" in model_info(m)["options"] else {}
    paired, siblings, alone = [], [], []
    for fam, (model, opts) in families.items():
        twins = FAMILIES[fam].torchvision_identical
        if model in twins:
            paired.append((fam, model, opts, model, {"aux_loss": True} if opts.get("aux_loss") else {}))
        else:
            alone.append((fam, model, opts, None, None))
        siblings += [(fam, m, aux(m), m, aux(m)) for m in twins if m != model]
    return paired + siblings + alone


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="reports/bench", help="gpu.json goes here (default reports/bench)")
    ap.add_argument("--batch-size", type=int, default=None, help="per step (default params.yaml's train.batch_size)")
    ap.add_argument("--crop", type=int, default=None, help="square crop (default params.yaml's train.crop_size)")
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
    _, train = recipe()
    args.batch_size = args.batch_size or (2 if args.quick else train["batch_size"])
    args.crop = args.crop or (64 if args.quick else train["crop_size"])
    args.steps = args.steps or (2 if args.quick else 20)
    args.warmup = args.warmup or (1 if args.quick else 5)
    args.rounds = 1 if args.quick else max(1, args.rounds)
    return args


def _tv_model(name: str, kwargs: dict):
    from torchvision.models import segmentation as tvs

    return getattr(tvs, name)(weights=None, weights_backbone=None, num_classes=21, **kwargs)


class Runner:
    """One model's training step (pipeline.training.engine.train_epoch) on a fixed random batch on the device."""

    def __init__(self, model: torch.nn.Module, args, device: torch.device, compiled: bool):
        self.args, self.device = args, device
        cl = not args.no_channels_last
        self.base = torch.cuda.memory_allocated() if device.type == "cuda" else 0  # what others hold
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.params = sum(p.numel() for p in model.parameters())
        _, train = recipe()
        spec = WorkerSpec.from_mapping(
            {**train, "amp": args.amp, "channels_last": cl, "bn_momentum": None, "epochs": 1, "warmup_epochs": 0},
            model="", options={}, seed=0, data_dir="", train_split="train", val_split="val", threads=1)
        # the set-up `segpipe train` builds (optimizer groups, poly LR, scaler, AMP, channels_last)
        self.setup = build(spec, device, 10**6, model=model, wrap=torch.compile if compiled else None)
        gen = torch.Generator(device=device).manual_seed(0)
        self.x = torch.randn(args.batch_size, 3, args.crop, args.crop, device=device, generator=gen)
        if cl:
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.y = torch.randint(0, 21, (args.batch_size, args.crop, args.crop), device=device, generator=gen)
        self.y[:, : args.crop // 16] = 255  # some void, as real masks have

    def steps(self, n: int) -> dict:
        s = self.setup
        return engine.train_epoch(s.model, [(self.x, self.y)] * n, s.optimizer, s.scheduler, s.scaler, s.opts, 1)

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
    families, _ = recipe()
    rows_spec = all_rows = plan_rows(families)
    if args.models:
        want = args.models.split(",")
        rows_spec = [r for r in all_rows if r[1] in want]
        if not rows_spec:
            sys.exit(f"error: --models names none of {', '.join(r[1] for r in all_rows)}")
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
    notes.insert(0, f"pipeline.training.engine.train_epoch (SGD, poly LR, CE + 0.5 aux, autocast {args.amp}, "
                    f"channels_last {'off' if args.no_channels_last else 'on'}), batch {args.batch_size} at "
                    f"{args.crop}x{args.crop}, random data on the GPU; {args.warmup} warm-up steps, then {args.rounds} "
                    f"rounds of {args.steps} timed steps with ours and torchvision's model alternating; img/s is the "
                    "median round, ours / tv the median of the rounds' ratios. Peak memory = "
                    "torch.cuda.max_memory_allocated of that model alone (since it was built, minus what the other "
                    "held). The warm-up column includes cuDNN autotuning and torch.compile's compilation.")
    notes.append("The recipe's models (params.yaml families): " + ", ".join(f"{f} = {m} {o}" for f, (m, o) in families.items())
                 + "; " + ", ".join(r[1] for r in all_rows if r[1] not in {m for m, _ in families.values()})
                 + " are the torchvision-identical siblings (seg_models registry).")
    return report(args.name, out, columns, rows, goals, settings, notes, extra={"results": results},
                  command="python benchmarks/gpu_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  md=not args.no_md)


if __name__ == "__main__":
    main()
