"""CLIP base-to-new end to end through run.py, on tiny open_clip models and generated CoOp-layout datasets:
teacher prompt tuning, zero-shot evaluation, prompt distillation with every head, checkpoints, results, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from abkd_vision.cli import main as cli_main
from abkd_vision.data.synthetic import write_fake_coop_dataset
from abkd_vision.heads import DKD, KD, LSD, TTM
from abkd_vision.lit import PromptDistillationModule, PromptTuningModule
from abkd_vision.losses import AlphaBetaDivergence
from abkd_vision.metrics import BaseNewAccuracy, harmonic_mean

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "base_to_new"
SHARED_CIFAR10 = REPO.parent / "shared" / "data" / "cifar10"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
TINY_TEACHER = ["--model.init_args.arch", "abkd-tiny-vit-large-quickgelu", "--model.init_args.pretrained", "null",
                "--model.init_args.text_depth", "3", "--model.init_args.vision_depth", "3"]
TINY_DISTILL = ["--model.init_args.teacher_arch", "abkd-tiny-vit-large-quickgelu",
                "--model.init_args.teacher_pretrained", "null", "--model.init_args.teacher_text_depth", "3",
                "--model.init_args.teacher_vision_depth", "3", "--model.init_args.student_arch",
                "abkd-tiny-vit-quickgelu", "--model.init_args.student_pretrained", "null",
                "--model.init_args.student_vision_depth", "3"]


@pytest.fixture(scope="module")
def eurosat(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coop")
    write_fake_coop_dataset(root, "EuroSAT", num_classes=10, train_per_class=4, test_per_class=3, val_per_class=1,
                            image_size=32, seed=0)
    return root


def _data_args(root: Path, runs: Path, name: str) -> list[str]:
    return ["--data.init_args.root", str(root), "--data.init_args.image_size", "32",
            "--data.init_args.num_workers", "0", "--data.init_args.eval_batch_size", "16",
            "--trainer.accelerator", "cpu", "--trainer.logger.init_args.save_dir", str(runs),
            "--trainer.logger.init_args.name", name, "--trainer.logger.init_args.version", "0", *QUIET]


@pytest.fixture(scope="module")
def teacher_run(eurosat, tmp_path_factory) -> Path:
    """A tiny teacher prompt-tuned for 2 epochs of 2 steps through the real configs; returns its run folder."""
    runs = tmp_path_factory.mktemp("runs")
    cli_main(["fit", "--config", str(CONFIGS / "base.yaml"), "--config", str(CONFIGS / "teacher" / "EuroSAT.yaml"),
              *TINY_TEACHER, *_data_args(eurosat, runs, "teacher"), "--trainer.max_epochs", "2",
              "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"])
    return runs / "teacher" / "version_0"


def test_teacher_training_fast_dev_run(eurosat, tmp_path):
    cli = cli_main(["fit", "--config", str(CONFIGS / "base.yaml"), "--config", str(CONFIGS / "teacher/EuroSAT.yaml"),
                    *TINY_TEACHER, *_data_args(eurosat, tmp_path, "t"), "--trainer.fast_dev_run", "true"])
    module = cli.model
    assert isinstance(module, PromptTuningModule)
    assert module.class_names[:2] == ["Annual Crop Land", "Forest"] and module.num_base_classes == 5
    assert module.hparams.scl_text_weight == 25.0  # PromptSRC's consistency terms are on in the teacher configs


def test_teacher_run_writes_results_and_a_prompts_only_checkpoint(teacher_run):
    results = json.loads((teacher_run / "results.json").read_text())
    assert results["finished"] is True and results["report_epoch"] == "last"
    assert [h["epoch"] for h in results["history"]] == [0, 1]
    last = results["last"]
    assert last == results["reported"] and last["hm"] == pytest.approx(harmonic_mean(last["base_acc"],
                                                                                     last["new_acc"]), abs=1e-6)
    ckpt = torch.load(teacher_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    keys = set(ckpt["state_dict"])
    assert keys and all(k.endswith((".prompt", ".ctx")) for k in keys), sorted(keys)[:5]
    assert len(keys) == 1 + 2 + 1 + 2  # text ctx + 2 deep, vision input + 2 deep
    assert ckpt["class_names"][-1] == "Sea or Lake" and ckpt["num_base_classes"] == 5


def test_zero_shot_evaluation_through_run_py(eurosat, tmp_path):
    cli = cli_main(["test", "--config", str(CONFIGS / "base.yaml"), "--config", str(CONFIGS / "zeroshot/EuroSAT.yaml"),
                    "--model.init_args.arch", "abkd-tiny-vit-quickgelu", "--model.init_args.pretrained", "null",
                    *_data_args(eurosat, tmp_path, "zs")])
    module = cli.model
    assert not any(p.requires_grad for p in module.parameters())
    results = json.loads((tmp_path / "zs" / "version_0" / "results.json").read_text())
    test = results["test"]
    # every test image counted once: 5 base classes x 3 and 5 new classes x 3, with accuracy a multiple of 1/15
    assert test["base_acc"] * 15 == pytest.approx(round(test["base_acc"] * 15), abs=1e-5)
    assert test["hm"] == pytest.approx(harmonic_mean(test["base_acc"], test["new_acc"]), abs=1e-6)
    assert module.text_cache.computed == 1  # both groups and all batches from one text-tower pass


def test_base_new_accuracy_is_micro_and_counts_each_sample_once():
    metric = BaseNewAccuracy()
    metric.update(torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), torch.tensor([0, 1, 1]), "base")  # 2/3
    metric.update(torch.tensor([[0.0, 1.0]]), torch.tensor([1]), "new")  # 1/1
    out = metric.compute()
    assert out["base_acc"] == pytest.approx(2 / 3) and out["new_acc"] == 1.0
    assert out["hm"] == pytest.approx(2 * (2 / 3) / (2 / 3 + 1))
    with pytest.raises(ValueError, match="group must be one of"):
        metric.update(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), "novel")


HEADS = {"kd": KD, "dkd": DKD, "lsd": LSD, "ttm": TTM, "abkd": KD}


@pytest.mark.parametrize("method", list(HEADS))
def test_distillation_fast_dev_run_with_every_head(method, eurosat, teacher_run, tmp_path):
    cli = cli_main(["fit", "--config", str(CONFIGS / "base.yaml"), "--config", str(CONFIGS / method / "EuroSAT.yaml"),
                    *TINY_DISTILL, "--model.init_args.teacher_ckpt", str(teacher_run / "checkpoints" / "last.ckpt"),
                    *_data_args(eurosat, tmp_path, method), "--trainer.fast_dev_run", "true"])
    module = cli.model
    assert isinstance(module, PromptDistillationModule) and isinstance(module.head, HEADS[method])
    if method == "abkd":
        assert isinstance(module.head.divergence, AlphaBetaDivergence)
        assert (module.head.divergence.alpha, module.head.divergence.beta) == (0.6, 0.5)  # Table 6, EuroSAT
    assert module.teacher_result is not None and 0.0 <= module.teacher_result["hm"] <= 1.0
    assert module.teacher.cache.computed == 1  # teacher text features: once for all steps and evaluations


def test_distillation_learns_checkpoints_the_student_only_and_resumes(eurosat, teacher_run, tmp_path):
    args = ["--config", str(CONFIGS / "base.yaml"), "--config", str(CONFIGS / "abkd" / "EuroSAT.yaml"),
            *TINY_DISTILL, "--model.init_args.teacher_ckpt", str(teacher_run / "checkpoints" / "last.ckpt"),
            *_data_args(eurosat, tmp_path, "abkd"), "--trainer.max_epochs", "3", "--trainer.log_every_n_steps", "1",
            "--model.init_args.lr", "0.005", "--model.init_args.warmup_epochs", "0", "--data.init_args.batch_size",
            "20"]
    cli = cli_main(["fit", *args])
    module = cli.model
    run = tmp_path / "abkd" / "version_0"
    results = json.loads((run / "results.json").read_text())
    assert results["report_epoch"] == "best_base" and results["finished"]
    assert results["reported"] == max(results["history"], key=lambda h: h["base_acc"])
    assert module.teacher.cache.computed == 1
    import csv

    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert any(r.get("val/hm") for r in rows) and any(r.get("teacher/hm") for r in rows)
    kd = [float(r["train/kd_epoch"]) for r in rows if r.get("train/kd_epoch")]
    assert len(kd) == 3 and kd[-1] < 0.8 * kd[0], kd  # the student moves towards the teacher
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert not any(k.startswith("teacher.") for k in state)
    assert {k.split(".")[1] for k in state} == {"visual", "projector"}
    assert all(k.endswith(".prompt") for k in state if ".visual." in k)
    # resume from the checkpoint for one more epoch (strict loading of every student key); a longer plan is a
    # result-changing key, allowed explicitly and recorded
    resumed = cli_main(["fit", *args, "--trainer.max_epochs", "4", "--ckpt_path",
                        str(run / "checkpoints" / "last.ckpt"), "--resume_changes", "allow"]).model
    assert json.loads((run / "resumes.json").read_text())[-1]["changes"] == {
        "trainer.max_epochs": {"checkpoint": 3, "now": 4}}
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3]  # the per-epoch record survives the resume


def test_teacher_for_other_classes_is_an_error(eurosat, teacher_run, tmp_path):
    other = tmp_path / "coop"
    write_fake_coop_dataset(other, "DTD", num_classes=10, train_per_class=2, test_per_class=1, val_per_class=1,
                            image_size=32, seed=1)
    with pytest.raises(ValueError, match="trained for other classes"):
        cli_main(["fit", "--config", str(CONFIGS / "base.yaml"), "--config", str(CONFIGS / "kd" / "DTD.yaml"),
                  *TINY_DISTILL, "--model.init_args.teacher_ckpt", str(teacher_run / "checkpoints" / "last.ckpt"),
                  *_data_args(other, tmp_path, "x"), "--trainer.fast_dev_run", "true"])


def test_prompt_tuning_refuses_transductive_training(eurosat, tmp_path):
    with pytest.raises(ValueError, match="train_classes: base"):
        cli_main(["fit", "--config", str(CONFIGS / "base.yaml"), "--config", str(CONFIGS / "teacher/EuroSAT.yaml"),
                  *TINY_TEACHER, *_data_args(eurosat, tmp_path, "t"), "--data.init_args.train_classes", "all",
                  "--trainer.fast_dev_run", "true"])


def test_distillation_without_teacher_prompts_is_an_error(eurosat, tmp_path):
    with pytest.raises(ValueError, match="needs the teacher's prompts"):
        cli_main(["fit", "--config", str(CONFIGS / "base.yaml"), "--config", str(CONFIGS / "kd/EuroSAT.yaml"),
                  *TINY_DISTILL, "--model.init_args.teacher_ckpt", "null", *_data_args(eurosat, tmp_path, "x"),
                  "--trainer.fast_dev_run", "true"])


def test_schedule_is_constant_warmup_then_cosine():
    module = PromptTuningModule("abkd-tiny-vit-quickgelu", None, text_depth=1, vision_depth=1)

    class _Trainer:
        max_epochs = 20

    module._trainer = _Trainer()
    assert module.lr_factor(0) == pytest.approx(1e-5 / 0.005)
    assert module.lr_factor(1) == pytest.approx(0.5 * (1 + math.cos(math.pi / 20)))
    assert module.lr_factor(10) == pytest.approx(0.5)


@pytest.mark.skipif(not (SHARED_CIFAR10 / "train.npz").is_file(), reason="../shared/data/cifar10 not present")
def test_prompt_tuning_learns_real_base_classes(tmp_path):
    """Prompt tuning of the tiny random-weight CLIP on real CIFAR-10 images: its 5 base classes beat chance.

    Only the prompts learn (the random encoders stay frozen), so the ceiling is low: measured 0.34 after 10
    epochs. Chance is 0.20 and one standard error on the 300 base test images is 0.023; 0.28 is > 3 of them.
    """
    from abkd_vision.data.synthetic import export_arrays_as_coop

    train, test = np.load(SHARED_CIFAR10 / "train.npz"), np.load(SHARED_CIFAR10 / "test.npz")
    classes = (SHARED_CIFAR10 / "classes.txt").read_text().split()
    pick = lambda d, n: np.concatenate([np.flatnonzero(d["labels"] == c)[:n] for c in range(10)])  # noqa: E731
    tr, te = pick(train, 200), pick(test, 60)
    export_arrays_as_coop(tmp_path / "data", "EuroSAT", classes,
                          train=(train["images"][tr], train["labels"][tr]),
                          val=(test["images"][te[:10]], test["labels"][te[:10]]),
                          test=(test["images"][te], test["labels"][te]))
    cli = cli_main(["fit", "--config", str(CONFIGS / "base.yaml"), "--config", str(CONFIGS / "teacher/EuroSAT.yaml"),
                    *TINY_TEACHER, *_data_args(tmp_path / "data", tmp_path / "runs", "real"),
                    "--data.init_args.shots", "null", "--data.init_args.batch_size", "32",
                    "--data.init_args.crop_scale", "[0.5, 1.0]", "--model.init_args.lr", "0.1",
                    "--model.init_args.warmup_epochs", "0",
                    "--model.init_args.scl_image_weight", "0", "--model.init_args.scl_text_weight", "0",
                    "--model.init_args.scl_logits_weight", "0", "--trainer.max_epochs", "10"])
    base = cli.model.history[-1]["base_acc"]
    assert base > 0.28, f"base accuracy {base:.3f} does not beat chance (0.2) clearly"


def test_two_process_evaluation_counts_every_test_image_once(eurosat, tmp_path):
    """Zero-shot test under DDP (2 CPU processes, gloo) gives exactly the single-process accuracies: 15 base and
    15 new test images split 8/7 across ranks, none repeated (a padding sampler would score 16 per group)."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import CSVLogger

    from abkd_vision.data import BaseToNewDataModule

    def run(devices: int, name: str) -> dict:
        torch.manual_seed(0)
        module = PromptTuningModule("abkd-tiny-vit-quickgelu", None, learn_ctx=False, text_depth=0, vision_depth=0)
        data = BaseToNewDataModule("EuroSAT", root=str(eurosat), image_size=32, eval_batch_size=4, num_workers=0)
        trainer = Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                          logger=CSVLogger(tmp_path, name=name, version=0), enable_progress_bar=False,
                          enable_model_summary=False)
        trainer.test(module, datamodule=data)
        return json.loads((tmp_path / name / "version_0" / "results.json").read_text())["test"]

    single, ddp = run(1, "single"), run(2, "ddp")
    assert ddp == pytest.approx(single, abs=1e-6)
    for acc in (single["base_acc"], single["new_acc"]):
        assert acc * 15 == pytest.approx(round(acc * 15), abs=1e-4)


def test_teacher_logit_cache_replays_the_seeded_views_across_heads(eurosat, teacher_run, tmp_path):
    """A KD run fills the teacher's image-logit cache along the seeded view stream; an ABKD run with the same seed
    then reads every teacher logit from it; the cached logits are the live teacher's for the same (sample, epoch)
    view, to fp16 rounding; and the KD run's loss matches a cache-free run on the same stream (ExactResume)."""
    import csv

    from abkd_vision.data.resumable import SeededViews
    from abkd_vision.teacher_cache import TeacherLogitCache

    cache_dir = tmp_path / "logit_cache"
    common = [*TINY_DISTILL, "--model.init_args.teacher_ckpt", str(teacher_run / "checkpoints" / "last.ckpt"),
              "--trainer.max_epochs", "2", "--trainer.log_every_n_steps", "1", "--data.init_args.batch_size", "8",
              "--trainer.limit_val_batches", "1", "--model.init_args.evaluate_teacher", "false"]

    def run(method, name, *extra):
        cli = cli_main(["fit", "--config", str(CONFIGS / "base.yaml"), "--config",
                        str(CONFIGS / method / "EuroSAT.yaml"), *common, *_data_args(eurosat, tmp_path, name), *extra])
        rows = list(csv.DictReader((tmp_path / name / "version_0" / "metrics.csv").open()))
        return cli, rows

    def column(rows, key):
        return [float(r[key]) for r in rows if r.get(key)]

    kd, kd_rows = run("kd", "kd", "--model.init_args.teacher_logit_cache", str(cache_dir))
    hits = column(kd_rows, "train/teacher_cache_hit_rate_epoch")
    assert hits == [0.0, 0.0]  # every (sample, epoch) view is new in the first run
    ab, ab_rows = run("abkd", "abkd", "--model.init_args.teacher_logit_cache", str(cache_dir))
    assert column(ab_rows, "train/teacher_cache_hit_rate_epoch") == [1.0, 1.0]  # ... and replayed by the next

    # the cached logits are the live teacher's for the view the stream names
    (folder,) = [p for p in cache_dir.iterdir() if p.is_dir()]
    header = json.loads((folder / "header.json").read_text())
    cache = TeacherLogitCache(folder, header["key"])
    n = header["key"]["num_images"]
    assert header["key"]["views"] == "seeded-stream" and header["key"]["num_views"] == 2
    assert int(np.asarray(cache.filled).sum()) == 2 * n
    stream = SeededViews(kd.datamodule.train_set, header["key"]["stream_seed"], with_ids=True)
    teacher = kd.model.teacher
    text = teacher.text_features(kd.model.class_names)
    for index in (0, n + 3, 2 * n - 1):
        image, _, i, epoch = stream[index]
        live = teacher.logits(image[None], text)[0]
        cached, filled = cache.lookup([i], [epoch])
        assert bool(filled[0])
        torch.testing.assert_close(cached[0], live, atol=2e-2, rtol=1e-3)  # fp16 storage

    # the same seeded stream without the cache (ExactResume turns it on) gives the same KD losses
    _, live_rows = run("kd", "kd_live", "--trainer.callbacks+=abkd_vision.cli.ExactResume")
    assert "train/teacher_cache_hit_rate_epoch" not in live_rows[0]
    np.testing.assert_allclose(column(live_rows, "train/kd_step"), column(kd_rows, "train/kd_step"), rtol=2e-3)


def test_gaussian_prompt_aggregation_finishes_with_the_weighted_epoch_average(eurosat, tmp_path):
    """gpa_mean/gpa_std (PromptSRC's GPA): the prompts the run ends with (and validates, and saves) are
    sum_e w_e theta_e over the epochs' end-of-training weights, w a normalised Gaussian over epochs 1..3."""
    from lightning.pytorch import Callback, Trainer

    from abkd_vision.data import BaseToNewDataModule

    class EpochEnds(Callback):
        def __init__(self):
            self.thetas = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if batch_idx + 1 == trainer.num_training_batches:
                self.thetas.append({n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad})

    torch.manual_seed(0)
    module = PromptTuningModule(arch="abkd-tiny-vit-large-quickgelu", pretrained=None, text_depth=3, vision_depth=3,
                                lr=0.05, warmup_epochs=0, gpa_mean=2.0, gpa_std=1.0)
    data = BaseToNewDataModule("EuroSAT", root=str(eurosat), train_classes="base", image_size=32, batch_size=8,
                               eval_batch_size=16, num_workers=0)
    seen = EpochEnds()
    Trainer(accelerator="cpu", max_epochs=3, limit_train_batches=2, limit_val_batches=1, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, callbacks=[seen]).fit(module, datamodule=data)
    w = module.gpa_weights(3)
    g = [math.exp(-0.5 * (e - 2.0) ** 2) for e in (1, 2, 3)]
    assert w == pytest.approx([x / sum(g) for x in g])
    assert len(seen.thetas) == 3 and any(not torch.equal(seen.thetas[0][n], seen.thetas[2][n]) for n in seen.thetas[0])
    for name, param in module.named_parameters():
        if param.requires_grad:
            expected = sum(wi * theta[name] for wi, theta in zip(w, seen.thetas))
            torch.testing.assert_close(param.detach(), expected, rtol=1e-5, atol=1e-6)
    assert len(module.history) == 3  # the last validation ran on the aggregated prompts
    # the running sum travels with the checkpoint (a resumed run keeps aggregating)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    fresh = PromptTuningModule(arch="abkd-tiny-vit-large-quickgelu", pretrained=None, text_depth=3, vision_depth=3,
                               gpa_mean=2.0)
    fresh.on_load_checkpoint(checkpoint)
    assert set(fresh.gpa_sum) == set(module.gpa_sum)
    assert all(torch.equal(fresh.gpa_sum[n], module.gpa_sum[n]) for n in module.gpa_sum)
    with pytest.raises(ValueError, match="gpa_std > 0"):
        PromptTuningModule(arch="abkd-tiny-vit-large-quickgelu", pretrained=None, text_depth=3, vision_depth=3,
                           gpa_mean=15.0, gpa_std=0.0)
