"""``python -m abkd_vision.search``: Optuna search over ABKD's (alpha, beta) on the offline digits data."""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch

from abkd_vision.cli import main as cli_main
from abkd_vision.cli import quiet_lightning
from abkd_vision.data import export_digits
from abkd_vision.search.__main__ import main as search_main
from abkd_vision.search.objective import OptunaPruning
from abkd_vision.search.space import SearchError, check_range

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo"
TINY = ["--trainer.max_epochs", "2", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
        "--data.init_args.num_workers", "0", "--trainer.num_sanity_val_steps", "0"]
ONE_EPOCH = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Digits exported once and a resnet8 teacher trained with a tiny budget."""
    quiet_lightning()
    root = tmp_path_factory.mktemp("search")
    digits = export_digits(root / "digits", overwrite=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    args = ["fit", "--config", str(DEMO / "base.yaml"), "--config", str(DEMO / "teacher.yaml"),
            "--model.init_args.model", "resnet8", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "5",
            "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--data.init_args.root", str(digits),
            "--trainer.logger.init_args.save_dir", str(root / "teacher"), "--trainer.logger.init_args.version", "0"]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*args parameter is intended to run from within Python.*")
            cli_main(args)
    finally:
        torch.set_num_threads(threads)
    ckpt = root / "teacher" / "teacher" / "version_0" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    run = ["--config", str(DEMO / "base.yaml"), "--config", str(DEMO / "abkd.yaml"), "--config",
           str(DEMO / "student.yaml"), "--model.init_args.teacher", "resnet8", "--model.init_args.teacher_ckpt",
           str(ckpt), "--data.init_args.root", str(digits), *TINY]
    return SimpleNamespace(root=root, digits=digits, ckpt=ckpt, run=run)


def _search(args: list[str], capsys) -> tuple[int, str, str]:
    code = search_main(["--threads", "1", *args])
    out, err = capsys.readouterr()
    return code, out, err


def _rows(out: Path) -> list[dict]:
    with (out / "trials.csv").open() as f:
        return list(csv.DictReader(f))


def _study(out: Path) -> optuna.Study:
    return optuna.load_study(study_name="abkd_search", storage=f"sqlite:///{out / 'study.db'}")


# -- validation: exit code 2 and one message printed last, before anything runs -------------------------------
@pytest.mark.parametrize("flag, bounds, expected", [
    ("--alpha-range", ["1.5", "0"], "alpha range [1.5, 0.0] is inverted: the lower bound 1.5 must be below the "
                                    "upper bound 0.0"),
    ("--beta-range", ["0.5", "0.5"], "beta range [0.5, 0.5] is empty"),
    ("--alpha-range", ["nan", "1"], "alpha range [nan, 1.0]: the lower bound nan is not a finite number"),
    ("--beta-range", ["0", "inf"], "the upper bound inf is not a finite number"),
])
def test_bad_ranges(tmp_path, capsys, flag, bounds, expected):
    code, out, err = _search(["--out", str(tmp_path / "s"), flag, *bounds, "--config", str(DEMO / "base.yaml")],
                             capsys)
    assert code == 2
    assert expected in err.strip().splitlines()[-1]
    assert not (tmp_path / "s").exists()  # nothing started


def test_check_range_and_grid_errors():
    assert check_range("alpha", [0, 1.5]) == (0.0, 1.5)
    with pytest.raises(SearchError, match="lower bound 2.0 must be below the upper bound 1.0"):
        check_range("beta", [2, 1])
    code = search_main(["--out", "/nonexistent/x", "--grid-alpha", "0", "1", "--config", str(DEMO / "base.yaml")])
    assert code == 2


def test_bad_storage_url(tmp_path, capsys, setup):
    url = "postgresql://x@nohost/db"
    code, out, err = _search(["--out", str(tmp_path / "s"), "--storage", url, *setup.run], capsys)
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert f"cannot open Optuna storage '{url}' (backend: postgresql)" in last
    assert "sqlite:///" in last and "study.db" in last


def test_config_without_ab_divergence(tmp_path, capsys, setup):
    run = [a if a != str(DEMO / "abkd.yaml") else str(DEMO / "kd.yaml") for a in setup.run]
    code, out, err = _search(["--out", str(tmp_path / "s"), "--n-trials", "1", *run], capsys)
    assert code == 2
    assert "no AlphaBetaDivergence at model.init_args.head.init_args.divergence" in err.strip().splitlines()[-1]
    assert not (tmp_path / "s" / "trials" / "trial_0").exists()


def test_reserved_override(tmp_path, capsys, setup):
    code, out, err = _search(["--out", str(tmp_path / "s"), *setup.run,
                              "--model.init_args.head.init_args.divergence.init_args.alpha", "0.5"], capsys)
    assert code == 2 and "is set by the search" in err.strip().splitlines()[-1]


def test_pruning_callback_raises_when_pruner_says_so():
    class Always(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return True

    trial = optuna.create_study(direction="maximize", pruner=Always()).ask()
    callback = OptunaPruning(trial)
    trainer = SimpleNamespace(sanity_checking=True, callback_metrics={}, current_epoch=0)
    callback.on_validation_end(trainer, None)  # the sanity check is not reported
    trainer = SimpleNamespace(sanity_checking=False, callback_metrics={"val/acc1": torch.tensor(0.25)},
                              current_epoch=3)
    with pytest.raises(optuna.TrialPruned):
        callback.on_validation_end(trainer, None)
    assert trial.storage.get_trial(trial._trial_id).intermediate_values == {3: 0.25}


# -- real searches ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tpe_search(setup):
    out = setup.root / "tpe"
    code = search_main(["--threads", "1", "--out", str(out), "--n-trials", "3", "--alpha-range", "0.2", "1.2",
                        "--beta-range", "-0.3", "0.9", "--seed", "1", *setup.run])
    assert code == 0
    return out


def test_tpe_search_outputs(tpe_search):
    out = tpe_search
    for name in ("best.json", "trials.csv", "landscape.png", "study.db"):
        assert (out / name).is_file(), name
    rows = _rows(out)
    assert [int(r["number"]) for r in rows] == [0, 1, 2]
    for r in rows:
        assert 0.2 <= float(r["alpha"]) <= 1.2 and -0.3 <= float(r["beta"]) <= 0.9
        assert r["state"] == "COMPLETE" and Path(r["run_dir"]) == out / "trials" / f"trial_{r['number']}"
        results = json.loads((Path(r["run_dir"]) / "results.json").read_text())
        assert math.isclose(float(r["value"]), results["val_acc1_best"], rel_tol=1e-6)
        config = (Path(r["run_dir"]) / "config.yaml").read_text()
        assert f"alpha: {float(r['alpha'])!r}" in config or f"alpha: {r['alpha']}" in config
    best = json.loads((out / "best.json").read_text())
    top = max(rows, key=lambda r: float(r["value"]))
    assert best["value"] == pytest.approx(float(top["value"]))
    assert best["trial"] == int(top["number"]) or float(rows[best["trial"]]["value"]) == best["value"]
    assert (best["alpha"], best["beta"]) == (float(rows[best["trial"]]["alpha"]), float(rows[best["trial"]]["beta"]))


def test_intermediate_values_are_the_logged_epoch_accuracies(tpe_search):
    for trial in _study(tpe_search).trials:
        with (Path(trial.user_attrs["run_dir"]) / "metrics.csv").open() as f:
            logged = [(int(r["epoch"]), float(r["val/acc1"])) for r in csv.DictReader(f) if r.get("val/acc1")]
        assert len(logged) == 2
        assert sorted(trial.intermediate_values.items()) == logged  # exactly the logged per-epoch val/acc1


def test_report_only_regenerates(tpe_search, capsys):
    before = (tpe_search / "trials.csv").read_text()
    for name in ("best.json", "trials.csv", "landscape.png"):
        (tpe_search / name).unlink()
    code, out, err = _search(["--out", str(tpe_search), "--report-only"], capsys)
    assert code == 0 and "best: alpha" in out
    assert (tpe_search / "trials.csv").read_text() == before
    assert (tpe_search / "best.json").is_file() and (tpe_search / "landscape.png").stat().st_size > 10_000


def test_report_only_unknown_study(tpe_search, capsys):
    code, out, err = _search(["--out", str(tpe_search), "--report-only", "--study-name", "nope"], capsys)
    assert code == 2 and "no study 'nope'" in err.strip().splitlines()[-1] and "abkd_search" in err


def test_grid_visits_exactly_the_grid(setup, capsys):
    out = setup.root / "grid"
    code, stdout, err = _search(["--out", str(out), "--grid-alpha", "0.5", "1.0", "--grid-beta", "0.0", "0.5",
                                 *setup.run, *ONE_EPOCH], capsys)
    assert code == 0, err
    rows = _rows(out)
    assert sorted((float(r["alpha"]), float(r["beta"])) for r in rows) == [(0.5, 0.0), (0.5, 0.5), (1.0, 0.0),
                                                                            (1.0, 0.5)]
    assert all(r["state"] == "COMPLETE" for r in rows)
    trial_lines = [line for line in stdout.splitlines() if line.startswith("trial ")]
    assert len(trial_lines) == 4  # one console line per trial
    assert json.loads((out / "best.json").read_text())["search_space"]["mode"] == "grid"


def test_two_local_workers_share_one_study(setup, capsys):
    out = setup.root / "workers"
    code, stdout, err = _search(["--out", str(out), "--workers", "2", "--n-trials", "1", *setup.run,
                                 *ONE_EPOCH], capsys)
    assert code == 0, err
    trials = _study(out).trials
    assert len(trials) == 2  # = the sum of both workers' n_trials
    assert sorted(t.number for t in trials) == [0, 1]
    assert {t.user_attrs["worker"] for t in trials} == {0, 1}
    assert len({(t.params["alpha"], t.params["beta"]) for t in trials}) == 2
    assert len(_rows(out)) == 2


def test_failed_trial_is_recorded_and_reported(setup, capsys):
    out = setup.root / "failing"
    code, stdout, err = _search(["--out", str(out), "--n-trials", "1", *setup.run, *ONE_EPOCH,
                                 "--trainer.limit_val_batches", "0"], capsys)
    assert code == 1  # no trial completed
    assert "fail: SearchError: trial 0 finished without a validation accuracy" in stdout
    assert "Traceback" not in stdout + err
    rows = _rows(out)
    assert [r["state"] for r in rows] == ["FAIL"] and "without a validation accuracy" in rows[0]["error"]
