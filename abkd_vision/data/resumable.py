"""Training data that a run killed mid-epoch can resume exactly (opt-in with the ``ExactResume`` callback).

Lightning restores the model, optimiser, schedulers and loop counters from ``last.ckpt``, but an ordinary
shuffled DataLoader restarts its epoch with a new order and new random crops. Here both are functions of the run's
seed and the epoch only:

* :class:`EpochSampler` draws epoch ``e``'s order from ``Generator(seed + e)`` and, when Lightning restarts a run
  mid-epoch, skips the batches the restored loop already completed;
* :class:`SeededViews` gives sample ``i`` of epoch ``e`` its own augmentation seed, so the random crop/flip of
  every sample is the same whether the run was interrupted or not, in the main process or in workers (the
  sampler encodes ``e`` in the index it yields; the dataset decodes it).

A resumed run then sees exactly the batches the uninterrupted run would have seen (single process; on CPU with
``trainer.deterministic`` it ends with bit-identical weights).
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["EpochSampler", "ResumableLoader", "SeededViewStream", "SeededViews"]


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
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch * 100_003 + i) % (2**63 - 1))
            item = self.dataset[i]
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


class EpochSampler(Sampler[int]):
    """Shuffled order per epoch from ``(seed, epoch)``; skips the batches already done when a run resumes."""

    def __init__(self, n: int, seed: int, batch_size: int, datamodule):
        self.n, self.seed, self.batch_size, self.datamodule = n, int(seed), int(batch_size), datamodule

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        trainer = self.datamodule.trainer
        epoch = trainer.current_epoch if trainer is not None else 0
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
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
