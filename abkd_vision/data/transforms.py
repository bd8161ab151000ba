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

from collections.abc import Sequence

from PIL import Image
from torchvision import transforms as T

__all__ = [
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "ToRGB",
    "cifar_eval_transform",
    "cifar_train_transform",
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
