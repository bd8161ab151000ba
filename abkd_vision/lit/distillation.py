"""DistillationModule: a student trained with CE plus a KD head against a frozen teacher.

One training step::

    teacher_logits = teacher(images)                  # FrozenTeacher: eval mode, no grad
    student_logits = student(images)
    loss = ce_weight * CE(student_logits, y) + kd_weight * warmup(epoch) * head(student_logits, teacher_logits, y)

The method is the injected ``head`` (KD, DKD, LSD, TTM) and its ``divergence``; ABKD and friends are
configurations, not subclasses.

With ``teacher_cache`` (opt-in) the teacher's logits for every (training image, crop/flip view) are kept in a
memory-mapped cache (:mod:`abkd_vision.teacher_cache`): the data module then yields
``(images, target, index, view)`` and the teacher runs only on views not cached yet.

A head with two views (``head.views == 2``, MLKD) trains on the data's weak and strong view of each image
(``data.init_args.strong_view: true``, batches ``([weak, strong], target, ...)``)::

    loss = ce_weight * (CE(student(weak), y) + CE(student(strong), y))
           + kd_weight * warmup(epoch) * head(student(weak), teacher(weak), y,
                                              student_strong=student(strong), teacher_strong=teacher(strong))

With the teacher cache the weak view's logits come from it; the strong view (RandAugment) always goes to the live
teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from abkd_vision.heads import KD, DistillationHead
from abkd_vision.heads.base import check_weight
from abkd_vision.lit.classifier import ImageClassificationTask, mean_entropy
from abkd_vision.lit.common import DistillationHeadHooks, TeacherLogitCaching, count_correct, kd_warmup_scale
from abkd_vision.models import create_model, load_checkpoint
from abkd_vision.teacher_cache import TeacherLogitCache, cache_key, cached_logits, check_dtype, teacher_sha256


class FrozenTeacher(nn.Module):
    """Wraps the teacher so that it is in eval mode at every moment and never receives gradients.

    ``train(True)`` is ignored, so BatchNorm statistics never change; ``forward`` runs under no_grad.

    With a :class:`~abkd_vision.teacher_cache.TeacherLogitCache` attached (``cache``) and the batch's sample
    indices and view ids given, ``forward(images, index, view)`` reads the cached logits and runs the network
    only on the samples whose view is not cached yet, writing them to the cache. Every logit returned then is
    rounded to the cache's dtype (also the freshly computed ones), so a run gives the same result whether the
    cache was empty or full. ``cache_hits``/``cache_misses`` count samples; ``last_hit_rate`` is the last batch's.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.requires_grad_(False)
        self.train(False)
        self.cache: TeacherLogitCache | None = None
        self.cache_hits = self.cache_misses = 0
        self.last_hit_rate: float | None = None

    def train(self, mode: bool = True) -> FrozenTeacher:
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor, index: Tensor | None = None, view: Tensor | None = None) -> Tensor:
        if self.cache is None or index is None or view is None:
            return self.model(images)
        return self.cached_forward(images, index, view)

    @torch.no_grad()
    def cached_forward(self, images: Tensor, index: Tensor, view: Tensor) -> Tensor:
        # index/view stay on the host (transfer_batch_to_device): a warm cache reads nothing back from the device
        logits, hits = cached_logits(self.cache, self.model, images, index, view)
        n = int(index.numel())
        self.cache_hits += hits
        self.cache_misses += n - hits
        self.last_hit_rate = hits / n if n else 1.0
        return logits


class DistillationModule(DistillationHeadHooks, TeacherLogitCaching, ImageClassificationTask):
    """Distill ``teacher`` into ``student`` with a KD head.

    Args:
        student, teacher: model names (registered ``cifar_*`` or published, e.g. ``resnet8x4``).
        teacher_ckpt: teacher weights (published ``ckpt_epoch_240.pth``, a state dict, or a Lightning
            checkpoint of ``ClassifierModule``); loaded strictly. Required for ``fit``.
        trusted_teacher_ckpt: allow full unpickling of ``teacher_ckpt`` (files from a trusted source only).
        num_classes: output classes of both networks; the CLI links it to ``data.num_classes``.
        head: the KD head (KD with forward KL at T=4 when None). Its learnable parameters (CTKD's learned
            temperature) are trained with the student and saved in its checkpoints; its ``log_values()`` are
            logged per epoch as ``train/<name>``. A two-view head (MLKD) needs ``data.init_args.strong_view: true``
            and adds the strong view's CE (see the module docstring); a one-view head refuses strong-view data.
        ce_weight, kd_weight: weights of the two loss terms. ``kd_weight: 0`` is a CE-only baseline that keeps
            the teacher for evaluation and diagnostics but does not run it in training steps.
        kd_warmup_epochs: the KD term is scaled by min((epoch + 1) / kd_warmup_epochs, 1) (DKD uses 20; 0 = off).
        evaluate_teacher: measure the teacher's validation accuracy once when fitting starts (published
            teachers have been found weaker than claimed).
        teacher_cache: a folder for the exact teacher-logit cache (:mod:`abkd_vision.teacher_cache`), or a
            cache folder itself; None (default) = always the live teacher. Needs the default crop/flip training
            augmentation of ``CIFAR100DataModule``/``ImageFolderDataModule``; any other setting (another
            augmentation, a cache folder made for another teacher or transform) falls back to the live teacher
            and says so once. Logs ``train/teacher_cache_hit_rate``.
        teacher_cache_dtype: "float16" (default) or "float32" storage of the cached logits.
        Other args: as in ``ClassifierModule`` (SGD recipe; lr None -> 0.05, 0.01 for MobileNet/ShuffleNet
        students; ``nonfinite``/``max_skipped_steps``: the NaN/inf policy).
    """

    network_attr = "student"

    def __init__(self, student: str = "cifar_resnet8x4", teacher: str = "cifar_resnet32x4",
                 teacher_ckpt: str | None = None, trusted_teacher_ckpt: bool = False, num_classes: int = 100,
                 head: DistillationHead | None = None, ce_weight: float = 1.0, kd_weight: float = 1.0,
                 kd_warmup_epochs: int = 0, evaluate_teacher: bool = True, student_kwargs: dict | None = None,
                 lr: float | None = None, momentum: float = 0.9, weight_decay: float = 5e-4,
                 nesterov: bool = False, lr_milestones: list[int] | None = None, lr_decay: float = 0.1,
                 label_smoothing: float = 0.0, nonfinite: str = "raise", max_skipped_steps: int = 100,
                 teacher_cache: str | None = None, teacher_cache_dtype: str = "float16", channels_last: bool = False,
                 compile: bool | dict = False):
        super().__init__()
        self.save_hyperparameters(ignore=["head"])
        self.ce_weight, self.kd_weight = check_weight("ce_weight", ce_weight), check_weight("kd_weight", kd_weight)
        self.student = create_model(student, num_classes=num_classes, **(student_kwargs or {}))
        teacher_net = create_model(teacher, num_classes=num_classes)
        self.teacher_metadata: dict = {}
        if teacher_ckpt is not None:
            self.teacher_metadata = load_checkpoint(teacher_net, teacher_ckpt, trusted=trusted_teacher_ckpt)
        self.teacher = FrozenTeacher(teacher_net)
        self.head = head if head is not None else KD()
        if kd_warmup_epochs < 0:
            raise ValueError(f"kd_warmup_epochs must be >= 0, got {kd_warmup_epochs}")
        self.init_task(student, num_classes, lr, nonfinite, max_skipped_steps, channels_last, compile)
        self.teacher_val_acc1: float | None = None
        check_dtype(teacher_cache_dtype, "teacher_cache_dtype")

    # -- the teacher-logit cache (TeacherLogitCaching does the rest) ---------------------------------------
    logit_cache_option = "teacher_cache"
    logit_cache_views = ("cacheable crop/flip augmentation (CIFAR100DataModule/ImageFolderDataModule with their "
                         "default train transform)")

    def teacher_sha256(self) -> str:
        """SHA-256 of the teacher checkpoint file, or of the teacher's weights when there is no such file."""
        return teacher_sha256(self.hparams.teacher_ckpt, self.teacher.model)

    def attached_logit_cache(self) -> TeacherLogitCache | None:
        return self.teacher.cache

    def attach_logit_cache(self, cache: TeacherLogitCache | None) -> None:
        self.teacher.cache = cache

    def logit_cache_key(self, datamodule, views) -> dict:
        return cache_key(teacher=self.hparams.teacher, num_classes=self.num_classes,
                         teacher_sha256=self.teacher_sha256(), dataset=datamodule.view_dataset_key(),
                         views=views, dtype=self.hparams.teacher_cache_dtype)

    # -- training ----------------------------------------------------------------------------------------
    def kd_scale(self) -> float:
        return kd_warmup_scale(self.current_epoch, self.hparams.kd_warmup_epochs)

    def cross_entropy(self, logits: Tensor, target: Tensor) -> Tensor:
        # fp32 losses under mixed precision: the heads upcast their inputs, CE gets float32 logits
        return F.cross_entropy(logits.float(), target, label_smoothing=self.hparams.label_smoothing)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        images, target, *views = batch  # (images, target, index, view) when the teacher cache is on
        weak, strong = self.split_views(images)  # images = [weak, strong] for a two-view head (MLKD)
        student_logits = self(weak)
        ce = self.cross_entropy(student_logits, target)
        if strong is not None:
            student_strong = self(strong)
            ce = ce + self.cross_entropy(student_strong, target)  # MLKD applies CE to both views
        if self.kd_weight == 0:
            # A CE-only baseline through the same module (same data, RNG use and diagnostics as the KD arms):
            # the teacher is not needed for the loss, so it does not run.
            kd = ce.new_zeros(())
        else:
            extra = {}
            if strong is not None:  # the strong view is not cacheable: always the live teacher
                extra = {"student_strong": student_strong, "teacher_strong": self.teacher(strong)}
            kd = self.head(student_logits, self.teacher(weak, *views), target, **extra)
            self.log_head_values()
        scale = self.kd_scale()
        loss = self.ce_weight * ce + self.kd_weight * scale * kd
        self.log_dict({"train/loss": loss, "train/ce": ce, "train/kd": kd}, on_step=True, on_epoch=True,
                      prog_bar=True)
        self.log_dict({"train/kd_scale": scale, "train/student_entropy": mean_entropy(student_logits.detach())},
                      on_step=False, on_epoch=True, sync_dist=True)
        if views:
            self.log_cache_hit_rate(self.teacher.last_hit_rate, target.shape[0])
        return self.guard_loss(loss, ce=ce, kd=kd)

    # -- teacher checks ----------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self.check_data_classes()
        if self.hparams.teacher_ckpt is None:
            raise ValueError(
                "DistillationModule needs teacher weights to fit: set model.init_args.teacher_ckpt to a teacher "
                "checkpoint (see checkpoints/README.md, or train one with configs/cifar100/teachers/)"
            )
        self.check_head_views()
        if self.hparams.evaluate_teacher:
            self.teacher_val_acc1 = self.evaluate_teacher()

    @torch.no_grad()
    def evaluate_teacher(self) -> float | None:
        """Top-1 accuracy of the teacher on the validation data, logged once before training."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            return None
        correct, total = count_correct(self, datamodule.val_dataloader(), self.teacher)
        if total == 0:
            return None
        acc = correct / total
        claimed = self.teacher_metadata.get("accuracy") or self.teacher_metadata.get("best_acc")
        claim = f" (its checkpoint claims {float(claimed):.2f}%)" if claimed is not None else ""
        rank_zero_info(f"teacher {self.hparams.teacher}: validation top-1 {100 * acc:.2f}% on {total} images{claim}")
        if self.logger is not None and self.trainer.ckpt_path is None:  # a resumed run has the row already
            self.logger.log_metrics({"teacher/val_acc1": acc}, step=0)
        return acc

    def summary(self) -> dict:
        return {**super().summary(), "teacher_val_acc1": self.teacher_val_acc1}

    # -- checkpoints without the teacher -----------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith("teacher.")]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # The teacher comes from teacher_ckpt, not from the student's checkpoint: put the current teacher
        # weights in, so that Lightning's strict loading still checks every student key.
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.setdefault("state_dict", {})
        for key, value in self.teacher.state_dict(prefix="teacher.").items():
            state.setdefault(key, value)
