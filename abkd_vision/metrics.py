"""Base-to-new evaluation: micro accuracy on the base and the new classes, and their harmonic mean.

The base-to-new protocol (CoOp, PromptSRC, PromptKD) reports Dassl's accuracy, ``100 * correct / total`` over all
test images of a group (micro average; torchmetrics' ``MulticlassAccuracy`` defaults to macro), and
``HM = 2 * B * N / (B + N)``. Each group is classified among its own classes only.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["BaseNewAccuracy", "harmonic_mean"]

GROUPS = ("base", "new")


def harmonic_mean(base: float, new: float) -> float:
    """``2 B N / (B + N)`` (0 when both are 0)."""
    return 2.0 * base * new / (base + new) if base + new > 0 else 0.0


class BaseNewAccuracy(Metric):
    """Correct/total counts per group; ``compute()`` -> ``{"base_acc", "new_acc", "hm"}`` as tensors in [0, 1].

    ``update(logits [B, C_group], target [B], group)`` with ``group`` in ``("base", "new")``. The counts are sums,
    so under DDP every rank's samples count once (with a sampler that does not pad, see the data modules).
    A group with no sample yet computes to NaN (and HM to NaN).
    """

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for g in GROUPS:
            self.add_state(f"{g}_correct", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
            self.add_state(f"{g}_total", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: Tensor, target: Tensor, group: str) -> None:
        if group not in GROUPS:
            raise ValueError(f"group must be one of {GROUPS}, got {group!r}")
        correct = (logits.argmax(dim=-1) == target).sum()
        setattr(self, f"{group}_correct", getattr(self, f"{group}_correct") + correct)
        setattr(self, f"{group}_total", getattr(self, f"{group}_total") + target.numel())

    def compute(self) -> dict[str, Tensor]:
        acc = {}
        for g in GROUPS:
            total = getattr(self, f"{g}_total")
            correct = getattr(self, f"{g}_correct")
            acc[g] = correct.double() / total if total > 0 else torch.tensor(float("nan"), dtype=torch.float64)
        b, n = acc["base"], acc["new"]
        hm = 2 * b * n / (b + n) if (b + n) > 0 else torch.zeros((), dtype=torch.float64)
        return {"base_acc": b.float(), "new_acc": n.float(), "hm": hm.float()}
