"""Student export: a plain state dict that timm + load_checkpoint read strictly, and ONNX checked with onnxruntime
against PyTorch on real images, with size, parameters and CPU latency next to the teacher's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from abkd_vision.data import export_image_folder
from abkd_vision.export import main as export_main
from abkd_vision.export import network_from_checkpoint
from abkd_vision.lit import DistillationModule
from abkd_vision.models import create_model, load_checkpoint

pytest.importorskip("onnxruntime")

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR10 = REPO.parent / "shared" / "data" / "cifar10"


@pytest.fixture(scope="module")
def distilled(tmp_path_factory) -> dict:
    """A resnet8 student distilled (a few steps) from a resnet20 teacher on 3 classes; its Lightning checkpoint."""
    from lightning.pytorch import Trainer

    from abkd_vision.data import ImageFolderDataModule

    root = tmp_path_factory.mktemp("export")
    if (SHARED_CIFAR10 / "test.npz").is_file():  # real images when present
        images = root / "cifar10"
        data = np.load(SHARED_CIFAR10 / "test.npz")
        picks = [np.flatnonzero(data["labels"] == c)[:12] for c in range(3)]
        for split, part in (("train", slice(0, 6)), ("test", slice(6, 12))):
            idx = np.concatenate([p[part] for p in picks])
            export_image_folder(data["images"][idx], data["labels"][idx], images, split, ["airplane", "car", "bird"])
    else:
        images = root / "generated"
        rng = np.random.default_rng(0)
        for split in ("train", "test"):
            export_image_folder(rng.integers(0, 255, (18, 32, 32, 3)).astype(np.uint8), np.arange(18) % 3, images,
                                split, ["a", "b", "c"])
    teacher = create_model("resnet20", num_classes=3)
    torch.save(teacher.state_dict(), root / "teacher.pth")
    module = DistillationModule(student="resnet8", teacher="resnet20", num_classes=3,
                                teacher_ckpt=str(root / "teacher.pth"), evaluate_teacher=False)
    trainer = Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(root))
    trainer.fit(module, datamodule=ImageFolderDataModule(str(images), batch_size=4, num_workers=0))
    ckpt = root / "student.ckpt"
    trainer.save_checkpoint(ckpt)
    return {"root": root, "ckpt": ckpt, "images": images, "module": module}


def test_export_writes_a_state_dict_timm_reads_and_a_faithful_onnx(distilled, tmp_path, capsys):
    out = tmp_path / "out"
    assert export_main(["--ckpt", str(distilled["ckpt"]), "--out", str(out), "--images", str(distilled["images"])]) == 0
    printed = capsys.readouterr().out
    assert "onnxruntime" in printed and "teacher resnet20" in printed
    net = timm.create_model("cifar_resnet8", num_classes=3)
    load_checkpoint(net, out / "model.pt")  # strict
    for key, value in distilled["module"].student.state_dict().items():
        torch.testing.assert_close(net.state_dict()[key], value, rtol=0, atol=0)
    report = json.loads((out / "export.json").read_text())
    assert report["model"] == "cifar_resnet8" and report["num_classes"] == 3
    assert report["checked_on"].endswith("real images") and report["onnx_max_abs_diff"] <= 1e-4
    assert report["parameters"] == sum(p.numel() for p in net.parameters())
    assert report["teacher_parameters"] > report["parameters"]
    assert report["latency_cpu"]["torch_ms_batch64"] > 0 and report["teacher_latency_cpu"]["torch_ms_batch64"] > 0
    # the ONNX file runs at another batch size and agrees with PyTorch
    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        expected = net.eval()(x).numpy()
    assert np.abs(session.run(None, {"images": x.numpy()})[0] - expected).max() <= 1e-4


def test_network_from_checkpoint_reads_the_recorded_names(distilled):
    net, info = network_from_checkpoint(distilled["ckpt"])
    assert info == {"model": "cifar_resnet8", "num_classes": 3, "teacher": "resnet20",
                    "teacher_ckpt": str(distilled["root"] / "teacher.pth")}


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert export_main(["--ckpt", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "o")]) == 1
    assert "checkpoint not found" in capsys.readouterr().err


def test_run_py_export_subcommand(distilled, tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "run.py"), "export", "--ckpt", str(distilled["ckpt"]),
                             "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "o" / "model.onnx").is_file() and "random images" in result.stdout
