"""Exact resume: a real run.py process killed with SIGKILL mid-epoch and resumed with --ckpt_path last ends
with bit-identical weights and results to an uninterrupted run (CPU, deterministic, ExactResume callback)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_image_folder

from abkd_vision.models import create_model

REPO = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 6  # 48 images, batch 8


def _write_callback_module(folder: Path) -> None:
    (folder / "slow_callback.py").write_text(
        "import time\nfrom lightning.pytorch import Callback\n\n"
        "class SlowDown(Callback):\n"
        "    def __init__(self, seconds: float = 0.0):\n        self.seconds = seconds\n\n"
        "    def on_train_batch_end(self, *args, **kwargs):\n        time.sleep(self.seconds)\n"
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("resume")
    tiny_image_folder(root / "data", 48, 12)
    torch.manual_seed(0)
    torch.save(create_model("resnet8", num_classes=3).state_dict(), root / "teacher.pth")
    _write_callback_module(root)
    return {"root": root}


def _config(root: Path, name: str, slow: float) -> Path:
    cfg = {
        "seed_everything": 3,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": 3, "deterministic": True, "log_every_n_steps": 1,
            "enable_progress_bar": False, "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(root / "runs"), "name": name, "version": 0}},
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(root / "runs" / name / "ckpt"), "every_n_train_steps": 2,
                               "save_last": True, "save_top_k": 0}},
                {"class_path": "abkd_vision.cli.ExactResume"},
                {"class_path": "slow_callback.SlowDown", "init_args": {"seconds": slow}},
            ],
        },
        "model": {"class_path": "abkd_vision.lit.DistillationModule", "init_args": {
            "student": "resnet8", "teacher": "resnet8", "teacher_ckpt": str(root / "teacher.pth"), "kd_weight": 2.0,
            "kd_warmup_epochs": 2, "lr": 0.05, "lr_milestones": [2],
            "head": {"class_path": "abkd_vision.heads.KD", "init_args": {"temperature": 4.0, "divergence": {
                "class_path": "abkd_vision.losses.AlphaBetaDivergence", "init_args": {"alpha": 0.8, "beta": 0.3}}}}}},
        "data": {"class_path": "abkd_vision.data.ImageFolderDataModule",
                 "init_args": {"root": str(root / "data"), "image_size": 16, "batch_size": 8, "num_workers": 0}},
    }
    path = root / f"{name}.yaml"
    path.write_text(json.dumps(cfg))
    return path


def _env(root: Path) -> dict:
    return {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "PYTHONWARNINGS": "ignore"}


def _run(args: list[str], root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], capture_output=True, text=True, cwd=REPO,
                          env=_env(root), timeout=600)


def _saved_step(path: Path) -> int | None:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])
    except Exception:  # noqa: BLE001 -- not there yet, or being written
        return None


def test_killed_run_resumes_to_bit_identical_weights(setup):
    root = setup["root"]
    full = _run(["fit", "--config", str(_config(root, "full", 0.0))], root)
    assert full.returncode == 0, full.stderr[-3000:]

    cfg = _config(root, "killed", 0.25)
    proc = subprocess.Popen([sys.executable, str(REPO / "run.py"), "fit", "--config", str(cfg)], cwd=REPO,
                            env=_env(root), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = root / "runs" / "killed" / "ckpt" / "last.ckpt"
    deadline = time.time() + 300
    while time.time() < deadline:  # kill once a checkpoint from the middle of epoch 1 is on disk
        step = _saved_step(last) if last.is_file() else None
        if step is not None and step >= STEPS_PER_EPOCH + 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # a kill, not a clean stop
    proc.wait()
    step = _saved_step(last)
    assert step is not None and step < 3 * STEPS_PER_EPOCH, "the run finished before it could be killed"
    assert not (root / "runs" / "killed" / "version_0" / "results.json").exists()

    resumed = _run(["fit", "--config", str(cfg), "--ckpt_path", str(last),
                    "--trainer.callbacks+=slow_callback.SlowDown"], root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a = torch.load(root / "runs" / "full" / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(last, map_location="cpu", weights_only=False)
    assert a["global_step"] == b["global_step"] == 3 * STEPS_PER_EPOCH
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    ra = json.loads((root / "runs" / "full" / "version_0" / "results.json").read_text())
    rb = json.loads((root / "runs" / "killed" / "version_0" / "results.json").read_text())
    for key in ("val_acc1_best", "best_epoch", "val_acc1_last", "epochs"):
        assert ra[key] == rb[key], key
    assert rb["finished"] is True
