"""What the classification DataModules share: DataLoader conventions and the four loader hooks."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, Sampler

from abkd_vision.data.splits import PAPER_PROTOCOL, ValSplit, held_out_split, write_split_record
from abkd_vision.data.transforms import IndexedViews, strong_view_transform, with_strong_view


def _accelerator_available() -> bool:
    acc = getattr(torch, "accelerator", None)  # torch >= 2.6
    if acc is not None:
        return bool(acc.is_available())
    return torch.cuda.is_available()


def auto_num_workers(local_processes: int | None = None, cap: int = 8) -> int:
    """DataLoader workers per process when none are given: the CPU cores this process may use, shared by the
    processes of this node (``LOCAL_WORLD_SIZE``, set by torchrun and Lightning's DDP), minus one for the
    training process itself, at most ``cap`` (more rarely helps 32x32 images and costs memory)."""
    import os

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    if local_processes is None:
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(0, min(cap, cores // max(1, local_processes) - 1))


def resolve_num_workers(num_workers: int | None) -> int:
    """``None`` -> :func:`auto_num_workers`; a negative count is an error."""
    if num_workers is None:
        return auto_num_workers()
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0 (or null for one per free CPU core), got {num_workers}")
    return int(num_workers)


def eval_sampler(dataset: Dataset, world_size: int | None = None, rank: int | None = None) -> Sampler | None:
    """Under distributed evaluation, a sampler that splits ``dataset`` across ranks *without padding*, so every
    sample is scored exactly once (the default DistributedSampler repeats samples to even out the ranks).
    None when not distributed (the loader then reads in order)."""
    if world_size is None:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return None
        world_size, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    if world_size <= 1:
        return None
    if 0 < len(dataset) < world_size:
        raise ValueError(f"an evaluation set of {len(dataset)} samples cannot be split over {world_size} processes "
                         "without repeating samples (some would get none); use at most "
                         f"{len(dataset)} devices for evaluation")
    return UnrepeatedDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)


def make_dataloader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    drop_last: bool,
    num_workers: int | None,
    pin_memory: bool,
) -> DataLoader:
    """DataLoader with the suite's conventions (shared by all data modules).

    Pinned memory is only requested when an accelerator exists (it is useless and warns on CPU-only
    machines); workers are kept alive between epochs when ``num_workers > 0``. Evaluation loaders
    (``shuffle=False``) get :func:`eval_sampler` under DDP. ``num_workers`` None picks :func:`auto_num_workers`.
    """
    sampler = None if shuffle else eval_sampler(dataset)
    num_workers = resolve_num_workers(num_workers)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=pin_memory and _accelerator_available(),
        persistent_workers=num_workers > 0,
    )


def resumable_loader(datamodule, dataset: Dataset, batch_size: int, drop_last: bool, num_workers: int | None,
                     pin_memory: bool, with_ids: bool = False) -> DataLoader:
    """Training loader whose order and augmentation a mid-epoch resume reproduces (see data/resumable.py); with
    ``with_ids`` its batches also carry each sample's index and epoch (its view in a seeded stream)."""
    from abkd_vision.data.resumable import EpochSampler, ResumableLoader, SeededViews

    num_workers = resolve_num_workers(num_workers)
    seed = torch.initial_seed()  # the run's seed_everything value
    return ResumableLoader(SeededViews(dataset, seed, with_ids), batch_size=batch_size,
                           sampler=EpochSampler(len(dataset), seed, batch_size, datamodule), drop_last=drop_last,
                           num_workers=num_workers, pin_memory=pin_memory and _accelerator_available(),
                           persistent_workers=num_workers > 0)


def check_train_batches(n: int, batch_size: int, drop_last: bool, world_size: int = 1) -> None:
    """An error before training when the training set gives no batch (``n`` images, per process ``n / world_size``
    rounded up, the sampler's rule)."""
    if n == 0:
        raise ValueError("the training set has no image; check data.init_args.root and the train split")
    per_process = -(-n // max(1, world_size))
    if drop_last and per_process < batch_size:
        where = (f"{per_process} training images per process ({n} over {world_size} processes)" if world_size > 1
                 else f"{n} training images")
        raise ValueError(f"batch_size {batch_size} with drop_last leaves 0 batches from {where}; use batch_size "
                         f"<= {per_process} or drop_last false")


def _world_size(datamodule) -> int:
    trainer = getattr(datamodule, "trainer", None)
    return int(trainer.world_size) if trainer is not None else 1


class ClassificationDataModule(L.LightningDataModule):
    """Base of the image-classification DataModules.

    Subclasses fill ``train_set``, ``val_set`` and ``test_set`` in ``setup`` and save the hyper-parameters
    ``batch_size``, ``eval_batch_size``, ``drop_last``, ``num_workers`` and ``pin_memory``; this class turns
    them into loaders (training: shuffled, last partial batch dropped if asked; evaluation: never dropped).
    Predict uses the test split.
    """

    train_set: Dataset | None = None
    val_set: Dataset | None = None
    test_set: Dataset | None = None

    exact_resume: bool = False  # set by the ExactResume callback
    # The view-naming form of the training augmentation (CropFlipViews), set by subclasses whose default
    # transform has one; None otherwise.
    train_views = None
    # Set by DistillationModule(teacher_cache=...) when its cache is usable: training batches are then
    # (images, target, index, view) (see abkd_vision.teacher_cache); otherwise (images, target).
    return_views: bool = False
    # The two-view option (MLKD): training samples are ((weak, strong), target, ...), see init_strong_view.
    strong_view: bool = False
    strong_transform = None
    # Device-resident data (abkd_vision.data.device), see init_on_device.
    on_device: bool = False

    def init_strong_view(self, strong_view: bool, strong_transform=None) -> None:
        """Subclasses call it after setting ``train_transform``. With ``strong_view`` every *training* sample is
        ``((weak, strong), target)`` (``((weak, strong), target, index, view)`` with the teacher-logit cache), so a
        batch is ``([weak [B, 3, S, S], strong [B, 3, S, S]], target, ...)``; evaluation loaders are unchanged.

        weak = ``train_transform`` exactly (same tensors and RNG use as with ``strong_view`` off); strong =
        ``strong_transform``, by default ``train_transform`` with RandAugment(2, 10) before ToTensor
        (:func:`~abkd_vision.data.transforms.strong_view_transform`), drawn independently of the weak view and
        reproducibly under the seeded stream (:class:`~abkd_vision.data.transforms.WeakStrongViews`)."""
        if not isinstance(strong_view, bool):
            raise ValueError(f"strong_view must be true or false, got {strong_view!r}")
        self.strong_view = strong_view
        self.strong_transform = None
        if strong_view:
            self.strong_transform = strong_transform or strong_view_transform(self.train_transform)

    def init_on_device(self, on_device: bool, unsupported: dict[str, bool]) -> None:
        """Subclasses call it last in ``__init__``. With ``on_device`` every split is decoded once into a uint8
        tensor on the training device and the loaders yield index batches that the suite's modules turn into images
        there (:mod:`abkd_vision.data.device`): the views of the host path's seeded stream, bit for bit.
        ``unsupported`` names the options in use that the device path does not implement (an error)."""
        if not isinstance(on_device, bool):
            raise ValueError(f"on_device must be true or false, got {on_device!r}")
        self.on_device = on_device
        if not on_device:
            return
        found = [name for name, used in unsupported.items() if used]
        if self.strong_view:
            found.append("strong_view: true (RandAugment)")
        if self.train_views is None and not found:
            found.append("this training transform")
        if found:
            views = self.train_views
            what = (f"pad {views.padding} + random crop{' + horizontal flip' if views.hflip else ''}"
                    if views is not None else "pad + random crop + horizontal flip")
            raise ValueError(f"data.init_args.on_device: true does not implement {' or '.join(found)}: the device "
                             f"path does the default augmentation only ({what} + normalise); set "
                             "data.init_args.on_device: false (the host path) or drop it")

    def teacher_views(self):
        """The view-naming form of the training augmentation (None if it has none)."""
        return self.train_views

    # -- the held-out validation split (``val_split``; abkd_vision.data.splits) ------------------------------------
    # Set in setup by the subclasses that offer val_split: the drawn split (None without one).
    val_holdout: ValSplit | None = None
    # What the val loader reads, as the run records say it (results.json's protocol.val_is).
    val_is: str = PAPER_PROTOCOL

    def hold_out(self, dataset: Dataset, labels, dataset_name: str, entries=None) -> tuple[Dataset, Dataset]:
        """``(training part, held-out part)`` of ``dataset`` by ``val_split``/``val_split_seed``/``val_split_file``:
        stratified per class, recorded in the run folder's ``val_split.json``. The held-out part reads the same images
        with ``eval_transform`` (a shallow copy: no image data is duplicated)."""
        import copy

        from torch.utils.data import Subset

        hp = self.hparams
        split = held_out_split(labels, hp.val_split, hp.val_split_seed, dataset_name, entries, self.class_names,
                               hp.val_split_file)
        self.val_holdout = split
        write_split_record(self.trainer, split)
        held = copy.copy(dataset)
        held.transform = self.eval_transform
        if hasattr(held, "transforms"):  # torchvision's VisionDataset keeps both
            from torchvision.datasets.vision import StandardTransform

            held.transforms = StandardTransform(self.eval_transform, getattr(held, "target_transform", None))
        return Subset(dataset, split.train_indices), Subset(held, split.val_indices)

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before requesting a dataloader")
        hp = self.hparams
        if train:
            check_train_batches(len(dataset), hp.batch_size, hp.drop_last, _world_size(self))
        if self.on_device:
            from abkd_vision.data.device import device_loader

            return device_loader(self, dataset, train)
        if train and self.exact_resume:
            return resumable_loader(self, dataset, hp.batch_size, hp.drop_last, hp.num_workers, hp.pin_memory)
        return make_dataloader(
            dataset,
            batch_size=hp.batch_size if train else hp.eval_batch_size,
            shuffle=train,
            drop_last=hp.drop_last if train else False,
            num_workers=hp.num_workers,
            pin_memory=hp.pin_memory,
        )

    def train_dataloader(self) -> DataLoader:
        if self.on_device:  # index batches; view ids come with them when return_views is set
            return self._loader(self.train_set, train=True)
        strong = self.strong_transform if self.strong_view else None
        if self.return_views and self.train_set is not None and self.train_views is not None:
            return self._loader(IndexedViews(self.train_set, self.train_views, strong), train=True)
        dataset = self.train_set
        if strong is not None and dataset is not None:
            dataset = with_strong_view(dataset, strong)
        return self._loader(dataset, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)
