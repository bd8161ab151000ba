"""CIFAR model zoo: timm registration, exact RepDistiller/mdistiller layouts, and checkpoint loading."""

import argparse
import functools
import json
import logging
import warnings
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from abkd_vision.models import (
    CheckpointError,
    create_model,
    list_models,
    load_checkpoint,
    model_name_from_teacher_path,
)

FIXTURE = Path(__file__).parent / "fixtures" / "cifar_layout.json"

# published name -> (registered name, parameters at 100 classes)
MODELS = {
    "resnet8": ("cifar_resnet8", 83_892),
    "resnet14": ("cifar_resnet14", 181_108),
    "resnet20": ("cifar_resnet20", 278_324),
    "resnet32": ("cifar_resnet32", 472_756),
    "resnet44": ("cifar_resnet44", 667_188),
    "resnet56": ("cifar_resnet56", 861_620),
    "resnet110": ("cifar_resnet110", 1_736_564),
    "resnet8x4": ("cifar_resnet8x4", 1_233_540),
    "resnet32x4": ("cifar_resnet32x4", 7_433_860),
    "wrn_16_1": ("cifar_wrn_16_1", 180_916),
    "wrn_16_2": ("cifar_wrn_16_2", 703_284),
    "wrn_40_1": ("cifar_wrn_40_1", 569_780),
    "wrn_40_2": ("cifar_wrn_40_2", 2_255_156),
    "vgg8": ("cifar_vgg8", 3_965_028),
    "vgg11": ("cifar_vgg11", 9_277_284),
    "vgg13": ("cifar_vgg13", 9_462_180),
    "vgg16": ("cifar_vgg16", 14_774_436),
    "vgg19": ("cifar_vgg19", 20_086_692),
    "ResNet18": ("cifar_resnet18", 11_220_132),
    "ResNet50": ("cifar_resnet50", 23_705_252),
    "MobileNetV2": ("cifar_mobilenetv2", 812_836),
    "ShuffleV1": ("cifar_shufflev1", 949_258),
    "ShuffleV2": ("cifar_shufflev2", 1_355_528),
}
REGISTERED = {reg: (pub, n) for pub, (reg, n) in MODELS.items()}
TEACHERS = ["wrn_40_2", "resnet56", "resnet110", "resnet32x4", "vgg13", "ResNet50"]
CLASSIFIER = {"CifarResNet": "fc", "WideResNet": "fc", "CifarVGG": "classifier",
              "CifarMobileNetV2": "classifier.0", "CifarResNetV2": "linear",
              "CifarShuffleNetV1": "linear", "CifarShuffleNetV2": "linear"}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@functools.lru_cache(maxsize=None)
def cached(name: str) -> nn.Module:
    """One eval-mode instance per registered model, shared by the read-only tests."""
    return timm.create_model(name, num_classes=100).eval()


@functools.lru_cache(maxsize=1)
def layouts() -> dict:
    return json.loads(FIXTURE.read_text())


def randomize_buffers(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-default BN statistics, so that a load that silently skipped buffers would change the outputs."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            m.num_batches_tracked.fill_(7)
    return model


def logits(model: nn.Module, seed: int = 1) -> torch.Tensor:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(x)


# --------------------------------------------------------------------------------------------- registry


def test_registry_lists_exactly_the_zoo():
    assert set(list_models()) == set(REGISTERED)
    assert list_models().index("cifar_resnet8") < list_models().index("cifar_resnet110")  # natural order


@pytest.mark.parametrize("name", sorted(REGISTERED))
def test_parameter_count_via_timm_and_alias(name):
    published, expected = REGISTERED[name]
    assert n_params(cached(name)) == expected
    assert n_params(create_model(published)) == expected
    assert n_params(create_model(name, num_classes=100)) == expected


@pytest.mark.parametrize("name", sorted(REGISTERED))
def test_forward_and_feature_api(name):
    model = cached(name)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
        final, inter = model.forward_intermediates(x)
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
    assert out.shape == (2, 100)
    assert pooled.shape == (2, model.num_features)
    torch.testing.assert_close(model.forward_head(feats), out)
    torch.testing.assert_close(final, feats)
    assert [t.shape[1] for t in inter] == [info["num_chs"] for info in model.feature_info]
    assert [32 // t.shape[-1] for t in inter] == [info["reduction"] for info in model.feature_info]
    assert len(last_two) == 2 and torch.equal(last_two[-1], inter[-1])
    assert model.get_classifier() is model.get_submodule(CLASSIFIER[type(model).__name__].split(".")[0])


@pytest.mark.parametrize("published", sorted(MODELS))
def test_state_dict_layout_matches_reference(published):
    expected = [(k, tuple(shape)) for k, shape in layouts()[published]]
    got = [(k, tuple(v.shape)) for k, v in cached(MODELS[published][0]).state_dict().items()]
    assert got == expected


def test_fixture_covers_every_model():
    assert set(layouts()) == set(MODELS)


@pytest.mark.parametrize("name", ["cifar_resnet8", "cifar_wrn_16_1", "cifar_vgg8", "cifar_mobilenetv2"])
def test_pretrained_cfg_and_silent_build(name, caplog):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with caplog.at_level(logging.WARNING):
            model = timm.create_model(name, pretrained=False)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    cfg = model.pretrained_cfg
    assert cfg["num_classes"] == 100 and model.num_classes == 100
    assert tuple(cfg["input_size"]) == (3, 32, 32)
    assert tuple(cfg["mean"]) == (0.5071, 0.4867, 0.4408) and tuple(cfg["std"]) == (0.2675, 0.2565, 0.2761)
    assert "url" not in cfg or not cfg["url"]
    assert isinstance(model.get_submodule(cfg["classifier"]), nn.Linear)
    assert isinstance(model.get_submodule(cfg["first_conv"]), nn.Conv2d)


def test_reset_classifier_and_num_classes():
    model = create_model("resnet8x4", num_classes=10)
    assert logits(model).shape == (2, 10)
    model.reset_classifier(7)
    assert logits(model).shape == (2, 7)
    model.reset_classifier(0)
    assert logits(model).shape == (2, model.num_features)


def test_timm_features_only():
    model = timm.create_model("cifar_resnet8x4", features_only=True).eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 32, 32))
    assert [tuple(f.shape[1:]) for f in feats] == [(32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8)]


# ----------------------------------------------------------------------------------------------- names


def test_unknown_model_lists_choices():
    with pytest.raises(ValueError) as err:
        create_model("resnet9000")
    assert "resnet9000" in str(err.value)
    assert "cifar_resnet8x4" in str(err.value) and "wrn_40_2" in str(err.value)


@pytest.mark.parametrize("published", TEACHERS)
def test_model_name_from_teacher_path(published):
    path = f"/data/cifar_teachers/{published}_vanilla/ckpt_epoch_240.pth"
    assert model_name_from_teacher_path(path) == MODELS[published][0]
    assert model_name_from_teacher_path(Path(path)) == MODELS[published][0]


def test_model_name_from_teacher_path_prefers_longest_name():
    assert model_name_from_teacher_path("resnet32x4_vanilla/ckpt_epoch_240.pth") == "cifar_resnet32x4"
    assert model_name_from_teacher_path("resnet32_vanilla/ckpt_epoch_240.pth") == "cifar_resnet32"
    with pytest.raises(ValueError, match="Cannot infer"):
        model_name_from_teacher_path("densenet_vanilla/ckpt_epoch_240.pth")


# ------------------------------------------------------------------------------------------ checkpoints


def published_checkpoint(model: nn.Module) -> dict:
    return {
        "epoch": 240,
        "model": model.state_dict(),
        "accuracy": 75.61,
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.05, "momentum": 0.9, "params": [0, 1, 2]}]},
    }


@pytest.mark.parametrize("published", TEACHERS)
def test_published_teacher_checkpoint_roundtrip(published, tmp_path):
    source = randomize_buffers(create_model(published))
    path = tmp_path / f"{published}_vanilla" / "ckpt_epoch_240.pth"
    path.parent.mkdir()
    # As released: PyTorch 1.x legacy (non-zip) serialization, accuracy stored as a 0-d tensor.
    ckpt = published_checkpoint(source) | {"accuracy": torch.tensor(75.61)}
    torch.save(ckpt, path, _use_new_zipfile_serialization=False)

    target = create_model(model_name_from_teacher_path(path))
    meta = load_checkpoint(target, path)
    assert meta == {"epoch": 240, "accuracy": pytest.approx(75.61)}
    assert torch.equal(logits(target), logits(source))


@pytest.fixture(scope="module")
def resnet8_source() -> nn.Module:
    return randomize_buffers(create_model("resnet8"), seed=3)


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda sd: sd, id="raw"),
        pytest.param(lambda sd: {f"module.{k}": v for k, v in sd.items()}, id="dataparallel"),
        pytest.param(lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()}, id="compiled"),
        pytest.param(lambda sd: {"state_dict": {f"student.{k}": v for k, v in sd.items()}
                                 | {"teacher.fc.weight": torch.zeros(3)}, "epoch": 3}, id="lightning-student"),
        pytest.param(lambda sd: {"state_dict": {f"model._orig_mod.{k}": v for k, v in sd.items()},
                                 "epoch": 3}, id="lightning-model-compiled"),
        pytest.param(lambda sd: {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")},
                     id="no-bn-counters"),
    ],
)
def test_checkpoint_layouts_load(wrap, resnet8_source, tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(resnet8_source.state_dict()), path)
    target = create_model("resnet8")
    meta = load_checkpoint(target, path)
    assert meta in ({}, {"epoch": 3})
    assert torch.equal(logits(target), logits(resnet8_source))


def test_create_model_with_checkpoint_path(resnet8_source, tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save(published_checkpoint(resnet8_source), path)
    model = create_model("cifar_resnet8", checkpoint_path=path)
    assert torch.equal(logits(model), logits(resnet8_source))
    assert load_checkpoint(create_model("resnet8"), path) == {"epoch": 240, "accuracy": 75.61}


def test_wrong_depth_lists_missing_keys(tmp_path):
    path = tmp_path / "resnet20_vanilla" / "ckpt_epoch_240.pth"
    path.parent.mkdir()
    torch.save(published_checkpoint(create_model("resnet20")), path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(create_model("resnet32"), path)
    msg = str(err.value)
    assert str(path) in msg
    assert "missing keys" in msg and "layer1.3.conv1.weight" in msg


def test_wrong_width_lists_missing_unexpected_and_shapes(tmp_path):
    path = tmp_path / "ckpt.pth"
    sd = create_model("resnet8").state_dict()
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(create_model("resnet8x4"), path)
    msg = str(err.value)
    assert str(path) in msg
    assert "layer1.0.downsample.0.weight" in msg  # missing
    assert "unexpected keys (1): extra.weight" in msg
    assert "conv1.weight: checkpoint [16, 3, 3, 3] vs model [32, 3, 3, 3]" in msg


def test_ambiguous_prefix_is_refused(resnet8_source, tmp_path):
    sd = resnet8_source.state_dict()
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {f"{p}{k}": v for k, v in sd.items() for p in ("model.", "student.")}}, path)
    with pytest.raises(CheckpointError, match="Ambiguous"):
        load_checkpoint(create_model("resnet8"), path)


def test_python_objects_need_trusted(resnet8_source, tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"model": resnet8_source.state_dict(), "args": argparse.Namespace(lr=0.05)}, path)
    with pytest.raises(CheckpointError, match="trusted=True"):
        load_checkpoint(create_model("resnet8"), path)
    target = create_model("resnet8")
    meta = load_checkpoint(target, path, trusted=True)
    assert meta["args"].lr == 0.05
    assert torch.equal(logits(target), logits(resnet8_source))


def test_missing_file_and_no_state_dict(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(create_model("resnet8"), missing)
    path = tmp_path / "empty.pth"
    torch.save({"epoch": 1}, path)
    with pytest.raises(CheckpointError, match="No state dict"):
        load_checkpoint(create_model("resnet8"), path)
