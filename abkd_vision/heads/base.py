"""What every distillation head shares: the divergence it uses and input checks."""

from __future__ import annotations

from numbers import Real

import torch
from torch import Tensor, nn

from abkd_vision.losses import Divergence, ForwardKL
from abkd_vision.losses.functional import check_finite_number


def check_weight(name: str, value) -> float:
    """``value`` as a float when it is a loss weight (finite and >= 0), else a ValueError naming ``name``."""
    number = value.item() if isinstance(value, Tensor) and value.numel() == 1 else value
    if isinstance(number, Real) and not isinstance(number, bool) and not float(number) >= 0:  # also NaN
        raise ValueError(f"{name} must be >= 0, got {float(number)}")
    return check_finite_number(name, value)


def upcast(logits: Tensor) -> Tensor:
    """Half/bfloat16 logits to float32 (softmax and powers of small probabilities underflow in 16 bits);
    float32 and float64 pass through unchanged."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


class DistillationHead(nn.Module):
    """Base of the KD heads: turns (student logits, teacher logits, target) into a scalar loss.

    A head only shapes the teacher distribution p and the student distribution q (temperature,
    decoupling, standardisation, power transform); the distance between them is the injected
    ``divergence`` (forward KL when None). An AB variant is the same head with
    ``divergence=AlphaBetaDivergence(alpha, beta)``.

    Call: ``head(student_logits [B, C], teacher_logits [B, C], target [B] int64) -> scalar``.
    """

    def __init__(self, divergence: Divergence | None = None):
        super().__init__()
        if divergence is not None and not isinstance(divergence, nn.Module):
            raise ValueError(
                f"divergence must be a Divergence module (e.g. build_divergence('ab', alpha=0.8, beta=0.3)), "
                f"got {divergence!r}"
            )
        self.divergence = divergence if divergence is not None else ForwardKL()

    @staticmethod
    def _positive(name: str, value) -> float:
        value = check_finite_number(name, value)
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")
        return value

    @staticmethod
    def _check_logits(student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None) -> None:
        if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
            raise ValueError(
                "student and teacher logits must both be [batch, classes], got "
                f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}; a teacher/student "
                "class-count mismatch means they were built for different datasets"
            )
        for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
            if not t.is_floating_point():
                raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if target is not None and (target.shape != student_logits.shape[:1] or target.is_floating_point()):
            raise ValueError(
                f"target must be an integer tensor of shape [{student_logits.shape[0]}], "
                f"got {tuple(target.shape)} {target.dtype}"
            )

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError


__all__ = ["DistillationHead", "check_weight", "upcast"]
