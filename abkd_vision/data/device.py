"""Device-resident data: ``on_device: true`` of :class:`~abkd_vision.data.CIFAR100DataModule` and
:class:`~abkd_vision.data.ImageFolderDataModule`.

A split's images are decoded once, at the first loader request, into a uint8 tensor held on the training device
(:class:`DeviceImages`; CIFAR-100's training split with its zero border is 240 MB). The loaders then yield
:class:`IndexBatch` objects only (no DataLoader workers, no PIL): the sample indices of the batch and, for training,
each sample's crop offsets and flip. The suite's LightningModules turn them into image batches in
``on_after_batch_transfer`` (:meth:`IndexBatch.materialise`), on the device and batched: gather, crop, flip, then
``float / 255`` and ``(x - mean) / std`` in the order torchvision's ``ToTensor`` + ``Normalize`` compute them, in
the module's memory format (channels_last when asked) and the trainer's input dtype.

Same views as the host path, to the last bit: the training order is :class:`~abkd_vision.data.resumable.EpochSampler`'s
(seed, epoch) permutation with its DDP shard rule and mid-epoch skip, and sample ``i`` of epoch ``e`` draws its crop
and flip as :meth:`~abkd_vision.data.transforms.CropFlipViews.draw` does (torchvision's random kernels, in
torchvision's order; :meth:`~abkd_vision.data.transforms.CropFlipViews.draw_seeded`) under the generator seed
:func:`~abkd_vision.data.resumable.sample_seed` gives it, the seed under which the host path
(:class:`~abkd_vision.data.resumable.SeededViews`) runs the PIL transform. Only the numbers are drawn on the host (about
8 us a sample), no image is touched there. A run with the device path therefore sees the batches of ``run.py``'s
host path (``ExactResume`` on, the default), its teacher-logit cache the same view ids, and on the CPU with
``trainer.deterministic`` it ends with the same weights. The device path always draws this seeded stream, with or
without the ``ExactResume`` callback.

What it does not implement is an error naming it (a custom ``train_transform``/``eval_transform``,
``strong_view``), and so is a split too large for the device's free memory (checked before decoding).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, SequentialSampler, Subset

from abkd_vision.data.resumable import EpochSampler, sample_seed
from abkd_vision.data.transforms import CropFlipViews, _with_transform

__all__ = ["DeviceImages", "DeviceMemoryError", "IndexBatch", "IndexLoader", "TrainIndexStream", "check_fits",
           "decode_split", "device_loader", "free_memory", "split_images"]

log = logging.getLogger(__name__)


class DeviceMemoryError(ValueError):
    """A split's images do not fit in the free memory of the training device."""


def free_memory(device: torch.device) -> int | None:
    """Free bytes of ``device``: ``torch.cuda.mem_get_info`` on CUDA, the available RAM on the CPU (MemAvailable);
    None when unknown (other accelerators)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    return None


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def check_fits(nbytes: int, device: torch.device, what: str) -> None:
    """A :class:`DeviceMemoryError` naming ``what``, its size and the device's free memory when it does not fit."""
    free = free_memory(device)
    if free is not None and nbytes > free:
        where = "available RAM" if torch.device(device).type == "cpu" else "free memory"
        raise DeviceMemoryError(
            f"data.init_args.on_device: {what} needs {_size(nbytes)} on {device}, but it has {_size(free)} "
            f"{where}; train with the host path (data.init_args.on_device: false: PIL in DataLoader workers), on a "
            "device with more memory, or with a smaller image_size"
        )


class DeviceImages:
    """One split decoded once: ``uint8 [N, 3, S + 2p, S + 2p]`` images (a zero border of ``padding`` pixels, the
    padding of the random crop) and ``int64 [N]`` labels, plus the normalisation; one copy per device, made on first
    use (:meth:`on`). ``release_host`` drops the host copy once a copy on an accelerator exists."""

    def __init__(self, images: Tensor, labels: Tensor, image_size: int, mean, std, padding: int = 0,
                 hflip: bool = False, name: str = "split"):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        side = int(image_size) + 2 * int(padding)
        if tuple(images.shape[2:]) != (side, side):
            raise ValueError(f"images must be {side}x{side} (image_size {image_size} + 2 x padding {padding}), got "
                             f"{tuple(images.shape[2:])}")
        self.image_size, self.padding, self.hflip, self.name = int(image_size), int(padding), bool(hflip), name
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.num_images = int(images.shape[0])
        self.nbytes = images.numel() * images.element_size() + labels.numel() * 8
        self._copies: dict[torch.device, tuple[Tensor, ...]] = {}
        self._put(torch.device("cpu"), images, labels.to(torch.int64))

    def __len__(self) -> int:
        return self.num_images

    def _put(self, device: torch.device, images: Tensor, labels: Tensor) -> tuple[Tensor, ...]:
        dtype = torch.get_default_dtype()  # ToTensor's float dtype
        mean = torch.as_tensor(self.mean, dtype=dtype, device=device).view(1, 3, 1, 1)
        std = torch.as_tensor(self.std, dtype=dtype, device=device).view(1, 3, 1, 1)
        s, w = self.image_size, images.shape[-1]
        # the first window of each crop row of image 0 at (dy, dx) = (0, 0): channel c, row r -> c * W + r
        rows = (torch.arange(3, device=device).view(3, 1) * w + torch.arange(s, device=device)).view(1, 3 * s)
        self._copies[device] = entry = (images, labels, mean, std, rows)
        return entry

    def on(self, device: torch.device | str, release_host: bool = False) -> tuple[Tensor, ...]:
        """``(images, labels, mean, std, rows)`` on ``device``, copied there the first time."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        entry = self._copies.get(device)
        if entry is None:
            images, labels = next(iter(self._copies.values()))[:2]
            entry = self._put(device, images.to(device), labels.to(device))
        if release_host and device.type != "cpu":
            self._copies.pop(torch.device("cpu"), None)
        return entry

    @property
    def labels(self) -> Tensor:
        return next(iter(self._copies.values()))[1]

    def materialise(self, packed: Tensor, channels_last: bool = False) -> tuple[Tensor, Tensor]:
        """``(images float [B, 3, S, S], target int64 [B])`` on ``packed.device`` from ``packed`` = ``[index]`` or
        ``[index, dy, dx, flip]`` (int64 ``[1 or 4, B]``): gather, crop, flip (training), then ToTensor's
        ``float / 255`` and Normalize's ``(x - mean) / std``, exactly torchvision's float operations."""
        entry = self.on(packed.device)
        threads = torch.get_num_threads()
        if packed.device.type == "cpu" and threads > 1:
            # On the CPU a batch is a few hundred kB: one thread does it in microseconds per image, where the
            # fork/join of intra-op threads shared with the training step (and any other load) costs more.
            torch.set_num_threads(1)
        try:
            return self._materialise(*entry, packed, channels_last)
        finally:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)

    def _materialise(self, images, labels, mean, std, rows, packed, channels_last):
        index, b, s, w = packed[0], packed.shape[1], self.image_size, images.shape[-1]
        train = packed.shape[0] == 4
        x = images.index_select(0, index)  # [B, 3, W, W] uint8, contiguous
        if train or self.padding:
            # The (dy, dx) crop (the centre crop for evaluation), [B, 3, S, S]: every run of S pixels of the batch is a
            # row of an overlapping view (no copy), the row of sample k, channel c, padded row y from column x being
            # ((k * 3 + c) * W + y) * W + x; a crop is then one index_select of 3 * S such rows (copies of S
            # contiguous bytes) instead of an element-wise gather.
            windows = x.view(-1).as_strided((x.numel() - s + 1, s), (1, 1))
            dy, dx = (packed[1].view(-1, 1), packed[2].view(-1, 1)) if train else (self.padding, self.padding)
            k = torch.arange(b, device=x.device).view(-1, 1)
            x = windows.index_select(0, ((k * (3 * w) + rows + dy) * w + dx).view(-1)).view(b, 3, s, s)
            if train and self.hflip:
                # sample k from [crops, flipped crops] at k + B * flip: a select, not a broadcast mask
                pick = torch.arange(b, device=x.device).add_(packed[3], alpha=b)
                x = torch.cat((x, x.flip(3))).index_select(0, pick)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)  # uint8 here: the float ops keep the layout
        # ToTensor: x.to(float).div(255); Normalize: .sub_(mean).div_(std) (in place on the new float tensor)
        return x.to(mean.dtype).div_(255).sub_(mean).div_(std), labels[index]

    def __repr__(self) -> str:
        return (f"DeviceImages({self.name!r}, {self.num_images} images, {self.image_size}x{self.image_size}, "
                f"padding={self.padding}, {_size(self.nbytes)}, on {sorted(str(d) for d in self._copies)})")


class IndexBatch:
    """What the on-device loaders yield: the sample indices of a batch of a :class:`DeviceImages` split and, for
    training, each sample's crop offsets and flip (``packed`` ``int64 [4, B]``: index, dy, dx, flip; ``[1, B]`` for
    evaluation) and, when the teacher-logit cache is on, its view ids.

    Lightning moves it with :meth:`to` (a copy of ``packed`` on the device; the host ``index`` and ``view`` stay, for
    the cache) and the module turns it into ``[images, target]`` (``[images, target, index, view]`` with view ids)
    with :meth:`materialise`."""

    __slots__ = ("images", "packed", "view", "moved")

    def __init__(self, images: DeviceImages, packed: Tensor, view: Tensor | None = None,
                 moved: Tensor | None = None):
        self.images, self.packed, self.view, self.moved = images, packed, view, moved

    @property
    def index(self) -> Tensor:
        """The samples' indices in the split (host)."""
        return self.packed[0]

    def __len__(self) -> int:
        return int(self.packed.shape[1])

    def to(self, device, non_blocking: bool = False, **kwargs) -> IndexBatch:
        device = torch.device(device)
        packed = self.packed
        if device.type == "cuda":
            packed = packed.pin_memory()  # an asynchronous copy from page-locked memory
            non_blocking = True
        return IndexBatch(self.images, self.packed, self.view, packed.to(device, non_blocking=non_blocking))

    def materialise(self, channels_last: bool = False) -> list:
        """``[images, target]`` (``[images, target, index, view]`` with view ids; index and view on the host) on the
        device the batch was moved to (the host if it was not)."""
        packed = self.moved if self.moved is not None else self.packed
        images, target = self.images.materialise(packed, channels_last)
        if self.view is None:
            return [images, target]
        return [images, target, self.index, self.view]

    def __repr__(self) -> str:
        views = ", with view ids" if self.view is not None else ""
        return f"IndexBatch({len(self)} samples of {self.images.name!r}{views})"


class TrainIndexStream:
    """Training batches of the seeded stream: item ``e * n + i`` (what :class:`EpochSampler` yields) is sample ``i``
    of epoch ``e`` with the crop/flip ``views.draw()`` gives under the seed ``sample_seed(seed, e, i)``, the draw the
    host path's :class:`~abkd_vision.data.resumable.SeededViews` makes for it (``views.draw_seeded``: the same
    kernels). Torch's CPU generator is restored after every batch."""

    def __init__(self, images: DeviceImages, views: CropFlipViews, seed: int, with_ids: bool = False):
        if (views.image_size, views.padding, views.hflip) != (images.image_size, images.padding, images.hflip):
            raise ValueError(f"{views!r} does not describe {images!r}")
        self.images, self.views, self.seed, self.with_ids = images, views, int(seed), bool(with_ids)
        self.n = len(images)

    def batch(self, ids: list[int]) -> IndexBatch:
        n, seed = self.n, self.seed
        samples = [divmod(int(k), n) for k in ids]  # (epoch, i)
        drawn = self.views.draw_seeded([sample_seed(seed, epoch, i) for epoch, i in samples])
        rows = [(i, dy, dx, int(flip)) for (_, i), (dy, dx, flip) in zip(samples, drawn)]
        packed = torch.tensor(rows, dtype=torch.int64).reshape(-1, 4).T.contiguous()
        view = None
        if self.with_ids:  # CropFlipViews.view_id, for the whole batch
            view = (packed[1] * self.views.side + packed[2]) * self.views.flips + packed[3]
        return IndexBatch(self.images, packed, view)


def _eval_batch(images: DeviceImages) -> Callable[[list[int]], IndexBatch]:
    def batch(ids: list[int]) -> IndexBatch:
        return IndexBatch(images, torch.tensor(ids, dtype=torch.int64).reshape(1, -1))

    return batch


class IndexLoader:
    """Batches of ``batch_size`` sample ids from ``sampler``, each made into an :class:`IndexBatch` by ``make_batch``
    (the last partial batch dropped with ``drop_last``). Iterating it costs no worker and no image; Lightning treats
    it as resumable (its position lives in the loop state and the :class:`EpochSampler`, not here)."""

    batch_sampler = None  # what Lightning looks for on a loader (the batches are made here, from ``sampler``)

    def __init__(self, make_batch: Callable[[list[int]], IndexBatch], sampler: Iterable[int], batch_size: int,
                 drop_last: bool):
        self.make_batch, self.sampler, self.batch_size, self.drop_last = make_batch, sampler, int(batch_size), drop_last

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        ids = list(self.sampler)
        bs = self.batch_size
        end = len(ids) - len(ids) % bs if self.drop_last else len(ids)
        for start in range(0, end, bs):
            yield self.make_batch(ids[start:start + bs])

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# -- decoding ---------------------------------------------------------------------------------------------------
class _Prepared:
    """PIL image -> the prepared (RGB, resized) image as ``uint8 [S, S, 3]``: what the host path crops."""

    def __init__(self, views: CropFlipViews):
        self.views = views

    def __call__(self, img) -> np.ndarray:
        return np.asarray(self.views.prepare(img), dtype=np.uint8)


def _stack(items: list) -> tuple[Tensor, Tensor]:
    images = np.stack([np.asarray(img) for img, _ in items])
    return torch.from_numpy(images), torch.tensor([int(label) for _, label in items], dtype=torch.int64)


def _base_and_indices(dataset: Dataset) -> tuple[Dataset, np.ndarray]:
    if isinstance(dataset, Subset):
        base, indices = _base_and_indices(dataset.dataset)
        return base, indices[np.asarray(dataset.indices, dtype=np.int64)]
    return dataset, np.arange(len(dataset))


def decode_split(dataset: Dataset, views: CropFlipViews, padding: int = 0, num_workers: int = 0,
                 batch_size: int = 512) -> tuple[Tensor, Tensor]:
    """``(uint8 [N, 3, S + 2 padding, S + 2 padding], int64 [N])``: every image of ``dataset`` (a torchvision dataset
    or a Subset of one) decoded and prepared as the host path prepares it (RGB, resized to ``views.image_size``),
    with a zero border of ``padding`` pixels. CIFAR's arrays are used as they are when no resize is needed; other
    datasets are decoded in ``num_workers`` DataLoader workers."""
    s, p = views.image_size, int(padding)
    n = len(dataset)
    images = torch.zeros(n, 3, s + 2 * p, s + 2 * p, dtype=torch.uint8)
    inner = images[:, :, p:p + s, p:p + s]
    base, indices = _base_and_indices(dataset)
    data = getattr(base, "data", None)
    if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.shape[1:] == (s, s, 3):
        # torchvision's CIFAR: HWC uint8 arrays, read as RGB PIL images whose resize to (S, S) is the identity
        inner.copy_(torch.from_numpy(data[indices]).permute(0, 3, 1, 2))
        labels = torch.as_tensor(np.asarray(base.targets, dtype=np.int64)[indices])
        return images, labels
    labels = torch.empty(n, dtype=torch.int64)
    loader = DataLoader(_with_transform(dataset, _Prepared(views)), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=_stack)
    at = 0
    for chunk, target in loader:
        b = chunk.shape[0]
        inner[at:at + b].copy_(chunk.permute(0, 3, 1, 2))
        labels[at:at + b] = target
        at += b
    return images, labels


def _root_device(datamodule) -> torch.device:
    trainer = getattr(datamodule, "trainer", None)
    strategy = getattr(trainer, "strategy", None) if trainer is not None else None
    device = getattr(strategy, "root_device", None)
    return torch.device(device) if device is not None else torch.device("cpu")


def split_images(datamodule, dataset: Dataset, train: bool) -> DeviceImages:
    """The :class:`DeviceImages` of one of ``datamodule``'s splits, decoded and moved to the trainer's device the
    first time (after checking it fits there) and kept on the data module."""
    stores = datamodule.__dict__.setdefault("_device_images", {})
    key = (id(dataset), bool(train))
    found = stores.get(key)
    if found is not None and found[0] is dataset:
        return found[1]
    views: CropFlipViews = datamodule.train_views
    padding = views.padding if train else 0
    names = [name for name in ("train", "val", "test") if getattr(datamodule, f"{name}_set", None) is dataset]
    name = "/".join(names) or ("train" if train else "evaluation")
    device = _root_device(datamodule)
    n, side = len(dataset), views.image_size + 2 * padding
    border = f": {views.image_size}x{views.image_size} with the crop's {padding}-pixel zero border" if padding else ""
    what = f"the {name} split ({n:,} images, 3x{side}x{side} uint8{border})"
    check_fits(n * 3 * side * side + 8 * n, device, what)
    start = time.perf_counter()
    from abkd_vision.data.base import resolve_num_workers

    workers = resolve_num_workers(datamodule.hparams.get("num_workers", 0))
    pixels, labels = decode_split(dataset, views, padding, num_workers=workers)
    images = DeviceImages(pixels, labels, views.image_size, views.mean, views.std, padding,
                          views.hflip if train else False, name)
    images.on(device, release_host=True)
    stores[key] = (dataset, images)
    rank_zero_info(f"on_device: {what}, {_size(images.nbytes)}, held on {device} (decoded in "
                   f"{time.perf_counter() - start:.1f} s)")
    return images


def device_loader(datamodule, dataset: Dataset, train: bool) -> IndexLoader:
    """The on-device loader of a split: training batches of the seeded stream in :class:`EpochSampler`'s order (view
    ids with the teacher-logit cache, ``datamodule.return_views``); evaluation batches in order (under DDP the
    unpadded shard of :func:`~abkd_vision.data.base.eval_sampler`)."""
    from abkd_vision.data.base import eval_sampler

    hp = datamodule.hparams
    images = split_images(datamodule, dataset, train)
    if train:
        seed = torch.initial_seed()  # the run's seed_everything value, as the host path's resumable loader
        stream = TrainIndexStream(images, datamodule.train_views, seed, with_ids=datamodule.return_views)
        sampler = EpochSampler(len(images), seed, hp.batch_size, datamodule)
        return IndexLoader(stream.batch, sampler, hp.batch_size, hp.drop_last)
    sampler = eval_sampler(dataset)
    return IndexLoader(_eval_batch(images), sampler if sampler is not None else SequentialSampler(range(len(images))),
                       hp.eval_batch_size, drop_last=False)
