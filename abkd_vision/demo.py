"""Offline end-to-end demo: train a teacher, then distill students (CE only, KD, ABKD) on real digits.

``make demo`` (or ``python -m abkd_vision.demo``) exports scikit-learn's digits as an ImageFolder tree,
then runs the real CLI (``abkd_vision.cli.main``) with the configs in ``configs/demo/``: the same
modules, heads and data code as a CIFAR-100 run. It prints a results table and writes it as Markdown too
(``runs/demo/results.md``: the same table, with the date, the machine and the elapsed time, ready to paste into the
README), with ``results.json`` and a plot (``results.png``).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import shutil
import time
from pathlib import Path

from abkd_vision.cli import main as cli_main
from abkd_vision.cli import quiet_lightning
from abkd_vision.commands import command_prog
from abkd_vision.data import export_digits
from abkd_vision.io import atomic_write

REPO = Path(__file__).resolve().parents[1]
STUDENTS = ("ce", "kd", "abkd")
# the rows of results.md, as the README's demo table names them (the settings are those of configs/demo/)
LABELS = {"teacher": "teacher resnet20", "ce": "student resnet8, CE only",
          "kd": "student resnet8, KD (T=4, CE 0.1 + KD 0.9)",
          "abkd": "student resnet8, ABKD (α=0.8, β=0.3, CE 1 + KD 2)"}


def _run(config_dir: Path, name: str, out: Path, epochs: int | None, extra: list[str]) -> dict:
    layers = ["base", "teacher"] if name == "teacher" else ["base", name, "student"]
    configs = [arg for layer in layers for arg in ("--config", str(config_dir / f"{layer}.yaml"))]
    args = ["fit", *configs,
            "--trainer.logger.init_args.save_dir", str(out), "--data.init_args.root", str(out / "digits"),
            "--trainer.logger.init_args.version", "0", *extra]
    if epochs is not None:
        args += ["--trainer.max_epochs", str(epochs)]
    start = time.perf_counter()
    cli_main(args)
    run_dir = out / name / "version_0"
    results = json.loads((run_dir / "results.json").read_text())
    results["seconds"] = time.perf_counter() - start
    results["curve"] = _val_curve(run_dir / "metrics.csv")
    return results


def _val_curve(metrics_csv: Path) -> list[float]:
    with metrics_csv.open() as f:
        return [float(row["val/acc1"]) for row in csv.DictReader(f) if row.get("val/acc1")]


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = list(results)
    colors = {name: f"C{i}" for i, name in enumerate(names)}  # the same colour per run in both panels
    left.bar(names, [100 * results[n]["val_acc1_best"] for n in names], color=[colors[n] for n in names])
    lowest = min(100 * results[n]["val_acc1_best"] for n in names)
    left.set_ylim(max(0.0, lowest - 5), 100)
    left.set_ylabel("best test top-1 (%)")
    left.set_title("digits: resnet20 teacher -> resnet8 student")
    for name in names:
        curve = [100 * v for v in results[name]["curve"]]
        right.plot(range(1, len(curve) + 1), curve, label=name, color=colors[name])
    right.set_xlabel("epoch")
    right.set_ylabel("test top-1 (%)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def machine() -> str:
    """The machine a table was measured on: usable CPU cores, the device, torch's version and thread count."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return (f"{cores} CPU cores ({platform.system()} {platform.machine()}), {device}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads)")


def results_markdown(results: dict, elapsed: float, measured_on: str, when: datetime.datetime | None = None,
                     epochs: int | None = None) -> str:
    """The table ``main`` prints, as Markdown (``runs/demo/results.md``), headed by the date, the machine and the
    elapsed time of the whole demo (data export and every run, after the install).

    ``results`` maps run names to their ``results.json`` (plus ``seconds``), as ``main`` collects them;
    ``epochs`` is the ``--epochs`` override, if one was given (the table then is not the demo's own).
    """
    when = when or datetime.datetime.now().astimezone()
    override = "" if epochs is None else f"; every run's max_epochs set to {epochs}"
    lines = ["# `make demo` results", "",
             f"Measured {when:%Y-%m-%d %H:%M %Z} on {measured_on}, in {_duration(elapsed)} (the data export and "
             f"every run, after the install{override}).", "",
             "| run | train images | best test top-1 (epoch) | last test top-1 | teacher top-1 at start | seconds |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        images = (r.get("protocol") or {}).get("train_images")
        teacher = r.get("teacher_val_acc1")
        lines.append(f"| {LABELS.get(name, name)} | {'' if images is None else f'{images:,}'} | "
                     f"{100 * r['val_acc1_best']:.2f}% ({r['best_epoch']}) | {100 * r['val_acc1_last']:.2f}% | "
                     f"{'' if teacher is None else f'{100 * teacher:.2f}%'} | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog=command_prog("python -m abkd_vision.demo"),
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    parser.add_argument("--config-dir", type=Path, default=REPO / "configs" / "demo")
    parser.add_argument("--epochs", type=int, default=None, help="override max_epochs of every run")
    parser.add_argument("--accelerator", default="auto")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    quiet_lightning()

    out = args.out.resolve()
    for name in ("teacher", *STUDENTS):  # rerunning starts clean instead of appending version_1, ...
        shutil.rmtree(out / name, ignore_errors=True)
    export_digits(out / "digits", overwrite=True)
    extra = ["--trainer.accelerator", args.accelerator]

    results = {"teacher": _run(args.config_dir, "teacher", out, args.epochs, extra)}
    teacher_ckpt = out / "teacher" / "version_0" / "checkpoints" / "last.ckpt"
    for name in STUDENTS:
        student_extra = list(extra)
        if name != "ce":
            student_extra += ["--model.init_args.teacher_ckpt", str(teacher_ckpt)]
        results[name] = _run(args.config_dir, name, out, args.epochs, student_extra)

    print("\nrun       best top-1  (epoch)  last top-1  teacher top-1  seconds")
    for name, r in results.items():
        teacher = r.get("teacher_val_acc1")
        print(f"{name:8s}  {100 * r['val_acc1_best']:9.2f}%  ({r['best_epoch']:5d})  {100 * r['val_acc1_last']:9.2f}%  "
              f"{'' if teacher is None else f'{100 * teacher:12.2f}%':>13s}  {r['seconds']:7.1f}")
    elapsed = time.perf_counter() - started
    print(f"\n{_duration(elapsed)} in all, on {machine()}")
    plot = out / "results.png"
    _plot(results, plot)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = atomic_write(out / "results.md", results_markdown(results, elapsed, machine(), epochs=args.epochs))
    print(f"\ntable (Markdown): {table}\nplot: {plot}\nper-run logs, configs and checkpoints: {out}/<run>/version_0/")
    return results


if __name__ == "__main__":
    main()
