"""Steps/s of a KD training step with the live teacher against the same step reading a full teacher-logit cache.

Run: ``python benchmarks/bench_teacher_cache.py`` (resnet32x4 -> resnet8x4, CIFAR-100 shapes, batch 64,
2 CPU threads). The step is ``DistillationModule``'s: teacher logits (``FrozenTeacher``), student forward,
CE + KD(T=4), backward, SGD step. Three modes, all measured in this one run on the same batches:

* live: ``teacher(images)``, the network runs (what a run without the cache does);
* fill: ``teacher(images, index, view)`` on a cache where no view is filled yet: the network runs on every
  sample and the rows are written (msync) to the cache (a run's first epoch with an empty cache);
* hit: the same call once those views are filled: no teacher forward, the rows are read from the memory map.

Fill, live and hit steps are timed in alternating blocks (other load on the machine hits all alike); the medians and
the ratio hit/live in steps/s are printed. The cache holds ``--images`` images x 162 views x 100 classes in
float16, in a temporary folder.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from abkd_vision.data.transforms import CropFlipViews
from abkd_vision.heads import KD
from abkd_vision.lit.distillation import FrozenTeacher
from abkd_vision.models import create_model
from abkd_vision.teacher_cache import TeacherLogitCache, cache_key, sha256_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="resnet32x4")
    parser.add_argument("--student", default="resnet8x4")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=4, help="alternating live/hit blocks")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per block")
    parser.add_argument("--images", type=int, default=50_000, help="images in the cache (CIFAR-100: 50,000)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    num_classes, bs = 100, args.batch_size
    teacher = FrozenTeacher(create_model(args.teacher, num_classes=num_classes))
    student = create_model(args.student, num_classes=num_classes).train()
    head = KD(temperature=4.0)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    views = CropFlipViews()
    n_batches = args.blocks * args.steps + 2
    batches = [(torch.randn(bs, 3, 32, 32), torch.randint(0, num_classes, (bs,)),
                torch.randperm(args.images)[:bs], torch.randint(0, views.num_views, (bs,))) for _ in range(n_batches)]

    def step(images, target, index=None, view=None) -> float:
        start = time.perf_counter()
        teacher_logits = teacher(images) if index is None else teacher(images, index, view)
        student_logits = student(images)
        loss = F.cross_entropy(student_logits, target) + head(student_logits, teacher_logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    with tempfile.TemporaryDirectory() as folder:
        key = cache_key(teacher=args.teacher, num_classes=num_classes, teacher_sha256=sha256_weights(teacher.model),
                        dataset={"dataset": "benchmark", "split": "train", "num_images": args.images}, views=views)
        teacher.cache = TeacherLogitCache.open(folder, key)
        size_gb = args.images * views.num_views * num_classes * 2 / 1e9
        print(f"{args.teacher} -> {args.student}, batch {bs}, {args.threads} threads, cache {args.images:,} x "
              f"{views.num_views} x {num_classes} float16 ({size_gb:.2f} GB, memory-mapped)")
        for b in batches[:2]:  # warm-up (fills those two batches' views)
            step(b[0], b[1])
            step(*b)
        live, fill, hit = [], [], []
        for block in range(args.blocks):
            chunk = batches[2 + block * args.steps: 2 + (block + 1) * args.steps]
            fill += [step(*b) for b in chunk]  # every view new: teacher forward + cache write
            live += [step(b[0], b[1]) for b in chunk]
            hit += [step(*b) for b in chunk]  # the views just filled: no teacher forward
        assert teacher.cache_misses == n_batches * bs  # every timed hit step was served by the cache
        # the cached logits are the live teacher's within float16 rounding
        b = batches[-1]
        torch.testing.assert_close(teacher(b[0], b[2], b[3]), teacher(b[0]), rtol=2**-11, atol=1e-5)

    med = {name: statistics.median(t) for name, t in (("live", live), ("fill", fill), ("hit", hit))}
    for name in ("live", "fill", "hit"):
        print(f"  {name:5s} median {1000 * med[name]:7.1f} ms/step  {1 / med[name]:6.2f} steps/s  "
              f"({len({'live': live, 'fill': fill, 'hit': hit}[name])} steps)")
    print(f"  speed-up of a full cache over the live teacher: {med['live'] / med['hit']:.2f}x steps/s; "
          f"an empty cache (filling) costs {med['fill'] / med['live']:.2f}x a live step")


if __name__ == "__main__":
    main()
