"""Two processes (DDP on CPU, gloo) against one: the same validation metrics on the same weights, every test
image counted once, and the run records its effective batch size."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import tiny_image_folder
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger

from abkd_vision.cli import RecordVersions
from abkd_vision.data import ImageFolderDataModule
from abkd_vision.lit import ClassifierModule


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tiny_image_folder(tmp_path_factory.mktemp("ddp"), 16, 23, seed=1)  # 23 test images: uneven over 2


def _validate(tmp_path: Path, data: Path, devices: int, weights: dict) -> dict:
    module = ClassifierModule(model="resnet8", num_classes=3)
    module.load_state_dict(weights)
    trainer = Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                      logger=CSVLogger(tmp_path, name=f"d{devices}", version=0), callbacks=[RecordVersions()],
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, datamodule=ImageFolderDataModule(str(data), image_size=16, batch_size=4,
                                                              eval_batch_size=5, num_workers=0))
    run = tmp_path / f"d{devices}" / "version_0"
    rows = (run / "metrics.csv").read_text().splitlines()
    header, values = rows[0].split(","), rows[-1].split(",")
    metrics = {k: float(v) for k, v in zip(header, values) if k.startswith("val/") and v}
    return {"metrics": metrics, "run": json.loads((run / "versions.json").read_text())["run"]}


def test_two_processes_give_the_single_process_validation_metrics(tmp_path, data):
    torch.manual_seed(0)
    weights = ClassifierModule(model="resnet8", num_classes=3).state_dict()
    one, two = _validate(tmp_path, data, 1, weights), _validate(tmp_path, data, 2, weights)
    assert one["metrics"]["val/acc1"] * 23 == pytest.approx(round(one["metrics"]["val/acc1"] * 23), abs=1e-4)
    assert two["metrics"] == pytest.approx(one["metrics"], abs=1e-6)  # a padding sampler would count 24 images
    assert (one["run"]["world_size"], two["run"]["world_size"]) == (1, 2)
    assert two["run"]["effective_batch_size"] == 2 * two["run"]["batch_size_per_process"] == 8


# --- training: two processes follow the single-process trajectory -------------------------------------------

class TinyConvNet(torch.nn.Module):
    """A small CNN without BatchNorm: per-process BatchNorm statistics (SyncBatchNorm needs a GPU) are the one
    thing that legitimately differs between 2 x 8 and 1 x 16 images; everything else must not."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                            torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten())
        self.fc = torch.nn.Linear(8 * 16, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


class SameOrderDataModule(ImageFolderDataModule):
    """Single process: shuffle with the DistributedSampler that Lightning gives each DDP process (same seed), as
    one replica, so that the 1-process batch k is exactly the union of the 2 processes' batches k."""

    def train_dataloader(self):
        from torch.utils.data import DataLoader, DistributedSampler

        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))  # Lightning's rule for the seed of its DDP sampler
        sampler = DistributedSampler(self.train_set, num_replicas=1, rank=0, shuffle=True, seed=seed)
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, sampler=sampler, drop_last=True)


def _train(tmp_path: Path, data: Path, devices: int) -> tuple[dict, dict]:
    from abkd_vision.heads import KD
    from abkd_vision.lit import DistillationModule
    from abkd_vision.losses import AlphaBetaDivergence

    torch.manual_seed(0)
    module = DistillationModule(student="resnet8", teacher="resnet8", num_classes=3, evaluate_teacher=False,
                                head=KD(divergence=AlphaBetaDivergence(0.8, 0.3)), kd_weight=2.0,
                                kd_warmup_epochs=2, lr=0.1, lr_milestones=[1])
    torch.manual_seed(1)
    module.student, module.teacher.model = TinyConvNet(), TinyConvNet().requires_grad_(False)
    module.hparams.teacher_ckpt = "given"
    datamodule_cls = SameOrderDataModule if devices == 1 else ImageFolderDataModule
    datamodule = datamodule_cls(str(data), image_size=16, batch_size=16 // devices, eval_batch_size=5,
                                num_workers=0, padding=0, hflip=False)  # no random augmentation
    trainer = Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                      max_epochs=3, logger=CSVLogger(tmp_path, name=f"train{devices}", version=0),
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, datamodule=datamodule)
    rows = (tmp_path / f"train{devices}" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    per_epoch = [{k: float(v) for k, v in zip(header, r.split(",")) if k.startswith("val/") and v} for r in rows[1:]]
    return {k: v.detach().clone() for k, v in module.student.state_dict().items()}, [m for m in per_epoch if m]


def test_two_processes_follow_the_single_process_training_trajectory(tmp_path, data):
    """DDP on 2 processes x 8 images against 1 process x 16 (same global batches, same seed, the AB head with a
    KD warm-up and an lr step): after 3 epochs (9 SGD steps) the student weights agree to 1e-5 (float32
    summation order only) and every per-epoch validation metric is equal. Stated tolerance: 1e-5 absolute."""
    big = tiny_image_folder(tmp_path / "train_data", 48, 23, seed=3)
    one_w, one_m = _train(tmp_path, big, 1)
    two_w, two_m = _train(tmp_path, big, 2)
    assert len(one_m) == len(two_m) == 3
    for a, b in zip(one_m, two_m):
        assert b == pytest.approx(a, abs=1e-5)
    for name in one_w:
        torch.testing.assert_close(two_w[name], one_w[name], atol=1e-5, rtol=0, msg=name)
    torch.manual_seed(1)  # training did move the weights (the comparison is not between two initialisations)
    moved = TinyConvNet().state_dict()
    assert any((one_w[k] - moved[k]).abs().max() > 1e-3 for k in one_w)
