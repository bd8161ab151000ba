"""Training throughput (images/s) of the suite's KD step against a student-only step and a plain PyTorch loop.

    python benchmarks/throughput.py            # resnet32x4 -> resnet8x4, batch 64, CPU threads as set
    python benchmarks/throughput.py --quick    # fewer steps (about 2 minutes on 2 CPU cores)

Measured in one run, interleaved in blocks so that machine load hits every mode alike:

* ``student``: a student-only CE step (forward, backward, SGD step);
* ``kd_live``: the suite's KD step (``FrozenTeacher`` + ``KD(T=4)`` head + CE) with the live teacher;
* ``kd_cached``: the same step reading every teacher logit from a warm teacher-logit cache (no teacher forward);
* ``teacher_forward``: the teacher's forward alone (no grad);
* ``plain_loop``: the KD step written as plain PyTorch (``F.kl_div`` on the teacher's and student's tempered
  log-softmax, times T^2, plus CE), the loop the reference code bases run;
* ``head_share``: each head's forward + backward time as a fraction of a student step (100 classes);
* with ``--compile``, ``student_compiled`` and ``kd_cached_compiled``: the same steps with ``torch.compile``'d
  student (default inductor backend; compilation happens in the warm-up, outside the timing).

``--channels-last`` runs every mode with NHWC weights and inputs (the modules' ``channels_last`` option).

The last line printed is one JSON object with every figure and ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from abkd_vision.data.transforms import CropFlipViews
from abkd_vision.heads import DKD, KD, LSD, TTM
from abkd_vision.lit.distillation import FrozenTeacher
from abkd_vision.losses import AlphaBetaDivergence
from abkd_vision.models import create_model
from abkd_vision.teacher_cache import TeacherLogitCache, cache_key, sha256_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="resnet32x4")
    parser.add_argument("--student", default="resnet8x4")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 blocks of 3 steps")
    parser.add_argument("--channels-last", action="store_true", help="NHWC weights and inputs in every mode")
    parser.add_argument("--compile", action="store_true", help="also time steps with a torch.compile'd student")
    args = parser.parse_args()
    if args.quick:
        args.blocks, args.steps = 2, 3
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    classes, bs, temperature = 100, args.batch_size, 4.0
    teacher = FrozenTeacher(create_model(args.teacher, num_classes=classes))
    student = create_model(args.student, num_classes=classes).train()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    head = KD(temperature=temperature)
    views = CropFlipViews()
    n_images = 4096
    batches = [(torch.randn(bs, 3, 32, 32), torch.randint(0, classes, (bs,)), torch.randperm(n_images)[:bs],
                torch.randint(0, views.num_views, (bs,))) for _ in range(args.steps)]
    if args.channels_last:
        teacher.to(memory_format=torch.channels_last)
        student.to(memory_format=torch.channels_last)
        batches = [(b[0].contiguous(memory_format=torch.channels_last), *b[1:]) for b in batches]
    compiled = torch.compile(student) if args.compile else None

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def update(loss):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def student_step(b):
        update(F.cross_entropy(student(b[0]), b[1]))

    def kd_step(b, cached: bool, net=student):
        t = teacher(b[0], b[2], b[3]) if cached else teacher(b[0])
        s = net(b[0])
        update(F.cross_entropy(s, b[1]) + head(s, t, b[1]))

    def plain_step(b):
        with torch.no_grad():
            t = teacher.model(b[0])
        s = student(b[0])
        kd = F.kl_div(F.log_softmax(s / temperature, 1), F.log_softmax(t / temperature, 1), reduction="batchmean",
                      log_target=True) * temperature**2
        update(F.cross_entropy(s, b[1]) + kd)

    def teacher_forward(b):
        teacher(b[0])

    modes = {"student": student_step, "kd_live": lambda b: kd_step(b, False),
             "kd_cached": lambda b: kd_step(b, True), "teacher_forward": teacher_forward, "plain_loop": plain_step}
    if compiled is not None:
        modes["student_compiled"] = lambda b: update(F.cross_entropy(compiled(b[0]), b[1]))
        modes["kd_cached_compiled"] = lambda b: kd_step(b, True, compiled)
    with tempfile.TemporaryDirectory() as folder:
        key = cache_key(teacher=args.teacher, num_classes=classes, teacher_sha256=sha256_weights(teacher.model),
                        dataset={"dataset": "benchmark", "split": "train", "num_images": n_images}, views=views)
        teacher.cache = TeacherLogitCache.open(folder, key)
        for b in batches:  # warm the cache for these views, and warm up every mode
            kd_step(b, True)
            for fn in modes.values():
                fn(b)
        times = {name: [] for name in modes}
        for _ in range(args.blocks):
            for name, fn in modes.items():
                times[name] += [timed(lambda b=b, fn=fn: fn(b)) for b in batches]
    img_s = {name: bs / statistics.median(t) for name, t in times.items()}

    # each head's forward + backward on [bs, 100] logits, against the student step
    heads = {"kd": KD(), "abkd": KD(divergence=AlphaBetaDivergence(0.8, 0.3)), "dkd": DKD(),
             "abdkd": DKD(divergence=AlphaBetaDivergence(0.8, 0.3)), "lsd": LSD(), "ttm": TTM()}
    z_t, target = torch.randn(bs, classes), torch.randint(0, classes, (bs,))
    head_share = {}
    for name, h in heads.items():
        ts = []
        for _ in range(30):
            z_s = torch.randn(bs, classes, requires_grad=True)
            ts.append(timed(lambda h=h, z_s=z_s: h(z_s, z_t, target).backward()))
        head_share[name] = round(statistics.median(ts[5:]) / (bs / img_s["student"]), 4)

    summary = {
        "teacher": args.teacher, "student": args.student, "batch_size": bs, "threads": torch.get_num_threads(),
        "channels_last": args.channels_last,
        **{f"{k}_img_s": round(v, 1) for k, v in img_s.items()},
        "kd_cached_over_student_time": round(img_s["student"] / img_s["kd_cached"], 3),
        "kd_live_over_plain_loop_time": round(img_s["plain_loop"] / img_s["kd_live"], 3),
        "kd_live_over_student_time": round(img_s["student"] / img_s["kd_live"], 3),
        "head_share": head_share,
    }
    if compiled is not None:
        summary["compiled_speedup_student"] = round(img_s["student_compiled"] / img_s["student"], 3)
        summary["compiled_speedup_kd_cached"] = round(img_s["kd_cached_compiled"] / img_s["kd_cached"], 3)
    for name, v in img_s.items():
        print(f"{name:16s} {v:8.1f} images/s")
    print(f"KD step with a warm cache: {summary['kd_cached_over_student_time']}x a student-only step; "
          f"the suite's live KD step: {summary['kd_live_over_plain_loop_time']}x the plain PyTorch loop")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
