"""Logit standardisation KD (Sun et al., CVPR 2024); ABLSD is this head with D_AB."""

from __future__ import annotations

from torch import nn

from abkd_vision.heads.base import standardize_logits
from abkd_vision.heads.kd import KD
from abkd_vision.losses import Divergence


class LSD(KD):
    """KD on z-scored logits with a shared base temperature: ``KD(standardize=True)`` with the LS paper's T = 2.

    loss = T^2 * mean_i D(softmax(zscore(z_t,i) / T) || softmax(zscore(z_s,i) / T))

    Reference settings: T = 2, KD weight 9, CE weight 0.1; the official ABLSD also multiplies by
    T^2, so its lambda carries over unchanged. Standardisation on other heads (DKD+LS, MLKD+LS, ...) is their
    ``standardize`` option.
    """

    def __init__(self, temperature: float = 2.0, divergence: Divergence | None = None,
                 learned_temperature: nn.Module | None = None):
        super().__init__(temperature=temperature, divergence=divergence, standardize=True,
                         learned_temperature=learned_temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


__all__ = ["LSD", "standardize_logits"]
