"""A small real-data study with one command: one teacher, then CE / KD / ABKD at a few (alpha, beta) / DKD /
ABDKD students over several seeds, with the mean ± std table and the entropy diagnostics.

::

    python -m abkd_vision.study                      # ../shared/data/cifar10, 3 seeds, about 30 min on 2 cores
    python -m abkd_vision.study --data my_folder     # any ImageFolder tree with train/ and test/
    python -m abkd_vision.study --arms kd abkd:0.5,0.5 --seeds 0 1 --epochs 5
    python -m abkd_vision.study --select-ab 0.5,0.5 0.8,0.3 1.0,0.0   # pick (alpha, beta) on held-out images

Everything runs through the suite's own parts: the configs in ``configs/study/cifar10/`` (composed as any run:
``base.yaml`` + one file per arm), ``run.py fit`` per run, the sweep runner (resumable: run the same command
again and only unfinished runs start), the exact teacher-logit cache shared by the distillation arms, and the
:class:`~abkd_vision.diagnostics.DistillationDiagnostics` callback. The outputs in ``--out``::

    data/                   the ImageFolder export of the .npz arrays (when --data holds train.npz / test.npz)
    teacher/                the teacher's sweep folder (one run)
    students/               the students' sweep folder (results.csv, tables.md, logs/, runs/<run_id>/version_0/)
    teacher_cache/          the teacher's logits per (image, crop/flip view)
    study.md, study.json    the table: top-1 (best and last epoch) as mean ± std over seeds, and the last epoch's
                            diagnostics (student entropy, target probability, agreement, |LogR|) averaged over seeds
    study.png               best top-1 per arm, and the student's entropy per epoch against the teacher's
    select_teacher/         with --select-ab: the selection's teacher (the training images minus the held-out split)
    select/                 with --select-ab: the selection runs' sweep folder (held-out split)

With ``--select-ab GRID`` the AB arms' points are chosen on held-out images, never on the test images: for each AB
method among ``--arms`` one run per grid point and selection seed (``--select-seed``, one or several) trains on the
training images minus a stratified held-out split (``--data.init_args.val_split <--select-val-split>``), and the
point with the best held-out top-1 at the last epoch, averaged over the selection seeds (ties: the earlier grid
point), becomes that method's arm. Then the chosen arms and
the others run with every seed on the full training set, as without the option, and ``study.md``/``study.json``
add the test top-1 (last epoch) of every arm minus KD's, paired over the seeds, with its 95 % t interval
(:func:`abkd_vision.sweep.stats.paired_difference`), and which point was selected with its held-out accuracy.

This is a small-scale study (a subset, a few epochs, 2 CPU cores): it compares objectives under one budget; it
does not reproduce the paper's 240-epoch CIFAR-100 numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from abkd_vision.commands import command_prog
from abkd_vision.io import atomic_write, atomic_write_with
from abkd_vision.protocol import is_test
from abkd_vision.sweep.grid import Run, SweepError, alpha_beta_overrides, split_extra
from abkd_vision.sweep.runner import SweepOptions, SweepResult, build_command, run_sweep
from abkd_vision.sweep.stats import paired_difference
from abkd_vision.sweep.store import log_path, run_dir
from abkd_vision.sweep.tables import format_mean_std, mean_std

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "study" / "cifar10"
PAIR = "resnet20-resnet8"
TEACHER = ("teacher", "resnet20")
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10"
DEFAULT_ARMS = ("ce", "kd", "abkd:1.0,0.0", "abkd:0.8,0.3", "abkd:0.5,0.5", "dkd", "abdkd:1.0,0.2")
METHODS = ("ce", "kd", "abkd", "dkd", "abdkd")
AB_METHODS = ("abkd", "abdkd")
DIAGNOSTICS = ("student_entropy", "teacher_entropy", "target_prob", "agreement", "logr_abs_mean_over",
               "logr_abs_mean_under")

__all__ = ["Arm", "paired_vs_kd", "parse_arm", "parse_grid", "prepare_data", "select_points", "selection_runs",
           "study_runs", "summarize", "main"]


class StudyError(ValueError):
    """A study that cannot run as asked (bad arm, missing data); the message names the value and the fix."""


# --- arms -----------------------------------------------------------------------------------------------------

class Arm:
    """One student objective: a method folder of ``configs/study/cifar10`` and, for AB methods, an (alpha, beta)."""

    def __init__(self, method: str, alpha_beta: tuple[float, float] | None = None):
        self.method, self.alpha_beta = method, alpha_beta

    @property
    def name(self) -> str:
        if self.alpha_beta is None:
            return self.method
        return f"{self.method} (α={self.alpha_beta[0]:g}, β={self.alpha_beta[1]:g})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Arm) and (self.method, self.alpha_beta) == (other.method, other.alpha_beta)

    def __hash__(self) -> int:
        return hash((self.method, self.alpha_beta))

    def __repr__(self) -> str:
        return f"Arm({self.name!r})"


def parse_arm(spec: str) -> Arm:
    """``"kd"`` -> KD; ``"abkd:0.8,0.3"`` -> ABKD at (0.8, 0.3); ``"abkd"`` -> ABKD at its config's (alpha, beta)."""
    method, sep, ab = spec.strip().partition(":")
    method = method.strip().lower()
    if method not in METHODS:
        raise StudyError(f"unknown study arm {spec!r}: the methods are {', '.join(METHODS)} "
                         "(AB methods take a point: abkd:0.8,0.3)")
    if not sep:
        return Arm(method)
    if method not in AB_METHODS:
        raise StudyError(f"study arm {spec!r}: only {' and '.join(AB_METHODS)} take an (alpha, beta) point")
    try:
        alpha, beta = (float(v) for v in ab.split(","))
    except ValueError:
        raise StudyError(f"study arm {spec!r}: write the point as alpha,beta, e.g. {method}:0.8,0.3") from None
    if not (math.isfinite(alpha) and math.isfinite(beta)):
        raise StudyError(f"study arm {spec!r}: alpha and beta must be finite numbers")
    return Arm(method, (alpha, beta))


# --- data -----------------------------------------------------------------------------------------------------

def prepare_data(source: Path, out: Path) -> Path:
    """The ImageFolder root to train on: ``source`` itself when it holds ``train/`` and ``test/`` folders, else
    ``<out>/data`` exported once from ``source/{train,test}.npz`` (CIFAR-style arrays, e.g. ../shared/data/cifar10)."""
    source = Path(source).expanduser()
    if (source / "train").is_dir() and (source / "test").is_dir():
        return source.resolve()
    npz = {split: source / f"{split}.npz" for split in ("train", "test")}
    if not all(p.is_file() for p in npz.values()):
        raise StudyError(
            f"no study data at {source}: it needs train/ and test/ image folders (one sub-folder per class) or "
            "train.npz and test.npz (uint8 images [N, H, W, 3] and int labels [N]). The default is "
            f"{DEFAULT_DATA} (the shared CIFAR-10 copy beside the repository); pass --data <folder> to use your own")
    from abkd_vision.data.export import export_npz_cifar

    root = out / "data"
    done = root / ".exported"
    stamp = json.dumps({split: [str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for split, p in
                        npz.items()})
    if not done.is_file() or done.read_text() != stamp:
        for split, path in npz.items():
            export_npz_cifar(path, root, split, overwrite=True)
        atomic_write(done, stamp)
    return root.resolve()


# --- runs -----------------------------------------------------------------------------------------------------

def teacher_run() -> Run:
    return Run(TEACHER[0], TEACHER[1], 0, (str(CONFIGS / "base.yaml"), str(CONFIGS / "teacher" / f"{TEACHER[1]}.yaml")))


def study_runs(arms: Sequence[Arm], seeds: Sequence[int]) -> list[tuple[Run, Arm]]:
    """One run per arm and seed: ``base.yaml`` + ``<method>/resnet20-resnet8.yaml`` (+ the (alpha, beta) point)."""
    runs = []
    for arm in arms:
        configs = (str(CONFIGS / "base.yaml"), str(CONFIGS / arm.method / f"{PAIR}.yaml"))
        overrides = () if arm.alpha_beta is None else alpha_beta_overrides([f"{arm.alpha_beta[0]},"
                                                                            f"{arm.alpha_beta[1]}"])[0]
        runs += [(Run(arm.method, PAIR, int(seed), configs, tuple(overrides)), arm) for seed in seeds]
    return runs


# --- held-out selection of the AB points (--select-ab) --------------------------------------------------------

def parse_grid(specs: Sequence[str]) -> list[tuple[float, float]]:
    """``["0.5,0.5", "0.8,0.3"]`` -> ``[(0.5, 0.5), (0.8, 0.3)]`` (duplicates dropped, order kept)."""
    points = []
    for spec in specs:
        try:
            points.append(parse_arm(f"abkd:{spec}").alpha_beta)
        except StudyError:
            raise StudyError(f"--select-ab point {spec!r}: write each point as alpha,beta with finite numbers, e.g. "
                             "--select-ab 0.5,0.5 0.8,0.3") from None
    if not points:
        raise StudyError("--select-ab needs at least one alpha,beta point, e.g. --select-ab 0.5,0.5 0.8,0.3")
    return list(dict.fromkeys(points))


def parse_val_split(text: str) -> float | int:
    """``--select-val-split``: a fraction in (0, 1) such as 0.1, or a whole number of images such as 2000."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if math.isfinite(value) and value.is_integer() and value >= 1:
        return int(value)
    if not (math.isfinite(value) and 0 < value < 1):
        raise StudyError(f"--select-val-split takes a fraction in (0, 1) such as 0.1 or a whole number of images "
                         f"such as 2000, got {text!r}")
    return value


def selection_runs(methods: Sequence[str], grid: Sequence[tuple[float, float]], seeds: Sequence[int]
                   ) -> list[tuple[Run, Arm]]:
    """One run per AB method, grid point and selection seed."""
    return study_runs([Arm(m, point) for m in methods for point in grid], seeds)


def selection_extra(val_split: float | int, split_seed: int) -> list[str]:
    """The run arguments that hold a stratified split of the training images out (val/* is then on it)."""
    return ["--data.init_args.val_split", repr(val_split), "--data.init_args.val_split_seed", str(split_seed)]


def select_points(rows: Sequence[dict], plan: Sequence[tuple[Run, Arm]]) -> dict[str, dict]:
    """Per AB method: every grid point's held-out top-1 (last epoch; the mean over the selection seeds that
    finished, each seed's value in ``per_seed``) and the best point (ties: the earlier one). Only held-out numbers
    are read: a row whose val numbers are on the test split is an error."""
    by_id = {r["run_id"]: r for r in rows}
    out: dict[str, dict] = {}
    points: dict[tuple[str, tuple[float, float]], dict] = {}
    for run, arm in plan:
        row = by_id.get(run.run_id) or {}
        value = row.get("last_top1") if row.get("status") == "finished" else None
        if value is not None and is_test(row.get("val_is")):
            raise StudyError(f"selection run {run.run_id} validated on the test split (val_is {row.get('val_is')!r}),"
                             " not on a held-out split: the selection would read test images")
        entry = out.setdefault(arm.method, {"candidates": [], "selected": None})
        candidate = points.get((arm.method, arm.alpha_beta))
        if candidate is None:
            candidate = {"alpha": arm.alpha_beta[0], "beta": arm.alpha_beta[1], "run_id": run.run_id,
                         "held_out_top1_last": None, "per_seed": {}, "log": row.get("log")}
            points[(arm.method, arm.alpha_beta)] = candidate
            entry["candidates"].append(candidate)
        if value is not None and math.isfinite(value):
            candidate["per_seed"][str(run.seed)] = value
        elif row.get("log"):
            candidate["log"] = row["log"]  # a failed seed's log
    for candidate in points.values():
        values = list(candidate["per_seed"].values())
        candidate["held_out_top1_last"] = statistics.fmean(values) if values else None
    for method, entry in out.items():
        done = [c for c in entry["candidates"] if c["held_out_top1_last"] is not None
                and math.isfinite(c["held_out_top1_last"])]
        if not done:
            logs = ", ".join(c["log"] or c["run_id"] for c in entry["candidates"])
            raise StudyError(f"no {method} selection run finished, so no point can be selected; their logs: {logs}")
        entry["selected"] = max(done, key=lambda c: c["held_out_top1_last"])  # max keeps the first of equals
    return out


def _test_last(row: dict) -> float | None:
    """The test top-1 (%) at the last epoch of a finished run on the full training set."""
    if row.get("test_top1_last") is not None:
        return row["test_top1_last"]
    return row.get("last_top1") if is_test(row.get("val_is")) else None


def paired_vs_kd(rows: Sequence[dict], plan: Sequence[tuple[Run, Arm]]) -> list[dict]:
    """Every arm's test top-1 (last epoch) minus KD's, paired over the seeds both finished."""
    values: dict[Arm, dict[int, float]] = {}
    by_id = {r["run_id"]: r for r in rows}
    for run, arm in plan:
        row = by_id.get(run.run_id) or {}
        value = _test_last(row) if row.get("status") == "finished" else None
        mine = values.setdefault(arm, {})
        if value is not None and math.isfinite(value):
            mine[run.seed] = value
    kd = values.get(Arm("kd"), {})
    return [{"arm": arm.name, "method": arm.method, "alpha_beta": arm.alpha_beta, "paired": paired_difference(v, kd)}
            for arm, v in values.items() if arm != Arm("kd")]


def _teacher_sentence(selection: dict) -> str:
    if selection.get("teacher", "").startswith("trained on"):  # the selection's own teacher (--select-teacher)
        top1 = selection.get("teacher_held_out_top1")
        measured = f" (its held-out top-1 {_fmt(top1, 2)})" if top1 is not None else ""
        return (f"The selection runs' teacher trained on the same training images minus the held-out split"
                f"{measured}, so no network of the selection saw the held-out images; the confirmation runs use the "
                "study's teacher.")
    return "The teacher trained on all training images, the held-out ones included."


def selection_markdown(selection: dict, paired: Sequence[dict]) -> str:
    seeds = selection.get("seeds") or [selection.get("seed")]
    several = len(seeds) > 1
    lines = ["## Held-out selection of (α, β) and paired differences to KD", "",
             f"Selected on a held-out split of the training images (val_split {selection['val_split']}, split seed "
             f"{selection['split_seed']}, stratified per class; training seed(s) {', '.join(map(str, seeds))}): top-1 "
             f"on the held-out images at the last epoch{', the mean over the seeds' if several else ''}. The choice "
             "reads only these held-out numbers (run.py also tests each selection run on the test split after its fit; "
             "those numbers are not read). " + _teacher_sentence(selection), "",
             "| method | α | β | held-out top-1 last (%) | " + ("per seed | " if several else "") + "selected |",
             "|---|---|---|---|" + ("---|" if several else "") + "---|"]
    for method, entry in selection["methods"].items():
        for c in entry["candidates"]:
            chosen = "yes" if c is entry["selected"] else ""
            per_seed = " / ".join(_fmt(v, 2) for v in (c.get("per_seed") or {}).values())
            lines.append(f"| {method} | {c['alpha']:g} | {c['beta']:g} | {_fmt(c['held_out_top1_last'], 2)} | "
                         + (f"{per_seed} | " if several else "") + f"{chosen} |")
    lines += ["", "Test top-1 at the last epoch (no selection; full training set) minus KD's, paired over seeds, "
              "with the 95 % t interval of the mean difference.", "",
              "| arm | seeds | difference to KD (points) | 95 % CI |", "|---|---|---|---|"]
    for p in paired:
        d = p["paired"]
        diff = "–" if not d["n"] else f"{d['diff_mean']:+.2f} ± {d['diff_std']:.2f}"
        ci = "–" if d["ci95"] is None else f"[{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]"
        lines.append(f"| {p['arm']} | {d['n']} | {diff} | {ci} |")
    return "\n".join(lines + [""])


# --- report ---------------------------------------------------------------------------------------------------

def _last_diagnostics(folder: Path) -> tuple[dict, list[dict]]:
    try:
        history = json.loads((folder / "diagnostics.json").read_text()).get("history", [])
    except (OSError, ValueError):
        return {}, []
    return (history[-1] if history else {}), history


def _mean(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(values) if values else None


def summarize(rows: Sequence[dict], arms: dict[str, Arm], teacher: dict | None) -> dict:
    """``arms``: run id -> arm. Per arm over its finished seeds: top-1 (%) best and last as lists, the last
    epoch's diagnostics averaged, and the per-epoch student entropy averaged over seeds."""
    out = {"teacher": teacher, "arms": []}
    for arm in dict.fromkeys(arms.values()):
        mine = [r for r in rows if r["status"] == "finished" and arms.get(r["run_id"]) == arm]
        diags = [_last_diagnostics(Path(r["run_dir"])) for r in mine]
        curves: dict[int, list[float]] = {}
        for _, history in diags:
            for h in history:
                curves.setdefault(int(h["epoch"]), []).append(h["student_entropy"])
        out["arms"].append({
            "arm": arm.name, "method": arm.method, "alpha_beta": arm.alpha_beta,
            "seeds": [r["seed"] for r in mine],
            "best_top1": [r["best_top1"] for r in mine if r.get("best_top1") is not None],
            "last_top1": [r["last_top1"] for r in mine if r.get("last_top1") is not None],
            "seconds": [r["seconds"] for r in mine if r.get("seconds") is not None],
            **{key: _mean([d.get(key) for d, _ in diags]) for key in DIAGNOSTICS},
            "entropy_curve": {e: statistics.fmean(v) for e, v in sorted(curves.items())},
        })
    # the teacher's entropy on the same validation images, as every distillation arm's diagnostics measured it
    out["teacher_entropy"] = next((a["teacher_entropy"] for a in out["arms"] if a["teacher_entropy"] is not None),
                                  None)
    return out


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(summary: dict, setup: str) -> str:
    lines = ["# Small real-data study", "", setup, "",
             "| arm | seeds | top-1 best (%) | top-1 last (%) | student entropy | target prob. | agreement "
             "| mean abs LogR over / under |",
             "|---|---|---|---|---|---|---|---|"]
    teacher = summary.get("teacher") or {}
    if teacher:
        lines.append(f"| teacher {TEACHER[1]} | 1 | {format_mean_std([teacher['best_top1']])} | "
                     f"{format_mean_std([teacher['last_top1']])} | {_fmt(summary['teacher_entropy'])} | – | – | – |")
    for a in summary["arms"]:
        logr = ("–" if a["logr_abs_mean_over"] is None else
                f"{a['logr_abs_mean_over']:.4f} / {a['logr_abs_mean_under']:.4f}")
        lines.append(f"| {a['arm']} | {len(a['seeds'])} | {format_mean_std(a['best_top1'])} | "
                     f"{format_mean_std(a['last_top1'])} | {_fmt(a['student_entropy'])} | {_fmt(a['target_prob'])} "
                     f"| {_fmt(a['agreement'])} | {logr} |")
    lines += ["", "Top-1 on the test split, mean ± sample std over seeds. Diagnostics: the last epoch, averaged over "
              "seeds, on the first validation batches (DistillationDiagnostics, T = 1): the student's mean entropy "
              "(nats), its mean probability on the true class, top-1 agreement with the teacher, and the mean "
              "|LogR| (paper §3.1, one forward-KL step) over the classes the student over- / under-estimates.", ""]
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in summary["arms"] if a["best_top1"]]
    if not arms:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    means, stds = zip(*(mean_std(a["best_top1"]) for a in arms))
    left.bar(range(len(arms)), means, yerr=stds, capsize=4, color=[f"C{i}" for i in range(len(arms))])
    left.set_xticks(range(len(arms)), [a["arm"] for a in arms], rotation=30, ha="right", fontsize=8)
    low = min(m - s for m, s in zip(means, stds))
    left.set_ylim(max(0.0, low - 3), max(m + s for m, s in zip(means, stds)) + 1.5)
    left.set_ylabel("best test top-1 (%), mean ± std over seeds")
    for i, a in enumerate(arms):
        curve = a["entropy_curve"]
        right.plot([e + 1 for e in curve], list(curve.values()), marker="o", color=f"C{i}", label=a["arm"])
    if summary["teacher_entropy"] is not None:
        right.axhline(summary["teacher_entropy"], color="k", linestyle="--", label="teacher")
    right.set_xlabel("epoch")
    right.set_ylabel("student mean entropy (nats, T = 1)")
    right.legend(fontsize=7)
    fig.tight_layout()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


# --- command --------------------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=command_prog("python -m abkd_vision.study"), description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help="ImageFolder root (train/, test/) or a folder with train.npz/test.npz (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("runs/study"), help="study folder (default: %(default)s)")
    p.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), metavar="ARM",
                   help=f"student objectives: {', '.join(METHODS)}; AB methods with a point, abkd:0.8,0.3 "
                        "(default: %(default)s)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, help="student epochs (default: the config's 10; milestones at 60%%/80%%)")
    p.add_argument("--teacher-epochs", type=int, help="teacher epochs (default: the config's 10)")
    p.add_argument("--per-class", type=int, help="student training images per class (default: the config's 300)")
    p.add_argument("--workers", type=int, default=2, help="student runs at a time (default: %(default)s)")
    p.add_argument("--threads", type=int, help="torch threads per run (default: CPU cores / workers)")
    p.add_argument("--no-cache", action="store_true", help="run the live teacher in every step (no logit cache)")
    p.add_argument("--select-ab", nargs="+", metavar="ALPHA,BETA",
                   help="choose each AB arm's point from this grid on held-out training images (e.g. 0.5,0.5 "
                        "0.8,0.3 1.0,0.0), then confirm it with every seed on the test split against KD")
    p.add_argument("--select-val-split", default="0.1", metavar="SIZE",
                   help="with --select-ab: the held-out part of the training images, a fraction or a number of "
                        "images (default: %(default)s)")
    p.add_argument("--select-seed", type=int, nargs="+", default=[0], metavar="SEED",
                   help="with --select-ab: the training seeds of the selection runs; with several, each point's "
                        "held-out top-1 is their mean (default: 0)")
    p.add_argument("--select-split-seed", type=int, default=0,
                   help="with --select-ab: the seed that draws the held-out split (default: %(default)s)")
    p.add_argument("--select-teacher", choices=("held-out", "all"), default="held-out",
                   help="with --select-ab: the selection runs' teacher; held-out: a second teacher trained on the "
                        "training images minus the held-out split, so that no network of the selection has seen "
                        "those images; all: the study's teacher, trained on every training image, held-out ones "
                        "included (one teacher less) (default: %(default)s)")
    p.add_argument("--extra", default="", help="more run.py arguments for every run, e.g. '--trainer.precision "
                                               "bf16-mixed'")
    p.add_argument("--rerun-changed", action="store_true",
                   help="run again the finished runs of an earlier invocation whose command changed (other "
                        "--epochs, --extra, ...); without it such runs are an error naming them")
    return p


def _milestones(epochs: int) -> str:
    return f"[{max(1, round(0.6 * epochs))},{max(1, round(0.8 * epochs))}]"


def _common(args, data_root: Path, epochs: int | None) -> list[str]:
    extra = ["--data.init_args.root", str(data_root), *split_extra(args.extra)]
    if epochs is not None:
        extra += ["--trainer.max_epochs", str(epochs), "--model.init_args.lr_milestones", _milestones(epochs)]
    return extra


def _train_teacher(folder: Path, extra: list[str], threads: int, rerun_changed: bool = False
                   ) -> tuple[SweepResult, Path | None, dict | None]:
    """The teacher run in ``folder`` (resumable): its sweep result, checkpoint and numbers; (result, None, None)
    when a signal stopped it."""
    t_run = teacher_run()
    t_opts = SweepOptions(out=folder, workers=1, extra=extra, rerun_changed=rerun_changed)
    with _threads_per_run(threads):
        t_result = run_sweep([t_run], t_opts)
    if t_result.interrupted:
        return t_result, None, None
    if t_result.exit_code:
        log = log_path(t_opts.out, t_run.run_id)
        reason = _last_error_line(log)
        raise StudyError(f"the teacher run did not finish{': ' + reason if reason else ''}; its log: {log}")
    ckpt = run_dir(t_opts.out, t_run.run_id) / "checkpoints" / "last.ckpt"
    row = t_result.rows[0]
    if not ckpt.is_file():
        raise StudyError(f"the teacher run finished without a checkpoint ({ckpt}); its log says why: "
                         f"{row.get('log') or t_opts.out / 'logs'}")
    return t_result, ckpt, {"best_top1": row.get("best_top1"), "last_top1": row.get("last_top1"),
                            "seconds": row.get("seconds")}


@contextlib.contextmanager
def _threads_per_run(n: int):
    """Runs are child processes: they read OMP_NUM_THREADS (torch's thread count) from the environment."""
    before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(n)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = before


def _last_error_line(log: Path) -> str | None:
    """The ``error: ...`` line run.py printed last, if any."""
    try:
        lines = [ln for ln in Path(log).read_text(errors="replace").splitlines() if ln.startswith("error: ")]
    except OSError:
        return None
    return lines[-1].removeprefix("error: ") if lines else None


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _study(parser().parse_args(argv))
    except (StudyError, SweepError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _study(args: argparse.Namespace) -> int:
    arms = list(dict.fromkeys(parse_arm(a) for a in args.arms))
    grid = ab_methods = None
    if args.select_ab is not None:
        grid, val_split = parse_grid(args.select_ab), parse_val_split(args.select_val_split)
        ab_methods = list(dict.fromkeys(a.method for a in arms if a.method in AB_METHODS))
        if not ab_methods:
            raise StudyError(f"--select-ab chooses the point of the AB arms, but --arms has none: add "
                             f"{' or '.join(AB_METHODS)}")
        if Arm("kd") not in arms:
            raise StudyError("--select-ab compares the selected points with KD over the seeds: add kd to --arms")
    for name, value in (("--epochs", args.epochs), ("--teacher-epochs", args.teacher_epochs),
                        ("--per-class", args.per_class), ("--workers", args.workers), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise StudyError(f"{name} must be at least 1, got {value}")
    out = args.out.resolve()
    start = time.time()
    data_root = prepare_data(args.data, out)
    cores = os.cpu_count() or 1
    # Each run is its own process: give each a share of the cores instead of letting every one take them all.
    teacher_threads = args.threads or cores
    student_threads = args.threads or max(1, cores // args.workers)

    # with --select-ab every AB method keeps one arm: the point the selection chooses
    n_arms = len(dict.fromkeys(a.method if ab_methods and a.method in ab_methods else a for a in arms))
    print(f"study: data {data_root}; teacher {TEACHER[1]}, students {PAIR.split('-')[1]}; "
          f"{n_arms} arms x {len(args.seeds)} seeds; {args.workers} runs at a time", flush=True)
    t_result, teacher_ckpt, teacher = _train_teacher(out / "teacher", _common(args, data_root, args.teacher_epochs),
                                                     teacher_threads, args.rerun_changed)
    if teacher_ckpt is None:
        return t_result.exit_code

    student_extra = _common(args, data_root, args.epochs)
    if args.per_class is not None:
        student_extra += ["--data.init_args.train_per_class", str(args.per_class)]

    def command_with(ckpt: Path):
        def command(run: Run, opts: SweepOptions) -> list[str]:
            cmd = build_command(run, opts) + ["--model.init_args.teacher_ckpt", str(ckpt)]
            if run.method != "ce" and not args.no_cache:  # the cache is keyed by the teacher checkpoint's hash
                cmd += ["--model.init_args.teacher_cache", str(out / "teacher_cache")]
            if run.method != "ce" and args.no_cache:
                cmd += ["--model.init_args.teacher_cache", "null"]
            return cmd
        return command

    command = command_with(teacher_ckpt)

    selection, sel_result, sel_teacher = None, None, None
    if grid is not None:
        held_out = selection_extra(val_split, args.select_split_seed)
        sel_ckpt = teacher_ckpt
        if args.select_teacher == "held-out":
            print(f"selection teacher: {TEACHER[1]} on the training images minus the held-out split ({val_split})",
                  flush=True)
            st_result, sel_ckpt, sel_teacher = _train_teacher(
                out / "select_teacher", _common(args, data_root, args.teacher_epochs) + held_out, teacher_threads,
                args.rerun_changed)
            if sel_ckpt is None:
                return st_result.exit_code
        sel_plan = selection_runs(ab_methods, grid, args.select_seed)  # a list: --select-seed takes several
        sel_opts = SweepOptions(out=out / "select", workers=args.workers, extra=student_extra + held_out,
                                rerun_changed=args.rerun_changed)
        print(f"selection: {len(sel_plan)} run(s) ({', '.join(ab_methods)} x {len(grid)} point(s), seed "
              f"{' '.join(map(str, args.select_seed))}) on the training images minus a held-out split ({val_split})",
              flush=True)
        with _threads_per_run(student_threads):
            sel_result = run_sweep([run for run, _ in sel_plan], sel_opts, command=command_with(sel_ckpt))
        if sel_result.interrupted:
            return sel_result.exit_code
        selection = {"grid": [list(p) for p in grid], "val_split": val_split, "split_seed": args.select_split_seed,
                     "seeds": list(args.select_seed), "selected_on": "held-out split of the training set, last epoch",
                     "teacher": ("trained on the training images minus the held-out split"
                                 if sel_teacher is not None else "the study's teacher (all training images)"),
                     "teacher_held_out_top1": None if sel_teacher is None else sel_teacher["last_top1"],
                     "methods": select_points(sel_result.rows, sel_plan)}
        for method, entry in selection["methods"].items():
            best = entry["selected"]
            print(f"selected {method} (α={best['alpha']:g}, β={best['beta']:g}): held-out top-1 "
                  f"{best['held_out_top1_last']:.2f}", flush=True)
        chosen = {m: Arm(m, (e["selected"]["alpha"], e["selected"]["beta"])) for m, e in selection["methods"].items()}
        arms = list(dict.fromkeys(chosen.get(a.method, a) for a in arms))

    s_opts = SweepOptions(out=out / "students", workers=args.workers, extra=student_extra,
                          rerun_changed=args.rerun_changed)
    plan = study_runs(arms, args.seeds)
    runs = [run for run, _ in plan]
    with _threads_per_run(student_threads):
        s_result = run_sweep(runs, s_opts, command=command)

    summary = summarize(s_result.rows, {run.run_id: arm for run, arm in plan}, teacher)
    minutes = (time.time() - start) / 60
    sel_rows = sel_result.rows if sel_result is not None else []
    teachers = [t for t in (teacher, sel_teacher) if t is not None]
    compute = (sum(r.get("seconds") or 0.0 for r in [*sel_rows, *s_result.rows])
               + sum(t["seconds"] or 0.0 for t in teachers)) / 60
    counted = f"{len(sel_rows)} selection and {len(runs)} confirmation" if sel_result is not None else f"{len(runs)}"
    teacher_time = " + ".join(f"{(t['seconds'] or 0) / 60:.1f}" for t in teachers)
    epochs = args.epochs or 10
    setup = (f"Data: {data_root} (train on {args.per_class or 300} images per class; test on the whole test "
             f"split). Teacher {TEACHER[1]} ({args.teacher_epochs or 10} epochs on all training images); students "
             f"{PAIR.split('-')[1]}, {epochs} epochs, batch 64, SGD lr 0.05, seeds {', '.join(map(str, args.seeds))}"
             f". {counted} student runs, {args.workers} at a time with {student_threads} thread(s) each. "
             f"{'Teachers' if len(teachers) > 1 else 'Teacher'} {teacher_time} min; all runs {compute:.1f} min of "
             f"process time summed; this invocation {minutes:.1f} min wall on {cores} CPU core(s). A small-scale "
             "study: it compares objectives under one budget and does not reproduce the paper's CIFAR-100 numbers.")
    summary["setup"] = setup
    report = markdown(summary, setup)
    if selection is not None:
        summary["selection"] = selection
        summary["paired_vs_kd"] = paired_vs_kd(s_result.rows, plan)
        report += "\n" + selection_markdown(selection, summary["paired_vs_kd"])
    atomic_write(out / "study.json", json.dumps(summary, indent=2))
    atomic_write(out / "study.md", report)
    try:
        plot(summary, out / "study.png")
    except ImportError:
        print("matplotlib is not installed: study.png skipped", file=sys.stderr)
    print(report)
    print(f"outputs: {out / 'study.md'}  {out / 'study.json'}  {out / 'study.png'}")
    return s_result.exit_code or (sel_result.exit_code if sel_result is not None else 0)


if __name__ == "__main__":
    sys.exit(main())
