"""Data layer: LightningDataModules (CIFAR-100, any ImageFolder tree, the 11 CLIP base-to-new datasets in the
CoOp layout), CIFAR-style and CLIP transforms, and helpers
that export array datasets (scikit-learn digits, CIFAR npz files) as ImageFolder trees or CoOp-layout datasets.

Every module yields batches ``(images float32 [B, 3, S, S], labels int64 [B])`` with ``S = image_size``; with
``strong_view: true`` (MLKD's two views) its training batches are ``([weak, strong], labels)``, two such image
tensors (evaluation batches are unchanged).
"""

from abkd_vision.data.base import ClassificationDataModule, eval_sampler, make_dataloader
from abkd_vision.data.base_to_new import (
    BaseToNewDataModule,
    base_new_split,
    clip_eval_transform,
    clip_train_transform,
    few_shot,
)
from abkd_vision.data.cifar import CIFAR100_CLASSES, CIFAR100DataModule
from abkd_vision.data.coop import BASE_TO_NEW_DATASETS, read_coop_dataset
from abkd_vision.data.export import (
    balanced_subset,
    digits_split,
    export_digits,
    export_image_folder,
    export_npz_cifar,
    load_digits_uint8,
)
from abkd_vision.data.image_folder import ImageFolderDataModule, list_classes
from abkd_vision.data.synthetic import export_arrays_as_coop, write_fake_coop_dataset
from abkd_vision.data.transforms import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    ToRGB,
    cifar_eval_transform,
    cifar_train_transform,
)

__all__ = [
    "BASE_TO_NEW_DATASETS",
    "BaseToNewDataModule",
    "base_new_split",
    "clip_eval_transform",
    "clip_train_transform",
    "eval_sampler",
    "export_arrays_as_coop",
    "few_shot",
    "read_coop_dataset",
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
    "write_fake_coop_dataset",
]
