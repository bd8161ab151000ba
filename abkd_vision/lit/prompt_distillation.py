"""``PromptDistillationModule``: distil a frozen prompted CLIP teacher into a prompted image student (PromptKD,
ABKD's base-to-new setting), with any head and any divergence.

One training step (unlabeled training images of all classes, ``data.train_classes: all``, as the reference)::

    text = teacher text features of all C classes         # computed once per teacher weights (TextFeatureCache)
    teacher_logits = teacher(images, text)                # frozen ViT-L/14, no grad
    student_logits = student(images, text)                # prompted ViT-B/16 -> projector, cosine to the same text
    loss = kd_weight * warmup(epoch) * head(student_logits, teacher_logits, y)

There is no cross-entropy: the images are used without labels. Heads that need labels (``head.uses_labels``: DKD's
target/non-target split, NKD) get the ground-truth labels of the training images, as the reference code does for
DKD (logged once at fit start).

A two-view head (``head.views == 2``, MLKD) needs ``data.init_args.strong_view: true``: the student and the teacher
then also score the strong view, passed to the head as ``student_strong``/``teacher_strong`` (with the teacher-logit
cache the weak view's teacher logits come from it, the strong view's from the live teacher).
At evaluation the student classifies base and new test images among their own classes with the slices of the
teacher's text features.
"""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from abkd_vision.heads import KD, DistillationHead
from abkd_vision.lit.base_to_new import BaseToNewTask
from abkd_vision.lit.common import DistillationHeadHooks, TeacherLogitCaching, count_correct, kd_warmup_scale
from abkd_vision.metrics import harmonic_mean
from abkd_vision.models.clip import (
    PromptedCLIP,
    PromptedImageStudent,
    TextFeatureCache,
    load_prompt_checkpoint,
    load_student_checkpoint,
)
from abkd_vision.teacher_cache import TeacherLogitCache, cache_key, cached_logits, check_dtype, sha256_weights

__all__ = ["FrozenCLIPTeacher", "PromptDistillationModule"]


class FrozenCLIPTeacher(nn.Module):
    """The teacher provider: a :class:`PromptedCLIP` in eval mode at every moment, without gradients, with its
    text features cached per weights and class list. ``forward(images, class_names) -> logits [B, C]``."""

    def __init__(self, model: PromptedCLIP, cache_dir: str | None = None):
        super().__init__()
        self.model = model.requires_grad_(False)
        self.cache = TextFeatureCache(cache_dir)
        self.logit_cache: TeacherLogitCache | None = None  # image logits per (sample, epoch view), opt-in
        self.last_hit_rate: float | None = None
        self.train(False)

    def train(self, mode: bool = True) -> FrozenCLIPTeacher:
        return super().train(False)

    def text_features(self, class_names: list[str]) -> Tensor:
        return self.cache.get(self.model, class_names)

    @torch.no_grad()
    def logits(self, images: Tensor, text_features: Tensor) -> Tensor:
        return self.model(images, text_features.to(images.dtype))

    def forward(self, images: Tensor, class_names: list[str]) -> Tensor:
        return self.logits(images, self.text_features(class_names))

    @torch.no_grad()
    def training_logits(self, images: Tensor, text_features: Tensor, index: Tensor | None = None,
                        epoch: Tensor | None = None) -> Tensor:
        """Logits for a training batch: from the image-logit cache when it is attached and the batch names its
        views (sample index and epoch of the seeded stream), running the teacher only on views not cached yet."""
        if self.logit_cache is None or index is None or epoch is None:
            return self.logits(images, text_features)
        logits, hits = cached_logits(self.logit_cache, lambda x: self.logits(x, text_features), images, index, epoch)
        self.last_hit_rate = hits / max(1, int(index.numel()))
        return logits


class PromptDistillationModule(DistillationHeadHooks, TeacherLogitCaching, BaseToNewTask):
    """Prompt distillation on base-to-new data.

    Args:
        student_arch, student_pretrained: the student CLIP (paper: ``ViT-B-16-quickgelu``, OpenAI weights).
        student_vision_tokens, student_vision_depth: its deep vision prompts (PromptKD: 4, 9).
        student_ckpt: the student to start from or to evaluate (``run.py test``): a checkpoint of this module or a
            PromptKD student (``<output_dir>/VLPromptLearner/model-best.pth.tar``: prompts, the 1x1-conv projector
            with its BatchNorm statistics, logit scale and image tower; needs ``student_ckpt_trusted: true``).
        teacher_arch, teacher_pretrained: the teacher CLIP (paper: ``ViT-L-14-quickgelu``, OpenAI weights).
        teacher_ckpt: the teacher's prompts: a ``PromptTuningModule`` checkpoint or a PromptKD teacher
            (``model-best.pth.tar``, needs ``teacher_ckpt_trusted: true``). Required for ``fit``.
        teacher_prompt_prefix, teacher_text_depth, teacher_vision_tokens, teacher_vision_depth: the teacher's
            prompt layout (must match its checkpoint; PromptKD: "a photo of a", 9, 4, 9).
        head: the KD head (default ``KD(temperature=1)``, forward KL); any head and divergence of
            :mod:`abkd_vision.heads` / :mod:`abkd_vision.losses`. Its learnable parameters (CTKD's learned
            temperature) are trained and checkpointed with the prompts; ``log_values()`` are logged per epoch as
            ``train/<name>``; a two-view head (MLKD) needs ``data.init_args.strong_view: true``.
        kd_weight: lambda (our heads average over the batch, with T^2 where the head has it; see
            ``docs/base-to-new.md`` for the mapping from PromptKD's and ABKD's conventions).
        kd_warmup_epochs: the loss is scaled by min((epoch + 1) / kd_warmup_epochs, 1) (0 = off).
        evaluate_teacher: measure the teacher's base/new accuracy once when fitting starts.
        text_cache_dir: on-disk cache of the teacher's text features (reused across runs with the same teacher).
        teacher_logit_cache: a folder for the teacher's image logits per (training image, epoch) of a seeded
            augmentation stream (opt-in). The training order and each sample's RandomResizedCrop/flip then depend
            only on the seed, the epoch and the sample, so every run with this teacher, data, transform, seed and
            number of epochs (e.g. a sweep over heads, lambda and alpha/beta) replays the same views and pays for the
            teacher once; the first run fills the cache as it goes. Float16 storage (``teacher_logit_cache_dtype``).
        Other args: see :class:`BaseToNewTask` (defaults: PromptKD's SGD lr 0.005, 1 warm-up epoch at 1e-5, cosine;
            ``nonfinite``/``max_skipped_steps``: the NaN/inf policy).
    """

    def __init__(self, student_arch: str = "ViT-B-16-quickgelu", student_pretrained: str | None = "openai",
                 student_vision_tokens: int = 4, student_vision_depth: int = 9,
                 student_ckpt: str | None = None, student_ckpt_trusted: bool = False,
                 teacher_arch: str = "ViT-L-14-quickgelu", teacher_pretrained: str | None = "openai",
                 teacher_ckpt: str | None = None, teacher_ckpt_trusted: bool = False,
                 teacher_prompt_prefix: str = "a photo of a", teacher_text_depth: int = 9,
                 teacher_vision_tokens: int = 4, teacher_vision_depth: int = 9,
                 head: DistillationHead | None = None, kd_weight: float = 1.0, kd_warmup_epochs: int = 0,
                 evaluate_teacher: bool = True, num_classes: int | None = None,
                 lr: float = 0.005, momentum: float = 0.9, weight_decay: float = 5e-4, warmup_epochs: int = 1,
                 warmup_lr: float = 1e-5, report_epoch: str = "last", text_cache_dir: str | None = None,
                 nonfinite: str = "raise", max_skipped_steps: int = 100, teacher_logit_cache: str | None = None,
                 teacher_logit_cache_dtype: str = "float16"):
        super().__init__()
        self.save_hyperparameters(ignore=["head"])
        if kd_warmup_epochs < 0:
            raise ValueError(f"kd_warmup_epochs must be >= 0, got {kd_warmup_epochs}")
        if not kd_weight > 0:
            raise ValueError(f"kd_weight must be > 0, got {kd_weight}")
        teacher = PromptedCLIP(teacher_arch, teacher_pretrained, teacher_prompt_prefix, True, None,
                               teacher_text_depth, teacher_vision_tokens, teacher_vision_depth)
        self.teacher_metadata: dict = {}
        if teacher_ckpt is not None:
            self.teacher_metadata = load_prompt_checkpoint(teacher, teacher_ckpt, trusted=teacher_ckpt_trusted)
        self.teacher = FrozenCLIPTeacher(teacher, text_cache_dir)
        self.student = PromptedImageStudent(student_arch, student_pretrained, teacher.embed_dim,
                                            student_vision_tokens, student_vision_depth)
        self.student_metadata: dict = {}
        if student_ckpt is not None:
            self.student_metadata = load_student_checkpoint(self.student, student_ckpt, trusted=student_ckpt_trusted)
        self.head = head if head is not None else KD(temperature=1.0)
        self.kd_weight = float(kd_weight)
        self.teacher_result: dict | None = None
        self.init_task(lr, momentum, weight_decay, warmup_epochs, warmup_lr, report_epoch, num_classes, nonfinite,
                       max_skipped_steps)
        check_dtype(teacher_logit_cache_dtype, "teacher_logit_cache_dtype")

    # -- the teacher's image-logit cache (TeacherLogitCaching does the rest) --------------------------------------
    logit_cache_option = "teacher_logit_cache"
    logit_cache_views = "seeded view stream (BaseToNewDataModule with a trainer that sets max_epochs)"

    def attached_logit_cache(self) -> TeacherLogitCache | None:
        return self.teacher.logit_cache

    def attach_logit_cache(self, cache: TeacherLogitCache | None) -> None:
        self.teacher.logit_cache = cache

    def logit_cache_key(self, datamodule, views) -> dict:
        # the weights include the teacher's prompts; the class names are in the dataset part of the key
        return cache_key(teacher=self.hparams.teacher_arch, num_classes=len(self.class_names),
                         teacher_sha256="weights:" + sha256_weights(self.teacher.model),
                         dataset=datamodule.view_dataset_key(), views=views,
                         dtype=self.hparams.teacher_logit_cache_dtype)

    # -- checks --------------------------------------------------------------------------------------------------
    def check_classes(self, datamodule) -> None:
        names = self.teacher_metadata.get("class_names")
        if names is not None and list(names) != self.class_names:
            raise ValueError(
                f"the teacher prompts in {self.hparams.teacher_ckpt} were trained for other classes ({len(names)}: "
                f"{names[:4]}...) than the data's ({len(self.class_names)}: {self.class_names[:4]}...); use the "
                "teacher of this dataset"
            )
        n_prompt = self.teacher_metadata.get("num_prompt_classes")
        if n_prompt is not None and n_prompt != self.num_base_classes:
            raise ValueError(
                f"the PromptKD teacher {self.hparams.teacher_ckpt} was trained on {n_prompt} base classes but the "
                f"data has {self.num_base_classes}; use the teacher of this dataset"
            )

    def on_fit_start(self) -> None:
        if self.hparams.teacher_ckpt is None:
            raise ValueError(
                "PromptDistillationModule needs the teacher's prompts to fit: set model.init_args.teacher_ckpt to a "
                "teacher checkpoint (train one with configs/base_to_new/teacher/<dataset>.yaml, or use PromptKD's "
                "released model-best.pth.tar with teacher_ckpt_trusted: true)"
            )
        self.check_head_views()
        if self.head.uses_labels:
            rank_zero_info(f"{type(self.head).__name__} needs labels: it uses the ground-truth labels of the training "
                           "images (as the reference code does for DKD); heads that need no label use none")
        if self.hparams.evaluate_teacher:
            self.teacher_result = self.evaluate_teacher()

    @torch.no_grad()
    def evaluate_teacher(self) -> dict | None:
        """The teacher's base/new accuracy and HM on the evaluation loaders, logged once before training."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            return None
        result = {}
        for group, loader in zip(("base", "new"), datamodule.val_dataloader()):
            text = self.teacher.text_features(self.class_names)[self.group_slice(group)]
            correct, total = count_correct(self, loader, lambda images, text=text: self.teacher.model(images, text))
            result[f"{group}_acc"] = correct / total if total else float("nan")
        result["hm"] = harmonic_mean(result["base_acc"], result["new_acc"])
        rank_zero_info(f"teacher: base {100 * result['base_acc']:.2f}%, new {100 * result['new_acc']:.2f}%, "
                       f"HM {100 * result['hm']:.2f}%")
        if self.logger is not None and self.trainer.ckpt_path is None:  # a resumed run has the row already
            self.logger.log_metrics({f"teacher/{k}": v for k, v in result.items()}, step=0)
        return result

    # -- training ------------------------------------------------------------------------------------------------
    def kd_scale(self) -> float:
        return kd_warmup_scale(self.current_epoch, self.hparams.kd_warmup_epochs)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        images, target, *views = batch  # (images, target, index, epoch) with the teacher-logit cache
        weak, strong = self.split_views(images)  # images = [weak, strong] for a two-view head (MLKD)
        text = self.teacher.text_features(self.class_names)  # one cache lookup serves both networks
        teacher_logits = self.teacher.training_logits(weak, text, *views)
        student_logits = self.student(weak, text)
        extra = {}
        if strong is not None:  # the strong view is not cacheable: always the live teacher
            extra = {"student_strong": self.student(strong, text), "teacher_strong": self.teacher.logits(strong, text)}
        kd = self.head(student_logits, teacher_logits, target, **extra)
        scale = self.kd_scale()
        loss = self.kd_weight * scale * kd
        self.log_dict({"train/loss": loss, "train/kd": kd}, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/kd_scale", scale, on_step=False, on_epoch=True)
        self.log_head_values()
        if views:
            self.log_cache_hit_rate(self.teacher.last_hit_rate, target.shape[0])
        return self.guard_loss(loss, kd=kd)

    # -- evaluation ------------------------------------------------------------------------------------------------
    def eval_logits(self, images: Tensor, group: str) -> Tensor:
        text = self.teacher.text_features(self.class_names)[self.group_slice(group)]
        return self.student(images, text)

    def summary(self) -> dict:
        return {**super().summary(), "teacher": self.teacher_result}
