"""What every LightningModule of the suite shares: the non-finite loss guard and the results file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from abkd_vision.data.device import IndexBatch
from abkd_vision.io import atomic_write
from abkd_vision.teacher_cache import CacheMismatch, TeacherLogitCache

__all__ = ["DistillationHeadHooks", "GuardedTraining", "NONFINITE_POLICIES", "NonFiniteGuard", "count_correct",
           "kd_warmup_scale", "save_recovery_checkpoint", "training_progress", "write_results"]


NONFINITE_POLICIES = ("raise", "skip")


class NonFiniteGuard:
    """Stops training on a NaN/inf loss or gradient, naming the first bad step and its loss terms (or the first
    parameter with a bad gradient), without synchronising the host with the device on every step.

    ``record(module, loss, **terms)`` and ``record_gradients(module)`` keep, on the device, the first global step
    whose loss (or gradient) was not finite and what it was (tensor ops only: no ``.item()``, no data-dependent
    branch, so a GPU step never waits and ``torch.compile`` sees no graph break). ``check(module)`` reads them back
    (one synchronisation) and raises. Checks run every ``check_every`` steps (every step on the CPU, where it costs
    nothing; 50 on accelerators) and at the end of every training epoch.

    When the check runs in the step that went bad (always on the CPU), the weights are still those from before
    it: a checkpoint ``nonfinite-step<N>.ckpt`` is saved next to the run's checkpoints to resume from (single
    process runs; under DDP resume from ``last.ckpt``).
    """

    def __init__(self, check_every: int | None = None):
        self.check_every = check_every
        self._first_step: Tensor | None = None
        self._values: Tensor | None = None
        self._names: tuple[str, ...] = ()
        self._grad_step: Tensor | None = None
        self._grad_index: Tensor | None = None
        self._param_names: list[str] = []

    def _due(self, module: LightningModule, device: torch.device) -> bool:
        every = self.check_every or (1 if device.type == "cpu" else 50)
        return (module.global_step + 1) % every == 0

    def record(self, module: LightningModule, loss: Tensor, **terms: Tensor) -> None:
        loss = loss.detach()
        values = torch.stack([loss.float().reshape(())] + [t.detach().float().reshape(()) for t in terms.values()])
        names = ("the weighted sum", *terms)
        if self._first_step is None or self._names != names or self._first_step.device != loss.device:
            self._first_step = torch.full((), -1, dtype=torch.long, device=loss.device)
            self._values = torch.zeros_like(values)
            self._names = names
        newly = ~torch.isfinite(loss).all() & (self._first_step < 0)
        self._first_step = torch.where(newly, torch.tensor(module.global_step, device=loss.device), self._first_step)
        self._values = torch.where(newly, values, self._values)
        if self._due(module, loss.device):
            self.check(module)

    def record_gradients(self, module: LightningModule) -> None:
        named = [(n, p.grad) for n, p in module.named_parameters() if p.grad is not None]
        if not named:
            return
        device = named[0][1].device
        ok = torch.stack([torch.isfinite(g).all().to(device) for _, g in named])
        if self._grad_step is None or self._grad_step.device != device or len(self._param_names) != len(named):
            self._grad_step = torch.full((), -1, dtype=torch.long, device=device)
            self._grad_index = torch.zeros((), dtype=torch.long, device=device)
            self._param_names = [n for n, _ in named]
        newly = ~ok.all() & (self._grad_step < 0)
        self._grad_step = torch.where(newly, torch.tensor(module.global_step, device=device), self._grad_step)
        self._grad_index = torch.where(newly, (~ok).long().argmax(), self._grad_index)
        if self._due(module, device):
            self.check(module)

    def check(self, module: LightningModule) -> None:
        steps = [t.reshape(()).cpu() for t in (self._first_step, self._grad_step) if t is not None]
        if not steps or max(int(t) for t in steps) < 0:  # the one synchronisation
            return
        loss_step = int(self._first_step) if self._first_step is not None else -1
        if loss_step >= 0:
            step = loss_step
            values = self._values.tolist()
            shown = ", ".join(f"{n}={v:.6g}" for n, v in zip(self._names[1:], values[1:]))
            bad = [n for n, v in zip(self._names[1:], values[1:]) if not math.isfinite(v)]
            what = f"non-finite loss at global step {step}"
            detail = f": {shown}; non-finite term(s): {', '.join(bad) or 'the weighted sum'}"
        else:
            step = int(self._grad_step)
            what = f"non-finite gradient at global step {step}"
            detail = f": first in parameter {self._param_names[int(self._grad_index)]} (the loss was finite)"
        where = "" if step == module.global_step else f" (detected at step {module.global_step})"
        saved = save_recovery_checkpoint(module, step) if step == module.global_step else None
        fix = ("the same command with the lowered value (e.g. --model.init_args.lr ...) and --resume_changes allow "
               "applies it from there")
        resume = (f" The weights from before this step are saved in {saved}: resume with --ckpt_path {saved}; {fix}."
                  if saved else f" Resume from the run's last.ckpt (its weights predate the failure): --resume auto; "
                  f"{fix}.")
        raise FloatingPointError(
            f"{what} (epoch {module.current_epoch}){where}{detail}. Lower the learning rate or the loss weights, "
            "or check alpha/beta (negative alpha or beta diverges where a probability underflows)." + resume
        )


def save_recovery_checkpoint(module: LightningModule, step: int) -> Path | None:
    """Save a resumable checkpoint before stopping on a non-finite value (single process, with a run folder)."""
    trainer = getattr(module, "_trainer", None)
    if trainer is None or trainer.world_size > 1:
        return None
    callback = trainer.checkpoint_callback
    folder = getattr(callback, "dirpath", None) if callback is not None else None
    if folder is None and trainer.logger is not None and trainer.log_dir is not None:
        folder = Path(trainer.log_dir) / "checkpoints"
    if folder is None:
        return None
    path = Path(folder) / f"nonfinite-step{step}.ckpt"
    path.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(path)
    return path


class GuardedTraining:
    """Mixin of the suite's LightningModules: the non-finite loss/gradient guard and its policy.

    ``nonfinite_policy`` "raise" (default) stops the run (see :class:`NonFiniteGuard`); "skip" skips every step
    whose loss is not finite (no backward, no optimiser step; it costs one synchronisation per step), counts them
    in ``train/skipped_steps``, and stops after ``max_skipped_steps``. Non-finite gradients always stop the run,
    except under fp16 mixed precision, whose gradient scaler skips overflowing steps by design.
    """

    nonfinite_policy: str = "raise"
    max_skipped_steps: int = 100

    def init_guard(self, policy: str, max_skipped_steps: int) -> None:
        if policy not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {policy!r}")
        if max_skipped_steps < 0:
            raise ValueError(f"max_skipped_steps must be >= 0, got {max_skipped_steps}")
        self.nonfinite_policy, self.max_skipped_steps = policy, int(max_skipped_steps)
        self.nonfinite_guard = NonFiniteGuard()
        self.skipped_steps = 0

    def guard_loss(self, loss: Tensor, **terms: Tensor) -> Tensor | None:
        """The loss to return from ``training_step``, or None to skip this step (policy "skip")."""
        if self.nonfinite_policy == "skip":
            if bool(torch.isfinite(loss).all()):
                return loss
            self.skipped_steps += 1
            shown = ", ".join(f"{n}={float(v):.6g}" for n, v in terms.items())
            rank_zero_info(f"skipping step {self.global_step}: non-finite loss ({shown}); "
                           f"{self.skipped_steps} skipped so far")
            self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)
            if self.skipped_steps > self.max_skipped_steps:
                raise FloatingPointError(
                    f"{self.skipped_steps} training steps had a non-finite loss (more than max_skipped_steps="
                    f"{self.max_skipped_steps}), the last at global step {self.global_step}: {shown}. Lower the "
                    "learning rate or the loss weights, or check alpha/beta."
                )
            return None
        self.nonfinite_guard.record(self, loss, **terms)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        trainer = getattr(self, "_trainer", None)
        if getattr(getattr(trainer, "precision_plugin", None), "scaler", None) is not None:
            # fp16 mixed precision: overflowing (inf) gradients are how the gradient scaler finds its scale; it
            # skips those steps itself and lowers the scale. They are expected, not a failure.
            return
        self.nonfinite_guard.record_gradients(self)

    def on_train_epoch_end(self) -> None:
        self.nonfinite_guard.check(self)


class TeacherLogitCaching:
    """Mixin of the distillation modules: the opt-in teacher-logit cache (:mod:`abkd_vision.teacher_cache`).

    When the option named by ``logit_cache_option`` is set, ``setup("fit")`` opens the cache for this teacher,
    data and augmentation (the data module names its views: ``teacher_views()`` and ``view_dataset_key()``), hands
    it to the teacher and makes the data yield ``(images, target, index, view)``; any mismatch runs the live
    teacher instead, saying why once. ``index`` and ``view`` stay on the host, where the cache reads them, so a
    warm-cache step copies nothing back from the device. Subclasses say where the teacher holds the cache and how
    the key is made.
    """

    logit_cache_option = "teacher_cache"  # the hyper-parameter holding the cache folder
    logit_cache_views = "cacheable augmentation"  # what the data must offer, for the message when it does not
    teacher_cache_note: str | None = None  # where the cache is, or why it is off, once set up

    def attached_logit_cache(self) -> TeacherLogitCache | None:
        raise NotImplementedError

    def attach_logit_cache(self, cache: TeacherLogitCache | None) -> None:
        raise NotImplementedError

    def logit_cache_key(self, datamodule, views) -> dict:
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.hparams.get(self.logit_cache_option):
            self.setup_logit_cache()

    def setup_logit_cache(self) -> TeacherLogitCache | None:
        """Attach the cache and switch the data to named views; or fall back to the live teacher, saying why."""
        location = self.hparams.get(self.logit_cache_option)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        views = datamodule.teacher_views() if hasattr(datamodule, "teacher_views") else None
        if views is None:
            what = type(datamodule).__name__ if datamodule is not None else "no data module"
            return self._logit_cache_off(f"the training data ({what}) has no {self.logit_cache_views}")
        try:
            cache = TeacherLogitCache.open(location, self.logit_cache_key(datamodule, views))
        except CacheMismatch as err:
            return self._logit_cache_off(str(err))
        self.attach_logit_cache(cache)
        datamodule.return_views = True
        self.teacher_cache_note = f"teacher cache {cache.directory}"
        rank_zero_info(f"teacher logits cached in {cache.directory} ({cache.filled_count():,} of "
                       f"{cache.num_images * cache.num_views:,} image views filled; the rest are filled as "
                       "training meets them)")
        if getattr(datamodule, "strong_view", False):
            head = type(getattr(self, "head", None)).__name__
            rank_zero_info(f"{head}'s strong view (RandAugment) is not cacheable: the teacher runs live on it; the "
                           "weak view uses the cache")
        return cache

    def _logit_cache_off(self, reason: str) -> None:
        self.attach_logit_cache(None)
        self.teacher_cache_note = f"teacher cache off: {reason}"
        rank_zero_info(f"teacher cache {self.hparams.get(self.logit_cache_option)} not used, the live teacher runs "
                       f"instead: {reason}")
        return None

    def teardown(self, stage: str) -> None:
        cache = self.attached_logit_cache()
        if stage == "fit" and cache is not None:
            datamodule = getattr(self.trainer, "datamodule", None)
            if hasattr(datamodule, "return_views"):
                datamodule.return_views = False
            cache.close()
            self.attach_logit_cache(None)
        super().teardown(stage)

    def log_cache_hit_rate(self, rate: float | None, batch_size: int) -> None:
        """``train/teacher_cache_hit_rate`` of a batch that named its views (per step and per epoch)."""
        if rate is not None:
            self.log("train/teacher_cache_hit_rate", rate, on_step=True, on_epoch=True, batch_size=batch_size)

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        if self.attached_logit_cache() is not None and isinstance(batch, (list, tuple)) and len(batch) == 4:
            images, target, index, view = batch
            return [*super().transfer_batch_to_device([images, target], device, dataloader_idx), index, view]
        return super().transfer_batch_to_device(batch, device, dataloader_idx)


class DistillationHeadHooks:
    """Mixin of the distillation modules: what they do with their ``head`` besides calling it.

    * ``head.set_epoch(current_epoch)`` at the start of every training epoch (CTKD's curriculum follows the epoch);
    * ``head.log_values()`` (device tensors, e.g. the learned temperature) logged per epoch as ``train/<name>``;
    * the views: a head with ``views == 2`` (MLKD) trains on ``[weak, strong]`` images (the data's
      ``strong_view``), any other head on one view; a mismatch is an error at fit start (or at the first step when
      the data comes without a data module) naming the fix.
    """

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.head.set_epoch(self.current_epoch)

    def log_head_values(self) -> None:
        # device tensors, reduced at the epoch's end only (sync_dist: an instance-wise temperature differs by rank)
        for key, value in self.head.log_values().items():
            self.log(f"train/{key}", value, on_step=False, on_epoch=True, sync_dist=True)

    def views_error(self, two_views: bool) -> ValueError:
        name = type(self.head).__name__
        if not two_views:
            return ValueError(f"{name} trains on two views of each image: set data.init_args.strong_view: true")
        return ValueError(f"data.init_args.strong_view is true but the head {name} trains on one view of each image: "
                          "set data.init_args.strong_view: false (the strong view would cost a second forward pass "
                          "for nothing)")

    def check_head_views(self) -> None:
        """At fit start: the data module's ``strong_view`` must match ``head.views``."""
        datamodule = getattr(self.trainer, "datamodule", None)
        strong = getattr(datamodule, "strong_view", None)
        if strong is not None and bool(strong) != (self.head.views == 2):
            raise self.views_error(bool(strong))

    def split_views(self, images) -> tuple[Tensor, Tensor | None]:
        """``(weak, strong)`` of a two-view batch's images, ``(images, None)`` of a one-view batch."""
        two = isinstance(images, (list, tuple))
        if two != (self.head.views == 2):
            raise self.views_error(two)
        return (images[0], images[1]) if two else (images, None)


def kd_warmup_scale(epoch: int, warmup_epochs: int) -> float:
    """min((epoch + 1) / warmup_epochs, 1), or 1 without warm-up (DKD's linear KD warm-up)."""
    return min((epoch + 1) / warmup_epochs, 1.0) if warmup_epochs > 0 else 1.0


@torch.no_grad()
def count_correct(module: LightningModule, loader, predict) -> tuple[int, int]:
    """``(correct, total)`` of ``predict(images).argmax(-1)`` over ``loader``, summed over every process and
    limited to the trainer's ``limit_val_batches`` when it is a batch count."""
    limit = module.trainer.limit_val_batches
    max_batches = limit if isinstance(limit, int) else None
    counts = torch.zeros(2, dtype=torch.long, device=module.device)
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        if isinstance(batch, IndexBatch):  # data.on_device: made on the module's device
            batch = batch.to(module.device).materialise()
        images, target = batch[0].to(module.device), batch[1].to(module.device)
        counts[0] += (predict(images).argmax(dim=-1) == target).sum()
        counts[1] += target.numel()
    correct, total = module.trainer.strategy.reduce(counts, reduce_op="sum").tolist()
    return int(correct), int(total)


def training_progress(trainer) -> dict:
    """Epochs and optimiser steps done and planned, and whether the plan was carried out.

    ``finished`` is True only when the trainer was not interrupted and ran its planned epochs (``max_epochs``) or
    steps (``max_steps``), or a callback such as ``EarlyStopping`` ended it on purpose.
    """
    max_epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else None
    max_steps = trainer.max_steps if trainer.max_steps is not None and trainer.max_steps >= 0 else None
    epochs, steps = int(trainer.current_epoch), int(trainer.global_step)
    reached = (max_epochs is not None and epochs >= max_epochs) or (max_steps is not None and steps >= max_steps)
    early = any(cb.stopped_epoch > 0 for cb in trainer.callbacks if isinstance(cb, EarlyStopping))
    try:
        planned_steps = trainer.estimated_stepping_batches
        planned_steps = int(planned_steps) if math.isfinite(planned_steps) else None
    except Exception:  # noqa: BLE001 -- no training loader (e.g. a module used outside fit)
        planned_steps = max_steps
    return {"finished": bool(not trainer.interrupted and steps > 0 and (reached or early)),
            "epochs_done": epochs, "epochs_planned": max_epochs, "steps_done": steps,
            "steps_planned": planned_steps, **({"stopped_early": True} if early and not reached else {})}


_PROGRESS_KEYS = ("finished", "epochs_done", "epochs_planned", "steps_done", "steps_planned", "stopped_early",
                  "stopped_by")


def _protocol(trainer, module: LightningModule, summary: dict) -> dict:
    """The run's protocol (:func:`abkd_vision.protocol.run_protocol`); a failure to describe it is recorded, never
    raised (the run's results matter more)."""
    from abkd_vision.protocol import run_protocol

    try:
        return run_protocol(trainer, module, summary)
    except Exception as err:  # noqa: BLE001
        return {"unrecorded": f"{type(err).__name__}: {err}"}


def write_results(module: LightningModule, summary: dict, name: str = "results.json",
                  stopped_by: str | None = None) -> Path | None:
    """Write ``summary`` as JSON into the run directory (rank 0; atomically), or do nothing without a logger.

    :func:`training_progress` is added (``finished``, epochs and steps done and planned); sweeps treat a run as
    done only when ``finished`` is true. ``stopped_by`` names the signal that stopped the run. ``protocol`` says how
    every number was obtained (:mod:`abkd_vision.protocol`: epochs, augmentation, batch, devices, precision, what
    val is, the selection rule of each number, library versions).
    """
    # trainer.log_dir is a collective under DDP: every rank asks, only rank 0 writes.
    trainer = module.trainer
    if trainer.state.fn == "fit":
        progress = training_progress(trainer)
    else:  # evaluation only (zero-shot, a test after fit): the training record of an earlier fit stays
        progress = {"finished": not trainer.interrupted}
        earlier = Path(trainer.log_dir) / name if trainer.logger is not None and trainer.log_dir else None
        try:
            old = json.loads(earlier.read_text()) if earlier is not None and earlier.is_file() else {}
        except (OSError, ValueError):
            old = {}
        if "steps_done" in old:
            progress = {k: old[k] for k in _PROGRESS_KEYS if k in old}
            progress["finished"] = bool(old.get("finished")) and not trainer.interrupted
    if stopped_by:
        progress = {**progress, "finished": False, "stopped_by": stopped_by}
    summary = {"finished": progress.pop("finished"), **summary, **progress}
    summary["protocol"] = _protocol(trainer, module, summary)
    log_dir = trainer.log_dir if trainer.logger is not None else None
    if log_dir is None or not trainer.is_global_zero:
        return None
    path = atomic_write(Path(log_dir) / name, json.dumps(summary, indent=2) + "\n")
    rank_zero_info(f"results written to {path}: {summary}")
    if not summary["finished"] and not stopped_by and not trainer.interrupted:
        rank_zero_info(f"the run did not carry out its plan: {progress}")
    return path
