"""``python -m abkd_vision.search``: search ABKD's (alpha, beta) with Optuna, one distillation run per trial.

examples:
  # TPE over the default ranges, 30 trials, MedianPruner on per-epoch val/acc1
  python -m abkd_vision.search --out runs/search/r32x4-r8x4 --n-trials 30 \\
      --config configs/cifar100/base.yaml --config configs/cifar100/abkd/resnet32x4-resnet8x4.yaml
  # an exact landscape: every grid point once
  python -m abkd_vision.search --out runs/search/grid --grid-alpha 0 0.5 1.0 --grid-beta 0 0.5 1.0 \\
      --config configs/demo/base.yaml --config configs/demo/abkd.yaml --config configs/demo/student.yaml
  # 2 local worker processes sharing the study, 10 trials each, with run overrides passed through
  python -m abkd_vision.search --out runs/search/x --workers 2 --n-trials 10 --config ... --trainer.max_epochs 60
  # workers on several machines: one database, the same --study-name, a distinct --worker-id per worker
  python -m abkd_vision.search --out runs/search/x --storage postgresql://user:pw@db/optuna --study-name r8x4 \\
      --worker-only --worker-id 3 --n-trials 10 --config ...
  # the outputs again from the storage, without training
  python -m abkd_vision.search --out runs/search/x --report-only
  # then confirm the best 2 points and the forward-KL baseline on the test split, 3 seeds each
  python -m abkd_vision.search --out runs/search/x --n-trials 30 --config ... --confirm-top 2 --confirm-seeds 0 1 2 \
      --baseline fkl
  # the paper's protocol: rank on the test split (the outputs say "selected on test")
  python -m abkd_vision.search --out runs/search/paper --select-on-test --grid-alpha ... --grid-beta ... --config ...

Trials are ranked on held-out images: for CIFAR-100/ImageFolder data a stratified --val-split of the training set
(the trials train on the rest, and the test split is never loaded), for base-to-new CoOp's val split.
Arguments this parser does not know (--trainer.*, --model.*, --data.*, ...) go to every run, as for run.py fit.
The search sets alpha/beta, --seed_everything and the logger folder (<out>/trials/trial_<n>) itself.
Exit code: 0 done, 1 no trial completed, a worker failed or the storage failed during the search, 2 bad input or
an unusable storage (nothing started), 130 interrupted. A storage failure ends with one message naming the storage
URL and the database's own reason.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from abkd_vision.commands import command_prog
from abkd_vision.search.space import SearchError, SearchSpace

DEFAULT_STUDY = "abkd_search"
_CHECKED_ENV = "ABKD_SEARCH_CHECKED"  # set for local worker processes: the parent checked the run config
_THREADS_ENV = "ABKD_SEARCH_THREADS"


class StorageFailed(SearchError):
    """The Optuna storage failed after it opened; ``code`` is the exit code (2 before any trial, 1 after)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=command_prog("python -m abkd_vision.search"), allow_abbrev=False,
                                description="Search ABKD's (alpha, beta) with Optuna (TPE or a grid), pruning on "
                                            "per-epoch val/acc1.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--out", type=Path, required=True,
                   help="search folder: best.json, trials.csv, landscape.png, trials/trial_<n>/, study.db")
    p.add_argument("--config", action="append", default=[], metavar="YAML",
                   help="run config, repeatable, merged in order as for run.py fit (an ABKD config)")
    g = p.add_argument_group("search space")
    g.add_argument("--alpha-range", nargs=2, type=float, default=[0.0, 1.5], metavar=("LOW", "HIGH"),
                   help="TPE range of alpha (default 0 1.5)")
    g.add_argument("--beta-range", nargs=2, type=float, default=[-0.5, 1.5], metavar=("LOW", "HIGH"),
                   help="TPE range of beta (default -0.5 1.5)")
    g.add_argument("--grid-alpha", nargs="+", type=float, default=[], metavar="A",
                   help="grid mode: alpha values (with --grid-beta; every (alpha, beta) once, GridSampler)")
    g.add_argument("--grid-beta", nargs="+", type=float, default=[], metavar="B", help="grid mode: beta values")
    g = p.add_argument_group("study")
    g.add_argument("--study-name", default=DEFAULT_STUDY, help=f"Optuna study name (default {DEFAULT_STUDY})")
    g.add_argument("--storage", help="Optuna storage URL (default sqlite:///<out>/study.db; PostgreSQL/MySQL URLs "
                                     "let workers on several machines share the study)")
    g.add_argument("--n-trials", type=int, default=None,
                   help="trials per worker (default 20; grid mode: until every grid point is done)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of every run (--seed_everything) and of the sampler (+ the worker id); default 0")
    g.add_argument("--pruner", choices=("median", "none"), default="median",
                   help="prune on per-epoch val/acc1 with MedianPruner (default) or not at all")
    g.add_argument("--pruner-startup-trials", type=int, default=5,
                   help="MedianPruner: no pruning until this many trials finished (default 5)")
    g.add_argument("--pruner-warmup-epochs", type=int, default=0,
                   help="MedianPruner: no pruning before this epoch (default 0)")
    g = p.add_argument_group("workers and outputs")
    g.add_argument("--workers", type=int, default=1,
                   help="local worker processes sharing the study, each running --n-trials (default 1: in-process)")
    g.add_argument("--worker-only", action="store_true",
                   help="run trials only (no final report); for workers you start yourself, e.g. on other machines")
    g.add_argument("--worker-id", type=int, default=0,
                   help="this worker's id (sampler seed = --seed + id; give workers you start yourself distinct ids)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per worker (default: torch's own for one worker, CPUs / workers for "
                        "local workers)")
    g.add_argument("--report-only", action="store_true",
                   help="only regenerate best.json, trials.csv and landscape.png from the storage")
    g = p.add_argument_group("where trials are ranked (never on test unless asked)")
    g.add_argument("--val-split", default="0.1", metavar="SIZE",
                   help="CIFAR-100/ImageFolder: hold out this fraction (0.1) or number (5000) of the training images, "
                        "stratified per class, and rank trials on them (default 0.1; base-to-new uses CoOp's val "
                        "split)")
    g.add_argument("--val-split-seed", type=int, default=0, help="seed of that split (default 0)")
    g.add_argument("--select-on-test", action="store_true",
                   help="rank trials on the run config's own val loader, for CIFAR the test split (the papers' "
                        "grids); the outputs then say 'selected on test'")
    g = p.add_argument_group("confirmation on the test split (after the search, same command)")
    g.add_argument("--confirm-top", type=int, default=0, metavar="K",
                   help="retrain the best K points and the baseline on the full training set and report them on the "
                        "test split (default 0: no confirmation)")
    g.add_argument("--confirm-seeds", nargs="+", type=int, default=[], metavar="SEED",
                   help="seeds of the confirmation runs (paired: each point and the baseline run with each seed)")
    g.add_argument("--baseline", choices=("fkl",), default=None,
                   help="fkl: the search's configs at alpha 1, beta 0 (forward KL, same temperature and weights)")
    g.add_argument("--baseline-config", default=None, metavar="YAML",
                   help="a baseline config in place of the last --config (e.g. configs/cifar100/kd/<pair>.yaml)")
    g.add_argument("--confirm-workers", type=int, default=None,
                   help="confirmation runs at a time (default 1; each is a run.py fit process)")
    g.add_argument("--run-script", type=Path, default=None, help=argparse.SUPPRESS)  # tests: a stand-in run.py
    return p


def backend_of(url: str) -> str:
    return url.split(":", 1)[0].split("+", 1)[0] if ":" in url else "unknown"


def database_error(err: BaseException | None) -> BaseException | None:
    """The database's own exception behind ``err`` (the driver's, e.g. ``sqlite3.OperationalError``), else the
    SQLAlchemy/Optuna storage exception in its chain; None when ``err`` did not come from the storage."""
    from optuna.exceptions import StorageInternalError
    from sqlalchemy.exc import DBAPIError, SQLAlchemyError

    found, seen = None, set()
    while err is not None and id(err) not in seen:  # optuna re-raises storage errors as their __cause__/__context__
        seen.add(id(err))
        if isinstance(err, DBAPIError) and err.orig is not None:
            return err.orig
        if found is None and isinstance(err, (SQLAlchemyError, StorageInternalError)):
            found = err
        err = err.__cause__ or err.__context__
    return found


def describe_error(err: BaseException) -> str:
    """``Type: message`` on one line, without SQLAlchemy's statement dump and link."""
    text = re.sub(r"\[SQL: .*|\(Background on this error at: [^)]*\)", "", " ".join(str(err).split())).strip()
    name = type(err).__name__ if type(err).__module__ in ("builtins", "sqlalchemy.exc") else \
        f"{type(err).__module__}.{type(err).__name__}"
    return f"{name}: {text[:300]}" if text else name


@contextmanager
def storage_errors(url: str, doing: str, code: int, advice: str):
    """Turn an exception that comes from the storage into StorageFailed: one message naming the URL and the cause."""
    from abkd_vision.search.landscape import redact

    try:
        yield
    except SearchError:
        raise
    except Exception as err:
        cause = database_error(err)
        if cause is None:
            raise
        raise StorageFailed(f"Optuna storage {redact(url)!r} (backend: {backend_of(url)}) failed {doing}: "
                            f"{describe_error(cause)}; {advice}", code) from None


def open_storage(url: str, out: Path):
    import optuna

    from abkd_vision.search.landscape import redact

    backend = backend_of(url)
    engine_kwargs = {"connect_args": {"timeout": 60}} if backend == "sqlite" else None
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    except Exception as err:  # driver missing, host unreachable, bad URL, ...: all the same advice
        raise SearchError(f"cannot open Optuna storage {redact(url)!r} (backend: {backend}): "
                          f"{describe_error(database_error(err) or err)}; check the URL, or use the default "
                          f"sqlite:///{out}/study.db") from None


def _check_args(args, extra: list[str]) -> SearchSpace:
    from abkd_vision.search.objective import check_passthrough

    space = SearchSpace.from_args(args.alpha_range, args.beta_range, args.grid_alpha, args.grid_beta)
    if args.report_only:
        if args.confirm_top:
            raise SearchError("--report-only trains nothing: confirm with the search's own command and --confirm-top")
        return space
    if not args.config:
        raise SearchError("give the run configs, as for run.py fit, e.g. --config configs/demo/base.yaml "
                          "--config configs/demo/abkd.yaml")
    for config in args.config:
        if not Path(config).is_file():
            raise SearchError(f"--config {config} not found")
    for name in ("n_trials", "workers", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SearchError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.pruner_startup_trials < 0 or args.pruner_warmup_epochs < 0:
        raise SearchError("--pruner-startup-trials and --pruner-warmup-epochs must be >= 0")
    if args.worker_only and args.workers != 1:
        raise SearchError("--worker-only runs one worker; --workers starts local workers, give one or the other")
    _check_confirmation(args)
    check_passthrough(extra)
    return space


def _check_confirmation(args) -> None:
    from abkd_vision.search.selection import parse_split_size

    args.val_split = parse_split_size(str(args.val_split))
    if args.confirm_top < 0:
        raise SearchError(f"--confirm-top must be >= 0, got {args.confirm_top}")
    if args.confirm_top == 0:
        given = [f for f, v in (("--confirm-seeds", args.confirm_seeds), ("--baseline", args.baseline),
                                ("--baseline-config", args.baseline_config)) if v]
        if given:
            raise SearchError(f"{', '.join(given)} configure the confirmation: add --confirm-top K")
        return
    if args.worker_only:
        raise SearchError("--worker-only runs trials only; confirm from the command that reports (without "
                          "--worker-only)")
    if not args.confirm_seeds:
        raise SearchError("--confirm-top needs the seeds of the confirmation runs, e.g. --confirm-seeds 0 1 2")
    if len(set(args.confirm_seeds)) != len(args.confirm_seeds):
        raise SearchError(f"--confirm-seeds repeats a seed: {args.confirm_seeds}")
    if args.baseline is None and args.baseline_config is None:
        raise SearchError("confirmation compares the best points with a baseline: give --baseline fkl (the "
                          "search's configs at alpha 1, beta 0: the forward KL at the same temperature and weights) "
                          "or --baseline-config <YAML> (a file in place of the last --config, e.g. "
                          "configs/cifar100/kd/resnet32x4-resnet8x4.yaml)")
    if args.baseline is not None and args.baseline_config is not None:
        raise SearchError("give --baseline fkl or --baseline-config, not both")
    if args.baseline_config is not None and not Path(args.baseline_config).is_file():
        raise SearchError(f"--baseline-config {args.baseline_config} not found")
    if args.confirm_workers is not None and args.confirm_workers < 1:
        raise SearchError(f"--confirm-workers must be >= 1, got {args.confirm_workers}")


def _pruner(args):
    import optuna

    if args.pruner == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=args.pruner_startup_trials,
                                       n_warmup_steps=args.pruner_warmup_epochs)


def _load_or_create(storage, args, space: SearchSpace, run_args: list[str], selection: dict | None = None):
    import optuna

    study = optuna.create_study(storage=storage, study_name=args.study_name, direction="maximize",
                                load_if_exists=True, sampler=space.sampler(args.seed + args.worker_id),
                                pruner=_pruner(args))
    stored = study.user_attrs.get("search_space")
    if selection is not None:
        known = study.user_attrs.get("selection")
        if known is None and stored is None:
            study.set_user_attr("selection", selection)
        elif known is None:
            raise SearchError(f"study {args.study_name!r} in this storage predates held-out searches (where its trials "
                              "were ranked is not recorded); give another --study-name")
        elif known.get("selected_on") != selection["selected_on"]:
            raise SearchError(f"study {args.study_name!r} ranks its trials on {known.get('selected_on')}, this search "
                              f"on {selection['selected_on']}; give the same selection options, or another "
                              "--study-name")
    if stored is None:
        study.set_user_attr("search_space", space.to_dict())
        study.set_user_attr("run_args", run_args)
        study.set_user_attr("seed", args.seed)
    elif stored != space.to_dict():
        raise SearchError(f"study {args.study_name!r} in this storage was created for another search space "
                          f"({SearchSpace.from_dict(stored).describe()}); give the same ranges/grid, or another "
                          "--study-name")
    return study


def _run_worker(study, space: SearchSpace, args, base: list[str], out: Path) -> None:
    import optuna
    import torch

    from abkd_vision.search.landscape import write_outputs
    from abkd_vision.search.objective import Objective, trial_line

    threads, previous_threads = args.threads or os.environ.get(_THREADS_ENV), torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    prefix = f"[worker {args.worker_id}] " if args.worker_only else ""

    def after_trial(study: optuna.Study, trial) -> None:
        print(prefix + trial_line(trial), flush=True)
        if not args.worker_only:
            write_outputs(study, out, args.storage)

    n_trials = args.n_trials if args.n_trials is not None else (None if space.is_grid else 20)
    try:
        study.optimize(Objective(space, base, out, args.seed, args.worker_id), n_trials=n_trials,
                       catch=(Exception,), callbacks=[after_trial])
    finally:
        torch.set_num_threads(previous_threads)


def _worker_command(args, extra: list[str], worker_id: int) -> list[str]:
    cmd = [sys.executable, "-m", "abkd_vision.search", "--out", str(args.out), "--study-name", args.study_name,
           "--storage", args.storage, "--seed", str(args.seed), "--pruner", args.pruner,
           "--pruner-startup-trials", str(args.pruner_startup_trials),
           "--pruner-warmup-epochs", str(args.pruner_warmup_epochs), "--worker-only", "--worker-id", str(worker_id)]
    if args.grid_alpha:
        cmd += ["--grid-alpha", *map(repr, args.grid_alpha), "--grid-beta", *map(repr, args.grid_beta)]
    else:
        cmd += ["--alpha-range", *map(repr, args.alpha_range), "--beta-range", *map(repr, args.beta_range)]
    if args.n_trials is not None:
        cmd += ["--n-trials", str(args.n_trials)]
    for config in args.config:
        cmd += ["--config", config]
    return cmd + extra


def _start_workers(args, extra: list[str]) -> int:
    env = {**os.environ, _CHECKED_ENV: "1",
           _THREADS_ENV: str(args.threads or max(1, (os.cpu_count() or 1) // args.workers))}
    procs = [subprocess.Popen(_worker_command(args, extra, args.worker_id + i), env=env)
             for i in range(args.workers)]
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        raise
    return max(codes)


def main(argv: list[str] | None = None) -> int:
    args, extra = parser().parse_known_args(argv)
    if extra and extra[0] == "fit":
        extra = extra[1:]
    try:
        space = _check_args(args, extra)
        args.out = args.out.resolve()
        if args.report_only and not args.out.is_dir() and args.storage is None:
            raise SearchError(f"--out {args.out} does not exist: nothing to report")
        args.out.mkdir(parents=True, exist_ok=True)
        if args.storage is None:
            args.storage = f"sqlite:///{args.out / 'study.db'}"
        return _main(args, extra, space)
    except StorageFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return err.code
    except SearchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to add trials, or --report-only for the outputs",
              file=sys.stderr)
        return 130


def _quiet() -> None:
    import optuna

    from abkd_vision.cli import quiet_lightning

    quiet_lightning()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    class _DropTrialFailed(logging.Filter):  # the search prints its own line for a failed trial
        def filter(self, record: logging.LogRecord) -> bool:
            return not (record.getMessage().startswith("Trial ") and " failed" in record.getMessage())

    optuna.logging.get_logger("optuna").addFilter(_DropTrialFailed())
    for name in ("optuna.study.study", "optuna.study._optimize"):
        logging.getLogger(name).addFilter(_DropTrialFailed())


def _main(args, extra: list[str], space: SearchSpace) -> int:
    import optuna

    from abkd_vision.search.landscape import redact
    from abkd_vision.search.objective import check_run_config, cli_args

    _quiet()
    storage = open_storage(args.storage, args.out)
    if args.report_only:
        with storage_errors(args.storage, "while reading the study", 2, "check the URL and that the database is "
                                                                         "reachable"):
            try:
                study = optuna.load_study(study_name=args.study_name, storage=storage)
            except KeyError:
                names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
                raise SearchError(f"no study {args.study_name!r} in {redact(args.storage)} (studies there: "
                                  f"{', '.join(names) or 'none'}); give --study-name") from None
        return _report(study, args)

    from abkd_vision.search.selection import plan_selection

    base = cli_args(args.config, extra)
    info = selection = None
    if not os.environ.get(_CHECKED_ENV):
        info = check_run_config(base, args.out)
        added, selection = plan_selection(info, args.select_on_test, args.val_split, args.val_split_seed)
        extra = [*extra, *added]
        base = cli_args(args.config, extra)
        if not args.worker_only:
            print(f"search: {space.describe()}; {info['model']} with {info['head']} + AlphaBetaDivergence "
                  f"(config alpha {info['config_alpha']}, beta {info['config_beta']}); trials ranked on "
                  f"{info['monitor']} of the {selection['selected_on']}; study {args.study_name!r} in "
                  f"{redact(args.storage)}", flush=True)
    with storage_errors(args.storage, "while creating the study", 2,
                        "no trial ran; the search needs a database it can write to: check the URL, the permissions "
                        "of the database and its folder and the free space, or give another --storage"):
        study = _load_or_create(storage, args, space, base, selection)
    if args.workers > 1:
        code = _start_workers(args, extra)
        status = _report(study, args)
        return max(code and 1, status, _confirm(study, args, extra, info, selection, status))
    with storage_errors(args.storage, "during the search", 1,
                        "the trials it recorded are kept; once the storage works again, run the same command to add "
                        "trials, or --report-only for the outputs"):
        _run_worker(study, space, args, base, args.out)
    if args.worker_only:
        return 0
    status = _report(study, args)
    return max(status, _confirm(study, args, extra, info, selection, status))


def _confirm(study, args, extra: list[str], info: dict | None, selection: dict | None, status: int) -> int:
    """The confirmation sweep (``--confirm-top``): 0 when it finished (or was not asked for), 1 otherwise."""
    if not args.confirm_top or status != 0 or info is None:
        return 0
    from abkd_vision.search.confirm import run_confirmation
    from abkd_vision.search.landscape import write_outputs

    user_extra = _without(extra, selection.get("args") if selection else [])
    record = run_confirmation(study, args.out, args.config, user_extra, info, selection, args.confirm_top,
                              args.confirm_seeds, args.baseline, args.baseline_config, args.confirm_workers,
                              args.run_script)
    with storage_errors(args.storage, "while writing the outputs", 1, "run again with --report-only"):
        paths = write_outputs(study, args.out, args.storage)["paths"]
    print(f"outputs: {paths['best']} (search and confirmation)  {args.out / 'confirmation.md'}")
    return 0 if record["exit_code"] == 0 and not record["missing"] else 1


def _without(extra: list[str], added: list[str]) -> list[str]:
    """``extra`` without the trailing arguments the selection added."""
    if added and extra[len(extra) - len(added):] == list(added):
        return extra[:len(extra) - len(added)]
    return list(extra)


def _report(study, args) -> int:
    from abkd_vision.search.landscape import write_outputs

    with storage_errors(args.storage, "while reading the trials for the outputs", 2 if args.report_only else 1,
                        "check that the database is reachable, then run again with --report-only"):
        result = write_outputs(study, args.out, args.storage)
    best, paths = result["best"], result["paths"]
    counts = f"{best['n_complete']} complete, {best['n_pruned']} pruned, {best['n_fail']} failed"
    if best["alpha"] is None:
        print(f"no completed trial ({counts}); outputs: {paths['csv']}", file=sys.stderr)
        return 1
    where = best.get("selected_on") or "an unrecorded split"
    print(f"best: alpha {best['alpha']:.4f}  beta {best['beta']:.4f}  {best.get('monitor') or 'val/acc1'} "
          f"{100 * best['value']:.2f}% on the {where}  (trial {best['trial']}, {best['run_dir']}; {counts})")
    print(f"outputs: {paths['best']}  {paths['csv']}  {paths['plot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
