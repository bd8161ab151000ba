"""The ABKD paper's toy figure (Fig. 1 d-g) as a command: fit a student distribution to a fixed teacher.

``python -m abkd_vision.viz.toy`` builds a teacher distribution p over C classes, then for each objective fits a
student q = softmax(f) by plain gradient descent on its logits f, minimising D(p‖q) with this repository's
divergences (:func:`~abkd_vision.losses.build_divergence`, i.e. :func:`~abkd_vision.losses.alpha_beta_divergence`):
forward KL (α=1, β=0), reverse KL (α=0, β=1), the α-divergence (β = 1 - α) and any number of α-β pairs. It draws
one panel per objective in the manner of the paper's Fig. 1(d)-(g): the teacher's and the fitted student's
probability per class, classes sorted by the teacher's probability (largest first; the "target" class is the
teacher's top class), and below it where the mass went, q(y) - p(y) (over-estimated classes red, under-estimated
blue). It prints, per objective, the final value of the objective, FKL(p‖q), the student's entropy against the
teacher's, the student's mass on the teacher's top class and whether the student's top class is the teacher's.

The student is one free logit per class (C parameters), started from ``--init`` (``random``: N(0, 1) logits by the
seed, the default; ``uniform``: all 0). Every divergence here is minimised exactly at q = p, so with enough steps
every objective recovers the teacher (a test checks it); what differs is where each one moves the mass on the way,
the paper's hardness- and confidence-concentration, which a small ``--steps`` shows. From a random start, after a
few steps, reverse KL is sharper than the teacher (lower entropy, more mass on the teacher's top class: mode
seeking, "the large mass gets larger") while forward KL is still flatter than the teacher (mass-covering); the
α-divergence and the α-β-divergences lie in between, by their (α, β).

Teachers (``--teacher-shape``, logits z divided by ``--teacher-temperature``): ``peaked`` (one dominant class, the
rest decaying linearly in logit), ``longtail`` (Zipf: z_y = -1.5 log(y + 1)), ``bimodal`` (two Gaussian bumps of
different heights over the class index), ``random`` (z ~ N(0, 2²) by the seed).

Examples::

    python -m abkd_vision.viz.toy --out toy.png
    python -m abkd_vision.viz.toy --teacher-shape bimodal --classes 20 --steps 30 --out bimodal.png
    python -m abkd_vision.viz.toy --alpha 0.8 0.5 0.3 --beta 0.3 0.5 0.7 --steps 100
"""

from __future__ import annotations

import argparse
import io
import math
import sys
from dataclasses import dataclass, field

import torch
from torch import Tensor

from abkd_vision.commands import command_prog
from abkd_vision.io import atomic_write
from abkd_vision.losses import Divergence, build_divergence

__all__ = ["Fit", "TEACHER_SHAPES", "teacher_distribution", "objectives", "fit_student", "summarize",
           "plot_fits", "main"]

TEACHER_SHAPES = ("peaked", "longtail", "bimodal", "random")
INITS = ("uniform", "random")


def _check_classes(classes) -> int:
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 2:
        raise ValueError(f"--classes must be an integer >= 2, got {classes!r}")
    return classes


def _check_real(name: str, value, positive: bool = False) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def teacher_logits(shape: str, classes: int, seed: int = 0) -> Tensor:
    """Teacher logits (float64) of a shape family, before the temperature."""
    classes = _check_classes(classes)
    y = torch.arange(classes, dtype=torch.float64)
    if shape == "peaked":
        z = -3.0 * y / (classes - 1)
        z[0] = 2.5
    elif shape == "longtail":
        z = -1.5 * torch.log(y + 1.0)
    elif shape == "bimodal":
        # log of a mixture 0.6 N(C/4, w) + 0.4 N(3C/4, w) over the class index, plus a small floor
        width = max(classes / 14.0, 0.6)
        m1, m2 = (classes - 1) * 0.25, (classes - 1) * 0.75
        bumps = 0.6 * torch.exp(-((y - m1) ** 2) / (2 * width**2)) + 0.4 * torch.exp(-((y - m2) ** 2) / (2 * width**2))
        z = torch.log(bumps + 1e-3)
    elif shape == "random":
        z = 2.0 * torch.randn(classes, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    else:
        raise ValueError(f"unknown --teacher-shape {shape!r}; choose one of {', '.join(TEACHER_SHAPES)}")
    return z


def teacher_distribution(shape: str = "peaked", classes: int = 10, temperature: float = 1.0, seed: int = 0) -> Tensor:
    """The teacher's probabilities p = softmax(z / temperature), float64 [C]."""
    temperature = _check_real("--teacher-temperature", temperature, positive=True)
    return (teacher_logits(shape, classes, seed) / temperature).softmax(-1)


def objectives(alphas: list[float] | None = None, betas: list[float] | None = None,
               alpha_divergence: float | None = 0.5) -> list[tuple[str, Divergence]]:
    """(label, divergence) for FKL, RKL, the α-divergence (α, 1 - α) and each α-β pair, all built by
    :func:`build_divergence` (the repository's α-β-divergence)."""
    alphas = [0.8] if alphas is None else list(alphas)
    betas = [0.3] if betas is None else list(betas)
    if len(alphas) != len(betas):
        raise ValueError(f"--alpha and --beta must have the same number of values, got {len(alphas)} alphas "
                         f"{alphas} and {len(betas)} betas {betas}")
    out: list[tuple[str, Divergence]] = [("FKL (α=1, β=0)", build_divergence("fkl")),
                                         ("RKL (α=0, β=1)", build_divergence("rkl"))]
    if alpha_divergence is not None:
        a = _check_real("--alpha-divergence", alpha_divergence)
        out.append((f"α-divergence (α={a:g}, β={1 - a:g})", build_divergence("alpha", alpha=a)))
    for a, b in zip(alphas, betas):
        a, b = _check_real("--alpha", a), _check_real("--beta", b)
        out.append((f"AB (α={a:g}, β={b:g})", build_divergence("ab", alpha=a, beta=b)))
    return out


@dataclass
class Fit:
    """One fitted student: its distribution before and after, and the objective along the way."""

    label: str
    teacher: Tensor
    initial: Tensor
    student: Tensor
    losses: list[float] = field(default_factory=list)


def _initial_logits(init: str, classes: int, seed: int) -> Tensor:
    if init == "uniform":
        return torch.zeros(classes, dtype=torch.float64)
    if init == "random":
        return torch.randn(classes, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    raise ValueError(f"unknown --init {init!r}; choose one of {', '.join(INITS)}")


def fit_student(teacher: Tensor, divergence: Divergence, steps: int = 30, lr: float = 0.5, init: str = "random",
                seed: int = 0, label: str = "") -> Fit:
    """Minimise ``divergence(log p, log q)`` over the student's logits by ``steps`` plain gradient-descent
    steps of size ``lr`` (float64). Returns the initial and final student distributions and the loss per step
    (the last entry is the objective at the returned student)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"--steps must be an integer >= 0, got {steps!r}")
    lr = _check_real("--lr", lr, positive=True)
    teacher = teacher.detach().to(torch.float64)
    classes = _check_classes(teacher.shape[-1])
    log_p = teacher.log()
    logits = _initial_logits(init, classes, seed).requires_grad_(True)
    with torch.no_grad():
        initial = logits.softmax(-1)
    losses = []
    for _ in range(steps):
        loss = divergence(log_p, logits.log_softmax(-1))
        (grad,) = torch.autograd.grad(loss, logits)
        losses.append(float(loss.detach()))
        with torch.no_grad():
            logits -= lr * grad
    with torch.no_grad():
        log_q = logits.log_softmax(-1)
        losses.append(float(divergence(log_p, log_q)))
    return Fit(label, teacher, initial, log_q.exp(), losses)


def entropy(probs: Tensor) -> float:
    """Shannon entropy in nats (0 log 0 = 0)."""
    return float(-(probs * probs.log()).nan_to_num().sum())


def summarize(fit: Fit) -> dict:
    """Numbers for one fit: objective, FKL(p‖q), entropies, mass on the teacher's top class, top-1 agreement."""
    p, q = fit.teacher, fit.student
    top = int(p.argmax())
    return {
        "objective": fit.label,
        "final_divergence": fit.losses[-1],
        "fkl": float(build_divergence("fkl")(p.log(), q.log())),
        "student_entropy": entropy(q),
        "teacher_entropy": entropy(p),
        "student_top_mass": float(q[top]),
        "teacher_top_mass": float(p[top]),
        "same_top1": int(q.argmax()) == top,
        "total_variation": float(0.5 * (p - q).abs().sum()),
    }


def plot_fits(fits: list[Fit], sort: bool = True, title: str = "") -> bytes:
    """PNG bytes: one column per objective; top, teacher vs fitted student per class (sorted by the teacher's
    probability when ``sort``); bottom, q - p per class (red: over-estimated, blue: under-estimated)."""
    from matplotlib.figure import Figure

    n = len(fits)
    classes = fits[0].teacher.numel()
    fig = Figure(figsize=(max(3.6 * n, 7), 6.2), layout="constrained")
    axes = fig.subplots(2, n, squeeze=False, sharex="col", gridspec_kw={"height_ratios": [2.2, 1]})
    order = torch.argsort(fits[0].teacher, descending=True) if sort else torch.arange(classes)
    x = torch.arange(classes).numpy()
    width = 0.42
    ymax = max(max(float(f.teacher.max()), float(f.student.max())) for f in fits) * 1.12
    dmax = max(float((f.student - f.teacher).abs().max()) for f in fits) * 1.15 or 1.0
    for j, f in enumerate(fits):
        p, q, q0 = f.teacher[order].numpy(), f.student[order].numpy(), f.initial[order].numpy()
        s = summarize(f)
        ax = axes[0, j]
        ax.bar(x - width / 2, p, width, color="0.55", label="teacher p")
        ax.bar(x + width / 2, q, width, color="tab:orange", label="student q (fitted)")
        ax.step(x, q0, where="mid", color="tab:green", linestyle=":", linewidth=1.2, label="student at start")
        ax.set_ylim(0, ymax)
        ax.set_title(f.label, fontsize=10)
        ax.text(0.97, 0.96,
                f"H(q) {s['student_entropy']:.2f} vs H(p) {s['teacher_entropy']:.2f}\n"
                f"q(top) {s['student_top_mass']:.2f} vs p(top) {s['teacher_top_mass']:.2f}\n"
                f"top-1 {'matches' if s['same_top1'] else 'WRONG'}; TV {s['total_variation']:.3f}",
                transform=ax.transAxes, ha="right", va="top", fontsize=8,
                bbox=dict(boxstyle="round", facecolor="white", alpha=0.85, edgecolor="0.8"))
        if j == 0:
            ax.set_ylabel("probability")
            ax.legend(fontsize=7, loc="center right")
        d = q - p
        ax = axes[1, j]
        ax.bar(x, d, 0.8, color=["tab:red" if v > 0 else "tab:blue" for v in d])
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.set_ylim(-dmax, dmax)
        labelled = classes <= 12
        ax.set_xlabel(("class, sorted by teacher probability" if labelled else "rank by teacher probability")
                      if sort else "class index")
        if j == 0:
            ax.set_ylabel("q - p  (red: over, blue: under)")
        if labelled:
            ax.set_xticks(x)
            ax.set_xticklabels([str(int(c)) for c in order], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=command_prog("python -m abkd_vision.viz.toy"),
        description="Fit a student distribution to a fixed teacher under FKL, RKL, the alpha-divergence and "
                    "alpha-beta divergences (the ABKD paper's Fig. 1 d-g), print summary numbers and save the panels.")
    parser.add_argument("--classes", type=int, default=10, help="number of classes C >= 2 (default 10)")
    parser.add_argument("--teacher-shape", default="peaked", help=f"one of {', '.join(TEACHER_SHAPES)}")
    parser.add_argument("--teacher-temperature", type=float, default=1.0, help="p = softmax(z / T) (default 1)")
    parser.add_argument("--alpha", type=float, nargs="+", action="extend", default=None,
                        help="alpha of each AB panel (repeatable or a list; paired with --beta; default 0.8)")
    parser.add_argument("--beta", type=float, nargs="+", action="extend", default=None,
                        help="beta of each AB panel (default 0.3)")
    parser.add_argument("--alpha-divergence", type=float, default=0.5,
                        help="alpha of the alpha-divergence panel (beta = 1 - alpha; default 0.5)")
    parser.add_argument("--init", default="random", help=f"student start: one of {', '.join(INITS)} (default random)")
    parser.add_argument("--steps", type=int, default=30, help="gradient-descent steps (default 30)")
    parser.add_argument("--lr", type=float, default=0.5, help="step size (default 0.5)")
    parser.add_argument("--seed", type=int, default=0, help="for --init random and --teacher-shape random")
    parser.add_argument("--out", default="toy.png", help="PNG to write (default toy.png)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        p = teacher_distribution(args.teacher_shape, args.classes, args.teacher_temperature, args.seed)
        fits = [fit_student(p, div, args.steps, args.lr, args.init, args.seed, label)
                for label, div in objectives(args.alpha, args.beta, args.alpha_divergence)]
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"teacher: {args.teacher_shape}, C={args.classes}, T={args.teacher_temperature:g}; student: free logits "
          f"from {args.init}; {args.steps} steps of lr {args.lr:g}")
    header = f"{'objective':<28} {'final D':>9} {'FKL(p|q)':>9} {'H(q)':>6} {'H(p)':>6} {'q(top)':>7} " \
             f"{'p(top)':>7} {'top-1':>6} {'TV':>6}"
    print(header)
    for f in fits:
        s = summarize(f)
        print(f"{f.label:<28} {s['final_divergence']:>9.4f} {s['fkl']:>9.4f} {s['student_entropy']:>6.3f} "
              f"{s['teacher_entropy']:>6.3f} {s['student_top_mass']:>7.3f} {s['teacher_top_mass']:>7.3f} "
              f"{'same' if s['same_top1'] else 'WRONG':>6} {s['total_variation']:>6.3f}")
    title = (f"teacher '{args.teacher_shape}' over {args.classes} classes (T={args.teacher_temperature:g}); "
             f"student from {args.init}, {args.steps} gradient steps of lr {args.lr:g}")
    try:
        png = plot_fits(fits, title=title)
        path = atomic_write(args.out, png)
    except OSError as err:
        print(f"error: cannot write --out {args.out}: {err}", file=sys.stderr)
        return 1
    print(f"figure written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
