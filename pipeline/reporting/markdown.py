"""comparison.md, rendered from the comparison dict (comparison.json) ALONE: `render(json.load(f))`
gives the same text as the report wrote. Each section is one function of the dict; display names
come from seg_models' FAMILIES."""

from __future__ import annotations

from seg_models.registry import FAMILIES

from pipeline.data.voc import VOC_CLASSES
from pipeline.tuning.ablation import markdown as markdown_tables


def _f(v, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _pm(stat: dict, digits: int = 3) -> str:
    if stat["mean"] is None:
        return "–"
    if stat["std"] is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _duration(s: float | None) -> str:
    if s is None:
        return "–"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _opts(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"


def _display(family: str) -> str:
    return FAMILIES[family].display if family in FAMILIES else family


def _best(f: dict) -> dict:
    """The family's best run (comparison.json names it by run id)."""
    return next(r for r in f["runs"] if r["run_id"] == f["best_run_id"])


def _header(s: dict) -> list[str]:
    fams = s["families"]
    L = [f"# Semantic segmentation on PASCAL VOC: {' vs '.join(_display(f['family']) for f in fams)}", ""]
    L += [f"Generated {s['generated_at']} by `segpipe report` from the MLflow experiment `{s['experiment']}` "
          f"(`{s['tracking_uri']}`): {sum(len(f['runs']) for f in fams)} train runs, seeds "
          f"{', '.join(map(str, s['seeds']))}. Data: `{s['data']['source']}`, {s['data']['counts']}.", ""]
    if s["missing_runs"]:
        L += [f"**Not trained yet** (no finished run in MLflow): {', '.join(s['missing_runs'])}.", ""]
    return L


def _results_row(f: dict, best_miou, several: bool, s: dict) -> str:
    anchors, tuned = s.get("anchors", {}), s.get("tuned_families", {})
    fam = f["family"]
    miou = _pm(f["mIoU"])
    if best_miou is not None and f["mIoU"]["mean"] == best_miou and several:
        miou = f"**{miou}**"
    commits = sorted({(r.get("git_commit") or "unknown")[:8] for r in f["runs"]})
    return "| " + " | ".join([
        fam + (" †" if fam in tuned else ""), f"`{f['model']}`", _opts(f["options"]), miou,
        (f"{anchors[fam]['miou']} ({anchors[fam]['profile']})" if fam in anchors else "–"),
        _pm(f["pixel_acc"]), _pm(f["mean_acc"]),
        _f(f.get("params_M"), 2), _f(f.get("gflops"), 2), _f(f.get("latency_ms"), 1),
        _duration(f["train_seconds"]["mean"]), _f(f["img_per_s"]["mean"], 1),
        ", ".join(map(str, f["seeds"])), " ".join(f"`{r['run_id'][:8]}`" for r in f["runs"]), ", ".join(commits)]) + " |"


def _anchor_lines(s: dict) -> list[str]:
    source = s["data"]["source"]
    L = []
    for fam, a in s.get("anchors", {}).items():
        L += [f"- Anchor of {fam} (profile `{a['profile']}`): {a.get('figure', '')} — {a.get('source', '')}."
              + (f" Differs from this run: trained on {a['dataset']} (here `{source}`)"
                 if a.get("dataset") and a["dataset"] != source else " Same training data")
              + (", same evaluation split (VOC2012 val)." if a.get("split") == "VOC2012 val"
                 and source in ("voc2012", "voc2012_aug")
                 else f", evaluated on {a.get('split', '?')} (here the `val` split of `{source}`).")
              + " The anchor is in %, the table's mIoU a fraction."]
        if a.get("differs"):
            L += [f"  Settings that still differ from {a.get('recipe') or 'its source'}: " + "; ".join(a["differs"]) + "."]
    return L + ([""] if L else [])


def _results(s: dict) -> list[str]:
    fams, lat = s["families"], s["latency"]
    size = lat["size"]
    best_miou = max((f["mIoU"]["mean"] for f in fams if f["mIoU"]["mean"] is not None), default=None)
    L = ["## Results", ""]
    L += [f"| family | model | key options | val mIoU | published anchor | pixel acc | mean acc | params (M) | GFLOPs @{size}² | "
          "latency (ms/img) | train time | img/s | seeds | MLflow run(s) | git commit |",
          "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
    L += [_results_row(f, best_miou, len(fams) > 1, s) for f in fams]
    notes = [f"{f['family']}: {f['note']}" for f in fams if f.get("note")]
    if notes:
        L += ["", "Not measured — " + "; ".join(notes) + "."]
    L += ["", f"val metrics: mean ± sample standard deviation over the seeds (a single seed shows no ±); bold = best "
          f"mean. Params and GFLOPs are counted on the logged model at the eval size (batch 1; a multiply-add counts "
          f"as 2 FLOPs, torch `FlopCounterMode`). Latency: median of {lat['repeats']} timed forward passes "
          f"after {lat['warmup']} warm-up ones, batch 1, {size}×{size}, fp32, measured by the report on "
          f"**{lat['device']}**. Train time: wall clock of the MLflow run (Ray start-up, evaluation and "
          "logging included), mean over seeds. img/s: training images per second summed over the Ray workers, mean "
          "over epochs and seeds. Full run ids are in the [runs table](#runs) and comparison.json.", ""]
    L += _anchor_lines(s)
    eval_splits = sorted({r.get("eval_split", "val") for f in fams for r in f["runs"]})
    L += [f"Split: every number above is measured on the `{'`, `'.join(eval_splits)}` split (the train runs' "
          "`eval_split` tag); models train on the whole `train` split."
          + "".join(f" † {fam}: tuned by `segpipe tune`, trials selected on the `{split}` split"
                    + (" (the published split: this number is optimistically biased; set data.tune_split)."
                       if split in eval_splits else f", not on `{'`, `'.join(eval_splits)}`.")
                    for fam, split in s.get("tuned_families", {}).items()), ""]
    return L


def _spread(s: dict) -> list[str]:
    comps, figs = s["comparisons"], s["figures"]
    L = []
    if comps:
        L += ["### Are the differences larger than the seed spread?", ""]
        if all(c["spread"] is None for c in comps):
            L += ["Only one seed per family: the spread over seeds is unknown, so no difference below can be called "
                  "real. Train more seeds (`seeds` in params.yaml) to tell.", ""]
        L += ["| comparison | Δ val mIoU | seed spread (std₁ + std₂) | verdict |", "|---|---:|---:|---|"]
        L += [f"| {c['better']} > {c['worse']} | {c['delta_mIoU']:.3f} | {_f(c['spread'])} | {c['verdict']} |"
              for c in comps]
        inside = [c for c in comps if c["verdict"] == "inside the seed spread"]
        larger = [c for c in comps if c["verdict"] == "larger than the seed spread"]
        n = min(len(f["runs"]) for f in s["families"])
        if inside and not larger:
            L += ["", f"Every difference is inside the spread of the seeds: with {n} seeds per family, no family is "
                  "shown to be better than another."]
        elif inside:
            L += ["", "Larger than the seed spread: " + "; ".join(f"{c['better']} over {c['worse']}" for c in larger)
                  + ". Inside it (not a real difference at this number of seeds): "
                  + "; ".join(f"{c['better']} vs {c['worse']}" for c in inside) + "."]
        elif larger:
            L += ["", "Every difference is larger than the spread of the seeds."]
        L.append("")
    for key, alt in (("miou_vs_params", "val mIoU vs parameters"), ("miou_vs_latency", "val mIoU vs latency")):
        if key in figs:
            L.append(f"![{alt}]({figs[key]})")
    return L + [""]


def _per_class(s: dict) -> list[str]:
    fams, figs = s["families"], s["figures"]
    L = ["## Per-class IoU", "", "val IoU per VOC class, mean over seeds; **bold** = best family for the class; "
         "– = no pixel of the class in the val ground truth nor in that family's predictions (IoU undefined).", ""]
    L += ["| class | " + " | ".join(f["family"] for f in fams) + " |", "|---|" + "---:|" * len(fams)]
    for cls in VOC_CLASSES:
        vals = [f["per_class_iou"].get(cls) for f in fams]
        top = max((v for v in vals if v is not None), default=None)
        mark = top is not None and top > 0 and len(fams) > 1
        L.append(f"| {cls} | " + " | ".join(("**" + _f(v) + "**") if (mark and v == top) else _f(v) for v in vals) + " |")
    L.append("| **mIoU** | " + " | ".join(_pm(f["mIoU"]) for f in fams) + " |")
    L.append("")
    if "per_class_iou" in figs:
        L += [f"![val IoU per class]({figs['per_class_iou']})", ""]
    return L


def _pictures(s: dict) -> list[str]:
    fams, figs = s["families"], s["figures"]
    L = []
    if "miou_per_epoch" in figs:
        L += ["## Training curves", "", f"![val mIoU per epoch]({figs['miou_per_epoch']})", ""]
    conf = [(f["family"], figs[f"confusion_{f['family']}"]) for f in fams if f"confusion_{f['family']}" in figs]
    if conf:
        L += ["## Confusion matrices", "", "Row-normalised (each row: where the pixels of that true class went), "
              "summed over seeds.", ""]
        L += [f"![{fam} confusion matrix]({path})" for fam, path in conf] + [""]
    L += ["## Qualitative comparison", ""]
    if "qualitative" in figs:
        L += ["The same val images for every family (each family's best seed): image | ground truth | predictions, "
              "in the VOC palette.", "", f"![qualitative comparison]({figs['qualitative']})", ""]
    else:
        L += [f"No grid: no val shards under `{s['data']['dir']}` (run `segpipe preprocess`) or "
              "report.sample_images = 0.", ""]
    return L


def _tune(s: dict) -> list[str]:
    trials = s["tune_trials"]
    if not trials:
        return []
    L = ["## Hyper-parameter search (Ray Tune)", ""]
    L += ["| family | trials | selected on | best trial mIoU | best config | run |", "|---|---:|---|---:|---|---|"]
    for fam in dict.fromkeys(t["label"] for t in trials):
        ts = [t for t in trials if t["label"] == fam]
        b = max(ts, key=lambda t: t["mIoU"])
        cfg = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in b["config"].items()) or "–"
        L.append(f"| {fam} | {len(ts)} | `{b['eval_split']}` | {b['mIoU']:.3f} | {cfg} | `{b['run_id'][:8]}` |")
    L.append("")
    if "tune" in s["figures"]:
        L += [f"![tune trials]({s['figures']['tune']})", ""]
    ablations = s.get("tune_ablations") or {}
    if ablations:
        L += ["### Ablations (architecture phase)", "",
              "Each searched axis is varied alone around the family's configured point, at the optimiser settings "
              "the optimiser phase chose; each value's val mIoU on the selection split is the mean ± std over the "
              "tune's seeds. A value is adopted only when it beats the configured one by more than the seed spread "
              "(std + std).", ""]
        for fam, result in ablations.items():
            L += markdown_tables(fam, result) if "axes" in result else [f"{fam}: the tables did not fit the run tag; "
                                                                       "see the tune run's ablation.md", ""]
    return L


def _registry(s: dict) -> list[str]:
    reg = [f for f in s["families"] if f.get("registered")]
    if not reg:
        return []
    L = ["## Model Registry", "", "Each family's best run (highest val mIoU over seeds) is registered in the "
         "MLflow Model Registry with the alias `best`. The seed is chosen on val, the split its mIoU is measured "
         "on, so that figure is optimistic (the best of several draws); compare families by the Results "
         "table's mean ± std over seeds.", ""]
    L += ["| family | registered model | version | val mIoU | seed | run |", "|---|---|---:|---:|---:|---|"]
    for f in reg:
        best = _best(f)
        L.append(f"| {f['family']} | `models:/{f['registered']['name']}@best` | {f['registered']['version']} | "
                 f"{_f(best['mIoU'])} | {best['seed']} | `{best['run_id']}` |")
    L += ["", f"Predict with one: `segpipe predict --model models:/{reg[0]['registered']['name']}@best IMAGE... "
          "--out predictions/`.", ""]
    return L


def _provenance(s: dict) -> list[str]:
    fams = s["families"]
    L = ["## How this was produced", ""]
    L += [f"- **Data**: `data.source={s['data']['source']}`, {s['data']['counts']}; images padded to "
          f"{s['latency']['size']}×{s['latency']['size']} for evaluation (void pixels ignored)."]
    L += [f"- **Seeds**: {', '.join(map(str, s['seeds']))} (`seeds` in params.yaml; DVC's train matrix runs every "
          "family × seed). Runs per family: " + ", ".join(f"{f['family']} {len(f['runs'])}" for f in fams) + "."]
    L += ["- **Runs**: for each family and seed, the latest FINISHED MLflow run tagged `stage=train` with the "
          "family's configured model and the current data source; the seeds averaged for a family share every "
          "training setting but the seed (model options, global batch, schedule, data split, profile)."
          + (" Left out (never averaged):" if s["left_out_runs"] else "")]
    L += [f"  - {why}" for why in s["left_out_runs"]]
    commits = sorted({r.get("git_commit") or "unknown" for f in fams for r in f["runs"]})
    L += [f"- **Code**: git commit{'s' * (len(commits) > 1)} {', '.join(f'`{c}`' for c in commits)}."]
    L += ["- **Shared settings**: " + ", ".join(f"`{k}={v}`" for k, v in s["shared_params"].items()) + "."]
    L.append("")
    if s["differing_params"]:
        L += ["Params that differ between families (from each run's MLflow params):", ""]
        L += ["| param | " + " | ".join(f["family"] for f in fams) + " |", "|---|" + "---|" * len(fams)]
        for k, per in s["differing_params"].items():
            L.append(f"| `{k}` | " + " | ".join(per.get(f["family"], "–") for f in fams) + " |")
        L.append("")
    L += ['<a id="runs"></a>', "", "| family | seed | MLflow run | val mIoU | epochs | train time |",
          "|---|---:|---|---:|---:|---:|"]
    L += [f"| {f['family']} | {r['seed']} | `{r['run_id']}` | {_f(r['mIoU'])} | {r['epochs']} | "
          f"{_duration(r['train_seconds'])} |" for f in fams for r in f["runs"]]
    L += ["", "Browse them with `segpipe ui` (http://127.0.0.1:5000), rebuild this file with `segpipe report` "
          "(or `dvc repro report`).", ""]
    return L


def render(s: dict) -> str:
    """comparison.md from the comparison dict (what comparison.json holds)."""
    return "\n".join(_header(s) + _results(s) + _spread(s) + _per_class(s) + _pictures(s) + _tune(s)
                     + _registry(s) + _provenance(s))
