"""DistillationDiagnostics: exact values on hand-made logits, the LogR definition, duck typing, and a real CLI run."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import tiny_image_folder
from torch import nn

from abkd_vision.cli import main as cli_main
from abkd_vision.diagnostics import DiagnosticStats, DistillationDiagnostics, log_mass_ratio
from abkd_vision.heads import DKD, KD
from abkd_vision.losses import AlphaBetaDivergence, ForwardKL, ReverseKL, build_divergence

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def _stats(student_logits, teacher_logits, target=None, divergence=None, eta=1.0, temperature=1.0, top=0.1):
    stats = DiagnosticStats(temperature, top)
    stats.update(student_logits, teacher_logits, target,
                 log_mass_ratio(student_logits, teacher_logits, divergence, eta, temperature))
    return stats.compute()


# -- exact values on hand-made logits --------------------------------------------------------------------------------
def test_entropy_target_probability_and_agreement():
    c = 5
    student = torch.zeros(4, c)  # uniform: entropy log C, every target probability 1/C
    student[1, 2] = 1e-3  # still (almost) uniform, argmax 2
    teacher = torch.tensor([[3.0, 0, 0, 0, 0], [0, 0, 3.0, 0, 0], [0, 0, 0, 3.0, 0], [0, 3.0, 0, 0, 0]])
    m = _stats(student, teacher, torch.tensor([0, 2, 3, 4]))
    assert m["student_entropy"] == pytest.approx(math.log(c), abs=1e-6)
    assert m["target_prob"] == pytest.approx(1 / c, abs=1e-4)
    # argmax of the student: 0, 2, 0, 0 (ties go to the first class); teacher: 0, 2, 3, 1 -> 2 of 4 agree
    assert m["agreement"] == pytest.approx(0.5)
    assert m["student_acc1"] == pytest.approx(0.5) and m["teacher_acc1"] == pytest.approx(0.75)
    p_top = math.exp(3) / (math.exp(3) + 4)
    h_teacher = -(p_top * math.log(p_top) + 4 * (1 - p_top) / 4 * math.log((1 - p_top) / 4))
    assert m["teacher_entropy"] == pytest.approx(h_teacher, rel=1e-6)
    # a one-hot-like student has (almost) zero entropy and probability ~1 on its class
    sharp = _stats(torch.tensor([[60.0, 0, 0]]), torch.zeros(1, 3), torch.tensor([0]))
    assert sharp["student_entropy"] == pytest.approx(0.0, abs=1e-20) and sharp["target_prob"] == pytest.approx(1.0)
    # without labels the label-based numbers are NaN (and not logged), the others are there
    unlabeled = _stats(student, teacher)
    assert math.isnan(unlabeled["target_prob"]) and unlabeled["agreement"] == pytest.approx(0.5)


def test_logr_two_classes_by_hand():
    # q = [0.5, 0.5], p = [0.8, 0.2]; FKL gradient q - p = [-0.3, 0.3]; one step of eta = 1 gives logits
    # [0.3, -0.3], q' = [1 / (1 + e^-0.6), 1 / (1 + e^0.6)]
    logr = log_mass_ratio(torch.zeros(1, 2, dtype=torch.float64), torch.tensor([[0.8, 0.2]]).double().log())
    up, down = math.log(2 / (1 + math.exp(-0.6))), math.log(2 / (1 + math.exp(0.6)))
    torch.testing.assert_close(logr, torch.tensor([[up, down]], dtype=torch.float64))
    m = _stats(torch.zeros(1, 2, dtype=torch.float64), torch.tensor([[0.8, 0.2]]).double().log())
    assert m["frac_over"] == 0.5 and m["frac_under"] == 0.5  # class 1 over-estimated, class 0 under
    assert m["logr_abs_mean_over"] == pytest.approx(-down) and m["logr_abs_mean_under"] == pytest.approx(up)
    assert m["logr_mean_over"] == pytest.approx(down) and m["logr_mean_under"] == pytest.approx(up)
    assert down < 0 < up  # the step moves mass from the over- to the under-estimated class


def test_logr_split_and_concentration_three_classes_by_hand():
    # q = [0.5, 0.3, 0.2], p = [0.45, 0.05, 0.5]: over-estimated classes 0 and 1, under-estimated class 2.
    # FKL: grad = q - p = [0.05, 0.25, -0.3]; LogR = -grad - log sum_k q_k e^(-grad_k)
    q, p = [0.5, 0.3, 0.2], [0.45, 0.05, 0.5]
    g = [qi - pi for qi, pi in zip(q, p)]
    n = math.log(sum(qi * math.exp(-gi) for qi, gi in zip(q, g)))
    logr = [-gi - n for gi in g]
    student, teacher = torch.tensor([q]).double().log(), torch.tensor([p]).double().log()
    torch.testing.assert_close(log_mass_ratio(student, teacher), torch.tensor([logr], dtype=torch.float64))
    m = _stats(student, teacher)
    a = [abs(x) for x in logr]
    assert m["frac_over"] == pytest.approx(2 / 3) and m["frac_under"] == pytest.approx(1 / 3)
    assert m["logr_abs_mean_over"] == pytest.approx((a[0] + a[1]) / 2)
    assert m["logr_abs_median_over"] == pytest.approx(min(a[0], a[1]))  # torch's median of 2 values: the lower
    assert m["logr_abs_mean_under"] == pytest.approx(a[2]) and m["logr_abs_median_under"] == pytest.approx(a[2])
    # k = ceil(0.1 * 3) = 1: the hardest class is 2 (|p - q| = 0.3), the most confident is 0 (q = 0.5)
    assert m["logr_share_hard"] == pytest.approx(a[2] / sum(a))
    assert m["logr_share_confident"] == pytest.approx(a[0] / sum(a))
    # top_fraction 1: every class is "hard" and "confident", share 1
    whole = _stats(student, teacher, top=1.0)
    assert whole["logr_share_hard"] == pytest.approx(1.0) and whole["logr_share_confident"] == pytest.approx(1.0)


def test_logr_matches_the_papers_gradient_formulas():
    torch.manual_seed(0)
    s, t = torch.randn(6, 7, dtype=torch.float64) * 2, torch.randn(6, 7, dtype=torch.float64) * 2
    q, p = s.softmax(-1), t.softmax(-1)
    eta = 0.3
    # Lemma G.1: FKL  LogR = eta (p - q) + N;  RKL  LogR = eta q (log p - log q + sum_k q (log q - log p)) + N
    fkl = log_mass_ratio(s, t, ForwardKL(), eta)
    rkl = log_mass_ratio(s, t, ReverseKL(), eta)
    rkl_grad = q * (q.log() - p.log() - (q * (q.log() - p.log())).sum(-1, keepdim=True))
    for logr, step in ((fkl, eta * (p - q)), (rkl, -eta * rkl_grad)):
        offset = logr - step  # N(y) does not depend on y
        torch.testing.assert_close(offset, offset[:, :1].expand_as(offset))
        # q_{t+1} = q_t e^LogR is a distribution
        torch.testing.assert_close((q * logr.exp()).sum(-1), torch.ones(6, dtype=torch.float64))
    # at p = q every LogR is 0, for every divergence
    for div in (ForwardKL(), ReverseKL(), AlphaBetaDivergence(0.8, 0.3)):
        torch.testing.assert_close(log_mass_ratio(s, s, div), torch.zeros_like(s))
    # the temperature divides both logits; float32 inputs give float32
    torch.testing.assert_close(log_mass_ratio(s.float(), t.float(), temperature=4.0),
                               log_mass_ratio(s.float() / 4, t.float() / 4))
    assert log_mass_ratio(s.float(), t.float()).dtype == torch.float32


def test_rkl_concentrates_logr_more_than_fkl():
    # The paper's claim (Prop. 3.1, Thm. 3.2) on a confident student: RKL's |LogR| is weighted by q, so it sits
    # on the student's confident classes far more than FKL's
    torch.manual_seed(1)
    s, t = torch.randn(256, 20) * 3, torch.randn(256, 20) * 3
    fkl, rkl = _stats(s, t, divergence=ForwardKL()), _stats(s, t, divergence=ReverseKL())
    assert rkl["logr_share_confident"] > fkl["logr_share_confident"] + 0.1
    # and inside the AB family a larger beta concentrates more (Thm. D.1, case 3)
    shares = [_stats(s, t, divergence=AlphaBetaDivergence(0.8, b))["logr_share_confident"] for b in (0.0, 0.3, 0.8)]
    assert shares[0] < shares[1] < shares[2]


# -- settings and duck typing ------------------------------------------------------------------------------------
class _Cifar(nn.Module):
    def __init__(self, head=None):
        super().__init__()
        self.student, self.teacher = nn.Linear(4, 3), nn.Linear(4, 3)
        if head is not None:
            self.head = head


def test_divergence_and_temperature_follow_the_head_unless_given():
    cb = DistillationDiagnostics()
    div, temp = cb.resolve(_Cifar(KD(temperature=4.0, divergence=AlphaBetaDivergence(0.8, 0.3))))
    assert isinstance(div, AlphaBetaDivergence) and div.alpha == 0.8 and temp == 4.0
    div, temp = cb.resolve(_Cifar(DKD(divergence=build_divergence("rkl"))))
    assert isinstance(div, ReverseKL) and temp == 1.0  # only a KD head's temperature is used
    div, temp = cb.resolve(_Cifar())
    assert isinstance(div, ForwardKL) and temp == 1.0
    cb = DistillationDiagnostics(divergence="ab", divergence_args={"alpha": 0.5, "beta": 0.2}, temperature=2.0)
    div, temp = cb.resolve(_Cifar(KD(temperature=4.0)))
    assert isinstance(div, AlphaBetaDivergence) and div.beta == 0.2 and temp == 2.0


@pytest.mark.parametrize("mode", ["global", "instance"])
def test_a_learned_temperature_is_the_logr_temperature_of_each_batch(mode):
    """CTKD: the LogR and its split use the head's learned temperature (per image in the instance mode, on the
    logits the head sees: standardised here), the epoch's mean is recorded, and the logged value is untouched."""
    from abkd_vision.heads import CurriculumTemperature
    from abkd_vision.heads.base import standardize_logits

    torch.manual_seed(0)
    learned = CurriculumTemperature(mode=mode, num_classes=3, init=-0.5)
    module = _Cifar(KD(temperature=4.0, standardize=True, learned_temperature=learned))
    images, target = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])

    class _Trainer:
        sanity_checking, current_epoch, global_step, world_size, is_global_zero, logger = False, 0, 0, 1, True, None

    cb = DistillationDiagnostics(plot=False)
    cb.on_validation_epoch_start(_Trainer(), module)
    assert cb.settings["temperature_source"].startswith("learned")
    module.log = lambda *args, **kwargs: None
    cb.on_validation_batch_end(_Trainer(), module, None, (images, target), 0)
    cb.on_validation_epoch_end(_Trainer(), module)
    with torch.no_grad():
        s, t = module.student(images), module.teacher(images)
        temp = 1 + 20 * torch.sigmoid(learned.raw if mode == "global" else learned.mlp(
            torch.cat([standardize_logits(s), standardize_logits(t)], -1)))
    assert temp.numel() == (1 if mode == "global" else 6) and not torch.allclose(temp, torch.tensor(4.0))
    expected = _stats(s, t, target, ForwardKL(), temperature=temp)
    got = cb.history[-1]
    for key in ("logr_abs_mean_over", "logr_abs_mean_under", "frac_over", "logr_share_hard"):
        assert got[key] == pytest.approx(expected[key], rel=1e-6), key
    assert got["temperature"] == pytest.approx(float(temp.mean()), rel=1e-6)
    assert cb.settings["temperature"] == got["temperature"]
    assert math.isnan(float(learned.last_temperature))  # reading it for the diagnostics logs nothing


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_batches": 0}, "max_batches must be a positive integer or None, got 0"),
    ({"temperature": -1.0}, "temperature must be > 0, got -1.0"),
    ({"eta": float("nan")}, "eta must be finite, got nan"),
    ({"top_fraction": 1.5}, "top_fraction must be in (0, 1], got 1.5"),
    ({"divergence": "kll"}, "unknown divergence 'kll'"),
])
def test_bad_settings_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        DistillationDiagnostics(**kwargs)


def test_cifar_logits_and_student_mode_restored():
    module = _Cifar()
    module.train()
    images, target = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    s, t, y = DistillationDiagnostics.get_logits(module, (images, target))
    torch.testing.assert_close(s, module.student(images))
    torch.testing.assert_close(t, module.teacher(images))
    assert y is target

    class _Trainer:
        sanity_checking = False

    cb = DistillationDiagnostics(max_batches=1)
    cb.on_validation_epoch_start(_Trainer(), module)
    seen = []
    module.student.register_forward_pre_hook(lambda mod, args: seen.append(mod.training))
    cb.on_validation_batch_end(_Trainer(), module, None, (images, target), 0)
    cb.on_validation_batch_end(_Trainer(), module, None, (images, target), 1)  # beyond max_batches: skipped
    assert seen == [False] and module.student.training  # evaluated in eval mode, mode restored
    assert cb.stats.sums["n"] == 5


class _TextTeacher(nn.Module):
    """Stands in for FrozenCLIPTeacher: logits = images @ text_features(class_names).T."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.features = torch.randn(num_classes, 4)
        self.calls = []

    def text_features(self, class_names):
        return self.features[: len(class_names)]

    def forward(self, images, class_names):
        self.calls.append(list(class_names))
        return images @ self.text_features(class_names).T


class _TextStudent(nn.Module):
    def forward(self, images, text):
        return 2 * images @ text.T


def test_prompt_distillation_logits_use_all_classes_and_map_new_labels():
    module = nn.Module()
    module.class_names, module.num_base_classes = ["a", "b", "c", "d", "e"], 3
    module.teacher, module.student = _TextTeacher(5), _TextStudent()
    images = torch.randn(2, 4)
    s, t, y = DistillationDiagnostics.get_logits(module, (images, torch.tensor([0, 1])), dataloader_idx=1)
    assert s.shape == t.shape == (2, 5) and module.teacher.calls == [module.class_names]
    torch.testing.assert_close(s, 2 * t)
    assert y.tolist() == [3, 4]  # new-group labels 0, 1 are classes 3, 4 of all
    _, _, y = DistillationDiagnostics.get_logits(module, (images, torch.tensor([0, 2])), dataloader_idx=0)
    assert y.tolist() == [0, 2]


def test_diagnostic_logits_method_is_preferred():
    module = _Cifar()
    marker = (torch.zeros(1, 3), torch.ones(1, 3), None)
    module.diagnostic_logits = lambda batch: marker
    assert DistillationDiagnostics.get_logits(module, (torch.randn(1, 4), torch.tensor([0]))) is marker
    with pytest.raises(ValueError, match="needs a distillation module"):
        DistillationDiagnostics.get_logits(nn.Linear(2, 2), (torch.randn(1, 2), torch.tensor([0])))


# -- a real run through the CLI --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return tiny_image_folder(tmp_path_factory.mktemp("diag_data"), 48, 24, noise=40, boost=200)


def _config(tmp_path: Path, data: Path, model: dict, name: str, epochs: int, callbacks: list | None = None) -> Path:
    cfg = {
        "trainer": {"accelerator": "cpu", "max_epochs": epochs, "limit_train_batches": 3, "log_every_n_steps": 1,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(tmp_path / "runs"), "name": name, "version": 0}},
                    "callbacks": callbacks or []},
        "model": model,
        "data": {"class_path": "abkd_vision.data.ImageFolderDataModule",
                 "init_args": {"root": str(data), "image_size": 16, "batch_size": 8, "eval_batch_size": 8,
                               "num_workers": 0}},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(cfg))
    return path


def test_cli_run_logs_diagnostics_and_writes_json_and_png(tmp_path, tiny_data):
    teacher_cfg = _config(tmp_path, tiny_data, {"class_path": "abkd_vision.lit.ClassifierModule",
                                                "init_args": {"model": "resnet8"}}, "teacher", 1)
    cli_main(["fit", "--config", str(teacher_cfg), *QUIET])
    teacher_ckpt = next((tmp_path / "runs" / "teacher" / "version_0" / "checkpoints").glob("*.ckpt"))
    student = {"class_path": "abkd_vision.lit.DistillationModule", "init_args": {
        "student": "resnet8", "teacher": "resnet8", "teacher_ckpt": str(teacher_ckpt), "kd_weight": 2.0,
        "head": {"class_path": "abkd_vision.heads.KD", "init_args": {
            "temperature": 4.0, "divergence": {"class_path": "abkd_vision.losses.AlphaBetaDivergence",
                                               "init_args": {"alpha": 0.8, "beta": 0.3}}}}}}
    callbacks = [{"class_path": "abkd_vision.diagnostics.DistillationDiagnostics", "init_args": {"max_batches": 2}}]
    cfg = _config(tmp_path, tiny_data, student, "student", 2, callbacks)
    cli = cli_main(["fit", "--config", str(cfg), *QUIET])
    run = tmp_path / "runs" / "student" / "version_0"

    # logged through the logger: one row per epoch with every diag/ metric
    with open(run / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("diag/student_entropy")]
    assert len(rows) == 2 and [int(r["epoch"]) for r in rows] == [0, 1]
    for row in rows:
        assert 0 < float(row["diag/student_entropy"]) <= math.log(3) + 1e-6
        for key in ("diag/target_prob", "diag/agreement", "diag/frac_over", "diag/frac_under",
                    "diag/logr_share_hard", "diag/logr_share_confident"):
            assert 0 <= float(row[key]) <= 1, key
        assert float(row["diag/logr_abs_mean_over"]) > 0 and float(row["diag/logr_mean_over"]) < 0

    # the history, the JSON and the PNG
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, DistillationDiagnostics))
    assert [h["epoch"] for h in cb.history] == [0, 1]
    assert all(h["images"] == 16 for h in cb.history)  # 2 batches of 8 of the 24 test images
    saved = json.loads((run / "diagnostics.json").read_text())
    assert saved["history"] == json.loads(json.dumps(cb.history))
    assert saved["settings"]["temperature"] == 4.0 and "alpha=0.8" in saved["settings"]["divergence"]
    assert saved["settings"]["uniform_share"] == pytest.approx(1 / 3) and saved["settings"]["num_classes"] == 3
    png = (run / "diagnostics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 30_000
    assert not list(run.glob(".*.tmp"))
    # the values the callback logged are those of its history
    assert float(rows[-1]["diag/student_entropy"]) == pytest.approx(cb.history[-1]["student_entropy"], rel=1e-5)


def test_prompt_distillation_run_with_tiny_clips(tmp_path):
    """The callback on a real PromptDistillationModule (tiny random-weight open_clip models, CoOp-layout data)."""
    from abkd_vision.data.synthetic import write_fake_coop_dataset

    configs = Path(__file__).resolve().parents[1] / "configs" / "base_to_new"
    root = tmp_path / "coop"
    write_fake_coop_dataset(root, "EuroSAT", num_classes=10, train_per_class=4, test_per_class=3, val_per_class=1,
                            image_size=32, seed=0)

    def data_args(name):
        return ["--data.init_args.root", str(root), "--data.init_args.image_size", "32",
                "--data.init_args.num_workers", "0", "--data.init_args.eval_batch_size", "16",
                "--trainer.accelerator", "cpu", "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
                "--trainer.logger.init_args.name", name, "--trainer.logger.init_args.version", "0", *QUIET,
                "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1"]

    cli_main(["fit", "--config", str(configs / "base.yaml"), "--config", str(configs / "teacher" / "EuroSAT.yaml"),
              "--model.init_args.arch", "abkd-tiny-vit-large-quickgelu", "--model.init_args.pretrained", "null",
              "--model.init_args.text_depth", "1", "--model.init_args.vision_depth", "1", *data_args("teacher"),
              "--trainer.limit_val_batches", "1"])
    teacher_ckpt = tmp_path / "runs" / "teacher" / "version_0" / "checkpoints" / "last.ckpt"
    cli = cli_main([
        "fit", "--config", str(configs / "base.yaml"), "--config", str(configs / "abkd" / "EuroSAT.yaml"),
        "--model.init_args.teacher_arch", "abkd-tiny-vit-large-quickgelu", "--model.init_args.teacher_pretrained",
        "null", "--model.init_args.teacher_text_depth", "1", "--model.init_args.teacher_vision_depth", "1",
        "--model.init_args.student_arch", "abkd-tiny-vit-quickgelu", "--model.init_args.student_pretrained", "null",
        "--model.init_args.student_vision_depth", "1", "--model.init_args.teacher_ckpt", str(teacher_ckpt),
        *data_args("student"), "--trainer.callbacks+=abkd_vision.diagnostics.DistillationDiagnostics"])
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, DistillationDiagnostics))
    assert len(cb.history) == 1
    entry = cb.history[0]
    assert entry["images"] == 30  # 15 base + 15 new test images, each classified among all 10 classes
    assert cb.settings["num_classes"] == 10
    assert 0 < entry["student_entropy"] <= math.log(10) + 1e-6 and 0 <= entry["target_prob"] <= 1
    assert "alpha=0.6, beta=0.5" in cb.settings["divergence"]  # the run's head (Table 6, EuroSAT)
    run = tmp_path / "runs" / "student" / "version_0"
    with open(run / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("diag/agreement")]
    assert len(rows) == 1 and not any("dataloader_idx" in k for k in rows[0] if k.startswith("diag/"))
    assert (run / "diagnostics.png").exists() and (run / "diagnostics.json").exists()
