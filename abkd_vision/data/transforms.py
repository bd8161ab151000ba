"""CIFAR-style image transforms (PIL image in, normalised float tensor out).

Every transform returned here maps a PIL image of any size and mode (RGB, L, P, RGBA, ...) to a
``float32`` tensor of shape ``[3, image_size, image_size]``, normalised per channel with ``mean``/``std``.
Grayscale inputs are replicated to 3 channels so that every model sees RGB input.

The pipeline always contains a ``Resize((image_size, image_size))``: torchvision returns the image
unchanged when it already has that size, so on 32x32 CIFAR images the recipe is exactly the reference
one (RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor + Normalize), while other datasets
(8x8 digits, 64x64 Tiny-ImageNet, ...) and other input sizes (e.g. 224 for ImageNet teachers) work too.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Subset
from torchvision import transforms as T
from torchvision.transforms import functional as TF

__all__ = [
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CropFlipViews",
    "IndexedViews",
    "ToRGB",
    "WeakStrongViews",
    "cifar_eval_transform",
    "cifar_train_transform",
    "strong_view_transform",
    "with_strong_view",
]

# Per-channel statistics of the CIFAR-100 training set (pixel values scaled to [0, 1]).
CIFAR100_MEAN: tuple[float, float, float] = (0.5071, 0.4867, 0.4408)
CIFAR100_STD: tuple[float, float, float] = (0.2675, 0.2565, 0.2761)


class ToRGB:
    """Convert a PIL image of any mode to 3-channel RGB (no-op for RGB images).

    A class rather than a lambda so that transforms stay picklable for DataLoader worker processes.
    """

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == "RGB" else img.convert("RGB")

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}()"


def _check_stats(mean: Sequence[float], std: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean_t, std_t = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean_t) != 3 or len(std_t) != 3:
        raise ValueError(f"mean and std must have 3 values (RGB), got mean={mean_t}, std={std_t}")
    if any(s <= 0 for s in std_t):
        raise ValueError(f"std values must be > 0, got {std_t}")
    return mean_t, std_t


def _compose(image_size: int, mean: Sequence[float], std: Sequence[float], augment: list) -> T.Compose:
    """ToRGB -> Resize((image_size, image_size)) -> *augment -> ToTensor -> Normalize(mean, std)."""
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    mean_t, std_t = _check_stats(mean, std)
    resize = T.Resize((image_size, image_size), antialias=True)
    return T.Compose([ToRGB(), resize, *augment, T.ToTensor(), T.Normalize(mean_t, std_t)])


def cifar_train_transform(
    image_size: int = 32,
    mean: Sequence[float] = CIFAR100_MEAN,
    std: Sequence[float] = CIFAR100_STD,
    padding: int = 4,
    hflip: bool = True,
) -> T.Compose:
    """Training augmentation of the standard CIFAR KD recipe.

    ToRGB -> Resize((image_size, image_size)) (identity when the image already has that size)
    -> RandomCrop(image_size, padding=padding) -> RandomHorizontalFlip (if ``hflip``) -> ToTensor
    -> Normalize(mean, std). ``hflip=False`` suits data where mirroring changes the class (digits, text).

    Returns a callable: PIL image -> float tensor ``[3, image_size, image_size]``.
    """
    augment = [T.RandomCrop(image_size, padding=padding), *([T.RandomHorizontalFlip()] if hflip else [])]
    return _compose(image_size, mean, std, augment)


def cifar_eval_transform(
    image_size: int = 32,
    mean: Sequence[float] = CIFAR100_MEAN,
    std: Sequence[float] = CIFAR100_STD,
) -> T.Compose:
    """Deterministic evaluation transform: ToRGB -> Resize (if needed) -> ToTensor -> Normalize.

    Returns a callable: PIL image -> float tensor ``[3, image_size, image_size]``.
    """
    return _compose(image_size, mean, std, augment=[])


class CropFlipViews:
    """The training transform of :func:`cifar_train_transform`, telling which of its finitely many views it drew.

    ToRGB -> Resize((image_size, image_size)) -> pad ``padding`` (zeros) -> crop at (dy, dx) -> flip (if drawn)
    -> ToTensor -> Normalize. The random numbers are drawn from torch's global generator exactly as
    torchvision's ``RandomCrop(image_size, padding=padding)`` followed by ``RandomHorizontalFlip()`` draw them
    (``randint`` for the row offset, ``randint`` for the column offset, then ``rand(1) < 0.5``; nothing is drawn
    for the crop when ``padding == 0``), so for the same generator state the image is the same tensor as the one
    ``cifar_train_transform`` returns, and a run consumes the RNG identically with or without views.

    Calling it returns ``(image [3, S, S], view)`` with ``view = (dy * (2 * padding + 1) + dx) * F + flip``
    (``F`` = 2 with ``hflip``, else 1), in ``0..num_views - 1``: 162 views for the CIFAR recipe (9 x 9 x 2).
    """

    def __init__(self, image_size: int = 32, mean: Sequence[float] = CIFAR100_MEAN,
                 std: Sequence[float] = CIFAR100_STD, padding: int = 4, hflip: bool = True):
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.image_size, self.padding, self.hflip = int(image_size), int(padding), bool(hflip)
        self.mean, self.std = _check_stats(mean, std)
        self.side = 2 * self.padding + 1  # crop offsets per axis
        self.flips = 2 if self.hflip else 1
        self.num_views = self.side * self.side * self.flips
        self._resize = T.Resize((self.image_size, self.image_size), antialias=True)
        self._to_rgb = ToRGB()

    def params(self) -> dict:
        """What identifies the views (a teacher-logit cache key)."""
        return {"transform": "torgb-resize-pad0-crop-hflip-totensor-normalize", "image_size": self.image_size,
                "padding": self.padding, "hflip": self.hflip, "mean": list(self.mean), "std": list(self.std)}

    def view_id(self, dy: int, dx: int, flip: bool) -> int:
        return (dy * self.side + dx) * self.flips + int(flip)

    def view_params(self, view: int) -> tuple[int, int, bool]:
        """(dy, dx, flip) of a view id."""
        if not 0 <= view < self.num_views:
            raise ValueError(f"view must be in 0..{self.num_views - 1}, got {view}")
        rest, flip = divmod(int(view), self.flips)
        dy, dx = divmod(rest, self.side)
        return dy, dx, bool(flip)

    def draw(self) -> tuple[int, int, bool]:
        """(dy, dx, flip) drawn from torch's global RNG in torchvision's order and distribution."""
        dy = dx = 0
        if self.padding > 0:  # RandomCrop.get_params draws nothing when the padded image equals the crop
            dy = int(torch.randint(0, self.side, size=(1,)).item())
            dx = int(torch.randint(0, self.side, size=(1,)).item())
        # torchvision's `torch.rand(1) < 0.5`: the float32 draw compared with 0.5 exactly, as a Python float (the
        # same result and RNG use, one tensor op fewer)
        flip = torch.rand(1).item() < 0.5 if self.hflip else False
        return dy, dx, flip

    def draw_seeded(self, seeds: Sequence[int]) -> list[tuple[int, int, bool]]:
        """``draw()`` under each seed in turn (torch's CPU generator seeded with it), the generator restored after.

        The same numbers as ``draw()`` by the same kernels: ``torch.randint(lo, hi, (1,))`` is ``random_(lo, hi)``
        on a new one-element tensor and ``torch.rand(1)`` is ``uniform_(0, 1)`` on one; here both run on one reused
        tensor each, which saves the allocations (about 3 us of the 9 us a ``draw()`` costs on the host)."""
        generator = torch.random.default_generator
        state = generator.get_state()
        crop, flip = torch.empty(1, dtype=torch.int64), torch.empty(1, dtype=torch.float32)
        side, pad, hflip = self.side, self.padding > 0, self.hflip
        out = []
        try:
            for seed in seeds:
                generator.manual_seed(seed)
                dy = int(crop.random_(0, side).item()) if pad else 0
                dx = int(crop.random_(0, side).item()) if pad else 0
                out.append((dy, dx, flip.uniform_(0, 1).item() < 0.5 if hflip else False))
        finally:
            generator.set_state(state)
        return out

    def prepare(self, img: Image.Image) -> Image.Image:
        """The deterministic part before augmentation: RGB, resized to image_size."""
        return self._resize(self._to_rgb(img))

    def apply(self, img: Image.Image, dy: int, dx: int, flip: bool) -> Tensor:
        """The view (dy, dx, flip) of a prepared image, as the normalised tensor."""
        if self.padding > 0:
            img = TF.pad(img, self.padding, fill=0)
        img = TF.crop(img, dy, dx, self.image_size, self.image_size)
        if flip:
            img = TF.hflip(img)
        return TF.normalize(TF.to_tensor(img), self.mean, self.std)

    def all_views(self, img: Image.Image) -> Tensor:
        """Every view of ``img`` at once, ``[num_views, 3, S, S]`` in view-id order (same values as ``apply``)."""
        x = TF.to_tensor(self.prepare(img))
        p, s = self.padding, self.image_size
        x = torch.nn.functional.pad(x, (p, p, p, p))  # zeros, as PIL padding with fill 0
        crops = x.unfold(1, s, 1).unfold(2, s, 1)  # [3, side, side, s, s]
        crops = crops.permute(1, 2, 0, 3, 4)  # [side, side, 3, s, s]
        views = torch.stack([crops, crops.flip(-1)], dim=2) if self.hflip else crops.unsqueeze(2)
        views = views.reshape(self.num_views, 3, s, s)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (views - mean) / std

    def __call__(self, img: Image.Image) -> tuple[Tensor, int]:
        img = self.prepare(img)
        dy, dx, flip = self.draw()
        return self.apply(img, dy, dx, flip), self.view_id(dy, dx, flip)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(image_size={self.image_size}, padding={self.padding}, "
                f"hflip={self.hflip}, mean={self.mean}, std={self.std})")


def strong_view_transform(train_transform: T.Compose, num_ops: int = 2, magnitude: int = 10) -> T.Compose:
    """The strong view of MLKD (Jin et al., CVPR 2023) made from a training transform: the same steps, with
    torchvision's ``RandAugment(num_ops, magnitude)`` inserted on the PIL image right before ``ToTensor``.

    From :func:`cifar_train_transform` this is MLKD's CIFAR strong view: RandomCrop(32, padding=4) +
    RandomHorizontalFlip + RandAugment(2, 10) + ToTensor + Normalize (the weak view's statistics). The steps are
    shared with ``train_transform`` (they hold no state); ``train_transform`` itself is not changed.

    Raises ValueError when ``train_transform`` is not a torchvision ``Compose`` with a ``ToTensor`` step.
    """
    steps = list(train_transform.transforms) if isinstance(train_transform, T.Compose) else []
    at = next((k for k, step in enumerate(steps) if isinstance(step, (T.ToTensor, T.PILToTensor))), None)
    if at is None:
        raise ValueError(
            f"strong_view: cannot add RandAugment to the training transform {train_transform!r}: it is not a "
            "torchvision Compose with a ToTensor step; pass strong_transform (PIL image -> tensor) for the strong view"
        )
    return T.Compose([*steps[:at], T.RandAugment(num_ops=num_ops, magnitude=magnitude), *steps[at:]])


def _derived_seed(state: Tensor) -> int:
    """A 63-bit seed that is a function of a generator state (a fresh stream, unrelated to that state's own)."""
    digest = hashlib.blake2b(state.numpy().tobytes(), digest_size=8, person=b"strongview").digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class WeakStrongViews:
    """PIL image -> ``(weak(image), strong(image))``: two independently augmented views of one image (MLKD).

    ``weak`` runs first and draws from torch's global generator exactly as it does alone, so the weak views (and
    every later draw of the stream) are the same tensors as without the strong view. ``strong`` then draws from a
    stream seeded by a hash of the generator state ``weak`` left, and the generator is put back to that state: the
    strong view is a function of the same seed (under :class:`~abkd_vision.data.resumable.SeededViews`: of
    ``(seed, epoch, sample)``, so exact resume replays it) without touching the weak stream.
    """

    def __init__(self, weak: Callable, strong: Callable):
        self.weak, self.strong = weak, strong

    def __call__(self, img: Image.Image):
        weak = self.weak(img)
        generator = torch.random.default_generator
        state = generator.get_state()
        generator.manual_seed(_derived_seed(state))
        try:
            strong = self.strong(img)
        finally:
            generator.set_state(state)
        return weak, strong

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(weak={self.weak!r}, strong={self.strong!r})"


def _transform_of(dataset: Dataset):
    return _transform_of(dataset.dataset) if isinstance(dataset, Subset) else dataset.transform


def with_strong_view(dataset: Dataset, strong: Callable) -> Dataset:
    """A shallow copy of ``dataset`` (a torchvision dataset, a Subset of one, or any dataset with a ``transform``
    attribute) whose item is ``((weak, strong), target)``: its own transform as the weak view and ``strong`` as
    the strong one (:class:`WeakStrongViews`). The wrapped dataset is not changed."""
    return _with_transform(dataset, WeakStrongViews(_transform_of(dataset), strong))


def _with_transform(dataset: Dataset, transform) -> Dataset:
    """A shallow copy of a torchvision dataset (or a Subset of one) whose ``transform`` is replaced."""
    if isinstance(dataset, Subset):
        return Subset(_with_transform(dataset.dataset, transform), dataset.indices)
    if not hasattr(dataset, "transform"):
        raise TypeError(f"{type(dataset).__name__} has no transform attribute to replace")
    copied = copy.copy(dataset)
    copied.transform = transform
    return copied


class IndexedViews(Dataset):
    """``dataset`` (a torchvision dataset or a Subset of one) with its transform replaced by ``views``
    (:class:`CropFlipViews`); item ``i`` is ``(image, target, i, view)``. The wrapped dataset is not changed.

    With ``strong`` (a strong-view transform, :func:`strong_view_transform`) item ``i`` is
    ``((weak, strong), target, i, view)``: ``view`` names the weak view (the one a teacher-logit cache holds); the
    strong view is drawn after it as :class:`WeakStrongViews` does, so it has no view id (it is not cacheable)."""

    def __init__(self, dataset: Dataset, views: CropFlipViews, strong: Callable | None = None):
        self.strong = strong
        self.dataset = _with_transform(dataset, views if strong is None else WeakStrongViews(views, strong))
        self.views = views

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, target = self.dataset[index]
        if self.strong is None:
            image, view = image
            return image, target, int(index), view
        (weak, view), strong = image
        return (weak, strong), target, int(index), view
