"""DIST (Huang et al., NeurIPS 2022): relations, not distributions, are matched. No KL inside, so no AB variant."""

from __future__ import annotations

from torch import Tensor, nn

from abkd_vision.heads.base import DistillationHead, check_weight, tempered_mean


def pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``: [N, K] x [N, K] -> [N].

    The rows are centred and their cosine taken, with ``eps`` added to the product of norms (as the reference
    code does), so a constant row gives correlation 0 instead of NaN.
    """
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


class DIST(DistillationHead):
    """Inter- and intra-class relation distillation.

    Y_s = softmax(z_s / T), Y_t = softmax(z_t / T)      [B, C]
    inter = 1 - mean_i pearson(Y_s[i, :], Y_t[i, :])    (each sample's ranking of the classes)
    intra = 1 - mean_c pearson(Y_s[:, c], Y_t[:, c])    (each class's ranking of the samples in the batch)
    loss  = T^2 * (inter_weight * inter + intra_weight * intra)

    ``inter_weight``/``intra_weight`` are the paper's beta and gamma (1 and 1; the CIFAR recipe uses T = 4 and
    a KD weight of 2 with CE 1). The loss is a correlation, not a divergence: there is no KL for an alpha-beta
    divergence to replace, so DIST takes no ``divergence`` and has no AB variant. It takes both transforms:
    DIST+LS (``standardize``) and a learned temperature (with a per-sample T, the mean T^2 scales the loss).
    The intra-class term needs more than one sample per batch (with one it is the constant 1).
    """

    def __init__(self, temperature: float = 4.0, inter_weight: float = 1.0, intra_weight: float = 1.0,
                 standardize: bool = False, learned_temperature: nn.Module | None = None,
                 divergence: nn.Module | None = None):
        if divergence is not None:
            raise ValueError(
                "DIST matches Pearson correlations of the two networks' probabilities, not distributions: it has "
                "no KL for a divergence to replace, so there is no AB variant of it; remove head.init_args."
                "divergence (for an alpha-beta divergence use KD, DKD, LSD, TTM, NKD or MLKD)"
            )
        super().__init__(None, standardize, learned_temperature)
        self.divergence = None  # nothing to inject: see above
        self.temperature = self._positive("temperature", temperature)
        self.inter_weight = check_weight("inter_weight", inter_weight)
        self.intra_weight = check_weight("intra_weight", intra_weight)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None = None) -> Tensor:
        self._check_logits(student_logits, teacher_logits, target)
        student, teacher = self.prepare(student_logits, teacher_logits)
        t = self.temperature_for(student, teacher, self.temperature)
        y_s, y_t = (student / t).softmax(dim=-1), (teacher / t).softmax(dim=-1)
        inter = 1.0 - pearson_rows(y_s, y_t)           # [B]
        intra = 1.0 - pearson_rows(y_s.t(), y_t.t())   # [C]
        scale = tempered_mean(inter.new_ones(1), t)    # T^2, or the mean T_i^2 of a per-sample temperature
        return scale * (self.inter_weight * inter.mean() + self.intra_weight * intra.mean())

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, inter_weight={self.inter_weight}, "
                f"intra_weight={self.intra_weight}{self._transforms_repr()}")
