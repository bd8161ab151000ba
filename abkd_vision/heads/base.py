"""What every distillation head shares: the divergence it uses, the two logit transforms (standardisation and a
learned temperature) and input checks."""

from __future__ import annotations

from numbers import Real

import torch
from torch import Tensor, nn

from abkd_vision.losses import Divergence, ForwardKL
from abkd_vision.losses.functional import check_finite_number


def check_weight(name: str, value) -> float:
    """``value`` as a float when it is a loss weight (finite and >= 0), else a ValueError naming ``name``."""
    number = value.item() if isinstance(value, Tensor) and value.numel() == 1 else value
    if isinstance(number, Real) and not isinstance(number, bool) and not float(number) >= 0:  # also NaN
        raise ValueError(f"{name} must be >= 0, got {float(number)}")
    return check_finite_number(name, value)


def upcast(logits: Tensor) -> Tensor:
    """Half/bfloat16 logits to float32 (softmax and powers of small probabilities underflow in 16 bits);
    float32 and float64 pass through unchanged."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def standardize_logits(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """Z-score each row: (z - mean_k z) / (std_k z + eps), unbiased std as in the logit-standardisation paper's code.

    Shape [B, C] -> [B, C]. Each sample thus gets its own effective temperature std(z) * T.
    """
    logits = upcast(logits)
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True)
    return (logits - mean) / (std + eps)


def tempered_mean(per_sample: Tensor, temperature: float | Tensor) -> Tensor:
    """mean_i T_i^2 * loss_i for per-sample losses [B]: a fixed T (float), a learned global T (0-dim tensor), or a
    per-sample T ([B, 1]). A shared T multiplies the mean (as the reference code does, bit for bit)."""
    if isinstance(temperature, Tensor) and temperature.dim():
        return (per_sample * temperature.reshape(-1) ** 2).mean()
    return per_sample.mean() * (temperature * temperature)


class DistillationHead(nn.Module):
    """Base of the KD heads: turns (student logits, teacher logits, target) into a scalar loss.

    A head only shapes the teacher distribution p and the student distribution q (temperature,
    decoupling, standardisation, power transform); the distance between them is the injected
    ``divergence`` (forward KL when None). An AB variant is the same head with
    ``divergence=AlphaBetaDivergence(alpha, beta)``.

    Two transforms are options of every head rather than heads of their own, so they compose with any method:

    - ``standardize=True``: logit standardisation (Sun et al., CVPR 2024): both networks' logits are z-scored per
      sample before the head's temperature (which is then the LS paper's "base temperature"). DKD+LS, TTM+LS,
      MLKD+LS, ... are this flag.
    - ``learned_temperature=CurriculumTemperature(...)``: CTKD (Li et al., AAAI 2023): the head's fixed temperature
      is replaced by a learned one, trained adversarially through a gradient-reversal layer with a curriculum over
      epochs. Only heads that have a temperature take it.

    Call: ``head(student_logits [B, C], teacher_logits [B, C], target [B] int64) -> scalar``; a head that needs
    two views of each image (``views = 2``, MLKD) also takes ``student_strong=``/``teacher_strong=`` logits.

    Attributes the training modules read: ``views`` (1 or 2), ``uses_labels`` (the loss needs ground-truth
    labels), and the hooks ``set_epoch(epoch)`` (called at every training epoch start) and ``log_values()``
    (tensors logged per epoch as ``train/<name>``).
    """

    views: int = 1
    uses_labels: bool = False
    has_temperature: bool = True  # heads whose temperature a learned temperature can replace

    def __init__(self, divergence: Divergence | None = None, standardize: bool = False,
                 learned_temperature: nn.Module | None = None):
        super().__init__()
        if divergence is not None and not isinstance(divergence, nn.Module):
            raise ValueError(
                f"divergence must be a Divergence module (e.g. build_divergence('ab', alpha=0.8, beta=0.3)), "
                f"got {divergence!r}"
            )
        self.divergence = divergence if divergence is not None else ForwardKL()
        if not isinstance(standardize, bool):
            raise ValueError(f"standardize must be true or false, got {standardize!r}")
        self.standardize = standardize
        if learned_temperature is not None:
            from abkd_vision.heads.temperature import CurriculumTemperature

            if not isinstance(learned_temperature, CurriculumTemperature):
                raise ValueError("learned_temperature must be an abkd_vision.heads.CurriculumTemperature, got "
                                 f"{type(learned_temperature).__name__}")
            if not self.has_temperature:
                raise ValueError(
                    f"{type(self).__name__} has no temperature for CurriculumTemperature (CTKD) to learn"
                    f"{self._no_temperature_reason()}; use it with KD, DKD, LSD, NKD, DIST or MLKD"
                )
        self.learned_temperature = learned_temperature

    def _no_temperature_reason(self) -> str:
        return ""

    # -- hooks of the training modules -----------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Called by the training modules at the start of every training epoch (0-based)."""
        if self.learned_temperature is not None:
            self.learned_temperature.set_epoch(epoch)

    def log_values(self) -> dict[str, Tensor]:
        """Values to log per epoch (device tensors, no host read): the learned temperature and its lambda."""
        return self.learned_temperature.log_values() if self.learned_temperature is not None else {}

    # -- the shared transforms -------------------------------------------------------------------------------
    def prepare(self, student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
        """Float32 (or float64) logits, z-scored per sample when ``standardize`` is on."""
        if not self.standardize:
            return upcast(student_logits), upcast(teacher_logits)
        if student_logits.shape[-1] < 2:
            raise ValueError(f"{type(self).__name__} with standardize: true needs at least 2 classes")
        return standardize_logits(student_logits), standardize_logits(teacher_logits)

    def temperature_for(self, student_logits: Tensor, teacher_logits: Tensor, fixed: float) -> float | Tensor:
        """The temperature of this step: ``fixed``, or the learned one (0-dim, or [B, 1] per sample) computed from
        the (prepared) logits when ``learned_temperature`` is set."""
        if self.learned_temperature is None:
            return fixed
        return self.learned_temperature(student_logits, teacher_logits)

    @staticmethod
    def _positive(name: str, value) -> float:
        value = check_finite_number(name, value)
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")
        return value

    @staticmethod
    def _check_logits(student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None) -> None:
        if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
            raise ValueError(
                "student and teacher logits must both be [batch, classes], got "
                f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}; a teacher/student "
                "class-count mismatch means they were built for different datasets"
            )
        for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
            if not t.is_floating_point():
                raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if target is not None and (target.shape != student_logits.shape[:1] or target.is_floating_point()):
            raise ValueError(
                f"target must be an integer tensor of shape [{student_logits.shape[0]}], "
                f"got {tuple(target.shape)} {target.dtype}"
            )

    def _check_labelled(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None) -> None:
        """The input checks of a head that splits target and non-target classes (DKD, NKD)."""
        name = type(self).__name__
        if target is None:
            raise ValueError(f"{name} needs the ground-truth target to split target and non-target classes")
        self._check_logits(student_logits, teacher_logits, target)
        if student_logits.shape[-1] < 2:
            raise ValueError(f"{name} needs at least 2 classes")

    def _transforms_repr(self) -> str:
        return ", standardize=True" if self.standardize else ""

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError


__all__ = ["DistillationHead", "check_weight", "standardize_logits", "tempered_mean", "upcast"]
