"""Run outputs: written atomically, and only into the run folder (never the working folder)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from unittest import mock

import pytest
from helpers import tiny_image_folder

from abkd_vision.cli import main as cli_main
from abkd_vision.io import atomic_write

REPO = Path(__file__).resolve().parents[1]


def test_no_run_file_is_committed_at_the_repository_root():
    for name in ("versions.json", "config.yaml", "results.json"):
        assert not (REPO / name).exists(), name


def test_atomic_write_keeps_the_previous_file_when_interrupted(tmp_path):
    path = tmp_path / "results.json"
    atomic_write(path, '{"finished": true}\n')
    with mock.patch("os.replace", side_effect=KeyboardInterrupt), pytest.raises(KeyboardInterrupt):
        atomic_write(path, '{"finished": fals')  # killed between writing and renaming
    assert json.loads(path.read_text()) == {"finished": True}
    assert os.listdir(tmp_path) == ["results.json"]  # no temporary file left behind


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return tiny_image_folder(tmp_path_factory.mktemp("tiny"), 24, 12, separable=False)


def _args(data: Path) -> list[str]:
    return ["fit", "--model", "abkd_vision.lit.ClassifierModule", "--model.init_args.model", "resnet8",
            "--data", "abkd_vision.data.ImageFolderDataModule", "--data.init_args.root", str(data),
            "--data.init_args.image_size", "16", "--data.init_args.num_workers", "0",
            "--data.init_args.batch_size", "8", "--trainer.accelerator", "cpu",
            "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def test_a_run_without_logger_leaves_the_working_folder_unchanged(tmp_path, tiny_data, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    cli_main([*_args(tiny_data), "--trainer.logger", "false", "--trainer.enable_checkpointing", "false"])
    assert os.listdir(work) == []


def test_a_run_with_a_logger_writes_only_into_its_run_folder(tmp_path, tiny_data, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    cli_main([*_args(tiny_data), "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
              "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.logger.init_args.name", "r"])
    assert os.listdir(work) == []
    run = tmp_path / "runs" / "r" / "version_0"
    assert {"config.yaml", "versions.json", "results.json", "metrics.csv", "hparams.yaml", "checkpoints"} <= set(
        os.listdir(run))
    assert not [p for p in run.rglob("*.tmp")]
    setup = json.loads((run / "versions.json").read_text())["run"]
    assert setup["world_size"] == 1 and setup["batch_size_per_process"] == 8 and setup["effective_batch_size"] == 8
    assert setup["lr"] == 0.05 and setup["precision"] == "32-true"
