"""``BaseToNewTask``: what the CLIP base-to-new modules share (prompt tuning now, prompt distillation next).

* Class names come from the data (:class:`~abkd_vision.data.BaseToNewDataModule`): ``class_names`` (all C, base
  first), ``num_base_classes``. Evaluation loaders are ``[base, new]``; each group is classified among its own
  classes (logits against that group's slice of the text features) and labelled from 0.
* Metrics: micro accuracy on base and new and their harmonic mean, per epoch (``val/base_acc``,
  ``val/new_acc``, ``val/hm``; ``test/...`` likewise). ``results.json`` holds the last epoch and the epoch with
  the best base accuracy, and which of the two is reported (``report_epoch``): the reference protocol selects the
  epoch on base *test* accuracy (test-set selection), "last" does not select.
* Recipe (Dassl, as PromptSRC/PromptKD): SGD, momentum 0.9, weight decay 5e-4; for epochs ``e < warmup_epochs``
  the lr is the constant ``warmup_lr``, then ``lr * (1 + cos(pi * e / max_epochs)) / 2``.
* Checkpoints hold only what is trained (prompts, projector): the frozen CLIP weights come from ``pretrained``
  and are put back on load, so loading stays strict for every trained tensor.
"""

from __future__ import annotations

import math

import torch
from lightning.pytorch import LightningModule
from torch import Tensor

from abkd_vision.lit.common import GuardedTraining, write_results
from abkd_vision.metrics import GROUPS, BaseNewAccuracy

__all__ = ["BaseToNewTask", "REPORT_EPOCHS"]

REPORT_EPOCHS = ("last", "best_base")


class BaseToNewTask(GuardedTraining, LightningModule):
    """Base of the base-to-new LightningModules. Subclasses implement ``eval_logits(images, group)``."""

    def init_task(self, lr: float, momentum: float, weight_decay: float, warmup_epochs: int, warmup_lr: float,
                  report_epoch: str, num_classes: int | None, nonfinite: str = "raise",
                  max_skipped_steps: int = 100) -> None:
        self.init_guard(nonfinite, max_skipped_steps)
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a positive number, got {lr}")
        if warmup_epochs < 0 or not (warmup_lr > 0 and math.isfinite(warmup_lr)):
            raise ValueError(f"need warmup_epochs >= 0 and warmup_lr > 0, got {warmup_epochs=}, {warmup_lr=}")
        if report_epoch not in REPORT_EPOCHS:
            raise ValueError(f"report_epoch must be one of {REPORT_EPOCHS}, got {report_epoch!r}")
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self.warmup_epochs, self.warmup_lr, self.report_epoch = int(warmup_epochs), float(warmup_lr), report_epoch
        self.expected_num_classes = num_classes
        self.val_accuracy = BaseNewAccuracy()
        self.test_accuracy = BaseNewAccuracy()
        self.class_names: list[str] = []
        self.num_base_classes = 0
        self.history: list[dict] = []
        self._test_result: dict | None = None

    # -- classes from the data -----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        names, nb = getattr(dm, "class_names", None), getattr(dm, "num_base_classes", None)
        if names is None or nb is None:
            raise ValueError(
                f"{type(self).__name__} needs a base-to-new data module (class_names, num_base_classes), got "
                f"{type(dm).__name__}; use data: class_path: abkd_vision.data.BaseToNewDataModule"
            )
        if self.expected_num_classes is not None and self.expected_num_classes != len(names):
            raise ValueError(f"model.num_classes={self.expected_num_classes} but the data has {len(names)} classes")
        self.class_names, self.num_base_classes = list(names), int(nb)
        self.check_classes(dm)

    def check_classes(self, datamodule) -> None:
        """Hook: subclasses compare the classes their weights were made for with the data's."""

    def group_slice(self, group: str) -> slice:
        return slice(0, self.num_base_classes) if group == "base" else slice(self.num_base_classes, None)

    def group_names(self, group: str) -> list[str]:
        return self.class_names[self.group_slice(group)]

    def eval_logits(self, images: Tensor, group: str) -> Tensor:
        """Logits ``[B, C_group]`` of ``images`` among the classes of ``group`` ("base" or "new")."""
        raise NotImplementedError

    # -- evaluation --------------------------------------------------------------------------------------------
    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        images, target = batch
        group = GROUPS[dataloader_idx]
        self.val_accuracy.update(self.eval_logits(images, group), target, group)

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        images, target = batch
        group = GROUPS[dataloader_idx]
        self.test_accuracy.update(self.eval_logits(images, group), target, group)

    def _flush(self, metric: BaseNewAccuracy, prefix: str) -> dict[str, float]:
        values = metric.compute()  # synced across processes
        metric.reset()
        self.log_dict({f"{prefix}/{k}": v for k, v in values.items()}, prog_bar=True, sync_dist=False)
        return {k: float(v) for k, v in values.items()}

    def on_validation_epoch_end(self) -> None:
        values = self._flush(self.val_accuracy, "val")
        if not self.trainer.sanity_checking:
            self.history.append({"epoch": self.current_epoch, **values})

    def on_test_epoch_end(self) -> None:
        self._test_result = self._flush(self.test_accuracy, "test")

    # -- optimisation --------------------------------------------------------------------------------------------
    def lr_factor(self, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            return self.warmup_lr / self.lr
        max_epochs = self.trainer.max_epochs if self._trainer is not None else None
        if not max_epochs or max_epochs < 0:
            raise ValueError("the cosine schedule needs trainer.max_epochs > 0")
        return 0.5 * (1.0 + math.cos(math.pi * epoch / max_epochs))

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"{type(self).__name__} has nothing to train (no prompt and no projector parameter)")
        optimizer = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # -- results ---------------------------------------------------------------------------------------------------
    def summary(self) -> dict:
        """Last and best-base epochs (val split), the reported one, and the test result when tested."""
        last = self.history[-1] if self.history else None
        valid = [h for h in self.history if not math.isnan(h["base_acc"])]
        best = max(valid, key=lambda h: h["base_acc"]) if valid else None
        reported = last if self.report_epoch == "last" else best
        return {
            "report_epoch": self.report_epoch,
            "reported": reported,
            "last": last,
            "best_base": best,
            "test": self._test_result,
            "num_classes": len(self.class_names),
            "num_base_classes": self.num_base_classes,
            "history": self.history,
        }

    def on_fit_end(self) -> None:
        write_results(self, self.summary())

    def on_test_end(self) -> None:
        write_results(self, self.summary())

    # -- checkpoints with the trained tensors only ----------------------------------------------------------------
    def trained_state_keys(self) -> set[str]:
        """State keys of trainable parameters and of the buffers of modules that own one (BatchNorm statistics)."""
        keys = set()
        for mod_name, mod in self.named_modules():
            own = list(mod.named_parameters(recurse=False))
            if any(p.requires_grad for _, p in own):
                prefix = f"{mod_name}." if mod_name else ""
                keys.update(prefix + n for n, p in own if p.requires_grad)
                keys.update(prefix + n for n, _ in mod.named_buffers(recurse=False))
        return keys

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = self.trained_state_keys()
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k not in keep]:
            del state[key]
        checkpoint["class_names"] = list(self.class_names)
        checkpoint["num_base_classes"] = self.num_base_classes
        checkpoint["base_to_new_history"] = list(self.history)  # best/last epochs survive a resume

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # The frozen weights come from `pretrained`, not from the checkpoint: put the current ones in, so that
        # Lightning's strict loading still checks every trained key.
        self.history = list(checkpoint.get("base_to_new_history", []))
        state = checkpoint.setdefault("state_dict", {})
        keep = self.trained_state_keys()
        for key, value in self.state_dict().items():
            if key not in keep:
                state.setdefault(key, value)

