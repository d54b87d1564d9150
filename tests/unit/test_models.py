"""seg_models: registry, shapes, training step, upsamplers, options, torchvision equivalence, weights."""

from __future__ import annotations

import ast
import hashlib
import pathlib
import re
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision import models as tvm
from torchvision.models import segmentation as tvs

import seg_models
from seg_models import BACKBONE_WEIGHTS, build_model, effective_atrous_rates, list_models, model_info
from seg_models.upsample import DecoderStage, Upsample, bilinear_kernel, max_pool
from tests.support.models import NAMES, ODD


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _meta(name: str, **options) -> nn.Module:
    """Build on the meta device: structure and shapes only, nothing allocated."""
    with torch.device("meta"):
        return build_model(name, **options)


# --------------------------------------------------------------------------- registry
def test_registry_lists_every_model_with_info():
    assert list_models() == NAMES
    families = {"fcn": 5, "deeplabv3": 4, "lraspp": 1, "unet": 2}
    assert {f: sum(model_info(n)["family"] == f for n in NAMES) for f in families} == families
    for name in NAMES:
        info = model_info(name)
        assert set(info["options"]) == set(info["defaults"])
        assert info["backbone"] is None or info["backbone"] in BACKBONE_WEIGHTS
    assert model_info("fcn8s_vgg16")["options"]["upsample"] == ["bilinear", "transposed", "unpool"]
    assert model_info("fcn8s_vgg16")["options"]["decoder"] == ["none", "features"]
    assert model_info("unet_resnet50")["options"]["upsample"] == ["bilinear", "transposed"]
    for url, fname in BACKBONE_WEIGHTS.values():
        assert url == "https://download.pytorch.org/models/" + fname


def test_seg_models_imports_only_torch():
    """seg_models stays free of the pipeline's stack (ray, mlflow, dvc, ...): only torch/torchvision/stdlib."""
    package = pathlib.Path(seg_models.__file__).parent
    imported = set()
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    assert imported - set(sys.stdlib_module_names) == {"torch", "torchvision"}


def test_fcn_skip_scores_are_fused_by_addition():
    assert [len(_meta(f"fcn{s}s_vgg16").score_pool) for s in (32, 16, 8)] == [0, 1, 2]
    model = build_model("fcn8s_vgg16", num_classes=3).eval()
    assert all(conv.weight.abs().sum() == 0 for conv in model.score_pool.values())  # zero-initialised (paper)
    x = torch.randn(1, 3, *ODD)
    with torch.no_grad():
        base = model(x)["out"]
        model.score_pool["pool4"].bias.fill_(0.25)
        model.score_pool["pool3"].bias.fill_(0.5)
        shifted = model(x)["out"]
    torch.testing.assert_close(shifted, base + 0.75, atol=1e-5, rtol=0)  # bilinear keeps constants


# --------------------------------------------------------------------------- upsampling
@pytest.mark.parametrize("scale", [2, 8, 32])
def test_transposed_starts_as_bilinear_interpolation(scale):
    up = Upsample("transposed", 3, scale)
    assert up.deconv.weight.requires_grad and up.deconv.kernel_size == (2 * scale,) * 2
    x = torch.randn(2, 3, 5, 7)
    size = (5 * scale, 7 * scale)
    y = up(x, size)
    ref = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
    assert y.shape == ref.shape
    b = scale // 2  # ConvTranspose2d(k=2s, stride s, padding s/2) == interpolate except the outer s/2 rows/cols
    torch.testing.assert_close(y[..., b:-b, b:-b], ref[..., b:-b, b:-b], atol=1e-5, rtol=0)
    assert not torch.allclose(y[..., :b, :], ref[..., :b, :], atol=1e-3)  # there interpolate clamps, deconv sees 0


def test_bilinear_kernel_values():
    k = bilinear_kernel(2, 2)
    one_d = torch.tensor([0.25, 0.75, 0.75, 0.25])
    torch.testing.assert_close(k[0, 0], one_d[:, None] * one_d[None, :])
    assert k[0, 1].abs().sum() == 0 and torch.equal(k[1, 1], k[0, 0])


def test_fcn_transposed_layers_start_bilinear_and_learn():
    model = _meta("fcn8s_vgg16", upsample="transposed")
    deconvs = {n: m for n, m in model.named_modules() if isinstance(m, nn.ConvTranspose2d)}
    assert {n: m.stride for n, m in deconvs.items()} == {
        "upscore_to.pool4.deconv": (2, 2), "upscore_to.pool3.deconv": (2, 2), "upscore.deconv": (8, 8)}
    real = build_model("unet", base_channels=4, upsample="transposed")
    deconv = real.up[0].up.deconv
    assert torch.equal(deconv.weight.detach(), bilinear_kernel(32, 2)) and deconv.weight.requires_grad


@pytest.mark.parametrize("hw", [(8, 10), (9, 11)])
def test_unpool_puts_values_only_at_pooled_positions(hw):
    x = torch.randn(2, 4, *hw)
    pooled, pool = max_pool(x)
    y = Upsample("unpool", 4, 2)(pooled, hw, [pool])
    assert y.shape == x.shape
    nonzero = y != 0
    assert nonzero.sum() == pooled.numel()  # one value per pooling window ...
    assert torch.equal(y[nonzero], x[nonzero])  # ... at the position of its maximum
    windows = nonzero[..., : hw[0] // 2 * 2, : hw[1] // 2 * 2].float()
    assert torch.equal(F.avg_pool2d(windows, 2) * 4, torch.ones_like(pooled))
    assert not nonzero[..., hw[0] // 2 * 2:, :].any()  # a row the pool dropped stays zero

    # every channel has its own indices: a map with another channel count cannot be unpooled
    with pytest.raises(ValueError, match="its own indices"):
        Upsample("unpool", 3, 2)(torch.randn(2, 3, hw[0] // 2, hw[1] // 2), hw, [pool])


def _unpool_calls(model: nn.Module) -> list:
    """(input map, pool, output) of every unpool step of ``model``'s forward, via forward hooks."""
    calls = []
    for m in model.modules():
        if isinstance(m, Upsample) and m.method == "unpool":
            m.register_forward_hook(lambda mod, args, out: calls.append((args[0], args[2][0], out)))
    return calls


@pytest.mark.parametrize("name", ["fcn32s_vgg16", "fcn16s_vgg16", "fcn8s_vgg16", "unet"])
def test_unpool_decoder_uses_each_channels_indices_then_convs(name):
    options = {"width": 0.125, "batch_norm": True, "decoder": "features"} if name.startswith("fcn") else {"base_channels": 4}
    model = build_model(name, num_classes=3, upsample="unpool", **options).eval()
    calls = _unpool_calls(model)
    with torch.no_grad():
        out = model(torch.randn(2, 3, *ODD))["out"]
    assert len(calls) == (5 if name.startswith("fcn") else 4)  # one unpool per encoder pool
    for x, pool, y in calls:
        assert pool.indices.shape == x.shape  # one index per channel and position
        flat = torch.zeros_like(y).flatten(2).scatter_(2, pool.indices.flatten(2), x.flatten(2).abs() + 1)
        assert torch.equal(y != 0, (flat != 0).view_as(y) & (y != 0))  # values only at each channel's own argmax
        positions = (y != 0)[0]
        assert not all(torch.equal(positions[0], positions[c]) for c in range(1, positions.shape[0]))  # not shared
    # scores come after learnable densifying convs: no pixel is left with all-zero logits
    assert (out.abs().sum(1) > 0).all()
    if name.startswith("fcn"):
        stages = [m for m in model.modules() if isinstance(m, DecoderStage)]
        assert len(stages) == 5 and all(s.up.method == "unpool" for s in stages)
        assert all(isinstance(s.conv[0], nn.Conv2d) and isinstance(s.conv[1], nn.BatchNorm2d) for s in stages)
        assert [len(_meta(f"fcn{s}s_vgg16", upsample="unpool", decoder="features").decoder.skip)
                for s in (32, 16, 8)] == [0, 1, 2]


def test_unpool_stage_starts_with_uniform_taps():
    """Each densifying conv starts with one weight per (out, in) pair on all 9 taps, so an unpooled value
    reaches the output the same way wherever its max was (``uniform_taps_``); training then makes the
    taps position-specific."""
    stage = DecoderStage("unpool", 4, 6)  # (the learning test above fails with independent random taps)
    w = stage.conv[0].weight
    assert torch.equal(w, w[:, :, 1:2, 1:2].expand_as(w)) and w.abs().sum() > 0


# --------------------------------------------------------------------------- DeepLabV3 options
def _aspp_dilations(model) -> list[int]:
    return [branch[0].dilation[0] for branch in model.classifier[0].convs[1:4]]


def test_atrous_rates_and_output_stride():
    assert _aspp_dilations(_meta("deeplabv3_resnet50")) == [12, 24, 36]
    model = _meta("deeplabv3_resnet50", atrous_rates=[3, 5, 7])
    assert _aspp_dilations(model) == [3, 5, 7]
    assert [b[0].padding[0] for b in model.classifier[0].convs[1:4]] == [3, 5, 7]
    assert _aspp_dilations(_meta("deeplabv3_mobilenet_v3_large", atrous_rates=(2, 4, 6))) == [2, 4, 6]
    os16 = _meta("deeplabv3_resnet101", output_stride=16)
    assert _aspp_dilations(os16) == [6, 12, 18]  # paper: rates halve with the output stride
    x = torch.zeros(1, 3, 64, 64, device="meta")
    assert os16.backbone(x)["out"].shape[-2:] == (4, 4)
    assert _meta("deeplabv3_resnet50").backbone(x)["out"].shape[-2:] == (8, 8)


def test_atrous_rates_at_output_stride_16_are_doubled_at_8():
    """atrous_rates_at=16: rates at output stride 16 (paper), doubled at 8: one field of view at both strides."""
    import yaml

    for stride, want in ((8, [12, 24, 36]), (16, [6, 12, 18])):
        model = _meta("deeplabv3_resnet50", atrous_rates=[6, 12, 18], atrous_rates_at=16, output_stride=stride)
        assert _aspp_dilations(model) == want
        assert effective_atrous_rates("deeplabv3_resnet50", atrous_rates=[6, 12, 18], atrous_rates_at=16,
                                      output_stride=stride) == tuple(want)
    assert _aspp_dilations(_meta("deeplabv3_resnet50", atrous_rates=[3, 6, 9], output_stride=8)) == [3, 6, 9]  # as given
    assert effective_atrous_rates("deeplabv3_resnet50", aspp="cascade", output_stride=16) is None
    assert effective_atrous_rates("deeplabv3_mobilenet_v3_large", atrous_rates=[3, 6, 9], atrous_rates_at=16) == (3, 6, 9)
    assert effective_atrous_rates("fcn8s_vgg16") is None
    # the committed family: torchvision's (12, 24, 36) at OS 8, and (6, 12, 18) once output_stride is overridden to 16
    options = yaml.safe_load((pathlib.Path(__file__).parents[2] / "params.yaml").read_text())["families"]["deeplabv3"]["options"]
    options = {k: v for k, v in options.items() if k != "backbone_weights"}
    assert effective_atrous_rates("deeplabv3_resnet50", **options) == (12, 24, 36)
    assert _aspp_dilations(_meta("deeplabv3_resnet50", **{**options, "output_stride": 16})) == [6, 12, 18]
    # ... and it is torchvision's deeplabv3_resnet50: same state dict, same outputs
    ref = tvs.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=21, aux_loss=True).eval()
    ours = build_model("deeplabv3_resnet50", num_classes=21, **options).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 49, 57)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)["out"], ref(x)["out"], atol=1e-5, rtol=0)


def test_cascade_blocks_use_multi_grid_rates():
    model = _meta("deeplabv3_resnet50", aspp="cascade", output_stride=16)
    layer4 = [unit.conv2.dilation[0] for unit in model.backbone.layer4]
    blocks = [[unit.conv2.dilation[0] for unit in block] for block in list(model.classifier)[:3]]
    assert layer4 == [2, 4, 8]  # block4 rate 2 x multi-grid (1, 2, 4)
    assert blocks == [[4, 8, 16], [8, 16, 32], [16, 32, 64]]
    grid = _meta("deeplabv3_resnet50", aspp="cascade", multi_grid=(1, 2, 1))
    assert [u.conv2.dilation[0] for u in grid.classifier[0]] == [8, 16, 8]
    assert not any(isinstance(m, seg_models.deeplabv3.ASPP) for m in model.modules())


INVALID = [
    ("deeplabv3_resnet50", {"atrous_rates": (6, 12)}, "atrous_rates must be three positive ints, got (6, 12)"),
    ("deeplabv3_resnet50", {"atrous_rates": (0, 12, 24)}, "atrous_rates"),
    ("deeplabv3_mobilenet_v3_large", {"atrous_rates": "6,12,18"}, "atrous_rates"),
    ("deeplabv3_resnet50", {"output_stride": 4}, "output_stride"),
    ("deeplabv3_resnet50", {"aspp": "foo"}, "aspp"),
    ("deeplabv3_resnet50", {"aspp": "cascade", "atrous_rates": (6, 12, 18)}, "atrous_rates"),
    ("deeplabv3_resnet50", {"multi_grid": (1, 2)}, "multi_grid"),
    ("fcn8s_vgg16", {"upsample": "nearest"}, "upsample"),
    ("fcn8s_vgg16", {"upsample": "unpool"}, "upsample 'unpool' needs a feature decoder: set decoder: features"),
    ("fcn16s_vgg16", {"decoder": "unet"}, "decoder must be one of 'none', 'features', got 'unet'"),
    ("fcn_resnet50", {"decoder": "features"}, "unknown option decoder"),
    ("deeplabv3_resnet50", {"image_pooling": "no"}, "image_pooling must be one of True, False, got 'no'"),
    ("deeplabv3_resnet50", {"aspp": "cascade", "image_pooling": False}, "image_pooling applies to aspp='parallel' only"),
    ("deeplabv3_mobilenet_v3_large", {"image_pooling": 0}, "image_pooling"),
    ("deeplabv3_small", {"output_stride": 16}, "output_stride must be one of 8, got 16"),
    ("deeplabv3_small", {"width": 0}, "width must be a positive int, got 0"),
    ("deeplabv3_small", {"aux_loss": True}, "unknown option aux_loss for model 'deeplabv3_small'"),
    ("deeplabv3_small", {"aspp": "cascade"}, "unknown option aspp"),
    ("deeplabv3_small", {"backbone_weights": None}, "backbone_weights"),
    ("deeplabv3_small", {"atrous_rates": (6, 12)}, "atrous_rates must be three positive ints"),
    ("unet_resnet50", {"upsample": "unpool"}, "upsample"),
    ("unet", {"base_channels": 0}, "base_channels"),
    ("fcn_resnet50", {"aux_loss": "yes"}, "aux_loss"),
    ("lraspp_mobilenet_v3_large", {"aux_loss": True}, "aux_loss"),
    ("unet", {"backbone_weights": None}, "backbone_weights"),
    ("unet", {"dropout": 0.1}, "dropout"),
    ("fcn_resnet50", {"backbone_weights": "/nonexistent/resnet50-0676ba61.pth"}, "backbone_weights"),
    ("fcn_resnet50", {"num_classes": 0}, "num_classes"),
    ("deeplabv3_resnet18", {}, "deeplabv3_resnet18"),
]


@pytest.mark.parametrize("name, options, message", INVALID, ids=[f"{n}-{m[:20]}" for n, _, m in INVALID])
def test_invalid_options_raise_value_error_naming_the_option(name, options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build_model(name, **options)


# --------------------------------------------------------------------------- backbone weights
@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory):
    state = tvm.resnet50(weights=None).state_dict()
    path = tmp_path_factory.mktemp("weights") / "rn50.pth"
    torch.save(state, path)
    return path, state


def test_backbone_weights_load_resnet(resnet50_file):
    path, state = resnet50_file
    model = build_model("deeplabv3_resnet50", backbone_weights=str(path))
    assert torch.equal(model.backbone.layer3[2].conv2.weight, state["layer3.2.conv2.weight"])
    assert torch.equal(model.backbone.bn1.running_var, state["bn1.running_var"])
    unet = build_model("unet_resnet50", backbone_weights=path)
    assert torch.equal(unet.encoder.conv1.weight, state["conv1.weight"])


def test_backbone_weights_sha_prefix_and_mismatches(resnet50_file, tmp_path):
    path, state = resnet50_file
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    good = tmp_path / f"resnet50-{digest[:8]}.pth"
    good.symlink_to(path)
    model = build_model("fcn_resnet50", backbone_weights=str(good))  # torchvision name, right hash
    assert torch.equal(model.backbone.conv1.weight, state["conv1.weight"])
    bad_hash = "0676ba61" if not digest.startswith("0676ba61") else "12345678"
    bad = tmp_path / f"resnet50-{bad_hash}.pth"
    bad.symlink_to(path)
    with pytest.raises(ValueError, match="backbone_weights: sha256"):
        build_model("fcn_resnet50", backbone_weights=str(bad))
    with pytest.raises(ValueError, match="backbone_weights: resnet50-.* holds resnet50 weights, .* mobilenet_v3_large"):
        build_model("lraspp_mobilenet_v3_large", backbone_weights=str(good))
    with pytest.raises(ValueError, match="backbone_weights: .* not a torchvision resnet101 state dict"):
        build_model("fcn_resnet101", backbone_weights=str(path))


# --------------------------------------------------------------------------- summary table
def test_model_table_and_format():
    rows = seg_models.model_table(size=64)
    assert [r["name"] for r in rows] == NAMES
    by_name = {r["name"]: r for r in rows}
    lraspp = build_model("lraspp_mobilenet_v3_large").eval()
    assert by_name["lraspp_mobilenet_v3_large"]["params"] == sum(p.numel() for p in lraspp.parameters()) == 3221538
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        lraspp(torch.zeros(1, 3, 64, 64))
    assert by_name["lraspp_mobilenet_v3_large"]["gflops"] == round(counter.get_total_flops() / 1e9, 2) > 0
    assert by_name["unet"]["options"] == ["upsample", "base_channels", "batch_norm"]
    assert all(r["gflops"] > 0 for r in rows)
    text = seg_models.format_table(rows)
    lines = text.splitlines()
    assert len(lines) == len(NAMES) + 2 and len({len(line) for line in lines}) == 1
    assert lines[0].startswith("| model") and all(name in text for name in NAMES)


def test_fcn_vgg_width_and_batch_norm():
    """The CPU-sized VGG FCN: channels scale with width, BN layers appear, output stays at input size."""
    full = build_model("fcn8s_vgg16")
    small = build_model("fcn8s_vgg16", width=0.25, batch_norm=True)
    convs = [m for m in small.backbone.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs][:3] == [16, 16, 32]
    assert any(isinstance(m, nn.BatchNorm2d) for m in small.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in full.modules())
    assert small.score_fr.in_channels == 1024 and small.score_pool["pool4"].in_channels == 128
    assert small(torch.randn(1, 3, 45, 61))["out"].shape == (1, 21, 45, 61)
    for bad in (0, 1.5, "half", True):
        with pytest.raises(ValueError, match="width"):
            build_model("fcn8s_vgg16", width=bad)


# --------------------------------------------------------------------------- DeepLabV3: image pooling, small, ASPP geometry
ASPP_NAMES = [n for n in list_models() if "atrous_rates" in model_info(n)["options"]]


def test_every_model_with_an_aspp_is_a_deeplabv3():
    assert ASPP_NAMES == ["deeplabv3_resnet50", "deeplabv3_resnet101", "deeplabv3_mobilenet_v3_large", "deeplabv3_small"]
    assert all(model_info(n)["family"] == "deeplabv3" for n in ASPP_NAMES)


@pytest.mark.parametrize("name", ASPP_NAMES)
def test_image_pooling_false_drops_the_aspp_pooling_branch(name):
    from seg_models.deeplabv3 import ASPPPooling

    info = model_info(name)
    assert info["options"]["image_pooling"] == [True, False] and info["defaults"]["image_pooling"] is True
    on, off = _meta(name), _meta(name, image_pooling=False)
    assert _meta(name, image_pooling=True).state_dict().keys() == on.state_dict().keys()
    aspp_on, aspp_off = on.classifier[0], off.classifier[0]
    assert len(aspp_on.convs) == 5 and isinstance(aspp_on.convs[4], ASPPPooling)
    assert len(aspp_off.convs) == 4 and not any(isinstance(m, ASPPPooling) for m in off.modules())
    c_in, c = aspp_on.convs[0][0].in_channels, aspp_on.convs[0][0].out_channels
    assert (aspp_on.project[0].in_channels, aspp_off.project[0].in_channels) == (5 * c, 4 * c)
    # exactly the pooling branch (1x1 conv, BN) and its share of the projection
    assert sum(p.numel() for p in on.parameters()) - sum(p.numel() for p in off.parameters()) == c_in * c + 2 * c + c * c
    assert _aspp_dilations(off) == _aspp_dilations(on)


def test_without_image_pooling_far_pixels_no_longer_reach_the_output():
    """At 96 px the small model's rates (12, 24, 36) are 1x1 convs (12 x 12 features): without image
    pooling a pixel's logits see the input only within the receptive field; with it, the whole image."""
    x = torch.randn(1, 3, 96, 96)
    far = x.clone()
    far[..., :16, :16] += 3.0
    for image_pooling, reaches in ((True, True), (False, False)):
        torch.manual_seed(0)
        model = build_model("deeplabv3_small", num_classes=3, image_pooling=image_pooling).eval()
        with torch.no_grad():
            changed = not torch.allclose(model(x)["out"][..., -8:, -8:], model(far)["out"][..., -8:, -8:], atol=1e-6)
        assert changed == reaches, image_pooling


def test_deeplabv3_small_shapes_receptive_field_and_cost():
    info = model_info("deeplabv3_small")
    assert (info["family"], info["backbone"]) == ("deeplabv3", None)
    assert list(info["options"]) == ["width", "output_stride", "atrous_rates", "atrous_rates_at", "image_pooling"]
    assert info["defaults"]["width"] == 32 and info["options"]["output_stride"] == [8]
    model = build_model("deeplabv3_small").eval()
    assert sum(p.numel() for p in model.parameters()) == 575349
    assert _aspp_dilations(model) == [12, 24, 36]  # the paper's at output stride 8
    assert model.classifier[0].convs[0][0].out_channels == 64 and model.classifier[-1].in_channels == 64  # 2 x width
    with torch.no_grad():
        assert model.backbone(torch.zeros(2, 3, 70, 90))["out"].shape == (2, 128, 9, 12)  # 4 x width, ceil(side / 8)
        assert model(torch.zeros(2, 3, 70, 90))["out"].shape == (2, 21, 70, 90)
    # receptive field of one feature cell: 39 x 39 input pixels (the docstring's)
    x = torch.randn(1, 3, 128, 128, requires_grad=True)
    model.backbone(x)["out"][0, :, 8, 8].sum().backward()
    rows, cols = (x.grad[0].abs().sum(0) > 0).nonzero(as_tuple=True)
    assert (int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1) == (39, 39)
    assert _aspp_dilations(_meta("deeplabv3_small", atrous_rates=[6, 12, 18], atrous_rates_at=16)) == [12, 24, 36]
    assert _aspp_dilations(_meta("deeplabv3_small", width=8, atrous_rates=[1, 2, 3])) == [1, 2, 3]
    # CPU-sized: a forward pass of batch 8 at 96 px is under 2 GFLOPs (FlopCounterMode: multiply-add = 2)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        _meta("deeplabv3_small")(torch.zeros(8, 3, 96, 96, device="meta"))
    assert 1.0e9 < counter.get_total_flops() < 2.0e9


def test_deeplabv3_small_learns_on_cpu():
    from tests.support.models import toy_scenes

    x, y = toy_scenes(8, size=64)
    model = build_model("deeplabv3_small", num_classes=3, atrous_rates=(1, 2, 3)).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(x)["out"], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3]), losses


@pytest.mark.parametrize("name", ASPP_NAMES)
def test_aspp_feature_size_matches_a_forward_pass(name):
    """feature_size = ceil(crop / output_stride), checked against the backbone on the meta device."""
    strides = model_info(name)["options"].get("output_stride")
    for stride in strides or [None]:
        options = {"output_stride": stride} if stride else {}
        backbone = _meta(name, **options).backbone
        for crop in (32, 64, 96, 97, 130, 513):
            geometry = seg_models.aspp_geometry(name, crop, **options)
            side = backbone(torch.zeros(1, 3, crop, crop, device="meta"))["out"].shape[-1]
            assert geometry["feature_size"] == side, (name, stride, crop)


def test_aspp_geometry_known_answers():
    from seg_models import aspp_geometry

    mobile = aspp_geometry("deeplabv3_mobilenet_v3_large", 96)
    assert (mobile["output_stride"], mobile["feature_size"], mobile["rates"]) == (16, 6, (12, 24, 36))
    assert mobile["branches"] == [{"rate": 12, "field_px": 400, "degenerate": True},
                                  {"rate": 24, "field_px": 784, "degenerate": True},
                                  {"rate": 36, "field_px": 1168, "degenerate": True}]
    paper = aspp_geometry("deeplabv3_mobilenet_v3_large", 96, atrous_rates=[6, 12, 18])
    assert paper["rates"] == (6, 12, 18) and all(b["degenerate"] for b in paper["branches"])  # 6 >= 6
    resnet = aspp_geometry("deeplabv3_resnet50", 513, atrous_rates=(12, 24, 36), output_stride=8)
    assert (resnet["feature_size"], resnet["output_stride"], resnet["image_pooling"]) == (65, 8, True)
    assert [(b["field_px"], b["degenerate"]) for b in resnet["branches"]] == [(200, False), (392, False), (584, False)]
    scaled = aspp_geometry("deeplabv3_resnet50", 513, atrous_rates=(6, 12, 18), atrous_rates_at=16, output_stride=16)
    assert (scaled["feature_size"], scaled["rates"]) == (33, (6, 12, 18))
    assert [b["degenerate"] for b in aspp_geometry("deeplabv3_resnet50", 96, atrous_rates=(3, 11, 12))["branches"]] == [
        False, False, True]  # 12 x 12 features: rate 11 still reaches a neighbour cell, 12 does not
    assert aspp_geometry("deeplabv3_small", 64, image_pooling=False)["image_pooling"] is False
    for name, options in (("deeplabv3_resnet50", {"aspp": "cascade"}), ("fcn8s_vgg16", {}), ("lraspp_mobilenet_v3_large", {})):
        assert aspp_geometry(name, 96, **options) is None
    for bad, message in (({"atrous_rates": (6, 12)}, "atrous_rates"), ({"dropout": 0.1}, "unknown option dropout")):
        with pytest.raises(ValueError, match=message):
            aspp_geometry("deeplabv3_resnet50", 96, **bad)
    with pytest.raises(ValueError, match="crop_size"):
        aspp_geometry("deeplabv3_resnet50", 0)


def test_aspp_signature_equal_iff_same_computation():
    from seg_models import aspp_signature as sig

    m = "deeplabv3_mobilenet_v3_large"
    assert sig(m, 96, atrous_rates=(6, 12, 18)) == sig(m, 96, atrous_rates=[12, 24, 36]) == sig(m, 96)  # all 1x1
    assert sig(m, 96, atrous_rates=(6, 12, 18), atrous_rates_at=16) == sig(m, 96, atrous_rates=(6, 12, 18))
    assert sig(m, 96, atrous_rates=(3, 6, 9)) != sig(m, 96) != sig(m, 96, atrous_rates=(1, 6, 12))
    assert sig(m, 96, atrous_rates=(3, 6, 9)) == sig(m, 96, atrous_rates=(3, 7, 40)) != sig(m, 96, atrous_rates=(4, 6, 9))
    assert sig(m, 513, atrous_rates=(6, 12, 18)) != sig(m, 513)  # at 513 px (33 x 33) none is degenerate
    assert sig(m, 96, image_pooling=False) != sig(m, 96) == sig(m, 96, image_pooling=True, aux_loss=False)
    assert sig(m, 96, aux_loss=True) != sig(m, 96)
    r = "deeplabv3_resnet50"
    assert sig(r, 513, atrous_rates=(6, 12, 18), atrous_rates_at=16) == sig(r, 513, atrous_rates=(12, 24, 36)) == sig(r, 513)
    assert sig(r, 96, output_stride=16) != sig(r, 96)  # another backbone, though every rate is 1x1 at both
    assert sig(r, 96, aspp="cascade") == sig(r, 96, aspp="cascade", multi_grid=[1, 2, 4], atrous_rates_at=16)
    assert sig(r, 96, aspp="cascade") != sig(r, 96, aspp="cascade", multi_grid=(1, 2, 1))
    assert sig("fcn8s_vgg16", 96) == sig("fcn8s_vgg16", 96, decoder="none") != sig("fcn8s_vgg16", 96, upsample="transposed")
    assert len({sig(m, 96, atrous_rates=r) for r in [(6, 12, 18), (12, 24, 36), (3, 6, 9), (1, 6, 12)]}) == 3  # hashable


def test_degenerate_rates_are_the_same_computation():
    """Two sets of rates with one signature give the same outputs and gradients; with another, not."""
    from seg_models import aspp_signature

    def run(rates, size):
        torch.manual_seed(0)
        model = build_model("deeplabv3_small", num_classes=3, width=8, atrous_rates=rates)
        out = model(torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1)))["out"]
        out.square().mean().backward()
        return out.detach(), model.classifier[0].project[0].weight.grad

    for size, same in ((96, True), (160, False)):  # 12 x 12 features: 12 and 13 are 1x1; 20 x 20: neither
        assert (aspp_signature("deeplabv3_small", size, atrous_rates=(12, 24, 36))
                == aspp_signature("deeplabv3_small", size, atrous_rates=(13, 30, 50))) == same
        (out_a, grad_a), (out_b, grad_b) = run((12, 24, 36), size), run((13, 30, 50), size)
        assert (torch.allclose(out_a, out_b, atol=1e-5) and torch.allclose(grad_a, grad_b, atol=1e-5)) == same


def test_aspp_lines_and_the_models_crop_option(monkeypatch, capsys):
    import argparse

    from pipeline.errors import UserError
    from pipeline.stages import models as stage
    from seg_models import summary

    lines = summary.aspp_lines(96)
    at = lines.index("deeplabv3_mobilenet_v3_large, output stride 16: feature map 6 x 6, 1x1 branch 16 px, image pooling on")
    assert lines[at + 1:at + 4] == ["  rate 12: field 400 px = 1x1 conv at this crop",
                                    "  rate 24: field 784 px = 1x1 conv at this crop",
                                    "  rate 36: field 1168 px = 1x1 conv at this crop"]
    big = summary.aspp_lines(513)
    at = big.index("deeplabv3_resnet50, output stride 8: feature map 65 x 65, 1x1 branch 8 px, image pooling on")
    assert big[at + 1:at + 4] == ["  rate 12: field 200 px", "  rate 24: field 392 px", "  rate 36: field 584 px"]
    assert len(lines) == 1 + 4 * 6  # resnet50/101 at output stride 8 and 16, mobilenet, small
    parser = argparse.ArgumentParser()
    stage.add_arguments(parser)
    monkeypatch.setattr(summary, "model_table", lambda size: [])  # the table itself is test_model_table_and_format's
    assert stage.run(None, parser.parse_args(["--crop", "96"])) == 0
    out = capsys.readouterr().out
    assert "feature map 12 x 12" in out and out.count("= 1x1 conv at this crop") == 18
    assert stage.run(None, parser.parse_args([])) == 0 and "ASPP" not in capsys.readouterr().out
    # the line `segpipe train` prints for the model it trains (None without an ASPP)
    assert summary.aspp_note("deeplabv3_small", 128, {"atrous_rates": [1, 16, 6], "image_pooling": False}) == (
        "ASPP at a 128 px crop, output stride 8: feature map 16 x 16; rate 1: field 24 px, rate 16: field 264 px "
        "= 1x1 conv at this crop, rate 6: field 104 px; image pooling off")
    assert summary.aspp_note("unet", 128) is None and summary.aspp_note("deeplabv3_resnet50", 64, {"aspp": "cascade"}) is None
    with pytest.raises(UserError, match="--crop"):
        stage.run(None, parser.parse_args(["--crop", "0"]))


@pytest.mark.parametrize("name", list_models())
def test_class_scores_are_fp32_under_autocast(name):
    """Every layer that outputs class scores (ScoreConv2d, FCN's score upsampling, the final resize)
    runs in fp32 outside autocast: the logits are fp32 under bf16 autocast, and random-init logits
    hold no exact ties between the top two classes (bf16 rounding made 0.77% of the pixels ties,
    which the argmax then broke by class index)."""
    from seg_models._utils import ScoreConv2d

    torch.manual_seed(0)
    model = build_model(name, num_classes=21, **({"aux_loss": True} if "aux_loss" in model_info(name)["options"] else {}))
    model.eval()
    assert any(isinstance(m, ScoreConv2d) for m in model.modules())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 64, 64))
    for key, logits in out.items():
        assert logits.dtype == torch.float32, (key, logits.dtype)
    top2 = out["out"].topk(2, dim=1).values
    assert not (top2[:, 0] == top2[:, 1]).any()
