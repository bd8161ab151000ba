"""The LightningCLI of the suite: ``python run.py {fit,validate,test} --config ...``.

Models, data and heads are chosen by ``class_path`` in YAML configs (several ``--config`` files merge in
order). ``data.num_classes`` is linked into the model, the seed defaults to 0, and every run directory
gets ``config.yaml`` (the fully resolved config) and ``versions.json`` (library versions).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import platform
import re
import sys
import warnings
from importlib import metadata
from pathlib import Path

from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

# Imported so that configs can name classes by their short names and the models are registered.
import abkd_vision.data  # noqa: F401
import abkd_vision.heads  # noqa: F401
import abkd_vision.losses  # noqa: F401
import abkd_vision.models  # noqa: F401
from abkd_vision.io import atomic_write

_PACKAGES = ("abkd-vision", "torch", "torchvision", "lightning", "timm", "torchmetrics", "open_clip_torch",
             "jsonargparse", "omegaconf", "numpy")


# The frozen teachers and CLIP encoders are in eval mode on purpose; Lightning warns about any such module.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")

_CHATTER = re.compile(r"^(💡 Tip|GPU available|TPU available|HPU available|Seed set to|`Trainer\.fit` stopped)")


class _DropChatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _CHATTER.match(record.getMessage())


def quiet_lightning() -> None:
    """Keep library chatter (tips, device banners, deprecation warnings from dependencies) out of the console;
    the suite's own messages (teacher accuracy, results) stay. Used by ``make demo``."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.fabric.utilities.seed"):
        logging.getLogger(name).addFilter(_DropChatter())
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")


def library_versions() -> dict:
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


class RecordVersions(Callback):
    """Write ``versions.json`` next to the run's ``config.yaml`` (only into a logger's run directory)."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Without a logger trainer.log_dir is the working folder: a run writes only into its own run folder.
        log_dir = trainer.log_dir if trainer.logger is not None else None  # a collective under DDP
        if log_dir is None or not trainer.is_global_zero:
            return
        setup = run_setup(trainer, pl_module)
        atomic_write(Path(log_dir) / "versions.json", json.dumps({**library_versions(), "run": setup}, indent=2) + "\n")
        trainer.logger.log_hyperparams({f"run/{k}": v for k, v in setup.items()})


def run_setup(trainer: Trainer, pl_module: LightningModule) -> dict:
    """How the run is spread: processes, per-process and effective batch size, learning rate, precision."""
    hp = getattr(getattr(trainer, "datamodule", None), "hparams", {}) or {}
    batch = hp.get("batch_size")
    accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
    return {
        "world_size": trainer.world_size,
        "batch_size_per_process": batch,
        "accumulate_grad_batches": accumulate,
        "effective_batch_size": batch * trainer.world_size * accumulate if batch else None,
        "lr": getattr(pl_module, "lr", None),
        "precision": str(trainer.precision),
        "sync_batchnorm": any("SyncBatchNorm" in type(m).__name__ for m in pl_module.modules()),
    }


class ExactResume(Callback):
    """Make a run killed mid-epoch resumable exactly with ``--ckpt_path last``.

    Add it with ``ModelCheckpoint(every_n_train_steps=N, save_last=True)`` so that ``last.ckpt`` is written
    during the epoch. The training data then come in an order and with augmentations that depend only on the
    seed, the epoch and the sample (:mod:`abkd_vision.data.resumable`), and a restart skips the batches already
    done; the optimiser, schedules, KD warm-up, best-epoch tracking and loop counters come from the checkpoint.
    Single process; add ``trainer.deterministic: true`` for bit-identical CPU runs.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "exact_resume"):
            raise ValueError(
                f"ExactResume needs one of the suite's data modules (CIFAR100DataModule, ImageFolderDataModule, "
                f"BaseToNewDataModule), got {type(datamodule).__name__}"
            )
        datamodule.exact_resume = True


class SaveRunConfig(SaveConfigCallback):
    """LightningCLI's ``config.yaml``, written only into a logger's run directory (never the working folder)."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.logger is None:
            return
        super().setup(trainer, pl_module, stage)


class DistillationCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")


def main(args: list[str] | None = None, run: bool = True, exit_on_error: bool = True) -> DistillationCLI:
    return DistillationCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        trainer_defaults={"callbacks": [RecordVersions()]},
        save_config_callback=SaveRunConfig,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": exit_on_error},
        args=args,
        run=run,
    )


# Errors whose message already names the bad value and the fix: shown alone, without a traceback.
_USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, FloatingPointError, KeyError,
                ImportError)


def run(args: list[str] | None = None) -> int:
    """``run.py``: the CLI, with a bad input reported as one message printed last (exit code 2 for invalid
    arguments, 1 for errors found later). ``ABKD_DEBUG=1`` shows the full report and traceback instead."""
    from jsonargparse import ArgumentError

    from abkd_vision.errors import looks_like_parser_report, summarize_parser_error
    from abkd_vision.models import CheckpointError

    debug = bool(os.environ.get("ABKD_DEBUG"))
    try:
        main(args, exit_on_error=debug)
    except ArgumentError as err:
        text = summarize_parser_error(str(err))
        if "Problems parsing config" in text:
            text = _unparsable_configs(args if args is not None else sys.argv[1:]) or text
        print(f"error: invalid arguments\n{text}\n(run.py fit --help lists the options; "
              "ABKD_DEBUG=1 shows the parser's full report)", file=sys.stderr)
        return 2
    except (CheckpointError, *_USER_ERRORS) as err:
        if debug:
            raise
        text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        if looks_like_parser_report(text):  # our check failed while the parser instantiated the classes
            text = summarize_parser_error(text)
        elif isinstance(err, OSError) and err.filename and err.errno in (errno.ENOTDIR, errno.EACCES, errno.EROFS,
                                                                         errno.EEXIST):
            text = (f"cannot write to {err.filename} ({err.strerror}); choose a writable output folder, e.g. "
                    "--trainer.logger.init_args.save_dir runs (checkpoints and results go below it)")
        print(f"error: {text}\n(ABKD_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1
    return 0


def _unparsable_configs(args: list[str]) -> str:
    """Name the --config files that are not valid YAML, with the parser's position."""
    import yaml

    problems = []
    for flag, value in zip(args, args[1:]):
        if flag in ("--config", "-c") and Path(value).is_file():
            try:
                yaml.safe_load(Path(value).read_text())
            except yaml.YAMLError as err:
                problems.append(f"config file {value} is not valid YAML: {' '.join(str(err).split())}")
    return "\n".join(problems)
