"""Model zoo: the CIFAR-100 distillation benchmark networks, registered with timm, and checkpoint loading.

Importing this package registers ``cifar_*`` models with timm, so ``timm.create_model("cifar_resnet8x4")``
works; :func:`create_model` also accepts the published RepDistiller/mdistiller names (``resnet8x4``,
``wrn_40_2``, ``ResNet50``, ...).
"""

from . import cifar
from .checkpoint import CheckpointError, load_checkpoint
from .factory import create_model, list_models, model_name_from_teacher_path, resolve_model_name

__all__ = [
    "CheckpointError",
    "cifar",
    "create_model",
    "list_models",
    "load_checkpoint",
    "model_name_from_teacher_path",
    "resolve_model_name",
]
