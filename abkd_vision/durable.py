"""Runs that can be stopped at any moment and continue exactly where they were (on by default in ``run.py``).

:class:`ResumeCheckpoint` keeps ``<run>/checkpoints/last.ckpt`` current: it is rewritten at the end of every
epoch and every ``every_n_train_steps`` optimiser steps, atomically (:class:`AtomicCheckpointIO`: a kill or a full
disk at any moment leaves the previous ``last.ckpt`` loadable). The best-epoch checkpoints of a ``ModelCheckpoint``
stay where they are; ``last.ckpt`` belongs to this callback alone.

Stopping: SIGTERM and SIGUSR1 (what SLURM sends before a time limit or a preemption) and a first Ctrl-C (SIGINT)
ask the run to stop at the end of the current training step (a signal during validation takes effect when the
validation has finished, so the saved state always sits between training steps). The run then saves
``last.ckpt``, writes ``results.json`` with ``"finished": false`` and exits with :data:`PREEMPTED_EXIT_CODE`;
the same command with ``--resume auto`` continues it. A second Ctrl-C interrupts at once (the last periodic
``last.ckpt`` remains). Under DDP, Lightning broadcasts rank 0's stop request before every step, so all
processes stop at the same step.

Each checkpoint also holds the run's resolved configuration (``abkd_run``), which ``run.py`` compares with the
configuration given on resume (:mod:`abkd_vision.resume`).
"""

from __future__ import annotations

import errno
import io
import signal
import threading
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from abkd_vision.errors import PREEMPTED_EXIT_CODE
from abkd_vision.io import DiskFullError, atomic_write

__all__ = ["AtomicCheckpointIO", "PREEMPTED_EXIT_CODE", "RUN_KEY", "ResumeCheckpoint", "StopRequested",
           "last_checkpoint_dir"]

RUN_KEY = "abkd_run"  # the run's configuration and change history, inside every checkpoint
_STOP_SIGNALS = ("SIGINT", "SIGUSR1")  # SIGTERM is Lightning's own (it sets the same flag)


class StopRequested:
    """What a handled stop signal did (attached as ``abkd_stop`` to the exception ``trainer.fit`` raises)."""

    def __init__(self, signal_name: str, checkpoint: Path | None, epoch: int, step: int):
        self.signal_name, self.checkpoint, self.epoch, self.step = signal_name, checkpoint, epoch, step

    def __str__(self) -> str:
        where = f"saved {self.checkpoint}" if self.checkpoint else "no run folder, nothing saved"
        return (f"stopped by {self.signal_name} at epoch {self.epoch}, global step {self.step}: {where}; run the same "
                "command with --resume auto to continue")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file beside the target, fsync, rename (local paths; URLs as Lightning)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write(path, buffer.getbuffer())


def last_checkpoint_dir(trainer: Trainer) -> Path | None:
    """Where ``last.ckpt`` goes: the first ``ModelCheckpoint``'s folder when it names one, else
    ``<run folder>/checkpoints``; None without a logger (a run writes only into its own run folder)."""
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath is not None:
            return Path(cb.dirpath)
    if trainer.logger is None:
        return None
    log_dir = trainer.log_dir  # a collective under DDP: every rank asks
    return Path(log_dir) / "checkpoints" if log_dir is not None else None


class ResumeCheckpoint(Checkpoint):
    """Keep ``last.ckpt`` current and make stop signals save it (see the module docstring).

    Args:
        every_n_train_steps: also save every N optimiser steps (0: epoch ends only). The default, 500, loses at
            most a few minutes of work on a GPU for the shipped recipes (CIFAR: ~10-20 ms a step; base-to-new
            ViT-L/14 -> ViT-B/16: ~0.3-0.5 s a step), while a CIFAR epoch (781 steps) saves once more at its end.
        dirpath: folder of ``last.ckpt``; None: see :func:`last_checkpoint_dir`.
        handle_signals: turn SIGINT/SIGUSR1 (and Lightning's SIGTERM) into a checkpointed stop.
    """

    def __init__(self, every_n_train_steps: int = 500, dirpath: str | None = None, handle_signals: bool = True):
        if every_n_train_steps < 0:
            raise ValueError(f"every_n_train_steps must be >= 0 (0: save at epoch ends only), got "
                             f"{every_n_train_steps}")
        self.every_n_train_steps = int(every_n_train_steps)
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.handle_signals = bool(handle_signals)
        self.run_config: dict | None = None  # set by run.py: the resolved configuration
        self.resume_history: list[dict] = []  # set by run.py: earlier resumes with changes
        self.apply_changes = False  # set by run.py: a resume with allowed changes (optimiser settings refreshed)
        self.last_path: Path | None = None
        self._saved_step = -1
        self._signal: str | None = None
        self._pending = None  # a stop that arrived during validation, applied at its end
        self._previous: dict[int, Any] = {}
        self._trainer: Trainer | None = None

    # -- where, and the other checkpoint callbacks ------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        folder = self.folder(trainer)
        self.last_path = folder / "last.ckpt" if folder is not None else None
        for cb in trainer.checkpoint_callbacks:
            if cb is not self and isinstance(cb, ModelCheckpoint) and cb.save_last:
                cb.save_last = False  # last.ckpt is this callback's: a top-k callback would write it late
        strategy = trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()
        self._trainer = trainer

    def folder(self, trainer: Trainer) -> Path | None:
        """Where this callback keeps ``last.ckpt`` for ``trainer`` (None: no run folder, nothing is saved)."""
        return self.dirpath or last_checkpoint_dir(trainer)

    def save(self, trainer: Trainer) -> Path | None:
        if self.last_path is None:
            return None
        trainer.save_checkpoint(self.last_path)
        self._saved_step = trainer.global_step
        return self.last_path

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_train_steps and step > 0 and step % self.every_n_train_steps == 0 \
                and step != self._saved_step:
            self.save(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self.save(trainer)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        checkpoint[RUN_KEY] = {"config": self.run_config, "resumes": list(self.resume_history)}

    # -- stop signals ----------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.apply_changes:
            from abkd_vision.resume import refresh_optimizers

            for line in refresh_optimizers(trainer, pl_module):
                rank_zero_info(f"resumed with {line}")
            self.apply_changes = False
        self._signal = None
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            return
        for name in _STOP_SIGNALS:
            signum = getattr(signal, name, None)
            if signum is not None:
                self._previous[signum] = signal.signal(signum, self._on_signal)
        previous_term = signal.getsignal(signal.SIGTERM)  # Lightning's: note the name, then hand over

        def on_term(signum, frame):
            self._signal = self._signal or "SIGTERM"
            if trainer.validating:  # Lightning would stop mid-validation: wait for its end (on_validation_end)
                self._pending = lambda: previous_term(signum, frame) if callable(previous_term) else None
                return
            if callable(previous_term):
                previous_term(signum, frame)

        self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, on_term)

    def _on_signal(self, signum: int, frame) -> None:
        trainer = self._trainer
        if signum == signal.SIGINT and self._signal is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self._signal = signal.Signals(signum).name
        rank_zero_info(f"{self._signal} received: stopping after this training step and saving {self.last_path}")
        if trainer is not None:
            if trainer.validating:  # stop after the validation, at a training step boundary
                self._pending = self._raise_flag
            else:
                self._raise_flag()

    def _raise_flag(self) -> None:
        if self._trainer is not None:
            self._trainer._signal_connector.received_sigterm = True  # Lightning's stop flag (broadcast from rank 0)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending()

    def _restore_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._previous.items():
            if handler is not None:
                signal.signal(signum, handler)
        self._previous = {}

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_signals()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore_signals()
        if not isinstance(exception, SIGTERMException):
            return
        # Raised at the end of a training step (or of an epoch): the state is consistent, and every process
        # raised it at the same step.
        saved = None
        try:
            saved = self.save(trainer)
        except DiskFullError:
            raise
        except OSError as err:  # keep the earlier last.ckpt; say why this one is missing
            rank_zero_warn(f"could not save {self.last_path} on {self._signal or 'SIGTERM'}: {err}")
            if err.errno == errno.ENOSPC:
                raise
        summary = getattr(pl_module, "summary", None)
        if callable(summary):
            from abkd_vision.lit.common import write_results

            write_results(pl_module, summary(), stopped_by=self._signal or "SIGTERM")
        # run.py reads this off the exception Lightning re-raises (after its own teardown)
        exception.abkd_stop = StopRequested(self._signal or "SIGTERM", saved, trainer.current_epoch,
                                            trainer.global_step)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restore_signals()

    @property
    def state_key(self) -> str:
        return "ResumeCheckpoint"
