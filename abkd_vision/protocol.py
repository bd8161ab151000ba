"""A run's protocol, recorded in ``results.json`` so that every reported number says how it was obtained.

``results.json["protocol"]``::

    {"data": "CIFAR100DataModule", "num_classes": 100, "train_images": 50000,
     "val_is": "test split (paper protocol)" | "held-out split of the training set" | "val folder" | ...,
     "test_is": "test split", "val_split": null | {"size", "seed", "num_val", "num_train", "val_sha256", ...},
     "epochs": 240, "max_steps": null, "limit_train_batches": 1.0,
     "augmentation": "RandomCrop(...) + RandomHorizontalFlip(...) + ...", "strong_view": false,
     "batch_size": 64, "devices": 1, "accumulate_grad_batches": 1, "global_batch": 64, "precision": "32-true",
     "selection": {"val_acc1_best": "best epoch on test", "val_acc1_last": "last epoch", ...},
     "versions": {"torch": ..., "lightning": ..., ...}}

``selection`` names the rule behind every reported number: "last epoch", "best epoch on held-out" (selected on
images the test never sees) or "best epoch on test" (selected on the test images themselves: the papers'
convention, optimistic). Runs whose protocols differ in any of :data:`COMPARED` are not averaged together
(:func:`protocol_differences`); the library versions are recorded, not compared.

After a fit whose val split is held out, ``run.py fit`` tests on the test split (:func:`final_test`): the last
epoch's weights and, when a ``ModelCheckpoint`` monitors ``val/acc1``, the best held-out epoch's; their numbers
are ``results.json["test"]["last"]`` and ``["test"]["best_val"]``.

This module imports no torch at import time (the sweep tables use it).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

__all__ = ["BEST_HELD_OUT", "BEST_TEST", "COMPARED", "LAST", "TEST_SPLIT", "describe_transform", "final_test",
           "is_test", "protocol_differences", "run_protocol", "selection_rules"]

LAST = "last epoch"
BEST_HELD_OUT = "best epoch on held-out"
BEST_TEST = "best epoch on test"
TEST_SPLIT = "test split"
# The fields two runs must share to be averaged together (everything but the library versions).
COMPARED = ("data", "num_classes", "train_images", "val_is", "val_split", "epochs", "max_steps",
            "limit_train_batches", "augmentation", "strong_view", "batch_size", "devices", "accumulate_grad_batches",
            "global_batch", "precision", "selection")


def is_test(val_is: str | None) -> bool:
    """True when the val numbers are on test images (the paper protocol, or ImageNet's "val")."""
    return val_is is None or str(val_is).startswith("test")


def best_rule(val_is: str | None) -> str:
    return BEST_TEST if is_test(val_is) else BEST_HELD_OUT


def selection_rules(summary: dict, val_is: str | None) -> dict:
    """The rule behind every number ``summary`` (a ``results.json`` body) reports."""
    on = "test" if is_test(val_is) else "held-out"
    rules: dict = {}
    if "val_acc1_best" in summary:  # image classification
        rules.update({"val_acc1_best": f"{best_rule(val_is)} (top-1 on {on})", "best_epoch": best_rule(val_is),
                      "val_acc1_last": f"{LAST} (top-1 on {on})", "val_acc5_last": f"{LAST} (top-5 on {on})"})
        if "teacher_val_acc1" in summary:
            rules["teacher_val_acc1"] = f"the teacher at distillation start (top-1 on {on})"
        test = summary.get("test") or {}
        names = {"last": f"{LAST} (on test)", "best_val": f"{BEST_HELD_OUT} (on test)"}
        if test:
            rules["test"] = {k: names.get(k, "the checkpoint tested (on test)") for k in test}
    if "report_epoch" in summary:  # base-to-new
        best = f"best epoch by base accuracy on {on}"
        rules.update({"last": f"{LAST} (on {on})", "best_base": best,
                      "reported": best if summary.get("report_epoch") == "best_base" else f"{LAST} (on {on})"})
        if summary.get("test") is not None:
            rules["test"] = "the weights at the end of the run or of the checkpoint tested (on test)"
    return rules


def _short(obj) -> str:
    text = " ".join(repr(obj).split())
    return text.replace("( ", "(").replace(" )", ")")


def describe_transform(transform) -> str | None:
    """``"RandomCrop(size=(32, 32), padding=4) + RandomHorizontalFlip(p=0.5) + ..."`` for a Compose; the repr
    otherwise (None for none)."""
    if transform is None:
        return None
    steps = getattr(transform, "transforms", None)
    if isinstance(steps, (list, tuple)):
        return " + ".join(_short(t) for t in steps)
    return _short(transform)


def _split_summary(datamodule) -> dict | None:
    split = getattr(datamodule, "val_holdout", None)
    if split is None:
        return None
    return {k: split.record.get(k) for k in ("size", "seed", "num_val", "num_train", "val_sha256", "file")}


def run_protocol(trainer, module, summary: dict) -> dict:
    """The protocol of the run ``trainer`` carries out (see the module docstring)."""
    from abkd_vision.cli import library_versions

    dm = getattr(trainer, "datamodule", None)
    hp = getattr(dm, "hparams", {}) or {}
    batch = hp.get("batch_size")
    world = int(getattr(trainer, "world_size", 1) or 1)
    accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
    val_is = getattr(dm, "val_is", None)
    train_set = getattr(dm, "train_set", None)
    max_epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else None
    max_steps = trainer.max_steps if trainer.max_steps is not None and trainer.max_steps >= 0 else None
    limit = trainer.limit_train_batches
    split = _split_summary(dm)
    if split is not None:
        split = {k: v for k, v in split.items() if k != "file"}  # where the file lies is not the protocol
    return {
        "data": type(dm).__name__ if dm is not None else None,
        "num_classes": getattr(dm, "num_classes", None),
        "train_images": len(train_set) if train_set is not None else None,
        "val_is": val_is,
        "test_is": TEST_SPLIT,
        "val_split": split,
        "epochs": max_epochs,
        "max_steps": max_steps,
        "limit_train_batches": float(limit) if isinstance(limit, float) else limit,
        "augmentation": describe_transform(getattr(dm, "train_transform", None)),
        "strong_view": bool(getattr(dm, "strong_view", False)),
        "batch_size": batch,
        "devices": world,
        "accumulate_grad_batches": accumulate,
        "global_batch": batch * world * accumulate if batch else None,
        "precision": str(trainer.precision),
        "selection": selection_rules(summary, val_is),
        "versions": library_versions(),
    }


def protocol_differences(runs: Sequence[tuple[str, dict | None]]) -> list[str]:
    """``["precision (32-true in kd__A__seed1; bf16-mixed in kd__A__seed2)", ...]``: the :data:`COMPARED` fields
    on which the runs' protocols differ (a run without a recorded protocol differs in "protocol")."""
    if len(runs) < 2:
        return []
    recorded = [(rid, p) for rid, p in runs if isinstance(p, dict)]
    if not recorded:
        return []  # none recorded (older runs): nothing to compare
    if len(recorded) != len(runs):
        missing = [rid for rid, p in runs if not isinstance(p, dict)]
        return [f"protocol (not recorded in {', '.join(missing)})"]
    out = []
    for key in COMPARED:
        values: dict[str, list[str]] = {}
        for rid, p in recorded:
            values.setdefault(repr(p.get(key)), []).append(rid)
        if len(values) > 1:
            shown = "; ".join(f"{v if len(v) <= 80 else v[:77] + '...'} in {', '.join(ids)}"
                              for v, ids in values.items())
            out.append(f"{key} ({shown})")
    return out


def final_test(trainer, model, datamodule) -> list[str]:
    """After a fit whose val split is held out: test the last weights and, with a ``ModelCheckpoint`` on
    ``val/acc1``, the best held-out epoch's, on the test split (their results go into results.json). Nothing when
    the val split is the test split (its numbers are the test numbers already) or the fit was interrupted.
    Returns the tags tested."""
    val_is = getattr(datamodule, "val_is", None)
    if datamodule is None or val_is is None or is_test(val_is) or trainer.interrupted:
        return []
    if not hasattr(model, "test_results"):  # base-to-new: the module writes its test result itself
        trainer.test(model, datamodule=datamodule, verbose=False)
        return ["last"]
    tags = ["last"]
    model.test_tag = "last"
    try:
        trainer.test(model, datamodule=datamodule, verbose=False)
        best = next((cb.best_model_path for cb in trainer.checkpoint_callbacks
                     if getattr(cb, "monitor", None) == "val/acc1" and getattr(cb, "best_model_path", "")), "")
        if best and os.path.isfile(best):
            model.test_tag = "best_val"
            trainer.test(model, datamodule=datamodule, ckpt_path=best, verbose=False)
            tags.append("best_val")
    finally:
        model.test_tag = None
    return tags
