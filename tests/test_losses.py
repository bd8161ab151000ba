"""The loss core: closed forms, boundaries, gradients, properties, stability and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from abkd_vision.losses import (
    DIVERGENCES,
    AlphaBetaDivergence,
    AlphaDivergence,
    BetaDivergence,
    Divergence,
    alpha_beta_divergence,
    build_divergence,
    forward_kl,
    jensen_shannon,
    reverse_kl,
)

D = alpha_beta_divergence


def _pair(batch=8, classes=10, scale=3.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    zt = torch.randn(batch, classes, generator=g, dtype=dtype) * scale
    zs = torch.randn(batch, classes, generator=g, dtype=dtype) * scale
    return zt.log_softmax(-1), zs.log_softmax(-1)


def naive_ab(a, b, alpha, beta):
    """Eq. 8 of the paper, written directly in probability space (reference for float64 tests)."""
    p, q = a.exp(), b.exp()
    s = alpha + beta
    if alpha == 0 and beta == 0:
        return (0.5 * (a - b) ** 2).sum(-1)
    if beta == 0:
        return (p**alpha * (alpha * a - alpha * b) - p**alpha + q**alpha).sum(-1) / alpha**2
    if alpha == 0:
        return (q**beta * (beta * b - beta * a) - q**beta + p**beta).sum(-1) / beta**2
    if s == 0:
        return ((alpha * b - alpha * a) + (q**alpha / p**alpha) ** -1 - 1).sum(-1) / alpha**2
    return (-(p**alpha * q**beta - alpha / s * p**s - beta / s * q**s) / (alpha * beta)).sum(-1)


GENERAL = [(0.5, 0.5), (0.8, 0.3), (1.2, -0.2), (-0.5, 1.0), (2.0, -1.5), (0.3, -0.9), (1.5, 1.5), (-1.0, -0.4)]
BOUNDARY = [(1.0, 0.0), (0.5, 0.0), (-0.7, 0.0), (0.0, 1.0), (0.0, 0.7), (0.0, -0.3), (1.2, -1.2), (-0.4, 0.4),
            (0.0, 0.0)]


@pytest.mark.parametrize("alpha,beta", GENERAL + BOUNDARY)
def test_matches_eq8_in_float64(alpha, beta):
    a, b = _pair()
    torch.testing.assert_close(D(a, b, alpha, beta), naive_ab(a, b, alpha, beta), rtol=1e-10, atol=1e-12)


def test_named_special_cases():
    a, b = _pair()
    p, q = a.exp(), b.exp()
    kl = torch.nn.functional.kl_div(b, a, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(D(a, b, 1.0, 0.0), kl)
    torch.testing.assert_close(forward_kl(a, b), kl)
    torch.testing.assert_close(D(a, b, 0.0, 1.0), (q * (b - a)).sum(-1))
    torch.testing.assert_close(reverse_kl(a, b), (q * (b - a)).sum(-1))
    torch.testing.assert_close(D(a, b, 0.5, 0.5), 2 * ((p.sqrt() - q.sqrt()) ** 2).sum(-1))
    torch.testing.assert_close(D(a, b, 1.0, 1.0), 0.5 * ((p - q) ** 2).sum(-1))
    torch.testing.assert_close(build_divergence("hellinger")(a, b), 2 * ((p.sqrt() - q.sqrt()) ** 2).sum(-1))
    torch.testing.assert_close(build_divergence("sed")(a, b), 0.5 * ((p - q) ** 2).sum(-1))
    # alpha-divergence (Amari): 1/(alpha(1-alpha)) * sum(alpha p + (1-alpha) q - p^alpha q^(1-alpha))
    al = 0.3
    amari = ((al * p + (1 - al) * q - p**al * q ** (1 - al)) / (al * (1 - al))).sum(-1)
    torch.testing.assert_close(build_divergence("alpha", alpha=al)(a, b), amari)
    # beta-divergence: 1/(beta(1+beta)) sum(p^(1+beta) + beta q^(1+beta) - (1+beta) p q^beta)
    be = 0.6
    beta_div = ((p ** (1 + be) + be * q ** (1 + be) - (1 + be) * p * q**be) / (be * (1 + be))).sum(-1)
    torch.testing.assert_close(build_divergence("beta", beta=be)(a, b), beta_div)
    m = 0.5 * (p + q)
    jsd = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    torch.testing.assert_close(jensen_shannon(a, b), jsd)
    torch.testing.assert_close(build_divergence("wsd", fkl_weight=0.3, rkl_weight=0.7)(a, b),
                               0.3 * kl + 0.7 * (q * (b - a)).sum(-1))


def test_build_divergence_names_and_modules():
    a, b = _pair()
    assert set(DIVERGENCES) == {"fkl", "rkl", "ab", "alpha", "beta", "hellinger", "sed", "wsd", "jsd"}
    for name in DIVERGENCES:
        div = build_divergence(name)
        assert isinstance(div, Divergence)
        assert div(a, b).shape == (8,)
    torch.testing.assert_close(build_divergence("ab", alpha=1.0, beta=0.0)(a, b), build_divergence("fkl")(a, b))
    assert isinstance(AlphaDivergence(0.2), AlphaBetaDivergence) and AlphaDivergence(0.2).beta == pytest.approx(0.8)
    assert BetaDivergence(0.4).alpha == 1.0


@pytest.mark.parametrize("alpha,beta", [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (0.5, 0.0), (1.2, -1.2), (0.8, 0.3),
                                        (-0.3, 0.9), (0.02, 0.01), (1e-7, -2e-7)])
def test_gradcheck_float64(alpha, beta):
    zt, zs = (torch.randn(3, 5, dtype=torch.float64) for _ in range(2))
    zt.requires_grad_()
    zs.requires_grad_()

    def fn(t, s):
        return D(t.log_softmax(-1), s.log_softmax(-1), alpha, beta)

    assert torch.autograd.gradcheck(fn, (zt, zs))


EPS = [1e-6, -1e-6, 1e-9]


# rtol: over 1e-6 in (alpha, beta) the divergence itself moves by up to ~1e-5 relative at these logits.
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 2e-5), (torch.float32, 2e-5)])
@pytest.mark.parametrize("boundary,offset", [
    ((0.5, 0.0), (0.0, 1.0)),   # beta -> 0
    ((1.0, 0.0), (0.0, 1.0)),   # beta -> 0 at forward KL
    ((0.0, 0.7), (1.0, 0.0)),   # alpha -> 0
    ((0.0, 1.0), (1.0, 0.0)),   # alpha -> 0 at reverse KL
    ((1.2, -1.2), (0.0, 1.0)),  # alpha + beta -> 0
    ((-0.5, 0.5), (1.0, 0.0)),  # alpha + beta -> 0
    ((0.0, 0.0), (1.0, 1.0)),   # the corner, along the diagonal
    ((0.0, 0.0), (1.0, -1.0)),  # the corner, along alpha + beta = 0
    ((0.0, 0.0), (0.3, 1.0)),   # the corner, oblique
])
def test_continuity_across_boundaries(dtype, rtol, boundary, offset):
    a64, b64 = _pair(batch=16, classes=100, scale=1.0, seed=1)
    exact = D(a64, b64, *boundary)
    a, b = a64.to(dtype), b64.to(dtype)
    for eps in EPS:
        alpha, beta = boundary[0] + eps * offset[0], boundary[1] + eps * offset[1]
        near = D(a, b, alpha, beta).double()
        torch.testing.assert_close(near, exact, rtol=rtol, atol=0.0)
        # and no precision is lost next to the boundary: float32 agrees with float64 at that point
        torch.testing.assert_close(near, D(a64, b64, alpha, beta), rtol=2e-6, atol=0.0)


def test_naive_float32_breaks_next_to_boundary_where_ours_does_not():
    """The reason for the divided-difference form: eq. 8 in float32 cancels catastrophically."""
    a64, b64 = _pair(batch=16, classes=100, seed=2)
    exact = D(a64, b64, 0.5, 0.0)
    naive = naive_ab(a64.float(), b64.float(), 0.5, 1e-6).double()
    ours = D(a64.float(), b64.float(), 0.5, 1e-6).double()
    assert ((naive - exact) / exact).abs().max() > 1e-3
    assert ((ours - exact) / exact).abs().max() < 1e-5


alphas_betas = st.floats(-1.5, 2.0, allow_nan=False, allow_infinity=False)


@settings(max_examples=150, deadline=None)
@given(alpha=alphas_betas, beta=alphas_betas, seed=st.integers(0, 2**16), scale=st.floats(0.1, 5.0))
def test_nonnegative_and_zero_iff_equal(alpha, beta, seed, scale):
    a, b = _pair(batch=4, classes=7, scale=scale, seed=seed)
    d = D(a, b, alpha, beta)
    assert torch.isfinite(d).all()
    assert (d >= -1e-12).all()
    assert torch.equal(D(a, a, alpha, beta), torch.zeros(4, dtype=torch.float64))
    # p != q gives a strictly positive value
    assert (d > 0).all()


@pytest.mark.parametrize("alpha,beta", [(0.5, 0.5), (1.0, 0.0), (0.0, 1.0), (0.8, 0.3), (0.0, 0.0), (2.0, 1.0),
                                        (1e-3, 1e-3), (1.0, 1.0), (0.3, 0.0)])
def test_extreme_logits_stay_finite(alpha, beta):
    g = torch.Generator().manual_seed(3)
    zt = (torch.randn(6, 50, generator=g) * 1e4).requires_grad_()
    zs = (torch.randn(6, 50, generator=g) * 1e4).requires_grad_()
    d = D(zt.log_softmax(-1), zs.log_softmax(-1), alpha, beta)
    assert torch.isfinite(d).all() and (d >= 0).all()
    d.sum().backward()
    assert torch.isfinite(zt.grad).all() and torch.isfinite(zs.grad).all()
    # the value matches float64 evaluation of the same log-probs
    ref = D(zt.double().log_softmax(-1), zs.double().log_softmax(-1), alpha, beta)
    torch.testing.assert_close(d.double(), ref, rtol=1e-4, atol=1e-4)


def test_underflowing_probabilities_give_the_limit():
    # class 1 has p = exp(-2000): it underflows, yet the AB terms have finite limits
    a = torch.tensor([[0.0, -2000.0]], dtype=torch.float64)
    b = torch.tensor([[-1e-3, math.log1p(-math.exp(-1e-3))]], dtype=torch.float64)
    for alpha, beta in [(0.5, 0.5), (1.0, 0.0), (0.8, 0.3)]:
        d = D(a, b, alpha, beta)
        s = alpha + beta
        p, q = a.exp(), b.exp()
        # p_1 = 0 exactly in float64: eq. 8 with p_1 = 0 (term -1/(ab) * (-b/s q^s) = q^s/(a s))
        expected = naive_ab(a[:, :1], b[:, :1], alpha, beta) + q[:, 1] ** s / (alpha * s)
        assert p[0, 1] == 0
        torch.testing.assert_close(d, expected)


@pytest.mark.parametrize("alpha,beta", [(0.5, 0.5), (1.0, 0.0), (0.0, 1.0), (0.0, 0.0), (1.2, -1.2), (0.01, 0.02)])
@pytest.mark.parametrize("name", ["ab", "jsd", "wsd"])
def test_masked_classes_contribute_zero(alpha, beta, name):
    g = torch.Generator().manual_seed(4)
    zt, zs = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    zt[:, [2, 5]] = float("-inf")
    zs[:, [2, 5]] = float("-inf")
    zs.requires_grad_()
    keep = [0, 1, 3, 4, 6, 7]
    div = build_divergence(name, alpha=alpha, beta=beta) if name == "ab" else build_divergence(name)
    d = div(zt.log_softmax(-1), zs.log_softmax(-1))
    ref = div(zt[:, keep].log_softmax(-1), zs[:, keep].log_softmax(-1))
    torch.testing.assert_close(d, ref)
    d.sum().backward()
    assert torch.isfinite(zs.grad).all()
    assert (zs.grad[:, [2, 5]] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_float32(dtype):
    a64, b64 = _pair(batch=4, classes=100, scale=8.0, seed=5)
    a, b = a64.to(dtype), b64.to(dtype)
    for alpha, beta in [(0.5, 0.5), (1.0, 0.0), (1.2, -0.2)]:
        d = D(a, b, alpha, beta)
        assert d.dtype == torch.float32
        ref = D(a.double(), b.double(), alpha, beta)  # the same rounded inputs in float64
        torch.testing.assert_close(d.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), "0.5", None])
@pytest.mark.parametrize("arg", ["alpha", "beta"])
def test_bad_alpha_beta(bad, arg):
    a, b = _pair()
    kwargs = {"alpha": 0.5, "beta": 0.5, arg: bad}
    with pytest.raises(ValueError, match=arg):
        D(a, b, **kwargs)
    with pytest.raises(ValueError, match=arg):
        AlphaBetaDivergence(**kwargs)


def test_bad_tensors():
    a, b = _pair()
    with pytest.raises(ValueError, match="int64"):
        D(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), 0.5, 0.5)
    with pytest.raises(ValueError, match=r"\(8, 10\) and \(8, 9\)"):
        D(a, b[:, :9], 0.5, 0.5)
    with pytest.raises(ValueError, match="unknown divergence 'kl'.*fkl"):
        build_divergence("kl")
    with pytest.raises(ValueError, match="bad parameters"):
        build_divergence("fkl", alpha=1.0)
