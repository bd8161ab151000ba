"""An exact cache of a frozen teacher's logits for every (training image, augmentation view).

CIFAR's training augmentation (pad-4 random crop + horizontal flip on 32x32 images) has only 9 x 9 x 2 = 162
distinct views per image, and the teacher is frozen: its logits for every view can be computed once and reused
by every later run with that teacher. :class:`TeacherLogitCache` keeps them in memory-mapped files (never
loaded whole: CIFAR-100 in float16 is 50,000 x 162 x 100 x 2 bytes = 1.6 GB)::

    <directory>/header.json   # the key (below) and the array shapes; written last when the cache is created
    <directory>/logits.bin    # float16 (or float32) [N, V, C], C-order
    <directory>/filled.bin    # uint8 [N, V]: 1 = the row is written
    <directory>/.lock         # fcntl.flock while the files are created (or rebuilt)
    <directory>/.users        # fcntl.flock, shared by every open handle (a rebuild needs none)

The key is the teacher checkpoint's SHA-256 (of the file; of the weights when there is no file), the teacher's
name and class count, the dataset (name, split, number of images, and for image folders a hash of the file
list) and the augmentation's parameters (image size, padding, flip, mean/std), and the storage dtype. The
folder name is derived from it (:func:`cache_dirname`), and the header is compared with it on every open.

A corrupt cache (a header that is empty, truncated or not JSON; arrays of another size than the header says) is
rebuilt empty, with a warning naming the file, when the folder is this key's and no other handle has it open;
otherwise opening it raises :class:`CacheCorrupt`, which names the file and says to delete the folder.

Filling is lazy (:class:`abkd_vision.lit.distillation.FrozenTeacher` computes the teacher only for the views
not cached yet) or done up front (:func:`fill_cache`, ``scripts/fill_teacher_cache.py``). A row is written and
flushed before its filled flag is set, so a reader never sees a half-written row. Several processes (DDP ranks,
parallel runs) may fill one cache at the same time: they write the same values (up to the last bit of the
teacher's float arithmetic), so concurrent writes are benign; the files are opened read-write (``r+``) and
created once, under the lock file.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shlex
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from abkd_vision.data.transforms import CropFlipViews, _with_transform

__all__ = [
    "CacheCorrupt",
    "CacheMismatch",
    "TeacherLogitCache",
    "cache_dirname",
    "cache_key",
    "cached_logits",
    "check_dtype",
    "fill_cache",
    "sha256_file",
    "sha256_weights",
    "teacher_sha256",
]

KEY_VERSION = 1
DTYPES = {"float16": (np.float16, torch.float16), "float32": (np.float32, torch.float32)}
log = logging.getLogger(__name__)


class CacheMismatch(ValueError):
    """A cache exists at the given place but was made for another teacher, dataset or augmentation."""


class CacheCorrupt(CacheMismatch):
    """A cache file is corrupt and the cache cannot be rebuilt here (the message names the file and the fix)."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_weights(module: nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes and bytes, in key order)."""
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        t = value.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def teacher_sha256(teacher_ckpt: str | os.PathLike | None, model: nn.Module) -> str:
    """SHA-256 of the teacher checkpoint file, or ``"weights:" +`` that of ``model``'s weights without a file."""
    if teacher_ckpt is not None and Path(teacher_ckpt).is_file():
        return sha256_file(teacher_ckpt)
    return "weights:" + sha256_weights(model)


def check_dtype(dtype: str, name: str = "teacher cache dtype") -> str:
    """``dtype`` if it is a storage dtype of the cache ("float16", "float32"), else a ValueError naming ``name``."""
    if dtype not in DTYPES:
        raise ValueError(f"{name} must be one of {sorted(DTYPES)}, got {dtype!r}")
    return dtype


def cache_key(*, teacher: str, num_classes: int, teacher_sha256: str, dataset: dict, views,
              dtype: str = "float16") -> dict:
    """The full key of a cache (what its header holds). ``views``: anything with ``params()`` and ``num_views``
    (:class:`~abkd_vision.data.transforms.CropFlipViews`, :class:`~abkd_vision.data.resumable.SeededViewStream`)."""
    check_dtype(dtype)
    if "num_images" not in dataset:
        raise ValueError("the dataset key needs num_images")
    from abkd_vision.models import resolve_model_name

    try:
        teacher = resolve_model_name(teacher)  # "resnet8" and "cifar_resnet8" are one teacher
    except ValueError:
        pass
    return {"version": KEY_VERSION, "teacher": str(teacher), "num_classes": int(num_classes),
            "teacher_sha256": str(teacher_sha256), **dataset, **views.params(), "num_views": views.num_views,
            "dtype": dtype}


def _normalise(key: dict) -> dict:
    return json.loads(json.dumps(key, sort_keys=True))


def cache_dirname(key: dict) -> str:
    """Readable and unique folder name: dataset, split, size, teacher, checkpoint hash, key hash, dtype."""
    digest = hashlib.sha256(json.dumps(_normalise(key), sort_keys=True).encode()).hexdigest()[:10]
    dataset = str(key.get("dataset", "data")).split(":")[0]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{dataset}-{key.get('split', '')}-n{key['num_images']}-"
                                                f"{key.get('teacher', 'teacher')}")
    return f"{slug}-{str(key['teacher_sha256'])[:12]}-{digest}-{key['dtype']}"


class TeacherLogitCache:
    """Teacher logits per (image index, view id), memory-mapped; see the module docstring.

    Use :meth:`open` (finds or creates the cache for a key). ``lookup`` and ``write`` take index/view
    tensors or arrays of the same length; logits come back as float32 tensors.
    """

    HEADER, LOGITS, FILLED, LOCK, USERS = "header.json", "logits.bin", "filled.bin", ".lock", ".users"

    def __init__(self, directory: str | os.PathLike, key: dict, *, sync: bool = True):
        self.directory = Path(directory)
        self.key = _normalise(key)
        self.num_images, self.num_views = int(key["num_images"]), int(key["num_views"])
        self.num_classes, self.dtype = int(key["num_classes"]), str(key["dtype"])
        self.np_dtype, self.torch_dtype = DTYPES[self.dtype]
        self.sync = sync  # msync the rows before setting their flags (crash safety; other processes see the
        # shared mapping at once either way)
        self._logits: np.memmap | None = None
        self._filled: np.memmap | None = None
        self._users = None  # the users file, shared-locked while this handle is open
        self._create_or_check()

    # -- opening ---------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, location: str | os.PathLike, key: dict, **kwargs) -> TeacherLogitCache:
        """The cache for ``key``: ``location`` itself when it is a cache folder (it holds ``header.json``; its key
        must match), else ``location/<cache_dirname(key)>`` (created if missing).

        Raises:
            CacheMismatch: the cache found was made for another key (the message names the differing fields).
            CacheCorrupt: a file of the cache is corrupt and the cache cannot be rebuilt (see the module docstring).
        """
        location = Path(location).expanduser()
        directory = location if (location / cls.HEADER).is_file() else location / cache_dirname(key)
        return cls(directory, key, **kwargs)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.num_images, self.num_views, self.num_classes

    def _sizes(self) -> tuple[int, int]:
        n, v, c = self.shape
        return n * v * c * np.dtype(self.np_dtype).itemsize, n * v

    def _create_or_check(self) -> None:
        header = self.directory / self.HEADER
        if not header.exists():
            self.directory.mkdir(parents=True, exist_ok=True)
            with open(self.directory / self.LOCK, "a+") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # one creator; the others wait and then find the header
                try:
                    if not header.exists():
                        self._create(header)
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
        problem = self._corruption()
        if problem is not None:
            self._rebuild(problem)
        self._hold()

    def _create(self, header: Path) -> None:
        logits_bytes, filled_bytes = self._sizes()
        for name, size in ((self.LOGITS, logits_bytes), (self.FILLED, filled_bytes)):
            with open(self.directory / name, "wb") as f:  # sparse: zeros cost no disk until written
                f.truncate(size)
        tmp = header.with_name(header.name + f".tmp{os.getpid()}")
        try:
            with open(tmp, "w") as f:
                f.write(json.dumps({"key": self.key, "shape": list(self.shape), "layout": "C"}, indent=2) + "\n")
                f.flush()
                os.fsync(f.fileno())  # no empty header after a crash
            os.replace(tmp, header)  # the header appears last: its presence means the files are complete
        finally:
            tmp.unlink(missing_ok=True)

    def _check(self, found: dict) -> None:
        if found != self.key:
            fields = sorted(k for k in set(found) | set(self.key) if found.get(k) != self.key.get(k))
            shown = "; ".join(f"{k}: cache {found.get(k)!r} vs this run {self.key.get(k)!r}" for k in fields)
            raise CacheMismatch(f"the teacher cache {self.directory} was made for another setting ({shown})")

    def _corruption(self) -> tuple[Path, str, bool] | None:
        """None when the files are what the header says, else ``(file, what is wrong, whether the header's key is
        this key)``. A readable header of another key raises CacheMismatch: that is another cache, not a corrupt one."""
        header = self.directory / self.HEADER
        try:
            text = header.read_bytes()
        except OSError as err:
            return header, f"it cannot be read: {err.strerror or err}", False
        if not text.strip():
            return header, "it is empty", False
        try:
            found = json.loads(text.decode("utf-8"))
        except ValueError as err:  # UnicodeDecodeError, JSONDecodeError
            return header, f"it is not valid JSON: {err}", False
        if not isinstance(found, dict) or not isinstance(found.get("key"), dict):
            return header, "it holds no cache key", False
        self._check(found["key"])
        if found.get("shape") != list(self.shape):
            return header, f"its shape {found.get('shape')} is not that of its key {list(self.shape)}", True
        logits_bytes, filled_bytes = self._sizes()
        for name, size in ((self.LOGITS, logits_bytes), (self.FILLED, filled_bytes)):
            path = self.directory / name
            if not path.is_file():
                return path, "it is missing", True
            if path.stat().st_size != size:
                return path, f"it has {path.stat().st_size:,} bytes, the header's shape needs {size:,}", True
        return None

    def _rebuild(self, problem: tuple[Path, str, bool]) -> None:
        """Recreate the files empty, under the creation lock and only while no other handle is open; else raise
        CacheCorrupt naming the corrupt file."""
        delete = f"delete the folder to rebuild it: rm -r {shlex.quote(str(self.directory))}"
        corrupt = "the teacher cache file {} is corrupt ({})"
        if not problem[2] and self.directory.name != cache_dirname(self.key):
            raise CacheCorrupt(f"{corrupt.format(*problem[:2])}; it is not rebuilt, as {self.directory} is not "
                               f"the cache folder of this run's key: {delete}")
        try:
            with open(self.directory / self.LOCK, "a+") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # one rebuilder; the others wait and then find it rebuilt
                try:
                    problem = self._corruption()
                    if problem is None:
                        return
                    with open(self.directory / self.USERS, "a+") as users:
                        try:
                            fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        except BlockingIOError:
                            raise CacheCorrupt(f"{corrupt.format(*problem[:2])}; it is not rebuilt while the cache "
                                               f"is open elsewhere (another process or handle): {delete}") from None
                        self._create(self.directory / self.HEADER)
                        log.warning("%s: rebuilt the cache %s empty (its logits are computed again)",
                                    corrupt.format(*problem[:2]), self.directory)
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
        except OSError as err:
            raise CacheCorrupt(f"{corrupt.format(*problem[:2])} and could not be rebuilt ({err}): {delete}") from None

    def _hold(self) -> None:
        """Share-lock the users file while this handle is open (a rebuild takes it exclusively)."""
        if self._users is None:
            try:
                users = open(self.directory / self.USERS, "a+")
            except OSError:  # a read-only folder: no rebuild can happen there either
                return
            fcntl.flock(users, fcntl.LOCK_SH)
            self._users = users

    # -- the memory maps (opened lazily, dropped when pickled: DataLoader workers, ddp_spawn) -----------------
    @property
    def logits(self) -> np.memmap:
        if self._logits is None:
            self._hold()
            self._logits = np.memmap(self.directory / self.LOGITS, dtype=self.np_dtype, mode="r+", shape=self.shape)
        return self._logits

    @property
    def filled(self) -> np.memmap:
        if self._filled is None:
            self._hold()
            self._filled = np.memmap(self.directory / self.FILLED, dtype=np.uint8, mode="r+",
                                     shape=self.shape[:2])
        return self._filled

    def close(self) -> None:
        self._logits = self._filled = None  # numpy unmaps when the last reference goes
        if self._users is not None:
            self._users.close()  # releases the shared lock
            self._users = None

    def __del__(self) -> None:
        users = getattr(self, "_users", None)
        if users is not None:
            users.close()  # a handle dropped without close(): no ResourceWarning

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_logits": None, "_filled": None, "_users": None}

    # -- reading and writing ----------------------------------------------------------------------------------
    def _indices(self, index, view) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(index.cpu() if isinstance(index, Tensor) else index, dtype=np.int64).reshape(-1)
        vw = np.asarray(view.cpu() if isinstance(view, Tensor) else view, dtype=np.int64).reshape(-1)
        if idx.shape != vw.shape:
            raise ValueError(f"index and view must have the same length, got {idx.shape} and {vw.shape}")
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_images or vw.min() < 0
                         or vw.max() >= self.num_views):
            raise IndexError(f"(index, view) out of range for a cache of {self.num_images} images x "
                             f"{self.num_views} views")
        return idx, vw

    def lookup(self, index, view) -> tuple[Tensor, Tensor]:
        """``(logits float32 [B, C], filled bool [B])``; rows not filled hold zeros or garbage: use the mask."""
        idx, vw = self._indices(index, view)
        filled = np.asarray(self.filled[idx, vw]) != 0  # the flags first: a flagged row is complete
        logits = np.asarray(self.logits[idx, vw])
        return torch.from_numpy(logits.astype(np.float32)), torch.from_numpy(filled)

    def write(self, index, view, logits: Tensor | np.ndarray) -> None:
        """Store ``logits [B, C]`` for the (index, view) pairs: the rows, flushed (msync), then their flags."""
        idx, vw = self._indices(index, view)
        if isinstance(logits, Tensor):
            logits = logits.detach().to("cpu", self.torch_dtype).numpy()
        logits = np.asarray(logits, dtype=self.np_dtype).reshape(idx.size, self.num_classes)
        if not idx.size:
            return
        self.logits[idx, vw] = logits
        if self.sync:
            self.logits.flush()  # msync: the rows are on disk before any flag that vouches for them
        self.filled[idx, vw] = 1  # written back by the kernel later: a lost flag only means a recomputed row

    def filled_count(self) -> int:
        return int(np.count_nonzero(self.filled))

    def round(self, logits: Tensor) -> Tensor:
        """``logits`` rounded to the storage dtype (as float32): what a later lookup returns."""
        return logits.to(self.torch_dtype).float()

    def __repr__(self) -> str:
        return f"TeacherLogitCache({str(self.directory)!r}, shape={self.shape}, dtype={self.dtype})"


class _AllViews(Dataset):
    """Item k: (every view of image indices[k], [V, 3, S, S], indices[k])."""

    def __init__(self, dataset: Dataset, views: CropFlipViews, indices: list[int]):
        self.dataset = _with_transform(dataset, views.all_views)
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        i = self.indices[k]
        return self.dataset[i][0], i


@torch.no_grad()
def cached_logits(cache: TeacherLogitCache, teacher: Callable[[Tensor], Tensor], images: Tensor, index: Tensor,
                  view: Tensor) -> tuple[Tensor, int]:
    """Teacher logits [B, C] for a batch: read from ``cache`` (index and view on the host), with ``teacher`` run only
    on the samples whose view is not cached yet (written back). Every logit returned is rounded to the cache's
    dtype, the fresh ones too, so a run gives the same result whether the cache was empty or full. Returns the
    logits on ``images.device`` and the number of cache hits."""
    logits, filled = cache.lookup(index, view)
    miss = ~filled
    n_miss = int(miss.sum())  # a host tensor: no device synchronisation
    if n_miss:
        live = teacher(images[miss.to(images.device)])
        rounded = cache.round(live.float())
        cache.write(index.cpu()[miss], view.cpu()[miss], rounded.cpu())
        logits[miss] = rounded.cpu()
    return logits.to(images.device, non_blocking=True), int(filled.numel()) - n_miss


@torch.no_grad()
def fill_cache(teacher: nn.Module, dataset: Dataset, views: CropFlipViews, cache: TeacherLogitCache, *,
               images_per_batch: int = 8, num_workers: int = 0, device: str | torch.device = "cpu",
               progress: Callable[[int, int], None] | None = None, shuffle_seed: int | None = None,
               recompute: bool = False) -> int:
    """Compute and store the teacher's logits for every view of every image whose row is not complete yet.

    ``dataset`` is the training dataset (a torchvision dataset or a Subset of one, as the data module holds it;
    its transform is replaced by ``views.all_views`` in a copy). Returns the number of images computed.
    ``progress(done, total)`` is called after every batch. Images go in index order, or in a random order drawn
    from ``shuffle_seed`` (parallel fillers then meet less often). ``recompute`` computes complete rows too.
    """
    if len(dataset) != cache.num_images or views.num_views != cache.num_views:
        raise ValueError(f"dataset/views ({len(dataset)} images, {views.num_views} views) do not fit {cache}")
    todo = np.arange(cache.num_images) if recompute else np.flatnonzero(~np.asarray(cache.filled).all(axis=1))
    if shuffle_seed is not None:
        todo = np.random.default_rng(shuffle_seed).permutation(todo)
    todo = todo.tolist()
    teacher = teacher.eval().to(device)
    loader = DataLoader(_AllViews(dataset, views, todo), batch_size=images_per_batch, num_workers=num_workers)
    done = 0
    view_ids = torch.arange(views.num_views)
    for x, idx in loader:
        b, v = x.shape[:2]
        logits = teacher(x.reshape(b * v, *x.shape[2:]).to(device)).float().cpu()
        cache.write(idx.repeat_interleave(v), view_ids.repeat(b), logits)
        done += b
        if progress is not None:
            progress(done, len(todo))
    return done
