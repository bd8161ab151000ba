"""The losses, heads and the non-finite guard run without host-device synchronisation and without graph breaks.

A synchronisation in PyTorch is a tensor turned into a Python value (``item``, ``bool``, ``float``, ``int``,
``tolist``); the tests make every such conversion raise while the code runs. Graph breaks are found by
``torch.compile(fullgraph=True)`` with the tracing-only "eager" backend (no compiler needed).
"""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch

from abkd_vision.heads import DIST, DKD, KD, LSD, MLKD, NKD, TTM, CurriculumTemperature
from abkd_vision.lit.common import NonFiniteGuard
from abkd_vision.losses import AlphaBetaDivergence, ForwardKL, ReverseKL

_CONVERSIONS = ("item", "__bool__", "__float__", "__int__", "tolist")


@contextlib.contextmanager
def no_host_sync():
    def refuse(self, *args, **kwargs):
        raise AssertionError("a tensor was read back to the host (a device synchronisation)")

    with contextlib.ExitStack() as stack:
        for name in _CONVERSIONS:
            stack.enter_context(mock.patch.object(torch.Tensor, name, refuse))
        yield


HEADS = {
    "kd": lambda: KD(temperature=4.0),
    "abkd": lambda: KD(temperature=4.0, divergence=AlphaBetaDivergence(0.8, 0.3)),
    "ab_boundary": lambda: KD(temperature=4.0, divergence=AlphaBetaDivergence(1.0, 0.0)),
    "rkl": lambda: KD(divergence=ReverseKL()),
    "dkd": lambda: DKD(),
    "abdkd": lambda: DKD(divergence=AlphaBetaDivergence(0.8, 0.3)),
    "lsd": lambda: LSD(),
    "ttm": lambda: TTM(),
    "wttm": lambda: TTM(weighted=True),
    "dkd_ls": lambda: DKD(standardize=True),
    "wttm_ls": lambda: TTM(weighted=True, standardize=True),
    "dist": lambda: DIST(),
    "nkd": lambda: NKD(),
    "abnkd": lambda: NKD(divergence=AlphaBetaDivergence(0.8, 0.3)),
    "mlkd": lambda: MLKD(),
    "abmlkd_ls": lambda: MLKD(divergence=AlphaBetaDivergence(0.8, 0.3), standardize=True),
    "ctkd": lambda: KD(learned_temperature=CurriculumTemperature()),
    "ctkd_instance_dkd": lambda: DKD(learned_temperature=CurriculumTemperature("instance", num_classes=10)),
}


def _call(head, student, teacher, target):
    if head.views == 2:  # MLKD: a second (strong) view of the same images
        return head(student, teacher, target, student_strong=student * 0.5, teacher_strong=teacher.flip(0))
    return head(student, teacher, target)


@pytest.mark.parametrize("name", list(HEADS))
def test_heads_forward_and_backward_do_not_synchronise(name):
    head = HEADS[name]()
    student = torch.randn(8, 10, requires_grad=True)
    teacher, target = torch.randn(8, 10), torch.randint(0, 10, (8,))
    head.set_epoch(2)  # (between steps, as the modules call it)
    with no_host_sync():
        loss = _call(head, student, teacher, target)
        loss.backward()
        head.log_values()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


@pytest.mark.parametrize("name", ["kd", "abkd", "dkd", "lsd", "ttm", "dkd_ls", "dist", "abnkd", "abmlkd_ls", "ctkd",
                                  "ctkd_instance_dkd"])
def test_heads_compile_without_graph_breaks(name):
    torch._dynamo.reset()
    head = HEADS[name]()
    compiled = torch.compile(lambda *a: _call(head, *a), fullgraph=True, backend="eager")
    student, teacher, target = torch.randn(4, 10), torch.randn(4, 10), torch.randint(0, 10, (4,))
    torch.testing.assert_close(compiled(student, teacher, target), _call(head, student, teacher, target))


def test_masked_classes_still_give_exact_zero_without_a_branch():
    logits = torch.randn(3, 5)
    logits[:, 1] = -float("inf")  # a class masked out in both distributions
    p, q = logits.log_softmax(-1), (logits * 0.5).log_softmax(-1)
    for div in (ForwardKL(), AlphaBetaDivergence(0.8, 0.3)):
        with no_host_sync():
            value = div(p, q)
        reference = div(p[:, [0, 2, 3, 4]], q[:, [0, 2, 3, 4]])
        torch.testing.assert_close(value, reference)


def test_guard_records_without_sync_and_names_the_first_bad_step():
    class _Module:
        global_step, current_epoch = 0, 0

    module, guard = _Module(), NonFiniteGuard(check_every=5)
    for step in range(4):
        module.global_step = step
        bad = float("nan") if step == 2 else 1.0
        with no_host_sync():
            guard.record(module, torch.tensor(bad) + 1.0, ce=torch.tensor(1.0), kd=torch.tensor(bad))
    module.global_step = 4
    with pytest.raises(FloatingPointError, match=r"global step 2 \(epoch 0\) \(detected at step 4\): ce=1, "
                                                 r"kd=nan; non-finite term\(s\): kd"):
        guard.record(module, torch.tensor(1.0), ce=torch.tensor(1.0), kd=torch.tensor(1.0))
