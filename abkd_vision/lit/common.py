"""What every LightningModule of the suite shares: the non-finite loss guard and the results file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

__all__ = ["raise_if_nonfinite", "write_results"]


def raise_if_nonfinite(module: LightningModule, loss: Tensor, **terms: Tensor) -> None:
    """Stop with a clear error if ``loss`` is NaN/inf, naming the step and the offending terms."""
    if torch.isfinite(loss).all():
        return
    bad = [name for name, value in terms.items() if not torch.isfinite(value).all()]
    values = ", ".join(f"{name}={float(value):.6g}" for name, value in terms.items())
    raise FloatingPointError(
        f"non-finite loss at global step {module.global_step} (epoch {module.current_epoch}): {values}; "
        f"non-finite term(s): {', '.join(bad) or 'the weighted sum'}. Lower the learning rate or the loss "
        "weights, or check alpha/beta (negative alpha or beta diverges where a probability underflows)."
    )


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
    path = Path(log_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, path)
    rank_zero_info(f"results written to {path}: {summary}")
    return path
