"""``PromptTuningModule``: prompt-tune a CLIP on the base classes with labels (the teacher), or evaluate it.

One training step (base-class images with labels, ``data.train_classes: base``)::

    text = model.encode_text(base class names)          # prompted text tower, with gradients
    logits = exp(logit_scale) * cos(model.encode_image(images), text)
    loss = CE(logits, y) [+ PromptSRC's self-regulating consistency terms, when their weights are > 0]

PromptSRC's consistency terms regularise the prompted features towards the frozen zero-shot CLIP (the same
weights with the prompts switched off, :func:`~abkd_vision.models.clip.prompts_disabled`):
``scl_image_weight * L1(f_img, f_img_zs) + scl_text_weight * L1(f_txt, f_txt_zs) + scl_logits_weight *
KL(zs logits || logits) / C`` (the KL summed over classes and averaged over ``B * C``, as PromptSRC; the text
anchor averages ``zero_shot_templates``). PromptSRC uses 10, 25 and 1.

PromptSRC's Gaussian prompt aggregation (``gpa_mean``, ``gpa_std``; PromptSRC: 15 and 1 over 20 epochs): the
trained tensors at the end of epoch ``e`` (1-based) get the weight ``w_e = N(e; mean, std) / sum_k N(k; mean, std)``
over the epochs ``k = 1..max_epochs``, and the model finishes with ``sum_e w_e * theta_e``. The aggregate replaces
the weights at the end of the last training epoch, so that epoch's validation, ``results.json`` and ``last.ckpt``
are those of the aggregated prompts.

Evaluation uses the text features of all classes, computed once per weights (:class:`TextFeatureCache`), sliced
into base and new. With ``learn_ctx: false`` and both depths 0 the module is zero-shot CLIP
(``"a photo of a {class}."``): ``python run.py test`` evaluates it without training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from abkd_vision.heads import KD
from abkd_vision.lit.base_to_new import BaseToNewTask
from abkd_vision.models.clip import PromptedCLIP, TextFeatureCache, load_prompt_checkpoint

__all__ = ["PromptTuningModule"]


class PromptTuningModule(BaseToNewTask):
    """Prompt tuning (PromptSRC/IVLP) of an open_clip CLIP on base classes, with base/new/HM evaluation.

    Args:
        arch, pretrained: the CLIP (teacher: ``ViT-L-14-quickgelu`` with ``"openai"`` or a local ``ViT-L-14.pt``).
        prompt_prefix, learn_ctx, n_ctx, text_depth, vision_tokens, vision_depth: the prompts
            (:class:`~abkd_vision.models.clip.PromptedCLIP`; PromptSRC: "a photo of a", 4 tokens, depths 9).
        init_ckpt: prompts to start from or to evaluate: a checkpoint of this module or a PromptKD teacher
            (``model-best.pth.tar``); ``init_ckpt_trusted`` allows full unpickling (PromptKD files need it).
        num_classes: optional check against the data (the CLI links ``data.num_classes``).
        scl_image_weight, scl_text_weight, scl_logits_weight: PromptSRC's consistency terms (0 = off).
        gpa_mean, gpa_std: PromptSRC's Gaussian prompt aggregation over epochs (None = off; PromptSRC: 15, 1).
        zero_shot_templates: the templates averaged for the zero-shot text anchor.
        lr, momentum, weight_decay, warmup_epochs, warmup_lr, report_epoch: see :class:`BaseToNewTask`.
        text_cache_dir: on-disk cache of the text features for ``validate``/``test`` runs (None = memory only).
        nonfinite, max_skipped_steps: the NaN/inf policy ("raise" or "skip", see ``GuardedTraining``).
    """

    def __init__(self, arch: str = "ViT-L-14-quickgelu", pretrained: str | None = "openai",
                 prompt_prefix: str = "a photo of a", learn_ctx: bool = True, n_ctx: int | None = None,
                 text_depth: int = 9, vision_tokens: int = 4, vision_depth: int = 9,
                 init_ckpt: str | None = None, init_ckpt_trusted: bool = False, num_classes: int | None = None,
                 scl_image_weight: float = 0.0, scl_text_weight: float = 0.0, scl_logits_weight: float = 0.0,
                 zero_shot_templates: list[str] | None = None,
                 lr: float = 0.005, momentum: float = 0.9, weight_decay: float = 5e-4, warmup_epochs: int = 1,
                 warmup_lr: float = 1e-5, report_epoch: str = "last", text_cache_dir: str | None = None,
                 nonfinite: str = "raise", max_skipped_steps: int = 100, gpa_mean: float | None = None,
                 gpa_std: float = 1.0):
        super().__init__()
        self.save_hyperparameters()
        if gpa_mean is not None and not (math.isfinite(gpa_mean) and math.isfinite(gpa_std) and gpa_std > 0):
            raise ValueError(f"Gaussian prompt aggregation needs a finite gpa_mean and gpa_std > 0, got "
                             f"gpa_mean={gpa_mean}, gpa_std={gpa_std} (PromptSRC: 15 and 1 over 20 epochs)")
        self.gpa_sum: dict[str, Tensor] | None = None  # sum_e w_e * theta_e so far (in checkpoints)
        for name in ("scl_image_weight", "scl_text_weight", "scl_logits_weight"):
            if not getattr(self.hparams, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self.hparams, name)}")
        self.model = PromptedCLIP(arch, pretrained, prompt_prefix, learn_ctx, n_ctx, text_depth, vision_tokens,
                                  vision_depth)
        self.init_metadata: dict = {}
        if init_ckpt is not None:
            self.init_metadata = load_prompt_checkpoint(self.model, init_ckpt, trusted=init_ckpt_trusted)
        self.templates = tuple(zero_shot_templates or ("a photo of a {}.",))
        self.logits_consistency = KD(temperature=1.0)
        self.text_cache = TextFeatureCache(None)
        self._zs_text: Tensor | None = None
        self.init_task(lr, momentum, weight_decay, warmup_epochs, warmup_lr, report_epoch, num_classes, nonfinite,
                       max_skipped_steps)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = self.trainer.datamodule
        if stage == "fit" and getattr(dm, "train_classes", "base") != "base":
            raise ValueError(
                "prompt tuning trains on labelled base classes: set data.init_args.train_classes: base "
                f"(got {dm.train_classes!r}; 'all' is the unlabeled transductive setting of prompt distillation)"
            )
        self.train_names = self.group_names("base")
        # Disk cache only where the weights are final (validate/test); in fit they change every step.
        cache_dir = self.hparams.text_cache_dir if stage in ("validate", "test") else None
        self.text_cache = TextFeatureCache(cache_dir)

    def check_classes(self, datamodule) -> None:
        meta = self.init_metadata
        names = meta.get("class_names")
        if names is not None and list(names) != self.class_names:
            raise ValueError(
                f"the prompts in {self.hparams.init_ckpt} were trained for other classes ({len(names)}: "
                f"{names[:4]}...) than the data's ({len(self.class_names)}: {self.class_names[:4]}...); use the "
                "teacher trained on this dataset"
            )
        n_prompt = meta.get("num_prompt_classes")
        if n_prompt is not None and n_prompt != self.num_base_classes:
            raise ValueError(
                f"the PromptKD teacher {self.hparams.init_ckpt} was trained on {n_prompt} base classes but the "
                f"data has {self.num_base_classes}; use the teacher of this dataset"
            )

    # -- training ------------------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> Tensor:
        images, target = batch
        hp = self.hparams
        # features in the model's dtype (bf16/fp16 under *-true precision); every loss term in fp32
        text = self.model.encode_text(self.train_names)
        image = self.model.encode_image(images)
        logits = (self.model.logit_scale() * image @ text.t()).float()
        ce = F.cross_entropy(logits, target)
        terms = {"ce": ce}
        if hp.scl_image_weight > 0 or hp.scl_text_weight > 0 or hp.scl_logits_weight > 0:
            if self._zs_text is None:
                self._zs_text = self.model.zero_shot_text_features(self.train_names, self.templates)
            zs_image = self.model.zero_shot_image_features(images)
            zs_logits = (self.model.logit_scale() * zs_image @ self._zs_text.t().to(zs_image.dtype)).float()
            terms["scl_image"] = F.l1_loss(image.float(), zs_image.float())
            terms["scl_text"] = F.l1_loss(text.float(), self._zs_text.float())
            terms["scl_logits"] = self.logits_consistency(logits, zs_logits, target) / logits.shape[1]
        loss = ce + sum(getattr(hp, f"{k}_weight") * v for k, v in terms.items() if k != "ce")
        self.log_dict({"train/loss": loss, **{f"train/{k}": v for k, v in terms.items()}}, on_step=True,
                      on_epoch=True, prog_bar=True)
        return self.guard_loss(loss, **terms)

    # -- Gaussian prompt aggregation ------------------------------------------------------------------------------
    def gpa_weights(self, max_epochs: int) -> list[float]:
        """``w_e`` for the epochs e = 1..max_epochs: a Gaussian over the epochs, normalised to sum to 1."""
        mean, std = self.hparams.gpa_mean, self.hparams.gpa_std
        raw = [math.exp(-0.5 * ((e - mean) / std) ** 2) for e in range(1, max_epochs + 1)]
        total = sum(raw)
        if total == 0:
            raise ValueError(f"gpa_mean={mean} with gpa_std={std} puts no weight on the epochs 1..{max_epochs}")
        return [r / total for r in raw]

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.hparams.get("gpa_mean") is None or batch_idx + 1 != self.trainer.num_training_batches:
            return
        # the end of an epoch's training (before its validation): add this epoch's weights, once per epoch
        max_epochs = self.trainer.max_epochs
        weight = self.gpa_weights(max_epochs)[self.current_epoch]
        trained = {n: p for n, p in self.named_parameters() if p.requires_grad}
        with torch.no_grad():
            if self.gpa_sum is None:
                self.gpa_sum = {n: torch.zeros_like(p) for n, p in trained.items()}
            for name, param in trained.items():
                self.gpa_sum[name].add_(param.detach(), alpha=weight)
            if self.current_epoch + 1 == max_epochs:
                for name, param in trained.items():
                    param.copy_(self.gpa_sum[name])

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.gpa_sum is not None:
            checkpoint["gpa_sum"] = {n: t.detach().cpu().clone() for n, t in self.gpa_sum.items()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("gpa_sum")
        self.gpa_sum = None if saved is None else {n: t.to(self.device) for n, t in saved.items()}

    # -- evaluation ------------------------------------------------------------------------------------------------
    def eval_logits(self, images: Tensor, group: str) -> Tensor:
        text = self.text_cache.get(self.model, self.class_names)[self.group_slice(group)]
        return self.model(images, text.to(images.device))
