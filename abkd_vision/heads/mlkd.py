"""Multi-level logit distillation (Jin et al., CVPR 2023); ABMLKD is this head with D_AB in its instance-level
terms."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from abkd_vision.heads.base import DistillationHead, tempered_mean, upcast
from abkd_vision.heads.kd import tempered_divergence
from abkd_vision.losses import Divergence


def class_correlation_gap(student_probs: Tensor, teacher_probs: Tensor) -> Tensor:
    """Class-level alignment: ||P_t^T P_t - P_s^T P_s||_F^2 / C for probabilities [B, C] (a [C, C] Gram gap)."""
    gap = teacher_probs.t() @ teacher_probs - student_probs.t() @ student_probs
    return gap.pow(2).sum() / student_probs.shape[1]


def batch_correlation_gap(student_probs: Tensor, teacher_probs: Tensor) -> Tensor:
    """Batch-level alignment: ||P_t P_t^T - P_s P_s^T||_F^2 / B for probabilities [B, C] (a [B, B] Gram gap)."""
    gap = teacher_probs @ teacher_probs.t() - student_probs @ student_probs.t()
    return gap.pow(2).sum() / student_probs.shape[0]


def fraction_at_or_below_median(values: Tensor) -> Tensor:
    """The share of ``values`` [N] at or below their median (linear-interpolation median, as numpy's percentile 50),
    a 0-dim tensor computed on the device."""
    return (values <= torch.quantile(values, 0.5)).to(values.dtype).mean()


class MLKD(DistillationHead):
    """Instance-, class- and batch-level logit alignment at several temperatures, on a weak and a strong view.

    For every temperature tau in ``[temperature, *extra_temperatures]`` (released: 4 and 3, 5, 2, 6), with
    P = softmax(z / tau) of the weak view (w) or the strong view (s)::

        KD_v(tau) = tau^2 * mean_i D(p_v,i || q_v,i)                     instance level (the injected divergence)
        CC(tau)   = ||P_t,w^T P_t,w - P_s,w^T P_s,w||_F^2 / C            class level, weak view
        BC(tau)   = ||P_t,w P_t,w^T - P_s,w P_s,w^T||_F^2 / B            batch level, weak view

        loss = sum_tau [ m * KD_w(tau) + KD_s(tau) + m_c * CC(tau) + m * BC(tau) ]

    m and m_c are the teacher-confidence masks as the released code applies them: the sample mask (teacher's top
    probability on the weak view at or below its batch median) and the class mask (the class's summed teacher
    probability at or below the median) multiply losses that are already batch means, so they act as the share of
    samples (classes) the mask keeps, about 1/2. The module adds CE on both views.

    One difference from the released code: its strong-view sum computes two of its five terms (tau = 2 and 6) on
    the weak view's logits; here every strong-view term uses the strong view, as the paper describes.

    Transforms: ``standardize`` (MLKD+LS) z-scores the logits of the instance-level terms only; the correlation
    terms and the masks keep the raw logits, as the logit-standardisation paper's MLKD code does. A learned
    temperature (CTKD) replaces the base ``temperature``; the extra temperatures stay fixed (the LS code likewise
    replaces only the base temperature).

    Call: ``head(student_weak, teacher_weak, target, student_strong=..., teacher_strong=...)`` (``views = 2``);
    the training modules pass both views when the data module's ``strong_view`` is on.
    """

    views = 2

    def __init__(self, temperature: float = 4.0, extra_temperatures: Sequence[float] = (3.0, 5.0, 2.0, 6.0),
                 divergence: Divergence | None = None, standardize: bool = False,
                 learned_temperature: nn.Module | None = None):
        super().__init__(divergence, standardize, learned_temperature)
        self.temperature = self._positive("temperature", temperature)
        if isinstance(extra_temperatures, (str, bytes)) or not isinstance(extra_temperatures, Sequence):
            raise ValueError(f"extra_temperatures must be a list of numbers > 0, got {extra_temperatures!r}")
        self.extra_temperatures = tuple(self._positive("extra_temperatures", t) for t in extra_temperatures)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None = None,
                student_strong: Tensor | None = None, teacher_strong: Tensor | None = None) -> Tensor:
        if student_strong is None or teacher_strong is None:
            raise ValueError("MLKD trains on two views of each image and got one: set data.init_args.strong_view: "
                             "true (the training module then passes student_strong and teacher_strong)")
        self._check_logits(student_logits, teacher_logits, target)
        self._check_logits(student_strong, teacher_strong, target)
        if student_strong.shape != student_logits.shape:
            raise ValueError(f"the weak and strong views must have the same shape, got {tuple(student_logits.shape)} "
                             f"and {tuple(student_strong.shape)}")
        raw_s, raw_t = upcast(student_logits), upcast(teacher_logits)
        weak_s, weak_t = self.prepare(student_logits, teacher_logits)
        strong_s, strong_t = self.prepare(student_strong, teacher_strong)

        teacher_probs = raw_t.softmax(dim=-1).detach()
        sample_share = fraction_at_or_below_median(teacher_probs.max(dim=-1).values)
        class_share = fraction_at_or_below_median(teacher_probs.sum(dim=0))

        base = self.temperature_for(weak_s, weak_t, self.temperature)
        loss = raw_s.new_zeros(())
        for tau in (base, *self.extra_temperatures):
            kd_weak = tempered_mean(tempered_divergence(self.divergence, weak_s, weak_t, tau), tau)
            kd_strong = tempered_mean(tempered_divergence(self.divergence, strong_s, strong_t, tau), tau)
            p_s, p_t = (raw_s / tau).softmax(dim=-1), (raw_t / tau).softmax(dim=-1)
            loss = loss + sample_share * kd_weak + kd_strong
            loss = loss + class_share * class_correlation_gap(p_s, p_t)
            loss = loss + sample_share * batch_correlation_gap(p_s, p_t)
        return loss

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, extra_temperatures={list(self.extra_temperatures)}"
                f"{self._transforms_repr()}")
