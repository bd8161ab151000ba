"""Logit standardisation KD (Sun et al., CVPR 2024); ABLSD is this head with D_AB."""

from __future__ import annotations

from torch import Tensor

from abkd_vision.heads.base import upcast
from abkd_vision.heads.kd import KD
from abkd_vision.losses import Divergence


def standardize_logits(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """Z-score each row: (z - mean_k z) / (std_k z + eps), unbiased std as in the reference code.

    Shape [B, C] -> [B, C]. Each sample thus gets its own effective temperature std(z) * T.
    """
    logits = upcast(logits)
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True)
    return (logits - mean) / (std + eps)


class LSD(KD):
    """KD on z-scored logits with a shared base temperature.

    loss = T^2 * mean_i D(softmax(zscore(z_t,i) / T) || softmax(zscore(z_s,i) / T))

    Reference settings: T = 2, KD weight 9, CE weight 0.1; the official ABLSD also multiplies by
    T^2, so its lambda carries over unchanged.
    """

    def __init__(self, temperature: float = 2.0, divergence: Divergence | None = None):
        super().__init__(temperature=temperature, divergence=divergence)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None = None) -> Tensor:
        self._check_logits(student_logits, teacher_logits, target)
        if student_logits.shape[-1] < 2:
            raise ValueError("LSD needs at least 2 classes to standardise logits")
        return self._tempered_divergence(standardize_logits(student_logits), standardize_logits(teacher_logits))
