"""CIFAR-100 model zoo of the distillation benchmark (RepDistiller / mdistiller layouts).

Importing this package registers every model with timm as ``cifar_<name>`` (e.g. ``cifar_resnet32x4``).
"""

from .mobilenetv2 import CifarMobileNetV2
from .resnet import CifarResNet
from .resnetv2 import CifarResNetV2
from .shufflenet import CifarShuffleNetV1, CifarShuffleNetV2
from .vgg import CifarVGG
from .wrn import WideResNet

__all__ = [
    "CifarMobileNetV2",
    "CifarResNet",
    "CifarResNetV2",
    "CifarShuffleNetV1",
    "CifarShuffleNetV2",
    "CifarVGG",
    "WideResNet",
]
