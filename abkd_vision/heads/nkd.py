"""NKD (Yang et al., ICCV 2023): the target term plus the normalised non-target KD; ABNKD is this head with D_AB
on the non-target part."""

from __future__ import annotations

from torch import Tensor, nn

from abkd_vision.heads.base import DistillationHead, check_weight, tempered_mean
from abkd_vision.heads.dkd import split_target
from abkd_vision.losses import Divergence


class NKD(DistillationHead):
    """Normalised KD.

    target term:     L_t = -mean_i p_i,y * log q_i,y                  (softmax at T = 1; the teacher is a weight)
    non-target term: L_n = gamma * T^2 * mean_i D(p_hat_i || q_hat_i)   p_hat, q_hat: softmax over the non-target
                                                                          classes of z / T (renormalised)
    loss = L_t + L_n

    The reference code writes L_n as the cross-entropy -sum_k p_hat_k log q_hat_k; that is KL(p_hat || q_hat) plus
    the teacher's entropy H(p_hat), which does not depend on the student. Here L_n uses the injected divergence, so
    with forward KL the loss is the reference loss minus gamma * T^2 * mean_i H(p_hat_i): the same gradients, and 0
    when the student matches the teacher. ABNKD = ``NKD(divergence=AlphaBetaDivergence(a, b))`` changes L_n only.

    Published settings: T 1, gamma 1.5 (ImageNet); T 3, gamma 3.5 (the official CIFAR-100 config). NKD needs the
    ground-truth target (``uses_labels``). With 2 classes the non-target term is exactly 0.
    """

    uses_labels = True

    def __init__(self, temperature: float = 1.0, gamma: float = 1.5, divergence: Divergence | None = None,
                 standardize: bool = False, learned_temperature: nn.Module | None = None):
        super().__init__(divergence, standardize, learned_temperature)
        self.temperature = self._positive("temperature", temperature)
        self.gamma = check_weight("gamma", gamma)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> Tensor:
        self._check_labelled(student_logits, teacher_logits, target)
        student, teacher = self.prepare(student_logits, teacher_logits)
        index = target.view(-1, 1)
        target_weight = teacher.softmax(dim=-1).gather(1, index).squeeze(1).detach()
        target_term = -(target_weight * student.log_softmax(dim=-1).gather(1, index).squeeze(1)).mean()
        t = self.temperature_for(student, teacher, self.temperature)
        _, others_t = split_target((teacher / t).log_softmax(dim=-1), target)
        _, others_s = split_target((student / t).log_softmax(dim=-1), target)
        return target_term + self.gamma * tempered_mean(self.divergence(others_t, others_s), t)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gamma={self.gamma}{self._transforms_repr()}"
