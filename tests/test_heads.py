"""KD heads: reference formulas, AB variants at (1, 0), scaling, edge cases, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from abkd_vision.heads import DKD, HEADS, KD, LSD, TTM, build_head, standardize_logits
from abkd_vision.losses import AlphaBetaDivergence, ReverseKL, build_divergence


def _batch(batch=16, classes=100, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(batch, classes, generator=g, dtype=dtype) * 3
    zt = torch.randn(batch, classes, generator=g, dtype=dtype) * 3
    y = torch.randint(0, classes, (batch,), generator=g)
    return zs, zt, y


def kl_batchmean(p_logits, q_logits):
    return F.kl_div(q_logits.log_softmax(-1), p_logits.log_softmax(-1), log_target=True, reduction="batchmean")


def test_kd_matches_hinton():
    zs, zt, y = _batch()
    T = 4.0
    expected = kl_batchmean(zt / T, zs / T) * T * T
    torch.testing.assert_close(KD(T)(zs, zt, y), expected)


def test_dkd_matches_the_mask_formulation():
    """Reference DKD: TCKD on binary masses, NCKD via the -1000 target shift (mdistiller's trick)."""
    zs, zt, y = _batch()
    T, a, b = 4.0, 1.0, 8.0
    onehot = F.one_hot(y, zs.shape[1]).bool()
    ps, pt = (zs / T).softmax(-1), (zt / T).softmax(-1)
    bs = torch.stack([ps[onehot], 1 - ps[onehot]], 1)
    bt = torch.stack([pt[onehot], 1 - pt[onehot]], 1)
    tckd = (bt * (bt.log() - bs.log())).sum(1).mean() * T * T
    nt = (zt / T - 1000.0 * onehot).log_softmax(-1)
    ns = (zs / T - 1000.0 * onehot).log_softmax(-1)
    nckd = F.kl_div(ns, nt, log_target=True, reduction="batchmean") * T * T
    torch.testing.assert_close(DKD(T, a, b)(zs, zt, y), a * tckd + b * nckd)


def test_lsd_matches_reference():
    zs, zt, y = _batch()
    T = 2.0

    def z(x):
        return (x - x.mean(-1, keepdim=True)) / (1e-7 + x.std(-1, keepdim=True))

    torch.testing.assert_close(LSD(T)(zs, zt, y), kl_batchmean(z(zt) / T, z(zs) / T) * T * T)
    torch.testing.assert_close(standardize_logits(zs).std(-1), torch.ones(16, dtype=torch.float64))


@pytest.mark.parametrize("weighted", [False, True])
def test_ttm_matches_reference(weighted):
    zs, zt, y = _batch()
    g = 0.1
    pt = zt.softmax(-1) ** g
    w = pt.sum(-1)
    p = pt / w[:, None]
    per = (p * (p.log() - zs.log_softmax(-1))).sum(-1)
    expected = (per * w).mean() if weighted else per.mean()
    torch.testing.assert_close(TTM(g, weighted=weighted)(zs, zt, y), expected)


def test_ttm_is_kd_plus_renyi_entropy_term():
    """The TTM paper's identity, with gamma = 1/T and p~ = softmax(gamma z_t), q = softmax(z_s):
    KL(p~||softmax(z_s/T)) = gamma KL(p~||q) + (1-gamma)[H_gamma(q) - H(p~)], H_gamma the Renyi entropy."""
    zs, zt, y = _batch()
    g = 0.25
    T = 1 / g
    kd = KD(T)(zs, zt, y) / (T * T)
    ttm = TTM(g)(zs, zt, y)
    q = zs.softmax(-1)
    p = (g * zt).softmax(-1)
    renyi = (q**g).sum(-1).log() / (1 - g)
    shannon = -(p * p.log()).sum(-1)
    torch.testing.assert_close(kd, g * ttm + (1 - g) * (renyi - shannon).mean())


@pytest.mark.parametrize("head_cls", [KD, DKD, LSD, TTM])
def test_ab_head_at_1_0_equals_plain_head(head_cls):
    zs, zt, y = _batch()
    plain = head_cls()(zs, zt, y)
    ab = head_cls(divergence=AlphaBetaDivergence(1.0, 0.0))(zs, zt, y)
    torch.testing.assert_close(ab, plain)
    # and the AB head is a different objective elsewhere
    assert not torch.isclose(head_cls(divergence=AlphaBetaDivergence(0.8, 0.3))(zs, zt, y), plain)


@pytest.mark.parametrize("head_cls", [KD, DKD, LSD, TTM])
def test_heads_take_any_divergence_and_backprop(head_cls):
    zs, zt, y = _batch(dtype=torch.float32)
    zs.requires_grad_()
    for name in ["fkl", "rkl", "jsd", "hellinger", "sed", "wsd"]:
        loss = head_cls(divergence=build_divergence(name))(zs, zt, y)
        assert loss.dim() == 0 and torch.isfinite(loss) and loss > 0
        (grad,) = torch.autograd.grad(loss, zs)
        assert torch.isfinite(grad).all()


def test_abkd_lambda_mapping():
    """Official ABKD: lambda = 32 on D_AB(sigma_4(z_t)||sigma_4(z_s)) without T^2 == kd_weight 2 here."""
    zs, zt, y = _batch()
    T, lam = 4.0, 32.0
    div = AlphaBetaDivergence(0.8, 0.3)
    official = lam * div((zt / T).log_softmax(-1), (zs / T).log_softmax(-1)).mean()
    torch.testing.assert_close(2.0 * KD(T, divergence=div)(zs, zt, y), official)


@pytest.mark.parametrize("div", [None, AlphaBetaDivergence(0.8, 0.3), ReverseKL()])
def test_dkd_two_classes_is_finite(div):
    zs, zt, y = _batch(classes=2, dtype=torch.float32)
    zs.requires_grad_()
    head = DKD(divergence=div)
    loss = head(zs, zt, y)
    assert torch.isfinite(loss)
    (grad,) = torch.autograd.grad(loss, zs)
    assert torch.isfinite(grad).all()
    # NCKD vanishes: only TCKD remains
    torch.testing.assert_close(loss, DKD(nckd_weight=0.0)(zs, zt, y))


def test_dkd_confident_teacher_is_finite():
    zs, zt, y = _batch(dtype=torch.float32)
    zt = zt.clone()
    zt[torch.arange(16), y] = 500.0  # p_target rounds to 1: log(1 - p) must not be -inf
    loss = DKD()(zs, zt, y)
    assert torch.isfinite(loss)


def test_half_precision_logits():
    zs, zt, y = _batch(dtype=torch.float32)
    for head in [KD(), DKD(), LSD(), TTM(), KD(divergence=AlphaBetaDivergence(1.2, -0.2))]:
        ref = head(zs, zt, y)
        for dtype in [torch.float16, torch.bfloat16]:
            out = head(zs.to(dtype), zt.to(dtype), y)
            assert out.dtype == torch.float32
            torch.testing.assert_close(out, ref, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature_and_gamma(bad):
    for cls in (KD, DKD, LSD):
        with pytest.raises(ValueError, match="temperature"):
            cls(temperature=bad)
    with pytest.raises(ValueError, match="gamma"):
        TTM(gamma=bad)


def test_bad_logits():
    zs, zt, y = _batch()
    with pytest.raises(ValueError, match=r"\(16, 100\) and \(16, 10\).*class-count mismatch"):
        KD()(zs, zt[:, :10], y)
    with pytest.raises(ValueError, match="floating-point"):
        KD()(zs.long(), zt.long(), y)
    with pytest.raises(ValueError, match="target"):
        DKD()(zs, zt, y.float())
    with pytest.raises(ValueError, match="target"):
        DKD()(zs, zt, None)
    with pytest.raises(ValueError, match="divergence must be a Divergence"):
        KD(divergence="ab")


def test_build_head():
    assert {"kd", "dkd", "lsd", "ttm"} <= set(HEADS)
    head = build_head("dkd", nckd_weight=6.0, divergence=build_divergence("ab", alpha=1.0, beta=0.2))
    assert isinstance(head, DKD) and head.nckd_weight == 6.0
    with pytest.raises(ValueError, match="unknown head 'abkd'.*'kd'"):
        build_head("abkd")
