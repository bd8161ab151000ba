"""Continuing a run: which checkpoint, whether it fits the configuration given now, and what changes apply.

``run.py fit ... --resume auto`` continues from the run folder's ``last.ckpt`` when there is one and starts fresh
otherwise, so the same command line serves the first start and every restart. With an automatic logger version
(``version: null``), the newest ``version_N`` of the run's name that has a ``last.ckpt`` is continued.

On resume the given configuration is compared with the one saved in the checkpoint (by
:class:`abkd_vision.durable.ResumeCheckpoint`). A difference in anything that changes the result is an error
listing each key with both values; ``--resume_changes allow`` applies the new values from the resume point
(optimiser and schedule included) and records them, with the epoch and step, in ``<run>/resumes.json`` and in
later checkpoints. Keys that only change how a run is executed or logged (:data:`RUN_ONLY_KEYS`) may differ.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

from abkd_vision.io import atomic_write

__all__ = ["RESUME_CHOICES", "RESUME_CHANGES_CHOICES", "RUN_ONLY_KEYS", "ResumeError", "config_differences",
           "flatten", "load_checkpoint_meta", "pin_logger_version", "preserve_metrics", "record_resume",
           "refresh_optimizers"]

RESUME_CHOICES = ("never", "auto")
RESUME_CHANGES_CHOICES = ("error", "allow")

# Keys whose value does not change what a run computes: where it runs and logs, how fast, how often it
# evaluates. Everything else (model, head, divergence, alpha/beta, weights, optimiser and schedule, epochs, data,
# augmentation, seed, batch size, devices, precision) must match on resume unless changes are allowed.
RUN_ONLY_KEYS = (
    "config", "ckpt_path", "resume", "resume_changes",
    "trainer.logger", "trainer.callbacks", "trainer.enable_progress_bar", "trainer.enable_model_summary",
    "trainer.enable_checkpointing", "trainer.log_every_n_steps", "trainer.default_root_dir", "trainer.profiler",
    "trainer.num_sanity_val_steps", "trainer.accelerator", "trainer.barebones", "trainer.detect_anomaly",
    "trainer.plugins", "trainer.max_time", "trainer.val_check_interval", "trainer.check_val_every_n_epoch",
    "trainer.limit_val_batches", "trainer.limit_test_batches", "trainer.limit_predict_batches",
    "trainer.inference_mode", "trainer.benchmark", "trainer.deterministic", "trainer.model_registry",
    "*.root", "*.num_workers", "*.pin_memory", "*.eval_batch_size", "*.check_images", "*.on_bad_image",
    "*.teacher_cache", "*.teacher_logit_cache", "*.compile", "*.channels_last", "*.nonfinite",
    "*.max_skipped_steps", "*.diagnostics",
)


class ResumeError(ValueError):
    """A resume that cannot go ahead as asked (the message names what and the fix)."""


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and scalars are leaves."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: tree}


def _run_only(key: str) -> bool:
    for pattern in RUN_ONLY_KEYS:
        if pattern.startswith("*."):
            if key.endswith(pattern[1:]) or f"{pattern[1:]}." in key:
                return True
        elif key == pattern or key.startswith(pattern + "."):
            return True
    return False


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b and type(a) is type(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def config_differences(saved: dict, given: dict) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, given value)`` for every result-changing key that differs (flattened configs)."""
    missing = object()
    out = []
    for key in sorted(set(saved) | set(given)):
        if _run_only(key):
            continue
        a, b = saved.get(key, missing), given.get(key, missing)
        if a is missing and b is None or b is missing and a is None:
            continue  # a key one version of the suite has and the other not, left at its default
        if a is missing or b is missing or not _same(a, b):
            out.append((key, None if a is missing else a, None if b is missing else b))
    return out


def hparams_as_config(checkpoint: dict) -> dict:
    """A checkpoint without a saved run configuration: its model and data hyper-parameters, as config keys."""
    out = {}
    for section, key in (("model", "hyper_parameters"), ("data", "datamodule_hyper_parameters")):
        hp = dict(checkpoint.get(key) or {})
        hp.pop("_instantiator", None)
        class_path = hp.pop("_class_path", None)
        if class_path:
            out[f"{section}.class_path"] = class_path
        out.update(flatten(hp, f"{section}.init_args"))
    return out


def load_checkpoint_meta(path: str | Path) -> dict:
    """The checkpoint at ``path`` (memory-mapped, tensors not read), checked to be a resumable Lightning file."""
    import pickle
    import zipfile

    import torch

    path = Path(path)
    if path.is_dir():
        raise ResumeError(f"--ckpt_path {path} is a folder, not a checkpoint file; give its last.ckpt (or use "
                          "--resume auto)")
    if not path.is_file():
        raise ResumeError(f"--ckpt_path {path}: no such file; --resume auto continues from the run's last.ckpt "
                          "when there is one")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
    is_zip = head == b"PK\x03\x04"  # torch.save's format since 1.6
    advice = ("Resume from another checkpoint of the run (its best-epoch file, or a copy), or start afresh "
              "without --ckpt_path")
    if is_zip and not zipfile.is_zipfile(path):
        raise ResumeError(f"cannot resume from {path} ({size:,} bytes): the file is truncated or corrupt (its zip "
                          f"directory is missing: the write did not complete). {advice}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", mmap=is_zip, weights_only=False)
    except PermissionError:
        raise  # run.py says "cannot read <file>"
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError, KeyError,
            AttributeError, ModuleNotFoundError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        kind = "is truncated or corrupt" if is_zip or isinstance(err, EOFError) else "is not a PyTorch checkpoint"
        raise ResumeError(f"cannot resume from {path} ({size:,} bytes): the file {kind} ({first[:200]}). "
                          f"{advice}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "loops" not in checkpoint:
        keys = list(checkpoint)[:6] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ResumeError(f"{path} is not a Lightning training checkpoint (it has no training state; top-level "
                          f"keys: {keys}). A plain state dict initialises a model instead: for a teacher use "
                          "model.init_args.teacher_ckpt; --ckpt_path takes a last.ckpt or *.ckpt of a run")
    return checkpoint


def pin_logger_version(logger) -> Path | None:
    """For ``--resume auto`` with an automatic version: reuse the newest ``version_N`` folder of the run that has
    ``checkpoints/last.ckpt`` (returned), so the restart continues it instead of starting ``version_N+1``."""
    if logger is None or getattr(logger, "_version", "unset") is not None or not hasattr(logger, "root_dir"):
        return None
    root = Path(logger.root_dir)
    if not root.is_dir():
        return None
    found = []
    for child in root.iterdir():
        if child.is_dir() and child.name.startswith("version_") and child.name[8:].isdigit():
            if (child / "checkpoints" / "last.ckpt").is_file():
                found.append(int(child.name[8:]))
    if not found:
        return None
    logger._version = max(found)
    return root / f"version_{max(found)}" / "checkpoints" / "last.ckpt"


def preserve_metrics(logger, checkpoint: dict) -> int | None:
    """Keep the CSV rows logged up to the checkpoint in ``metrics.csv`` (Lightning's CSV writer would delete the
    file); rows logged after it are dropped, since the resumed run logs those steps again. Returns the rows kept."""
    from lightning.pytorch.loggers import CSVLogger

    if not isinstance(logger, CSVLogger):
        return None
    path = Path(logger.log_dir) / "metrics.csv"
    if not path.is_file():
        return None
    text = path.read_text()
    try:
        loop = checkpoint["loops"]["fit_loop"]["epoch_loop.state_dict"]
        last_step = int(loop["_batches_that_stepped"])
    except (KeyError, TypeError, ValueError):
        last_step = None
    rows = list(csv.DictReader(io.StringIO(text)))
    header = next(csv.reader(io.StringIO(text)), [])
    if last_step is not None:
        rows = [r for r in rows if not r.get("step") or float(r["step"]) <= last_step]
    writer = logger.experiment  # creating it removes metrics.csv
    buffer = io.StringIO()
    out = csv.DictWriter(buffer, fieldnames=header)
    out.writeheader()
    out.writerows(rows)
    atomic_write(path, buffer.getvalue())
    writer.metrics_keys = sorted(header)
    return len(rows)


def record_resume(folder: Path | None, entry: dict) -> None:
    """Append ``entry`` to ``<run>/resumes.json`` (the run's history of resumes with changes)."""
    if folder is None:
        return
    path = Path(folder) / "resumes.json"
    try:
        history = json.loads(path.read_text()) if path.is_file() else []
    except (OSError, ValueError):
        history = []
    history.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **entry})
    atomic_write(path, json.dumps(history, indent=1, default=str) + "\n")


def refresh_optimizers(trainer, module) -> list[str]:
    """After a resume with allowed changes: the optimisers' hyper-parameters (lr, momentum, weight decay, ...)
    and the schedulers' settings come from the new configuration, at the schedule's current position; the
    optimiser state (momentum buffers) stays. Returns what was changed, for the record."""
    import torch
    from lightning.pytorch.core.optimizer import _init_optimizers_and_lr_schedulers

    # Lightning's own parsing of configure_optimizers, so the pairs match trainer.optimizers/lr_scheduler_configs
    optimizers, configs = _init_optimizers_and_lr_schedulers(module)
    schedulers = [cfg.scheduler for cfg in configs]
    changed = []
    live_schedulers = [cfg.scheduler for cfg in trainer.lr_scheduler_configs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": nothing is trained here
        for live, new in zip(live_schedulers, schedulers):  # the new schedule, at the live one's position
            for _ in range(int(getattr(live, "last_epoch", 0))):
                new.step()
            live.load_state_dict(new.state_dict())
    for i, (live, new) in enumerate(zip(trainer.optimizers, optimizers)):
        for j, (group, new_group) in enumerate(zip(live.param_groups, new.param_groups)):
            for key, value in new_group.items():
                if key == "params":
                    continue
                old = group.get(key)
                if not _same(old, value) and not (isinstance(value, torch.Tensor)):
                    changed.append(f"optimizer {i} group {j} {key}: {old} -> {value}")
                group[key] = value
    return changed

