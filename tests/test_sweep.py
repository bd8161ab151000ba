"""The sweep command: table arithmetic (on the paper's Table 14), grids and run ids, validation, resume, failures,
outputs, the submitit local executor (all with a stand-in run.py), and one real sweep of the digits demo."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from abkd_vision.sweep import (
    Run,
    SweepError,
    average_row,
    dataset_summary,
    expand_grid,
    harmonic_mean,
    mean_std,
    parse_run_id,
    runs_from_files,
)
from abkd_vision.sweep.__main__ import main as sweep_main
from abkd_vision.sweep.grid import check_extra, parse_set, short_keys

REPO = Path(__file__).resolve().parents[1]

# The ABKD paper, App. Table 14 (ViT-L/14 -> ViT-B/16): base, new and printed HM per dataset, and the printed
# "Average over 11 datasets" row, for ABKD ("Ours") and the KD, DKD, LSD baselines.
DATASETS = ("ImageNet", "Caltech101", "OxfordPets", "StanfordCars", "Flowers102", "Food101", "FGVCAircraft",
            "SUN397", "DTD", "EuroSAT", "UCF101")
TABLE14 = {
    "ABKD": ([(81.23, 75.02, 78.00), (99.46, 96.93, 98.18), (96.49, 98.55, 97.51), (83.43, 84.01, 83.72),
              (99.24, 83.47, 90.67), (92.46, 93.84, 93.14), (49.06, 43.05, 45.86), (83.88, 81.75, 82.80),
              (86.52, 72.65, 78.98), (97.75, 83.92, 90.30), (90.44, 82.31, 86.73)], (87.27, 81.41, 84.17)),
    "KD": ([(80.83, 74.66, 77.62), (98.91, 96.65, 97.77), (96.30, 98.01, 97.15), (82.80, 83.37, 83.13),
            (99.42, 82.62, 90.24), (92.43, 93.68, 93.05), (49.12, 41.81, 45.17), (83.69, 81.54, 82.60),
            (85.84, 71.37, 77.94), (97.54, 82.08, 89.14), (89.71, 82.27, 86.10)], (86.96, 80.73, 83.63)),
    "DKD": ([(80.98, 74.85, 77.79), (99.12, 96.52, 97.80), (96.36, 98.52, 97.43), (82.23, 84.20, 83.21),
             (99.15, 82.64, 90.15), (92.35, 93.72, 93.03), (48.92, 42.43, 45.44), (83.87, 81.32, 82.58),
             (86.83, 71.91, 78.67), (97.14, 83.72, 89.93), (90.28, 81.40, 85.61)], (87.02, 81.02, 83.79)),
    "LSD": ([(80.85, 74.62, 77.61), (99.05, 96.24, 97.62), (95.96, 98.32, 97.13), (78.29, 79.48, 78.88),
             (98.86, 81.84, 89.55), (92.07, 93.07, 92.57), (47.76, 39.84, 43.44), (83.34, 80.62, 81.96),
             (86.35, 70.97, 77.91), (97.31, 83.31, 89.77), (89.62, 81.53, 85.38)], (86.31, 79.99, 82.89)),
}


def _per_dataset(method: str) -> tuple[dict, dict]:
    rows = TABLE14[method][0]
    return ({d: (b, n) for d, (b, n, _) in zip(DATASETS, rows)}, {d: hm for d, (_, _, hm) in zip(DATASETS, rows)})


# --- table arithmetic -----------------------------------------------------------------------------------------

def test_table14_average_of_abkd_both_conventions():
    per, printed = _per_dataset("ABKD")
    paper = average_row(per, printed_hm=printed)
    assert round(paper["base"], 2) == 87.27 and round(paper["new"], 2) == 81.41
    assert round(paper["hm_mean_of_hms"], 2) == 84.17  # the paper's Average row: mean of the printed HMs
    assert round(paper["hm_of_means"], 2) == 84.24  # CoOp's convention: HM of the mean base and the mean new
    # The printed UCF101 HM (86.73) does not recompute from its base and new (90.44, 82.31 -> 86.18); recomputing
    # every per-dataset HM gives 84.12, not the printed 84.17.
    assert round(harmonic_mean(90.44, 82.31), 2) == 86.18
    recomputed = average_row(per)
    assert round(recomputed["hm_mean_of_hms"], 2) == 84.12
    assert recomputed["hm_of_means"] == paper["hm_of_means"]  # printed HMs do not enter CoOp's convention


@pytest.mark.parametrize("method", ["KD", "DKD", "LSD"])
def test_table14_average_rows_of_the_baselines(method):
    per, printed = _per_dataset(method)
    avg = average_row(per, printed_hm=printed)
    assert tuple(round(avg[k], 2) for k in ("base", "new", "hm_mean_of_hms")) == TABLE14[method][1]
    assert avg["hm_of_means"] > avg["hm_mean_of_hms"]  # the two conventions differ on every row


def test_mean_std_hm_and_dataset_summary():
    assert harmonic_mean(80.0, 60.0) == pytest.approx(2 * 80 * 60 / 140) and harmonic_mean(0.0, 0.0) == 0.0
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)  # sample std (n - 1)
    assert mean_std([5.0]) == (5.0, 0.0) and all(math.isnan(v) for v in mean_std([]))
    s = dataset_summary([90.0, 80.0], [50.0, 70.0])
    assert (s["n"], s["base"], s["new"]) == (2, 85.0, 60.0)
    assert s["base_std"] == pytest.approx(math.sqrt(50)) and s["hm"] == pytest.approx(harmonic_mean(85.0, 60.0))
    # the paper's convention (HM of the seed means) is not the mean of the per-seed HMs
    assert s["hm_per_seed"] == pytest.approx((harmonic_mean(90, 50) + harmonic_mean(80, 70)) / 2)
    assert s["hm_per_seed"] != pytest.approx(s["hm"])
    with pytest.raises(ValueError):
        dataset_summary([1.0], [])
    with pytest.raises(ValueError):
        average_row({})


# --- grids, run ids, validation -------------------------------------------------------------------------------

def _tree(tmp_path: Path) -> Path:
    """A config root: methods kd (KD head) and abkd (alpha-beta divergence), settings A, B, bad, noresult."""
    root = tmp_path / "configs"
    for method in ("kd", "abkd"):
        (root / method).mkdir(parents=True, exist_ok=True)
        div = ("\n      divergence: {class_path: abkd_vision.losses.AlphaBetaDivergence, "
               "init_args: {alpha: 0.5, beta: 0.5}}" if method == "abkd" else "")
        for setting in ("A", "B", "bad", "noresult"):
            (root / method / f"{setting}.yaml").write_text(
                f"model:\n  init_args:\n    head:\n     init_args:{div or ' {}'}\n")
    (root / "base.yaml").write_text("trainer: {max_epochs: 1}\n")
    return root


def test_grid_expansion_run_ids_and_overrides(tmp_path):
    root = _tree(tmp_path)
    kw = dict(sets=["model.init_args.kd_weight=1,2"], alpha_beta=["0.5,0.5", "0.8,0.2"])
    runs = expand_grid(root, ["abkd"], ["A", "B"], [1, 2], **kw)
    assert len(runs) == 2 * 2 * 2 * 2
    ids = [r.run_id for r in runs]
    assert len(set(ids)) == len(ids)
    assert ids == [r.run_id for r in expand_grid(root, ["abkd"], ["A", "B"], [1, 2], **kw)]  # deterministic
    assert ids[0] == "abkd__A__seed1__kd_weight=1__alpha=0.5__beta=0.5"
    assert "abkd__B__seed2__kd_weight=2__alpha=0.8__beta=0.2" in ids
    run = runs[-1]
    assert run.configs == (str((root / "base.yaml").resolve()), str((root / "abkd" / "B.yaml").resolve()))
    args = run.args()
    assert args[args.index("--seed_everything") + 1] == "2"
    assert args[args.index("--model.init_args.head.init_args.divergence.init_args.alpha") + 1] == "0.8"
    assert Run.from_dict(run.to_dict()) == run
    assert parse_run_id(run.run_id) == {"run_id": run.run_id, "method": "abkd", "setting": "B", "seed": 2,
                                        "overrides": [], "label": "kd_weight=2 alpha=0.8 beta=0.2"}
    assert parse_run_id("not_a_sweep_run") is None
    # filenames stay safe and readable; lists keep their commas; keys with one leaf are told apart
    odd = Run("kd", "x y/z", 0, (), (("model.init_args.lr_milestones", "[25, 35]"),))
    assert odd.run_id == "kd__x_y_z__seed0__lr_milestones=25_35"
    assert parse_set("model.init_args.lr_milestones=[150,180],[100,150]") == [
        ("model.init_args.lr_milestones", "[150,180]"), ("model.init_args.lr_milestones", "[100,150]")]
    assert short_keys(["model.init_args.head.init_args.temperature", "model.init_args.temperature"]) == [
        "head.temperature", "model.temperature"]
    long = Run("m", "s", 0, (), (("model.init_args.teacher_ckpt", "/very/long/" * 30 + "x.ckpt"),))
    assert len(long.run_id) <= 150 and long.run_id != Run("m", "s", 0, (), (("k", "/very/long/" * 31),)).run_id
    # explicit files: method = folder, setting = stem, the nearest base.yaml unless --base; repeats collapse
    files = runs_from_files([root / "kd" / "A.yaml", root / "kd" / "A.yaml"], [0])
    assert len(files) == 1 and files[0].configs == expand_grid(root, ["kd"], ["A"], [0])[0].configs
    assert runs_from_files([root / "kd" / "A.yaml"], [0], base="none")[0].configs == (
        str((root / "kd" / "A.yaml").resolve()),)
    other = tmp_path / "other" / "kd"
    other.mkdir(parents=True)
    (other / "A.yaml").write_text("{}\n")
    with pytest.raises(SweepError, match="share the run id kd__A__seed0"):
        runs_from_files([root / "kd" / "A.yaml", other / "A.yaml"], [0], base=root / "base.yaml")


def test_invalid_sweeps_fail_before_anything_starts_listing_the_choices(tmp_path, capsys):
    root = _tree(tmp_path)
    with pytest.raises(SweepError, match=r"unknown method\(s\) dkd under .*; available: abkd, kd"):
        expand_grid(root, ["kd", "dkd"], ["A"], [0])
    with pytest.raises(SweepError, match=r"unknown setting\(s\) C for method kd .*available: A, B, bad, noresult"):
        expand_grid(root, ["kd"], ["A", "C"], [0])
    with pytest.raises(SweepError, match=r"config file .*nope.yaml does not exist; available in .*: A, B, bad"):
        runs_from_files([root / "kd" / "A.yaml", root / "kd" / "nope.yaml"], [0])
    with pytest.raises(SweepError, match="kd.* has no alpha-beta divergence"):
        expand_grid(root, ["kd", "abkd"], ["A"], [0], alpha_beta=["0.8,0.2"])
    with pytest.raises(SweepError, match="--set expects key=value"):
        parse_set("model.init_args.kd_weight")
    with pytest.raises(SweepError, match="sets seed_everything itself"):
        check_extra(["--seed_everything", "3"])
    with pytest.raises(SweepError, match="also varied by --set"):
        check_extra(["--model.init_args.kd_weight=3"], [("model.init_args.kd_weight", "1")])

    out = tmp_path / "sweep"
    base = ["--out", str(out), "--seeds", "0"]
    for argv, message in [
        (["--root", str(root), "--methods", "lsd", "kd", "--settings", "A", "Z"],
         "unknown method(s) lsd under"),
        (["--root", str(root), "--methods", "kd", "--settings", "A", "--extra", "--trainer.logger.init_args.name x"],
         "the sweep sets trainer.logger.init_args.name itself"),
        (["--root", str(root), "--methods", "kd", "--settings", "A", "--workers", "2", "--gpus", "0"],
         "give --gpus or --workers"),
        (["--root", str(root), "--methods", "kd", "--settings", "A", "--slurm-partition", "gpu"],
         "--slurm-partition only apply to --executor submitit"),
        (["--root", str(root), "--methods", "kd", "--settings", "A", "--run-script", str(tmp_path / "no.py")],
         "no.py not found"),
    ]:
        assert sweep_main(base + argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and message in err[-1], err
    assert not out.exists()  # nothing created, nothing started
    lazy = [("ray", ["--executor", "ray"], "--executor ray needs ray: pip install"),
            ("sbatch", ["--executor", "submitit"], "no SLURM on this machine")]
    for missing, argv, message in lazy:  # optional executors: a clear message when they are not there
        if shutil.which(missing) is not None or (missing == "ray" and importlib.util.find_spec("ray")):
            continue
        assert sweep_main(base + ["--root", str(root), "--methods", "kd", "--settings", "A", *argv]) == 2
        assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not out.exists()
    assert sweep_main(["--out", str(out), "--root", str(root), "--methods", "kd", "--settings", "A"]) == 2
    assert "give the seeds" in capsys.readouterr().err


# --- a stand-in run.py ----------------------------------------------------------------------------------------

FAKE_RUN = textwrap.dedent('''
    """A stand-in for run.py: writes results.json as the modules do. Setting "bad" exits 3, "noresult" exits 0
    without results; method "abkd" writes base-to-new results, the others classification results."""
    import json, os, pathlib, sys
    args = sys.argv[1:]
    get = lambda key: args[args.index(key) + 1]
    assert args[0] == "fit" and pathlib.Path.cwd() == pathlib.Path(__file__).parent
    configs = [args[i + 1] for i, a in enumerate(args) if a == "--config"]
    name = get("--trainer.logger.init_args.name")
    with open(pathlib.Path(__file__).with_suffix(".calls"), "a") as f:
        f.write(name + "\\n")
    print("lots of library chatter that must stay in the log")
    print("and warnings on stderr", file=sys.stderr)
    setting = pathlib.Path(configs[-1]).stem
    if setting == "bad":
        sys.exit(3)
    version = get("--trainer.logger.init_args.version")
    run = pathlib.Path(get("--trainer.logger.init_args.save_dir")) / name / f"version_{version}"
    run.mkdir(parents=True, exist_ok=True)
    if setting == "noresult":
        sys.exit(0)
    seed = int(get("--seed_everything"))
    env = {"gpu": os.environ.get("CUDA_VISIBLE_DEVICES"), "warnings": os.environ.get("PYTHONWARNINGS")}
    if pathlib.Path(configs[-1]).parent.name == "abkd":
        b, n = 0.8 + 0.01 * seed, 0.7 + 0.01 * seed
        point = {"epoch": 1, "base_acc": b, "new_acc": n, "hm": 2 * b * n / (b + n)}
        res = {"report_epoch": "last", "reported": point, "last": point, "best_base": point, "history": []}
    else:
        res = {"val_acc1_best": 0.7 + 0.01 * seed, "best_epoch": 3, "val_acc1_last": 0.69, "epochs": 4}
    (run / "results.json").write_text(json.dumps({"finished": True, **res, "env": env}))
''')


@pytest.fixture()
def fake_run(tmp_path) -> Path:
    path = tmp_path / "fake" / "run.py"
    path.parent.mkdir()
    path.write_text(FAKE_RUN)
    return path


def _calls(fake_run: Path) -> list[str]:
    path = fake_run.with_suffix(".calls")
    return path.read_text().split() if path.is_file() else []


def _rows(out: Path) -> list[dict]:
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


def test_resume_skips_finished_reruns_unfinished_records_failures(tmp_path, fake_run, capsys):
    root, out = _tree(tmp_path), tmp_path / "sweep"
    argv = ["--root", str(root), "--methods", "kd", "abkd", "--settings", "A", "B", "bad", "noresult",
            "--seeds", "1", "2", "--out", str(out), "--run-script", str(fake_run), "--workers", "2"]
    assert sweep_main(argv) == 1  # the "bad" and "noresult" runs fail; the others finish
    first = _calls(fake_run)
    assert len(first) == 16
    captured = capsys.readouterr()
    console = captured.out + captured.err
    assert "chatter" not in console and "warnings on stderr" not in console
    assert "16 runs, 0 already finished, 16 to run" in console
    assert "done    kd__A__seed1  top-1 best 71.00  last 69.00" in console
    assert f"done    abkd__B__seed2  base 82.00  new 72.00  HM {harmonic_mean(82, 72):.2f}" in console
    bad_line = next(line for line in console.splitlines() if line.startswith("FAILED  kd__bad__seed1"))
    assert "exit 3" in bad_line and str(out / "logs" / "kd__bad__seed1.log") in bad_line
    assert "exit 0 but" in next(line for line in console.splitlines() if line.startswith("FAILED  kd__noresult"))
    rows = _rows(out)
    assert len(rows) == 16 and {r["status"] for r in rows} == {"finished", "failed"}
    failed = [r for r in rows if r["status"] == "failed"]
    assert sorted(r["run_id"] for r in failed) == sorted(f"{m}__{s}__seed{i}" for m in ("kd", "abkd")
                                                         for s in ("bad", "noresult") for i in (1, 2))
    for r in failed:  # the log path is reported and holds the run's stdout and stderr
        log = Path(r["log"]).read_text()
        assert "chatter" in log and "warnings on stderr" in log and log.splitlines()[1].startswith("$ cd ")
    assert {r["exit_code"] for r in failed} == {"3", "0"}
    ok = next(r for r in rows if r["run_id"] == "kd__A__seed1")
    assert ok["best_top1"] == "71.0000" and ok["kind"] == "classification" and float(ok["seconds"]) > 0
    assert json.loads((Path(ok["run_dir"]) / "results.json").read_text())["env"]["warnings"] == "ignore"

    # interrupt one run (results say not finished) and leave a stray file in another unfinished folder
    victim = out / "runs" / "abkd__A__seed1" / "version_0"
    (victim / "results.json").write_text(json.dumps({**json.loads((victim / "results.json").read_text()),
                                                     "finished": False}))
    (out / "runs" / "kd__noresult__seed1" / "version_0" / "stale.txt").write_text("from the failed attempt")
    assert sweep_main(argv) == 1
    again = _calls(fake_run)[len(first):]
    assert sorted(again) == sorted(["abkd__A__seed1"] + [r["run_id"] for r in failed])  # nothing else reran
    assert "16 runs, 7 already finished, 9 to run" in capsys.readouterr().out
    assert not (out / "runs" / "abkd__A__seed1" / "version_1").exists()
    assert not (out / "runs" / "kd__noresult__seed1" / "version_0" / "stale.txt").exists()
    rows = _rows(out)
    assert len(rows) == 16 and len({r["run_id"] for r in rows}) == 16  # never a duplicate row
    assert next(r for r in rows if r["run_id"] == "abkd__A__seed1")["status"] == "finished"

    tables = (out / "tables.md").read_text()
    assert "16 runs: 8 finished, 8 failed" in tables
    assert "### Average over 2 datasets" in tables and "### A\n" in tables
    # base 81.5 ± 0.71, new 71.5 ± 0.71, HM of the seed means
    assert f"| abkd | 2 | 81.50 ± 0.71 | 71.50 ± 0.71 | {harmonic_mean(81.5, 71.5):.2f} |" in tables
    assert "| kd | 71.50 ± 0.71 | 71.50 ± 0.71 |" in tables and "| kd | 69.00 ± 0.00 | 69.00 ± 0.00 |" in tables
    assert "| kd__bad__seed1 | failed | 3 |" in tables
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --report-only writes the outputs again without running anything
    (out / "results.csv").unlink()
    assert sweep_main(["--out", str(out), "--report-only"]) == 0  # outputs again, nothing run
    assert len(_rows(out)) == 16 and len(_calls(fake_run)) == len(first) + len(again)


def test_finished_runs_of_another_command_are_refused_or_rerun(tmp_path, fake_run, capsys):
    """A finished run counts only for the command it ran: the same sweep with other --extra names the runs and the
    changed arguments and runs nothing; --rerun-changed runs them again; a moved folder or another interpreter
    is the same run."""
    root, out = _tree(tmp_path), tmp_path / "sweep"
    argv = ["--root", str(root), "--methods", "kd", "--settings", "A", "--seeds", "1", "2", "--out", str(out),
            "--run-script", str(fake_run)]
    assert sweep_main([*argv, "--extra", "--trainer.max_epochs 2"]) == 0
    assert len(_calls(fake_run)) == 2
    capsys.readouterr()
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert sweep_main([*argv, "--extra", "--trainer.max_epochs 3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "2 finished run(s) in" in err[-4] and "ran another command than this sweep would give them" in err[-4]
    assert err[-3].strip() == "kd__A__seed1: --trainer.max_epochs 2 -> 3"
    assert "Give --rerun-changed to run them again" in err[-1] and len(_calls(fake_run)) == 2  # nothing ran
    assert (out / "manifest.json").stat().st_mtime_ns == stamp  # refused before anything was written
    moved = tmp_path / "moved"
    out.rename(moved)
    assert sweep_main([*argv[:-4], "--out", str(moved), "--run-script", str(fake_run), "--extra",
                       "--trainer.max_epochs 2"]) == 0
    assert "2 runs, 2 already finished, 0 to run" in capsys.readouterr().out and len(_calls(fake_run)) == 2
    assert sweep_main([*argv[:-4], "--out", str(moved), "--run-script", str(fake_run), "--extra",
                       "--trainer.max_epochs 3", "--rerun-changed"]) == 0
    assert "2 runs, 0 already finished, 2 to run" in capsys.readouterr().out and len(_calls(fake_run)) == 4
    record = json.loads((moved / "runs" / "kd__A__seed1" / "sweep_run.json").read_text())
    assert record["command"][-2:] == ["--trainer.max_epochs", "3"]


def test_report_only_reads_run_folders_written_by_hand(tmp_path):
    out = tmp_path / "sweep"

    def put(run_id: str, result: dict | str) -> None:
        folder = out / "runs" / run_id / "version_0"
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(result if isinstance(result, str) else json.dumps(result))

    for method, accs in (("kd", (0.75, 0.76)), ("abkd", (0.77, 0.79))):
        for seed, acc in zip((1, 2), accs):
            for pair in ("resnet32x4-resnet8x4", "vgg13-vgg8"):
                put(f"{method}__{pair}__seed{seed}", {"finished": True, "val_acc1_best": acc, "best_epoch": 230,
                                                      "val_acc1_last": acc - 0.01, "val_acc5_last": 0.9,
                                                      "epochs": 240, "teacher_val_acc1": 0.79})
    for seed in (1, 2, 3):
        for dataset, (b, n) in (("EuroSAT", (0.9775, 0.8392)), ("DTD", (0.8652, 0.7265))):
            point = {"epoch": 19, "base_acc": b, "new_acc": n, "hm": harmonic_mean(b, n)}
            put(f"abkd__{dataset}__seed{seed}", {"finished": True, "report_epoch": "best_base", "reported": point,
                                                 "last": point, "best_base": point, "history": []})
    put("kd__vgg13-vgg8__seed3", {"val_acc1_best": 0.5})  # no "finished" key: not finished
    put("kd__resnet32x4-resnet8x4__seed3", "{ truncated")  # does not parse: not finished
    assert sweep_main(["--out", str(out), "--report-only"]) == 0
    rows = {r["run_id"]: r for r in _rows(out)}
    assert len(rows) == 16
    assert rows["kd__vgg13-vgg8__seed3"]["status"] == "unfinished" and rows["kd__vgg13-vgg8__seed3"]["best_top1"] == ""
    assert rows["kd__resnet32x4-resnet8x4__seed3"]["status"] == "unfinished"
    assert rows["abkd__DTD__seed2"]["kind"] == "base_to_new" and rows["abkd__DTD__seed2"]["base"] == "86.5200"
    assert rows["abkd__DTD__seed2"]["report_epoch"] == "best_base" and rows["abkd__DTD__seed2"]["seed"] == "2"
    tables = (out / "tables.md").read_text()
    assert "| abkd | 3 | 86.52 ± 0.00 | 72.65 ± 0.00 | 78.98 |" in tables  # Table 14's DTD row
    avg = average_row({"EuroSAT": (97.75, 83.92), "DTD": (86.52, 72.65)})
    assert (f"| abkd | {avg['base']:.2f} | {avg['new']:.2f} | {avg['hm_mean_of_hms']:.2f} | "
            f"{avg['hm_of_means']:.2f} |") in tables
    assert "| abkd | 78.00 ± 1.41 | 78.00 ± 1.41 |" in tables  # best epoch, both pairs
    assert "| kd | 75.50 ± 0.71 (n=2) | 75.50 ± 0.71 (n=2) |" not in tables  # the unfinished seed 3 is left out
    assert "| kd | 75.50 ± 0.71 | 75.50 ± 0.71 |" in tables
    assert "| teacher (measured at distillation start) | 79.00 | 79.00 |" in tables
    assert "14 finished, 2 unfinished" in tables
    assert (out / "plot.png").stat().st_size > 5000 and not (out / "manifest.json").exists()


def test_local_pool_gives_each_run_its_own_gpu(tmp_path, fake_run):
    root, out = _tree(tmp_path), tmp_path / "sweep"
    code = sweep_main(["--root", str(root), "--methods", "kd", "--settings", "A", "B", "--seeds", "0", "1",
                       "--out", str(out), "--run-script", str(fake_run), "--gpus", "3", "5"])
    assert code == 0
    gpus = [json.loads((Path(r["run_dir"]) / "results.json").read_text())["env"]["gpu"] for r in _rows(out)]
    assert len(gpus) == 4 and set(gpus) <= {"3", "5"}


def test_submitit_local_executor(tmp_path, fake_run):
    pytest.importorskip("submitit")
    root, out = _tree(tmp_path), tmp_path / "sweep"
    argv = ["--root", str(root), "--methods", "kd", "--settings", "A", "bad", "--seeds", "0", "--out", str(out),
            "--run-script", str(fake_run), "--executor", "submitit", "--submitit-local", "--timeout-min", "5"]
    assert sweep_main(argv) == 1
    rows = {r["run_id"]: r for r in _rows(out)}
    assert rows["kd__A__seed0"]["status"] == "finished" and rows["kd__bad__seed0"]["status"] == "failed"
    assert rows["kd__bad__seed0"]["exit_code"] == "3"
    record = json.loads((out / "runs" / "kd__A__seed0" / "sweep_run.json").read_text())
    assert record["executor"] == "submitit-local" and record["job_id"] and (out / "submitit").is_dir()
    assert sweep_main(argv) == 1 and _calls(fake_run).count("kd__A__seed0") == 1  # resumed: only "bad" again


def test_the_command_starts_without_importing_torch():
    code = "import sys, abkd_vision.sweep.__main__; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0
    result = subprocess.run([sys.executable, "-m", "abkd_vision.sweep", "--help"], capture_output=True, text=True,
                            cwd=REPO)
    assert result.returncode == 0 and "--report-only" in result.stdout and "--submitit-local" in result.stdout


# --- the real thing -------------------------------------------------------------------------------------------

def test_digits_demo_sweep_through_run_py(tmp_path, monkeypatch, capsys):
    """configs/demo/base.yaml + ce.yaml (no teacher needed), 2 seeds, a few batches each, through run.py."""
    from abkd_vision.data import export_digits

    digits = export_digits(tmp_path / "digits")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two runs at once on two cores
    out = tmp_path / "sweep"
    argv = ["--base", str(REPO / "configs/demo/base.yaml"), "--configs", str(REPO / "configs/demo/ce.yaml"),
            "--seeds", "0", "1", "--out", str(out), "--workers", "2", "--extra",
            f"--trainer.max_epochs 1 --trainer.limit_train_batches 2 --trainer.limit_val_batches 1 "
            f"--data.init_args.root {digits}"]
    code = sweep_main(argv)
    logs = {p.name: p.read_text()[-3000:] for p in (out / "logs").glob("*.log")}
    assert code == 0, logs
    rows = _rows(out)
    assert [r["run_id"] for r in rows] == ["demo__ce__seed0", "demo__ce__seed1"]
    for r in rows:
        assert r["status"] == "finished" and r["kind"] == "classification" and 0 <= float(r["best_top1"]) <= 100
        folder = Path(r["run_dir"])
        assert folder == out / "runs" / r["run_id"] / "version_0"
        assert {"config.yaml", "versions.json", "metrics.csv", "checkpoints", "results.json"} <= {
            p.name for p in folder.iterdir()}
        assert f"seed_everything: {r['seed']}" in (folder / "config.yaml").read_text()
    assert not any((out / "runs" / r["run_id"] / "version_1").exists() for r in rows)
    tables = (out / "tables.md").read_text()
    assert "| method | ce |" in tables and "| demo | " in tables and (out / "plot.png").is_file()
    assert "Trainer" not in capsys.readouterr().out  # library chatter stays in the logs
    assert any("Trainer" in log or "results written" in log for log in logs.values())
    # resume: both finished, nothing runs again
    assert sweep_main(argv) == 0
    assert "2 runs, 2 already finished, 0 to run" in capsys.readouterr().out


def test_real_base_to_new_sweep_through_run_py(tmp_path):
    """2 generated datasets x 2 methods x 1 seed of tiny-CLIP prompt distillation, end to end."""
    from abkd_vision.data.synthetic import write_fake_coop_dataset
    from abkd_vision.models.clip import PromptedCLIP, prompt_parameters

    data = tmp_path / "data"
    write_fake_coop_dataset(data, "EuroSAT", num_classes=10, train_per_class=2, test_per_class=1)
    write_fake_coop_dataset(data, "DTD", num_classes=6, train_per_class=2, test_per_class=1)
    teacher = PromptedCLIP("abkd-tiny-vit-large-quickgelu", None, text_depth=2, vision_depth=2)
    prompts = tmp_path / "teacher_prompts.pt"  # a plain prompts state dict: valid for any class list
    import torch

    torch.save({k: v.detach() for k, v in prompt_parameters(teacher)}, prompts)
    extra = ("--model.init_args.teacher_arch abkd-tiny-vit-large-quickgelu --model.init_args.teacher_pretrained null "
             "--model.init_args.teacher_text_depth 2 --model.init_args.teacher_vision_depth 2 "
             "--model.init_args.student_arch abkd-tiny-vit-quickgelu --model.init_args.student_pretrained null "
             f"--model.init_args.student_vision_depth 2 --model.init_args.teacher_ckpt {prompts} "
             f"--data.init_args.root {data} --data.init_args.image_size 32 --data.init_args.num_workers 0 "
             "--trainer.accelerator cpu --trainer.max_epochs 1 --trainer.limit_train_batches 1 "
             "--trainer.enable_progress_bar false --trainer.enable_model_summary false")
    out = tmp_path / "sweep"
    code = sweep_main(["--root", str(REPO / "configs" / "base_to_new"), "--methods", "kd", "abkd", "--settings",
                       "EuroSAT", "DTD", "--seeds", "1", "--out", str(out), "--workers", "2", "--extra", extra])
    logs = {p.name: p.read_text()[-2000:] for p in (out / "logs").glob("*.log")}
    assert code == 0, logs
    rows = _rows(out)
    assert len(rows) == 4 and {r["status"] for r in rows} == {"finished"}
    assert all(r["kind"] == "base_to_new" and 0 <= float(r["hm"]) <= 100 for r in rows)
    tables = (out / "tables.md").read_text()
    assert "### EuroSAT" in tables and "### DTD" in tables and "### Average over 2 datasets" in tables
    assert (out / "plot.png").is_file()

