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

Then, end to end through Lightning, in the same run (CIFAR-100 files of random images in the official layout, or a
real copy with ``--cifar100 ROOT``):

* ``fit_pil`` and ``fit_device``: a real ``Trainer.fit`` of ``DistillationModule`` (same teacher, student and KD
  head) with a warm teacher-logit cache, a fixed number of steps, images/s of the median step after a warm-up (the
  time between two step ends: data, transfer, step, Lightning's hooks and logging); ``pil``
  reads the training data through the host path (PIL transform in the DataLoader, ``--fit-workers`` workers, the
  seeded stream of ``run.py``), ``device`` through ``on_device: true`` (index batches, crop/flip/normalise batched
  on the training device). Both replay the same stream, so the fit that warms the cache (one host-path fit before
  the timed ones) fills exactly the views both read; the hit rate is reported.
* ``data_pil_us_per_img`` and ``data_device_us_per_img``: the data path alone, per image: iterating the host
  path's training loader (PIL, seeded stream, view ids for the cache) against iterating the device path's loader
  and materialising its batches.

The last line printed is one JSON object with every figure and ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from unittest import mock

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
    parser.add_argument("--fit-steps", type=int, default=8, help="timed steps of each Trainer.fit")
    parser.add_argument("--fit-warmup", type=int, default=2, help="untimed first steps of each Trainer.fit")
    parser.add_argument("--fit-workers", type=int, default=0, help="DataLoader workers of the PIL path's fit")
    parser.add_argument("--data-batches", type=int, default=16, help="batches timed per data-path measurement")
    parser.add_argument("--cifar100", default=None, help="a real CIFAR-100 root (default: random images)")
    args = parser.parse_args()
    if args.quick:
        args.blocks, args.steps = 2, 3
        args.fit_steps, args.fit_warmup, args.data_batches = 5, 1, 8
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
        end_to_end = EndToEnd(args)
        times = {name: [] for name in modes}
        for _ in range(args.blocks):
            for name, fn in modes.items():
                times[name] += [timed(lambda b=b, fn=fn: fn(b)) for b in batches]
            end_to_end.block()
    img_s = {name: bs / statistics.median(t) for name, t in times.items()}
    fit = end_to_end.summary()

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
        **fit,
        "fit_device_over_kd_cached": round(fit["fit_device_img_s"] / img_s["kd_cached"], 3),
        "fit_pil_over_kd_cached": round(fit["fit_pil_img_s"] / img_s["kd_cached"], 3),
        "data_device_over_pil_time": round(fit["data_device_us_per_img"] / fit["data_pil_us_per_img"], 4),
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
    print(f"Trainer.fit, warm cache: {fit['fit_pil_img_s']:.1f} images/s with the PIL loader, "
          f"{fit['fit_device_img_s']:.1f} with the device path ({summary['fit_device_over_kd_cached']}x the "
          f"step-only warm-cache KD step); data path per image: PIL {fit['data_pil_us_per_img']:.1f} us, device "
          f"{fit['data_device_us_per_img']:.1f} us ({summary['data_device_over_pil_time']}x)")
    print(json.dumps(summary))


def write_random_cifar100(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Random uint8 images in the official ``cifar-100-python`` pickle layout (torchvision's md5 check of the real
    files does not hold for them: the caller patches it out)."""
    from abkd_vision.data.synthetic import write_fake_cifar100

    return write_fake_cifar100(root, n_train, n_test, seed)


class EndToEnd:
    """The end-to-end figures: ``fit_pil_img_s``, ``fit_device_img_s`` (``Trainer.fit``, warm teacher-logit cache) and
    the data paths' own cost per image, ``data_pil_us_per_img`` and ``data_device_us_per_img``. ``block()`` runs one
    fit and one data measurement per path; ``main`` calls it inside every block of the step modes, so that the load
    of the machine hits the fits and the step modes alike."""

    def __init__(self, args):
        from lightning.pytorch import Callback

        warnings.filterwarnings("ignore")
        for name in ("lightning.pytorch", "lightning.fabric", "abkd_vision"):
            logging.getLogger(name).setLevel(logging.ERROR)
        self.args = args
        self.bs, self.steps, self.warm = args.batch_size, args.fit_steps, max(1, args.fit_warmup)
        self.runs = {"pil": [], "device": []}
        self.costs = {"pil": [], "device": []}
        self.stack = contextlib.ExitStack()
        self.folder = Path(self.stack.enter_context(tempfile.TemporaryDirectory()))
        if args.cifar100 is None:  # random images: their md5 is not the official files'
            self.root = write_random_cifar100(self.folder, self.bs * (self.warm + self.steps), self.bs)
            self.stack.enter_context(mock.patch("torchvision.datasets.cifar.check_integrity",
                                                lambda path, md5=None: Path(path).is_file()))
        else:
            self.root = Path(args.cifar100)
        state = torch.get_rng_state()
        torch.manual_seed(1)
        self.teacher_ckpt = self.folder / "teacher.pth"
        torch.save(create_model(args.teacher, num_classes=100).state_dict(), self.teacher_ckpt)
        torch.set_rng_state(state)

        class StepTimes(Callback):
            def __init__(self):
                self.ends: list[float] = []

            def on_train_batch_end(self, *unused):
                self.ends.append(time.perf_counter())

        self.step_times = StepTimes
        self.fit(False)  # warms the cache with the views of this stream (both paths read the same ones)
        for on_device in (False, True):  # and warms up both data paths
            self.data_cost(on_device)

    def data(self, on_device: bool):
        from abkd_vision.data import CIFAR100DataModule

        d = CIFAR100DataModule(str(self.root), batch_size=self.bs, eval_batch_size=self.bs,
                               num_workers=self.args.fit_workers, on_device=on_device)
        d.exact_resume = True  # run.py's host path (ExactResume): the seeded stream the device path replays
        return d

    def fit(self, on_device: bool) -> tuple[list[float], float]:
        from lightning.pytorch import Trainer, seed_everything

        from abkd_vision.lit import DistillationModule

        seed_everything(0, verbose=False)
        module = DistillationModule(student=self.args.student, teacher=self.args.teacher,
                                    teacher_ckpt=str(self.teacher_ckpt), evaluate_teacher=False,
                                    teacher_cache=str(self.folder / "cache"), channels_last=self.args.channels_last)
        times = self.step_times()
        trainer = Trainer(accelerator="cpu", devices=1, max_steps=self.warm + self.steps, limit_val_batches=0,
                          num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, callbacks=[times])
        trainer.fit(module, datamodule=self.data(on_device))
        hits, misses = module.teacher.cache_hits, module.teacher.cache_misses
        # each interval between two step ends: fetching the batch, moving (and on the device path making) it, the
        # step, Lightning's hooks and logging
        ends = times.ends[self.warm - 1:]
        return [b - a for a, b in zip(ends, ends[1:])], hits / max(1, hits + misses)

    def data_cost(self, on_device: bool) -> float:
        state = torch.get_rng_state()
        torch.manual_seed(0)
        d = self.data(on_device)
        d.setup("fit")
        d.return_views = True  # what the cache path reads: (images, target, index, view)
        loader = d.train_dataloader()

        def epoch() -> int:
            count = 0
            for batch in loader:
                if on_device:
                    batch = batch.to("cpu").materialise(self.args.channels_last)
                count += batch[1].numel()
            return count

        epoch()  # untimed: first-touch costs of a new data module (a run pays them once, not every epoch)
        start, count = time.perf_counter(), 0
        while count < self.args.data_batches * self.bs:
            count += epoch()
        cost = (time.perf_counter() - start) / count * 1e6
        torch.set_rng_state(state)
        return cost

    def block(self) -> None:
        for name in ("pil", "device"):
            self.runs[name].append(self.fit(name == "device"))
            self.costs[name].append(self.data_cost(name == "device"))

    def summary(self) -> dict:
        self.stack.close()

        def img_s(name: str) -> float:  # the median step, like the step modes
            return round(self.bs / statistics.median(t for r in self.runs[name] for t in r[0]), 1)

        return {
            "fit_pil_img_s": img_s("pil"),
            "fit_device_img_s": img_s("device"),
            "fit_cache_hit_rate": round(min(r[1] for rs in self.runs.values() for r in rs), 4),
            "fit_steps": self.steps, "fit_workers": self.args.fit_workers,
            "data_pil_us_per_img": round(statistics.median(self.costs["pil"]), 1),
            "data_device_us_per_img": round(statistics.median(self.costs["device"]), 1),
        }


if __name__ == "__main__":
    main()
