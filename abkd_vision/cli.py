"""The LightningCLI of the suite: ``python run.py {fit,validate,test} --config ...``.

Models, data and heads are chosen by ``class_path`` in YAML configs (several ``--config`` files merge in
order). ``data.num_classes`` is linked into the model, the seed defaults to 0, and every run directory
gets ``config.yaml`` (the fully resolved config) and ``versions.json`` (library versions).
"""

from __future__ import annotations

import json
import logging
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
        atomic_write(Path(log_dir) / "versions.json", json.dumps(library_versions(), indent=2) + "\n")


class SaveRunConfig(SaveConfigCallback):
    """LightningCLI's ``config.yaml``, written only into a logger's run directory (never the working folder)."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.logger is None:
            return
        super().setup(trainer, pl_module, stage)


class DistillationCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")


def main(args: list[str] | None = None, run: bool = True) -> DistillationCLI:
    return DistillationCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        trainer_defaults={"callbacks": [RecordVersions()]},
        save_config_callback=SaveRunConfig,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "omegaconf"},
        args=args,
        run=run,
    )
