"""What every LightningModule of the suite shares: the non-finite loss guard and the results file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from abkd_vision.io import atomic_write

__all__ = ["NonFiniteGuard", "check_nonfinite", "raise_if_nonfinite", "write_results"]


class NonFiniteGuard:
    """Stops training on a NaN/inf loss, naming the first bad step and its loss terms, without synchronising
    the host with the device on every step.

    ``record(module, loss, **terms)`` keeps, on the loss's device, the first global step whose loss was not
    finite and the term values at that step (tensor ops only: no ``.item()``, no data-dependent branch, so a GPU
    step never waits and ``torch.compile`` sees no graph break). ``check(module)`` reads them back (one
    synchronisation) and raises. Modules call ``check`` every ``check_every`` steps (every step on the CPU, where
    it costs nothing; 50 on accelerators) and at the end of every training epoch.
    """

    def __init__(self, check_every: int | None = None):
        self.check_every = check_every
        self._first_step: Tensor | None = None
        self._values: Tensor | None = None
        self._names: tuple[str, ...] = ()

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
        every = self.check_every or (1 if loss.device.type == "cpu" else 50)
        if (module.global_step + 1) % every == 0:
            self.check(module)

    def check(self, module: LightningModule) -> None:
        if self._first_step is None:
            return
        step = int(self._first_step)  # the one synchronisation
        if step < 0:
            return
        values = self._values.tolist()
        shown = ", ".join(f"{n}={v:.6g}" for n, v in zip(self._names[1:], values[1:]))
        bad = [n for n, v in zip(self._names[1:], values[1:]) if not math.isfinite(v)]
        where = "" if step == module.global_step else f" (detected at step {module.global_step})"
        raise FloatingPointError(
            f"non-finite loss at global step {step} (epoch {module.current_epoch}){where}: {shown}; "
            f"non-finite term(s): {', '.join(bad) or 'the weighted sum'}. Lower the learning rate or the loss "
            "weights, or check alpha/beta (negative alpha or beta diverges where a probability underflows)."
        )


def raise_if_nonfinite(module: LightningModule, loss: Tensor, **terms: Tensor) -> None:
    """Record ``loss`` in the module's :class:`NonFiniteGuard` (created on first use) and check on schedule."""
    guard = module.__dict__.setdefault("_nonfinite_guard", NonFiniteGuard())
    guard.record(module, loss, **terms)


def check_nonfinite(module: LightningModule) -> None:
    """Raise now if any recorded step had a non-finite loss (called at the end of each training epoch)."""
    guard = module.__dict__.get("_nonfinite_guard")
    if guard is not None:
        guard.check(module)


def write_results(module: LightningModule, summary: dict, name: str = "results.json") -> Path | None:
    """Write ``summary`` as JSON into the run directory (rank 0; atomically), or do nothing without a logger.

    ``"finished"`` is added: True when the trainer ran to its end (not interrupted). Sweeps treat a run as done
    only then.
    """
    # trainer.log_dir is a collective under DDP: every rank asks, only rank 0 writes.
    trainer = module.trainer
    summary = {"finished": not trainer.interrupted, **summary}
    log_dir = trainer.log_dir if trainer.logger is not None else None
    if log_dir is None or not trainer.is_global_zero:
        return None
    path = atomic_write(Path(log_dir) / name, json.dumps(summary, indent=2) + "\n")
    rank_zero_info(f"results written to {path}: {summary}")
    return path
