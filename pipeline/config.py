"""params.yaml: the schema every stage loads its knobs through.

``load_params(path, overrides)`` reads the YAML file, applies ``-S dotted.key=value`` overrides
(same syntax as ``dvc exp run -S``: the value is parsed as YAML), and validates the result against
:class:`Params`. Any problem raises :class:`ParamsError` whose message names the offending key, so
the CLI can print one ``error: ...`` line and exit 2.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import UserError

KNOWN_SOURCES = ("sample", "synthetic", "voc2012", "voc2012_aug")


class ParamsError(UserError):
    """Bad params: unknown key, wrong type or bad value."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticParams(_Strict):
    train_count: int = Field(160, ge=1, description="number of generated train scenes")
    val_count: int = Field(40, ge=1, description="number of generated val scenes")
    size: int = Field(96, ge=32, le=2048, description="side of the square generated images")
    seed: int = Field(0, ge=0, description="generation seed (same seed, same bytes)")
    max_objects: int = Field(3, ge=1, le=10, description="objects per scene")
    classes: list[int] = Field(
        default_factory=lambda: [1, 7, 12, 15],
        description="VOC class ids the scenes draw from",
    )

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("needs at least one class")
        bad = [c for c in v if not 1 <= c <= 20]
        if bad:
            raise ValueError(f"class ids must be in 1..20, got {bad}")
        return v


class DataParams(_Strict):
    source: str = Field("voc2012_aug", description="sample | synthetic | voc2012 | voc2012_aug | a VOC tar | a dir with VOCdevkit/")
    dir: str = Field("data", description="working data directory: raw/ and shards/ live under it")
    voc_url: str = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"
    voc_md5: str = "6cd6e144f989b92b3379bac3b3de84fd"
    sbd_url: str = "http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz"
    sbd_md5: str = "82b4d87ceb2ed10f6038a1cba92111cb"
    download_timeout_s: float = Field(20.0, gt=0)
    synthetic: SyntheticParams = Field(default_factory=SyntheticParams)
    row_group_rows: int = Field(100, ge=1, le=100, description="rows per Parquet row group (<= 100)")
    shard_max_mb: float = Field(256.0, gt=0, description="a shard is closed once it reaches this size")
    workers: int = Field(0, ge=0, description="preprocess processes; 0 = all cores")

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if v in KNOWN_SOURCES:
            return v
        p = Path(v).expanduser()
        if p.is_file() and (p.name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz"))):
            return v
        if p.is_dir() and ((p / "VOCdevkit").is_dir() or (p / "VOC2012").is_dir() or p.name == "VOCdevkit"):
            return v
        if p.exists():
            raise ValueError(f"{v!r} is neither a VOC tar (.tar/.tgz/...) nor a directory holding VOCdevkit/")
        raise ValueError(
            f"unknown source {v!r}: use one of {', '.join(KNOWN_SOURCES)}, a path to a VOC tar, "
            "or a directory holding VOCdevkit/ (file not found)"
        )


class TrainParams(_Strict):
    model: str = Field("deeplabv3_resnet50", description="registry name (see `segpipe models`)")
    model_options: dict[str, Any] = Field(default_factory=dict)
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(8, ge=1, description="per worker")
    crop_size: int = Field(513, ge=16)
    eval_size: int = Field(513, ge=16, description="val images are padded/resized to this square size")
    scale_min: float = Field(0.5, gt=0)
    scale_max: float = Field(2.0, gt=0)
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_epochs: float = Field(0.0, ge=0, description="linear warmup before the poly schedule")
    poly_power: float = Field(0.9, gt=0)
    bn_momentum: float | None = Field(None, gt=0, le=1, description="override every BatchNorm's momentum (None: the model's own)")
    aux_weight: float = Field(0.5, ge=0, description="weight of the aux loss where the model has one")
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    channels_last: bool = True
    grad_clip: float = Field(0.0, ge=0, description="max grad norm; 0 = off")
    eval_every: int = Field(1, ge=1, description="evaluate every N epochs (and after the last)")
    loader_workers: int = Field(2, ge=0, description="DataLoader processes per Ray worker")
    max_failures: int = Field(2, ge=0, description="worker-group restarts from the last checkpoint")
    resume: bool = False
    models_dir: str = Field("models", description="where <family>.pt is written")
    reports_dir: str = Field("reports", description="where metrics/<family>.json and the epoch CSV go")
    sample_images: int = Field(4, ge=0, description="val images in the MLflow prediction grid")

    @model_validator(mode="after")
    def _scales(self) -> "TrainParams":
        if self.scale_min > self.scale_max:
            raise ValueError("scale_min must be <= scale_max")
        return self


class FamilyParams(_Strict):
    model: str
    options: dict[str, Any] = Field(default_factory=dict)


class MlflowParams(_Strict):
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "segpipe"


class RayParams(_Strict):
    address: str = ""
    num_workers: int = Field(2, ge=1)
    use_gpu: Literal["auto", True, False] = "auto"
    cpus_per_worker: float = Field(1.0, gt=0)
    storage_path: str = "ray_results"


class Params(_Strict):
    seed: int = Field(0, ge=0)
    data: DataParams = Field(default_factory=DataParams)
    train: TrainParams = Field(default_factory=TrainParams)
    families: dict[str, FamilyParams] = Field(default_factory=dict)
    mlflow: MlflowParams = Field(default_factory=MlflowParams)
    ray: RayParams = Field(default_factory=RayParams)


# ---------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], yaml-parsed value)."""
    if "=" not in text:
        raise ParamsError(f"override {text!r} must look like dotted.key=value (-S)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ParamsError(f"override {text!r} has an empty key (-S)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ParamsError(f"cannot parse the value of -S {key}: {exc.__class__.__name__}") from None
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    out = copy.deepcopy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for part in parts[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ParamsError(f"-S {'.'.join(parts)}: {part!r} is not a mapping")
            node = nxt
        node[parts[-1]] = value
    return out


def _format_validation_error(exc: ValidationError, source: str) -> str:
    msgs = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        msgs.append(f"{loc or '<root>'}: {msg}")
    return f"bad params in {source}: " + "; ".join(msgs)


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ParamsError(f"params file not found: {p} (-p)")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ParamsError(f"{p}{where} is not valid YAML") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{p} must hold a mapping of keys at the top level")
    return raw


def validate(raw: dict, source: str = "params") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(_format_validation_error(exc, source)) from None


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    raw = read_yaml(path)
    raw = apply_overrides(raw, overrides or [])
    return validate(raw, str(path) + (" with -S overrides" if overrides else ""))


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (the MLflow param naming of DESIGN.md)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
