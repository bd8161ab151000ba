"""The small real-data study command, end to end on a tiny generated ImageFolder (the real study runs on
../shared/data/cifar10 for about 30 minutes); its arms and its bad inputs; the configs it composes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import parse_only_cli, tiny_image_folder

from abkd_vision import study
from abkd_vision.study import Arm, StudyError, parse_arm, prepare_data, study_runs


def test_arms_parse_and_name_their_point():
    assert parse_arm("KD") == Arm("kd")
    assert parse_arm("abkd:0.8,0.3") == Arm("abkd", (0.8, 0.3))
    assert parse_arm("abkd:0.8,0.3").name == "abkd (α=0.8, β=0.3)"
    for bad, message in (("fitnet", "unknown study arm 'fitnet': the methods are ce, kd, abkd, dkd, abdkd"),
                         ("kd:1,0", "only abkd and abdkd take an"),
                         ("abkd:0.8", "write the point as alpha,beta"),
                         ("abkd:nan,0.2", "must be finite")):
        with pytest.raises(StudyError, match=message):
            parse_arm(bad)


def test_runs_compose_base_and_method_file_with_the_point():
    plan = study_runs([Arm("ce"), Arm("abkd", (0.5, 0.5))], [0, 1])
    assert [r.run_id for r, _ in plan] == [
        "ce__resnet20-resnet8__seed0", "ce__resnet20-resnet8__seed1",
        "abkd__resnet20-resnet8__seed0__alpha=0.5__beta=0.5", "abkd__resnet20-resnet8__seed1__alpha=0.5__beta=0.5"]
    assert all(Path(c).is_file() for r, _ in plan for c in r.configs)


@pytest.mark.parametrize("method", ["teacher", *study.METHODS])
def test_study_configs_parse(method):
    folder = study.CONFIGS / method
    (path,) = folder.glob("*.yaml")
    parse_only_cli(study.CONFIGS / "base.yaml", path)


def test_missing_data_names_where_it_looked(tmp_path, capsys):
    assert study.main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"no study data at {tmp_path / 'nowhere'}" in err and "--data <folder>" in err
    assert not (tmp_path / "out").exists()


def test_npz_folders_are_exported_once(tmp_path):
    import numpy as np

    src = tmp_path / "npz"
    src.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 3)):
        np.savez(src / f"{split}.npz", images=rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8),
                 labels=np.arange(n) % 3)
    root = prepare_data(src, tmp_path / "out")
    assert sorted(p.name for p in (root / "train").iterdir()) == ["0", "1", "2"]
    stamp = (root / ".exported").stat().st_mtime_ns
    assert prepare_data(src, tmp_path / "out") == root and (root / ".exported").stat().st_mtime_ns == stamp


def test_study_runs_end_to_end_and_reports(tmp_path):
    data = tiny_image_folder(tmp_path / "data", 24, 12, size=32)
    out = tmp_path / "study"
    args = ["--data", str(data), "--out", str(out), "--arms", "ce", "kd", "abkd:0.5,0.5", "--seeds", "0",
            "--epochs", "2", "--teacher-epochs", "2", "--per-class", "4", "--extra", "--data.init_args.batch_size 8"]
    assert study.main(args) == 0
    summary = json.loads((out / "study.json").read_text())
    assert summary["teacher"]["best_top1"] is not None
    arms = {a["arm"]: a for a in summary["arms"]}
    assert list(arms) == ["ce", "kd", "abkd (α=0.5, β=0.5)"]
    for a in arms.values():
        assert a["seeds"] == [0] and len(a["best_top1"]) == 1 and 0 <= a["best_top1"][0] <= 100
        assert 0 < a["student_entropy"] <= 1.0987  # at most log 3 nats
        assert 0 <= a["agreement"] <= 1 and sorted(a["entropy_curve"]) == ["1"]  # validated at epoch 2 only
    table = (out / "study.md").read_text()
    assert "| teacher resnet20 | 1 |" in table and "| abkd (α=0.5, β=0.5) | 1 |" in table
    assert "small-scale study" in table
    # the distillation arms share the teacher-logit cache; the CE arm never runs the teacher in training
    assert any((out / "teacher_cache").iterdir())
    ce_metrics = (out / "students" / "runs" / "ce__resnet20-resnet8__seed0" / "version_0" / "metrics.csv")
    assert "teacher_cache_hit_rate" not in ce_metrics.read_text().splitlines()[0]
    # a second invocation resumes: nothing runs again
    before = (out / "students" / "runs" / "kd__resnet20-resnet8__seed0" / "version_0" / "results.json").stat()
    assert study.main(args) == 0
    after = (out / "students" / "runs" / "kd__resnet20-resnet8__seed0" / "version_0" / "results.json").stat()
    assert after.st_mtime_ns == before.st_mtime_ns


def test_a_teacher_without_checkpoint_stops_the_study_naming_its_log(tmp_path, capsys):
    data = tiny_image_folder(tmp_path / "data", 6, 3, size=32)  # fewer images than one batch of 64
    args = ["--data", str(data), "--out", str(tmp_path / "study"), "--arms", "kd", "--seeds", "0",
            "--teacher-epochs", "1"]
    assert study.main(args) == 2
    err = capsys.readouterr().err
    assert "the teacher run did not finish" in err and "teacher__resnet20__seed0.log" in err
    assert "batch_size 64 with drop_last leaves 0 batches from 6 training images" in err  # refused before training
    assert not (tmp_path / "study" / "students").exists()


def test_several_selection_seeds_choose_on_the_mean_of_the_held_out_numbers():
    """Seed 0 alone would pick (0.5, 0.5); the mean over seeds 0 and 1 picks (1, 0). A seed that failed is left
    out of its point's mean; its log is kept."""
    from abkd_vision.data.splits import HELD_OUT

    plan = study.selection_runs(["abkd"], [(0.5, 0.5), (1.0, 0.0)], [0, 1])
    assert sorted((r.seed, a.alpha_beta) for r, a in plan) == [(0, (0.5, 0.5)), (0, (1.0, 0.0)), (1, (0.5, 0.5)),
                                                               (1, (1.0, 0.0))]
    held = {((0.5, 0.5), 0): 52.0, ((0.5, 0.5), 1): 46.0, ((1.0, 0.0), 0): 51.0, ((1.0, 0.0), 1): None}
    rows = [{"run_id": r.run_id, "status": "finished" if held[(a.alpha_beta, r.seed)] is not None else "failed",
             "last_top1": held[(a.alpha_beta, r.seed)], "val_is": HELD_OUT, "log": f"{r.run_id}.log"}
            for r, a in plan]
    (entry,) = study.select_points(rows, plan).values()
    first, second = entry["candidates"]
    assert first["per_seed"] == {"0": 52.0, "1": 46.0} and first["held_out_top1_last"] == pytest.approx(49.0)
    assert second["per_seed"] == {"0": 51.0} and second["held_out_top1_last"] == 51.0
    assert entry["selected"] is second and second["log"].endswith("seed1__alpha=1.0__beta=0.0.log")
    text = study.selection_markdown({"val_split": 0.1, "split_seed": 0, "seeds": [0, 1], "methods": {"abkd": entry}},
                                    [])
    assert "training seed(s) 0, 1" in text and "the mean over the seeds" in text
    assert "| abkd | 0.5 | 0.5 | 49.00 | 52.00 / 46.00 |  |" in text
    assert "| abkd | 1 | 0 | 51.00 | 51.00 | yes |" in text


def test_select_ab_picks_on_held_out_and_confirms_against_kd(tmp_path, monkeypatch):
    """--select-ab with a fake run launcher: the held-out best point is chosen (test numbers of the selection runs
    would pick another), the selection runs hold a split out, the final runs do not, and the paired statistics
    against KD are the hand-computed ones."""
    from abkd_vision.data.splits import HELD_OUT, PAPER_PROTOCOL
    from abkd_vision.sweep.runner import SweepResult, build_command

    for split in ("train", "test"):
        (tmp_path / "data" / split).mkdir(parents=True)
    held_out = {(0.5, 0.5): 40.0, (0.8, 0.3): 45.0, (1.0, 0.0): 42.0}
    test_of_selection_runs = {(0.5, 0.5): 60.0, (0.8, 0.3): 10.0, (1.0, 0.0): 10.0}  # must not be read
    final = {("kd", 0): 50.0, ("kd", 1): 48.0, ("kd", 2): 49.0, ("abkd", 0): 51.0, ("abkd", 1): 50.0,
             ("abkd", 2): 49.5}
    sweeps = []

    def fake_run_sweep(runs, opts, command=None):
        cmds = [(command or build_command)(r, opts) for r in runs]
        sweeps.append((Path(opts.out).name, runs, cmds))
        rows = []
        for r in runs:
            row = {"run_id": r.run_id, "seed": r.seed, "status": "finished", "seconds": 1.0, "log": "",
                   "run_dir": str(tmp_path / "nowhere")}
            ab = tuple(float(v) for k, v in r.overrides if k.endswith((".alpha", ".beta"))) or None
            if r.method == "teacher":
                ckpt = Path(opts.out) / "runs" / r.run_id / "version_0" / "checkpoints" / "last.ckpt"
                ckpt.parent.mkdir(parents=True)
                ckpt.write_text("")
                row.update(best_top1=70.0, last_top1=70.0, val_is=PAPER_PROTOCOL)
            elif Path(opts.out).name == "select":
                row.update(best_top1=held_out[ab], last_top1=held_out[ab], val_is=HELD_OUT,
                           test_top1_last=test_of_selection_runs[ab])
            else:
                v = final[(r.method, r.seed)]
                row.update(best_top1=v, last_top1=v, val_is=PAPER_PROTOCOL)
            rows.append(row)
        return SweepResult(rows=rows, failed=[])

    monkeypatch.setattr(study, "run_sweep", fake_run_sweep)
    monkeypatch.setattr(study, "plot", lambda summary, path: None)
    out = tmp_path / "study"
    assert study.main(["--data", str(tmp_path / "data"), "--out", str(out), "--arms", "kd", "abkd:0.5,0.5",
                       "--select-ab", "0.5,0.5", "0.8,0.3", "1.0,0.0", "--select-val-split", "0.1"]) == 0
    assert [name for name, _, _ in sweeps] == ["teacher", "select_teacher", "select", "students"]
    (teacher_cmd,), (held_teacher_cmd,) = sweeps[0][2], sweeps[1][2]
    assert "--data.init_args.val_split" not in teacher_cmd  # the study's teacher: every training image
    assert held_teacher_cmd[held_teacher_cmd.index("--data.init_args.val_split") + 1] == "0.1"

    def teacher_of(cmd):
        return cmd[cmd.index("--model.init_args.teacher_ckpt") + 1]

    _, sel_runs, sel_cmds = sweeps[2]
    assert len(sel_runs) == 3 and {r.seed for r in sel_runs} == {0}
    for cmd in sel_cmds:
        i = cmd.index("--data.init_args.val_split")
        assert cmd[i + 1] == "0.1" and cmd.count("--data.init_args.val_split") == 1  # never "null" after it
        assert str(out / "select_teacher" / "runs") in teacher_of(cmd)  # a teacher that never saw the held-out images
    _, final_runs, final_cmds = sweeps[3]
    assert all("--data.init_args.val_split" not in cmd for cmd in final_cmds)  # confirmed on the full training set
    assert all(str(out / "teacher" / "runs") in teacher_of(cmd) for cmd in final_cmds)
    assert sorted(r.run_id for r in final_runs if r.method == "abkd") == [
        f"abkd__resnet20-resnet8__seed{s}__alpha=0.8__beta=0.3" for s in (0, 1, 2)]
    summary = json.loads((out / "study.json").read_text())
    chosen = summary["selection"]["methods"]["abkd"]["selected"]
    assert (chosen["alpha"], chosen["beta"], chosen["held_out_top1_last"]) == (0.8, 0.3, 45.0)
    (paired,) = summary["paired_vs_kd"]
    d = paired["paired"]
    # differences 1.0, 2.0, 0.5: mean 7/6, sample std sqrt(7/12), half width t(0.975, 2) * std / sqrt(3)
    assert d["differences"] == [1.0, 2.0, 0.5] and d["diff_mean"] == pytest.approx(7 / 6)
    half = 4.302653 * (7 / 12) ** 0.5 / 3 ** 0.5
    assert d["ci95"] == pytest.approx([7 / 6 - half, 7 / 6 + half])
    table = (out / "study.md").read_text()
    # the cost line counts the selection runs and teacher too: 3 + 6 student runs and 2 teachers, 1 s each
    assert "3 selection and 6 confirmation student runs" in table and "all runs 0.2 min of process time" in table
    assert "Teachers 0.0 + 0.0 min" in table and "(its held-out top-1 70.00), so no network of the selection" in table
    assert "## Held-out selection of (α, β)" in table and "| abkd | 0.8 | 0.3 | 45.00 | yes |" in table
    assert f"| abkd (α=0.8, β=0.3) | 3 | +1.17 ± 0.76 | [{7 / 6 - half:+.2f}, {7 / 6 + half:+.2f}] |" in table

    # --select-teacher all: the study's one teacher serves the selection too (and the report says what it saw)
    sweeps.clear()
    assert study.main(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "one"), "--arms", "kd",
                       "abkd:0.5,0.5", "--select-ab", "0.5,0.5", "1.0,0.0", "--select-teacher", "all"]) == 0
    assert [name for name, _, _ in sweeps] == ["teacher", "select", "students"]
    assert all("/one/teacher/runs/" in teacher_of(cmd) for cmd in sweeps[1][2])
    assert "The teacher trained on all training images, the held-out ones included." in (
        tmp_path / "one" / "study.md").read_text()
