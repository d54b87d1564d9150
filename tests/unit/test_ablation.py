"""The tune's two phases and its ablation tables, on the committed search spaces and on trial rows
with known numbers (no Ray): what each phase searches and holds fixed, the configured point always
in the grid, the verdict against the seed spread, what is adopted, and the grid refused before any
compute when two points are the same computation."""

import json

import pytest

from pipeline.config import load_params
from pipeline.errors import UserError
from pipeline.tuning import ablation
from pipeline.tuning.phases import (ARCHITECTURE, OPTIMISER, axes, check_distinct, configured, point_key, point_of,
                                    points, split, values_of)
from pipeline.tuning.space import expected_trials, resolve_space
from tests.support.paths import ROOT

NO_WEIGHTS = ["families.deeplabv3.options={atrous_rates: [6, 12, 18], atrous_rates_at: 16, output_stride: 8, aux_loss: true}",
              "families.unet.model=unet", "families.unet.options={base_channels: 8, upsample: transposed}"]


def _space(family: str, extra=()):
    p = load_params(ROOT / "params.yaml", NO_WEIGHTS + list(extra))
    return p, resolve_space(p, family)


def test_phases_split_optimiser_from_architecture_and_hold_the_configured_point():
    p, space = _space("deeplabv3")
    phases = split(space)
    assert list(phases) == [OPTIMISER, ARCHITECTURE]
    assert set(phases[OPTIMISER].searched) == {"lr", "weight_decay"}
    assert set(phases[ARCHITECTURE].searched) == {"atrous_rates", "output_stride", "aspp"}
    arch = phases[ARCHITECTURE]
    base = configured(arch)
    assert base == {"aspp+atrous_rates": {"aspp": "parallel", "atrous_rates": [6, 12, 18]}, "output_stride": 8}
    assert point_key(base) in {point_key(pt) for pt in points(arch)}
    # 4 rate settings + cascade, x 2 output strides, x tune.seeds (3) seeds; the optimiser phase: num_samples
    assert expected_trials(arch, p.tune, ARCHITECTURE) == 5 * 2 * 3
    assert expected_trials(phases[OPTIMISER], p.tune, OPTIMISER) == p.tune.num_samples


def test_a_configured_value_missing_from_the_grid_is_added_and_a_range_is_refused():
    _, space = _space("unet", ["tune.space.unet={upsample: {grid: [bilinear]}}"])
    arch = split(space)[ARCHITECTURE]
    assert axes(arch) == {"upsample": ["transposed", "bilinear"]} and OPTIMISER not in split(space)
    _, space = _space("fcn", ["families.fcn.options={upsample: transposed, width: 0.5}",
                              "tune.space.fcn={width: {uniform: [0.25, 0.5]}}"])
    with pytest.raises(UserError, match=r"architecture phase is a grid.*tune.space.fcn.width"):
        split(space)


def _rows(space, results: dict[str, list[float]]) -> list[dict]:
    """Trial rows of the architecture phase: upsample value -> one val mIoU per seed."""
    rows = []
    for value, mious in results.items():
        for seed, m in enumerate(mious):
            values = {"upsample": value}
            rows.append({"phase": ARCHITECTURE, "seed": seed, "point": point_of(space, values), "values": values,
                         "status": "completed", "val_mIoU": m})
    return rows


def test_a_value_is_adopted_only_beyond_the_seed_spread():
    _, space = _space("unet", ["tune.space.unet={upsample: {grid: [bilinear, transposed, unpool]}}"])
    arch = split(space)[ARCHITECTURE]
    # bilinear +0.10 with stds 0.01 / 0.01: beyond; unpool +0.02 with std 0.05: inside the spread
    rows = _rows(arch, {"transposed": [0.50, 0.52], "bilinear": [0.61, 0.62], "unpool": [0.49, 0.57]})
    result = ablation.tables(arch, rows)
    table = {r["value"]: r for r in result["axes"]["upsample"]}
    assert table["transposed"]["configured"] and table["transposed"]["verdict"] == "configured"
    assert table["bilinear"]["verdict"] == "better beyond the seed spread"
    assert table["bilinear"]["delta"] == pytest.approx(0.105)
    assert table["unpool"]["verdict"] == "inside the seed spread"
    assert result["chosen"] == {"upsample": "bilinear"} and result["chosen_mean"] == pytest.approx(0.615)
    assert ablation.chosen_values(arch, result) == {"upsample": "bilinear"}
    # the same means with a wide spread: nothing adopted, the note says what was kept
    rows = _rows(arch, {"transposed": [0.40, 0.62], "bilinear": [0.55, 0.68], "unpool": [0.49, 0.57]})
    result = ablation.tables(arch, rows)
    assert result["chosen"] == {"upsample": "transposed"} and ablation.chosen_values(arch, result) == {}
    assert "upsample: no value beats the configured transposed beyond the seed spread: kept" in result["notes"]
    # seeds that score exactly alike (a point that learnt nothing, e.g. every pixel background): no
    # spread to judge by, nothing adopted, even for a gap larger than the other point's std
    rows = _rows(arch, {"transposed": [0.122, 0.122], "bilinear": [0.122, 0.140], "unpool": [0.2, 0.21]})
    table = {r["value"]: r for r in ablation.tables(arch, rows)["axes"]["upsample"]}
    assert {r["verdict"] for v, r in table.items() if v != "transposed"} == {"seeds identical: no spread to judge by"}
    assert ablation.tables(arch, rows)["chosen"] == {"upsample": "transposed"}
    # one seed: the spread is unknown, so nothing is adopted however large the gap
    result = ablation.tables(arch, _rows(arch, {"transposed": [0.1], "bilinear": [0.9], "unpool": [0.2]}))
    assert {r["verdict"] for r in result["axes"]["upsample"]} == {"configured", "one seed: spread unknown"}
    assert result["chosen"] == {"upsample": "transposed"}
    md = "\n".join(ablation.markdown("unet", result))
    assert "| bilinear | 1 | 0.900 | +0.800 | one seed: spread unknown |" in md
    assert json.loads(ablation.compact(result))["chosen"] == {"upsample": "transposed"}


def test_failed_and_missing_trials_do_not_count():
    _, space = _space("unet", ["tune.space.unet={upsample: {grid: [bilinear, transposed]}}"])
    arch = split(space)[ARCHITECTURE]
    rows = _rows(arch, {"transposed": [0.50, 0.51], "bilinear": [0.9, 0.91]})
    rows[-1]["status"], rows[-1]["val_mIoU"] = "error", None
    table = {r["value"]: r for r in ablation.tables(arch, rows)["axes"]["upsample"]}
    assert table["bilinear"]["n"] == 1 and table["bilinear"]["verdict"] == "one seed: spread unknown"


def test_joint_axis_values_round_trip():
    _, space = _space("deeplabv3")
    arch = split(space)[ARCHITECTURE]
    for point in points(arch):
        assert point_of(arch, values_of(arch, point)) == point


def test_a_grid_with_two_points_that_are_the_same_computation_is_refused():
    """MobileNetV3 DeepLabV3 at 96 px sees a 6x6 map: (6, 12, 18) and (12, 24, 36) are both 1x1 convs."""
    p, space = _space("deeplabv3", [
        "families.deeplabv3.model=deeplabv3_mobilenet_v3_large", "families.deeplabv3.options={aux_loss: true}",
        "tune.space.deeplabv3={atrous_rates: {grid: [[6, 12, 18], [12, 24, 36]]}}"])
    arch = split(space)[ARCHITECTURE]
    with pytest.raises(UserError) as err:
        check_distinct(arch, 96)
    assert "(6, 12, 18)" in str(err.value) and "(12, 24, 36)" in str(err.value) and "same computation" in str(err.value)
    check_distinct(arch, 513)  # a 33x33 map: every rate reaches past the centre tap
    _, ok = _space("deeplabv3", [
        "families.deeplabv3.model=deeplabv3_mobilenet_v3_large", "families.deeplabv3.options={aux_loss: true, atrous_rates: [1, 2, 3]}",
        "tune.space.deeplabv3={atrous_rates: {grid: [[1, 2, 3], [1, 1, 1], [2, 3, 5]]}}"])
    check_distinct(split(ok)[ARCHITECTURE], 96)


def test_the_quickstart_grids_hold_no_two_identical_computations():
    """The quickstart's DeepLabV3 rates fit its 6 x 6 feature map (its old grid did not: (6, 12, 18)
    and (12, 24, 36) were both 1 x 1 convs), and every point runs tune.seeds seeds."""
    from pipeline.config import family_params
    from pipeline.profiles import profile_overrides

    p = load_params(ROOT / "params.yaml", profile_overrides("quickstart"))
    assert p.tune.seeds == 2
    assert p.tune.families == ["unet"]
    for family in ("deeplabv3", "unet"):
        arch = split(resolve_space(p, family))[ARCHITECTURE]
        check_distinct(arch, family_params(p, family).train.crop_size)
        assert expected_trials(arch, p.tune, ARCHITECTURE) == 2 * len(points(arch))
    with pytest.raises(UserError, match="same computation"):
        old = load_params(ROOT / "params.yaml", profile_overrides("quickstart") + [
            "families.deeplabv3.options={aux_loss: true}",
            "tune.space.deeplabv3={atrous_rates: {grid: [[6, 12, 18], [12, 24, 36], [3, 6, 9], [1, 6, 12]]}}"])
        check_distinct(split(resolve_space(old, "deeplabv3"))[ARCHITECTURE], 96)
