"""Transformed teacher matching (Zheng & Yang, ICLR 2024); ABTTM is this head with D_AB."""

from __future__ import annotations

from torch import Tensor, nn

from abkd_vision.heads.base import DistillationHead
from abkd_vision.losses import Divergence


class TTM(DistillationHead):
    """Match the power-transformed teacher with the un-tempered student.

    p = softmax(z_t)^gamma / sum_k softmax(z_t)_k^gamma = softmax(gamma * z_t),  q = softmax(z_s)
    loss = mean_i w_i * D(p_i || q_i)     (no T^2 factor)

    ``weighted=False``: w_i = 1 (TTM). ``weighted=True``: w_i = sum_k softmax(z_t,i)_k^gamma (WTTM),
    which is larger for flatter teacher outputs and depends only on the teacher.
    gamma plays the role of 1/T on the teacher only. The official TTM/ABTTM code also has no T^2,
    so its lambda (e.g. 45 for vgg13->vgg8 with gamma = 0.1) carries over unchanged.
    TTM+LS = ``TTM(standardize=True)`` (z-scored logits, then the power transform). TTM has no temperature, so a
    learned temperature (CTKD) is an error.
    """

    has_temperature = False

    def __init__(self, gamma: float = 0.1, divergence: Divergence | None = None, weighted: bool = False,
                 standardize: bool = False, learned_temperature: nn.Module | None = None):
        super().__init__(divergence, standardize, learned_temperature)
        self.gamma = self._positive("gamma", gamma)
        self.weighted = bool(weighted)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None = None) -> Tensor:
        self._check_logits(student_logits, teacher_logits, target)
        student, teacher = self.prepare(student_logits, teacher_logits)
        teacher_log_probs = teacher.log_softmax(dim=-1)
        log_p = (self.gamma * teacher_log_probs).log_softmax(dim=-1)
        log_q = student.log_softmax(dim=-1)
        per_sample = self.divergence(log_p, log_q)
        if self.weighted:
            per_sample = per_sample * (self.gamma * teacher_log_probs).logsumexp(dim=-1).exp()
        return per_sample.mean()

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, weighted={self.weighted}{self._transforms_repr()}"

    def _no_temperature_reason(self) -> str:
        return " (its gamma is a power on the teacher only and the student is not tempered)"
