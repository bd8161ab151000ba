"""The toy figure command (python -m abkd_vision.viz.toy): fits, their properties, the PNG and bad options."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from abkd_vision.losses import alpha_beta_divergence, build_divergence
from abkd_vision.viz import toy


def test_teacher_shapes_are_distributions():
    for shape in toy.TEACHER_SHAPES:
        for temperature in (0.5, 1.0, 4.0):
            p = toy.teacher_distribution(shape, 12, temperature, seed=3)
            assert p.shape == (12,) and p.dtype == torch.float64
            assert float(p.sum()) == pytest.approx(1.0, abs=1e-12) and bool((p > 0).all())
    # a higher temperature flattens the teacher
    hot, cold = toy.teacher_distribution("peaked", 10, 4.0), toy.teacher_distribution("peaked", 10)
    assert toy.entropy(hot) > toy.entropy(cold)
    bimodal = toy.teacher_distribution("bimodal", 20)
    peaks = [i for i in range(1, 19) if bimodal[i] > bimodal[i - 1] and bimodal[i] > bimodal[i + 1]]
    assert len(peaks) == 2


def test_objectives_use_the_repository_divergence():
    labels = [label for label, _ in toy.objectives([0.8, 0.5], [0.3, 0.2], alpha_divergence=0.3)]
    assert labels[:3] == ["FKL (α=1, β=0)", "RKL (α=0, β=1)", "α-divergence (α=0.3, β=0.7)"]
    assert labels[3:] == ["AB (α=0.8, β=0.3)", "AB (α=0.5, β=0.2)"]
    p = toy.teacher_distribution("longtail", 10)
    fit = toy.fit_student(p, build_divergence("ab", alpha=0.8, beta=0.3), steps=5)
    # the reported objective is alpha_beta_divergence itself at the returned student
    expected = float(alpha_beta_divergence(p.log(), fit.student.log(), 0.8, 0.3))
    assert fit.losses[-1] == pytest.approx(expected, rel=1e-9)
    assert len(fit.losses) == 6


def test_full_support_fit_recovers_the_teacher():
    # a free logit per class can represent p exactly; every objective here is minimised at q = p
    p = toy.teacher_distribution("peaked", 10)
    fkl = toy.fit_student(p, build_divergence("fkl"), steps=3000, lr=0.5, init="random", seed=0)
    assert float((fkl.student - p).abs().max()) < 2e-5
    assert fkl.losses[-1] < 1e-7  # measured 1.2e-8
    for label, divergence in toy.objectives():
        fit = toy.fit_student(p, divergence, steps=3000, lr=0.5, init="random", seed=0, label=label)
        assert float((fit.student - p).abs().max()) < 2e-4, label


def test_gradient_descent_decreases_every_objective():
    p = toy.teacher_distribution("longtail", 10)
    for seed in range(3):
        for label, divergence in toy.objectives([0.8, 0.2], [0.3, 0.7]):
            losses = toy.fit_student(p, divergence, steps=30, lr=0.5, seed=seed).losses
            assert all(b <= a + 1e-12 for a, b in zip(losses, losses[1:])), (label, seed)


def test_rkl_is_mode_seeking_and_fkl_mass_covering_after_few_steps():
    # The default figure: peaked teacher over 10 classes, random start (seed 0), 30 steps of lr 0.5.
    # Measured: H(q_RKL) 0.637 < H(p) 0.759 < H(q_FKL) 0.824; q(top) 0.873 (RKL) > p(top) 0.835 > 0.825 (FKL).
    p = toy.teacher_distribution("peaked", 10)
    fits = {label.split(" ")[0]: toy.fit_student(p, d, 30, 0.5, "random", 0, label) for label, d in toy.objectives()}
    h = {k: toy.entropy(f.student) for k, f in fits.items()}
    top = int(p.argmax())
    assert h["RKL"] < toy.entropy(p) < h["FKL"]
    assert float(fits["RKL"].student[top]) > float(p[top]) > float(fits["FKL"].student[top])
    # the alpha-divergence (alpha = beta = 0.5) lies between the two extremes
    assert h["RKL"] < h["α-divergence"] < h["FKL"]
    for f in fits.values():
        assert int(f.student.argmax()) == top


def test_rkl_confidence_weighting_keeps_a_low_start_low():
    # Seed 4 starts the student with little mass on the teacher's top class: RKL's logit gradient is weighted by
    # q(y) (confidence-concentration, Prop. 3.1), so it raises that class far more slowly than FKL, whose gradient
    # q - p is unweighted. Measured: q(top) 0.008 at the start, after 30 steps RKL 0.054 vs FKL 0.797
    # (p(top) 0.835); entropy 2.05 (RKL) vs 0.93 (FKL).
    p = toy.teacher_distribution("peaked", 10)
    top = int(p.argmax())
    fkl = toy.fit_student(p, build_divergence("fkl"), 30, 0.5, "random", 4)
    rkl = toy.fit_student(p, build_divergence("rkl"), 30, 0.5, "random", 4)
    assert float(fkl.initial[top]) < 0.05
    assert float(rkl.student[top]) < 0.2 < 0.7 < float(fkl.student[top])
    assert toy.entropy(rkl.student) > toy.entropy(fkl.student)


def test_command_writes_the_png_and_prints_the_summary(tmp_path, capsys):
    out = tmp_path / "figs" / "fig.png"
    rc = toy.main(["--classes", "8", "--teacher-shape", "bimodal", "--teacher-temperature", "2", "--alpha", "0.8",
                   "--beta", "0.3", "--alpha", "0.5", "--beta", "0.1", "--steps", "20", "--lr", "0.3", "--seed", "1",
                   "--out", str(out)])
    assert rc == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    text = capsys.readouterr().out
    for label in ("FKL (α=1, β=0)", "RKL (α=0, β=1)", "α-divergence (α=0.5, β=0.5)", "AB (α=0.8, β=0.3)",
                  "AB (α=0.5, β=0.1)"):
        assert label in text
    assert "figure written to" in text
    assert not list(out.parent.glob(".*.tmp"))  # atomic write leaves no temporary file


def test_module_runs_as_a_command(tmp_path):
    out = tmp_path / "toy.png"
    proc = subprocess.run([sys.executable, "-m", "abkd_vision.viz.toy", "--steps", "5", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(("args", "message"), [
    (["--classes", "1"], "--classes must be an integer >= 2, got 1"),
    (["--alpha", "nan", "--beta", "0.3"], "--alpha must be a finite number, got nan"),
    (["--alpha", "0.8", "--beta", "inf"], "--beta must be a finite number, got inf"),
    (["--alpha", "0.8", "0.5", "--beta", "0.3"], "same number of values"),
    (["--teacher-shape", "spiky"], "unknown --teacher-shape 'spiky'"),
    (["--teacher-temperature", "0"], "--teacher-temperature must be > 0, got 0.0"),
    (["--lr", "-1"], "--lr must be > 0, got -1.0"),
    (["--steps", "-3"], "--steps must be an integer >= 0, got -3"),
    (["--init", "zeros"], "unknown --init 'zeros'"),
    (["--alpha-divergence", "nan"], "--alpha-divergence must be a finite number, got nan"),
])
def test_bad_options_name_the_value(tmp_path, capsys, args, message):
    out = tmp_path / "x.png"
    assert toy.main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error:")
    assert not out.exists()


def test_unwritable_output_is_reported(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert toy.main(["--steps", "1", "--out", str(blocker / "fig.png")]) == 1
    assert "cannot write --out" in capsys.readouterr().err


def test_entropy_of_uniform_is_log_c():
    assert toy.entropy(torch.full((7,), 1 / 7, dtype=torch.float64)) == pytest.approx(math.log(7))
