"""Held-out validation splits carved from a training set: stratified per class, drawn by a seed, recorded.

``val_split`` is a fraction of the training images (``0.1``) or a count (``5000``). The count is shared out over
the classes in proportion to their sizes (largest remainders; ties go to the lower label), so every class keeps
its share; then each class's images are drawn by one ``random.Random(seed)`` visiting the labels in sorted order.
The draw depends only on the labels, the size and the seed: every run of a study with the same options holds out
the same images. The index list (positions in the full training set) is recorded as ``val_split.json`` in the run
folder and, with ``val_split_file``, in a file of its own that later runs read back (and check against their
training set) instead of drawing again.

``val_split.json``::

    {"format": "abkd-val-split/1", "dataset": "cifar100", "num_train_images": 50000,
     "labels_sha256": "<the ordered training labels (and file names) the indices refer to>",
     "size": 0.1, "seed": 0, "stratified": "per class", "num_val": 5000, "num_train": 45000,
     "val_sha256": "<sha256 of the sorted val indices>", "val_indices": [3, 17, ...]}

A split that leaves a class without a training image or without a validation image is an error naming the class;
a split as large as the training set is an error.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from abkd_vision.io import atomic_write

__all__ = ["HELD_OUT", "PAPER_PROTOCOL", "SPLIT_FILE", "SPLIT_FORMAT", "VAL_FOLDER", "ValSplit", "check_split_size",
           "class_quotas", "draw_split", "held_out_split", "labels_digest", "write_split_record"]

SPLIT_FORMAT = "abkd-val-split/1"
SPLIT_FILE = "val_split.json"
# What "val" is, as the run records say it (results.json's protocol.val_is).
PAPER_PROTOCOL = "test split (paper protocol)"
HELD_OUT = "held-out split of the training set"
VAL_FOLDER = "val folder"


def check_split_size(size) -> float | int | None:
    """``None``, a fraction in (0, 1) or a positive count; anything else is a ValueError naming the value."""
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, (int, float)):
        raise ValueError(f"val_split must be a fraction in (0, 1), a number of images or null, got {size!r}")
    if isinstance(size, float) and size.is_integer() and size >= 1:
        size = int(size)
    if isinstance(size, int):
        if size < 1:
            raise ValueError(f"val_split must be a positive number of images or a fraction in (0, 1), got {size}")
        return size
    if not (0.0 < size < 1.0) or not math.isfinite(size):
        raise ValueError(f"val_split as a fraction must lie in (0, 1), got {size}")
    return float(size)


def class_quotas(counts: dict[int, int], size: float | int) -> dict[int, int]:
    """Validation images per class: ``size`` (a fraction of all images, or a count) shared out in proportion to the
    class sizes by largest remainders (ties to the lower label). Their sum is ``round(size * N)`` or the count."""
    total = sum(counts.values())
    size = check_split_size(size)
    if isinstance(size, int):
        if size >= total:
            raise ValueError(f"a validation split of {size} images is as large as the training set ({total} images); "
                             "give fewer images or a fraction such as 0.1")
        k = size
    else:
        k = int(math.floor(size * total + 0.5))
    raw = {label: k * n / total for label, n in counts.items()}
    quotas = {label: int(math.floor(r)) for label, r in raw.items()}
    left = k - sum(quotas.values())
    for label in sorted(counts, key=lambda c: (-(raw[c] - quotas[c]), c))[:left]:
        quotas[label] += 1
    return quotas


def draw_split(labels: Sequence[int], size: float | int, seed: int,
               class_names: Sequence[str] | None = None) -> list[int]:
    """Sorted positions of the validation images: per class its quota (:func:`class_quotas`), drawn by one
    ``random.Random(seed)`` visiting the labels in sorted order. An error names a class left without training or
    without validation images."""
    by_label: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(int(label), []).append(i)
    if not by_label:
        raise ValueError("the training set has no image to hold a validation split out of")
    quotas = class_quotas({c: len(v) for c, v in by_label.items()}, size)

    def name(label: int) -> str:
        return repr(class_names[label]) if class_names is not None and 0 <= label < len(class_names) else str(label)

    no_val = [name(c) for c in sorted(by_label) if quotas[c] == 0]
    no_train = [name(c) for c in sorted(by_label) if quotas[c] >= len(by_label[c])]
    if no_train:
        raise ValueError(f"val_split {size} leaves class(es) {', '.join(no_train[:10])} without any training image "
                         f"(every one of its images would be held out); use a smaller val_split")
    if no_val:
        raise ValueError(f"val_split {size} leaves class(es) {', '.join(no_val[:10])}"
                         f"{' ...' if len(no_val) > 10 else ''} without any validation image; use a larger val_split "
                         f"(at least one image per class: {len(by_label)} images or more)")
    rng = random.Random(int(seed))
    out: list[int] = []
    for label in sorted(by_label):
        out += rng.sample(by_label[label], quotas[label])
    return sorted(out)


def labels_digest(entries: Iterable) -> str:
    """SHA-256 of the ordered training entries (labels, or ``(name, label)`` pairs) the indices refer to."""
    digest = hashlib.sha256()
    for entry in entries:
        digest.update((("\t".join(map(str, entry))) if isinstance(entry, (tuple, list)) else str(entry)).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def _indices_digest(indices: Sequence[int]) -> str:
    return hashlib.sha256(",".join(map(str, indices)).encode()).hexdigest()


@dataclass
class ValSplit:
    """The held-out positions and the rest, and the record written to ``val_split.json``."""

    train_indices: list[int]
    val_indices: list[int]
    record: dict

    def summary(self) -> dict:
        """The record without the index list (for results.json's protocol)."""
        return {k: v for k, v in self.record.items() if k != "val_indices"}


def _from_file(path: Path, num: int, digest: str, size, seed) -> list[int]:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"val_split_file {path} cannot be read as a split record ({err}); delete it to draw the "
                         "split again") from None
    if not isinstance(record, dict) or record.get("format") != SPLIT_FORMAT:
        raise ValueError(f"val_split_file {path} is not a validation split record ({SPLIT_FORMAT})")
    if record.get("num_train_images") != num or record.get("labels_sha256") != digest:
        raise ValueError(f"val_split_file {path} was drawn for another training set ({record.get('num_train_images')} "
                         f"images, labels sha256 {str(record.get('labels_sha256'))[:12]}…; this one has {num}, "
                         f"{digest[:12]}…); give another val_split_file or delete it to draw again")
    if (record.get("size"), record.get("seed")) != (size, seed):
        raise ValueError(f"val_split_file {path} holds a split of size {record.get('size')} drawn by seed "
                         f"{record.get('seed')}, but val_split {size} and val_split_seed {seed} were given; give "
                         "the file's values, another file, or delete it to draw again")
    indices = sorted(int(i) for i in record.get("val_indices", []))
    if not indices or indices[0] < 0 or indices[-1] >= num or len(set(indices)) != len(indices):
        raise ValueError(f"val_split_file {path}: its val_indices are not distinct positions in 0..{num - 1}")
    return indices


def held_out_split(labels: Sequence[int], size: float | int, seed: int, dataset: str, entries: Iterable | None = None,
                   class_names: Sequence[str] | None = None, path: str | Path | None = None) -> ValSplit:
    """The split of a training set with these ``labels``: read from ``path`` when that file exists (checked against
    this training set and these options), else drawn (:func:`draw_split`) and, with ``path``, written there.

    ``entries`` name the training images for the record's digest (default: the labels); ``dataset`` says which
    data it is (e.g. ``"cifar100"``)."""
    size = check_split_size(size)
    labels = [int(v) for v in labels]
    digest = labels_digest(entries if entries is not None else labels)
    path = Path(path).expanduser() if path else None
    if path is not None and path.is_file():
        val = _from_file(path, len(labels), digest, size, seed)
    else:
        val = draw_split(labels, size, seed, class_names)
    held = set(val)
    train = [i for i in range(len(labels)) if i not in held]
    record = {"format": SPLIT_FORMAT, "dataset": dataset, "num_train_images": len(labels), "labels_sha256": digest,
              "size": size, "seed": int(seed), "stratified": "per class", "num_val": len(val), "num_train": len(train),
              "val_sha256": _indices_digest(val), "file": str(path.resolve()) if path is not None else None,
              "val_indices": val}
    if path is not None and not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(record) + "\n")
    return ValSplit(train, val, record)


def write_split_record(trainer, split: ValSplit | None) -> Path | None:
    """``<run folder>/val_split.json`` (rank 0, only with a logger). ``trainer.log_dir`` is a collective under DDP:
    call this on every rank."""
    if split is None or trainer is None or getattr(trainer, "logger", None) is None:
        return None
    log_dir = trainer.log_dir
    if log_dir is None or not trainer.is_global_zero:
        return None
    return atomic_write(Path(log_dir) / SPLIT_FILE, json.dumps(split.record) + "\n")
