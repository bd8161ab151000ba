"""The sweep command: grids, validation, resume, failures, outputs and the two averaging conventions; a stand-in
run.py for speed, submitit's local executor, and one real base-to-new sweep through run.py."""

from __future__ import annotations

import csv
import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from abkd_vision.sweep import Run, SweepError, average_row, expand_grid, runs_from_files
from abkd_vision.sweep.__main__ import main as sweep_main

REPO = Path(__file__).resolve().parents[1]

# The ABKD paper's Table 14, its "Ours" (ABKD) rows: base, new, printed HM per dataset.
TABLE14_ABKD = {
    "ImageNet": (81.23, 75.02, 78.00), "Caltech101": (99.46, 96.93, 98.18), "OxfordPets": (96.49, 98.55, 97.51),
    "StanfordCars": (83.43, 84.01, 83.72), "Flowers102": (99.24, 83.47, 90.67), "Food101": (92.46, 93.84, 93.14),
    "FGVCAircraft": (49.06, 43.05, 45.86), "SUN397": (83.88, 81.75, 82.80), "DTD": (86.52, 72.65, 78.98),
    "EuroSAT": (97.75, 83.92, 90.30), "UCF101": (90.44, 82.31, 86.73),
}


def test_the_two_averaging_conventions_on_the_papers_abkd_rows():
    per = {d: (b, n) for d, (b, n, _) in TABLE14_ABKD.items()}
    printed = {d: hm for d, (_, _, hm) in TABLE14_ABKD.items()}
    paper = average_row(per, printed_hm=printed)
    assert round(paper["base"], 2) == 87.27 and round(paper["new"], 2) == 81.41
    assert round(paper["hm_mean_of_hms"], 2) == 84.17  # the paper's "Average over 11 datasets" HM
    assert round(paper["hm_of_means"], 2) == 84.24  # CoOp's HM of the averaged base and new
    # recomputing each HM moves the paper's number: UCF101's printed 86.73 is 86.18 from its base and new
    assert round(average_row(per)["hm_mean_of_hms"], 2) == 84.12


def _tree(tmp_path: Path) -> Path:
    root = tmp_path / "configs"
    for method in ("kd", "abkd"):
        for setting in ("A", "B", "bad"):
            (root / method).mkdir(parents=True, exist_ok=True)
            (root / method / f"{setting}.yaml").write_text(f"# {method} {setting}\n")
    (root / "base.yaml").write_text("# base\n")
    return root


def test_grid_expansion_and_run_ids(tmp_path):
    root = _tree(tmp_path)
    runs = expand_grid(root, ["kd", "abkd"], ["A", "B"], [1, 2], sets=["model.init_args.kd_weight=1,2"],
                       alpha_beta=["0.5,0.5", "0.8,0.2"])
    assert len(runs) == 2 * 2 * 2 * 2 * 2
    ids = [r.run_id for r in runs]
    assert len(set(ids)) == len(ids)
    assert "abkd__B__seed2__kd_weight=2__abalpha=0.8__abbeta=0.2" in ids
    assert runs[0].configs == (str(root / "base.yaml"), str(root / "kd" / "A.yaml"))
    assert Run.from_dict(runs[-1].to_dict()) == runs[-1]
    assert runs_from_files([root / "kd" / "A.yaml"], [0])[0].configs == runs[0].configs


def test_unknown_method_or_setting_fails_before_any_run_and_lists_the_choices(tmp_path, capsys):
    root = _tree(tmp_path)
    with pytest.raises(SweepError, match=r"unknown method\(s\) dkd .*choose from: abkd, kd"):
        expand_grid(root, ["kd", "dkd"], ["A"], [0])
    with pytest.raises(SweepError, match=r"unknown setting\(s\) C .*choose from: A, B, bad"):
        expand_grid(root, ["kd"], ["A", "C"], [0])
    out = tmp_path / "sweep"
    assert sweep_main(["--root", str(root), "--methods", "lsd", "--settings", "A", "--out", str(out)]) == 2
    assert "choose from: abkd, kd" in capsys.readouterr().err
    assert not out.exists()


FAKE_RUN = textwrap.dedent('''
    """A stand-in for run.py: writes results.json like the modules do, fails for configs named bad.yaml."""
    import json, sys, pathlib
    args = sys.argv[1:]
    get = lambda key: args[args.index(key) + 1]
    configs = [args[i + 1] for i, a in enumerate(args) if a == "--config"]
    with open(pathlib.Path(__file__).with_suffix(".calls"), "a") as f:
        f.write(get("--trainer.logger.init_args.name") + "\\n")
    print("lots of library chatter that must stay in the log")
    if configs[-1].endswith("bad.yaml"):
        sys.exit(3)
    save_dir = pathlib.Path(get("--trainer.logger.init_args.save_dir"))
    run = save_dir / get("--trainer.logger.init_args.name") / "version_0"
    run.mkdir(parents=True, exist_ok=True)
    seed = int(get("--seed_everything"))
    method = pathlib.Path(configs[-1]).parent.name
    if method == "abkd":
        acc = 0.8 + 0.01 * seed
        res = {"finished": True, "report_epoch": "last",
               "reported": {"epoch": 1, "base_acc": acc, "new_acc": acc - 0.1,
                            "hm": 2 * acc * (acc - .1) / (2 * acc - .1)},
               "last": None, "best_base": None}
    else:
        res = {"finished": True, "val_acc1_best": 0.7 + 0.01 * seed, "val_acc1_last": 0.69, "best_epoch": 3}
    (run / "results.json").write_text(json.dumps(res))
''')


@pytest.fixture()
def fake_run(tmp_path) -> Path:
    path = tmp_path / "fake_run.py"
    path.write_text(FAKE_RUN)
    return path


def _calls(fake_run: Path) -> list[str]:
    path = fake_run.with_suffix(".calls")
    return path.read_text().split() if path.is_file() else []


def _rows(out: Path) -> list[dict]:
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


def test_resume_skips_finished_runs_reports_failures_and_never_duplicates_rows(tmp_path, fake_run, capsys):
    root, out = _tree(tmp_path), tmp_path / "sweep"
    args = ["--root", str(root), "--methods", "kd", "abkd", "--settings", "A", "B", "bad", "--seeds", "1", "2",
            "--out", str(out), "--run-script", str(fake_run), "--workers", "2"]
    assert sweep_main(args) == 1  # the "bad" runs fail, the others finish
    first = _calls(fake_run)
    assert len(first) == 12
    console = capsys.readouterr().out + capsys.readouterr().err
    assert "chatter" not in console and "FAILED  kd__bad__seed1" in console
    rows = _rows(out)
    assert len(rows) == 12 and {r["status"] for r in rows} == {"finished", "failed"}
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 4 and all(Path(r["log"]).read_text().count("chatter") == 1 for r in failed)
    # an interrupted run (no finished results.json) is rerun; finished ones are skipped; failed ones retried
    victim = out / "runs" / "abkd__A__seed1" / "version_0" / "results.json"
    victim.write_text(json.dumps({**json.loads(victim.read_text()), "finished": False}))
    assert sweep_main(args) == 1
    again = _calls(fake_run)[len(first):]
    assert sorted(again) == sorted(["abkd__A__seed1"] + [r["run_id"] for r in failed])
    assert not (out / "runs" / "abkd__A__seed1" / "version_1").exists()
    rows = _rows(out)
    assert len(rows) == 12 and len({r["run_id"] for r in rows}) == 12
    tables = (out / "tables.md").read_text()
    assert "### A" in tables and "| abkd | 2 | 81.50 ± 0.71 | 71.50 ± 0.71 |" in tables
    assert "| kd | 71.50 ± 0.71 / 69.00 ± 0.00 | 71.50 ± 0.71 / 69.00 ± 0.00 |\n" in tables
    assert "Runs not finished" in tables and (out / "plot.png").stat().st_size > 1000
    # --report-only regenerates the same outputs without running anything
    (out / "results.csv").unlink()
    assert sweep_main(["--out", str(out), "--report-only"]) == 0
    assert len(_rows(out)) == 12 and len(_calls(fake_run)) == len(first) + len(again)


def test_submitit_local_executor(tmp_path, fake_run):
    pytest.importorskip("submitit")
    root, out = _tree(tmp_path), tmp_path / "sweep"
    code = sweep_main(["--root", str(root), "--methods", "kd", "--settings", "A", "B", "--seeds", "0",
                       "--out", str(out), "--run-script", str(fake_run), "--executor", "submitit",
                       "--submitit-local", "--timeout-min", "5"])
    assert code == 0
    assert {r["status"] for r in _rows(out)} == {"finished"} and len(_rows(out)) == 2
    assert (out / "submitit").is_dir()


def test_real_base_to_new_sweep_through_run_py(tmp_path):
    """2 generated datasets x 2 methods x 1 seed of tiny-CLIP prompt distillation, end to end."""
    from abkd_vision.data.synthetic import write_fake_coop_dataset
    from abkd_vision.models.clip import PromptedCLIP, prompt_parameters

    data = tmp_path / "data"
    write_fake_coop_dataset(data, "EuroSAT", num_classes=10, train_per_class=2, test_per_class=1)
    write_fake_coop_dataset(data, "DTD", num_classes=6, train_per_class=2, test_per_class=1)
    teacher = PromptedCLIP("abkd-tiny-vit-large-quickgelu", None, text_depth=2, vision_depth=2)
    prompts = tmp_path / "teacher_prompts.pt"  # a plain prompts state dict: valid for any class list
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
    assert "### EuroSAT" in tables and "### DTD" in tables and "Average over the datasets" in tables
    assert (out / "plot.png").is_file()


def test_sweep_module_runs_as_a_command():
    import subprocess

    result = subprocess.run([sys.executable, "-m", "abkd_vision.sweep", "--help"], capture_output=True, text=True,
                            cwd=REPO)
    assert result.returncode == 0 and "--report-only" in result.stdout
