"""Two processes (DDP on CPU, gloo) against one: the same validation metrics on the same weights, every test
image counted once, and the run records its effective batch size."""

from __future__ import annotations

import json
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
