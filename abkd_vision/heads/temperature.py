"""CTKD's curriculum temperature (Li et al., AAAI 2023) as an option of any head that has a temperature.

The temperature is a learned module whose output goes through a gradient-reversal layer: the student descends
the distillation loss while the temperature ascends it (an adversarial, "harder" temperature), and the strength
of the reversal grows over the first epochs along a cosine curriculum:

    T = t_min + t_range * sigmoid(r)                       r: a parameter (global) or an MLP output (per sample)
    lambda(e) = lambda_min + (lambda_max - lambda_min) * (1 - cos(pi * min(e + 1, E) / E)) / 2     e: 0-based epoch
    backward of the reversal layer: dL/dr <- -lambda(e) * dL/dr

The released defaults: t_min 1, t_range 20 (T in (1, 21)), r initialised at 1 (T = 15.6 at the start), lambda
from 0 to 1 over E = 10 epochs, the temperature trained by the student's optimiser. The released code counts
epochs from 1; ``min(e + 1, E)`` with Lightning's 0-based epoch gives the same values.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from abkd_vision.losses.functional import check_finite_number


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; the backward multiplies the incoming gradient by ``-scale``."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor) -> Tensor:
        ctx.save_for_backward(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (scale,) = ctx.saved_tensors
        return -scale.to(grad.dtype) * grad, None


def reverse_gradient(x: Tensor, scale: Tensor) -> Tensor:
    """``x`` unchanged; its gradient is multiplied by ``-scale`` on the way back (a 0-dim tensor, no host read)."""
    return _ReverseGradient.apply(x, scale)


def curriculum_lambda(epoch: int, lambda_min: float, lambda_max: float, epochs: int) -> float:
    """CTKD's cosine curriculum: lambda_min at the start, lambda_max from epoch ``epochs - 1`` (0-based) on."""
    progress = min(epoch + 1, epochs) / epochs
    return lambda_min + (lambda_max - lambda_min) * (1.0 - math.cos(math.pi * progress)) / 2.0


class CurriculumTemperature(nn.Module):
    """The learned temperature of CTKD, for ``head(..., learned_temperature=CurriculumTemperature(...))``.

    Args:
        mode: ``"global"`` (one learned temperature, the paper's main variant) or ``"instance"`` (one per sample,
            predicted from the two networks' logits by a small MLP).
        num_classes: classes of the logits; needed by ``"instance"`` (the MLP's input is [z_s, z_t], 2C wide).
        t_min, t_range: T = t_min + t_range * sigmoid(r) (released: 1 and 20).
        lambda_min, lambda_max, curriculum_epochs: the cosine curriculum of the reversal strength (released: 0, 1,
            10 epochs).
        init: the initial r of the global temperature (released: 1.0).
        hidden: width of the instance MLP's hidden layer. The paper describes the instance-wise module as a small
            MLP over the logits but its released code is not in the repository; the layout here (Linear 2C ->
            hidden, ReLU, Linear hidden -> 1) and width 256 are ours.

    ``forward(student_logits [B, C], teacher_logits [B, C])`` returns T: 0-dim (global) or [B, 1] (instance), in
    the logits' dtype. The MLP sees detached logits, so the only gradient it sends is into its own weights.
    """

    def __init__(self, mode: str = "global", num_classes: int | None = None, t_min: float = 1.0,
                 t_range: float = 20.0, lambda_min: float = 0.0, lambda_max: float = 1.0,
                 curriculum_epochs: int = 10, init: float = 1.0, hidden: int = 256):
        super().__init__()
        if mode not in ("global", "instance"):
            raise ValueError(f"CurriculumTemperature mode must be 'global' or 'instance', got {mode!r}")
        self.mode = mode
        self.t_min = check_finite_number("t_min", t_min)
        self.t_range = check_finite_number("t_range", t_range)
        if self.t_min <= 0 or self.t_range < 0:
            raise ValueError(f"CurriculumTemperature needs t_min > 0 and t_range >= 0 (T = t_min + t_range * "
                             f"sigmoid(r) must stay positive), got t_min={t_min}, t_range={t_range}")
        self.lambda_min = check_finite_number("lambda_min", lambda_min)
        self.lambda_max = check_finite_number("lambda_max", lambda_max)
        if not (isinstance(curriculum_epochs, int) and curriculum_epochs >= 1):
            raise ValueError(f"curriculum_epochs must be a whole number >= 1, got {curriculum_epochs!r}")
        self.curriculum_epochs = curriculum_epochs
        if mode == "global":
            self.raw = nn.Parameter(torch.tensor(check_finite_number("init", init)))
            self.mlp = None
        else:
            if not (isinstance(num_classes, int) and num_classes >= 1):
                raise ValueError("CurriculumTemperature(mode='instance') needs num_classes (the logits' width), "
                                 f"got {num_classes!r}")
            if not (isinstance(hidden, int) and hidden >= 1):
                raise ValueError(f"hidden must be a whole number >= 1, got {hidden!r}")
            self.raw = None
            self.mlp = nn.Sequential(nn.Linear(2 * num_classes, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        # the reversal strength of the current epoch: a buffer, so a step never reads it back from the device
        self.register_buffer("reversal", torch.tensor(self.lambda_min), persistent=False)
        self.register_buffer("last_temperature", torch.tensor(float("nan")), persistent=False)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        value = curriculum_lambda(epoch, self.lambda_min, self.lambda_max, self.curriculum_epochs)
        self.reversal.fill_(value)

    def _raw(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        if self.mlp is None:
            return self.raw
        features = torch.cat([student_logits.detach(), teacher_logits.detach()], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))

    @torch.no_grad()
    def value(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """The temperature ``forward`` would use for these logits (0-dim or [B, 1], float32), without a graph and
        without touching the logged value: for readers such as the diagnostics."""
        return (self.t_min + self.t_range * torch.sigmoid(self._raw(student_logits, teacher_logits))).float()

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        raw = reverse_gradient(self._raw(student_logits, teacher_logits), self.reversal)
        temperature = self.t_min + self.t_range * torch.sigmoid(raw)
        self.last_temperature.copy_(temperature.detach().mean())
        return temperature.to(student_logits.dtype)

    def log_values(self) -> dict[str, Tensor]:
        return {"temperature": self.last_temperature, "temperature_lambda": self.reversal}

    def extra_repr(self) -> str:
        return (f"mode={self.mode!r}, t_min={self.t_min}, t_range={self.t_range}, lambda=[{self.lambda_min}, "
                f"{self.lambda_max}] over {self.curriculum_epochs} epochs")


__all__ = ["CurriculumTemperature", "curriculum_lambda", "reverse_gradient"]
