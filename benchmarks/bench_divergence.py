"""Forward+backward time of the alpha-beta divergence core against a naive probability-space version.

Run: ``make bench`` (or ``python benchmarks/bench_divergence.py``). Prints, for each shape and
(alpha, beta), the median time of both and the ratio naive/ours (> 1 means ours is faster), and
whether either produced NaN/inf where the other did not. Both are measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from abkd_vision.losses import alpha_beta_divergence


def naive_ab(teacher_logits, student_logits, alpha, beta):
    """Eq. 8 general case in probability space (softmax, pow), as most reference code computes it."""
    p, q = teacher_logits.softmax(-1), student_logits.softmax(-1)
    s = alpha + beta
    return (-(p.pow(alpha) * q.pow(beta) - alpha / s * p.pow(s) - beta / s * q.pow(s)) / (alpha * beta)).sum(-1)


def ours(teacher_logits, student_logits, alpha, beta):
    return alpha_beta_divergence(teacher_logits.log_softmax(-1), student_logits.log_softmax(-1), alpha, beta)


def time_fn(fn, zt, zs, alpha, beta, repeats):
    times = []
    for i in range(repeats + 2):
        x = zs.detach().clone().requires_grad_()
        start = time.perf_counter()
        out = fn(zt, x, alpha, beta)
        out.mean().backward()
        elapsed = time.perf_counter() - start
        if i >= 2:  # warm-up
            times.append(elapsed)
    finite = bool(torch.isfinite(out).all() and torch.isfinite(x.grad).all())
    return statistics.median(times), finite


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads, float32, forward+backward, median of {args.repeats}")
    print(f"{'shape':>12} {'alpha,beta':>11} {'naive ms':>9} {'ours ms':>8} {'naive/ours':>10} {'naive finite':>12} "
          f"{'ours finite':>11}")
    worst = float("inf")
    nan_regressions = 0
    for shape in [(64, 100), (8, 1000), (4096, 1000)]:
        repeats = max(3, args.repeats // 4) if shape[0] * shape[1] > 1e6 else args.repeats
        for scale in (4.0, 60.0):  # ordinary logits, and logits wide enough to underflow probabilities
            zt, zs = torch.randn(shape) * scale, torch.randn(shape) * scale
            for alpha, beta in [(0.5, 0.5), (0.8, 0.3), (1.2, -0.2)]:
                t_naive, ok_naive = time_fn(naive_ab, zt, zs, alpha, beta, repeats)
                t_ours, ok_ours = time_fn(ours, zt, zs, alpha, beta, repeats)
                ratio = t_naive / t_ours
                if ok_naive:  # a fair comparison only where the naive version gives a usable answer
                    worst = min(worst, ratio)
                nan_regressions += ok_naive and not ok_ours
                print(f"{str(shape):>12} {f'{alpha},{beta}':>11} {1e3 * t_naive:9.3f} {1e3 * t_ours:8.3f} "
                      f"{ratio:10.2f} {str(ok_naive):>12} {str(ok_ours):>11}   logit scale {scale:g}")
    print(f"slowest ratio naive/ours where naive is finite: {worst:.2f}")
    print(f"cases where ours is non-finite but naive is finite: {nan_regressions}")


if __name__ == "__main__":
    main()
