"""The CIFAR-100 run configs, their generator and the teacher-fetching script.

Cost control (2 CPU cores, < 2 min): the LightningCLI parser is built once per module and every config is parsed
in-process without instantiation (~0.07 s each, ~170 files). Building it through ``abkd_vision.cli.main`` keeps it
identical to ``run.py``; only ``instantiate_classes`` is stubbed while the parser is built. Real
``run.py ... --print_config`` subprocesses (~7 s each: torch/lightning imports) run for two files only, models are
instantiated for one pair per method, since network construction dominates instantiation time, and one config per
new method family takes one training step (``fast_dev_run``, in-process, ~1 s each) on fake CIFAR-100 files.
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
from helpers import fake_cifar100, parse_only_cli

from abkd_vision.heads import DIST, DKD, KD, LSD, MLKD, NKD, TTM, CurriculumTemperature
from abkd_vision.lit import ClassifierModule, DistillationModule
from abkd_vision.losses import AlphaBetaDivergence
from abkd_vision.models import create_model

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "cifar100"
BASE = CONFIGS / "base.yaml"
OVERLAYS = (CONFIGS / "fast.yaml",)  # composed after a run file (tests/test_device_data.py), not run files
RUN_FILES = sorted(p for p in CONFIGS.rglob("*.yaml") if p != BASE and p not in OVERLAYS)
AB_METHODS = ("abkd", "abdkd", "ablsd", "abttm")
METHODS = ("kd", "dkd", "lsd", "ttm", *AB_METHODS)
# Methods beyond the ABKD paper's. Their AB variants' (alpha, beta) are NOT published: they borrow a Table 4
# column (NKD -> ABDKD's, MLKD and CTKD -> ABKD's). DIST has no divergence and no AB variant.
NEW_AB_COLUMN = {"abnkd": 1, "abmlkd": 0, "abctkd": 0}
NEW_METHODS = ("dist", "nkd", "mlkd", "ctkd", *NEW_AB_COLUMN)
# The logit-standardisation paper's combinations, only for the seven of our pairs it reports.
LS_METHODS = ("dkd_ls", "ctkd_ls", "mlkd_ls")
ALL_METHODS = (*METHODS, *NEW_METHODS, *LS_METHODS)
HEAD_OF = {"kd": KD, "dkd": DKD, "lsd": LSD, "ttm": TTM, "dist": DIST, "nkd": NKD, "mlkd": MLKD, "ctkd": KD,
           "dkd_ls": DKD, "ctkd_ls": KD, "mlkd_ls": MLKD}

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
LS_PAIRS = ("resnet32x4-resnet8x4", "vgg13-vgg8", "wrn_40_2-wrn_40_1", "wrn_40_2-wrn_16_2", "resnet56-resnet20",
            "resnet110-resnet32", "resnet110-resnet20")


def pairs_of(method: str) -> tuple[str, ...]:
    return LS_PAIRS if method in LS_METHODS else PAIRS
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
    expected = {CONFIGS / m / f"{p}.yaml" for m in ALL_METHODS for p in pairs_of(m)}
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


@pytest.mark.parametrize("method", (*NEW_METHODS, *LS_METHODS))
def test_new_methods_divergence_and_names(method):
    for pair in pairs_of(method):
        cfg = load_yaml(CONFIGS / method / f"{pair}.yaml")
        text = (CONFIGS / method / f"{pair}.yaml").read_text(encoding="utf-8")
        args = cfg["model"]["init_args"]
        assert (args["teacher"], args["student"]) == tuple(pair.split("-"))
        assert cfg["trainer"]["logger"]["init_args"]["name"] == f"{method}/{pair}"
        head = args["head"]["init_args"]
        if method == "dist":
            assert "divergence" not in head  # no KL inside DIST
        elif method in NEW_AB_COLUMN:
            ab = head["divergence"]["init_args"]
            assert (ab["alpha"], ab["beta"]) == TABLE4[pair][NEW_AB_COLUMN[method]]
            assert "NOT published" in text  # borrowed (alpha, beta) are marked as such
        else:
            assert head["divergence"] is None
        two_views = "mlkd" in method
        assert cfg.get("data", {}).get("init_args", {}).get("strong_view", False) is two_views
        assert args.get("lr") == (0.025 if two_views else None)  # MLKD's lr; the others keep the 0.05 default
        learned = head.get("learned_temperature")
        if "ctkd" in method:
            assert learned["class_path"] == "abkd_vision.heads.CurriculumTemperature"
            assert learned["init_args"] == {"mode": "global", "t_min": 1.0, "t_range": 20.0, "lambda_min": 0.0,
                                            "lambda_max": 1.0, "curriculum_epochs": 10}
            assert "temperature" not in head  # the learned temperature replaces the fixed one
        else:
            assert learned is None
        assert head.get("standardize", False) is method.endswith("_ls")


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
    # DIST's CIFAR recipe (dist_cifar.yaml: tau 4, beta 1, gamma 1, kd_loss_weight 2, CE 1), every pair
    ("dist", "resnet32x4-resnet8x4"): ("DIST", {"temperature": 4.0, "inter_weight": 1.0, "intra_weight": 1.0},
                                       1.0, 2.0, 0),
    ("dist", "vgg13-vgg8"): ("DIST", {"temperature": 4.0, "inter_weight": 1.0, "intra_weight": 1.0}, 1.0, 2.0, 0),
    # NKD's CIFAR-100 setting (ResNet34 -> ResNet18; not published for our pairs): temp 3, gamma 3.5, CE 1, NKD 1
    ("nkd", "resnet56-resnet20"): ("NKD", {"temperature": 3.0, "gamma": 3.5}, 1.0, 1.0, 0),
    ("abnkd", "wrn_40_2-wrn_16_2"): ("NKD", {"temperature": 3.0, "gamma": 3.5}, 1.0, 1.0, 0),
    # MLKD's configs/cifar100/ours: T 4 + {3, 5, 2, 6}, CE 0.1, KD 0.9
    ("mlkd", "resnet32x4-resnet8x4"): ("MLKD", {"temperature": 4.0, "extra_temperatures": [3.0, 5.0, 2.0, 6.0]},
                                       0.1, 0.9, 0),
    ("abmlkd", "vgg13-vgg8"): ("MLKD", {"temperature": 4.0}, 0.1, 0.9, 0),
    # CTKD's run_cifar_distill.sh: KD, -r 0.1 -a 0.9
    ("ctkd", "resnet56-resnet20"): ("KD", {}, 0.1, 0.9, 0),
    ("abctkd", "resnet110-resnet32"): ("KD", {}, 0.1, 0.9, 0),
    # LS paper's logs: DKD (T, w, beta) with both DKD weights x w; CTKD (2, 9); MLKD (2, w)
    ("dkd_ls", "resnet32x4-resnet8x4"): ("DKD", {"temperature": 2.0, "tckd_weight": 9.0, "nckd_weight": 72.0},
                                         1.0, 1.0, 20),
    ("dkd_ls", "vgg13-vgg8"): ("DKD", {"temperature": 2.0, "tckd_weight": 15.0, "nckd_weight": 30.0}, 1.0, 1.0, 20),
    ("dkd_ls", "wrn_40_2-wrn_40_1"): ("DKD", {"temperature": 2.0, "tckd_weight": 12.0, "nckd_weight": 24.0},
                                      1.0, 1.0, 20),
    ("dkd_ls", "resnet56-resnet20"): ("DKD", {"temperature": 3.0, "tckd_weight": 18.0, "nckd_weight": 36.0},
                                      1.0, 1.0, 20),
    ("dkd_ls", "resnet110-resnet20"): ("DKD", {"temperature": 2.0, "tckd_weight": 15.0, "nckd_weight": 30.0},
                                       1.0, 1.0, 20),
    ("ctkd_ls", "vgg13-vgg8"): ("KD", {"standardize": True}, 0.1, 9.0, 0),
    ("mlkd_ls", "vgg13-vgg8"): ("MLKD", {"standardize": True, "temperature": 2.0,
                                         "extra_temperatures": [3.0, 5.0, 2.0, 6.0]}, 0.1, 6.0, 0),
    ("mlkd_ls", "resnet110-resnet20"): ("MLKD", {"temperature": 2.0}, 0.1, 9.0, 0),
}
# Values NOT published, filled in by the generator: each must say so in its file.
NOT_PUBLISHED = [("mlkd_ls", "resnet56-resnet20"), ("nkd", "vgg13-vgg8"), ("abnkd", "resnet56-resnet20"),
                 ("abmlkd", "wrn_40_2-wrn_40_1"), ("abctkd", "vgg13-vgg8")]


@pytest.mark.parametrize(("method", "pair"), list(PUBLISHED))
def test_published_method_settings(method, pair):
    head, head_args, ce_weight, kd_weight, warmup = PUBLISHED[method, pair]
    args = load_yaml(CONFIGS / method / f"{pair}.yaml")["model"]["init_args"]
    assert args["head"]["class_path"] == f"abkd_vision.heads.{head}"
    assert head_args.items() <= args["head"]["init_args"].items()
    assert (args["ce_weight"], args["kd_weight"], args["kd_warmup_epochs"]) == (ce_weight, kd_weight, warmup)


@pytest.mark.parametrize(("method", "pair"), NOT_PUBLISHED)
def test_unpublished_values_are_marked(method, pair):
    assert "NOT published" in (CONFIGS / method / f"{pair}.yaml").read_text(encoding="utf-8")


def test_ls_combinations_only_for_reported_pairs():
    for method in LS_METHODS:
        assert {p.stem for p in (CONFIGS / method).glob("*.yaml")} == set(LS_PAIRS)
    assert not (CONFIGS / "abdist").exists()  # DIST has no divergence: no AB variant


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
    two_views = "mlkd" in path.parent.name
    assert cfg.data.init_args.strong_view is two_views
    if two_views:
        assert cfg.model.init_args.lr == 0.025


@pytest.mark.parametrize("method", ALL_METHODS)
def test_distillation_config_instantiates(cli, method):
    cfg = parse(cli, CONFIGS / method / "resnet32x4-resnet8x4.yaml", "--model.init_args.teacher_ckpt", "null")
    instantiate = getattr(cli.parser, "instantiate", None) or cli.parser.instantiate_classes
    built = instantiate(cfg)
    model = built.model
    assert isinstance(model, DistillationModule) and model.num_classes == 100
    assert type(model.head) is HEAD_OF[method.removeprefix("ab")]
    ab = {**{m: TABLE4["resnet32x4-resnet8x4"][i] for i, m in enumerate(AB_METHODS)},
          **{m: TABLE4["resnet32x4-resnet8x4"][c] for m, c in NEW_AB_COLUMN.items()}}
    if method in ab:
        assert isinstance(model.head.divergence, AlphaBetaDivergence)
        assert (model.head.divergence.alpha, model.head.divergence.beta) == ab[method]
    assert model.head.standardize is (method.endswith("_ls") or method.endswith("lsd"))
    learned = getattr(model.head, "learned_temperature", None)
    assert isinstance(learned, CurriculumTemperature) is ("ctkd" in method)
    assert built.data.strong_view is ("mlkd" in method)


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


def print_config(path: Path) -> dict:
    result = subprocess.run(
        [sys.executable, "run.py", "fit", "--config", str(BASE), "--config", str(path), "--print_config"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return yaml.safe_load(result.stdout)


def test_print_config_subprocess():
    """One run.py subprocess (the in-process parse above covers every file): an AB variant of a two-view method."""
    printed = print_config(CONFIGS / "abmlkd" / "resnet32x4-resnet8x4.yaml")
    head = printed["model"]["init_args"]["head"]
    assert head["class_path"] == "abkd_vision.heads.MLKD"
    divergence = head["init_args"]["divergence"]["init_args"]
    assert (divergence["alpha"], divergence["beta"]) == (0.5, 0.5)  # Table 4's ABKD column for this pair
    assert printed["model"]["init_args"]["lr"] == 0.025 and printed["data"]["init_args"]["strong_view"] is True
    logger = printed["trainer"]["logger"]["init_args"]
    assert (logger["save_dir"], logger["name"]) == ("runs", "abmlkd/resnet32x4-resnet8x4")


# ------------------------------------------------------------------------------------------ fast_dev_run


def write_fake_cifar100(root: Path, n_train: int = 16, n_test: int = 8) -> Path:
    """A tiny dataset in the official ``cifar-100-python`` pickle format (random pixels and labels)."""
    return fake_cifar100(root, n_train, n_test)


FAST_PAIR = "resnet56-resnet20"
# One config per new method family, chosen to cover every new option once: DIST; NKD with D_AB; MLKD (two views,
# its lr) with D_AB; CTKD's learned temperature with standardisation; DKD with standardisation.
FAST_METHODS = ("dist", "abnkd", "abmlkd", "ctkd_ls", "dkd_ls")


@pytest.fixture(scope="module")
def fake_cifar(tmp_path_factory) -> tuple[Path, Path]:
    """Fake CIFAR-100 files and a random-weight resnet8 teacher in the published checkpoint format."""
    root = write_fake_cifar100(tmp_path_factory.mktemp("cifar"))
    teacher = root / "resnet8.pth"
    torch.save({"epoch": 240, "model": create_model("resnet8").state_dict(), "accuracy": 1.0}, teacher)
    return root, teacher


@pytest.mark.parametrize("method", FAST_METHODS)
def test_new_method_fast_dev_run(method, fake_cifar, tmp_path, monkeypatch):
    """The real run file through run.py's CLI, one training and one validation step on fake CIFAR-100. The networks
    are swapped for resnet8s (on a loaded 2-core machine resnet56's convolutions take seconds); the head, loss
    weights, lr and data options are the file's."""
    import torchvision.datasets.cifar as tv_cifar

    from abkd_vision.cli import main

    root, teacher = fake_cifar
    # torchvision checks the md5 of the official files on every load; the fake files cannot match it
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(BASE), "--config", str(CONFIGS / method / f"{FAST_PAIR}.yaml"),
            "--model.init_args.teacher", "resnet8", "--model.init_args.student", "resnet8",
            "--model.init_args.teacher_ckpt", str(teacher), "--data.init_args.root", str(root),
            "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "8",
            "--data.init_args.eval_batch_size", "8", "--trainer.accelerator", "cpu",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.fast_dev_run", "true",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    with mock.patch.dict(os.environ), mock.patch.object(sys, "argv", ["run.py"]):
        cli = main(args)
    model = cli.model
    assert type(model.head) is HEAD_OF[method.removeprefix("ab")]
    assert cli.trainer.global_step == 1 and cli.datamodule.strong_view is ("mlkd" in method)


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


# ------------------------------------------------------------------------------------------ sweep


def test_sweep_dry_run_lists_the_new_methods_and_alpha_beta_reaches_every_ab_config(tmp_path, capsys):
    """``--alpha-beta`` sets model.init_args.head.init_args.divergence: valid for every AB config of both settings;
    DIST (no divergence) is refused."""
    from abkd_vision.sweep.__main__ import main as sweep

    new = [*NEW_METHODS, *LS_METHODS]
    assert sweep(["--root", str(CONFIGS), "--methods", *new, "--settings", "resnet56-resnet20", "--seeds", "0",
                  "--out", str(tmp_path / "s"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert all(f"{m}__resnet56-resnet20__seed0" in out for m in new) and f"{len(new)} runs" in out
    b2n = ROOT / "configs" / "base_to_new"
    for root, ab, setting in ((CONFIGS, [*AB_METHODS, *NEW_AB_COLUMN], "vgg13-vgg8"),
                              (b2n, ["abkd", *NEW_AB_COLUMN], "EuroSAT")):
        assert sweep(["--root", str(root), "--methods", *ab, "--settings", setting, "--seeds", "0", "--alpha-beta",
                      "0.5,0.5", "--out", str(tmp_path / "ab"), "--dry-run"]) == 0
        assert sweep(["--root", str(root), "--methods", "dist", "--settings", setting, "--seeds", "0",
                      "--alpha-beta", "0.5,0.5", "--out", str(tmp_path / "ab"), "--dry-run"]) == 2
    assert "dist" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()  # a dry run starts nothing
