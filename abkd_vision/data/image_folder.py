"""LightningDataModule for any image-classification dataset stored as class folders (torchvision ``ImageFolder``).

Expected layout (``val`` is optional)::

    <root>/train/<class_name>/<any name>.png   # also .jpg .jpeg .bmp .ppm .pgm .tif .tiff .webp
    <root>/test/<class_name>/...
    <root>/val/<class_name>/...                # optional

Splits: train = ``train``; if ``val`` exists, val = ``val`` and test = ``test``, otherwise val and test both
read ``test`` (the CIFAR convention, see :mod:`abkd_vision.data.cifar`), unless ``val_split`` holds a stratified
part of ``train`` out as val (:mod:`abkd_vision.data.splits`; ``test`` is then read only by test and predict).
The records say which (``val_is``: "val folder", "held-out split of the training set" or "test split (paper
protocol)"). All splits must contain the same
class folders; label ``i`` is the ``i``-th class folder name in sorted order (``ImageFolder`` convention),
available as ``class_names`` right after ``__init__`` (only directory names are read, no image is opened).
Hidden folders (name starting with ".") are ignored.

Batches: images ``float32 [B, 3, image_size, image_size]`` (grayscale/palette/RGBA images are converted to
RGB; every image is resized to ``image_size`` x ``image_size``), labels ``int64 [B]`` in ``0..num_classes-1``.

``setup`` checks the image files of the splits its stage uses once (:mod:`abkd_vision.data.checks`, cached): bad
files are an error naming them, or with ``on_bad_image="skip"`` are dropped and listed in ``bad_images``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from torch.utils.data import Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from abkd_vision.data.base import ClassificationDataModule, resolve_num_workers
from abkd_vision.data.checks import (
    check_options,
    decode_error,
    empty_classes_error,
    screen_images,
    write_bad_images,
)
from abkd_vision.data.splits import HELD_OUT, PAPER_PROTOCOL, VAL_FOLDER, check_split_size
from abkd_vision.data.transforms import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    CropFlipViews,
    cifar_eval_transform,
    cifar_train_transform,
)

__all__ = ["ImageFolderDataModule", "list_classes"]

log = logging.getLogger(__name__)

LAYOUT_HELP = (
    "expected layout: <root>/train/<class_name>/<image files>, <root>/test/<class_name>/<image files> and "
    "optionally <root>/val/<class_name>/<image files>, with the same class folders in every split and at "
    f"least one image ({', '.join(IMG_EXTENSIONS)}) per class"
)


def list_classes(directory: str | os.PathLike) -> list[str]:
    """Sorted names of the non-hidden sub-directories of ``directory`` (the ImageFolder class list)."""
    with os.scandir(directory) as it:
        return sorted(e.name for e in it if e.is_dir(follow_symlinks=True) and not e.name.startswith("."))


def _has_image(directory: str | os.PathLike) -> bool:
    """True as soon as one image file is found below ``directory`` (stops early: cheap on big datasets)."""
    for _, _, filenames in os.walk(directory, followlinks=True):
        if any(has_file_allowed_extension(name, IMG_EXTENSIONS) for name in filenames):
            return True
    return False


class _ImageFolder(ImageFolder):
    """ImageFolder whose class list skips hidden folders (e.g. ``.ipynb_checkpoints``), like ``list_classes``, and
    whose image loading errors name the file, the sample index and ``where`` (e.g. "the train split of ...")."""

    def __init__(self, root: str, transform: Callable | None = None, where: str = "") -> None:
        super().__init__(root, transform=transform)
        self.where = where or f"the image folder {root}"

    def __getitem__(self, index: int):
        """``(transform(image), label)`` of sample ``index``; ImageDecodeError if its image does not load."""
        path, target = self.samples[index]
        try:
            sample = self.loader(path)
        except Exception as err:
            raise decode_error(path, index, self.where, err) from err
        if self.transform is not None:
            sample = self.transform(sample)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return sample, target

    def find_classes(self, directory: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
        classes = list_classes(directory)
        if not classes:
            raise FileNotFoundError(f"no class folder in {directory}; {LAYOUT_HELP}")
        return classes, {name: i for i, name in enumerate(classes)}


def _first_per_class(dataset: ImageFolder, per_class: int, among: list[int] | None = None) -> Subset:
    """The first ``per_class`` samples of every class (ImageFolder lists files in sorted order), among the sample
    positions ``among`` (default: all)."""
    if per_class <= 0:
        raise ValueError(f"train_per_class must be a positive number of images, got {per_class}")
    taken: dict[int, int] = {}
    indices = []
    for i in among if among is not None else range(len(dataset.targets)):
        label = dataset.targets[i]
        if taken.get(label, 0) < per_class:
            taken[label] = taken.get(label, 0) + 1
            indices.append(i)
    return Subset(dataset, indices)


class ImageFolderDataModule(ClassificationDataModule):
    """Train/val/test loaders for a class-folder dataset, with CIFAR-style transforms by default.

    Args:
        root: dataset root containing ``train/`` and ``test/`` (and optionally ``val/``).
        image_size: side of the square model input; every image is resized to it (no-op if already that size).
        mean, std: normalisation statistics (3 values each); ``None`` = CIFAR-100 statistics.
        batch_size: training batch size.
        eval_batch_size: batch size of the val/test/predict loaders.
        num_workers: DataLoader worker processes (0 = load in the main process; None = one per CPU core free
            for this process, at most 8: :func:`~abkd_vision.data.base.auto_num_workers`).
        pin_memory: pin host memory (only applied when an accelerator is available).
        drop_last: drop the last incomplete training batch (eval loaders never drop).
        train_transform, eval_transform: optional replacements for the default CIFAR-style transforms
            (PIL image -> tensor); when given, ``image_size``/``mean``/``std`` are not used for that split.
        padding, hflip: random-crop padding and horizontal flipping of the default training transform.
        train_per_class: train on only the first N images (sorted file order) of each class: a fixed,
            class-balanced subset for data-limited experiments. None = all images.
        check_images: up-front check, in ``setup``, of the image files the stage uses (with train_per_class only
            the subset): "header" (default: size, header, JPEG/PNG end marker), "full" (also decodes every image)
            or "off". The result is cached per file list (see :mod:`abkd_vision.data.checks`).
        on_bad_image: "raise" (default: one ValueError naming the bad files) or "skip" (train without them; they
            are listed in ``bad_images``, ``[{"path", "problem", "split"}, ...]``, and written to the run folder's
            ``bad_images.json`` when a trainer with a logger is attached).
        strong_view: two views of every training image (MLKD): training batches are
            ``([weak, strong], target, ...)`` with weak = the training transform and strong = the same crop/flip
            transform with RandAugment(2, 10) before ToTensor, drawn independently (see
            :meth:`~abkd_vision.data.base.ClassificationDataModule.init_strong_view`). Evaluation is unchanged.
        strong_transform: the strong view's transform (PIL image -> tensor) instead of that default; needed with a
            custom ``train_transform`` that is not a torchvision Compose with a ToTensor step.
        val_split: hold out a validation split from ``train``: a fraction in (0, 1) or a number of images,
            stratified per class (:mod:`abkd_vision.data.splits`), drawn from the whole ``train`` folder before
            ``train_per_class`` takes its first N per class of the rest; the whole ``train`` folder is then checked
            (``check_images``). None (default) = val is ``val/`` if it exists, else ``test/``. An error with a
            ``val/`` folder (give one or the other).
        val_split_seed: the seed of that draw (the same seed and size give the same images in every run).
        val_split_file: a JSON file holding the split: read (and checked against the training files) when it
            exists, written there otherwise. The run folder gets a copy, ``val_split.json``, in any case.
        on_device: decode every split once (RGB, resized to ``image_size``: images of any sizes) into a uint8 tensor
            on the training device and crop, flip and normalise there, batched (:mod:`abkd_vision.data.device`): the
            loaders yield index batches, no workers, no PIL. The views are the host path's seeded stream to the last
            bit. Not with a custom ``train_transform``/``eval_transform`` or ``strong_view``; a split too large for
            the device's free memory is an error before training.

    Raises:
        FileNotFoundError: ``root`` or its ``train``/``test`` folder is missing, a split has no class
            folder, or a class folder holds no image.
        ValueError: the splits do not have the same class folders; unknown ``check_images``/``on_bad_image``;
            (in ``setup``) bad image files with ``on_bad_image="raise"``, or a class left without images by
            skipping them.
        ImageDecodeError: (while loading) an image fails to decode; names the file, the split and the index.
    """

    def __init__(
        self,
        root: str,
        image_size: int = 32,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        num_workers: int | None = None,
        pin_memory: bool = True,
        drop_last: bool = True,
        train_transform: Callable | None = None,
        eval_transform: Callable | None = None,
        padding: int = 4,
        hflip: bool = True,
        train_per_class: int | None = None,
        check_images: str = "header",
        on_bad_image: str = "raise",
        strong_view: bool = False,
        strong_transform: Callable | None = None,
        val_split: float | int | None = None,
        val_split_seed: int = 0,
        val_split_file: str | None = None,
        on_device: bool = False,
    ) -> None:
        super().__init__()
        # Transform objects are not plain hyper-parameters (not serialisable to hparams.yaml).
        self.save_hyperparameters(ignore=["train_transform", "eval_transform", "strong_transform"])
        check_split_size(val_split)
        if batch_size <= 0 or eval_batch_size <= 0:
            raise ValueError(f"batch sizes must be positive, got {batch_size=} {eval_batch_size=}")
        resolve_num_workers(num_workers)  # checks it
        check_options(check_images, on_bad_image)
        self.root = Path(root).expanduser().resolve()
        self.split_dirs = self._check_layout()
        if val_split is not None and self.split_dirs["val"] != self.split_dirs["test"]:
            raise ValueError(f"val_split {val_split} holds images out of {self.split_dirs['train']}, but "
                             f"{self.split_dirs['val']} exists and would be the validation split; give one or the "
                             "other (val_split: null to validate on the val folder)")
        self.class_names: list[str] = list_classes(self.split_dirs["train"])
        mean = CIFAR100_MEAN if mean is None else mean
        std = CIFAR100_STD if std is None else std
        self.train_transform = train_transform or cifar_train_transform(image_size, mean, std, padding, hflip)
        self.eval_transform = eval_transform or cifar_eval_transform(image_size, mean, std)
        # The view-naming form of the default augmentation (none for a custom train_transform).
        self.train_views = None if train_transform is not None else CropFlipViews(image_size, mean, std, padding,
                                                                                  hflip)
        self.init_strong_view(strong_view, strong_transform)
        self.init_on_device(on_device, {"a custom train_transform": train_transform is not None,
                                        "a custom eval_transform": eval_transform is not None})
        self.train_set: ImageFolder | None = None
        self.val_set: ImageFolder | None = None
        self.test_set: ImageFolder | None = None
        # Files left out by on_bad_image="skip": [{"path", "problem", "split"}, ...].
        self.bad_images: list[dict] = []
        self._checked: set[str] = set()  # split folders already checked

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def val_is(self) -> str:
        """What the val loader reads (recorded in results.json)."""
        if self.hparams.val_split is not None:
            return HELD_OUT
        return PAPER_PROTOCOL if self.split_dirs["val"] == self.split_dirs["test"] else VAL_FOLDER

    def _check_layout(self) -> dict[str, Path]:
        """Validate the folder tree (directory listings only) and return {"train", "val", "test"} -> dir."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset root {self.root} does not exist or is not a directory; {LAYOUT_HELP}")
        dirs = {"train": self.root / "train", "test": self.root / "test"}
        for split, path in dirs.items():
            if not path.is_dir():
                raise FileNotFoundError(f"missing {split} folder {path}; {LAYOUT_HELP}")
        val_dir = self.root / "val"
        dirs["val"] = val_dir if val_dir.is_dir() else dirs["test"]

        reference = list_classes(dirs["train"])
        for split in ("train", "test", "val"):
            path = dirs[split]
            classes = list_classes(path)
            if not classes:
                raise FileNotFoundError(f"no class folder in {path}; {LAYOUT_HELP}")
            if classes != reference:
                only_train = sorted(set(reference) - set(classes))
                only_here = sorted(set(classes) - set(reference))
                raise ValueError(
                    f"class folders of {path} differ from those of {dirs['train']} "
                    f"(only in train: {only_train[:10]}, only in {split}: {only_here[:10]}); {LAYOUT_HELP}"
                )
            empty = [name for name in classes if not _has_image(path / name)]
            if empty:
                raise FileNotFoundError(
                    f"class folder(s) without any image in {path}: {empty[:10]}"
                    f"{' ...' if len(empty) > 10 else ''}; {LAYOUT_HELP}"
                )
        return dirs

    def _folder(self, split: str, transform: Callable) -> _ImageFolder:
        where = f"the {split} split of {type(self).__name__} at {self.root}"
        return _ImageFolder(str(self.split_dirs[split]), transform=transform, where=where)

    def setup(self, stage: str | None = None) -> None:
        """Index the image files of the splits needed for ``stage`` (fit/validate/test/predict; None = all) and
        check those files once (``check_images``; bad ones raise or, with ``on_bad_image="skip"``, are dropped)."""
        held_out = self.hparams.val_split is not None
        new_train = (stage in (None, "fit") or held_out and stage == "validate") and self.train_set is None
        if new_train and held_out:
            full = self._folder("train", self.train_transform)
            self._check_split(full)  # before the split: its positions then refer to the images that stay
            entries = [(os.path.relpath(path, full.root), label) for path, label in full.samples]
            train, self.val_set = self.hold_out(full, full.targets, f"imagefolder:{self.root}", entries)
            self.train_set = train
            if self.hparams.train_per_class is not None:
                self.train_set = _first_per_class(full, self.hparams.train_per_class, list(train.indices))
        elif new_train:
            self.train_set = self._folder("train", self.train_transform)
            if self.hparams.train_per_class is not None:
                self.train_set = _first_per_class(self.train_set, self.hparams.train_per_class)
        if self.test_set is None and (not held_out or stage in (None, "test", "predict")):
            self.test_set = self._folder("test", self.eval_transform)
        if self.val_set is None and not held_out:
            same = self.split_dirs["val"] == self.split_dirs["test"]
            self.val_set = self.test_set if same else self._folder("val", self.eval_transform)
        for ds in (self.train_set, self.val_set, self.test_set):
            ds = ds.dataset if isinstance(ds, Subset) else ds
            # The folders could have changed between __init__ and setup; labels must keep their meaning.
            if ds is not None and ds.classes != self.class_names:
                raise ValueError(f"class folders of {ds.root} changed since __init__; {LAYOUT_HELP}")
        used = {None: ("train", "val", "test"), "fit": ("train", "val"), "validate": ("val",)}.get(stage, ("test",))
        datasets = {"train": self.train_set, "val": self.val_set, "test": self.test_set}
        for split in used:
            if datasets[split] is not None:
                self._check_split(datasets[split])

    def _check_split(self, dataset: ImageFolder | Subset) -> None:
        """Check the files ``dataset`` reads (once per split folder; ``val`` may be the test folder); drop the bad
        ones in place when skipping."""
        hp = self.hparams
        base = dataset.dataset if isinstance(dataset, Subset) else dataset
        folder = str(base.root)
        if hp.check_images == "off" or folder in self._checked:
            return
        name = os.path.basename(folder)  # the split folder: train, val or test
        where = f"the {name} split of {type(self).__name__} at {self.root}"
        indices = list(dataset.indices) if isinstance(dataset, Subset) else range(len(base.samples))
        bad = screen_images([base.samples[i][0] for i in indices], split=name, where=where,
                            level=hp.check_images, on_bad=hp.on_bad_image, trainer=self.trainer)
        self._checked.add(folder)
        self.bad_images += bad
        if hp.on_bad_image == "skip":
            write_bad_images(self.trainer, self.bad_images)  # on every rank: trainer.log_dir is a collective
        if not bad:
            return
        drop = {b["path"] for b in bad}
        before = {base.targets[i] for i in indices}
        keep = [i for i, (path, _) in enumerate(base.samples) if path not in drop]
        new_index = {old: new for new, old in enumerate(keep)}
        base.samples = [base.samples[i] for i in keep]
        base.imgs = base.samples
        base.targets = [label for _, label in base.samples]
        if isinstance(dataset, Subset):
            dataset.indices = [new_index[i] for i in dataset.indices if i in new_index]
            after = {base.targets[i] for i in dataset.indices}
        else:
            after = set(base.targets)
        if before - after:
            raise empty_classes_error([base.classes[c] for c in sorted(before - after)], where, len(bad))

    def view_dataset_key(self) -> dict:
        """What identifies the training images and their order (part of a teacher-logit cache key): the root,
        the subset, and a SHA-256 of the ordered (relative path, label) list."""
        if self.train_set is None:
            raise RuntimeError("call setup('fit') first")
        ds = self.train_set.dataset if isinstance(self.train_set, Subset) else self.train_set
        indices = self.train_set.indices if isinstance(self.train_set, Subset) else range(len(ds))
        digest = hashlib.sha256()
        for i in indices:
            path, label = ds.samples[i]
            digest.update(f"{os.path.relpath(path, ds.root)}\t{label}\n".encode())
        return {"dataset": f"imagefolder:{self.root}", "split": "train", "num_images": len(self.train_set),
                "train_per_class": self.hparams.train_per_class, "files_sha256": digest.hexdigest()}
