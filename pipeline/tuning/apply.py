"""`segpipe tune --apply`: merge the best config of each family's last tune (<reports_dir>/tune/<family>/
best_config.json) into a params file, comments kept (ruamel round trip), nothing run.

Only the searched entries change: a searched model option in families.<f>.options (an option that
does not apply to the best trial, e.g. atrous_rates for aspp=cascade, is removed), a searched
optimiser setting in families.<f>.train (never the shared train block), a searched model / variant in
families.<f>.model. Everything else (backbone_weights included) is kept. A tune of another model than
the file's families.<f>.model is refused: its values are for that model. The file is replaced only
by one that loads (pipeline.config.load_params).
"""

from __future__ import annotations

import json
from pathlib import Path

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from pipeline import storage
from pipeline.config import Params, load_params
from pipeline.errors import UserError
from pipeline.tuning.results import out_dir
from pipeline.display import show
from pipeline.tuning.space import TRAIN_KEYS
from seg_models import list_models, model_info


def apply_best(params_path: str, p: Params, families: list[str]) -> tuple[list[str], list[str]]:
    """Merge the adopted configs into the params file at params_path; returns (the changes made, the
    tunes' notes: which axes kept their configured value because nothing beat it beyond the seed spread)."""
    bests = {}
    for fam in families:
        path = out_dir(p, fam) / "best_config.json"
        if not path.is_file():
            raise UserError(f"no tune result for {fam}: {path} is missing; run `segpipe tune --family {fam}` first (--apply)")
        bests[fam] = json.loads(path.read_text())
    yml = YAML()
    yml.preserve_quotes = True
    yml.width = 120
    src = Path(params_path)
    doc = yml.load(src.read_text())
    changes = []
    for fam, best in bests.items():
        entry = (doc.get("families") or {}).get(fam)
        if entry is None:
            raise UserError(f"{params_path} has no families.{fam} to apply the {fam} tune to (--apply)")
        changes += _merge_family(entry, fam, best, params_path)
    _write_valid(yml, doc, src)
    return changes, [f"{fam}: {n}" for fam, best in bests.items() for n in best.get("notes", [])]


def _flow(v):
    """Lists and mappings written inline, as params.yaml writes them."""
    if isinstance(v, list):
        s = CommentedSeq(_flow(x) for x in v)
        s.fa.set_flow_style()
        return s
    if isinstance(v, dict):
        m = CommentedMap((k, _flow(x)) for k, x in v.items())
        m.fa.set_flow_style()
        return m
    return v


def _plain(v):
    return json.loads(json.dumps(v))


def _merge_family(entry, fam: str, best: dict, params_path: str) -> list[str]:
    """Apply one family's best config to its families.<fam> entry (in place); returns the changes."""
    changes = []
    values = best.get("values", {})
    searched_model = "model" in values or "variant" in values
    if not searched_model and entry.get("model") != best["model"]:
        raise UserError(f"the {fam} tune trained {best['model']} but {params_path} has families.{fam}.model "
                        f"{entry.get('model')}: its values are for another model; tune the model you train (--apply)")
    if searched_model and entry.get("model") != best["model"]:
        changes.append(f"families.{fam}.model: {entry.get('model')} -> {best['model']}")
        entry["model"] = best["model"]
    options = entry.get("options")
    if options is None:
        options = entry["options"] = _flow({})
    if searched_model and best["model"] in list_models():
        known = model_info(best["model"])["options"]
        for k in [k for k in options if k not in known]:
            changes.append(f"families.{fam}.options.{k}: {_plain(options[k])} removed ({best['model']} has no such option)")
            del options[k]
    train = entry.get("train")
    for name, v in values.items():
        if name in ("model", "variant"):
            continue
        if name in TRAIN_KEYS:
            if train is None:
                train = entry["train"] = _flow({})
            if train.get(name) != v:
                changes.append(f"families.{fam}.train.{name}: {train.get(name)} -> {show(v)}")
                train[name] = v
        elif v is None:  # does not apply to the best trial (atrous_rates of a cascade DeepLabV3)
            if name in options:
                changes.append(f"families.{fam}.options.{name}: {_plain(options[name])} removed (n/a)")
                del options[name]
        elif _plain(options.get(name)) != _plain(v):
            changes.append(f"families.{fam}.options.{name}: {_plain(options.get(name))} -> {_plain(v)}")
            options[name] = _flow(v)
    return changes


def _write_valid(yml: YAML, doc, src: Path) -> None:
    """Replace src by doc, atomically, only when the result loads: never leave an invalid params file."""
    with storage.atomic_path(src) as tmp:
        with open(tmp, "w") as f:
            yml.dump(doc, f)
        load_params(tmp)  # raises on an invalid result: src is left as it was
