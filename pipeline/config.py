"""params.yaml: the schema every stage loads its knobs through.

``load_params(path, overrides)`` reads the YAML file, applies ``-S dotted.key=value`` overrides
(same syntax as ``dvc exp run -S``: the value is parsed as YAML), and validates the result against
:class:`Params`. Any problem raises :class:`ParamsError` whose message names the offending key, so
the CLI can print one ``error: ...`` line and exit 2.

One home for each fact: the repo's params.yaml holds every default value; the pydantic classes
here hold types, bounds, descriptions and cross-field checks only. A key missing from a params
file (or from a block built in code, e.g. ``DataParams(source="sample")``) is filled from the
same block of the repo's params.yaml before validation (``_Strict.SECTION``);
:func:`default_params` is that file itself. Dict-valued keys (families, tune.space,
model_options) are taken whole, never merged key by key.
"""

from __future__ import annotations

import copy
import functools
import math
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from pipeline.errors import UserError
from pipeline.storage import REPO

KNOWN_SOURCES = ("sample", "synthetic", "voc2012", "voc2012_aug")


# One square side bound for every size knob (train.crop_size, train.eval_size, predict --size):
# a 4096x4096 float batch of one image is already ~200 MB of input and several GB of activations.
MAX_SIDE = 4096
MAX_SIDE_REASON = ("larger squares need tens of GB per image (VOC images are at most 500 px; "
                   "the usual crop is 513)")


# A seed reaches torch.manual_seed, random.seed, numpy's legacy seeding (Optuna's TPE sampler, Ray
# Tune's BasicVariantGenerator(random_state=...)) and seed * 1_000_003 + ... of the data order:
# numpy's RandomState takes 0..2**32 - 1, the smallest of them.
MAX_SEED = 2**32 - 1

# Bounds on reading a params file or a -S value, so that hostile or broken YAML is one error line
# in milliseconds (the repo's params.yaml: ~9 KB, ~350 values, 8 levels, no anchors):
MAX_PARAMS_BYTES = 1 << 20   # size of a params file
MAX_DEPTH = 32               # levels of nesting; a -S key's dotted parts count as levels
MAX_NODES = 20_000           # values, each alias (*name) counted as what it repeats: a bomb has 10**8
MAX_NUMBER_CHARS = 100       # characters of one number (int() refuses more than 4300 digits)


class ParamsError(UserError):
    """Bad params: unknown key, wrong type or bad value."""


class _Refused(yaml.YAMLError):
    """YAML over one of the bounds: ``what`` is the bound, ``mark`` where in the text."""

    def __init__(self, what: str, mark):
        super().__init__(what)
        self.what, self.mark = what, mark


class _BoundedLoader(yaml.SafeLoader):
    """yaml.safe_load's loader within the bounds above: nesting and the node count with every alias
    expanded are measured while the document is composed (before any object is built, so an alias
    bomb costs its own size, not its expansion); number literals are refused past
    MAX_NUMBER_CHARS characters. ``max_depth``: the levels the document may use."""

    def __init__(self, stream: str, max_depth: int = MAX_DEPTH):
        super().__init__(stream)
        self.max_depth = max_depth
        self._level = 0
        self._total = 0  # nodes composed so far, each alias counted as the nodes it stands for
        self._sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (nodes with aliases expanded, levels)

    def compose_node(self, parent, index):
        mark = self.peek_event().start_mark
        alias = self.check_event(yaml.AliasEvent)
        self._level += 1
        try:
            if self._level > self.max_depth:
                raise _Refused(f"nested more than {self.max_depth} levels deep", mark)
            node = super().compose_node(parent, index)
        finally:
            self._level -= 1
        if alias and id(node) not in self._sizes:
            raise _Refused("an alias inside its own anchor (a recursive structure)", mark)
        if not alias:
            kids = (node.value if isinstance(node, yaml.SequenceNode)
                    else [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else ())
            self._sizes[id(node)] = (1 + sum(self._sizes[id(k)][0] for k in kids),
                                     1 + max((self._sizes[id(k)][1] for k in kids), default=0))
        size, levels = self._sizes[id(node)]
        self._total += size if alias else 1
        if self._total > MAX_NODES:
            raise _Refused(f"more than {MAX_NODES} values (aliases *name counted as what they repeat)", mark)
        if self._level + levels > self.max_depth:
            raise _Refused(f"nested more than {self.max_depth} levels deep once its aliases are expanded", mark)
        return node

    def _number(self, node) -> None:
        if len(node.value) > MAX_NUMBER_CHARS:
            raise _Refused(f"a number of {len(node.value)} characters (at most {MAX_NUMBER_CHARS})",
                           node.start_mark)

    def construct_yaml_int(self, node):
        self._number(node)
        return super().construct_yaml_int(node)

    def construct_yaml_float(self, node):
        self._number(node)
        return super().construct_yaml_float(node)


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _BoundedLoader.construct_yaml_int)
_BoundedLoader.add_constructor("tag:yaml.org,2002:float", _BoundedLoader.construct_yaml_float)


def safe_load(text: str, max_depth: int = MAX_DEPTH) -> Any:
    """yaml.safe_load within the bounds of :class:`_BoundedLoader`: raises yaml.YAMLError (_Refused
    past a bound), or ValueError / OverflowError for a value YAML matched but Python cannot build
    (a timestamp 2024-13-45)."""
    loader = _BoundedLoader(text, max_depth)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


@functools.cache
def repo_defaults() -> dict:
    """The committed params.yaml of the checkout: the one home of every default value ({} when the
    package runs without its checkout: every key is then required)."""
    path = REPO / "params.yaml"
    return read_yaml(path) if path.is_file() else {}


def _defaults_at(section: str) -> dict:
    node = repo_defaults()
    for part in filter(None, section.split(".")):
        node = node.get(part) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else {}


class _Strict(BaseModel):
    """A params block: its fields carry types, bounds and descriptions but no default values; a key
    missing from the input is taken from the same block of the repo's params.yaml (``SECTION``)
    before validation, so ``DataParams(source="sample")`` in code and a params file without some
    key both get params.yaml's values."""

    # allow_inf_nan=False: every float knob is a finite number (.inf / .nan are refused by name)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
    SECTION: ClassVar[str | None] = None

    @model_validator(mode="before")
    @classmethod
    def _fill_from_params_yaml(cls, data: Any) -> Any:
        if cls.SECTION is None or not isinstance(data, dict):
            return data
        return {**_defaults_at(cls.SECTION), **data}


class SyntheticParams(_Strict):
    SECTION = "data.synthetic"

    train_count: int = Field(ge=1, description="number of generated train scenes")
    val_count: int = Field(ge=1, description="number of generated val scenes")
    size: int = Field(ge=32, le=2048, description="side of the square generated images")
    seed: int = Field(ge=0, le=MAX_SEED, description="generation seed (same seed, same bytes)")
    max_objects: int = Field(ge=1, le=10, description="objects per scene: scenes: from half of it (rounded "
                             "up) to it; context: from 2 (1 when it is 1) to it, one per class, fewer where no more fit")
    classes: list[int] = Field(description="distinct VOC class ids the scenes draw from; in `scenes` the i-th "
                               "id gets row i of pipeline.data.synthetic.CLASS_TABLE (see docs/data.md)")
    kind: Literal["scenes", "context"] = Field(
        description="scenes: shape, texture or surroundings decide the class, never colour (the quickstart's "
        "task) | context: a known-answer field-of-view test: identical discs whose class only the colour "
        "beyond context_distance px from each one tells (2+ classes per image, the colour labelled background)")
    context_distance: int = Field(ge=1, description="context: radius (px) of the clear zone around each "
                                  "object's centre, beyond which its class colour lies; from size / 9 + 2 (outside "
                                  "the disc) to size / 3 (two objects fit); at output stride 8 an ASPP rate r reaches 8 r px")

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("needs at least one class")
        bad = [c for c in v if not 1 <= c <= 20]
        if bad:
            raise ValueError(f"class ids must be in 1..20, got {bad}")
        if len(set(v)) != len(v):
            raise ValueError(f"class ids must be distinct, got {v}")
        return v

    @model_validator(mode="after")
    def _context_fits(self) -> "SyntheticParams":
        # pipeline.data.synthetic: discs of radius max(3, size / 9), centres 2 d + 2 px apart
        lo, hi = max(3.0, self.size / 9) + 2, self.size / 3
        if self.kind == "context" and not lo <= self.context_distance <= hi:
            raise ValueError(f"context_distance ({self.context_distance}) must be in {lo:g}..{hi:g} at "
                             f"size {self.size} (the clear zone outside the object, two objects in the image)")
        return self


class DataParams(_Strict):
    SECTION = "data"

    source: str = Field(description="sample | synthetic | voc2012 | voc2012_aug | a VOC tar | a dir with VOCdevkit/")
    sbd_source: str = Field(description="a local SBD (benchmark.tgz, or its extracted dir) or a "
                            "SegmentationClassAug folder: with a VOC source, fetch builds train_aug from it "
                            "(voc2012_aug then downloads no SBD); empty: SBD only via data.sbd_url for voc2012_aug")
    dir: str = Field(description="working data directory: raw/ and shards/ live under it")
    voc_url: str = Field(description="URL of the VOC2012 trainval tar (voc2012, voc2012_aug)")
    voc_md5: str = Field(description="md5 of the VOC2012 trainval tar, checked before it is used")
    sbd_url: str = Field(description="URL of SBD's benchmark.tgz (voc2012_aug without data.sbd_source)")
    sbd_md5: str = Field(description="md5 of SBD's benchmark.tgz")
    download_timeout_s: float = Field(gt=0, description="socket timeout of downloads, in seconds")
    synthetic: SyntheticParams
    row_group_rows: int = Field(ge=1, le=100, description="rows per Parquet row group (<= 100)")
    shard_max_mb: float = Field(gt=0, description="a shard is closed once it reaches this size")
    workers: int = Field(ge=0, description="preprocess processes; 0 = all cores")
    extract_max_gb: float = Field(gt=0, description="an archive may expand to at most this many GB "
                                  "(VOC2012 trainval ~2 GB, SBD ~2.5 GB)")
    extract_max_members: int = Field(ge=1, description="files + dirs one archive may hold (VOC ~40k, SBD ~35k)")
    extract_max_ratio: float = Field(gt=1, description="uncompressed / compressed size an archive may "
                                     "reach (decompression bombs reach 1000s; VOC/SBD are < 2)")
    verify_shards: bool = Field(description="train/tune check every shard's size, rows and sha256 "
                                "against manifest.json before Ray starts")
    tune_split: float | list[str] = Field(description="the tuning split, carved from train: a fraction "
                                          "(the ids with the smallest sha256, at least one) or a list of train ids; "
                                          "0 = none (tune trials then select on val, the published split)")

    @field_validator("tune_split")
    @classmethod
    def _tune_split(cls, v: float | list[str]) -> float | list[str]:
        if isinstance(v, list):
            if not all(isinstance(i, str) and i for i in v):
                raise ValueError("an id list holds non-empty image ids")
        elif not 0 <= v <= 0.5:
            raise ValueError(f"a fraction of train must be in [0, 0.5], got {v}")
        return v

    @field_validator("sbd_source")
    @classmethod
    def _sbd_source(cls, v: str) -> str:
        if v and not Path(v).expanduser().exists():
            raise ValueError(f"{v!r} not found: a local SBD (benchmark.tgz or its extracted dir) or a "
                             "SegmentationClassAug folder, or empty")
        return v

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
    SECTION = "train"

    model: str = Field(description="registry name (see `segpipe models`)")
    model_options: dict[str, Any] = Field(description="options of train.model (they also override a family's options)")
    epochs: int = Field(ge=1, description="training epochs (train.iterations, when set, decides instead)")
    iterations: int = Field(ge=0, le=10_000_000, description="training length in SGD steps (0: train.epochs); "
                            "rounded to whole epochs of the train split at the global batch (the schedule, "
                            "checkpoints and evaluations are per epoch); tune trials use tune.max_epochs")
    batch_size: int = Field(ge=1, description="per worker")
    crop_size: int = Field(ge=16, description="side of the random crop of the train augmentation")
    eval_size: int = Field(ge=16, description="val images larger than this are shrunk to fit it, then padded to this square; "
                           "scored at the label's own resolution (logits resized back)")
    eval_resize: Literal["fit", "short_side"] = Field(
        description="fit: shrink images larger than eval_size to fit it, never upscale | short_side: resize the "
        "short side to eval_size, up or down (the long side at most 4x it), one image per batch: "
        "mmsegmentation's and torchvision's test resize")
    photometric: bool = Field(description="mmsegmentation's PhotoMetricDistortion on each train crop (brightness "
                              "+-32, contrast and saturation x0.5-1.5, hue +-18/180, each p=0.5)")
    cat_max_ratio: float = Field(gt=0, le=1, description="a random crop in which one class fills more than this "
                                 "share of the labelled pixels is redrawn, up to 10 draws (1: off; mmsegmentation 0.75)")

    @field_validator("crop_size", "eval_size")
    @classmethod
    def _side(cls, v: int) -> int:
        if v > MAX_SIDE:
            raise ValueError(f"must be <= {MAX_SIDE}, got {v}: {MAX_SIDE_REASON}")
        return v
    scale_min: float = Field(gt=0, description="smallest random scale of the train augmentation")
    scale_max: float = Field(gt=0, description="largest random scale of the train augmentation")
    lr: float = Field(gt=0, description="SGD learning rate (for the global batch ray.num_workers x batch_size)")
    momentum: float = Field(ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(ge=0, description="SGD weight decay")
    warmup_epochs: float = Field(ge=0, description="linear warmup before the poly schedule")
    poly_power: float = Field(gt=0, description="power of the poly LR decay after the warmup")
    bn_momentum: float | None = Field(gt=0, le=1, description="override every BatchNorm's momentum (None: the model's own)")
    bn_recalibrate: int = Field(ge=0, le=10000, description="before each evaluation, re-estimate every BatchNorm's "
                                "running statistics over this many train batches (0: off); a short training's running "
                                "averages lag its weights and score it too low")
    aux_weight: float = Field(ge=0, description="weight of the aux loss where the model has one")
    aux_lr_mult: float = Field(gt=0, description="lr multiplier of the aux classifier (torchvision's recipe: 10)")
    amp: Literal["auto", "bf16", "fp16", "off"] = Field(description="auto: bf16, else fp16 on GPU; off on CPU")
    channels_last: bool = Field(description="channels_last memory format")
    grad_clip: float = Field(ge=0, description="max grad norm; 0 = off")
    eval_every: int = Field(ge=1, description="evaluate every N epochs (and after the last)")
    loader_workers: int = Field(ge=0, description="DataLoader processes per Ray worker")
    max_failures: int = Field(ge=0, description="worker-group restarts from the last checkpoint")
    resume: bool = Field(description="continue the latest run of this family/model/seed")
    models_dir: str = Field(description="where <family>-seed<N>.pt is written")
    reports_dir: str = Field(description="where metrics/<family>-seed<N>.json, the epoch CSV and the comparison report go")
    sample_images: int = Field(ge=0, description="val images in the MLflow prediction grid")

    @model_validator(mode="after")
    def _scales(self) -> "TrainParams":
        if self.scale_min > self.scale_max:
            raise ValueError("scale_min must be <= scale_max")
        return self


# train keys a family may not override (bookkeeping shared by the whole pipeline, or the model itself)
NOT_PER_FAMILY = ("model", "model_options", "resume", "models_dir", "reports_dir")


class FamilyParams(_Strict):
    model: str = Field(description="the family's model (a registry name, see `segpipe models`)")
    options: dict[str, Any] = Field(default_factory=dict, description="its model options")
    train: dict[str, Any] = Field(default_factory=dict, description="this family's overrides of the shared `train` "
                                  "block (e.g. tuned lr / weight_decay, written by `segpipe tune --apply`)")

    @field_validator("train")
    @classmethod
    def _train_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        bad = sorted(k for k in v if k not in TrainParams.model_fields or k in NOT_PER_FAMILY)
        if bad:
            raise ValueError(f"{', '.join(bad)}: not a per-family train setting (any train key but "
                             f"{', '.join(NOT_PER_FAMILY)})")
        try:
            checked = TrainParams.model_validate(v)
        except ValidationError as exc:
            e = exc.errors()[0]
            raise ValueError(f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}") from None
        return {k: getattr(checked, k) for k in v}  # typed as the shared block types them ("1e-06" -> 1e-06)


def family_params(p: "Params", family: str) -> "Params":
    """``p`` with ``families.<family>.train`` merged over the shared ``train`` block (and emptied, so the
    merge happens once): what a run of the family trains with."""
    fam = p.families.get(family)
    if fam is None or not fam.train:
        return p
    families = {**p.families, family: fam.model_copy(update={"train": {}})}
    try:
        train = TrainParams.model_validate({**p.train.model_dump(), **fam.train})
    except ValidationError as exc:
        e = exc.errors()[0]
        raise ParamsError(f"families.{family}.train over train: {e['msg'].removeprefix('Value error, ')} "
                          f"(families.{family}.train)") from None
    return p.model_copy(update={"train": train, "families": families})


class MlflowParams(_Strict):
    SECTION = "mlflow"

    tracking_uri: str = Field(description="MLflow tracking store (MLFLOW_TRACKING_URI wins when set)")
    experiment: str = Field(description="MLflow experiment the runs are logged to")
    # an http(s) tracking server: MLflow's own retries (MLFLOW_HTTP_REQUEST_* env vars, which win
    # when set), bounded so a short outage is survived and a dead server fails in minutes, not hours
    http_max_retries: int = Field(ge=0, le=10, description="retries of a failed tracking request")
    http_backoff_factor: int = Field(ge=0, le=10, description="retry sleeps: 0, 2f, 4f, 8f, ... seconds")
    http_timeout_s: int = Field(ge=1, le=300, description="timeout of one tracking request")
    preflight_timeout_s: float = Field(gt=0, le=60, description="train/tune/report check the store first, "
                                       "with this timeout per request (no retries)")
    server_jobs: bool = Field(description="segpipe ui / mlflow-server run MLflow's GenAI job runner "
                              "(MLFLOW_SERVER_ENABLE_JOB_EXECUTION wins when set)")


class RayParams(_Strict):
    SECTION = "ray"

    address: str = Field(description="empty: start a local Ray; auto or ray://...: join a cluster (RAY_ADDRESS also works)")
    num_workers: int = Field(ge=1, description="Ray Train workers per training run (one GPU each with GPUs)")
    use_gpu: Literal["auto", True, False] = Field(description="auto: GPUs when the cluster has them")
    cpus_per_worker: float = Field(gt=0, description="CPUs each Ray Train worker reserves")
    storage_path: str = Field(description="Ray checkpoints and Tune results (a shared path or URI on a cluster)")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        description="Ray Train worker placement: PACK fills a node first; SPREAD one worker per node where it can")


class ReportParams(_Strict):
    """`segpipe report`: the comparison built from the MLflow runs."""

    SECTION = "report"
    device: Literal["auto", "cpu", "cuda"] = Field(description="where latency is measured (auto: cuda if present)")
    latency_warmup: int = Field(ge=0, description="untimed forward passes before timing")
    latency_repeats: int = Field(ge=1, description="timed forward passes (batch 1, eval size); the median is reported")
    sample_images: int = Field(ge=0, description="val images in the qualitative grid (0 = no grid)")
    register_best: bool = Field(description="register each family's best run as segpipe-<family> with alias best")


class PredictParams(_Strict):
    """`segpipe predict`: bounds on what one input image may cost."""

    SECTION = "predict"
    max_pixels: int = Field(ge=4096, le=100_000_000,
                            description="a larger image is shrunk to this many pixels first (JPEGs decoded at "
                                        "reduced scale): keeps peak memory under ~2 GB")


SEARCH_KINDS = ("choice", "grid", "uniform", "loguniform")


def check_space_entry(where: str, value: Any) -> None:
    """A search entry is {choice: [...]}, {grid: [...]}, {uniform: [low, high]} or
    {loguniform: [low, high]}; anything else that is not a mapping is a fixed value."""
    if not isinstance(value, dict):
        return
    if len(value) != 1 or next(iter(value)) not in SEARCH_KINDS:
        raise ValueError(f"{where}: a search entry is one of {{choice: [...]}}, {{grid: [...]}}, "
                         f"{{uniform: [low, high]}}, {{loguniform: [low, high]}}; got keys {sorted(map(str, value))}")
    kind, arg = next(iter(value.items()))
    if kind in ("choice", "grid"):
        if not isinstance(arg, list) or not arg:
            raise ValueError(f"{where}.{kind}: needs a non-empty list of values")
        return
    if (not isinstance(arg, list) or len(arg) != 2
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in arg)):
        raise ValueError(f"{where}.{kind}: needs [low, high] (two finite numbers)")
    if not arg[0] < arg[1]:
        raise ValueError(f"{where}.{kind}: low must be < high, got {arg}")
    if kind == "loguniform" and arg[0] <= 0:
        raise ValueError(f"{where}.{kind}: low must be > 0, got {arg[0]}")


class TuneParams(_Strict):
    """`segpipe tune`: Ray Tune search per family (ASHA early stopping on val/mIoU)."""

    SECTION = "tune"
    families: list[str] = Field(description="families to tune (keys of `families`); DVC's tune matrix iterates over them")
    space: dict[str, dict[str, Any]] = Field(description="family -> entry -> search entry or fixed value")
    search_alg: Literal["random", "optuna"] = Field(description="random: grid entries crossed, the rest "
                                                    "sampled; optuna: TPE (grid entries become choices)")
    num_samples: int = Field(ge=1, description="optimiser phase (lr, weight_decay, momentum): random: repeats of "
                             "its grid (each with fresh samples); optuna: trials")
    seeds: int = Field(ge=1, le=100, description="architecture phase: seeds per grid point (seed, seed+1, ...); "
                       "each point's val mIoU is the mean ± std over them, no point is stopped early")
    max_concurrent_trials: int = Field(ge=1, description="trials at once")
    max_epochs: int = Field(ge=1, description="epochs of every architecture trial and of an optimiser trial "
                            "ASHA never stops (ASHA max_t)")
    grace_period: int = Field(ge=1, description="ASHA (optimiser phase only): epochs before a trial can be stopped")
    reduction_factor: int = Field(ge=2, description="ASHA (optimiser phase only): keep the top 1/reduction_factor "
                                  "at each rung")
    num_workers: int = Field(ge=1, description="Ray Train workers per trial")
    cpus_per_worker: float = Field(gt=0, description="CPUs each trial worker reserves")
    trainable_cpus: float = Field(ge=0, description="CPUs of the trial driver (it only waits for its TorchTrainer)")
    resume: bool = Field(description="continue the latest interrupted tune of the family (Tuner.restore)")

    @field_validator("families")
    @classmethod
    def _families(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("needs at least one family")
        if len(set(v)) != len(v):
            raise ValueError(f"families must be distinct, got {v}")
        return v

    @field_validator("space")
    @classmethod
    def _space(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for fam, entries in v.items():
            for name, value in (entries or {}).items():
                check_space_entry(f"{fam}.{name}", value)
        return v

    @model_validator(mode="after")
    def _asha(self) -> "TuneParams":
        if self.grace_period > self.max_epochs:
            raise ValueError(f"grace_period ({self.grace_period}) must be <= max_epochs ({self.max_epochs})")
        return self


class Params(_Strict):
    SECTION = ""

    profile: str = Field(description="the recipe profile these params come from (profiles/<name>.yaml; "
                         "`segpipe quickstart --profile` sets it): tagged on every run, its published anchors in the report")
    seed: int = Field(ge=0, le=MAX_SEED, description="the run's seed when `segpipe train` gets no --seed")
    seeds: list[int] = Field(description="DVC's train matrix runs families x seeds (each in 0..4294967295)")
    data: DataParams
    train: TrainParams
    families: dict[str, FamilyParams] = Field(description="family -> its model, options and train overrides")
    mlflow: MlflowParams
    ray: RayParams
    tune: TuneParams
    report: ReportParams
    predict: PredictParams

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("needs at least one seed")
        bad = [s for s in v if not 0 <= s <= MAX_SEED]
        if bad:
            raise ValueError(f"seeds must be in 0..{MAX_SEED} (numpy's seed range), got {bad[:3]}")
        if len(set(v)) != len(v):
            raise ValueError(f"seeds must be distinct, got {v}")
        return v


# ---------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], yaml-parsed value)."""
    if "=" not in text:
        raise ParamsError(f"override {text!r} must look like dotted.key=value (-S)")
    key, raw = text.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not key or any(not part for part in parts):
        raise ParamsError(f"override {_short(text)!r} has an empty key (-S)")
    if len(parts) >= MAX_DEPTH:
        raise ParamsError(f"override key {_short(key)!r} has {len(parts)} parts: params nest at most "
                          f"{MAX_DEPTH} levels (-S)")
    try:  # the value sits len(parts) levels below the top
        value = safe_load(raw, MAX_DEPTH - len(parts)) if raw.strip() else ""
    except _Refused as exc:
        raise ParamsError(f"the value of -S {_short(key)} is refused: {exc.what} (-S {_short(key)})") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"cannot parse the value of -S {_short(key)}: {exc.__class__.__name__}") from None
    except (ValueError, OverflowError) as exc:
        raise ParamsError(f"cannot read the value of -S {_short(key)}: {_short(str(exc))} (-S {_short(key)})") from None
    return parts, value


def _short(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters for an error line."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_key(key: str, value: Any, where: str) -> None:
    """``value`` checked as the top-level params key ``key`` takes it, for a stage flag that stands
    for the key (`train --seed`): a ParamsError naming ``where`` when the schema refuses it."""
    field = Params.model_fields[key]
    try:
        TypeAdapter(Annotated[(field.annotation, *field.metadata)]).validate_python(value)
    except ValidationError as exc:
        msg = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise ParamsError(f"{key}: {msg}, got {_short(str(value))} ({where})") from None


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


def _read_text(p: Path) -> str:
    """The UTF-8 text of the params file ``p``, at most MAX_PARAMS_BYTES long."""
    try:
        with p.open("rb") as f:
            data = f.read(MAX_PARAMS_BYTES + 1)
    except OSError as exc:
        raise ParamsError(f"cannot read the params file {p} ({exc.strerror or exc}) (-p)") from None
    if len(data) > MAX_PARAMS_BYTES:
        raise ParamsError(f"{p} is larger than {MAX_PARAMS_BYTES >> 20} MiB: a params file is a few KB "
                          f"(params.yaml ~9 KB); check -p (-p)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ParamsError(f"{p} line {line} is not UTF-8 text (byte 0x{data[exc.start]:02x}): "
                          f"save it as UTF-8 (-p)") from None


def read_yaml(path: str | Path) -> dict:
    """A params file (params.yaml, a -p file, a tune's best_params.yaml) as a dict, read within the
    bounds of :func:`safe_load`; anything wrong is a ParamsError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ParamsError(f"params file not found: {p} (-p)")
    text = _read_text(p)
    try:
        raw = safe_load(text) or {}
    except _Refused as exc:
        raise ParamsError(f"{p} line {exc.mark.line + 1} is refused: {exc.what} (-p)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ParamsError(f"{p}{where} is not valid YAML") from None
    except (ValueError, OverflowError) as exc:
        raise ParamsError(f"{p} holds a value YAML cannot build ({_short(str(exc))}) (-p)") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{p} must hold a mapping of keys at the top level")
    return raw


def validate(raw: dict, source: str = "params") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(_format_validation_error(exc, source)) from None


def default_params(overrides: list[str] | None = None) -> Params:
    """The repo's params.yaml (with ``-S``-style overrides): the defaults, for code and tests that
    build params without a file of their own."""
    return load_params(REPO / "params.yaml", overrides)


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
