"""One trial = one distillation run through the real CLI, in-process, pruned on its per-epoch validation metric
(``val/acc1`` for image classification, ``val/hm`` for base-to-new)."""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import optuna
from lightning.pytorch import Callback, LightningModule, Trainer

from abkd_vision.search.space import ALPHA_KEY, BETA_KEY, SearchError, SearchSpace

METRIC = "val/acc1"
BASE_TO_NEW_METRIC = "val/hm"
# Keys the search sets itself; the user may not pass them.
RESERVED = (ALPHA_KEY, BETA_KEY, "seed_everything", "trainer.logger.init_args.save_dir",
            "trainer.logger.init_args.name", "trainer.logger.init_args.version")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


class OptunaPruning(Callback):
    """Report the epoch's ``val/acc1`` to the trial (step = epoch) and stop the run when the pruner says so.

    Runs in ``on_validation_end``, after the module has logged the epoch's accuracy; the sanity check is skipped.
    """

    def __init__(self, trial: optuna.Trial, monitor: str = METRIC):
        self.trial, self.monitor = trial, monitor

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise SearchError(f"the run logged no {self.monitor!r}: the search needs a module that logs it "
                              "(ClassifierModule/DistillationModule do)")
        value = float(value)
        epoch = trainer.current_epoch
        self.trial.report(value, step=epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch} ({self.monitor} {value:.4f})")


def search_metric(model) -> str:
    """What the search ranks a run by: ``val/acc1`` (its best epoch) for the image-classification modules,
    ``val/hm`` (its best epoch) for the base-to-new ones."""
    return BASE_TO_NEW_METRIC if hasattr(model, "history") and hasattr(model, "report_epoch") else METRIC


def search_value(model, summary: dict) -> float | None:
    """The run's search value: its best per-epoch validation metric (see :func:`search_metric`)."""
    if search_metric(model) == BASE_TO_NEW_METRIC:
        values = [h.get("hm") for h in summary.get("history") or []]
        values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
        return max(values) if values else None
    return summary.get("val_acc1_best")


def check_passthrough(extra: list[str]) -> None:
    for arg in extra:
        key = arg.split("=", 1)[0].lstrip("-")
        if key in RESERVED:
            raise SearchError(f"--{key} is set by the search for every trial; leave it out of the run arguments "
                              "(use --alpha-range/--beta-range or --grid-alpha/--grid-beta, --seed, --out)")


def cli_args(configs: list[str], extra: list[str]) -> list[str]:
    return [a for c in configs for a in ("--config", str(c))] + list(extra)


def trial_args(base: list[str], out: Path, number: int, alpha: float, beta: float, seed: int) -> list[str]:
    return [*base, *QUIET,
            f"--{ALPHA_KEY}", repr(alpha), f"--{BETA_KEY}", repr(beta), "--seed_everything", str(seed),
            "--trainer.logger.init_args.save_dir", str(out / "trials"),
            "--trainer.logger.init_args.name", "", "--trainer.logger.init_args.version", f"trial_{number}"]


def build_cli(args: list[str]):
    """The LightningCLI object without fitting; a parser error becomes a SearchError with one clear message."""
    from jsonargparse import ArgumentError

    from abkd_vision.cli import main as cli_main
    from abkd_vision.errors import looks_like_parser_report, summarize_parser_error

    try:
        with warnings.catch_warnings():  # LightningCLI warns about args given beside our own sys.argv
            warnings.filterwarnings("ignore", message=r".*args parameter is intended to run from within Python.*")
            return cli_main(args, run=False, exit_on_error=False)
    except ArgumentError as err:
        raise SearchError(f"invalid run arguments\n{summarize_parser_error(str(err))}") from None
    except (ValueError, FileNotFoundError, KeyError, ImportError) as err:
        text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        if looks_like_parser_report(text):
            text = summarize_parser_error(text)
        raise SearchError(text) from None


def check_run_config(base: list[str], out: Path) -> dict:
    """Build the run once (no fitting) and check that it distils with an AlphaBetaDivergence at the search's key."""
    from abkd_vision.losses import AlphaBetaDivergence

    cli = build_cli([*base, *QUIET, "--trainer.logger.init_args.save_dir", str(out / "trials"),
                     "--trainer.logger.init_args.name", "", "--trainer.logger.init_args.version", "config_check"])
    head = getattr(cli.model, "head", None)
    divergence = getattr(head, "divergence", None)
    if not isinstance(divergence, AlphaBetaDivergence):
        what = (f"{type(cli.model).__name__} has no KD head" if head is None else
                f"the head {type(head).__name__} uses {type(divergence).__name__}")
        raise SearchError(f"the run config has no AlphaBetaDivergence at {ALPHA_KEY.rsplit('.', 2)[0]} ({what}); "
                          "give an ABKD config, e.g. --config configs/cifar100/base.yaml "
                          "--config configs/cifar100/abkd/<pair>.yaml")
    dm = cli.datamodule
    hp = dict(getattr(dm, "hparams", {}) or {})
    return {"model": type(cli.model).__name__, "head": type(head).__name__,
            "config_alpha": float(divergence.alpha), "config_beta": float(divergence.beta),
            "data": type(dm).__name__, "val_is": getattr(dm, "val_is", None), "has_val_split": "val_split" in hp,
            "val_split": hp.get("val_split"), "eval_split": hp.get("eval_split"), "dataset": hp.get("dataset"),
            "monitor": search_metric(cli.model)}


class Objective:
    """Optuna objective: train the run for the trial's (alpha, beta) and return its best validation metric
    (``val/acc1``, or ``val/hm`` for base-to-new; on the held-out split unless the search selects on test)."""

    def __init__(self, space: SearchSpace, base: list[str], out: Path, seed: int, worker: int = 0):
        self.space, self.base, self.out, self.seed, self.worker = space, base, out, seed, worker

    def __call__(self, trial: optuna.Trial) -> float:
        alpha, beta = self.space.suggest(trial)
        run_dir = self.out / "trials" / f"trial_{trial.number}"
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("worker", self.worker)
        trial.set_user_attr("seed", self.seed)
        try:
            return self._run(trial, alpha, beta)
        except optuna.TrialPruned:
            raise
        except Exception as err:  # recorded for trials.csv and the console line; Optuna marks the trial failed
            trial.set_user_attr("error", f"{type(err).__name__}: {' '.join(str(err).split())[:300]}")
            raise

    def _run(self, trial: optuna.Trial, alpha: float, beta: float) -> float:
        cli = build_cli(trial_args(self.base, self.out, trial.number, alpha, beta, self.seed))
        trial.set_user_attr("monitor", search_metric(cli.model))
        cli.trainer.callbacks.append(OptunaPruning(trial, search_metric(cli.model)))
        lightning_log = logging.getLogger("lightning.pytorch")
        level = lightning_log.level
        lightning_log.setLevel(logging.WARNING)  # the per-run teacher line etc.: the search prints its own line
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cli.trainer.fit(cli.model, datamodule=cli.datamodule)
                summary = cli.model.summary()
        finally:
            lightning_log.setLevel(level)
        for key in ("best_epoch", "epochs", "teacher_val_acc1"):
            if summary.get(key) is not None:
                trial.set_user_attr(key, summary[key])
        value = search_value(cli.model, summary)
        if value is None or not math.isfinite(value):
            raise SearchError(f"trial {trial.number} finished without a validation accuracy "
                              "(check trainer.limit_val_batches / check_val_every_n_epoch)")
        return float(value)


def trial_line(trial, total_width: int = 0) -> str:
    """One console line for a finished trial."""
    a, b = trial.params.get("alpha"), trial.params.get("beta")
    ab = f"alpha {a:7.4f}  beta {b:7.4f}" if a is not None and b is not None else "alpha     ?    beta     ?   "
    duration = trial.duration.total_seconds() if trial.duration is not None else float("nan")
    state = trial.state.name.lower()
    if trial.state.name == "COMPLETE":
        result = f"{trial.user_attrs.get('monitor', METRIC)} best {100 * trial.value:6.2f}%"
    elif trial.state.name == "PRUNED":
        steps = sorted(trial.intermediate_values)
        last = trial.intermediate_values[steps[-1]] if steps else None
        result = (f"pruned after epoch {steps[-1]} ({100 * last:.2f}%)" if steps else "pruned")
    else:
        result = f"{state}: {trial.user_attrs.get('error', '')}".rstrip(": ")
    return f"trial {trial.number:>{total_width}}  {ab}  {result}  ({duration:.1f} s)"
