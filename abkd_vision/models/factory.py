"""Model creation by registered (``cifar_resnet32x4``) or published RepDistiller/mdistiller name (``resnet32x4``).

The CIFAR-100 distillation benchmark (Tian et al., "Contrastive Representation Distillation", ICLR 2020)
names its models ``resnet8x4``, ``wrn_40_2``, ``vgg13``, ``ResNet50``, ``MobileNetV2``, ... and publishes its
teachers as ``<name>_vanilla/ckpt_epoch_240.pth``; this module maps those names onto the timm registry.
"""

import re
from pathlib import Path
from typing import Dict, List, Optional, Union

import timm
from torch import nn

from . import cifar  # noqa: F401  (registers the cifar_* models with timm)
from .checkpoint import load_checkpoint

__all__ = ["create_model", "list_models", "model_name_from_teacher_path", "resolve_model_name"]

# Published names that are not simply ``cifar_`` + lowercase name.
_EXTRA_ALIASES = {
    "ResNet18": "cifar_resnet18",
    "ResNet50": "cifar_resnet50",
    "MobileNetV2": "cifar_mobilenetv2",
    "mobile_half": "cifar_mobilenetv2",
    "ShuffleV1": "cifar_shufflev1",
    "ShuffleV2": "cifar_shufflev2",
    **{f"vgg{d}_bn": f"cifar_vgg{d}" for d in (8, 11, 13, 16, 19)},
}


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def list_models() -> List[str]:
    """Registered names of this suite's CIFAR models (``cifar_*``), in natural order (resnet8 < resnet110)."""
    prefix = cifar.__name__ + "."
    return sorted(
        (name for name in timm.list_models("cifar_*")
         if timm.models.model_entrypoint(name).__module__.startswith(prefix)),
        key=_natural_key,
    )


def _aliases() -> Dict[str, str]:
    aliases = {name.removeprefix("cifar_"): name for name in list_models()}
    aliases.update({k: v for k, v in _EXTRA_ALIASES.items() if v in aliases.values()})
    return aliases


def resolve_model_name(name: str) -> str:
    """Registered ``cifar_*`` name for a registered or published model name; ``ValueError`` if unknown."""
    registered = list_models()
    if name in registered:
        return name
    aliases = _aliases()
    if name in aliases:
        return aliases[name]
    raise ValueError(
        f"Unknown model {name!r}. Available: {', '.join(registered)} "
        f"(or the aliases {', '.join(sorted(aliases, key=_natural_key))})"
    )


def create_model(
    name: str,
    num_classes: int = 100,
    checkpoint_path: Optional[Union[str, Path]] = None,
    trusted: bool = False,
    **kwargs,
) -> nn.Module:
    """Build a CIFAR model through ``timm.create_model``.

    ``name`` is a registered name (``cifar_wrn_40_2``) or a published one (``wrn_40_2``, ``ResNet50``).
    ``checkpoint_path`` loads weights strictly with :func:`abkd_vision.models.load_checkpoint` (instead of
    timm's lenient loader); ``trusted`` is passed on to it. Other kwargs go to timm / the model class.
    """
    model = timm.create_model(resolve_model_name(name), num_classes=num_classes, **kwargs)
    if checkpoint_path is not None:
        load_checkpoint(model, checkpoint_path, trusted=trusted)
    return model


def model_name_from_teacher_path(path: Union[str, Path]) -> str:
    """Registered name for a published teacher path, e.g. ``.../ResNet50_vanilla/ckpt_epoch_240.pth``.

    The model name is the start of the checkpoint's directory name (RepDistiller saves runs as
    ``<model>_<dataset|vanilla>_...``); the longest known name followed by ``_`` or the end wins, so
    ``resnet32x4_vanilla`` is not taken for ``resnet32``. The file name is tried if the directory fails.
    """
    aliases = _aliases()
    by_length = sorted(aliases, key=len, reverse=True)
    path = Path(path)
    for part in (path.parent.name, path.stem):
        for alias in by_length:
            if re.match(re.escape(alias) + r"(_|$)", part):
                return aliases[alias]
    raise ValueError(
        f"Cannot infer the model from teacher path {str(path)!r}: expected a directory named "
        f"'<model>_vanilla' with <model> one of {', '.join(sorted(aliases))}"
    )
