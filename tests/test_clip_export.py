"""CLIP student export (``run.py export`` of PromptDistillationModule / PromptTuningModule checkpoints) and pure
16-bit CLIP runs, on tiny open_clip models with fixed random weights (local files) and a generated CoOp dataset:
ONNX against PyTorch with onnxruntime, the exported classifier against the module's evaluation logits, open
vocabulary class vectors, bf16-true/16-true fit -> test -> export, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer

from abkd_vision.clip_export import _load_clip_images, clip_module_from_checkpoint
from abkd_vision.data import BaseToNewDataModule
from abkd_vision.data.synthetic import write_fake_coop_dataset
from abkd_vision.export import main as export_main
from abkd_vision.export import read_checkpoint
from abkd_vision.lit import PromptDistillationModule, PromptTuningModule
from abkd_vision.models.clip import PromptedCLIP, build_clip, load_clip_classifier, prompt_parameters

ort = pytest.importorskip("onnxruntime")

TINY = "abkd-tiny-vit-quickgelu"
TINY_LARGE = "abkd-tiny-vit-large-quickgelu"
REPEATS = ["--latency-repeats", "2"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A generated EuroSAT, fixed random CLIP weights as local files, random teacher prompts as a checkpoint."""
    root = tmp_path_factory.mktemp("clip_export")
    write_fake_coop_dataset(root / "data", "EuroSAT", num_classes=10, train_per_class=2, test_per_class=2,
                            val_per_class=1, image_size=32, seed=0)
    torch.manual_seed(0)
    torch.save(build_clip(TINY, None).state_dict(), root / "student.pt")
    torch.save(build_clip(TINY_LARGE, None).state_dict(), root / "teacher.pt")
    teacher = PromptedCLIP(TINY_LARGE, str(root / "teacher.pt"), text_depth=3, vision_depth=3)
    with torch.no_grad():
        for _, p in prompt_parameters(teacher):
            p.normal_(0, 0.5)
    torch.save({"state_dict": {f"model.{k}": p.detach() for k, p in prompt_parameters(teacher)}},
               root / "prompts.ckpt")
    return {"root": root, "data": root / "data", "student": str(root / "student.pt"),
            "teacher": str(root / "teacher.pt"), "prompts": str(root / "prompts.ckpt")}


def _data(world, train_classes: str = "all") -> BaseToNewDataModule:
    return BaseToNewDataModule("EuroSAT", root=str(world["data"]), train_classes=train_classes, image_size=32,
                               batch_size=8, eval_batch_size=16, num_workers=0)


def _trainer(root: Path, precision: str = "32-true", train_batches: int = 2) -> Trainer:
    return Trainer(accelerator="cpu", precision=precision, max_epochs=1, limit_train_batches=train_batches,
                   limit_val_batches=1, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root))


def _distiller(world, teacher_ckpt: str, evaluate_teacher: bool = False) -> PromptDistillationModule:
    return PromptDistillationModule(student_arch=TINY, student_pretrained=world["student"], student_vision_depth=3,
                                    teacher_arch=TINY_LARGE, teacher_pretrained=world["teacher"],
                                    teacher_ckpt=teacher_ckpt, teacher_text_depth=3, teacher_vision_depth=3,
                                    evaluate_teacher=evaluate_teacher, lr=0.05, warmup_epochs=0)


@pytest.fixture(scope="module")
def distilled(world) -> dict:
    """A student distilled for 2 steps (prompts, projector and its BatchNorm statistics move); its checkpoint."""
    torch.manual_seed(1)
    module = _distiller(world, world["prompts"])
    trainer = _trainer(world["root"])
    trainer.fit(module, datamodule=_data(world))
    ckpt = world["root"] / "student.ckpt"
    trainer.save_checkpoint(ckpt)
    return {"module": module.eval(), "ckpt": ckpt}


def _images(world) -> torch.Tensor:
    return _load_clip_images(world["data"], 32, limit=12)


def test_student_export_is_faithful_and_equals_the_modules_evaluation(world, distilled, tmp_path, capsys):
    out = tmp_path / "out"
    assert export_main(["--ckpt", str(distilled["ckpt"]), "--out", str(out), "--images", str(world["data"]),
                        *REPEATS]) == 0
    printed = capsys.readouterr().out
    assert "5 base, 5 new" in printed and "image + text towers" in printed
    report = json.loads((out / "export.json").read_text())
    assert report["module"] == "PromptDistillationModule" and report["checked_on"].endswith("real images")
    assert report["onnx_max_abs_diff"] <= 1e-4
    assert report["classifier"]["projector"] == [32, 48] and report["class_vectors"] == [10, 48]
    for side in ("latency_cpu", "teacher_latency_cpu"):
        assert all(report[side][f"torch_ms_batch{b}"] > 0 for b in (1, 8))
    assert report["latency_cpu"]["onnxruntime_ms_batch8"] > 0 and report["teacher_parameters"] > report["parameters"]

    # the plain state dict loads without the teacher and is PromptDistillationModule's evaluation, base and new
    module = distilled["module"]
    classifier, classes = load_clip_classifier(out)
    assert [c["name"] for c in classes] == module.class_names
    assert [c["group"] for c in classes] == ["base"] * 5 + ["new"] * 5
    assert report["parameters"] == sum(p.numel() for p in classifier.parameters())
    images = _images(world)
    with torch.no_grad():
        logits = classifier(images)
        torch.testing.assert_close(logits[:, :5], module.eval_logits(images, "base"), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits[:, 5:], module.eval_logits(images, "new"), atol=1e-5, rtol=1e-5)
    # the ONNX model at another batch size (dynamic batch) against PyTorch
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": images[:5].numpy()})[0]
    assert got.shape == (5, 10) and np.abs(got - logits[:5].numpy()).max() <= 1e-4


def _fit(world, module, precision: str, train_classes: str, name: str, test: bool = False) -> Path:
    trainer = _trainer(world["root"] / name, precision, train_batches=1)
    data = _data(world, train_classes)
    trainer.fit(module, datamodule=data)
    if test:
        trainer.test(module, datamodule=data)
    ckpt = world["root"] / f"{name}.ckpt"
    trainer.save_checkpoint(ckpt)
    return ckpt


@pytest.mark.parametrize("precision,dtype", [("bf16-true", torch.bfloat16), ("16-true", torch.float16)])
def test_pure_16_bit_teacher_zero_shot_student_and_export(world, tmp_path, precision, dtype):
    """bf16-true / 16-true: the teacher prompt-tunes (and validates), zero-shot CLIP tests, the student distils
    from that teacher and tests, all in one dtype with finite fp32 losses; and their checkpoints export (bf16: the
    student with open-vocabulary classes; fp16: the teacher with its new classes only)."""
    torch.manual_seed(2)
    teacher = PromptTuningModule(TINY_LARGE, world["teacher"], text_depth=3, vision_depth=3, lr=0.05,
                                 scl_image_weight=1.0, scl_text_weight=1.0, scl_logits_weight=1.0)
    teacher_ckpt = _fit(world, teacher, precision, "base", f"teacher-{precision}")
    assert teacher.model.dtype == dtype and np.isfinite(teacher.history[-1]["hm"])
    zero_shot = PromptTuningModule(TINY, world["student"], learn_ctx=False, text_depth=0, vision_depth=0)
    _trainer(world["root"] / "zs", precision).test(zero_shot, datamodule=_data(world))
    assert zero_shot.model.dtype == dtype and 0 <= zero_shot.summary()["test"]["hm"] <= 1

    student = _distiller(world, str(teacher_ckpt), evaluate_teacher=True)
    losses = []
    student.training_step = _recording(student.training_step, losses)
    student_ckpt = _fit(world, student, precision, "all", f"student-{precision}", test=True)
    assert student.student.dtype == dtype and student.student.visual.conv1.weight.dtype == dtype
    assert losses and all(loss.dtype == torch.float32 and torch.isfinite(loss) for loss in losses)
    assert 0 <= student.summary()["test"]["hm"] <= 1 and 0 <= student.teacher_result["hm"] <= 1

    out = tmp_path / "out"
    images = _images(world)
    if precision == "bf16-true":
        # open vocabulary: names the teacher never trained on get the teacher's prompted text features now
        names = ["hot air balloon", "Forest", "snow leopard"]  # "Forest" is one of EuroSAT's base classes
        (tmp_path / "classes.txt").write_text("\n".join(names) + "\n")
        assert export_main(["--ckpt", str(student_ckpt), "--out", str(out), "--images", str(world["data"]),
                            "--classes", str(tmp_path / "classes.txt"), *REPEATS]) == 0
        classifier, classes = load_clip_classifier(out)
        assert [(c["name"], c["group"]) for c in classes] == [(names[0], "other"), ("Forest", "base"),
                                                               (names[2], "other")]
        module = clip_module_from_checkpoint(student_ckpt, read_checkpoint(student_ckpt))
        with torch.no_grad():
            text = module.teacher.model.encode_text(names)
            expected = module.student.logit_scale() * module.student.encode_image(images) @ text.t()
            torch.testing.assert_close(classifier(images), expected, atol=1e-5, rtol=1e-5)
    else:
        assert export_main(["--ckpt", str(teacher_ckpt), "--out", str(out), "--images", str(world["data"]),
                            "--new-only", *REPEATS]) == 0
        classifier, classes = load_clip_classifier(out)
        assert len(classes) == 5 and {c["group"] for c in classes} == {"new"}
        module = clip_module_from_checkpoint(teacher_ckpt, read_checkpoint(teacher_ckpt))
        with torch.no_grad():
            torch.testing.assert_close(classifier(images), module.eval_logits(images, "new"), atol=1e-5, rtol=1e-5)
    report = json.loads((out / "export.json").read_text())
    assert report["checkpoint_dtype"] == str(dtype).replace("torch.", "") and report["onnx_max_abs_diff"] <= 1e-4


def _recording(step, losses: list):
    def run(*args, **kwargs):
        loss = step(*args, **kwargs)
        losses.append(loss.detach())
        return loss
    return run


# ----------------------------------------------------------------------------------------------- bad input
def test_export_of_an_unsupported_checkpoint_names_the_supported_modules(tmp_path, capsys):
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hyper_parameters": {"backbone": "x"}}, tmp_path / "x.ckpt")
    assert export_main(["--ckpt", str(tmp_path / "x.ckpt"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "DistillationModule and ClassifierModule (CIFAR zoo), PromptDistillationModule and PromptTuningModule" in err


def test_class_lists_with_empty_or_duplicate_names_are_errors_listing_them(distilled, tmp_path, capsys):
    bad = tmp_path / "classes.txt"
    bad.write_text("red fox\n\nbarn owl\nRed  Fox\nbarn_owl\n")
    assert export_main(["--ckpt", str(distilled["ckpt"]), "--out", str(tmp_path / "o"), "--classes", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "empty names at line 2" in err
    assert "'red fox' (line 1) and 'Red  Fox' (line 4)" in err and "'barn owl' (line 3) and 'barn_owl' (line 5)" in err
    assert not (tmp_path / "o").exists()


def test_an_exported_custom_architecture_rebuilds_without_its_config_file(tmp_path):
    """The classifier's layout carries the open_clip model config, so a classifier of a custom architecture
    (trained from a JSON file) rebuilds where that file and its name are unknown."""
    import open_clip

    from abkd_vision.models.clip import CLIPImageClassifier, PromptedImageStudent

    cfg = {**open_clip.get_model_config(TINY)}
    (tmp_path / "abkd-test-export-vit.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    student = PromptedImageStudent(str(tmp_path / "abkd-test-export-vit.json"), None, 48, vision_depth=2).eval()
    classifier = CLIPImageClassifier.from_student(student, torch.randn(3, 48))
    layout = classifier.config()
    assert layout["open_clip_name"] == "abkd-test-export-vit" and layout["model_config"] == cfg
    assert (layout["vision_tokens"], layout["vision_depth"], layout["projector"]) == (4, 2, [32, 48])
    layout = {**layout, "arch": "/elsewhere/gone.json", "open_clip_name": "abkd-test-export-vit-moved"}
    rebuilt = CLIPImageClassifier.from_config(layout)
    rebuilt.load_state_dict(classifier.state_dict())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(images), classifier(images))
        torch.testing.assert_close(classifier(images), student(images, classifier.text_features), rtol=0, atol=0)
