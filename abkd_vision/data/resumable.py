"""Training data that a run killed mid-epoch can resume exactly (``ExactResume``, on by default in ``run.py``).

Lightning restores the model, optimiser, schedulers and loop counters from ``last.ckpt``, but an ordinary
shuffled DataLoader restarts its epoch with a new order and new random crops. Here both are functions of the run's
seed and the epoch only:

* :class:`EpochSampler` draws epoch ``e``'s order from ``Generator(seed + e)`` and, when Lightning restarts a run
  mid-epoch, skips the batches the restored loop already completed;
* :class:`SeededViews` gives sample ``i`` of epoch ``e`` its own augmentation seed, so the random crop/flip of
  every sample is the same whether the run was interrupted or not, in the main process or in workers (the
  sampler encodes ``e`` in the index it yields; the dataset decodes it).

A resumed run then sees exactly the batches the uninterrupted run would have seen (on CPU with
``trainer.deterministic`` it ends with bit-identical weights; under DDP every process takes its shard).
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = ["EpochSampler", "ResumableLoader", "SeededViewStream", "SeededViews", "sample_seed"]


def sample_seed(seed: int, epoch: int, i: int) -> int:
    """The seed of torch's CPU generator under which sample ``i`` of epoch ``e`` draws its augmentation (the same
    on the host path, :class:`SeededViews`, and on the device path, :mod:`abkd_vision.data.device`)."""
    return (int(seed) * 1_000_003 + int(epoch) * 100_003 + int(i)) % (2**63 - 1)


class SeededViews(Dataset):
    """``dataset`` whose item ``e * n + i`` is item ``i`` drawn under the RNG seed ``(seed, e, i)``.

    With ``with_ids`` an item is ``(*item, i, e)``: the sample and the epoch name its view (see
    :class:`SeededViewStream`)."""

    def __init__(self, dataset: Dataset, seed: int, with_ids: bool = False):
        self.dataset, self.seed, self.n, self.with_ids = dataset, int(seed), len(dataset), bool(with_ids)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        epoch, i = divmod(int(index), self.n)
        # The CPU generator only (what the transforms draw from), saved and restored around the item: the same
        # stream as torch.manual_seed gives it, at about 2 us instead of the 150 us torch.manual_seed spends
        # seeding every device backend.
        generator = torch.random.default_generator
        state = generator.get_state()
        generator.manual_seed(sample_seed(self.seed, epoch, i))
        try:
            item = self.dataset[i]
        finally:
            generator.set_state(state)
        return (*item, i, epoch) if self.with_ids else item


class SeededViewStream:
    """The views of a continuous augmentation (RandomResizedCrop + flip) made countable for a teacher-logit cache:
    view ``e`` of sample ``i`` is the draw :class:`SeededViews` makes for epoch ``e`` under ``seed``. Every run with
    the same seed, data and transform replays the same stream, so its teacher logits are computed once.

    ``params()`` and ``num_views`` (= epochs) are what a cache key needs (:func:`abkd_vision.teacher_cache.cache_key`).
    """

    def __init__(self, seed: int, epochs: int, transform: str):
        if epochs < 1:
            raise ValueError(f"a view stream needs at least one epoch, got {epochs}")
        self.seed, self.num_views, self.transform = int(seed), int(epochs), str(transform)

    def params(self) -> dict:
        return {"views": "seeded-stream", "stream_seed": self.seed, "transform": self.transform}


class EpochSampler(DistributedSampler):
    """Shuffled order per epoch from ``(seed, epoch)``; skips the batches already done when a run resumes.

    Under DDP each process takes its share of the permutation exactly as Lightning's ``DistributedSampler`` would
    (same seed rule ``seed + epoch``, padded by repeating the first samples to a multiple of the processes, then
    every ``world_size``-th from the process's rank), so a resumed DDP run also continues mid-epoch. Being a
    ``DistributedSampler``, Lightning does not wrap it in another one.
    """

    def __init__(self, n: int, seed: int, batch_size: int, datamodule):
        # No super().__init__: it needs a dataset and an initialised process group; the shard comes from the
        # trainer when the epoch starts.
        self.n, self.seed, self.batch_size, self.datamodule = n, int(seed), int(batch_size), datamodule
        self.epoch, self.shuffle, self.drop_last = 0, True, False

    def _shard(self) -> tuple[int, int]:
        trainer = self.datamodule.trainer
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    def __len__(self) -> int:
        world, _ = self._shard()
        return math.ceil(self.n / world)

    def set_epoch(self, epoch: int) -> None:  # Lightning calls it; the epoch is read from the trainer
        self.epoch = epoch

    def __iter__(self):
        trainer = self.datamodule.trainer
        epoch = trainer.current_epoch if trainer is not None else 0
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        world, rank = self._shard()
        if world > 1:
            total = math.ceil(self.n / world) * world
            order = (order + order[: total - self.n])[rank:total:world]
        skip = 0
        if trainer is not None and trainer.fit_loop.restarting:
            skip = trainer.fit_loop.epoch_loop.batch_progress.current.completed * self.batch_size
        return iter([epoch * self.n + i for i in order[skip:]])


class ResumableLoader(DataLoader):
    """A DataLoader Lightning treats as resumable (its position lives in the loop state, not here)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
