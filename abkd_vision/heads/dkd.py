"""Decoupled KD (Zhao et al., CVPR 2022); ABDKD is this head with D_AB on the non-target part."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from abkd_vision.heads.base import DistillationHead, check_weight, tempered_mean
from abkd_vision.losses import Divergence, forward_kl


def split_target(log_probs: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Split full-softmax log-probs [B, C] into the binary target/non-target log-masses [B, 2] and
    the log-probs of the non-target classes renormalised among themselves [B, C-1].

    The non-target column is removed (not pushed to -1000 as in the reference code), so every
    divergence sees a proper distribution and C = 2 gives a single class with probability 1.
    """
    batch, classes = log_probs.shape
    keep = torch.ones_like(log_probs, dtype=torch.bool).scatter_(1, target.view(-1, 1), False)
    log_target = log_probs.gather(1, target.view(-1, 1))
    others = log_probs[keep].view(batch, classes - 1)
    # log(1 - p_target) from the other classes' mass: exact even when p_target rounds to 1.
    log_rest = others.logsumexp(dim=-1, keepdim=True)
    binary = torch.cat([log_target, log_rest], dim=1)
    return binary, others - log_rest


class DKD(DistillationHead):
    """TCKD + NCKD with temperature T.

    b_t, b_s = [p_y, 1 - p_y] of softmax(z / T) (teacher, student)
    p_hat, q_hat = softmax over the non-target classes of z / T
    loss = T^2 * mean_i [ tckd_weight * KL(b_t || b_s) + nckd_weight * D(p_hat || q_hat) ]

    TCKD stays forward KL whatever the divergence, as in the official ABDKD; only NCKD uses it.
    DKD's warm-up min(epoch / 20, 1) is a schedule of the training module (``kd_warmup_epochs``),
    not part of the head. With 2 classes NCKD is exactly 0. The official ABDKD also multiplies by
    T^2, so DKD's published weights (alpha_DKD = 1, beta_DKD = 8 or per pair) carry over unchanged.
    DKD+LS = ``DKD(standardize=True)`` (the LS paper's code multiplies both DKD weights by its KD weight);
    DKD+CTKD = ``DKD(learned_temperature=...)`` (per-sample T_i^2 with the instance variant).
    """

    uses_labels = True

    def __init__(self, temperature: float = 4.0, tckd_weight: float = 1.0, nckd_weight: float = 8.0,
                 divergence: Divergence | None = None, standardize: bool = False,
                 learned_temperature: nn.Module | None = None):
        super().__init__(divergence, standardize, learned_temperature)
        self.temperature = self._positive("temperature", temperature)
        self.tckd_weight = check_weight("tckd_weight", tckd_weight)
        self.nckd_weight = check_weight("nckd_weight", nckd_weight)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> Tensor:
        self._check_labelled(student_logits, teacher_logits, target)
        student, teacher = self.prepare(student_logits, teacher_logits)
        t = self.temperature_for(student, teacher, self.temperature)
        binary_t, others_t = split_target((teacher / t).log_softmax(dim=-1), target)
        binary_s, others_s = split_target((student / t).log_softmax(dim=-1), target)
        tckd = forward_kl(binary_t, binary_s)
        nckd = self.divergence(others_t, others_s)
        return tempered_mean(self.tckd_weight * tckd + self.nckd_weight * nckd, t)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, tckd_weight={self.tckd_weight}, nckd_weight={self.nckd_weight}"
                f"{self._transforms_repr()}")
