"""Divergences between two categorical distributions given as log-probabilities.

Every function takes ``teacher_log_probs`` (log p) and ``student_log_probs`` (log q) of the same
shape ``[..., C]`` and returns the divergence per row, shape ``[...]`` (summed over the last dim,
no batch reduction). Half and bfloat16 inputs are computed and returned in float32.

The core is the alpha-beta divergence (Cichocki, Cruces & Amari 2011; ABKD, Wang et al. 2025)::

    D_AB(p||q) = -1/(alpha*beta) * sum_k [ p^alpha q^beta - alpha/(alpha+beta) p^(alpha+beta)
                                                          - beta/(alpha+beta) q^(alpha+beta) ]

with its continuous extension (ABKD App. B, eq. 8) to beta=0, alpha=0, alpha+beta=0 and
alpha=beta=0. Named cases: (1, 0) forward KL, (0, 1) reverse KL, (0.5, 0.5) Hellinger
(2 * sum (sqrt p - sqrt q)^2), (1, 1) squared Euclidean (1/2 * sum (p - q)^2), alpha+beta=1 the
alpha-divergence, alpha=1 the beta-divergence.

How it is computed, and why. With a = log p, b = log q, delta = a - b, s = alpha + beta and the
exponents m = alpha*a + beta*b, A = s*a, B = s*b (so p^alpha q^beta = e^m, p^s = e^A, q^s = e^B),
three "divided differences" are finite for every real (alpha, beta)::

    P_beta  = (e^A - e^m) / beta     (= e^m * delta        at beta = 0)
    P_alpha = (e^B - e^m) / alpha    (= -e^m * delta       at alpha = 0)
    P_s     = (e^A - e^B) / s        (= e^B * delta        at s = 0)

and they satisfy beta*P_beta = s*P_s + alpha*P_alpha. The divergence per class is any of::

    d = (P_beta + P_alpha) / s = (P_s + P_alpha) / beta = (P_beta - P_s) / alpha

Each form cancels only as its own denominator goes to zero, so we divide by whichever of
(s, beta, alpha) is largest in magnitude: no 1/beta blow-up next to beta = 0 and no 0/0 at the
boundaries. Each P is evaluated as e^x * expm1(.) with the larger exponent factored out, so
nothing overflows for logits of magnitude 1e4 and underflowing probabilities contribute exactly
their limit. When all of |alpha|, |beta|, |s| are small (the corner around alpha = beta = 0)
every form cancels; there the Taylor series d = e^m * sum_n delta^n / n! * h_{n-2}(beta, -alpha)
(h_k the complete homogeneous symmetric polynomial) is used wherever it converges fast.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
from torch import Tensor

__all__ = [
    "alpha_beta_divergence",
    "forward_kl",
    "reverse_kl",
    "jensen_shannon",
    "weighted_kl",
    "check_log_probs",
    "check_finite_number",
]

# Below this max(|alpha|, |beta|, |alpha+beta|) the closed forms lose more than ~3 digits for
# moderate |log p - log q|, so the Taylor series takes over where it converges.
_CORNER = 0.05
# Where all of |alpha|, |beta|, |alpha+beta| are at least this (and alpha+beta > 0), the three-term
# form e^A/(beta s) + e^B/(alpha s) - e^m/(alpha beta) loses at most ~1/_DIRECT digits to
# cancellation and costs three exps: the fast path for the usual settings.
_DIRECT = 0.1
# On the fast path, inputs holding -inf (masked classes) are clamped here when needed: such classes
# then give e^(s * -1e30) = 0 in every term, i.e. exactly 0, with no NaN.
_NEG_LARGE = -1e30
# |alpha|, |beta| (and the divided-difference steps) below this are taken as exactly 0: the divergence
# moves by ~1e-30 relative there, while dividing by such (possibly subnormal) numbers would not be exact.
_SNAP = 1e-30
# Series used where |lambda_max * delta| < _SERIES_RADIUS; 24 terms reach float64 round-off there.
_SERIES_RADIUS = 1.0
_SERIES_TERMS = 24


def check_finite_number(name: str, value) -> float:
    """Return ``value`` as a float, or raise a ValueError naming ``name`` if it is not a finite real."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}; pass a finite float such as 0.5")
    return value


def check_log_probs(teacher_log_probs: Tensor, student_log_probs: Tensor) -> tuple[Tensor, Tensor]:
    """Validate a pair of log-probability tensors and promote half/bfloat16 to float32.

    Raises ValueError for non-tensors, non-floating dtypes, mismatched shapes and 0-dim inputs.
    """
    for name, t in (("teacher_log_probs", teacher_log_probs), ("student_log_probs", student_log_probs)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(
                f"{name} must be a floating-point tensor of log-probabilities, got dtype {t.dtype}; "
                "convert logits with torch.log_softmax(x.float(), dim=-1)"
            )
        if t.dim() == 0:
            raise ValueError(f"{name} must have a class dimension, got a 0-dim tensor")
    if teacher_log_probs.shape != student_log_probs.shape:
        raise ValueError(
            "teacher_log_probs and student_log_probs must have the same shape, got "
            f"{tuple(teacher_log_probs.shape)} and {tuple(student_log_probs.shape)}"
        )
    # Powers of tiny probabilities underflow in 16-bit formats: compute in at least float32.
    dtype = torch.promote_types(torch.promote_types(teacher_log_probs.dtype, student_log_probs.dtype),
                                torch.float32)
    return teacher_log_probs.to(dtype), student_log_probs.to(dtype)


def _unmask(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Replace classes that are -inf in both inputs by 0 (then p = q there, a zero contribution).

    Done with ``where`` on the inputs, so no NaN reaches autograd.
    """
    masked = torch.isneginf(a) & torch.isneginf(b)
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    return torch.where(masked, zero, a), torch.where(masked, zero, b)


def _diff_exp(x: Tensor, y: Tensor, lam: float, t: Tensor) -> Tensor:
    """(e^x - e^y) / lam where x = y + lam * t, evaluated without overflow or cancellation.

    At lam = 0 this is the limit e^y * t. The branch with the larger exponent is factored out;
    both branches are clamped so that the one ``where`` discards stays finite (keeps grads clean).
    """
    if abs(lam) < _SNAP:
        return torch.exp(y) * t
    u = lam * t  # = x - y
    below = torch.exp(y) * torch.expm1(u.clamp(max=0.0))  # u <= 0: factor out e^y
    above = -torch.exp(x) * torch.expm1(-u.clamp(min=0.0))  # u > 0: factor out e^x
    return torch.where(u <= 0, below, above) / lam


def _complete_homogeneous(x: float, y: float, degree: int) -> float:
    """h_k(x, y) = sum_{i=0..k} x^i y^(k-i)."""
    return sum(x**i * y ** (degree - i) for i in range(degree + 1))


def _corner_series(m: Tensor, delta: Tensor, alpha: float, beta: float, scale: float) -> Tensor:
    """e^m * sum_{n>=2} delta^n / n! * h_{n-2}(beta, -alpha), for |scale * delta| < 1.

    Horner's rule runs in x = scale * delta (scale = max(|alpha|, |beta|, |alpha+beta|)), whose
    coefficients h_{n-2}(beta/scale, -alpha/scale) / n! are O(n / n!): a Horner in delta itself
    would multiply the backward pass by |delta| per term and overflow for large log-ratios.
    """
    b, a = beta / scale, -alpha / scale
    coeffs = [_complete_homogeneous(b, a, n - 2) / math.factorial(n) for n in range(2, _SERIES_TERMS + 2)]
    x = scale * delta
    acc = torch.full_like(delta, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        acc = acc * x + c
    return torch.exp(m) * acc * delta * delta


def _three_term(a: Tensor, b: Tensor, alpha: float, beta: float) -> Tensor:
    """(sum e^A - sum e^m) / (beta s) + (sum e^B - sum e^m) / (alpha s), for s > 0 away from the boundaries.

    Reducing each exponential before combining keeps it to three exps and three sums (the cheapest form
    measured; see benchmarks/). m is formed as B + alpha * (a - b) so that p = q gives exactly 0.
    """
    s = alpha + beta
    big_b = s * b
    sum_a = torch.exp(s * a).sum(dim=-1)
    sum_b = torch.exp(big_b).sum(dim=-1)
    sum_m = torch.exp(torch.add(big_b, a - b, alpha=alpha)).sum(dim=-1)
    return (sum_a - sum_m) / (beta * s) + (sum_b - sum_m) / (alpha * s)


def alpha_beta_divergence(teacher_log_probs: Tensor, student_log_probs: Tensor,
                          alpha: float, beta: float) -> Tensor:
    """Alpha-beta divergence D_AB(p||q) per row, exact on the whole (alpha, beta) plane.

    Args:
        teacher_log_probs: log p, shape [..., C] (e.g. ``log_softmax(z_t / T)``).
        student_log_probs: log q, same shape.
        alpha, beta: any finite reals. (1, 0) is KL(p||q), (0, 1) is KL(q||p).

    Returns:
        Tensor of shape [...]: sum over the last dim. float32 for 16-bit inputs.

    Classes that are -inf in both inputs (masked) contribute 0. Where only one side has zero
    probability the value is the mathematical limit, which is +inf when the exponent on the zero
    side is not positive (e.g. beta <= 0 with q = 0): that is a property of the divergence.
    """
    alpha = check_finite_number("alpha", alpha)
    beta = check_finite_number("beta", beta)
    alpha = 0.0 if abs(alpha) < _SNAP else alpha
    beta = 0.0 if abs(beta) < _SNAP else beta
    a, b = check_log_probs(teacher_log_probs, student_log_probs)
    s = alpha + beta
    if s > 0 and min(abs(alpha), abs(beta), s) >= _DIRECT:
        # Classes masked with -inf on both sides would give NaN through a - b. Clamping them to -1e30 makes
        # every term e^-huge = 0 (exactly their limit) and leaves real log-probabilities untouched; doing it
        # unconditionally keeps the step free of host-device synchronisation (no data-dependent branch), which
        # also lets torch.compile trace it whole. A genuinely infinite divergence (+inf) is returned as is.
        return _three_term(a.clamp(min=_NEG_LARGE), b.clamp(min=_NEG_LARGE), alpha, beta)

    a, b = _unmask(a, b)  # both-masked classes become a = b = 0: every form below then gives exactly 0
    delta = a - b
    m = alpha * a + beta * b
    largest = max(abs(s), abs(beta), abs(alpha))

    if largest < _SNAP:  # alpha = beta = 0: 1/2 (log p - log q)^2
        per_class = 0.5 * delta * delta
    else:
        if abs(s) == largest:
            p_beta = _diff_exp(s * a, m, beta, delta)
            p_alpha = _diff_exp(s * b, m, alpha, -delta)
            per_class = (p_beta + p_alpha) / s
        elif abs(beta) == largest:
            p_s = _diff_exp(s * a, s * b, s, delta)
            p_alpha = _diff_exp(s * b, m, alpha, -delta)
            per_class = (p_s + p_alpha) / beta
        else:
            p_beta = _diff_exp(s * a, m, beta, delta)
            p_s = _diff_exp(s * a, s * b, s, delta)
            per_class = (p_beta - p_s) / alpha
        if largest < _CORNER:
            inside = (largest * delta).abs() < _SERIES_RADIUS
            # Zero the series' inputs where it is not used, so its discarded values stay finite.
            zero = torch.zeros_like(delta)
            m_in, delta_in = torch.where(inside, m, zero), torch.where(inside, delta, zero)
            series = _corner_series(m_in, delta_in, alpha, beta, largest)
            per_class = torch.where(inside, series, per_class)

    return per_class.sum(dim=-1)


def forward_kl(teacher_log_probs: Tensor, student_log_probs: Tensor) -> Tensor:
    """KL(p||q) = sum_k p_k (log p_k - log q_k) per row, shape [...]. Equals D_AB at (1, 0)."""
    a, b = check_log_probs(teacher_log_probs, student_log_probs)
    # p = 0 classes (a = -inf) would give 0 * inf = NaN in p (log p - log q); the masked form gives them exactly
    # 0 without a data-dependent branch (no host-device synchronisation).
    return _forward_kl_masked(a, b)


def _forward_kl_masked(a: Tensor, b: Tensor) -> Tensor:
    """forward_kl where some p_k = 0: such a class contributes 0 even where q_k = 0 too. The inputs are
    cleaned first so that the discarded branch of ``where`` holds no NaN (it would leak into the gradient)."""
    empty = torch.isneginf(a)
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    a_safe, b_safe = torch.where(empty, zero, a), torch.where(empty, zero, b)
    return torch.where(empty, zero, torch.exp(a_safe) * (a_safe - b_safe)).sum(dim=-1)


def reverse_kl(teacher_log_probs: Tensor, student_log_probs: Tensor) -> Tensor:
    """KL(q||p) per row, shape [...]. Equals D_AB at (0, 1)."""
    return forward_kl(student_log_probs, teacher_log_probs)


def weighted_kl(teacher_log_probs: Tensor, student_log_probs: Tensor,
                fkl_weight: float = 0.5, rkl_weight: float = 0.5) -> Tensor:
    """fkl_weight * KL(p||q) + rkl_weight * KL(q||p) per row (the WSD objective)."""
    return (fkl_weight * forward_kl(teacher_log_probs, student_log_probs)
            + rkl_weight * reverse_kl(teacher_log_probs, student_log_probs))


def jensen_shannon(teacher_log_probs: Tensor, student_log_probs: Tensor) -> Tensor:
    """JSD(p, q) = 1/2 KL(p||M) + 1/2 KL(q||M), M = (p + q) / 2, per row (nats, at most log 2)."""
    a, b = check_log_probs(teacher_log_probs, student_log_probs)
    a, b = _unmask(a, b)
    log_m = torch.logaddexp(a, b) - math.log(2.0)
    return 0.5 * forward_kl(a, log_m) + 0.5 * forward_kl(b, log_m)
