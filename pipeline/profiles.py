"""Recipe profiles: profiles/<name>.yaml, a set of params overrides (dotted keys) plus, not params,
where the recipe comes from (`source`: name, config, version, url, the settings it `takes` as params,
what still `differs`; or `own` for segpipe's own recipes) and the published figures it aims at
(`anchors`). Read by `segpipe quickstart --profile` (the overrides it hands to DVC) and by the report
(the anchors beside the measured figures, with the source's remaining differences)."""

from __future__ import annotations

import json

import yaml

from pipeline.errors import UserError
from pipeline.storage import REPO

PROFILES = REPO / "profiles"
NOT_PARAMS = ("anchors", "source")  # a profile's entries that are not params overrides


def load_profile(name: str) -> dict:
    path = PROFILES / f"{name}.yaml"
    if not path.is_file():
        have = sorted(p.stem for p in PROFILES.glob("*.yaml"))
        raise UserError(f"no profile {name!r} in {PROFILES} (have {have}) (--profile)")
    return yaml.safe_load(path.read_text()) or {}


def profile_overrides(name: str) -> list[str]:
    """The profile's params overrides (dotted keys; a mapping value replaces the whole entry), plus
    `profile=<name>` so every run is tagged with it. `anchors` and `source` are not params."""
    raw = {k: v for k, v in load_profile(name).items() if k not in NOT_PARAMS}
    return [f"profile={name}"] + [f"{k}={override_value(v)}" for k, v in raw.items() if k != "profile"]


def profile_anchors(name: str) -> dict[str, dict]:
    """family -> the published figure the profile aims at (`anchors` of profiles/<name>.yaml): figure,
    mIoU (%), dataset (trained on), split (evaluated on), source. {} for no profile file or none."""
    try:
        anchors = load_profile(name).get("anchors") or {}
    except (UserError, yaml.YAMLError):
        return {}
    return {f: a for f, a in anchors.items() if isinstance(a, dict)}


def profile_source(name: str) -> dict:
    """The profile's `source` (what it follows and what still differs); {} for no profile file or none."""
    try:
        source = load_profile(name).get("source") or {}
    except (UserError, yaml.YAMLError):
        return {}
    return source if isinstance(source, dict) else {}


def override_value(v) -> str:
    """A value as `dvc exp run -S` (Hydra's override grammar) and our YAML -S parser both read it:
    `{a: 1, b: x}`, `[1, 2]`, `true`, `null`."""
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {override_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(override_value(x) for x in v) + "]"
    if isinstance(v, str):
        return v
    if isinstance(v, float) and "e" in repr(v) and "." not in repr(v):
        return repr(v).replace("e", ".0e")  # 1e-06 is a string to YAML 1.1; 1.0e-06 a float to YAML and Hydra
    return json.dumps(v)  # numbers, true/false, null
