"""A catalogue of bad inputs fed through run.py's entry point: each exits non-zero, prints one message naming the
bad value (and the choices or the fix) as the last thing on the console, and leaves no result or checkpoint that
looks complete."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from abkd_vision.cli import run
from abkd_vision.data import export_image_folder
from abkd_vision.models import create_model

REPO = Path(__file__).resolve().parents[1]
CIFAR = REPO / "configs" / "cifar100"
B2N = REPO / "configs" / "base_to_new"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    images = lambda n: rng.integers(0, 255, (n, 16, 16, 3)).astype(np.uint8)  # noqa: E731
    good = root / "good"
    for split, n in (("train", 12), ("test", 6)):
        export_image_folder(images(n), np.arange(n) % 3, good, split, ["a", "b", "c"])
    differ = root / "differ"
    export_image_folder(images(6), np.arange(6) % 3, differ, "train", ["a", "b", "c"])
    export_image_folder(images(6), np.arange(6) % 3, differ, "test", ["a", "b", "x"])
    (root / "empty" / "train").mkdir(parents=True)
    (root / "empty" / "test").mkdir(parents=True)
    torch.save(create_model("resnet8", num_classes=3).state_dict(), root / "resnet8.pth")
    torch.save(create_model("resnet20", num_classes=3).state_dict(), root / "resnet20.pth")
    torch.save(create_model("resnet8", num_classes=10).state_dict(), root / "resnet8_10.pth")
    truncated = (root / "resnet8.pth").read_bytes()
    (root / "truncated.pth").write_bytes(truncated[: len(truncated) // 2])
    (root / "broken.yaml").write_text("model:\n  class_path: [unclosed\n")
    (root / "a_file").write_text("not a folder")
    return {"root": root, "good": good, "differ": differ, "empty": root / "empty"}


def _student_args(w, data="good", teacher_ckpt="resnet8.pth", extra=(), runs="runs") -> list[str]:
    return ["fit", "--config", str(CIFAR / "base.yaml"), "--config", str(CIFAR / "abkd" / "resnet56-resnet20.yaml"),
            "--model.init_args.teacher", "resnet8", "--model.init_args.student", "resnet8",
            "--model.init_args.teacher_ckpt", str(w["root"] / teacher_ckpt),
            "--data", "abkd_vision.data.ImageFolderDataModule", "--data.init_args.root", str(w[data]),
            "--data.init_args.image_size", "16", "--data.init_args.num_workers", "0", "--data.init_args.batch_size",
            "4", "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1",
            "--trainer.logger.init_args.save_dir", str(w["root"] / runs), "--trainer.enable_progress_bar", "false",
            *extra]


# (case id, extra arguments or a builder, exit code, regex the last lines must match)
CASES = [
    ("alpha_nan", ["--model.init_args.head.init_args.divergence.init_args.alpha", "nan"], 2,
     r"divergence\.init_args\.alpha: Expected a <class 'float'>\. Got value: nan"),
    ("negative_temperature", ["--model.init_args.head.init_args.temperature", "-1"], 1,
     r"temperature must be > 0, got -1\.0"),
    ("gamma_zero", ["--model.init_args.head", "abkd_vision.heads.TTM", "--model.init_args.head.init_args.gamma", "0"],
     1, r"gamma must be > 0, got 0"),
    ("unknown_model", ["--model.init_args.student", "resnet9"], 1,
     r"Unknown model 'resnet9'\. Available: .*cifar_resnet8"),
    ("unknown_head", ["--model.init_args.head", "abkd_vision.heads.Nope"], 2,
     r"model\.init_args\.head: .*Nope.*Choose one of: abkd_vision\.heads\.KD, DKD, LSD, TTM"),
    ("unknown_divergence", ["--model.init_args.head.init_args.divergence", "abkd_vision.losses.Nope"], 2,
     r"divergence: .*Nope.*Choose one of: abkd_vision\.losses\.AlphaBetaDivergence"),
    ("unknown_transform", ["--model.init_args.head.init_args.learned_temperature", "abkd_vision.heads.Nope"], 2,
     r"learned_temperature: .*Nope.*Choose one of: abkd_vision\.heads\.CurriculumTemperature"),
    ("transform_without_temperature", ["--model.init_args.head", "abkd_vision.heads.TTM",
                                       "--model.init_args.head.init_args.learned_temperature",
                                       "abkd_vision.heads.CurriculumTemperature"], 1,
     r"TTM has no temperature for CurriculumTemperature \(CTKD\) to learn"),
    ("mlkd_without_two_views", ["--model.init_args.head", "abkd_vision.heads.MLKD"], 1,
     r"MLKD trains on two views of each image: set data\.init_args\.strong_view: true"),
    ("unknown_key", ["--model.init_args.kd_wieght", "2"], 2, r"model\.init_args: .*'kd_wieght' is not accepted"),
    ("missing_checkpoint", None, 1, r"Checkpoint file not found: .*missing\.pth"),
    ("wrong_architecture", None, 1, r"does not fit .*\n.*(missing|unexpected) keys"),
    ("truncated_checkpoint", None, 1, r"truncated\.pth: the file is truncated or corrupted"),
    ("class_count_mismatch", None, 1, r"resnet8_10\.pth does not fit .*\n.*shape mismatches.*\n.*fc\.weight: "
     r"checkpoint \[10, 64\] vs model \[3, 64\]"),
    ("empty_data_folder", None, 1, r"no class folder in .*empty/train"),
    ("train_test_classes_differ", None, 1, r"class folders of .*differ/test differ .*only in train: \['c'\]"),
    ("broken_config_file", None, 2, r"config file .*broken\.yaml is not valid YAML: .*line 2"),
    ("unwritable_output_folder", None, 1, r"cannot write to .*a_file/runs \(Not a directory\); choose a writable "
     r"output folder"),
    ("unknown_dataset", None, 1, r"unknown base-to-new dataset 'CIFAR10'; choose one of: ImageNet, Caltech101"),
]


def _build(case: str, extra, w) -> list[str]:
    root = w["root"]
    if case == "missing_checkpoint":
        return _student_args(w, teacher_ckpt="missing.pth")
    if case == "wrong_architecture":
        return _student_args(w, teacher_ckpt="resnet20.pth")
    if case == "class_count_mismatch":
        return _student_args(w, teacher_ckpt="resnet8_10.pth")
    if case == "truncated_checkpoint":
        return _student_args(w, teacher_ckpt="truncated.pth")
    if case == "empty_data_folder":
        return _student_args(w, data="empty")
    if case == "train_test_classes_differ":
        return _student_args(w, data="differ")
    if case == "broken_config_file":
        return _student_args(w, extra=["--config", str(root / "broken.yaml")])
    if case == "unwritable_output_folder":
        return _student_args(w, extra=["--trainer.logger.init_args.save_dir", str(root / "a_file" / "runs")])
    if case == "unknown_dataset":
        return ["fit", "--config", str(B2N / "base.yaml"), "--config", str(B2N / "teacher" / "EuroSAT.yaml"),
                "--data.init_args.dataset", "CIFAR10", "--data.init_args.root", str(root)]
    return _student_args(w, extra=extra)


@pytest.mark.parametrize("case, extra, code, pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_clear_message_last(case, extra, code, pattern, world, capsys):
    args = _build(case, extra, world)
    save_dir = world["root"] / f"runs_{case}"
    args += ["--trainer.logger.init_args.save_dir", str(save_dir)] if case != "unwritable_output_folder" else []
    assert run(args) == code
    err = capsys.readouterr().err.strip()
    tail = "\n".join(err.splitlines()[-6:])
    assert "Traceback" not in err and "Given value" not in err, err[-2000:]
    import re

    assert re.search(pattern, tail), tail
    finished = [p for p in save_dir.rglob("results.json") if json.loads(p.read_text()).get("finished")]
    assert not finished and not list(save_dir.rglob("*.ckpt"))


def test_run_py_itself_reports_one_message(world):
    args = _student_args(world, extra=["--model.init_args.student", "resnet9"])
    result = subprocess.run([sys.executable, str(REPO / "run.py"), *args], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-2].startswith("error: Unknown model 'resnet9'")
