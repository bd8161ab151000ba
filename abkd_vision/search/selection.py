"""Where the search ranks its trials: on held-out images by default, never on the test images.

* CIFAR-100 / ImageFolder data (``val_split`` option): the search adds ``--data.init_args.val_split <--val-split>``
  and ``--data.init_args.val_split_seed <--val-split-seed>``: every trial trains on the rest of the training set,
  is pruned and ranked on the same held-out images, and ``setup("fit")`` never loads the test split. A run config
  that already holds images out (its own ``val_split``, or an ImageFolder ``val/`` folder) is kept as it is.
* Base-to-new data: ``--data.init_args.eval_split val`` (CoOp's val split; the test split is not listed). ImageNet
  has no val split in the CoOp layout (its "val" is the test images): an error unless ``--select-on-test``.
* ``--select-on-test``: the run config's own val loader (for CIFAR the test split, as the papers' grids); every
  output then says "selected on test".
"""

from __future__ import annotations

from abkd_vision.data.splits import HELD_OUT, VAL_FOLDER
from abkd_vision.protocol import is_test
from abkd_vision.search.space import SearchError

__all__ = ["SELECTED_ON_TEST", "parse_split_size", "plan_selection"]

SELECTED_ON_TEST = "selected on test"


def parse_split_size(text: str) -> float | int:
    """``--val-split``: ``0.1`` (a fraction) or ``5000`` (a number of images)."""
    try:
        value = float(text)
    except ValueError:
        raise SearchError(f"--val-split takes a fraction such as 0.1 or a number of images such as 5000, got "
                          f"{text!r}") from None
    if value.is_integer() and value >= 1:
        return int(value)
    if not 0 < value < 1:
        raise SearchError(f"--val-split {text}: a fraction must lie in (0, 1), a count must be a whole number >= 1")
    return value


def plan_selection(info: dict, select_on_test: bool, val_split: float | int, val_split_seed: int) -> tuple[list[str],
                                                                                                           dict]:
    """``(run arguments to add to every trial, the selection record)`` for the run config described by ``info``
    (:func:`abkd_vision.search.objective.check_run_config`). The record: ``selected_on`` (what the outputs say),
    ``held_out``, ``monitor``, ``test_images_read`` (whether a trial reads test images), ``args``."""
    monitor, val_is = info.get("monitor", "val/acc1"), info.get("val_is")

    def record(selected_on: str, held: bool, args: list[str]) -> tuple[list[str], dict]:
        return args, {"selected_on": selected_on, "held_out": held, "monitor": monitor,
                      "test_images_read": not held, "args": args}

    if select_on_test:
        if val_is is not None and not is_test(val_is):
            return record(f"{val_is} (held out: the run config's own val split)", True, [])
        return record(f"{SELECTED_ON_TEST} ({val_is or 'the run config’s val loader'})", False, [])
    if info.get("has_val_split"):
        if info.get("val_split") is not None:
            return record(f"{HELD_OUT} (val_split {info['val_split']} from the run config)", True, [])
        if val_is == VAL_FOLDER:
            return record(f"{VAL_FOLDER} (held out)", True, [])
        args = ["--data.init_args.val_split", repr(val_split), "--data.init_args.val_split_seed", str(val_split_seed)]
        return record(f"{HELD_OUT} (val_split {val_split}, seed {val_split_seed}, stratified per class)", True, args)
    if info.get("eval_split") is not None:  # base-to-new
        if info.get("dataset") == "ImageNet":
            raise SearchError("ImageNet has no val split in the CoOp layout (its 'val' images are the test images), "
                              "so a search on it would select on test; give --select-on-test to do so knowingly (the "
                              "outputs then say 'selected on test')")
        args = [] if info.get("eval_split") == "val" else ["--data.init_args.eval_split", "val"]
        return record("CoOp val split (held out)", True, args)
    raise SearchError(f"the run's data ({info.get('data')}) offers no held-out validation split the search knows of "
                      "(val_split, or eval_split for base-to-new); give --select-on-test to rank trials on its val "
                      "loader as it is (the outputs then say 'selected on test')")
