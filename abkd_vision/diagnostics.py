"""Per-epoch distillation diagnostics: where the student's probability mass goes (ABKD §3).

:class:`DistillationDiagnostics` is an opt-in Lightning callback. On (at most ``max_batches`` batches per loader of)
the validation data of every epoch it computes, from the student's and the teacher's logits:

* the student's (and the teacher's) mean entropy in nats, the student's mean probability on the target class,
  teacher-student top-1 agreement and both top-1 accuracies (over the classes the logits cover);
* statistics of the paper's **log mass ratio** (ABKD §3.1, after Tajwar et al. 2024)::

      LogR_t^A(y) = log( q_{t+1}^A(y) / q_t(y) ),        q_t(y) ∝ exp(f_y^t)

  the log of how much one gradient step of algorithm A (here: gradient descent with step ``eta`` on the student's
  logits f, with the run's divergence ℓ = D(p‖q)) changes the student's mass on class y. Exactly as in the paper's
  eq. (5) / App. C.1::

      LogR(y) = log_softmax(f - eta * ∇_f ℓ)_y - log_softmax(f)_y  =  -eta ∇_{f_y} ℓ + N(f)

  (N independent of y). It is 0 for every class exactly when ∇_f ℓ = 0, and shrinks as training converges; *which*
  classes carry the largest |LogR| shows the divergence's **hardness-concentration** (mass moved on classes with a
  large error |p(y) - q(y)|) and **confidence-concentration** (mass moved on classes where the student is
  confident, large q(y)); FKLD weights all classes alike, RKLD concentrates on both (Prop. 3.1, Thm. 3.2).

The LogR statistics, over every (image, class) pair of the epoch (``p`` and ``q`` at the LogR temperature):

==================================  ==============================================================================
``diag/frac_over``, ``frac_under``  fraction of classes the student over-estimates (q > p) / under-estimates (q < p)
``diag/logr_abs_mean_over|under``   mean |LogR| on over- / under-estimated classes
``diag/logr_abs_median_over|under`` median |LogR| on them (over the first ``max_values`` entries of each group)
``diag/logr_mean_over|under``       mean signed LogR on them (a step moves mass off over-estimated classes: < 0)
``diag/logr_share_hard``            per image, the share of sum_y |LogR(y)| on its k hardest classes (largest
                                    |p(y) - q(y)|), averaged over images: hardness-concentration
``diag/logr_share_confident``       the same on the student's k most confident classes (largest q(y)):
                                    confidence-concentration
==================================  ==============================================================================

with ``k = ceil(top_fraction * C)``; a share equal to k / C (stored in ``diagnostics.json`` as ``uniform_share``)
means no concentration, 1 means all the movement is on those k classes. Images where LogR is 0 for every class
(p = q) are left out of the shares.

Which divergence and temperature: by default the module's ``head.divergence`` (forward KL when the module has no
head) applied to the full tempered distributions p = softmax(z_t / T), q = softmax(z_s / T), with T the head's
``temperature`` for a :class:`~abkd_vision.heads.KD` head (its learned temperature when it has one, CTKD: per
batch, and per image in the instance mode; ``diagnostics.json`` then records the epoch's mean) and 1 otherwise
(DKD's decoupling, LSD's standardisation and TTM's power transform are not reproduced: the LogR is that of the
divergence itself). Entropy, target probability and agreement are always at T = 1.

Logits are taken without changing the modules, by duck typing: ``pl_module.diagnostic_logits(batch) ->
(student_logits, teacher_logits, target or None)`` when the module has it; else a base-to-new module
(``class_names``, ``teacher.text_features``) gives the distribution over *all* classes used in training
(``teacher(images, class_names)``, ``student(images, teacher.text_features(class_names))``) and maps the labels of
the second (new) evaluation loader to full labels by adding ``num_base_classes``; else ``student(images)`` and
``teacher(images)`` (``DistillationModule``). The callback runs in validation (no training cost) under no_grad
with the student in eval mode (its mode is restored).

Outputs: ``pl_module.log("diag/...")`` each epoch (the loggers, e.g. ``metrics.csv``), ``self.history`` (one dict
per epoch), and in the run folder (``out_dir``, else ``trainer.log_dir`` when there is a logger):
``diagnostics.json`` (settings and history, rewritten every epoch) and ``diagnostics.png`` at the end of fit.
Both are written atomically, by rank 0. Under DDP the means and shares are summed over ranks; the medians are rank
0's.

Config::

    trainer:
      callbacks:
        - class_path: abkd_vision.diagnostics.DistillationDiagnostics
          init_args: {max_batches: 20}
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from abkd_vision.io import atomic_write
from abkd_vision.losses import Divergence, ForwardKL, build_divergence
from abkd_vision.losses.functional import check_finite_number

__all__ = ["DistillationDiagnostics", "DiagnosticStats", "log_mass_ratio", "batch_stats"]

# Sums accumulated per epoch (reduced over ranks); the metrics are ratios of them.
_SUM_KEYS = ("n", "entropy", "teacher_entropy", "n_target", "target_prob", "agree", "correct", "teacher_correct",
             "n_entries", "n_over", "n_under", "abs_over", "abs_under", "signed_over", "signed_under",
             "n_share", "share_hard", "share_confident")


def log_mass_ratio(student_logits: Tensor, teacher_logits: Tensor, divergence: Divergence | None = None,
                   eta: float = 1.0, temperature: float | Tensor = 1.0) -> Tensor:
    """The log mass ratio ``LogR(y) = log q_{t+1}(y) - log q_t(y)`` of one gradient step (ABKD §3.1, eq. 5).

    ``q_t = softmax(f)`` with ``f = student_logits / temperature``, ``p = softmax(teacher_logits / temperature)``,
    ``ℓ = sum over rows of divergence(log p, log q)`` and ``q_{t+1} = softmax(f - eta * ∇_f ℓ)``. Each row's step
    depends only on that row. Returns ``[B, C]`` float32 (float64 for float64 inputs).
    """
    divergence = divergence if divergence is not None else ForwardKL()
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(student_logits.device.type, enabled=False):
        # clones made outside inference mode are ordinary tensors autograd can use
        if isinstance(temperature, Tensor):  # a learned one: 0-dim or [B, 1]
            temperature = temperature.detach().to(device=student_logits.device, dtype=dtype)
        f = (student_logits.detach().to(dtype).clone() / temperature).requires_grad_(True)
        log_p = (teacher_logits.detach().to(dtype).clone() / temperature).log_softmax(dim=-1)
        loss = divergence(log_p, f.log_softmax(dim=-1)).sum()
        (grad,) = torch.autograd.grad(loss, f)
        f = f.detach()
        return ((f - eta * grad).log_softmax(dim=-1) - f.log_softmax(dim=-1)).detach()


def batch_stats(student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None, logr: Tensor,
                temperature: float | Tensor = 1.0, top_fraction: float = 0.1
                ) -> tuple[dict[str, float], Tensor, Tensor]:
    """Sums of one batch (keys ``_SUM_KEYS``) and the |LogR| values on over- and under-estimated classes."""
    # float64 only for float64 inputs (some accelerators have no float64)
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    s, t = student_logits.detach().to(dtype), teacher_logits.detach().to(dtype)
    log_q1, log_p1 = s.log_softmax(-1), t.log_softmax(-1)
    q1, p1 = log_q1.exp(), log_p1.exp()
    out = {k: 0.0 for k in _SUM_KEYS}
    b, c = s.shape
    out["n"] = float(b)
    out["entropy"] = float(-(q1 * log_q1).nan_to_num().sum(-1).sum())  # 0 log 0 = 0
    out["teacher_entropy"] = float(-(p1 * log_p1).nan_to_num().sum(-1).sum())
    out["agree"] = float((s.argmax(-1) == t.argmax(-1)).sum())
    if target is not None:
        target = target.to(s.device).long()
        out["n_target"] = float(b)
        out["target_prob"] = float(q1.gather(-1, target[:, None]).sum())
        out["correct"] = float((s.argmax(-1) == target).sum())
        out["teacher_correct"] = float((t.argmax(-1) == target).sum())
    # LogR statistics at the LogR temperature
    if isinstance(temperature, Tensor):
        temperature = temperature.detach().to(device=s.device, dtype=dtype)
    q, p = (s / temperature).softmax(-1), (t / temperature).softmax(-1)
    logr = logr.detach().to(dtype)
    over, under = q > p, q < p
    a = logr.abs()
    out["n_entries"] = float(b * c)
    out["n_over"], out["n_under"] = float(over.sum()), float(under.sum())
    out["abs_over"], out["abs_under"] = float(a[over].sum()), float(a[under].sum())
    out["signed_over"], out["signed_under"] = float(logr[over].sum()), float(logr[under].sum())
    k = max(1, math.ceil(top_fraction * c))
    total = a.sum(-1)
    keep = total > 0
    hard = a.gather(-1, (p - q).abs().topk(k, dim=-1).indices).sum(-1)
    confident = a.gather(-1, q.topk(k, dim=-1).indices).sum(-1)
    out["n_share"] = float(keep.sum())
    out["share_hard"] = float((hard[keep] / total[keep]).sum())
    out["share_confident"] = float((confident[keep] / total[keep]).sum())
    return out, a[over].float().cpu(), a[under].float().cpu()


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else float("nan")


class DiagnosticStats:
    """Accumulates :func:`batch_stats` over an epoch; ``compute()`` gives the ``diag/...`` metrics (without prefix)."""

    def __init__(self, temperature: float = 1.0, top_fraction: float = 0.1, max_values: int = 4_000_000):
        self.temperature, self.top_fraction, self.max_values = temperature, top_fraction, max_values
        self.reset()

    def reset(self) -> None:
        self.sums = {k: 0.0 for k in _SUM_KEYS}
        self.values: dict[str, list[Tensor]] = {"over": [], "under": []}
        self.num_values = {"over": 0, "under": 0}
        self.num_classes: int | None = None

    def update(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None, logr: Tensor,
               temperature: float | Tensor | None = None) -> None:
        """``temperature``: this batch's LogR temperature (a number, 0-dim or [B, 1]); None: the one given at
        construction."""
        temperature = self.temperature if temperature is None else temperature
        sums, over, under = batch_stats(student_logits, teacher_logits, target, logr, temperature,
                                        self.top_fraction)
        self.num_classes = student_logits.shape[-1]
        for key, value in sums.items():
            self.sums[key] += value
        for group, vals in (("over", over), ("under", under)):
            room = self.max_values - self.num_values[group]
            if room > 0 and vals.numel():
                self.values[group].append(vals[:room])
                self.num_values[group] += min(room, vals.numel())

    def compute(self, sums: dict[str, float] | None = None) -> dict[str, float]:
        s = self.sums if sums is None else sums

        def median(group: str) -> float:
            vals = self.values[group]
            return float(torch.cat(vals).median()) if vals else float("nan")

        return {
            "student_entropy": _ratio(s["entropy"], s["n"]),
            "teacher_entropy": _ratio(s["teacher_entropy"], s["n"]),
            "target_prob": _ratio(s["target_prob"], s["n_target"]),
            "agreement": _ratio(s["agree"], s["n"]),
            "student_acc1": _ratio(s["correct"], s["n_target"]),
            "teacher_acc1": _ratio(s["teacher_correct"], s["n_target"]),
            "frac_over": _ratio(s["n_over"], s["n_entries"]),
            "frac_under": _ratio(s["n_under"], s["n_entries"]),
            "logr_abs_mean_over": _ratio(s["abs_over"], s["n_over"]),
            "logr_abs_mean_under": _ratio(s["abs_under"], s["n_under"]),
            "logr_abs_median_over": median("over"),
            "logr_abs_median_under": median("under"),
            "logr_mean_over": _ratio(s["signed_over"], s["n_over"]),
            "logr_mean_under": _ratio(s["signed_under"], s["n_under"]),
            "logr_share_hard": _ratio(s["share_hard"], s["n_share"]),
            "logr_share_confident": _ratio(s["share_confident"], s["n_share"]),
        }

    def uniform_share(self) -> float | None:
        if self.num_classes is None:
            return None
        return max(1, math.ceil(self.top_fraction * self.num_classes)) / self.num_classes


class DistillationDiagnostics(Callback):
    """Log the student's entropy, target probability, agreement with the teacher and LogR statistics per epoch.

    Args:
        max_batches: at most this many batches of each validation loader per epoch (None: all).
        divergence: short name for :func:`~abkd_vision.losses.build_divergence` (``fkl``, ``rkl``, ``ab``, ...) of
            the divergence whose LogR is measured; None uses the module's ``head.divergence`` (forward KL without a
            head).
        divergence_args: its parameters, e.g. ``{alpha: 0.8, beta: 0.3}``.
        temperature: of p and q in the LogR; None: the head's temperature for a KD head, else 1.
        eta: the step size of the gradient step that defines LogR.
        top_fraction: k = ceil(top_fraction * C) classes count as the "hardest" / "most confident" of an image.
        max_values: |LogR| values kept per group and epoch for the medians.
        out_dir: where to write diagnostics.json / .png (default: ``trainer.log_dir`` when there is a logger, else
            nothing is written).
        plot: write diagnostics.png at the end of fit (needs matplotlib; skipped with a warning without it).
    """

    def __init__(self, max_batches: int | None = 20, divergence: str | None = None,
                 divergence_args: dict | None = None, temperature: float | None = None, eta: float = 1.0,
                 top_fraction: float = 0.1, max_values: int = 4_000_000, out_dir: str | None = None,
                 plot: bool = True):
        super().__init__()
        if max_batches is not None and (isinstance(max_batches, bool) or int(max_batches) != max_batches
                                        or max_batches < 1):
            raise ValueError(f"max_batches must be a positive integer or None, got {max_batches!r}")
        if temperature is not None and check_finite_number("temperature", temperature) <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if check_finite_number("eta", eta) <= 0:
            raise ValueError(f"eta must be > 0, got {eta}")
        if not 0 < check_finite_number("top_fraction", top_fraction) <= 1:
            raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
        self.max_batches = None if max_batches is None else int(max_batches)
        self.divergence_name, self.divergence_args = divergence, dict(divergence_args or {})
        self._divergence = build_divergence(divergence, **self.divergence_args) if divergence is not None else None
        self.temperature, self.eta, self.top_fraction = temperature, float(eta), float(top_fraction)
        self.max_values, self.out_dir, self.plot = int(max_values), out_dir, bool(plot)
        self.history: list[dict] = []
        self.stats = DiagnosticStats(1.0, self.top_fraction, self.max_values)
        self._learned_sum, self._learned_n = 0.0, 0
        self.settings: dict = {}

    # -- what the LogR is measured with ----------------------------------------------------------------------------
    def resolve(self, pl_module: LightningModule) -> tuple[Divergence, float | nn.Module]:
        """The divergence and the LogR temperature: a number, or the head's learned temperature module (CTKD),
        which :meth:`batch_temperature` evaluates per batch."""
        head = getattr(pl_module, "head", None)
        divergence = self._divergence
        if divergence is None:
            divergence = getattr(head, "divergence", None)
            if not callable(divergence):
                divergence = ForwardKL()
        temperature = self.temperature
        if temperature is None:
            from abkd_vision.heads import KD

            if not isinstance(head, KD):
                temperature = 1.0
            elif getattr(head, "learned_temperature", None) is not None:
                temperature = head.learned_temperature
            else:
                temperature = float(head.temperature)
        return divergence, temperature

    @staticmethod
    def batch_temperature(pl_module: LightningModule, temperature: float | nn.Module, student_logits: Tensor,
                          teacher_logits: Tensor) -> float | Tensor:
        """A number as it is; a learned temperature evaluated on the logits as the head's step sees them (after its
        standardisation, if any): 0-dim or [B, 1]."""
        if not isinstance(temperature, nn.Module):
            return temperature
        s, t = pl_module.head.prepare(student_logits, teacher_logits)
        return temperature.value(s, t)

    @staticmethod
    def get_logits(pl_module: LightningModule, batch, dataloader_idx: int = 0
                   ) -> tuple[Tensor, Tensor, Tensor | None]:
        """(student logits, teacher logits, target or None) of a batch, by duck typing (see the module doc)."""
        if callable(getattr(pl_module, "diagnostic_logits", None)):
            return pl_module.diagnostic_logits(batch)
        images, target = batch
        teacher = getattr(pl_module, "teacher", None)
        student = getattr(pl_module, "student", None)
        if teacher is None or student is None:
            raise ValueError(
                f"DistillationDiagnostics needs a distillation module (student and teacher, or a "
                f"diagnostic_logits(batch) method); {type(pl_module).__name__} has neither"
            )
        if hasattr(pl_module, "class_names") and callable(getattr(teacher, "text_features", None)):
            names = pl_module.class_names
            teacher_logits = teacher(images, names)
            student_logits = student(images, teacher.text_features(names))
            if target is not None and dataloader_idx == 1:  # [base, new]: new labels start at 0 in their group
                target = target + int(pl_module.num_base_classes)
            return student_logits, teacher_logits, target
        return student(images), teacher(images), target

    # -- hooks ----------------------------------------------------------------------------------------------------
    def _active(self, trainer: Trainer) -> bool:
        return not trainer.sanity_checking

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        divergence, temperature = self.resolve(pl_module)
        learned = isinstance(temperature, nn.Module)
        self.stats = DiagnosticStats(1.0 if learned else temperature, self.top_fraction, self.max_values)
        # a learned temperature: the epoch's mean over the measured images, filled in at the epoch end
        self._learned_sum, self._learned_n = 0.0, 0
        self.settings = {"divergence": repr(divergence), "temperature": None if learned else temperature,
                         "temperature_source": "learned (the head's CTKD temperature)" if learned else "fixed",
                         "eta": self.eta, "top_fraction": self.top_fraction, "max_batches": self.max_batches}

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        if not self._active(trainer) or (self.max_batches is not None and batch_idx >= self.max_batches):
            return
        divergence, temperature = self.resolve(pl_module)
        student = getattr(pl_module, "student", None)
        was_training = student.training if student is not None else None
        try:
            if student is not None:
                student.eval()
            with torch.no_grad():
                s, t, target = self.get_logits(pl_module, batch, dataloader_idx)
        finally:
            if student is not None:
                student.train(was_training)
        temperature = self.batch_temperature(pl_module, temperature, s, t)
        if isinstance(temperature, Tensor):
            self._learned_sum += float(temperature.double().expand(s.shape[0], 1).sum())
            self._learned_n += s.shape[0]
        logr = log_mass_ratio(s, t, divergence, self.eta, temperature)
        self.stats.update(s, t, target, logr, temperature)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._active(trainer):
            return
        sums = dict(self.stats.sums)
        if trainer.world_size > 1:
            packed = torch.tensor([sums[k] for k in _SUM_KEYS], dtype=torch.float64, device=pl_module.device)
            packed = trainer.strategy.reduce(packed, reduce_op="sum")
            sums = dict(zip(_SUM_KEYS, packed.tolist()))
        if sums["n"] == 0:
            return
        metrics = self.stats.compute(sums)
        for key, value in metrics.items():
            if not math.isnan(value):
                pl_module.log(f"diag/{key}", value, on_step=False, on_epoch=True, sync_dist=False,
                              add_dataloader_idx=False)
        entry = {"epoch": trainer.current_epoch, "step": trainer.global_step, "images": int(sums["n"]), **metrics}
        if self._learned_n:  # this rank's images (the learned temperature is the same on every rank)
            entry["temperature"] = self.settings["temperature"] = round(self._learned_sum / self._learned_n, 6)
        self.history.append(entry)
        self.settings["uniform_share"] = self.stats.uniform_share()
        self.settings["num_classes"] = self.stats.num_classes
        folder = self._folder(trainer)
        if folder is not None and trainer.is_global_zero:
            atomic_write(folder / "diagnostics.json", json.dumps(self.summary(), indent=2) + "\n")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        folder = self._folder(trainer)
        if folder is None or not trainer.is_global_zero or not self.history:
            return
        atomic_write(folder / "diagnostics.json", json.dumps(self.summary(), indent=2) + "\n")
        if self.plot:
            try:
                png = plot_history(self.history, self.settings)
            except ImportError:
                rank_zero_warn("matplotlib is not installed: diagnostics.png not written (pip install matplotlib)")
                return
            atomic_write(folder / "diagnostics.png", png)

    def _folder(self, trainer: Trainer) -> Path | None:
        if self.out_dir is not None:
            return Path(self.out_dir)
        if trainer.logger is None:
            return None
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        return Path(log_dir) if log_dir is not None else None

    def summary(self) -> dict:
        return {"settings": self.settings, "history": self.history}

    # -- checkpoints: the history survives a resume ---------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))


def plot_history(history: list[dict], settings: dict | None = None) -> bytes:
    """PNG bytes of the per-epoch diagnostics (matplotlib, no global backend change)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    settings = settings or {}
    epochs = [h["epoch"] for h in history]

    def series(key: str) -> list[float]:
        return [h.get(key, float("nan")) for h in history]

    fig = Figure(figsize=(13, 7.5), layout="constrained")
    axes = fig.subplots(2, 3)
    marker = dict(marker="o", markersize=3)

    ax = axes[0, 0]
    ax.plot(epochs, series("student_entropy"), label="student", **marker)
    ax.plot(epochs, series("teacher_entropy"), label="teacher", linestyle="--", **marker)
    ax.set_title("mean entropy (nats)")
    ax.legend(fontsize=8)

    ax = axes[0, 1]
    for key, label in (("target_prob", "student p(target)"), ("agreement", "top-1 agreement with teacher"),
                       ("student_acc1", "student top-1"), ("teacher_acc1", "teacher top-1")):
        ax.plot(epochs, series(key), label=label, linestyle="--" if key == "teacher_acc1" else "-", **marker)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("target probability and agreement")
    ax.legend(fontsize=8)

    ax = axes[0, 2]
    ax.plot(epochs, series("frac_over"), label="over-estimated (q > p)", color="tab:red", **marker)
    ax.plot(epochs, series("frac_under"), label="under-estimated (q < p)", color="tab:blue", linestyle="--",
            **marker)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("fraction of classes")
    ax.legend(fontsize=8)

    ax = axes[1, 0]
    for group, color in (("over", "tab:red"), ("under", "tab:blue")):
        ax.plot(epochs, series(f"logr_abs_mean_{group}"), color=color, label=f"mean, {group}-estimated", **marker)
        ax.plot(epochs, series(f"logr_abs_median_{group}"), color=color, linestyle=":",
                label=f"median, {group}-estimated", **marker)
    ax.set_yscale("log")
    ax.set_title("|LogR| per class")
    ax.legend(fontsize=8)

    ax = axes[1, 1]
    ax.plot(epochs, series("logr_mean_over"), color="tab:red", label="over-estimated", **marker)
    ax.plot(epochs, series("logr_mean_under"), color="tab:blue", label="under-estimated", **marker)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_title("mean signed LogR (mass moved per step)")
    ax.legend(fontsize=8)

    ax = axes[1, 2]
    ax.plot(epochs, series("logr_share_hard"), label="hardest classes (largest |p - q|)", **marker)
    ax.plot(epochs, series("logr_share_confident"), label="most confident classes (largest q)", **marker)
    uniform = settings.get("uniform_share")
    if uniform is not None:
        ax.axhline(uniform, color="grey", linestyle="--", linewidth=1, label=f"no concentration ({uniform:.2f})")
    ax.set_ylim(-0.02, 1.02)
    frac = settings.get("top_fraction")
    ax.set_title("share of sum |LogR| on the top "
                 + (f"{100 * frac:.0f}% of classes" if frac is not None else "classes"))
    ax.legend(fontsize=8)

    for ax in axes.flat:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    title = "distillation diagnostics"
    if settings:
        title += (f" — LogR of {settings.get('divergence')} at T={settings.get('temperature')}, "
                  f"eta={settings.get('eta')}")
    fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()
