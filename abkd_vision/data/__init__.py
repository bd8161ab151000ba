"""Data layer: LightningDataModules (CIFAR-100, any ImageFolder tree), CIFAR-style transforms, and helpers
that export array datasets (scikit-learn digits, CIFAR npz files) as ImageFolder trees.

Every module yields batches ``(images float32 [B, 3, S, S], labels int64 [B])`` with ``S = image_size``.
"""

from abkd_vision.data.base import ClassificationDataModule, make_dataloader
from abkd_vision.data.cifar import CIFAR100_CLASSES, CIFAR100DataModule
from abkd_vision.data.export import (
    balanced_subset,
    digits_split,
    export_digits,
    export_image_folder,
    export_npz_cifar,
    load_digits_uint8,
)
from abkd_vision.data.image_folder import ImageFolderDataModule, list_classes
from abkd_vision.data.transforms import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    ToRGB,
    cifar_eval_transform,
    cifar_train_transform,
)

__all__ = [
    "ClassificationDataModule",
    "CIFAR100_CLASSES",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CIFAR100DataModule",
    "ImageFolderDataModule",
    "ToRGB",
    "balanced_subset",
    "cifar_eval_transform",
    "cifar_train_transform",
    "digits_split",
    "export_digits",
    "export_image_folder",
    "export_npz_cifar",
    "list_classes",
    "load_digits_uint8",
    "make_dataloader",
]
