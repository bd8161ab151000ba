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
from typing import Literal

from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

# Imported so that configs can name classes by their short names and the models are registered.
import abkd_vision.data  # noqa: F401
import abkd_vision.heads  # noqa: F401
import abkd_vision.losses  # noqa: F401
import abkd_vision.models  # noqa: F401
from abkd_vision.io import DiskFullError, atomic_write

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
    """Make the training data resumable exactly mid-epoch (on by default in ``run.py``).

    The training data then come in an order and with augmentations that depend only on the seed, the epoch and
    the sample (:mod:`abkd_vision.data.resumable`), and a restart skips the batches already done; the optimiser,
    schedules, KD warm-up, best-epoch tracking and loop counters come from the checkpoint, which
    :class:`abkd_vision.durable.ResumeCheckpoint` keeps current. Under DDP each process takes its share of the
    epoch's permutation (the rule of Lightning's DistributedSampler). Add ``trainer.deterministic: true`` for
    bit-identical CPU runs. ``required=False`` (the default callback) lets other data modules train as they are.
    """

    def __init__(self, required: bool = True):
        self.required = required

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "exact_resume"):
            if not self.required:
                if stage == "fit" and datamodule is not None:
                    rank_zero_info(f"{type(datamodule).__name__} has no seeded order: a resumed run continues from "
                                   "its checkpoint but draws a new order for the interrupted epoch")
                return
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

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "fit":
            from abkd_vision.resume import RESUME_CHANGES_CHOICES, RESUME_CHOICES

            parser.add_argument("--resume", type=Literal[RESUME_CHOICES], default="never",
                                help="auto: continue from the run folder's last.ckpt when there is one, else start "
                                     "fresh (the same command serves the first start and every restart)")
            parser.add_argument("--resume_changes", type=Literal[RESUME_CHANGES_CHOICES], default="error",
                                help="on resume, a result-changing key that differs from the checkpoint's "
                                     "configuration is an error (error) or takes effect from the resume point and "
                                     "is recorded in resumes.json (allow)")
        return parser

    def _instantiate_trainer(self, config: dict, callbacks: list[Callback]) -> Trainer:
        # last.ckpt is kept current unless the run turned checkpointing off
        from abkd_vision.durable import ResumeCheckpoint

        given = config.get("callbacks") or []
        given = given if isinstance(given, list) else [given]
        wanted = config.get("enable_checkpointing") is not False and not any(isinstance(c, ResumeCheckpoint)
                                                                              for c in given)
        extra = durable_callbacks() if wanted else []
        return super()._instantiate_trainer(config, [*callbacks, *extra])

    def _parse_ckpt_path(self) -> None:
        """Lightning would replace the given model arguments by the checkpoint's; here they are compared instead
        (``before_fit``), and a change is an error unless allowed."""

    def _flat_config(self, subcommand: str) -> dict:
        import yaml

        from abkd_vision.resume import flatten

        try:
            dumped = yaml.safe_load(self.parser.dump(self.config, skip_none=False, skip_link_targets=False))
        except Exception as err:  # noqa: BLE001 -- an object the parser cannot dump: compare hyper-parameters only
            rank_zero_info(f"the configuration could not be recorded in the checkpoints ({err}); a resume compares "
                           "the model and data hyper-parameters only")
            return {}
        return flatten(dumped.get(subcommand, dumped))

    def before_fit(self) -> None:
        from abkd_vision.durable import RUN_KEY, ResumeCheckpoint, last_checkpoint_dir
        from abkd_vision.resume import (
            ResumeError,
            config_differences,
            hparams_as_config,
            load_checkpoint_meta,
            pin_logger_version,
            preserve_metrics,
            record_resume,
        )

        trainer, config = self.trainer, self.config_init["fit"]
        refuse_empty_plan(trainer)
        durable = next((cb for cb in trainer.callbacks if isinstance(cb, ResumeCheckpoint)), None)
        given = self._flat_config("fit")
        if durable is not None:
            durable.run_config = given
        resume, allow = config.get("resume", "never"), config.get("resume_changes", "error") == "allow"
        ckpt = config.get("ckpt_path")
        if resume == "auto":
            if ckpt:
                raise ResumeError(f"give --resume auto or --ckpt_path ({ckpt}), not both")
            pin_logger_version(trainer.logger)
            folder = durable.folder(trainer) if durable is not None else last_checkpoint_dir(trainer)
            if folder is None:
                raise ResumeError("--resume auto needs a run folder to look in: configure a logger "
                                  "(trainer.logger) or a ModelCheckpoint dirpath")
            if (folder / "last.ckpt").is_file():
                ckpt = folder / "last.ckpt"
                rank_zero_info(f"continuing from {ckpt}")
            else:
                rank_zero_info(f"no {folder / 'last.ckpt'} yet: starting a new run")
        elif ckpt == "last":
            folder = durable.folder(trainer) if durable is not None else last_checkpoint_dir(trainer)
            if folder is None or not (folder / "last.ckpt").is_file():
                raise ResumeError(f"--ckpt_path last: no last.ckpt in {folder or 'the run (no run folder)'}; "
                                  "--resume auto starts fresh when there is none")
            ckpt = folder / "last.ckpt"
        if not ckpt:
            return
        checkpoint = load_checkpoint_meta(ckpt)
        run = checkpoint.get(RUN_KEY) or {}
        saved = run.get("config") or None
        if saved is None or not given:  # written by other code, or not recordable: model and data hyper-parameters
            saved = hparams_as_config(checkpoint)
            given = ({k: v for k, v in given.items() if k.startswith(("model.", "data."))} if given else
                     hparams_as_config({"hyper_parameters": dict(self.model.hparams_initial),
                                        "datamodule_hyper_parameters": dict(getattr(self.datamodule, "hparams_initial",
                                                                                    {}) or {})}))
        differences = config_differences(saved, given)
        history = list(run.get("resumes") or [])
        if differences and not allow:
            shown = "\n".join(f"  {key}: {old!r} in the checkpoint, {new!r} now" for key, old, new in differences)
            raise ResumeError(
                f"resuming {ckpt} with a different configuration:\n{shown}\nrun the same command without these "
                "changes to continue the run as it was, or add --resume_changes allow to apply them from the "
                f"resume point (epoch {checkpoint.get('epoch')}, step {checkpoint.get('global_step')}; recorded in "
                "resumes.json), or start a new run in another folder"
            )
        if differences:
            entry = {"checkpoint": str(ckpt), "epoch": checkpoint.get("epoch"), "global_step":
                     checkpoint.get("global_step"), "changes": {k: {"checkpoint": a, "now": b}
                                                               for k, a, b in differences}}
            history.append(entry)
            log_dir = trainer.log_dir if trainer.logger is not None else None
            if rank_zero_only.rank == 0:  # before the strategy is set up, the launcher's environment says the rank
                record_resume(Path(log_dir) if log_dir else None, entry)
            rank_zero_info(f"resuming with changes (recorded in resumes.json): {entry['changes']}")
        if durable is not None:
            durable.resume_history, durable.apply_changes = history, bool(differences)
        if rank_zero_only.rank == 0:
            preserve_metrics(trainer.logger, checkpoint)
        del checkpoint
        config["ckpt_path"] = str(ckpt)


    def after_fit(self) -> None:
        """With a held-out val split, test on the test split (last and best held-out epoch; results.json)."""
        from abkd_vision.protocol import final_test

        final_test(self.trainer, self.model, self.datamodule)


def refuse_empty_plan(trainer: Trainer) -> None:
    """A fit that would take no optimiser step is an error before anything runs."""
    if trainer.max_epochs == 0:
        raise ValueError("trainer.max_epochs 0 trains nothing; give at least 1 (run.py validate or test evaluates "
                         "without training)")
    if trainer.max_steps == 0:
        raise ValueError("trainer.max_steps 0 trains nothing; give at least 1, or -1 to train for max_epochs")
    limit = trainer.limit_train_batches
    if limit is not None and limit == 0:
        raise ValueError("trainer.limit_train_batches 0 trains nothing; give a positive fraction or count")


def durable_callbacks() -> list[Callback]:
    """Added to every run that checkpoints (with ``ExactResume``, a default callback): ``last.ckpt`` kept
    current."""
    from abkd_vision.durable import ResumeCheckpoint

    return [ResumeCheckpoint()]


def main(args: list[str] | None = None, run: bool = True, exit_on_error: bool = True,
         prog: str | None = None) -> DistillationCLI:
    """The CLI on ``args`` (default: the command line); ``prog`` is the program name its help shows."""
    return DistillationCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        trainer_defaults={"callbacks": [RecordVersions(), ExactResume(required=False)]},
        save_config_callback=SaveRunConfig,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": exit_on_error, **({"prog": prog} if prog else {})},
        args=args,
        run=run,
    )


# Errors whose message already names the bad value and the fix: shown alone, without a traceback.
_USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, FloatingPointError, KeyError,
                ImportError)


def run(args: list[str] | None = None, prog: str | None = None) -> int:
    """``run.py``: the CLI, with a bad input reported as one message printed last (exit code 2 for invalid
    arguments, 1 for errors found later). ``ABKD_DEBUG=1`` shows the full report and traceback instead.
    ``prog`` is how the program was called (``run.py``, ``abkd``), for the help and the messages."""
    from jsonargparse import ArgumentError
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from abkd_vision.durable import PREEMPTED_EXIT_CODE
    from abkd_vision.errors import looks_like_parser_report, summarize_parser_error
    from abkd_vision.models import CheckpointError

    debug = bool(os.environ.get("ABKD_DEBUG"))
    try:
        main(args, exit_on_error=debug, prog=prog)
    except ArgumentError as err:
        text = summarize_parser_error(str(err))
        if "Problems parsing config" in text:
            text = _unparsable_configs(args if args is not None else sys.argv[1:]) or text
        print(f"error: invalid arguments\n{text}\n({prog or 'run.py'} fit --help lists the options; "
              "ABKD_DEBUG=1 shows the parser's full report)", file=sys.stderr)
        return 2
    except SIGTERMException as err:  # a stop signal: last.ckpt and results.json are written
        stop = getattr(err, "abkd_stop", None)
        print(f"{stop or 'stopped by SIGTERM; run the same command with --resume auto to continue'}",
              file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except (CheckpointError, DiskFullError, *_USER_ERRORS) as err:
        if debug:
            raise
        text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        if looks_like_parser_report(text):  # our check failed while the parser instantiated the classes
            text = summarize_parser_error(text)
        elif isinstance(err, OSError) and not isinstance(err, DiskFullError) and err.filename:
            text = _os_error_text(err) or text
        print(f"error: {text}\n(ABKD_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1
    except OSError as err:  # e.g. a full disk inside a library, an unreadable input
        if debug or not err.filename and err.errno != errno.ENOSPC:
            raise
        text = _os_error_text(err) or str(err)
        print(f"error: {text}\n(ABKD_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1
    return 0


def _os_error_text(err: OSError) -> str | None:
    """What an OSError means for the user: an input that cannot be read, an output folder that cannot be
    written, a full disk."""
    name = err.filename
    if err.errno == errno.ENOSPC:
        return str(DiskFullError(name)) if name else f"no space left on device ({err})"
    if err.errno == errno.EACCES and name and os.path.exists(name) and not os.access(name, os.R_OK):
        return f"cannot read {name} ({err.strerror}); make it readable (chmod a+r) or point the config elsewhere"
    if err.errno in (errno.ENOTDIR, errno.EACCES, errno.EROFS, errno.EEXIST):
        return (f"cannot write to {name} ({err.strerror}); choose a writable output folder, e.g. "
                "--trainer.logger.init_args.save_dir runs (checkpoints and results go below it)")
    return None


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
