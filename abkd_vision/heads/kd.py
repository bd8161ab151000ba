"""Vanilla KD (Hinton et al. 2015) with any divergence; ABKD is this head with D_AB."""

from __future__ import annotations

from torch import Tensor, nn

from abkd_vision.heads.base import DistillationHead, tempered_mean
from abkd_vision.losses import Divergence


class KD(DistillationHead):
    """Temperature-scaled logit distillation.

    loss = T^2 * mean_i D(softmax(z_t,i / T) || softmax(z_s,i / T))

    With the default divergence (forward KL) this is Hinton's KD as in mdistiller
    (sum over classes, batch mean, times T^2). ABKD = ``KD(divergence=AlphaBetaDivergence(a, b))``;
    KD+LS = ``KD(standardize=True)`` (= :class:`LSD`); CTKD = ``KD(learned_temperature=CurriculumTemperature())``
    (with a per-sample temperature, T_i^2 weighs each sample).

    Scaling vs. the official ABKD code: its AB loss has no T^2 and uses lambda = 32 at T = 4, which is
    ``kd_weight = 32 / T^2 = 2`` here. mdistiller's KD weight (0.9 with CE 0.1) carries over unchanged.

    Args:
        temperature: T > 0, applied to both teacher and student logits.
        divergence: D(p||q) per row; forward KL when None.
        standardize, learned_temperature: the two transforms of :class:`DistillationHead`.
    """

    def __init__(self, temperature: float = 4.0, divergence: Divergence | None = None, standardize: bool = False,
                 learned_temperature: nn.Module | None = None):
        super().__init__(divergence, standardize, learned_temperature)
        self.temperature = self._positive("temperature", temperature)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None = None) -> Tensor:
        self._check_logits(student_logits, teacher_logits, target)
        student, teacher = self.prepare(student_logits, teacher_logits)
        temperature = self.temperature_for(student, teacher, self.temperature)
        return tempered_mean(tempered_divergence(self.divergence, student, teacher, temperature), temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}{self._transforms_repr()}"


def tempered_divergence(divergence: Divergence, student: Tensor, teacher: Tensor,
                        temperature: float | Tensor) -> Tensor:
    """Per-sample D(softmax(z_t / T) || softmax(z_s / T)), shape [B], on prepared logits (without the T^2)."""
    log_p = (teacher / temperature).log_softmax(dim=-1)
    log_q = (student / temperature).log_softmax(dim=-1)
    return divergence(log_p, log_q)
