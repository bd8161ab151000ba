"""Honest tuning and reporting: held-out validation splits, a search that never reads the test images, confirmation
statistics, protocol records and their checks in the sweep tables, and the published numbers beside a sweep."""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_image_folder

from abkd_vision.cli import main as cli_main
from abkd_vision.cli import quiet_lightning
from abkd_vision.data import CIFAR100_CLASSES, CIFAR100DataModule, ImageFolderDataModule
from abkd_vision.data.image_folder import _ImageFolder
from abkd_vision.data.splits import class_quotas, draw_split, held_out_split
from abkd_vision.protocol import protocol_differences
from abkd_vision.search.__main__ import main as search_main
from abkd_vision.search.confirm import confirmation_runs, summarize
from abkd_vision.search.selection import plan_selection
from abkd_vision.search.space import SearchError
from abkd_vision.sweep import SweepError
from abkd_vision.sweep.__main__ import main as sweep_main
from abkd_vision.sweep.published import load_published
from abkd_vision.sweep.stats import paired_difference, t_quantile_975
from abkd_vision.sweep.store import all_runs
from abkd_vision.sweep.tables import collect_rows, write_outputs

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


# -- the split ----------------------------------------------------------------------------------------------------
def test_split_is_stratified_disjoint_seeded_and_recorded(tmp_path):
    labels = [0] * 50 + [1] * 30 + [2] * 20  # uneven classes
    assert class_quotas({0: 50, 1: 30, 2: 20}, 0.1) == {0: 5, 1: 3, 2: 2}
    assert class_quotas({0: 50, 1: 30, 2: 20}, 7) == {0: 4, 1: 2, 2: 1}  # 3.5/2.1/1.4: the largest remainder
    val = draw_split(labels, 0.2, seed=3)
    assert [sum(labels[i] == c for i in val) for c in range(3)] == [10, 6, 4]  # stratified per class
    assert val == draw_split(labels, 0.2, seed=3) and val != draw_split(labels, 0.2, seed=4)
    path = tmp_path / "splits" / "study.json"
    split = held_out_split(labels, 0.2, 3, "toy", path=path)
    assert split.val_indices == val and sorted(split.val_indices + split.train_indices) == list(range(100))
    record = json.loads(path.read_text())
    assert record["val_indices"] == val and (record["num_val"], record["num_train"], record["seed"]) == (20, 80, 3)
    again = held_out_split(labels, 0.2, 3, "toy", path=path)  # read back, not drawn again
    assert again.record["val_sha256"] == split.record["val_sha256"]
    with pytest.raises(ValueError, match="drawn for another training set"):
        held_out_split(labels[::-1], 0.2, 3, "toy", path=path)
    with pytest.raises(ValueError, match="drawn by seed 3, but val_split 0.2 and val_split_seed 4"):
        held_out_split(labels, 0.2, 4, "toy", path=path)
    names = ["apple", "bear", "cloud"]
    with pytest.raises(ValueError, match=r"class\(es\) 'cloud' without any validation image"):
        draw_split([0] * 50 + [1] * 49 + [2], 0.02, 0, names)  # 2 images held out: apple's and bear's
    with pytest.raises(ValueError, match=r"class\(es\) 'bear' without any training image"):
        draw_split([0] * 10 + [1], 0.5, 0, names)
    with pytest.raises(ValueError, match="as large as the training set"):
        draw_split(labels, 100, 0)


def _cifar(root: Path, monkeypatch) -> Path:
    """A CIFAR-100 tree with 8 training images of each of 5 classes and an unreadable test file."""
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train = {"data": rng.integers(0, 256, (40, 3072), dtype=np.uint8), "fine_labels": [i % 5 for i in range(40)],
             "coarse_labels": [0] * 40}
    (folder / "train").write_bytes(pickle.dumps(train, protocol=2))
    (folder / "test").write_bytes(b"not a pickle: any read of the test split fails")
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": list(CIFAR100_CLASSES)}))
    return root


def test_cifar_held_out_split_never_loads_the_test_split(tmp_path, monkeypatch):
    dm = CIFAR100DataModule(str(_cifar(tmp_path, monkeypatch)), val_split=0.25, val_split_seed=1, num_workers=0,
                            batch_size=4, eval_batch_size=5)
    dm.setup("fit")  # would fail on the test file if it were read
    assert dm.test_set is None and dm.val_is == "held-out split of the training set"
    train, val = list(dm.train_set.indices), list(dm.val_set.indices)
    assert len(val) == 10 and not set(train) & set(val) and sorted(train + val) == list(range(40))
    assert sorted(dm.train_set.dataset.targets[i] for i in val) == sorted(list(range(5)) * 2)  # 2 per class
    x, y = next(iter(dm.val_dataloader()))
    from PIL import Image

    expected = torch.stack([dm.eval_transform(Image.fromarray(dm.train_set.dataset.data[i])) for i in val[:5]])
    torch.testing.assert_close(x, expected)  # the held-out images, with the evaluation transform
    assert dm.view_dataset_key()["val_split_sha256"] == dm.val_holdout.record["val_sha256"]
    with pytest.raises(pickle.UnpicklingError):  # the test split is read by test (and here it cannot be)
        dm.setup("test")
    paper = CIFAR100DataModule(str(tmp_path), num_workers=0)
    assert paper.val_is == "test split (paper protocol)"


def test_fit_validates_on_held_out_images_and_tests_on_the_test_split(tmp_path, monkeypatch):
    """Every image read is recorded: during the fit only training files (the held-out ones with the evaluation
    transform, exactly val_split.json's), the test files only in the final tests, after the fit."""
    quiet_lightning()
    data = tiny_image_folder(tmp_path / "data", 24, 9, separable=False)
    reads: list[tuple[str, object]] = []
    original = _ImageFolder.__getitem__

    def recording(self, index):
        reads.append((self.samples[index][0], self.transform))
        return original(self, index)

    monkeypatch.setattr(_ImageFolder, "__getitem__", recording)
    args = ["fit", "--model", "abkd_vision.lit.ClassifierModule", "--model.init_args.model", "resnet8",
            "--data", "abkd_vision.data.ImageFolderDataModule", "--data.init_args.root", str(data),
            "--data.init_args.image_size", "16", "--data.init_args.num_workers", "0",
            "--data.init_args.batch_size", "6", "--data.init_args.val_split", "6", "--trainer.accelerator", "cpu",
            "--trainer.max_epochs", "2", "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.logger.init_args.name", "r",
            "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            "--trainer.callbacks.monitor=val/acc1", "--trainer.callbacks.mode=max", *QUIET]
    with warnings.catch_warnings():  # LightningCLI warns about args given beside pytest's sys.argv
        warnings.filterwarnings("ignore", message=r".*args parameter is intended to run from within Python.*")
        cli = cli_main(args)
    run = tmp_path / "runs" / "r" / "version_0"
    split = json.loads((run / "val_split.json").read_text())
    train_files = [p for p, _ in _ImageFolder(str(data / "train")).samples]
    held = {train_files[i] for i in split["val_indices"]}
    assert split["num_val"] == 6 and len(held) == 6
    test_dir = str(data / "test")
    first_test = next(i for i, (p, _) in enumerate(reads) if p.startswith(test_dir))
    assert not any(p.startswith(test_dir) for p, _ in reads[:first_test]) and \
        all(p.startswith(test_dir) for p, _ in reads[first_test:])  # test files only after the fit
    evaluated = {p for p, t in reads[:first_test] if t is cli.datamodule.eval_transform}
    trained = {p for p, t in reads[:first_test] if t is cli.datamodule.train_transform}
    assert evaluated == held and not trained & held  # val/* on exactly the held-out images
    assert len(reads) - first_test == 2 * 9  # the last and the best held-out epoch, each on the 9 test images
    results = json.loads((run / "results.json").read_text())
    assert results["finished"] and set(results["test"]) == {"last", "best_val"}
    protocol = results["protocol"]
    assert protocol["val_is"] == "held-out split of the training set" and protocol["val_split"]["num_val"] == 6
    assert protocol["train_images"] == 18 and protocol["epochs"] == 2 and protocol["global_batch"] == 6
    assert protocol["selection"]["val_acc1_best"].startswith("best epoch on held-out")
    assert protocol["selection"]["test"] == {"last": "last epoch (on test)",
                                             "best_val": "best epoch on held-out (on test)"}
    assert protocol["versions"]["torch"] and "RandomCrop" in protocol["augmentation"]
    logged = (run / "metrics.csv").read_text().splitlines()[0]
    assert "val/acc1" in logged and "test/acc1" in logged
    for name in "abc":  # a val/ folder is the validation split already
        (data / "val" / name).mkdir(parents=True)
        (data / "val" / name / "x.png").write_bytes(next((data / "train" / name).iterdir()).read_bytes())
    with pytest.raises(ValueError, match="give one or the other"):
        ImageFolderDataModule(str(data), val_split=0.2)


# -- the search ---------------------------------------------------------------------------------------------------
FAKE_RUN = textwrap.dedent('''
    """A stand-in run.py for confirmation runs: last-epoch test top-1 from alpha and the seed."""
    import json, pathlib, sys
    args = sys.argv[1:]
    get = lambda key: args[args.index(key) + 1]
    key = "--model.init_args.head.init_args.divergence.init_args.alpha"
    alpha, seed = float(get(key)), int(get("--seed_everything"))
    assert get("--data.init_args.val_split") == "null"  # the full training set
    acc = {1.0: [0.60, 0.62, 0.61]}.get(alpha, [0.63, 0.62, 0.64])[seed]
    run = pathlib.Path(get("--trainer.logger.init_args.save_dir")) / get("--trainer.logger.init_args.name")
    run = run / "version_0"
    run.mkdir(parents=True, exist_ok=True)
    protocol = {"val_is": "test split (paper protocol)", "epochs": 1, "precision": "32-true"}
    (run / "results.json").write_text(json.dumps({"finished": True, "val_acc1_best": acc + 0.01, "best_epoch": 0,
                                                  "val_acc1_last": acc, "epochs": 1, "protocol": protocol}))
''')


def test_search_ranks_on_held_out_never_reads_test_and_confirms(tmp_path, capsys):
    """Every test image is garbage: the held-out search completes; with --select-on-test it cannot."""
    from abkd_vision.models import create_model

    quiet_lightning()
    data = tiny_image_folder(tmp_path / "data", 30, 6)
    for path in (data / "test").rglob("*.png"):
        path.write_bytes(b"not an image")
    teacher = tmp_path / "teacher.pt"
    torch.save(create_model("resnet8", num_classes=3).state_dict(), teacher)
    run = ["--config", str(DEMO / "base.yaml"), "--config", str(DEMO / "abkd.yaml"), "--model.init_args.teacher",
           "resnet8", "--model.init_args.teacher_ckpt", str(teacher), "--data.init_args.root", str(data),
           "--data.init_args.batch_size", "8", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
           "--trainer.num_sanity_val_steps", "0"]
    fake = tmp_path / "fake" / "run.py"
    fake.parent.mkdir()
    fake.write_text(FAKE_RUN)
    out = tmp_path / "search"
    code = search_main(["--threads", "1", "--out", str(out), "--grid-alpha", "0.5", "1.0", "--grid-beta", "0.0",
                        "--val-split", "0.2", "--confirm-top", "1", "--confirm-seeds", "0", "1", "2", "--baseline",
                        "fkl", "--run-script", str(fake), *run])
    stdout, err = capsys.readouterr()
    assert code == 0, stdout + err
    best = json.loads((out / "best.json").read_text())
    assert best["held_out"] is True and best["selected_on"].startswith("held-out split of the training set")
    assert "search (held-out)" in best["numbers"]["value"] and best["numbers"]["confirmation"].startswith("test:")
    values = {}
    for trial in (out / "trials").iterdir():
        results = json.loads((trial / "results.json").read_text())
        assert results["protocol"]["val_is"] == "held-out split of the training set"
        assert results["protocol"]["val_split"]["num_val"] == 6 and results["protocol"]["train_images"] == 24
        assert "test" not in results  # the search never tests
        values[trial.name] = results["val_acc1_best"]
    assert best["value"] == pytest.approx(max(values.values()))  # ranked on the held-out accuracy
    assert "on the held-out split of the training set" in stdout
    # confirmation: the best point and forward KL, 3 seeds, on the (stand-in) test numbers
    conf = best["confirmation"]
    point = conf["points"][0]
    assert (point["alpha"], point["beta"]) == (best["alpha"], best["beta"])
    if best["alpha"] != 1.0:  # the stand-in's numbers: point 63/62/64, baseline 60/62/61
        assert point["paired"]["differences"] == pytest.approx([3.0, 0.0, 3.0])
        # mean 2, std sqrt((1 + 4 + 1) / 2) = sqrt(3): half-width t(0.975, 2) * sqrt(3) / sqrt(3)
        assert point["paired"]["ci95"] == pytest.approx([2.0 - 4.302653, 2.0 + 4.302653])
    assert conf["baseline"]["mean"] == pytest.approx(61.0) and conf["baseline"]["n"] == 3
    assert (out / "confirmation.md").read_text().startswith("# Confirmation on the test split")
    assert "confirmation on test (top-1 on test, last epoch" in stdout

    # the paper's way: ranked on the (garbage) test images, so every trial fails; the outputs say so
    code = search_main(["--threads", "1", "--out", str(tmp_path / "paper"), "--grid-alpha", "1.0", "--grid-beta",
                        "0.0", "--select-on-test", *run])
    capsys.readouterr()
    assert code == 1
    paper = json.loads((tmp_path / "paper" / "best.json").read_text())
    assert paper["held_out"] is False and paper["selected_on"].startswith("selected on test")


def test_base_to_new_search_ranks_on_the_val_split_and_never_reads_the_test_images(tmp_path, capsys):
    """A real base-to-new search (tiny CLIPs, a generated DTD whose test images are all garbage): it runs on CoOp's
    val split, ranks on the val HM and completes."""
    from abkd_vision.data.synthetic import write_fake_coop_dataset
    from abkd_vision.models.clip import PromptedCLIP, prompt_parameters

    quiet_lightning()
    data = tmp_path / "data"
    folder = write_fake_coop_dataset(data, "DTD", num_classes=4, train_per_class=2, test_per_class=1)
    split = json.loads(next(folder.glob("split_*.json")).read_text())
    for rel, *_ in split["test"]:
        (next(p for p in folder.rglob(Path(rel).name) if p.is_file())).write_bytes(b"not an image")
    torch.manual_seed(0)
    teacher = PromptedCLIP("abkd-tiny-vit-large-quickgelu", None, text_depth=2, vision_depth=2)
    prompts = tmp_path / "teacher_prompts.pt"
    torch.save({k: v.detach() for k, v in prompt_parameters(teacher)}, prompts)
    b2n = REPO / "configs" / "base_to_new"
    run = ["--config", str(b2n / "base.yaml"), "--config", str(b2n / "abkd" / "DTD.yaml"),
           "--model.init_args.teacher_arch", "abkd-tiny-vit-large-quickgelu", "--model.init_args.teacher_pretrained",
           "null", "--model.init_args.teacher_text_depth", "2", "--model.init_args.teacher_vision_depth", "2",
           "--model.init_args.student_arch", "abkd-tiny-vit-quickgelu", "--model.init_args.student_pretrained",
           "null", "--model.init_args.student_vision_depth", "2", "--model.init_args.teacher_ckpt", str(prompts),
           "--data.init_args.root", str(data), "--data.init_args.image_size", "32", "--data.init_args.num_workers",
           "0", "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
           "--trainer.num_sanity_val_steps", "0"]
    out = tmp_path / "search"
    code = search_main(["--threads", "1", "--out", str(out), "--grid-alpha", "0.5", "1.0", "--grid-beta", "0.2",
                        *run])
    stdout, err = capsys.readouterr()
    assert code == 0, stdout + err
    best = json.loads((out / "best.json").read_text())
    assert best["held_out"] is True and "CoOp val split" in best["selected_on"]
    hms = []
    for trial in (out / "trials").iterdir():
        results = json.loads((trial / "results.json").read_text())
        assert results["protocol"]["val_is"] == "CoOp val split (held out)"
        assert results.get("test") is None  # the search never tests
        hms.append(results["reported"]["hm"])
    assert len(hms) == 2 and best["value"] in (pytest.approx(max(hms)), pytest.approx(100 * max(hms)))


def test_selection_plans_and_bad_confirmation_input(tmp_path, capsys):
    cifar = {"has_val_split": True, "val_split": None, "val_is": "test split (paper protocol)", "monitor": "val/acc1"}
    args, sel = plan_selection(cifar, False, 0.1, 2)
    assert args == ["--data.init_args.val_split", "0.1", "--data.init_args.val_split_seed", "2"] and sel["held_out"]
    assert plan_selection(cifar, True, 0.1, 2)[1]["selected_on"] == "selected on test (test split (paper protocol))"
    b2n = {"eval_split": "test", "dataset": "DTD", "monitor": "val/hm"}
    assert plan_selection(b2n, False, 0.1, 0)[0] == ["--data.init_args.eval_split", "val"]
    with pytest.raises(SearchError, match="ImageNet has no val split"):
        plan_selection({**b2n, "dataset": "ImageNet"}, False, 0.1, 0)
    with pytest.raises(SearchError, match="give --select-on-test"):
        plan_selection({"data": "Other", "monitor": "val/acc1"}, False, 0.1, 0)
    base = ["--out", str(tmp_path / "s"), "--config", str(DEMO / "base.yaml")]
    for extra, message in ((["--confirm-top", "1", "--confirm-seeds", "0"], "give --baseline fkl"),
                           (["--confirm-top", "1", "--baseline", "fkl"], "needs the seeds"),
                           (["--confirm-seeds", "0"], "add --confirm-top K"),
                           (["--val-split", "1.5"], "a fraction must lie in (0, 1)")):
        assert search_main([*base, *extra]) == 2
        assert message in capsys.readouterr().err.strip().splitlines()[-1]


# -- confirmation statistics ------------------------------------------------------------------------------------
def test_paired_statistics_against_a_hand_computation():
    a, b = {0: 50.0, 1: 52.0, 2: 49.0}, {0: 48.0, 1: 50.0, 2: 49.0, 7: 10.0}  # seed 7 has no partner
    d = paired_difference(a, b)
    # differences 2, 2, 0: mean 4/3; std sqrt(((2/3)^2 * 2 + (4/3)^2) / 2) = sqrt(4/3); t(0.975, 2) = 4.302653
    assert d["seeds"] == [0, 1, 2] and d["differences"] == [2.0, 2.0, 0.0]
    assert d["diff_mean"] == pytest.approx(4 / 3) and d["diff_std"] == pytest.approx(math.sqrt(4 / 3))
    half = 4.302653 * math.sqrt(4 / 3) / math.sqrt(3)
    assert d["ci95"] == pytest.approx([4 / 3 - half, 4 / 3 + half]) and d["excludes_zero"] is False
    assert (d["mean_a"], d["std_a"]) == pytest.approx((151 / 3, math.sqrt(7 / 3)))
    assert t_quantile_975(1) == 12.706205 and t_quantile_975(35) == 2.042272 and t_quantile_975(500) == 1.959964
    assert paired_difference({0: 1.0}, {0: 0.5})["ci95"] is None
    points = [{"alpha": 0.8, "beta": 0.3, "trial": 4, "search_value": 0.9}]
    runs, plan = confirmation_runs(points, [0, 1, 2], [str(DEMO / "abkd.yaml")], "fkl", None)
    assert len(runs) == 6 and plan["baseline"][0].run_id == "search__abkd__seed0__alpha=1.0__beta=0.0"
    rows = [{"run_id": r.run_id, "status": "finished", "kind": "classification", "val_is": None,
             "last_top1": (a if r in plan["points"][0] else b)[r.seed]} for r in runs]
    record = summarize(rows, points, plan, [0, 1, 2])
    assert record["points"][0]["paired"]["ci95"] == pytest.approx(d["ci95"]) and not record["missing"]
    assert record["baseline"]["mean"] == pytest.approx(49.0)
    with pytest.raises(SearchError, match="give --baseline fkl"):
        confirmation_runs(points, [0], [str(DEMO / "abkd.yaml")], None, None)


# -- protocols in the tables, and the published numbers ------------------------------------------------------------
PAPER = {"data": "CIFAR100DataModule", "num_classes": 100, "train_images": 50000, "val_is": "test split (paper "
         "protocol)", "test_is": "test split", "val_split": None, "epochs": 240, "max_steps": None,
         "limit_train_batches": 1.0,
         "augmentation": "RandomCrop(size=(32, 32), padding=4) + RandomHorizontalFlip(p=0.5) + ToTensor() + ...",
         "strong_view": False, "batch_size": 64, "devices": 1,
         "accumulate_grad_batches": 1, "global_batch": 64, "precision": "32-true",
         "selection": {"val_acc1_best": "best epoch on test (top-1 on test)", "val_acc1_last": "last epoch"},
         "versions": {"torch": "x"}}


def _put(out: Path, run_id: str, result: dict) -> None:
    folder = out / "runs" / run_id / "version_0"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"finished": True, **result}))


def test_tables_name_rules_refuse_mixed_protocols_and_set_cells_beside_the_papers(tmp_path, capsys):
    out = tmp_path / "sweep"
    for seed, (acc, last) in enumerate(((0.7350, 0.7300), (0.7420, 0.7390), (0.7390, 0.7330))):
        _put(out, f"kd__ResNet50-vgg8__seed{seed}", {"val_acc1_best": acc, "val_acc1_last": last, "best_epoch": 230,
                                                    "protocol": {**PAPER, "versions": {"torch": str(seed)}}})
        small = {**PAPER, "epochs": 2, "train_images": 150}
        _put(out, f"kd__resnet56-resnet20__seed{seed}", {"val_acc1_best": 0.30 + seed / 100, "val_acc1_last": 0.29,
                                                        "best_epoch": 1, "protocol": small})
        held = {**small, "val_is": "held-out split of the training set"}
        _put(out, f"abkd__resnet56-resnet20__seed{seed}", {"val_acc1_best": 0.5, "val_acc1_last": 0.4,
                                                          "test": {"last": {"acc1": 0.33}, "best_val": {"acc1": 0.34}},
                                                          "protocol": held})
    assert sweep_main(["--out", str(out), "--report-only"]) == 0
    tables = (out / "tables.md").read_text()
    for title in ("Best epoch, selected on test (the papers' convention: optimistic)",
                  "Last epoch (no selection), on test", "Test, last epoch (no selection; val split held out)",
                  "Test, best epoch on held-out (selected on held-out images)",
                  "Held-out, best epoch (selected on held-out)"):
        assert f"### {title}" in tables, title
    assert "| kd | 31.00 ± 1.00 | 73.87 ± 0.35 |" in tables and "| abkd | 34.00 ± 0.00 | – |" in tables
    section = tables.split("## Beside the published numbers (%)")[1]
    # published 73.81 (Table 12, runs not stated): +0.06, inside 73.50..74.20, at the paper's protocol
    assert ("| kd | ResNet50-vgg8 | top1 | 73.87 ± 0.35 (best epoch, selected on test) | 3 | 73.81 | abkd_table12 "
            "(runs not stated) | +0.06 | yes | yes |") in section
    assert ("| kd | resnet56-resnet20 | top1 | 31.00 ± 1.00 (best epoch, selected on test) | 3 | 70.66 (0.24) | "
            "abkd_table11 (runs not stated) | -39.66 | no | no: train_images 150 (paper 50000), epochs 2 (paper 240) |"
            ) in section
    assert "| 70.66 | ls_readme (4 runs) | -39.66 | no | no:" in section  # the same cell beside the LS table's KD
    assert ("| abkd | resnet56-resnet20 | top1 | 34.00 ± 0.00 (test, best epoch on held-out) | 3 | 71.79 (0.16) | "
            "abkd_table11 (runs not stated) | -37.79 | no | no: train_images 150 (paper 50000), epochs 2 (paper 240), "
            "val_is held-out split of the training set") in section  # test accuracy at the best held-out epoch
    # one seed at another precision: that cell is not averaged, the error names the field and the runs
    _put(out, "kd__vgg13-vgg8__seed0", {"val_acc1_best": 0.7, "val_acc1_last": 0.7, "protocol": PAPER})
    _put(out, "kd__vgg13-vgg8__seed1", {"val_acc1_best": 0.7, "val_acc1_last": 0.7,
                                        "protocol": {**PAPER, "precision": "bf16-mixed"}})
    assert sweep_main(["--out", str(out), "--report-only"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "kd on vgg13-vgg8 (2 runs) differ in precision ('32-true' in kd__vgg13-vgg8__seed0; 'bf16-mixed' in " \
           "kd__vgg13-vgg8__seed1)" in err
    assert "## Not averaged" in (out / "tables.md").read_text() and (out / "results.csv").is_file()
    assert protocol_differences([("a", PAPER), ("b", None)]) == ["protocol (not recorded in b)"]
    with pytest.raises(SweepError, match="differ in precision"):
        write_outputs(collect_rows(out, all_runs(out)), out)


def test_base_to_new_tables_add_a_test_section_for_held_out_val_splits(tmp_path):
    """eval_split: val runs: the val tables say so, and a second set of tables gives the test-split numbers
    (written by the run after its fit), never mixing the two."""
    out = tmp_path / "sweep"
    held = {"data": "BaseToNewDataModule", "val_is": "CoOp val split (held out)", "epochs": 2}
    for seed, (vb, vn, tb, tn) in enumerate(((0.90, 0.70, 0.80, 0.60), (0.92, 0.72, 0.84, 0.64))):
        _put(out, f"abkd__DTD__seed{seed}", {
            "report_epoch": "last", "reported": {"base_acc": vb, "new_acc": vn}, "last": {"base_acc": vb,
            "new_acc": vn}, "best_base": {"base_acc": vb, "new_acc": vn}, "test": {"base_acc": tb, "new_acc": tn,
            "hm": 2 * tb * tn / (tb + tn)}, "protocol": held})
    assert sweep_main(["--out", str(out), "--report-only"]) == 0
    tables = (out / "tables.md").read_text()
    val, test = tables.split("## Base-to-new on the test split (%)")
    assert "numbers on the held-out val split" in val and "| abkd | 2 | 91.00 ± 1.41 | 71.00 ± 1.41 | 79.77 |" in val
    assert "### DTD, test split" in test and "the last epoch's prompts" in test
    hm = 2 * 82 * 62 / (82 + 62)
    assert f"| abkd | 2 | 82.00 ± 2.83 | 62.00 ± 2.83 | {hm:.2f} |" in test
    assert f"| abkd | 82.00 | 62.00 | {hm:.2f} | {hm:.2f} |" in test  # the 1-dataset average
    # runs validated on the test split get no second section
    (out / "runs").rename(tmp_path / "held_runs")
    _put(out, "abkd__DTD__seed0", {"report_epoch": "last", "reported": {"base_acc": 0.9, "new_acc": 0.7},
                                   "last": {"base_acc": 0.9, "new_acc": 0.7}, "protocol": {
                                       **held, "val_is": "test split (paper protocol)"}})
    assert sweep_main(["--out", str(out), "--report-only"]) == 0
    assert "on the test split (%)" not in (out / "tables.md").read_text()


def test_published_numbers_are_the_ones_the_docs_quote():
    from test_sweep import DATASETS, TABLE14

    published = load_published()
    value = {(e["source"], e["method"], e["setting"], e["metric"], tuple(e.get("alpha_beta") or ())): e
             for e in published["entries"]}
    readme = (REPO / "docs" / "cifar100.md").read_text()  # the CIFAR-100 guide quotes them
    table = readme.split("Published numbers of the other methods")[1].split("Sources and protocols")[0]
    lines = [line.strip() for line in table.splitlines() if line.strip().startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    pairs = [re.sub(r"\s*→\s*", "-", h) for h in header[1:]]
    checked = 0
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != len(header):
            continue
        method = re.search(r"\(`(\w+)`\)", cells[0]).group(1)
        source = "dist_readme" if method == "dist" else "ls_readme_mlkd" if method.startswith("mlkd") else "ls_readme"
        for pair, cell in zip(pairs, cells[1:]):
            if cell == "–":
                continue
            number = float(cell.split("±")[0])
            entry = value[(source, method, pair, "top1", ())]
            assert entry["value"] == number, (method, pair)
            if "±" in cell:
                assert entry["std"] == float(cell.split("±")[1])
            checked += 1
    assert checked == 8 * 7 + 3  # 8 rows of 7 pairs; DIST has three
    for method, v in (("kd", 73.81), ("abkd", 74.62), ("dkd", 74.37), ("abdkd", 75.26), ("lsd", 74.52),
                      ("ablsd", 74.77), ("ttm", 74.87), ("abttm", 75.02)):  # the guide's Tab. 12 rows
        assert value[("abkd_table12", method, "ResNet50-vgg8", "top1", ())]["value"] == v
        assert f"{v:.2f}" in readme
    for setting, fkl, rkl, ab in (("resnet56-resnet20", 70.66, 71.43, 71.79), ("resnet110-resnet20", 70.67, 71.41,
                                                                               71.72)):
        assert value[("abkd_table11", "kd", setting, "top1", ())]["value"] == fkl
        assert value[("abkd_table11", "abkd", setting, "top1", (0.0, 1.0))]["value"] == rkl
        assert value[("abkd_table11", "abkd", setting, "top1", ())]["value"] == ab
        assert f"{fkl} / {rkl} / {ab}" in readme
    names = {"ABKD": "abkd", "KD": "kd", "DKD": "dkd", "LSD": "lsd"}
    for name, (rows, average) in TABLE14.items():
        for dataset, row in zip(DATASETS, rows):
            got = tuple(value[("abkd_table14", names[name], dataset, m, ())]["value"] for m in ("base", "new", "hm"))
            assert got == row, (name, dataset)
        assert tuple(value[("abkd_table14", names[name], "average", m, ())]["value"]
                     for m in ("base", "new", "hm")) == average
    assert published["sources"]["ls_readme"]["runs"] == 4 and published["sources"]["abkd_table12"]["runs"] is None
    assert published["sources"]["ls_readme_mlkd"]["protocol"]["epochs"] == 480
