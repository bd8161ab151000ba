"""Prompt-distillation step time with the teacher's text features cached vs recomputed every step.

    python benchmarks/bench_text_cache.py                        # the paper's pair, 100 classes, batch 8
    python benchmarks/bench_text_cache.py --teacher abkd-tiny-vit-large-quickgelu --student abkd-tiny-vit-quickgelu

Random weights (the cost does not depend on them). One training step = teacher logits (no grad) + student forward
and backward + SGD step; "recomputed" also runs the teacher's prompted text tower over all classes, as the
reference code does on every step. Prints the median step time of both and their ratio, measured in one run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from abkd_vision.heads import KD
from abkd_vision.models.clip import PromptedCLIP, PromptedImageStudent, TextFeatureCache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="ViT-L-14-quickgelu")
    parser.add_argument("--student", default="ViT-B-16-quickgelu")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--depth", type=int, default=9)
    args = parser.parse_args()
    torch.manual_seed(0)
    teacher = PromptedCLIP(args.teacher, None, text_depth=args.depth, vision_depth=args.depth).requires_grad_(False)
    student = PromptedImageStudent(args.student, None, teacher.embed_dim, vision_depth=args.depth)
    size = teacher.clip.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    names = [f"class number {i}" for i in range(args.classes)]
    images = torch.randn(args.batch, 3, size, size)
    optimizer = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.005, momentum=0.9)
    head, cache = KD(temperature=1.0), TextFeatureCache()

    def step(cached: bool) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            text = cache.get(teacher, names) if cached else teacher.encode_text(names)
            teacher_logits = teacher(images, text)
        loss = head(student(images, text), teacher_logits, torch.zeros(args.batch, dtype=torch.long))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    results = {}
    for cached in (True, False, True, False):  # interleaved, so both see the same machine load
        times = [step(cached) for _ in range(args.steps)]
        results.setdefault(cached, []).extend(times[1:] if cached else times)  # the first cached step fills it
    cached_s, live_s = statistics.median(results[True]), statistics.median(results[False])
    print(f"{args.teacher} -> {args.student}, {args.classes} classes, batch {args.batch}, "
          f"{torch.get_num_threads()} threads: step {cached_s:.2f} s with cached text features, "
          f"{live_s:.2f} s recomputing them every step: {live_s / cached_s:.2f}x (text tower runs: {cache.computed})")


if __name__ == "__main__":
    main()
