"""The loss core: the alpha-beta divergence and its named special cases."""

from abkd_vision.losses.divergences import (
    DIVERGENCES,
    AlphaBetaDivergence,
    AlphaDivergence,
    BetaDivergence,
    Divergence,
    ForwardKL,
    Hellinger,
    JensenShannon,
    ReverseKL,
    SquaredEuclidean,
    WeightedKL,
    build_divergence,
)
from abkd_vision.losses.functional import (
    alpha_beta_divergence,
    forward_kl,
    jensen_shannon,
    reverse_kl,
    weighted_kl,
)

__all__ = [
    "DIVERGENCES",
    "AlphaBetaDivergence",
    "AlphaDivergence",
    "BetaDivergence",
    "Divergence",
    "ForwardKL",
    "Hellinger",
    "JensenShannon",
    "ReverseKL",
    "SquaredEuclidean",
    "WeightedKL",
    "alpha_beta_divergence",
    "build_divergence",
    "forward_kl",
    "jensen_shannon",
    "reverse_kl",
    "weighted_kl",
]
