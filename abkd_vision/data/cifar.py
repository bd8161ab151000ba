"""CIFAR-100 LightningDataModule (torchvision ``CIFAR100`` with the standard KD augmentation).

On-disk layout (the official python version, as extracted from ``cifar-100-python.tar.gz``)::

    <root>/cifar-100-python/train   # pickle: b"data" uint8 [50000, 3072] (CHW rows), b"fine_labels"
    <root>/cifar-100-python/test    # pickle: b"data" uint8 [10000, 3072], b"fine_labels"
    <root>/cifar-100-python/meta    # pickle: b"fine_label_names" (100 names, label i = line i)

Splits: ``train`` = the 50,000 official training images; ``val`` **and** ``test`` = the 10,000 official test
images. CIFAR knowledge-distillation papers (KD, CRD, DKD, ABKD, ...) train on the full training set and
report top-1 accuracy on the test set, so by default there is no held-out validation split (the paper
protocol, recorded as ``val_is: "test split (paper protocol)"``); the "validation" numbers logged during
training are then test-set numbers, and must not be used for model selection if you want an unbiased estimate.
With ``val_split`` (a fraction or a count) a stratified part of the training images is held out
(:mod:`abkd_vision.data.splits`): training uses the rest, ``val`` reads the held-out images (with the
evaluation transform) and ``test`` the official test split, which ``setup("fit")`` then does not load.

Batches: images ``float32 [B, 3, image_size, image_size]`` normalised with CIFAR-100 stats, labels
``int64 [B]`` in ``0..99``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torchvision.datasets import CIFAR100

from abkd_vision.data.base import ClassificationDataModule, resolve_num_workers
from abkd_vision.data.splits import HELD_OUT, PAPER_PROTOCOL, check_split_size
from abkd_vision.data.transforms import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    CropFlipViews,
    cifar_eval_transform,
    cifar_train_transform,
)

__all__ = ["CIFAR100_CLASSES", "CIFAR100DataModule"]

log = logging.getLogger(__name__)

CIFAR100_URL_PAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"

# The 100 fine label names in label order (identical to b"fine_label_names" of the official ``meta``),
# so that class_names is known before any file is read.
CIFAR100_CLASSES: tuple[str, ...] = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle",
    "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear",
    "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon",
    "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail",
    "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone",
    "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow_tree", "wolf", "woman", "worm",
)  # fmt: skip


class CIFAR100DataModule(ClassificationDataModule):
    """CIFAR-100 (torchvision ``CIFAR100``) for training and evaluating teachers and students.

    Args:
        root: directory that contains (or will receive) ``cifar-100-python/``.
        download: download the archive (~161 MB) in ``prepare_data`` if it is not already there.
            Off by default so that a run never touches the network unexpectedly.
        batch_size: training batch size.
        eval_batch_size: batch size of the val/test/predict loaders.
        num_workers: DataLoader worker processes (0 = load in the main process; None = one per CPU core free
            for this process, at most 8: :func:`~abkd_vision.data.base.auto_num_workers`).
        pin_memory: pin host memory (only applied when an accelerator is available).
        drop_last: drop the last incomplete training batch (the reference recipe does; keeps batch
            statistics of BatchNorm and the per-batch KD loss scale uniform). Eval loaders never drop.
        image_size: side of the square model input; 32 keeps the images untouched, other values resize
            (e.g. 224 for ImageNet-pretrained teachers).
        mean, std: normalisation statistics; ``None`` = CIFAR-100 training-set statistics.
        strong_view: two views of every training image (MLKD): training batches are
            ``([weak, strong], target, ...)`` with weak = the usual crop/flip and strong = MLKD's CIFAR strong view,
            RandomCrop(32, padding=4) + RandomHorizontalFlip + RandAugment(2, 10) + ToTensor + Normalize, drawn
            independently (see :meth:`~abkd_vision.data.base.ClassificationDataModule.init_strong_view`).
            Evaluation is unchanged.
        val_split: hold out a validation split from the training images: a fraction in (0, 1) or a number of
            images, stratified per class (:mod:`abkd_vision.data.splits`); None (default) = val is the test split.
        val_split_seed: the seed of that draw (the same seed and size give the same images in every run).
        val_split_file: a JSON file holding the split: read (and checked against the training set) when it exists,
            written there otherwise, so every run of a study uses one split. The run folder gets a copy,
            ``val_split.json``, in any case.
        on_device: decode every split once into a uint8 tensor on the training device and crop, flip and normalise
            there, batched (:mod:`abkd_vision.data.device`): the loaders yield index batches, no workers, no PIL. The
            views are the host path's seeded stream to the last bit (same batches, same teacher-cache view ids).
            Not with ``strong_view``; a split too large for the device's free memory is an error before training.

    Attributes:
        num_classes: 100.
        class_names: the 100 fine label names (label i = ``class_names[i]``); re-read from ``meta`` in setup.

    Val and test both use the official test split unless ``val_split`` holds images out (see the module docstring).
    """

    num_classes: int = 100

    def __init__(
        self,
        root: str = "data",
        download: bool = False,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        num_workers: int | None = None,
        pin_memory: bool = True,
        drop_last: bool = True,
        image_size: int = 32,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        strong_view: bool = False,
        val_split: float | int | None = None,
        val_split_seed: int = 0,
        val_split_file: str | None = None,
        on_device: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_split_size(val_split)
        if batch_size <= 0 or eval_batch_size <= 0:
            raise ValueError(f"batch sizes must be positive, got {batch_size=} {eval_batch_size=}")
        resolve_num_workers(num_workers)  # checks it
        self.root = Path(root).expanduser().resolve()
        self.data_dir = self.root / CIFAR100.base_folder
        self.class_names: list[str] = list(CIFAR100_CLASSES)
        mean = CIFAR100_MEAN if mean is None else mean
        std = CIFAR100_STD if std is None else std
        self.train_transform = cifar_train_transform(image_size, mean, std)
        self.eval_transform = cifar_eval_transform(image_size, mean, std)
        self.train_views = CropFlipViews(image_size, mean, std)  # the same augmentation, naming its view
        self.init_strong_view(strong_view)
        self.init_on_device(on_device, {})
        self.train_set: CIFAR100 | None = None
        self.test_set: CIFAR100 | None = None
        self.held_out_set = None  # with val_split: the held-out training images (eval transform)

    def view_dataset_key(self) -> dict:
        """What identifies the training images and their order (part of a teacher-logit cache key)."""
        if self.train_set is None:
            raise RuntimeError("call setup('fit') first")
        key = {"dataset": "cifar100", "split": "train", "num_images": len(self.train_set)}
        if self.val_holdout is not None:  # which images remain for training
            key["val_split_sha256"] = self.val_holdout.record["val_sha256"]
        return key

    # ------------------------------------------------------------------ availability and errors

    def _missing_files(self) -> list[str]:
        names = [name for name, _ in CIFAR100.train_list + CIFAR100.test_list] + [CIFAR100.meta["filename"]]
        return [name for name in names if not (self.data_dir / name).is_file()]

    def _not_found_message(self, reason: str) -> str:
        return (
            f"CIFAR-100 not found: {reason}. Looked for the directory {self.data_dir} "
            f"(files: train, test, meta). To get the data either\n"
            f"  * run with `--data.download true` on a machine with network access "
            f"(CIFAR100DataModule(download=True) downloads ~161 MB into {self.root}), or\n"
            f"  * download the official cifar-100-python.tar.gz (python version) from {CIFAR100_URL_PAGE} "
            f"and extract it under {self.root} (e.g. `tar -xzf cifar-100-python.tar.gz -C {self.root}`), "
            f"so that {self.data_dir / 'train'} exists."
        )

    def check_available(self) -> None:
        """Raise ``FileNotFoundError`` (with the path looked at and how to get the data) if files are missing."""
        missing = self._missing_files()
        if missing:
            reason = (
                "the directory does not exist"
                if not self.data_dir.is_dir()
                else f"missing file(s) {', '.join(missing)}"
            )
            if not self.hparams.download:
                reason += " and download=False"
            raise FileNotFoundError(self._not_found_message(reason))

    def _load(self, train: bool) -> CIFAR100:
        self.check_available()
        transform = self.train_transform if train else self.eval_transform
        try:
            # torchvision verifies the md5 of train, test and meta on every load, not only when downloading.
            return CIFAR100(str(self.root), train=train, transform=transform, download=False)
        except RuntimeError as exc:
            raise RuntimeError(
                f"CIFAR-100 files in {self.data_dir} exist but failed torchvision's md5 integrity check "
                f"(corrupted, truncated, or not the official cifar-100-python files): {exc}. Delete "
                f"{self.data_dir} and download again (`--data.download true`, or the official archive from "
                f"{CIFAR100_URL_PAGE})."
            ) from exc

    # ------------------------------------------------------------------ LightningDataModule hooks

    def prepare_data(self) -> None:
        """Download the archive when ``download=True`` (runs on one process only)."""
        if not self.hparams.download:
            return
        try:
            CIFAR100(str(self.root), train=True, download=True)
        except Exception as exc:  # no network, DNS failure, HTTP error, md5 mismatch of the archive, ...
            raise FileNotFoundError(
                self._not_found_message(f"download from {CIFAR100.url} failed ({type(exc).__name__}: {exc})")
            ) from exc

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets needed for ``stage`` (fit/validate/test/predict; None = all)."""
        held_out = self.hparams.val_split is not None
        if (stage in (None, "fit") or held_out and stage == "validate") and self.train_set is None:
            full = self._load(train=True)
            self.class_names = list(full.classes)
            if held_out:  # val = a stratified part of the training images; the test split is not loaded
                self.train_set, self.held_out_set = self.hold_out(full, full.targets, "cifar100")
            else:
                self.train_set = full
        if self.test_set is None and (not held_out or stage in (None, "test", "predict")):
            # without val_split val, test and predict all read the official test split: one dataset object.
            self.test_set = self._load(train=False)
            self.class_names = list(self.test_set.classes)
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{self.data_dir / 'meta'} lists {len(self.class_names)} fine label names, expected 100")

    @property
    def val_set(self) -> CIFAR100 | None:
        """The validation dataset: the official test split (same object as ``test_set``), or with ``val_split`` the
        held-out training images."""
        return self.held_out_set if self.hparams.val_split is not None else self.test_set

    @property
    def val_is(self) -> str:
        """What the val loader reads (recorded in results.json)."""
        return HELD_OUT if self.hparams.val_split is not None else PAPER_PROTOCOL
