"""The CLIP base-to-new configs and their generator: up to date, Table 6's alpha/beta, lambda conventions, and
every file parses through the run.py parser composed with base.yaml."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import parse_only_cli

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "base_to_new"
BASE = CONFIGS / "base.yaml"
DATASETS = ("ImageNet", "Caltech101", "OxfordPets", "StanfordCars", "Flowers102", "Food101", "FGVCAircraft",
            "SUN397", "DTD", "EuroSAT", "UCF101")
KINDS = ("teacher", "zeroshot", "kd", "dkd", "lsd", "ttm", "abkd")
# ABKD paper, App. I.2.3, Table 6, typed from the paper independently of the generator.
TABLE6 = dict(zip(DATASETS, [(0.5, 0.5), (0.8, 0.2), (0.8, 0.4), (0.6, 0.4), (0.9, 0.1), (0.5, 0.5), (0.6, 0.5),
                             (0.8, 0.2), (1.0, 0.2), (0.6, 0.5), (0.8, 0.2)]))
NUM_CLASSES = dict(zip(DATASETS, [1000, 100, 37, 196, 102, 101, 100, 397, 47, 10, 101]))
PROMPTKD_LAMBDA_200 = {"Flowers102", "FGVCAircraft", "DTD"}  # PromptKD's KD_WEIGHT 200; 1000 elsewhere


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def test_generated_configs_are_up_to_date():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_base_to_new_configs.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_mode_detects_a_changed_file(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("_gen_b2n", ROOT / "scripts" / "make_base_to_new_configs.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.main(["--root", str(tmp_path)]) == 0
    edited = tmp_path / "configs/base_to_new/abkd/DTD.yaml"
    edited.write_text(edited.read_text().replace("alpha: 1.0", "alpha: 0.9"))
    capsys.readouterr()
    assert gen.main(["--root", str(tmp_path), "--check"]) == 1
    assert "abkd/DTD.yaml" in capsys.readouterr().out


@pytest.mark.parametrize("dataset", DATASETS)
def test_every_kind_and_dataset_has_a_config(dataset):
    for kind in KINDS:
        cfg = load_yaml(CONFIGS / kind / f"{dataset}.yaml")
        assert cfg["data"]["init_args"]["dataset"] == dataset
        assert cfg["trainer"]["logger"]["init_args"]["name"] == f"{kind}/{dataset}"


@pytest.mark.parametrize("dataset", DATASETS)
def test_alpha_beta_from_table6_and_lambda_conventions(dataset):
    args = {m: load_yaml(CONFIGS / m / f"{dataset}.yaml")["model"]["init_args"] for m in ("kd", "lsd", "dkd", "ttm",
                                                                                          "abkd")}
    div = args["abkd"]["head"]["init_args"]["divergence"]
    assert div["class_path"] == "abkd_vision.losses.AlphaBetaDivergence"
    assert (div["init_args"]["alpha"], div["init_args"]["beta"]) == TABLE6[dataset]
    promptkd = 200.0 if dataset in PROMPTKD_LAMBDA_200 else 1000.0
    # PromptKD's KD and the official LS loss divide by batch x classes; our heads by the batch only.
    assert args["kd"]["kd_weight"] == pytest.approx(promptkd / NUM_CLASSES[dataset])
    assert args["lsd"]["kd_weight"] == pytest.approx(1000.0 / NUM_CLASSES[dataset])
    assert (args["dkd"]["kd_weight"], args["ttm"]["kd_weight"], args["abkd"]["kd_weight"]) == (100.0, 1000.0, 100.0)
    assert all(a["head"]["init_args"].get("temperature", 1.0) in (1.0, 2.0) for a in args.values())
    for a in args.values():
        assert a["report_epoch"] == "best_base"
    teacher = load_yaml(CONFIGS / "teacher" / f"{dataset}.yaml")
    assert teacher["data"]["init_args"] == {"dataset": dataset, "train_classes": "base", "shots": 16}
    assert load_yaml(CONFIGS / "abkd" / f"{dataset}.yaml")["data"]["init_args"]["train_classes"] == "all"


@pytest.fixture(scope="module")
def cli():
    """The run.py CLI built once, without instantiating anything."""
    return parse_only_cli(BASE, CONFIGS / "teacher" / "EuroSAT.yaml")


@pytest.mark.parametrize("path", sorted(p for p in CONFIGS.rglob("*.yaml") if p != BASE),
                         ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_parses_with_base(cli, path):
    cfg = cli.parser.parse_args(["--config", str(BASE), "--config", str(path)])
    assert cfg.trainer.max_epochs == 20 and cfg.seed_everything == 1
    assert cfg.data.init_args.batch_size == 8 and cfg.data.init_args.eval_batch_size == 100
    assert cfg.trainer.logger.init_args.save_dir == "runs/base_to_new"
    assert cfg.model.init_args.lr == 0.005 and cfg.model.init_args.warmup_lr == 1e-5
