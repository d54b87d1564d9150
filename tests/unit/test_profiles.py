"""Each recipe profile declares its source (paper, or library config file and version), the settings it
takes from it, and what still differs; the effective params (params.yaml + the profile's overrides)
must hold every setting it claims to take, and every profile must validate as `segpipe quickstart
--profile <name> --dry-run` does."""

import pytest

from pipeline.config import load_params
from pipeline.profiles import PROFILES, load_profile, profile_overrides, profile_source
from tests.support.paths import ROOT

NAMES = sorted(p.stem for p in PROFILES.glob("*.yaml"))


def effective(p, key: str):
    """A dotted params key of the validated params; `global_batch` = train.batch_size x ray.num_workers."""
    if key == "global_batch":
        return p.train.batch_size * p.ray.num_workers
    value = p.model_dump()
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(f"{key}: no {part!r}")
        value = value[part]
    return value


def test_the_profiles_are_the_ones_the_docs_name():
    assert NAMES == ["deeplabv3-paper", "mmseg-deeplabv3-r50", "quickstart", "torchvision"]


@pytest.mark.parametrize("name", NAMES)
def test_each_profile_holds_what_it_takes_from_its_source(name):
    source = profile_source(name)
    p = load_params(ROOT / "params.yaml", profile_overrides(name))  # as `quickstart --profile --dry-run`
    if "own" in source:  # segpipe's own recipe: nothing taken from a publication, no anchor
        assert set(source) == {"own"} and not load_profile(name).get("anchors")
        return
    assert {"name", "config", "version", "url", "takes", "differs"} <= set(source), source
    assert source["takes"] and source["differs"]
    wrong = {k: (v, effective(p, k)) for k, v in source["takes"].items() if effective(p, k) != v}
    assert not wrong, f"profiles/{name}.yaml does not hold what it takes from {source['name']}: {wrong}"


def test_the_check_catches_a_profile_that_drifts(monkeypatch):
    """A profile whose overrides no longer match its `takes` fails the comparison above."""
    import pipeline.profiles as profiles

    real = profiles.load_profile
    monkeypatch.setattr(profiles, "load_profile",
                        lambda n: {**real(n), "train.lr": 0.02} if n == "mmseg-deeplabv3-r50" else real(n))
    p = load_params(ROOT / "params.yaml", profiles.profile_overrides("mmseg-deeplabv3-r50"))
    assert effective(p, "train.lr") != profile_source("mmseg-deeplabv3-r50")["takes"]["train.lr"]


def test_the_committed_recipe_says_it_is_segpipes_own():
    """params.yaml's recipe is no profile: its header says it has no published figure (docs/training.md
    compares it with none), and the profile that follows mmsegmentation is the one with an anchor."""
    head = (ROOT / "params.yaml").read_text().split("\n\n", 1)[0]
    assert "segpipe's own recipe" in head and "no published figure" in head, head
    text = (ROOT / "docs" / "training.md").read_text()
    assert "segpipe's own recipe" in text and "mmseg-deeplabv3-r50" in text
