"""DIST, NKD, MLKD and the two transforms (logit standardisation, CTKD's learned temperature): the published
formulas re-derived here, AB reductions, composition, gradients, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from abkd_vision.heads import DIST, DKD, HEADS, KD, LSD, MLKD, NKD, TTM, CurriculumTemperature, build_head
from abkd_vision.heads.temperature import curriculum_lambda, reverse_gradient
from abkd_vision.losses import AlphaBetaDivergence, ReverseKL


def _batch(batch=12, classes=10, seed=0, dtype=torch.float64, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(batch, classes, generator=g, dtype=dtype) * scale
    zt = torch.randn(batch, classes, generator=g, dtype=dtype) * scale
    y = torch.randint(0, classes, (batch,), generator=g)
    return zs, zt, y


def zscore(x):
    return (x - x.mean(-1, keepdim=True)) / (1e-7 + x.std(-1, keepdim=True))


def kl_rows(p_logits, q_logits):
    """KL(softmax(p) || softmax(q)) per row."""
    return F.kl_div(q_logits.log_softmax(-1), p_logits.log_softmax(-1), log_target=True, reduction="none").sum(-1)


# -- DIST ------------------------------------------------------------------------------------------------------------
def test_dist_is_one_minus_pearson_correlations():
    zs, zt, y = _batch()
    T, b, g = 4.0, 2.0, 0.5
    ys, yt = (zs / T).softmax(-1), (zt / T).softmax(-1)
    inter = 1 - torch.stack([torch.corrcoef(torch.stack([ys[i], yt[i]]))[0, 1] for i in range(len(ys))]).mean()
    intra = 1 - torch.stack([torch.corrcoef(torch.stack([ys[:, c], yt[:, c]]))[0, 1]
                             for c in range(ys.shape[1])]).mean()
    torch.testing.assert_close(DIST(T, b, g)(zs, zt, y), T * T * (b * inter + g * intra))
    # the same logits: both correlations are 1 (up to the eps the reference adds to the norms' product)
    torch.testing.assert_close(DIST(T)(zt, zt), torch.zeros((), dtype=torch.float64), atol=1e-4, rtol=0)


def test_dist_has_no_ab_variant():
    with pytest.raises(ValueError, match="no KL for a divergence to replace.*no AB variant"):
        DIST(divergence=AlphaBetaDivergence(0.8, 0.3))
    assert DIST().divergence is None


# -- NKD -------------------------------------------------------------------------------------------------------------
def nkd_reference(zs, zt, y, T, gamma):
    """The published NKD loss: -p_y log q_y plus gamma T^2 times the cross-entropy of the renormalised
    non-target distributions at T."""
    n, c = zs.shape
    log_q = zs.log_softmax(-1)
    p = zt.softmax(-1)
    loss_t = -(p.gather(1, y[:, None]) * log_q.gather(1, y[:, None])).mean()
    keep = torch.ones_like(zs, dtype=torch.bool).scatter_(1, y[:, None], False)
    s_non = (zs[keep].view(n, c - 1) / T).log_softmax(-1)
    t_non = (zt[keep].view(n, c - 1) / T).softmax(-1)
    cross_entropy = -(t_non * s_non).sum(-1).mean()
    entropy = -(t_non * t_non.log()).sum(-1).mean()
    return loss_t + gamma * T * T * cross_entropy, gamma * T * T * entropy


def test_nkd_is_the_published_loss_without_the_teacher_entropy():
    zs, zt, y = _batch()
    zs.requires_grad_(True)
    reference, entropy = nkd_reference(zs, zt, y, 3.0, 3.5)
    ours = NKD(temperature=3.0, gamma=3.5)(zs, zt, y)
    torch.testing.assert_close(ours, reference - entropy)
    g_ours, = torch.autograd.grad(ours, zs)
    g_ref, = torch.autograd.grad(reference, zs)
    torch.testing.assert_close(g_ours, g_ref)


def test_nkd_non_target_part_is_zero_when_the_student_matches():
    zs, zt, y = _batch()
    only_target = -(zt.softmax(-1).gather(1, y[:, None]) * zt.log_softmax(-1).gather(1, y[:, None])).mean()
    torch.testing.assert_close(NKD(temperature=2.0)(zt, zt, y), only_target)
    with pytest.raises(ValueError, match="NKD needs the ground-truth target"):
        NKD()(zs, zt, None)


# -- MLKD ------------------------------------------------------------------------------------------------------------
def mlkd_reference(sw, tw, ss, ts, temperatures):
    """MLKD as released (mdistiller-style terms, numpy percentile masks applied to batch means), with every
    strong-view term on the strong view."""
    conf = tw.softmax(-1).max(-1).values.detach().numpy()
    share = float((conf <= np.percentile(conf, 50)).mean())
    class_conf = tw.softmax(-1).sum(0).detach().numpy()
    class_share = float((class_conf <= np.percentile(class_conf, 50)).mean())
    total = 0
    for T in temperatures:
        kd_w = kl_rows(tw / T, sw / T).mean() * T * T
        kd_s = kl_rows(ts / T, ss / T).mean() * T * T
        ps, pt = (sw / T).softmax(-1), (tw / T).softmax(-1)
        cc = ((pt.t() @ pt - ps.t() @ ps) ** 2).sum() / sw.shape[1]
        bc = ((pt @ pt.t() - ps @ ps.t()) ** 2).sum() / sw.shape[0]
        total = total + share * kd_w + kd_s + class_share * cc + share * bc
    return total


def _two_views(seed=0):
    sw, tw, y = _batch(seed=seed)
    ss, ts, _ = _batch(seed=seed + 1)
    return sw, tw, ss, ts, y


def test_mlkd_matches_the_released_formula():
    sw, tw, ss, ts, y = _two_views()
    head = MLKD(temperature=4.0, extra_temperatures=[3.0, 5.0, 2.0, 6.0])
    out = head(sw, tw, y, student_strong=ss, teacher_strong=ts)
    torch.testing.assert_close(out, mlkd_reference(sw, tw, ss, ts, [4.0, 3.0, 5.0, 2.0, 6.0]))
    # the same logits on both views: every term is 0
    zero = head(tw, tw, y, student_strong=ts, teacher_strong=ts)
    torch.testing.assert_close(zero, torch.zeros((), dtype=torch.float64), atol=1e-9, rtol=0)


def test_mlkd_median_masks_keep_about_half():
    from abkd_vision.heads.mlkd import fraction_at_or_below_median

    values = torch.tensor([0.1, 0.5, 0.3, 0.9])
    assert fraction_at_or_below_median(values).item() == 0.5  # median 0.4: two of four
    assert fraction_at_or_below_median(torch.tensor([1.0, 1.0, 1.0])).item() == 1.0  # ties are kept


def test_mlkd_needs_the_strong_view():
    sw, tw, y = _batch()
    with pytest.raises(ValueError, match=r"two views.*data\.init_args\.strong_view: true"):
        MLKD()(sw, tw, y)
    assert MLKD.views == 2 and KD.views == 1
    with pytest.raises(ValueError, match="extra_temperatures"):
        MLKD(extra_temperatures=[2.0, -1.0])


def test_mlkd_standardize_touches_only_the_instance_terms():
    sw, tw, ss, ts, y = _two_views()
    temps = [2.0, 3.0]
    head = MLKD(temperature=2.0, extra_temperatures=[3.0], standardize=True)
    out = head(sw, tw, y, student_strong=ss, teacher_strong=ts)
    plain = MLKD(temperature=2.0, extra_temperatures=[3.0])
    # the correlation terms and masks from the raw logits, the KD terms from z-scored logits
    correlation_only = plain(sw, tw, y, student_strong=ts, teacher_strong=ts) - sum(
        kl_rows(tw / T, sw / T).mean() * T * T * _share(tw) for T in temps)
    kd = sum(_share(tw) * kl_rows(zscore(tw) / T, zscore(sw) / T).mean() * T * T
             + kl_rows(zscore(ts) / T, zscore(ss) / T).mean() * T * T for T in temps)
    torch.testing.assert_close(out, correlation_only + kd)


def _share(tw):
    conf = tw.softmax(-1).max(-1).values
    return (conf <= torch.quantile(conf, 0.5)).double().mean()


# -- AB variants and gradients ----------------------------------------------------------------------------------------
def _call(head, zs, zt, y):
    if head.views == 2:
        return head(zs, zt, y, student_strong=zs.flip(0), teacher_strong=zt.flip(0))
    return head(zs, zt, y)


@pytest.mark.parametrize("head_cls", [NKD, MLKD])
def test_ab_variants_reduce_to_forward_and_reverse_kl(head_cls):
    zs, zt, y = _batch()
    torch.testing.assert_close(_call(head_cls(divergence=AlphaBetaDivergence(1.0, 0.0)), zs, zt, y),
                               _call(head_cls(), zs, zt, y))
    torch.testing.assert_close(_call(head_cls(divergence=AlphaBetaDivergence(0.0, 1.0)), zs, zt, y),
                               _call(head_cls(divergence=ReverseKL()), zs, zt, y))


GRADCHECK_HEADS = {
    "dist": lambda: DIST(temperature=2.0),
    "nkd": lambda: NKD(temperature=2.0, divergence=AlphaBetaDivergence(0.8, 0.3)),
    "mlkd": lambda: MLKD(temperature=2.0, extra_temperatures=[3.0], divergence=AlphaBetaDivergence(0.8, 0.3)),
    "dkd_ls": lambda: DKD(standardize=True),
    "ttm_ls": lambda: TTM(standardize=True),
    "ctkd": lambda: KD(learned_temperature=CurriculumTemperature()),
}  # (the instance temperature reads detached logits on purpose, so it is left out: its MLP is tested below)


@pytest.mark.parametrize("name", list(GRADCHECK_HEADS))
def test_gradcheck_float64(name):
    torch.manual_seed(0)
    head = GRADCHECK_HEADS[name]().double()
    zs, zt, y = _batch(batch=4, classes=5, scale=1.0)
    zs.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: _call(head, s, zt, y), (zs,))


# -- logit standardisation on any head ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["kd", "dkd", "ttm", "dist", "nkd"])
def test_standardised_head_equals_the_head_on_standardised_logits(name):
    zs, zt, y = _batch()
    head, plain = build_head(name, standardize=True), build_head(name)
    torch.testing.assert_close(head(zs, zt, y), plain(zscore(zs), zscore(zt), y))


def test_lsd_is_kd_with_standardisation_bit_for_bit():
    zs, zt, y = _batch(dtype=torch.float32)
    for T in (2.0, 3.0):
        assert torch.equal(LSD(T)(zs, zt, y), KD(T, standardize=True)(zs, zt, y))
    with pytest.raises(ValueError, match="standardize must be true or false"):
        KD(standardize="yes")


# -- CTKD: learned temperature, gradient reversal, curriculum --------------------------------------------------------
def test_curriculum_follows_the_released_cosine_schedule():
    # released: value = (cos(i pi / E) + 1) / 2 * (max - min) + min with max 0, min -1, i the 1-based epoch;
    # the gradient is multiplied by that value, i.e. reversed with strength -value
    for epoch in range(15):
        i = min(epoch + 1, 10)
        released = (math.cos(i * math.pi / 10) + 1) * 0.5 * (0 - (-1)) + (-1)
        assert curriculum_lambda(epoch, 0.0, 1.0, 10) == pytest.approx(-released)
    assert curriculum_lambda(0, 0.0, 1.0, 10) == pytest.approx(0.0245, abs=1e-4)
    assert curriculum_lambda(9, 0.0, 1.0, 10) == 1.0


def test_learned_temperature_receives_the_reversed_gradient():
    zs, zt, y = _batch(dtype=torch.float32)
    zs.requires_grad_(True)
    temperature = CurriculumTemperature()
    temperature.set_epoch(3)
    lam = curriculum_lambda(3, 0.0, 1.0, 10)
    head = KD(learned_temperature=temperature)
    loss = head(zs, zt, y)
    loss.backward()
    # the same loss as a function of the raw parameter, without the reversal
    raw = torch.tensor(1.0, requires_grad=True)
    T = 1.0 + 20.0 * torch.sigmoid(raw)
    plain = KD(temperature=T.item())(zs.detach(), zt, y)
    torch.testing.assert_close(loss.detach(), plain)
    direct = (kl_rows(zt / T, zs.detach() / T).mean() * T * T)
    g_raw, = torch.autograd.grad(direct, raw)
    torch.testing.assert_close(temperature.raw.grad, -lam * g_raw, rtol=1e-4, atol=1e-6)
    # the student gets the ordinary gradient at that temperature
    zs2 = zs.detach().clone().requires_grad_(True)
    KD(temperature=T.item())(zs2, zt, y).backward()
    torch.testing.assert_close(zs.grad, zs2.grad)
    logged = head.log_values()
    torch.testing.assert_close(logged["temperature"], T.detach())
    assert logged["temperature_lambda"].item() == pytest.approx(lam)


def test_reverse_gradient_gradcheck_and_instance_temperatures():
    x = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: reverse_gradient(v, torch.tensor(-1.0, dtype=torch.float64)), (x,))
    module = CurriculumTemperature("instance", num_classes=10)
    zs, zt, _ = _batch(dtype=torch.float32)
    t = module(zs, zt)
    assert t.shape == (12, 1) and bool(((t > 1) & (t < 21)).all())
    assert sum(p.numel() for p in module.parameters()) == (20 * 256 + 256) + (256 + 1)
    assert "learned_temperature.mlp.0.weight" in KD(learned_temperature=module).state_dict()


def test_learned_temperature_bad_input():
    with pytest.raises(ValueError, match=r"TTM has no temperature for CurriculumTemperature.*gamma"):
        TTM(learned_temperature=CurriculumTemperature())
    with pytest.raises(ValueError, match="mode must be 'global' or 'instance'"):
        CurriculumTemperature("local")
    with pytest.raises(ValueError, match="needs num_classes"):
        CurriculumTemperature("instance")
    with pytest.raises(ValueError, match="t_min > 0"):
        CurriculumTemperature(t_min=0.0)
    with pytest.raises(ValueError, match="curriculum_epochs"):
        CurriculumTemperature(curriculum_epochs=0)
    with pytest.raises(ValueError, match="must be an abkd_vision.heads.CurriculumTemperature"):
        KD(learned_temperature=torch.nn.Linear(2, 1))


# -- common properties -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["dist", "nkd", "mlkd"])
def test_new_heads_give_float32_losses_from_half_logits(name):
    zs, zt, y = _batch(dtype=torch.float32, classes=20)
    head = build_head(name)
    ref = _call(head, zs, zt, y)
    for dtype in (torch.float16, torch.bfloat16):
        out = _call(head, zs.to(dtype), zt.to(dtype), y)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, ref, rtol=5e-2, atol=5e-2)


def test_registry_and_label_use():
    assert set(HEADS) == {"kd", "dkd", "lsd", "ttm", "dist", "nkd", "mlkd"}
    assert {n for n, cls in HEADS.items() if cls.uses_labels} == {"dkd", "nkd"}
    for bad in (0.0, -2.0, float("nan")):
        for cls in (DIST, NKD, MLKD):
            with pytest.raises(ValueError, match="temperature"):
                cls(temperature=bad)
    with pytest.raises(ValueError, match="gamma"):
        NKD(gamma=-1.0)
    with pytest.raises(ValueError, match="inter_weight"):
        DIST(inter_weight=-1.0)
