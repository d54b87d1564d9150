"""FCN-VGG's `decoder` option: `none` is the published FCN-Ns (score maps upsampled, bilinear or
transposed; unpool refused), `features` one feature decoder for the three upsampling methods, alike
in everything but the upsampling modules."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from seg_models import build_model, model_info
from seg_models.fcn import FeatureDecoder
from seg_models.upsample import DecoderStage, Upsample

METHODS = ("bilinear", "transposed", "unpool")
VGG_POOL_CHANNELS = (64, 128, 256, 512, 512)  # pool1 .. pool5 of the paper's VGG16
SMALL = {"width": 0.125, "batch_norm": True}  # a CPU-sized VGG16


def _meta(name: str, **options) -> nn.Module:
    with torch.device("meta"):
        return build_model(name, **options)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _structure(model: nn.Module) -> list[tuple[str, str, tuple]]:
    """(name, class, parameter shapes) of every module outside the upsampling modules."""
    ups = [n for n, m in model.named_modules() if isinstance(m, Upsample)]
    return [(n, type(m).__name__, tuple(tuple(p.shape) for p in m.parameters(recurse=False)))
            for n, m in model.named_modules() if not any(n == u or n.startswith(u + ".") for u in ups)]


def test_decoder_option_is_registered_with_none_first():
    for s in (32, 16, 8):
        info = model_info(f"fcn{s}s_vgg16")
        assert info["options"]["decoder"] == ["none", "features"] and info["defaults"]["decoder"] == "none"
    assert "decoder" not in model_info("fcn_resnet50")["options"]


def test_default_fcn_vgg_is_the_published_fcn_unchanged():
    """Parameter counts measured before the decoder option existed; no decoder, score-map upsampling."""
    before = {"fcn32s_vgg16": 134346581, "fcn16s_vgg16": 134357354, "fcn8s_vgg16": 134362751}
    for name, count in before.items():
        for options in ({}, {"decoder": "none"}):
            model = _meta(name, **options)
            assert _params(model) == count and model.decoder is None
            assert not any(isinstance(m, DecoderStage) for m in model.modules())
    model = _meta("fcn8s_vgg16")
    assert len(model.state_dict()) == 36 and set(model.score_pool) == {"pool4", "pool3"}
    assert _params(_meta("fcn8s_vgg16", upsample="transposed")) == 134489759  # score-map deconvs, as before


@pytest.mark.parametrize("stride", [32, 16, 8])
def test_unpool_without_a_feature_decoder_is_refused(stride):
    with pytest.raises(ValueError, match=re.escape("set decoder: features")):
        build_model(f"fcn{stride}s_vgg16", upsample="unpool", **SMALL)
    with pytest.raises(ValueError, match=re.escape("set decoder: features")):
        build_model(f"fcn{stride}s_vgg16", upsample="unpool", decoder="none", **SMALL)
    with pytest.raises(ValueError, match="decoder must be one of 'none', 'features', got 'segnet'"):
        build_model(f"fcn{stride}s_vgg16", decoder="segnet")


@pytest.mark.parametrize("stride", [32, 16, 8])
def test_feature_decoder_methods_differ_only_in_upsampling(stride):
    models = {m: _meta(f"fcn{stride}s_vgg16", upsample=m, decoder="features") for m in METHODS}
    for method, model in models.items():
        assert isinstance(model.decoder, FeatureDecoder)
        stages = list(model.decoder.stages)
        assert [s.channels for s in stages] == list(VGG_POOL_CHANNELS[::-1])  # pool5 .. pool1
        ups = {n: (m.method, m.scale) for n, m in model.named_modules() if isinstance(m, Upsample)}
        assert ups == {f"decoder.stages.{i}.up": (method, 2) for i in range(5)}  # one 2x step per pool, nothing else
        assert len(model.decoder.skip) == {32: 0, 16: 1, 8: 2}[stride]
    assert _structure(models["bilinear"]) == _structure(models["transposed"]) == _structure(models["unpool"])
    # parameters: transposed adds exactly its five deconvs (c x c x 4 x 4, no bias), the others nothing
    deconvs = sum(c * c * 4 * 4 for c in VGG_POOL_CHANNELS)
    assert deconvs == 9764864
    assert _params(models["transposed"]) - _params(models["bilinear"]) == deconvs
    assert _params(models["unpool"]) == _params(models["bilinear"])
    keys = {m: set(model.state_dict()) for m, model in models.items()}
    assert keys["unpool"] == keys["bilinear"]
    assert keys["transposed"] - keys["bilinear"] == {f"decoder.stages.{i}.up.deconv.weight" for i in range(5)}
    assert keys["bilinear"] <= keys["transposed"]


def test_feature_decoder_keeps_the_former_unpool_decoder():
    """upsample: unpool + decoder: features is the former unpool decoder: same parameter count, same keys."""
    counts = {32: 140421589, 16: 140684245, 8: 140750037}  # measured before the change (upsample: unpool)
    for stride, count in counts.items():
        assert _params(_meta(f"fcn{stride}s_vgg16", upsample="unpool", decoder="features")) == count
    keys = set(_meta("fcn8s_vgg16", upsample="unpool", decoder="features").state_dict())
    assert {"decoder.stages.0.conv.0.weight", "decoder.skip.pool3.weight", "decoder.score.weight"} <= keys


def test_feature_decoder_starts_alike_for_the_three_methods():
    """Same seed, same initial weights for every shared parameter: uniform taps, the SCORE_GAIN BN scale
    and score weights; transposed's deconvs start as bilinear kernels."""
    states = {}
    for method in METHODS:
        torch.manual_seed(0)
        states[method] = build_model("fcn8s_vgg16", num_classes=3, upsample=method, decoder="features",
                                     **SMALL).state_dict()
    ref = states["bilinear"]
    for method in ("transposed", "unpool"):
        assert all(torch.equal(ref[k], states[method][k]) for k in ref), method
    for i in range(5):
        w = ref[f"decoder.stages.{i}.conv.0.weight"]
        assert torch.equal(w, w[:, :, 1:2, 1:2].expand_as(w)) and w.abs().sum() > 0  # uniform_taps_
    assert torch.allclose(ref["decoder.stages.4.conv.1.weight"], torch.tensor(10 ** 0.5))  # SCORE_GAIN


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("stride", [32, 16, 8])
def test_feature_decoder_output_has_the_input_size(stride, method):
    model = build_model(f"fcn{stride}s_vgg16", num_classes=3, upsample=method, decoder="features", **SMALL).eval()
    with torch.no_grad():
        for size in ((70, 90), (45, 61)):
            out = model(torch.randn(1, 3, *size))["out"]
            assert out.shape == (1, 3, *size) and torch.isfinite(out).all()


@pytest.mark.parametrize("method", ["bilinear", "transposed"])
def test_decoder_none_output_has_the_input_size(method):
    model = build_model("fcn8s_vgg16", num_classes=3, upsample=method, **SMALL).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 70, 90))["out"].shape == (1, 3, 70, 90)


def test_decoder_stage_upsamples_by_its_method_only():
    """A DecoderStage = Upsample(method, channels, 2) to the pool's input size + the same 3x3 conv-BN-ReLU."""
    from seg_models.upsample import max_pool

    x = torch.randn(2, 4, 9, 11)
    pooled, pool = max_pool(x)
    stages = {}
    for method in METHODS:
        torch.manual_seed(0)
        stages[method] = DecoderStage(method, 4, 6).eval()
    for method, stage in stages.items():
        assert stage(pooled, pool).shape == (2, 6, 9, 11)
        assert torch.equal(stage.conv[0].weight, stages["bilinear"].conv[0].weight)
    with torch.no_grad():
        expected = stages["bilinear"].conv(stages["unpool"].up(pooled, pool.size, [pool]))
        torch.testing.assert_close(stages["unpool"](pooled, pool), expected)
