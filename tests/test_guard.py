"""Guarded numerics in real runs: a NaN injected into the loss or the gradients stops the run naming the step and
the term, after saving a checkpoint to resume from; or, with the skip policy, the bad steps are skipped and
counted."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from helpers import tiny_image_folder
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from abkd_vision.data import ImageFolderDataModule
from abkd_vision.heads import KD
from abkd_vision.lit import DistillationModule


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return tiny_image_folder(tmp_path_factory.mktemp("tiny"), 48, 12, separable=False)


class NaNAtSteps(KD):
    """KD whose value is NaN at the given global steps (read from the module the test attaches)."""

    def __init__(self, steps=()):
        super().__init__()
        self.steps = set(steps)
        self.step_of = None  # set by the test: a function returning the module's global step

    def forward(self, student_logits, teacher_logits, target=None):
        loss = super().forward(student_logits, teacher_logits, target)
        return loss * float("nan") if self.step_of() in self.steps else loss


class _NaNGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class NaNGradient(KD):
    def forward(self, student_logits, teacher_logits, target=None):
        return super().forward(_NaNGrad.apply(student_logits), teacher_logits, target)


class _WatchStep(Callback):
    """Records whether the student's weights changed during the batch that ran at global step ``step``."""

    def __init__(self, step):
        self.step, self.changed = step, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.step:
            self._before = [p.detach().clone() for p in module.student.parameters()]

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if hasattr(self, "_before") and self.changed is None:
            after = list(module.student.parameters())
            self.changed = any(not torch.equal(a, b) for a, b in zip(self._before, after))


def _fit(tmp_path, data, head, ckpt_path=None, callbacks=(), **module_kw):
    module = DistillationModule(student="resnet8", teacher="resnet8", num_classes=3, head=head,
                                evaluate_teacher=False, **module_kw)
    module.hparams.teacher_ckpt = "given"
    if hasattr(head, "step_of"):
        head.step_of = lambda: module.global_step
    trainer = Trainer(accelerator="cpu", max_epochs=2, limit_train_batches=4, limit_val_batches=1,
                      logger=CSVLogger(tmp_path, "r", 0),
                      callbacks=[ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True), *callbacks],
                      enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    datamodule = ImageFolderDataModule(str(data), image_size=16, batch_size=8, num_workers=0)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return module, trainer


def test_nan_loss_stops_naming_step_and_term_and_leaves_a_resumable_checkpoint(tmp_path, tiny_data):
    with pytest.raises(FloatingPointError, match=r"non-finite loss at global step 3 .*kd=nan.*non-finite "
                                                 r"term\(s\): kd.*resume with --ckpt_path .*nonfinite-step3\.ckpt"):
        _fit(tmp_path, tiny_data, NaNAtSteps({3}))
    ckpt = tmp_path / "ckpt" / "nonfinite-step3.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 3
    weights = {k: v for k, v in saved["state_dict"].items() if k.startswith(("student.", "head."))}
    assert weights and all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    module, trainer = _fit(tmp_path / "resumed", tiny_data, NaNAtSteps(), ckpt_path=str(ckpt))
    assert trainer.global_step == 8 and trainer.current_epoch == 2  # the run went on to its end


def test_nan_gradient_with_a_finite_loss_names_the_parameter(tmp_path, tiny_data):
    with pytest.raises(FloatingPointError, match=r"non-finite gradient at global step 0 .*first in parameter "
                                                 r"student\."):
        _fit(tmp_path, tiny_data, NaNGradient())


def test_skip_policy_skips_and_counts_bad_steps(tmp_path, tiny_data):
    skipped, normal = _WatchStep(2), _WatchStep(3)
    module, trainer = _fit(tmp_path, tiny_data, NaNAtSteps({2, 5}), nonfinite="skip", callbacks=[skipped, normal])
    assert module.skipped_steps == 2
    assert skipped.changed is False and normal.changed is True  # a skipped step leaves the weights untouched
    assert all(torch.isfinite(p).all() for p in module.student.parameters())
    rows = list(csv.DictReader((tmp_path / "r" / "version_0" / "metrics.csv").open()))
    assert max(float(r["train/skipped_steps"]) for r in rows if r.get("train/skipped_steps")) == 2


def test_skip_policy_gives_up_after_max_skipped_steps(tmp_path, tiny_data):
    with pytest.raises(FloatingPointError, match=r"3 training steps had a non-finite loss \(more than "
                                                 r"max_skipped_steps=2\)"):
        _fit(tmp_path, tiny_data, NaNAtSteps({0, 1, 2, 3}), nonfinite="skip", max_skipped_steps=2)


def test_unknown_policy_names_the_choices():
    with pytest.raises(ValueError, match=r"nonfinite must be one of \('raise', 'skip'\), got 'ignore'"):
        DistillationModule(student="resnet8", teacher="resnet8", num_classes=3, nonfinite="ignore")
