"""``BaseToNewDataModule``: the 11 CLIP base-to-new datasets (CoOp layout), split into base and new classes.

Classes: the sorted labels are split into base = the first ceil(n/2) and new = the rest (CoOp's
``subsample_classes``). In the full label space base classes are ``0..nb-1`` and new classes ``nb..C-1``;
each group is relabelled from 0 for its own evaluation.

Loaders (images ``float32 [B, 3, S, S]``, labels ``int64 [B]``):

* train: training images of all classes (``train_classes="all"``: unlabeled use in prompt distillation, the
  transductive setting of the PromptKD/ABKD code) with labels in ``0..C-1``, or of the base classes only
  (``"base"``: teacher prompt tuning), optionally ``shots`` images per class drawn by ``seed``;
* val: a list ``[base, new]`` over the test split (the protocol) or the val split (``eval_split="val"``; the whole
  val split, where Dassl's few-shot runs keep min(shots, 4) val images per class), labels relabelled within each
  group; test: the same over the test split, whatever ``eval_split`` says (with ``eval_split="val"`` a fit then
  never lists the test images). Under DDP they use a sampler without padding (every image counts once).

``setup`` lists the images and checks that every file a split lists exists (one directory read per folder), then
checks the files it uses once (``check_images``, :mod:`abkd_vision.data.checks`, cached): bad files are an error
naming them, or with ``on_bad_image="skip"`` are dropped and listed in ``bad_images``.
With ``seed=None`` the few-shot draw uses ``torch.initial_seed()``: under DDP call ``seed_everything`` (the CLI's
``--seed_everything``) so that every rank draws the same images.

Transforms (CLIP, as Dassl's defaults for CoOp-style training): RandomResizedCrop(S, scale=(0.08, 1), bicubic) +
horizontal flip for training; Resize(S, bicubic) + CenterCrop(S) for evaluation; CLIP mean/std.

With ``strong_view`` (MLKD's two views) a training sample is ``((weak, strong), target, ...)``: weak = the training
transform, strong = the same RandomResizedCrop + flip with RandAugment(2, 10) before ToTensor/Normalize, drawn
independently. MLKD defines its strong view for CIFAR/ImageNet only, never for CLIP prompt distillation: this
strong view is our choice, made the same way as the CIFAR one.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import warnings
from collections.abc import Callable, Sequence

import lightning as L
import open_clip
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from abkd_vision.data.base import (
    _world_size,
    check_train_batches,
    make_dataloader,
    resolve_num_workers,
    resumable_loader,
)
from abkd_vision.data.checks import (
    check_options,
    decode_error,
    empty_classes_error,
    screen_images,
    write_bad_images,
)
from abkd_vision.data.coop import BASE_TO_NEW_DATASETS, COOP_DATA_HELP, missing_images, read_coop_dataset
from abkd_vision.data.resumable import SeededViewStream
from abkd_vision.data.transforms import ToRGB, strong_view_transform, with_strong_view

__all__ = [
    "BASE_TO_NEW_DATASETS",
    "BaseToNewDataModule",
    "base_new_split",
    "clip_eval_transform",
    "clip_train_transform",
    "few_shot",
]

log = logging.getLogger(__name__)

TRAIN_CLASSES = ("all", "base")
EVAL_SPLITS = ("test", "val")


def base_new_split(labels: Sequence[int]) -> tuple[list[int], list[int]]:
    """Sorted distinct labels split into base (the first ceil(n/2)) and new (the rest), as CoOp's
    ``subsample_classes``: 37 -> 19/18, 10 -> 5/5, 1000 -> 500/500. Relabelling group ``g`` from 0 maps its
    ``i``-th label to ``i``; with labels ``0..C-1`` new label ``j`` is full label ``len(base) + j``."""
    ordered = sorted(set(int(x) for x in labels))
    n_base = math.ceil(len(ordered) / 2)
    return ordered[:n_base], ordered[n_base:]


def few_shot(items: list[tuple[str, int]], shots: int, seed: int) -> list[tuple[str, int]]:
    """``shots`` items per label, drawn without replacement by one ``random.Random(seed)`` visiting the labels in
    sorted order (as Dassl's ``generate_fewshot_dataset``); a label with at most ``shots`` items keeps them all.

    Because base labels come first, the base classes get the same draw whether ``items`` holds all classes or only
    the base ones.
    """
    if shots <= 0:
        raise ValueError(f"shots must be a positive number of images per class, got {shots}")
    rng = random.Random(seed)
    by_label: dict[int, list[tuple[str, int]]] = {}
    for item in items:
        by_label.setdefault(item[1], []).append(item)
    out = []
    for label in sorted(by_label):
        group = by_label[label]
        out += group if len(group) <= shots else rng.sample(group, shots)
    return out


def clip_train_transform(image_size: int = 224, crop_scale: Sequence[float] = (0.08, 1.0)) -> T.Compose:
    """PIL image (any mode) -> ``float32 [3, S, S]``: RGB, RandomResizedCrop(S, crop_scale, bicubic), horizontal
    flip, CLIP mean/std (Dassl's CoOp training defaults)."""
    lo, hi = (float(x) for x in crop_scale)
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"crop_scale must be (min, max) with 0 < min <= max <= 1, got {tuple(crop_scale)}")
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    return T.Compose([ToRGB(), T.RandomResizedCrop(image_size, scale=(lo, hi),
                                                   interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])


def clip_eval_transform(image_size: int = 224) -> T.Compose:
    """PIL image (any mode) -> ``float32 [3, S, S]``: RGB, Resize(S, bicubic; the shorter side), CenterCrop(S),
    CLIP mean/std."""
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    return T.Compose([ToRGB(), T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(image_size), T.ToTensor(), T.Normalize(mean, std)])


class ImageList(Dataset):
    """``(transform(image), label)`` for a list of ``(path, label)``; ``relabel`` maps dataset labels. An image that
    fails to load raises ImageDecodeError naming the file, the index and ``where`` (e.g. "the train split of ...")."""

    def __init__(self, items: list[tuple[str, int]], transform: Callable, relabel: dict[int, int] | None = None,
                 where: str = "an image list"):
        self.items = items
        self.transform = transform
        self.relabel = relabel
        self.where = where

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, label = self.items[index]
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB")
        except Exception as err:
            raise decode_error(path, index, self.where, err) from err
        return self.transform(rgb), self.relabel[label] if self.relabel is not None else label


class BaseToNewDataModule(L.LightningDataModule):
    """One of the 11 datasets in the CoOp layout, with base/new classes.

    Args:
        dataset: one of ImageNet, Caltech101, OxfordPets, StanfordCars, Flowers102, Food101, FGVCAircraft,
            SUN397, DTD, EuroSAT, UCF101.
        root: the folder holding the CoOp dataset folders (``<root>/eurosat/...``).
        train_classes: "all" (unlabeled images of every class, the reference protocol) or "base".
        shots: images per class for training (teachers: 16); None = all.
        seed: the few-shot draw; None = ``torch.initial_seed()`` at setup, i.e. the run's ``seed_everything``.
        eval_split: "test" (the protocol: base/new test accuracy) or "val" (the held-out val split).
        image_size, batch_size, eval_batch_size, num_workers, pin_memory, drop_last: as usual (num_workers None:
            one per CPU core free for this process, at most 8).
        crop_scale: area range of the training RandomResizedCrop (Dassl's default (0.08, 1)).
        train_transform, eval_transform: replacements for the CLIP transforms (PIL image -> tensor).
        check_images: up-front check, in ``setup``, of the image files the stage uses (the drawn few-shot
            training images, the eval split): "header" (default: size, header, JPEG/PNG end marker), "full" (also
            decodes every image) or "off"; cached per file list (see :mod:`abkd_vision.data.checks`).
        on_bad_image: "raise" (default: one ValueError naming the bad files) or "skip" (leave them out; they are
            listed in ``bad_images``, ``[{"path", "problem", "split"}, ...]``, and written to the run folder's
            ``bad_images.json`` when a trainer with a logger is attached). Skipping a drawn few-shot image leaves
            its class with fewer shots (no other image is drawn); a class left without images is an error.
        strong_view: two views of every training image (MLKD): training batches are ``([weak, strong], target,
            ...)``; weak = the training transform (unchanged, same tensors and RNG use as without the option),
            strong = RandomResizedCrop + flip + RandAugment(2, 10) + ToTensor + Normalize, drawn independently and
            reproducibly under the seeded stream. Our choice: MLKD never defined a CLIP strong view. With the
            teacher-logit cache the weak view is cached and the teacher runs live on the strong one. Evaluation is
            unchanged.
        strong_transform: the strong view's transform (PIL image -> tensor) instead of that default; needed with a
            custom ``train_transform`` that is not a torchvision Compose with a ToTensor step.

    ``class_names`` (cleaned, label order), ``base_class_names``, ``new_class_names`` and the counts are read at
    construction from the class list (no image is listed or opened), so the CLI can link them.
    """

    def __init__(self, dataset: str, root: str = "data", train_classes: str = "all", shots: int | None = None,
                 seed: int | None = None, eval_split: str = "test", image_size: int = 224, batch_size: int = 8,
                 eval_batch_size: int = 100, num_workers: int | None = None, pin_memory: bool = True,
                 drop_last: bool = False, crop_scale: tuple[float, float] = (0.08, 1.0),
                 train_transform: Callable | None = None, eval_transform: Callable | None = None,
                 check_images: str = "header", on_bad_image: str = "raise", strong_view: bool = False,
                 strong_transform: Callable | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["train_transform", "eval_transform", "strong_transform"])
        if train_classes not in TRAIN_CLASSES:
            raise ValueError(f"train_classes must be one of {TRAIN_CLASSES}, got {train_classes!r}")
        if eval_split not in EVAL_SPLITS:
            raise ValueError(f"eval_split must be one of {EVAL_SPLITS}, got {eval_split!r}")
        if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int) or shots <= 0):
            raise ValueError(f"shots must be a positive number of images per class or null (all), got {shots!r}")
        if image_size <= 0 or batch_size <= 0 or eval_batch_size <= 0:
            raise ValueError(f"need positive image_size and batch sizes, got {image_size=}, {batch_size=}, "
                             f"{eval_batch_size=}")
        resolve_num_workers(num_workers)
        check_options(check_images, on_bad_image)
        self.dataset_name, self.root = dataset, root
        self.train_classes, self.eval_split = train_classes, eval_split
        info = read_coop_dataset(root, dataset, list_images=False)
        if dataset == "ImageNet" and eval_split == "val":
            warnings.warn("ImageNet has no val split in the CoOp layout: eval_split='val' evaluates on its test images "
                          "(images/val), as CoOp does; it is not a held-out split", stacklevel=2)
        self.class_names: list[str] = info.class_names
        self.base_labels, self.new_labels = base_new_split(range(len(self.class_names)))
        self.train_transform = train_transform or clip_train_transform(image_size, crop_scale)
        self.eval_transform = eval_transform or clip_eval_transform(image_size)
        if not isinstance(strong_view, bool):
            raise ValueError(f"strong_view must be true or false, got {strong_view!r}")
        self.strong_view, self.strong_transform = strong_view, None
        if strong_view:  # MLKD's strong view; its CLIP form is our choice (MLKD has none)
            self.strong_transform = strong_transform or strong_view_transform(self.train_transform)
        self.train_set: Dataset | None = None
        self.eval_sets: list[Dataset] | None = None  # [base, new] of eval_split (the val loaders)
        self.test_sets: list[Dataset] | None = None  # [base, new] of the test split (the test loaders)
        # Set by ExactResume: a training order and augmentation that depend only on (seed, epoch, sample).
        self.exact_resume = False
        # Set by PromptDistillationModule(teacher_logit_cache=...): the same seeded stream, and batches
        # (images, target, index, epoch) that name each sample's view for the teacher-logit cache.
        self.return_views = False
        # Files left out by on_bad_image="skip": [{"path", "problem", "split"}, ...].
        self.bad_images: list[dict] = []

    # -- classes ---------------------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def val_is(self) -> str:
        """What the val loaders read (recorded in results.json)."""
        if self.eval_split == "test":
            return "test split (paper protocol)"
        if self.dataset_name == "ImageNet":
            return "test images (ImageNet has no val split in the CoOp layout)"
        return "CoOp val split (held out)"

    @property
    def num_base_classes(self) -> int:
        return len(self.base_labels)

    @property
    def num_new_classes(self) -> int:
        return len(self.new_labels)

    @property
    def base_class_names(self) -> list[str]:
        return [self.class_names[i] for i in self.base_labels]

    @property
    def new_class_names(self) -> list[str]:
        return [self.class_names[i] for i in self.new_labels]

    # -- images ----------------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """List the images of the splits ``stage`` needs (fit: train + eval split; otherwise the eval split), check
        that every listed image file exists (FileNotFoundError naming the missing paths), then check the files used
        (``check_images``; bad ones raise or, with ``on_bad_image="skip"``, are dropped)."""
        need_train = stage in (None, "fit")
        need_eval = stage in (None, "fit", "validate") or self.eval_split == "test"
        need_test = stage in (None, "test", "predict")
        if (self.eval_sets is not None or not need_eval) and (self.train_set is not None or not need_train) \
                and (self.test_sets is not None or not need_test):
            return
        data = read_coop_dataset(self.root, self.dataset_name, list_images=True)
        if data.class_names != self.class_names:
            raise ValueError(f"the class list of {data.root} changed since the data module was built")
        splits = data.splits
        wanted = (["train"] if need_train else []) + ([self.eval_split] if need_eval else []) + \
            (["test"] if need_test and self.eval_split != "test" else [])
        for split in wanted:
            items = splits[split]
            if not items:
                raise FileNotFoundError(f"{self.dataset_name}: the {split} split of {data.root} lists no image; "
                                        f"{COOP_DATA_HELP}")
            if self.dataset_name == "ImageNet":
                continue  # listed from the class folders: the files exist
            missing = missing_images(p for p, _ in items)
            if missing:
                shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
                raise FileNotFoundError(f"{self.dataset_name}: {len(missing)} of the {len(items)} {split} images "
                                        f"listed in {data.root} are missing, e.g. image file not found: {shown}; "
                                        f"{COOP_DATA_HELP}")
        if need_train:
            items = splits["train"]
            if self.train_classes == "base":
                keep = set(self.base_labels)
                items = [it for it in items if it[1] in keep]
            if self.hparams.shots is not None:
                seed = self.hparams.seed if self.hparams.seed is not None else torch.initial_seed()
                items = few_shot(items, self.hparams.shots, int(seed) % 2**32)
            items = self._check_items("train", items)
            self.train_set = ImageList(items, self.train_transform, where=self._where("train"))
            log.info("%s: %d training images (%s classes, shots=%s)", self.dataset_name, len(items),
                     self.train_classes, self.hparams.shots)
        if need_eval and self.eval_sets is None:
            self.eval_sets = self._groups(self.eval_split, splits)
        if self.eval_split == "test":  # one list of images serves val and test
            self.test_sets = self.eval_sets
        elif need_test and self.test_sets is None:
            self.test_sets = self._groups("test", splits)

    def _groups(self, split: str, splits: dict) -> list[Dataset]:
        """``[base, new]`` image lists of ``split``, each relabelled from 0."""
        items = self._check_items(split, splits[split])
        groups = []
        for group, labels in (("base", self.base_labels), ("new", self.new_labels)):
            relabel = {label: i for i, label in enumerate(labels)}
            groups.append(ImageList([it for it in items if it[1] in relabel], self.eval_transform, relabel,
                                    where=f"the {group} classes of {self._where(split)}"))
        return groups

    def _where(self, split: str) -> str:
        return f"the {split} split of {type(self).__name__} {self.dataset_name} at {os.path.abspath(self.root)}"

    def _check_items(self, split: str, items: list[tuple[str, int]]) -> list[tuple[str, int]]:
        """``items`` without the bad files (``check_images``/``on_bad_image``); records them in ``bad_images``."""
        hp = self.hparams
        if hp.check_images == "off":
            return items
        where = self._where(split)
        bad = screen_images([p for p, _ in items], split=split, where=where, level=hp.check_images,
                            on_bad=hp.on_bad_image, trainer=self.trainer)
        seen = {(b["split"], b["path"]) for b in self.bad_images}
        self.bad_images += [b for b in bad if (b["split"], b["path"]) not in seen]
        if hp.on_bad_image == "skip":
            write_bad_images(self.trainer, self.bad_images)  # on every rank: trainer.log_dir is a collective
        if not bad:
            return items
        drop = {b["path"] for b in bad}
        kept = [it for it in items if it[0] not in drop]
        lost = sorted({label for _, label in items} - {label for _, label in kept})
        if lost:
            raise empty_classes_error([self.class_names[i] for i in lost], where, len(bad))
        return kept

    # -- the seeded view stream (exact resume, teacher-logit cache) -------------------------------------------------
    def teacher_views(self) -> SeededViewStream | None:
        """The training augmentation as a countable stream of views (epoch ``e`` of sample ``i`` under the run's
        seed), for a teacher-logit cache; None before the data module is attached to a trainer."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.max_epochs is None or trainer.max_epochs < 1:
            return None
        return SeededViewStream(torch.initial_seed(), trainer.max_epochs, repr(self.train_transform))

    def view_dataset_key(self) -> dict:
        """What identifies the training images, their order and the classes the teacher scores (part of a
        teacher-logit cache key)."""
        if self.train_set is None:
            raise RuntimeError("call setup('fit') first")
        digest = hashlib.sha256()
        for path, label in self.train_set.items:
            digest.update(f"{os.path.relpath(path, self.root)}\t{label}\n".encode())
        classes = hashlib.sha256("\n".join(self.class_names).encode()).hexdigest()
        return {"dataset": f"coop:{self.dataset_name}:{os.path.abspath(self.root)}", "split": "train",
                "num_images": len(self.train_set), "train_classes": self.train_classes, "shots": self.hparams.shots,
                "files_sha256": digest.hexdigest(), "classes_sha256": classes}

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before requesting a dataloader")
        hp = self.hparams
        if train:
            check_train_batches(len(dataset), hp.batch_size, hp.drop_last, _world_size(self))
        if train and (self.exact_resume or self.return_views):
            return resumable_loader(self, dataset, hp.batch_size, hp.drop_last, hp.num_workers, hp.pin_memory,
                                    with_ids=self.return_views)
        return make_dataloader(dataset, batch_size=hp.batch_size if train else hp.eval_batch_size, shuffle=train,
                               drop_last=hp.drop_last if train else False, num_workers=hp.num_workers,
                               pin_memory=hp.pin_memory)

    def train_dataloader(self) -> DataLoader:
        dataset = self.train_set
        if self.strong_view and dataset is not None:
            dataset = with_strong_view(dataset, self.strong_transform)  # the weak view keeps the seeded stream
        return self._loader(dataset, train=True)

    def val_dataloader(self) -> list[DataLoader]:
        if self.eval_sets is None:
            raise RuntimeError("call setup() before requesting a dataloader")
        return [self._loader(ds, train=False) for ds in self.eval_sets]

    def test_dataloader(self) -> list[DataLoader]:
        if self.test_sets is None:
            raise RuntimeError("call setup('test') before requesting a test dataloader")
        return [self._loader(ds, train=False) for ds in self.test_sets]
