"""Vanilla KD (Hinton et al. 2015) with any divergence; ABKD is this head with D_AB."""

from __future__ import annotations

from torch import Tensor

from abkd_vision.heads.base import DistillationHead, upcast
from abkd_vision.losses import Divergence


class KD(DistillationHead):
    """Temperature-scaled logit distillation.

    loss = T^2 * mean_i D(softmax(z_t,i / T) || softmax(z_s,i / T))

    With the default divergence (forward KL) this is Hinton's KD as in mdistiller
    (sum over classes, batch mean, times T^2). ABKD = ``KD(divergence=AlphaBetaDivergence(a, b))``.

    Scaling vs. the official ABKD code: its AB loss has no T^2 and uses lambda = 32 at T = 4, which is
    ``kd_weight = 32 / T^2 = 2`` here. mdistiller's KD weight (0.9 with CE 0.1) carries over unchanged.

    Args:
        temperature: T > 0, applied to both teacher and student logits.
        divergence: D(p||q) per row; forward KL when None.
    """

    def __init__(self, temperature: float = 4.0, divergence: Divergence | None = None):
        super().__init__(divergence)
        self.temperature = self._positive("temperature", temperature)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None = None) -> Tensor:
        self._check_logits(student_logits, teacher_logits, target)
        return self._tempered_divergence(student_logits, teacher_logits)

    def _tempered_divergence(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """T^2 * mean D(softmax(z_t / T) || softmax(z_s / T)) on already validated logits."""
        t = self.temperature
        log_p = (upcast(teacher_logits) / t).log_softmax(dim=-1)
        log_q = (upcast(student_logits) / t).log_softmax(dim=-1)
        return self.divergence(log_p, log_q).mean() * (t * t)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
