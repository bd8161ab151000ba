"""A GPU check in one command (under 10 minutes on one CUDA GPU): speed, synchronisations, memory, a real KD run.

    python benchmarks/gpu_check.py                                  # figures only
    python benchmarks/gpu_check.py --data path/to/images.npz        # ... and a short teacher -> student KD run
    python benchmarks/gpu_check.py --data path/to/imagefolder --epochs 5

On a CUDA machine it measures, on the first GPU:

* ``student_img_s`` / ``kd_cached_img_s``: a student CE step and the suite's KD step (``KD(T=4)`` head + CE) with
  the teacher's logits already on the device (a warm teacher-logit cache), resnet8x4 on 32x32 images, batch
  ``--batch-size``, bf16 autocast and channels_last (the ``configs/cifar100/fast.yaml`` settings);
* ``syncs_in_50_kd_steps``: host-device synchronisations over 50 such steps, counted with
  ``torch.cuda.set_sync_debug_mode("warn")`` (expected 0);
* ``peak_memory_mb``: the peak memory allocated during those steps;
* with ``--data``: a teacher (resnet20, CE) and then a KD student (resnet8) trained through ``run.py`` with the
  device data path, the cache, bf16-mixed and channels_last, printing each epoch's validation accuracy and the
  mean wall time per epoch of each run. ``--data`` is an ImageFolder root (``train/<class>/``, ``test/<class>/``)
  or an ``.npz`` with ``x_train [N, H, W, 3] uint8``, ``y_train [N]``, ``x_test``, ``y_test`` (written out as an
  ImageFolder tree first).

Without a GPU it says so, prints the CPU figures of ``benchmarks/throughput.py --quick`` and exits 0. The last line
printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from abkd_vision.heads import KD  # noqa: E402
from abkd_vision.models import create_model  # noqa: E402


def cpu_figures() -> dict:
    """The CPU throughput figures (``benchmarks/throughput.py --quick``), its JSON last line."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--quick"], cwd=ROOT,
                         capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": out.stderr[-2000:]}


def kd_steps(device: torch.device, batch_size: int, steps: int, cached: bool) -> tuple[float, int]:
    """Images/s of ``steps`` timed training steps (after 5 warm-up steps), and the synchronisations counted in
    them. ``cached``: the KD step with teacher logits already on the device; else a student-only CE step."""
    torch.manual_seed(0)
    student = create_model("resnet8x4", num_classes=100).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    head = KD(temperature=4.0)
    images = torch.randn(batch_size, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 100, (batch_size,), device=device)
    teacher_logits = torch.randn(batch_size, 100, device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = student(images)
        loss = F.cross_entropy(logits.float(), target)
        if cached:
            loss = 0.1 * loss + 0.9 * head(logits, teacher_logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(5):
        step()
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start = time.perf_counter()
            for _ in range(steps):
                step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    syncs = sum("synchroniz" in str(w.message).lower() for w in caught)
    return steps * batch_size / elapsed, syncs


def npz_to_image_folder(path: Path, out: Path) -> Path:
    """Write an ``.npz`` of uint8 images as ``out/{train,test}/<label>/<i>.png``; returns ``out``."""
    from PIL import Image

    arrays = dict(__import__("numpy").load(path))
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
    if missing:
        raise SystemExit(f"{path} lacks {missing}: it needs x_train [N, H, W, 3] uint8, y_train [N], x_test, y_test")
    for split in ("train", "test"):
        for i, (image, label) in enumerate(zip(arrays[f"x_{split}"], arrays[f"y_{split}"])):
            folder = out / split / f"{int(label):04d}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i}.png")
    return out


def fit(args: list[str], log: Path) -> float:
    """Run ``run.py fit`` with ``args``; the wall time in seconds. Exits with the run's output on failure."""
    start = time.perf_counter()
    with log.open("w") as handle:
        done = subprocess.run([sys.executable, str(ROOT / "run.py"), "fit", *args], cwd=ROOT, stdout=handle,
                              stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"run.py fit failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - start


def val_accuracy(run_dir: Path) -> list[float]:
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    return [round(100 * float(r["val/acc1"]), 2) for r in rows if r.get("val/acc1")]


def kd_run(data: Path, out: Path, epochs: int) -> dict:
    """A teacher then a KD student on ``data`` with the GPU-speed settings; accuracy per epoch, time per epoch."""
    if data.suffix == ".npz":
        data = npz_to_image_folder(data, out / "images")
    common = ["--data", "abkd_vision.data.ImageFolderDataModule", "--data.init_args.root", str(data),
              "--data.init_args.image_size", "32", "--data.init_args.on_device", "true",
              "--trainer.max_epochs", str(epochs), "--trainer.precision", "bf16-mixed",
              "--trainer.enable_progress_bar", "false", "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
              "--trainer.logger.init_args.save_dir", str(out), "--seed_everything", "0"]
    teacher_time = fit([*common, "--model", "abkd_vision.lit.ClassifierModule", "--model.init_args.model", "resnet20",
                        "--model.init_args.channels_last", "true", "--trainer.logger.init_args.name", "teacher"],
                       out / "teacher.log")
    teacher_dir = out / "teacher" / "version_0"
    student_time = fit([*common, "--model", "abkd_vision.lit.DistillationModule", "--model.init_args.student",
                        "resnet8", "--model.init_args.teacher", "resnet20", "--model.init_args.teacher_ckpt",
                        str(teacher_dir / "checkpoints" / "last.ckpt"), "--model.init_args.teacher_cache",
                        str(out / "cache"), "--model.init_args.channels_last", "true",
                        "--model.init_args.ce_weight", "0.1", "--model.init_args.kd_weight", "0.9",
                        "--trainer.logger.init_args.name", "student"], out / "student.log")
    return {"teacher_val_acc1_per_epoch": val_accuracy(teacher_dir),
            "student_val_acc1_per_epoch": val_accuracy(out / "student" / "version_0"),
            "teacher_s_per_epoch": round(teacher_time / epochs, 1),
            "student_s_per_epoch": round(student_time / epochs, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="ImageFolder root or .npz for the KD run")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each run of the KD run")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_check")
    args = parser.parse_args()
    report: dict = {"cuda": torch.cuda.is_available(), "torch": torch.__version__}
    if not torch.cuda.is_available():
        print("no CUDA device here: the GPU figures need one; the CPU figures of benchmarks/throughput.py follow")
        report["cpu"] = cpu_figures()
        print(json.dumps(report))
        return 0
    device = torch.device("cuda", 0)
    report["gpu"] = torch.cuda.get_device_name(device)
    report["student_img_s"], _ = kd_steps(device, args.batch_size, args.steps, cached=False)
    torch.cuda.reset_peak_memory_stats(device)
    report["kd_cached_img_s"], report["syncs_in_50_kd_steps"] = kd_steps(device, args.batch_size, 50, cached=True)
    report["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    report = {k: round(v, 1) if isinstance(v, float) else v for k, v in report.items()}
    print(f"{report['gpu']}: student {report['student_img_s']} img/s, KD with cached logits "
          f"{report['kd_cached_img_s']} img/s, {report['syncs_in_50_kd_steps']} synchronisations in 50 KD steps, "
          f"peak memory {report['peak_memory_mb']} MB")
    if args.data is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        report["kd_run"] = kd_run(args.data, args.out, args.epochs)
        for name in ("teacher", "student"):
            print(f"{name}: val top-1 per epoch {report['kd_run'][f'{name}_val_acc1_per_epoch']}, "
                  f"{report['kd_run'][f'{name}_s_per_epoch']} s per epoch")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
