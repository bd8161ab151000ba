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
