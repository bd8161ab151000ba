"""Prompt-distillation step time with the teacher's text features cached vs recomputed every step, and with the
teacher's image logits cached too (``--image-logits``).

    python benchmarks/bench_text_cache.py                        # the paper's pair, 100 classes, batch 8
    python benchmarks/bench_text_cache.py --image-logits        # also the warm image-logit cache
    python benchmarks/bench_text_cache.py --depth 3 --teacher abkd-tiny-vit-large-quickgelu \\
        --student abkd-tiny-vit-quickgelu                       # the tiny test models

Random weights (the cost does not depend on them). One training step = teacher logits (no grad) + student forward
and backward + SGD step; "recomputed" also runs the teacher's prompted text tower over all classes, as the
reference code does on every step. Prints the median step time of both and their ratio, measured in one run.
With ``--image-logits`` a third mode reads the teacher's logits from a warm teacher-logit cache (what every run
after the first one of a sweep with ``teacher_logit_cache`` does): no teacher forward at all.
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
    parser.add_argument("--image-logits", action="store_true", help="also time steps with cached image logits")
    parser.add_argument("--skip-recomputed", action="store_true", help="do not time the recomputed-text mode")
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

    warm: dict = {}

    def step(mode: str) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            text = teacher.encode_text(names) if mode == "recomputed" else cache.get(teacher, names)
            if mode == "image_logits" and "logits" in warm:
                teacher_logits = warm["logits"].clone()  # a warm cache row read (fp16 in the real cache)
            else:
                teacher_logits = teacher(images, text)
                warm["logits"] = teacher_logits.half().float()
        loss = head(student(images, text), teacher_logits, torch.zeros(args.batch, dtype=torch.long))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    modes = ["text_cached"] + ([] if args.skip_recomputed else ["recomputed"]) + \
        (["image_logits"] if args.image_logits else [])
    results: dict[str, list[float]] = {}
    for _ in range(2):  # interleaved, so every mode sees the same machine load
        for mode in modes:
            times = [step(mode) for _ in range(args.steps)]
            results.setdefault(mode, []).extend(times[1:] if mode != "recomputed" else times)  # first: fills
    med = {mode: statistics.median(t) for mode, t in results.items()}
    line = (f"{args.teacher} -> {args.student}, {args.classes} classes, batch {args.batch}, "
            f"{torch.get_num_threads()} threads: step {med['text_cached']:.2f} s with cached text features")
    if "recomputed" in med:
        line += (f", {med['recomputed']:.2f} s recomputing them every step: "
                 f"{med['recomputed'] / med['text_cached']:.2f}x (text tower runs: {cache.computed})")
    if "image_logits" in med:
        line += (f"; {med['image_logits']:.2f} s with the image logits cached too: "
                 f"{med['text_cached'] / med['image_logits']:.2f}x faster than text-cached")
    print(line)


if __name__ == "__main__":
    main()
