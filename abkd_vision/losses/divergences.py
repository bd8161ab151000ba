"""Divergences as ``nn.Module``s, so heads and configs can take any of them.

Every module is called as ``div(teacher_log_probs, student_log_probs)`` with tensors of shape
[..., C] and returns the divergence per row, shape [...]. Each class is a valid LightningCLI
``class_path`` target, and ``build_divergence(name, **params)`` builds one by short name::

    build_divergence("ab", alpha=0.8, beta=0.3)
    build_divergence("fkl")                    # = ab(1, 0)
"""

from __future__ import annotations

from torch import Tensor, nn

from abkd_vision.losses import functional as F

__all__ = [
    "Divergence",
    "ForwardKL",
    "ReverseKL",
    "AlphaBetaDivergence",
    "AlphaDivergence",
    "BetaDivergence",
    "Hellinger",
    "SquaredEuclidean",
    "WeightedKL",
    "JensenShannon",
    "DIVERGENCES",
    "build_divergence",
]


class Divergence(nn.Module):
    """Base class: D(p||q) per row from log-probabilities, shape [..., C] -> [...]."""

    def forward(self, teacher_log_probs: Tensor, student_log_probs: Tensor) -> Tensor:
        raise NotImplementedError


class ForwardKL(Divergence):
    """KL(p||q) = sum_k p_k log(p_k / q_k): mass-covering; the classic KD objective."""

    def forward(self, teacher_log_probs: Tensor, student_log_probs: Tensor) -> Tensor:
        return F.forward_kl(teacher_log_probs, student_log_probs)


class ReverseKL(Divergence):
    """KL(q||p) = sum_k q_k log(q_k / p_k): mode-seeking."""

    def forward(self, teacher_log_probs: Tensor, student_log_probs: Tensor) -> Tensor:
        return F.reverse_kl(teacher_log_probs, student_log_probs)


class AlphaBetaDivergence(Divergence):
    """D_AB^(alpha, beta)(p||q), defined for every finite (alpha, beta) (ABKD eq. 8).

    alpha tunes hardness-concentration (weight on classes where the student under-estimates
    the teacher), beta confidence-concentration (weight by the student's own confidence).
    """

    def __init__(self, alpha: float = 0.5, beta: float = 0.5):
        super().__init__()
        self.alpha = F.check_finite_number("alpha", alpha)
        self.beta = F.check_finite_number("beta", beta)

    def forward(self, teacher_log_probs: Tensor, student_log_probs: Tensor) -> Tensor:
        return F.alpha_beta_divergence(teacher_log_probs, student_log_probs, self.alpha, self.beta)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}"


class AlphaDivergence(AlphaBetaDivergence):
    """Amari's alpha-divergence: D_AB with beta = 1 - alpha."""

    def __init__(self, alpha: float = 0.5):
        alpha = F.check_finite_number("alpha", alpha)
        super().__init__(alpha=alpha, beta=1.0 - alpha)


class BetaDivergence(AlphaBetaDivergence):
    """The beta-divergence: D_AB with alpha = 1 (beta = 0 is forward KL)."""

    def __init__(self, beta: float = 0.5):
        super().__init__(alpha=1.0, beta=beta)


class Hellinger(AlphaBetaDivergence):
    """D_AB(0.5, 0.5) = 2 * sum_k (sqrt(p_k) - sqrt(q_k))^2 (four times the squared Hellinger distance
    with the 1/2 convention)."""

    def __init__(self):
        super().__init__(alpha=0.5, beta=0.5)


class SquaredEuclidean(AlphaBetaDivergence):
    """D_AB(1, 1) = 1/2 * sum_k (p_k - q_k)^2."""

    def __init__(self):
        super().__init__(alpha=1.0, beta=1.0)


class WeightedKL(Divergence):
    """fkl_weight * KL(p||q) + rkl_weight * KL(q||p) (WSD, the weighted sum of both KLs)."""

    def __init__(self, fkl_weight: float = 0.5, rkl_weight: float = 0.5):
        super().__init__()
        self.fkl_weight = F.check_finite_number("fkl_weight", fkl_weight)
        self.rkl_weight = F.check_finite_number("rkl_weight", rkl_weight)

    def forward(self, teacher_log_probs: Tensor, student_log_probs: Tensor) -> Tensor:
        return F.weighted_kl(teacher_log_probs, student_log_probs, self.fkl_weight, self.rkl_weight)

    def extra_repr(self) -> str:
        return f"fkl_weight={self.fkl_weight}, rkl_weight={self.rkl_weight}"


class JensenShannon(Divergence):
    """JSD(p, q) = 1/2 KL(p||M) + 1/2 KL(q||M), M = (p + q)/2."""

    def forward(self, teacher_log_probs: Tensor, student_log_probs: Tensor) -> Tensor:
        return F.jensen_shannon(teacher_log_probs, student_log_probs)


DIVERGENCES: dict[str, type[Divergence]] = {
    "fkl": ForwardKL,
    "rkl": ReverseKL,
    "ab": AlphaBetaDivergence,
    "alpha": AlphaDivergence,
    "beta": BetaDivergence,
    "hellinger": Hellinger,
    "sed": SquaredEuclidean,
    "wsd": WeightedKL,
    "jsd": JensenShannon,
}


def build_divergence(name: str, **params) -> Divergence:
    """Build a divergence by short name: fkl, rkl, ab, alpha, beta, hellinger, sed, wsd, jsd."""
    key = name.lower() if isinstance(name, str) else name
    if key not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; choose one of {sorted(DIVERGENCES)}")
    try:
        return DIVERGENCES[key](**params)
    except TypeError as err:
        raise ValueError(f"bad parameters {params} for divergence {name!r}: {err}") from None
