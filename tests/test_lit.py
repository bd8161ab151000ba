"""Lightning modules and the CLI end to end: teacher -> student, frozen teacher, checkpoints, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_image_folder
from lightning.pytorch import Callback, Trainer

from abkd_vision.cli import main as cli_main
from abkd_vision.data import ImageFolderDataModule, export_npz_cifar
from abkd_vision.heads import DKD, KD
from abkd_vision.lit import ClassifierModule, DistillationModule
from abkd_vision.losses import AlphaBetaDivergence
from abkd_vision.models import create_model

SHARED_CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """Three classes of 16x16 images separable by brightness and colour."""
    return tiny_image_folder(tmp_path_factory.mktemp("tiny"), 48, 24, noise=40, boost=200)


def _config(tmp_path: Path, data: Path, model: dict, name: str) -> Path:
    cfg = {
        "trainer": {"accelerator": "cpu", "max_epochs": 1, "limit_train_batches": 3,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(tmp_path / "runs"), "name": name, "version": 0}}},
        "model": model,
        "data": {"class_path": "abkd_vision.data.ImageFolderDataModule",
                 "init_args": {"root": str(data), "image_size": 16, "batch_size": 8, "num_workers": 0}},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def test_cli_teacher_then_student(tmp_path, tiny_data):
    teacher_cfg = _config(tmp_path, tiny_data, {"class_path": "abkd_vision.lit.ClassifierModule",
                                                "init_args": {"model": "resnet8"}}, "teacher")
    # fast_dev_run first: one batch of each loop through the real CLI
    cli_main(["fit", "--config", str(teacher_cfg), "--trainer.fast_dev_run", "true", *QUIET])
    # then a few real batches that write a checkpoint, results.json, config.yaml and versions.json
    cli_main(["fit", "--config", str(teacher_cfg), *QUIET])
    run = tmp_path / "runs" / "teacher" / "version_0"
    for name in ("config.yaml", "versions.json", "results.json", "checkpoints"):
        assert (run / name).exists(), name
    versions = json.loads((run / "versions.json").read_text())
    assert versions["torch"].split("+")[0] == torch.__version__.split("+")[0] and versions["lightning"]
    teacher_ckpt = next((run / "checkpoints").glob("*.ckpt"))

    student_model = {
        "class_path": "abkd_vision.lit.DistillationModule",
        "init_args": {
            "student": "resnet8", "teacher": "resnet8", "teacher_ckpt": str(teacher_ckpt), "kd_weight": 2.0,
            "head": {"class_path": "abkd_vision.heads.KD", "init_args": {
                "temperature": 4.0,
                "divergence": {"class_path": "abkd_vision.losses.AlphaBetaDivergence",
                               "init_args": {"alpha": 0.8, "beta": 0.3}}}},
        },
    }
    student_cfg = _config(tmp_path, tiny_data, student_model, "student")
    cli = cli_main(["fit", "--config", str(student_cfg), *QUIET])
    module = cli.model
    assert isinstance(module.head.divergence, AlphaBetaDivergence) and module.head.divergence.beta == 0.3
    assert module.num_classes == 3  # linked from the data
    # the teacher is the network the first run wrote
    saved = torch.load(teacher_ckpt, map_location="cpu", weights_only=True)["state_dict"]
    for key, value in module.teacher.model.state_dict().items():
        torch.testing.assert_close(value, saved[f"model.{key}"], rtol=0, atol=0)
    assert module.teacher_val_acc1 is not None
    results = json.loads((tmp_path / "runs" / "student" / "version_0" / "results.json").read_text())
    assert results["teacher_val_acc1"] == pytest.approx(module.teacher_val_acc1)
    # student checkpoints leave the teacher out, and load back (strictly for the student's own keys)
    student_ckpt = next((tmp_path / "runs" / "student" / "version_0" / "checkpoints").glob("*.ckpt"))
    state = torch.load(student_ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert state and not any(k.startswith("teacher.") for k in state)
    reloaded = DistillationModule.load_from_checkpoint(student_ckpt, weights_only=False)
    for key, value in module.student.state_dict().items():
        torch.testing.assert_close(reloaded.student.state_dict()[key], value, rtol=0, atol=0)
    # validate/test subcommands evaluate the student from its checkpoint
    cli_main(["test", "--config", str(student_cfg), "--ckpt_path", str(student_ckpt), *QUIET])


class _TeacherWatch(Callback):
    def __init__(self):
        self.modes = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.modes.append(pl_module.teacher.training or any(m.training for m in pl_module.teacher.modules()))


def test_teacher_frozen_and_bit_identical(tiny_data):
    torch.manual_seed(0)
    data = ImageFolderDataModule(tiny_data, image_size=16, batch_size=8, num_workers=0)
    module = DistillationModule(student="resnet8", teacher="resnet8", num_classes=3, head=DKD(), kd_warmup_epochs=2,
                                evaluate_teacher=False)
    module.hparams.teacher_ckpt = "given"  # weights are the random init here; fit only needs a path to be set
    before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    watch = _TeacherWatch()
    trainer = Trainer(accelerator="cpu", max_epochs=2, limit_train_batches=2, limit_val_batches=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[watch])
    trainer.fit(module, datamodule=data)
    assert watch.modes and not any(watch.modes)
    for key, value in module.teacher.state_dict().items():
        assert torch.equal(value, before[key]), key  # BN running stats included
    assert not any(p.requires_grad for p in module.teacher.parameters())
    assert not any(id(p) in {id(q) for q in module.teacher.parameters()}
                   for group in trainer.optimizers[0].param_groups for p in group["params"])
    assert module.kd_scale() == 1.0  # epoch 2 of a 2-epoch warm-up


def test_kd_warmup_schedule():
    module = DistillationModule(student="resnet8", teacher="resnet8", num_classes=3, kd_warmup_epochs=20)
    assert module.kd_scale() == pytest.approx(1 / 20)  # first epoch, as in DKD's min(epoch / 20, 1)


class _NaNHead(KD):
    def forward(self, student_logits, teacher_logits, target=None):
        return super().forward(student_logits, teacher_logits, target) * float("nan")


def test_non_finite_loss_stops_with_step_and_term(tiny_data):
    data = ImageFolderDataModule(tiny_data, image_size=16, batch_size=8, num_workers=0)
    module = DistillationModule(student="resnet8", teacher="resnet8", num_classes=3, head=_NaNHead(),
                                teacher_ckpt=None, evaluate_teacher=False)
    module.hparams.teacher_ckpt = "given"
    trainer = Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(FloatingPointError, match=r"global step 0 .*non-finite term\(s\): kd"):
        trainer.fit(module, datamodule=data)


def test_missing_teacher_ckpt_is_an_error_at_fit(tiny_data):
    data = ImageFolderDataModule(tiny_data, image_size=16, batch_size=8, num_workers=0)
    module = DistillationModule(student="resnet8", teacher="resnet8", num_classes=3)
    trainer = Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match="teacher_ckpt"):
        trainer.fit(module, datamodule=data)


def test_class_count_mismatch_is_an_error_before_training(tmp_path, tiny_data):
    # a 10-class teacher checkpoint for 3-class data: refused when the module is built
    ckpt = tmp_path / "teacher10.pth"
    torch.save({"epoch": 240, "model": create_model("resnet8", num_classes=10).state_dict()}, ckpt)
    with pytest.raises(RuntimeError, match=r"(?s)shape.*fc\.weight"):
        DistillationModule(student="resnet8", teacher="resnet8", num_classes=3, teacher_ckpt=str(ckpt))
    # a module built for 5 classes on 3-class data: refused when fitting starts
    data = ImageFolderDataModule(tiny_data, image_size=16, batch_size=8, num_workers=0)
    trainer = Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match="3 classes but the model was built for 5"):
        trainer.fit(ClassifierModule(model="resnet8", num_classes=5), datamodule=data)


def test_unknown_model_and_head_names_list_choices(tmp_path, tiny_data, capsys):
    with pytest.raises(ValueError, match="Unknown model 'resnet9'.*cifar_resnet8"):
        ClassifierModule(model="resnet9")
    cfg = _config(tmp_path, tiny_data, {"class_path": "abkd_vision.lit.DistillationModule",
                                        "init_args": {"student": "resnet8", "head": "NoSuchHead"}}, "bad")
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(cfg), *QUIET])
    assert "NoSuchHead" in capsys.readouterr().err


@pytest.mark.skipif(not (SHARED_CIFAR10 / "train.npz").exists(),
                    reason="real CIFAR-10 copy not present at ../shared/data/cifar10 (optional test data)")
def test_short_run_on_real_cifar10_learns(tmp_path):
    root = tmp_path / "cifar10"
    export_npz_cifar(SHARED_CIFAR10 / "train.npz", root, "train", limit=3000)
    export_npz_cifar(SHARED_CIFAR10 / "test.npz", root, "test", limit=1000)
    cfg = {
        "trainer": {"accelerator": "cpu", "max_epochs": 4, "logger": False, "enable_checkpointing": False,
                    "default_root_dir": str(tmp_path)},  # where config.yaml goes without a logger
        "model": {"class_path": "abkd_vision.lit.ClassifierModule",
                  "init_args": {"model": "resnet8", "lr": 0.1, "lr_milestones": [3]}},
        "data": {"class_path": "abkd_vision.data.ImageFolderDataModule",
                 "init_args": {"root": str(root), "batch_size": 64, "num_workers": 0,
                               "mean": [0.4914, 0.4822, 0.4465], "std": [0.247, 0.243, 0.261]}},
    }
    path = tmp_path / "cifar10.yaml"
    path.write_text(json.dumps(cfg))
    cli = cli_main(["fit", "--config", str(path), *QUIET])
    acc = cli.model.summary()["val_acc1_last"]
    print(f"real CIFAR-10 subset: top-1 {acc:.3f} after 4 epochs")
    assert acc > 0.3, f"top-1 {acc:.3f} after 4 epochs on 3,000 real images (chance is 0.1)"


def test_two_process_ddp_on_cpu(tmp_path, tiny_data):
    """The same module under DDP (2 CPU processes, gloo): trains, keeps the teacher frozen, and writes the
    run files once (trainer.log_dir is a collective: asking for it on rank 0 only would hang)."""
    from lightning.pytorch.loggers import CSVLogger

    from abkd_vision.cli import RecordVersions

    data = ImageFolderDataModule(tiny_data, image_size=16, batch_size=8, num_workers=0)
    module = DistillationModule(student="resnet8", teacher="resnet8", num_classes=3,
                                head=DKD(divergence=AlphaBetaDivergence(0.8, 0.3)))
    module.hparams.teacher_ckpt = "given"
    before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, limit_train_batches=2,
                      limit_val_batches=2, logger=CSVLogger(tmp_path, name="ddp", version=0),
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[RecordVersions()])
    trainer.fit(module, datamodule=data)
    for key, value in module.teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    run = tmp_path / "ddp" / "version_0"
    assert json.loads((run / "results.json").read_text())["epochs"] == 1
    assert (run / "versions.json").exists()
