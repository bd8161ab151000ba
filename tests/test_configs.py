"""The CIFAR-100 run configs, their generator and the teacher-fetching script.

Cost control (2 CPU cores, < 90 s): the LightningCLI parser is built once per module and every config is parsed
in-process without instantiation (~0.07 s each, ~100 files). Building it through ``abkd_vision.cli.main`` keeps it
identical to ``run.py``; only ``instantiate_classes`` is stubbed while the parser is built. A real
``run.py ... --print_config`` subprocess (~7 s: torch/lightning imports) runs for one file only, and models are
instantiated for one pair per method, since network construction dominates instantiation time.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml
from helpers import parse_only_cli

from abkd_vision.heads import DKD, KD, LSD, TTM
from abkd_vision.lit import ClassifierModule, DistillationModule
from abkd_vision.losses import AlphaBetaDivergence
from abkd_vision.models import create_model

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "cifar100"
BASE = CONFIGS / "base.yaml"
RUN_FILES = sorted(p for p in CONFIGS.rglob("*.yaml") if p != BASE)
AB_METHODS = ("abkd", "abdkd", "ablsd", "abttm")
METHODS = ("kd", "dkd", "lsd", "ttm", *AB_METHODS)

# ABKD paper, App. I.2.3, Table 4, typed from the paper independently of the generator: (alpha, beta) for
# ABKD, ABDKD, ABLS(D), ABTTM.
TABLE4 = {
    "wrn_40_2-wrn_16_2": [(0.6, 0.5), (0.8, 0.4), (0.9, 0.1), (0.8, 0.3)],
    "wrn_40_2-wrn_40_1": [(0.9, 0.2), (1.0, 0.2), (0.8, 0.4), (1.0, 0.1)],
    "resnet56-resnet20": [(0.8, 0.3), (1.0, 0.2), (0.9, 0.3), (0.7, 0.5)],
    "resnet110-resnet20": [(0.8, 0.3), (0.8, 0.3), (1.2, -0.1), (0.9, 0.2)],
    "resnet110-resnet32": [(0.7, 0.4), (0.9, 0.3), (0.9, 0.2), (0.8, 0.3)],
    "resnet32x4-resnet8x4": [(0.5, 0.5), (0.8, 0.3), (1.2, -0.2), (0.8, 0.3)],
    "vgg13-vgg8": [(0.9, 0.2), (0.7, 0.4), (1.0, 0.2), (0.7, 0.5)],
    "resnet110-resnet44": [(0.8, 0.3), (0.8, 0.3), (1.0, 0.2), (0.8, 0.2)],
}
TABLE4["ResNet50-vgg8"] = TABLE4["vgg13-vgg8"]  # not in Table 4; the configs reuse vgg13 -> vgg8
PAIRS = tuple(TABLE4)
TEACHERS = ("wrn_40_2", "resnet56", "resnet110", "resnet32x4", "vgg13", "ResNet50")


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------ generator


def test_generated_configs_are_up_to_date():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_cifar100_configs.py"), "--check"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_method_and_pair_has_a_config():
    expected = {CONFIGS / m / f"{p}.yaml" for m in METHODS for p in PAIRS}
    models = {m for p in PAIRS for m in p.split("-")}
    expected |= {CONFIGS / "teachers" / f"{m}.yaml" for m in models}
    assert set(RUN_FILES) == expected


def test_check_mode_detects_a_changed_file(tmp_path, capsys):
    gen = load_script("make_cifar100_configs")
    assert gen.main(["--root", str(tmp_path)]) == 0
    assert gen.main(["--root", str(tmp_path), "--check"]) == 0
    edited = tmp_path / "configs/cifar100/abkd/vgg13-vgg8.yaml"
    edited.write_text(edited.read_text().replace("alpha: 0.9", "alpha: 0.8"))
    (tmp_path / "configs/cifar100/kd/old-pair.yaml").write_text("{}\n")
    capsys.readouterr()
    assert gen.main(["--root", str(tmp_path), "--check"]) == 1
    out = capsys.readouterr().out
    assert "abkd/vgg13-vgg8.yaml" in out and "kd/old-pair.yaml" in out


# ------------------------------------------------------------------------------------------ values


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pair", PAIRS)
def test_divergence_matches_table4(method, pair):
    cfg = load_yaml(CONFIGS / method / f"{pair}.yaml")
    args = cfg["model"]["init_args"]
    teacher, student = pair.split("-")
    assert (args["teacher"], args["student"]) == (teacher, student)
    assert args["teacher_ckpt"] == f"checkpoints/cifar_teachers/{teacher}_vanilla/ckpt_epoch_240.pth"
    assert cfg["trainer"]["logger"]["init_args"]["name"] == f"{method}/{pair}"
    assert "num_classes" not in args  # linked from data.num_classes by the CLI
    divergence = args["head"]["init_args"]["divergence"]
    if method in AB_METHODS:
        assert divergence["class_path"] == "abkd_vision.losses.AlphaBetaDivergence"
        ab = divergence["init_args"]
        assert (ab["alpha"], ab["beta"]) == TABLE4[pair][AB_METHODS.index(method)]
    else:
        assert divergence is None


# Values from the methods' own publications (see the generator's comments for sources).
PUBLISHED = {
    ("kd", "resnet56-resnet20"): ("KD", {"temperature": 4.0}, 0.1, 0.9, 0),
    ("abkd", "resnet56-resnet20"): ("KD", {"temperature": 4.0}, 1.0, 2.0, 0),
    ("dkd", "resnet56-resnet20"): ("DKD", {"temperature": 4.0, "tckd_weight": 1.0, "nckd_weight": 2.0}, 1.0, 1.0, 20),
    ("dkd", "vgg13-vgg8"): ("DKD", {"nckd_weight": 6.0}, 1.0, 1.0, 20),
    ("dkd", "wrn_40_2-wrn_16_2"): ("DKD", {"nckd_weight": 6.0}, 1.0, 1.0, 20),
    ("abdkd", "resnet32x4-resnet8x4"): ("DKD", {"nckd_weight": 8.0}, 1.0, 1.0, 20),
    ("lsd", "resnet32x4-resnet8x4"): ("LSD", {"temperature": 2.0}, 0.1, 9.0, 0),
    ("lsd", "vgg13-vgg8"): ("LSD", {"temperature": 3.0}, 0.1, 9.0, 0),
    ("lsd", "resnet110-resnet20"): ("LSD", {"temperature": 4.0}, 0.1, 12.0, 0),
    ("ablsd", "resnet110-resnet20"): ("LSD", {"temperature": 2.0}, 0.1, 9.0, 0),
    ("ttm", "vgg13-vgg8"): ("TTM", {"gamma": 0.1, "weighted": False}, 1.0, 45.0, 0),
    ("abttm", "wrn_40_2-wrn_40_1"): ("TTM", {"gamma": 0.1}, 1.0, 76.0, 0),
}


@pytest.mark.parametrize(("method", "pair"), list(PUBLISHED))
def test_published_method_settings(method, pair):
    head, head_args, ce_weight, kd_weight, warmup = PUBLISHED[method, pair]
    args = load_yaml(CONFIGS / method / f"{pair}.yaml")["model"]["init_args"]
    assert args["head"]["class_path"] == f"abkd_vision.heads.{head}"
    assert head_args.items() <= args["head"]["init_args"].items()
    assert (args["ce_weight"], args["kd_weight"], args["kd_warmup_epochs"]) == (ce_weight, kd_weight, warmup)


# ------------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def cli():
    """The run.py CLI built once, without instantiating anything."""
    return parse_only_cli(BASE, CONFIGS / "teachers" / "resnet20.yaml")


def parse(cli, path: Path, *extra: str):
    return cli.parser.parse_args(["--config", str(BASE), "--config", str(path), *extra])


@pytest.mark.parametrize("path", RUN_FILES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_parses_with_base(cli, path):
    cfg = parse(cli, path)
    assert cfg.trainer.max_epochs == 240
    assert cfg.trainer.logger.init_args.save_dir == "runs"  # base.yaml's logger survives the run file's override
    assert cfg.trainer.logger.init_args.name == load_yaml(path)["trainer"]["logger"]["init_args"]["name"]
    assert cfg.data.init_args.batch_size == 64


@pytest.mark.parametrize("method", METHODS)
def test_distillation_config_instantiates(cli, method):
    cfg = parse(cli, CONFIGS / method / "resnet32x4-resnet8x4.yaml", "--model.init_args.teacher_ckpt", "null")
    instantiate = getattr(cli.parser, "instantiate", None) or cli.parser.instantiate_classes
    model = instantiate(cfg).model
    assert isinstance(model, DistillationModule) and model.num_classes == 100
    assert isinstance(model.head, {"kd": KD, "dkd": DKD, "lsd": LSD, "ttm": TTM}[method.removeprefix("ab")])
    if method in AB_METHODS:
        assert isinstance(model.head.divergence, AlphaBetaDivergence)
        expected = TABLE4["resnet32x4-resnet8x4"][AB_METHODS.index(method)]
        assert (model.head.divergence.alpha, model.head.divergence.beta) == expected


def test_full_cli_instantiates_trainer_and_teacher_module(tmp_path, monkeypatch):
    """Everything run.py builds, including base.yaml's logger and callbacks (no fit)."""
    from abkd_vision.cli import main

    monkeypatch.chdir(tmp_path)  # relative paths (runs/, data/) stay inside the temporary folder
    with mock.patch.dict(os.environ), mock.patch.object(sys, "argv", ["run.py"]):
        built = main(["--config", str(BASE), "--config", str(CONFIGS / "teachers" / "resnet20.yaml")], run=False)
    assert isinstance(built.model, ClassifierModule)
    callbacks = {type(c).__name__ for c in built.trainer.callbacks}
    assert {"ModelCheckpoint", "LearningRateMonitor", "RecordVersions"} <= callbacks
    assert built.trainer.logger.name == "teachers/resnet20" and built.trainer.max_epochs == 240


def test_print_config_subprocess():
    result = subprocess.run(
        [sys.executable, "run.py", "fit", "--config", str(BASE), "--config",
         str(CONFIGS / "ablsd" / "resnet32x4-resnet8x4.yaml"), "--print_config"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    printed = yaml.safe_load(result.stdout)
    divergence = printed["model"]["init_args"]["head"]["init_args"]["divergence"]["init_args"]
    assert (divergence["alpha"], divergence["beta"]) == (1.2, -0.2)
    logger = printed["trainer"]["logger"]["init_args"]
    assert (logger["save_dir"], logger["name"]) == ("runs", "ablsd/resnet32x4-resnet8x4")


# ------------------------------------------------------------------------------------------ fetch_teachers.py


def test_fetch_teachers_offline_message(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "fetch_teachers.py"), "--url", "http://127.0.0.1:9/none.tar",
         "--dest", str(tmp_path), "--timeout", "5"],
        capture_output=True, text=True, timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "offline" in output and "Traceback" not in output
    assert "--verify-only" in output  # tells how to place the files by hand and check them
    assert not list(tmp_path.rglob("*.part"))


def test_fetch_teachers_refuses_path_traversal(tmp_path):
    fetch = load_script("fetch_teachers")
    payload = tmp_path / "payload.txt"
    payload.write_text("x")
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(payload, arcname="../escaped.txt")
    with pytest.raises(ValueError, match="unsafe path"):
        fetch.extract(archive, tmp_path / "dest")
    assert not (tmp_path / "escaped.txt").exists()


@pytest.fixture(scope="module")
def fake_teachers(tmp_path_factory) -> Path:
    """Teacher files in the published format: {epoch, model, accuracy, optimizer}."""
    dest = tmp_path_factory.mktemp("teachers")
    for name in TEACHERS:
        path = dest / "cifar_teachers" / f"{name}_vanilla" / "ckpt_epoch_240.pth"
        path.parent.mkdir(parents=True)
        checkpoint = {"epoch": 240, "model": create_model(name).state_dict(), "accuracy": 75.0, "optimizer": {}}
        torch.save(checkpoint, path)
    return dest


def test_fetch_teachers_verify_only(fake_teachers, capsys):
    fetch = load_script("fetch_teachers")
    assert fetch.main(["--verify-only", "--dest", str(fake_teachers)]) == 0
    out = capsys.readouterr().out
    for name in TEACHERS:
        assert f"ok      {name}" in out
    assert out.count("sha256") == len(TEACHERS) and "accuracy stored 75.00" in out


def test_fetch_teachers_verify_only_names_missing_file(fake_teachers, tmp_path, capsys):
    for name in TEACHERS:
        if name == "vgg13":
            continue
        src = fake_teachers / "cifar_teachers" / f"{name}_vanilla" / "ckpt_epoch_240.pth"
        dst = tmp_path / src.relative_to(fake_teachers)
        dst.parent.mkdir(parents=True)
        dst.symlink_to(src)  # no need to copy ~170 MB
    fetch = load_script("fetch_teachers")
    assert fetch.main(["--verify-only", "--dest", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "MISSING vgg13" in out and "vgg13_vanilla/ckpt_epoch_240.pth" in out
