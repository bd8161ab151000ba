"""ImageNet-style ResNet18 / ResNet50 adapted to 32x32 inputs.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016 (arXiv:1512.03385): four stages of
basic (ResNet18) or bottleneck (ResNet50) blocks with widths 64-512, but with a 3x3 stride-1 stem and no
max-pool so that CIFAR images keep enough resolution (the widely used ``pytorch-cifar`` layout). Called
``resnetv2.py`` / ``ResNet18`` / ``ResNet50`` in RepDistiller and mdistiller (Tian et al., "Contrastive
Representation Distillation", ICLR 2020) -- it is *not* the pre-activation "ResNet v2". Parameter and
buffer names match those code bases so their checkpoints (``ResNet50_vanilla``) load strictly.
"""

from typing import Callable, List, Sequence, Type, Union

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ._base import CifarNet, build_cifar_model, cifar_cfg

__all__ = ["CifarResNetV2"]


def _projection(in_chs: int, out_chs: int, stride: int) -> nn.Module:
    # Identity shortcuts have no parameters, so nn.Identity keeps the reference key names (shortcut.0/1).
    if stride == 1 and in_chs == out_chs:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_chs, out_chs, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_chs),
    )


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_chs: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _projection(in_chs, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_chs: int, planes: int, stride: int = 1):
        super().__init__()
        out_chs = planes * self.expansion
        self.conv1 = nn.Conv2d(in_chs, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_chs, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.shortcut = _projection(in_chs, out_chs, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class CifarResNetV2(CifarNet):
    """Four-stage ResNet for 32x32 inputs (e = block expansion: 1 basic, 4 bottleneck).

    Shapes for a ``[B, 3, 32, 32]`` input: stem ``[B, 64, 32, 32]`` -> layer1 ``[B, 64e, 32, 32]``
    -> layer2 ``[B, 128e, 16, 16]`` -> layer3 ``[B, 256e, 8, 8]`` -> layer4 ``[B, 512e, 4, 4]``
    -> pooled ``[B, 512e]`` -> ``linear`` logits ``[B, num_classes]``.
    ``forward_intermediates`` returns ``[stem, layer1, ..., layer4]``; the final feature map is layer4's.
    """

    _classifier_attr = "linear"

    def __init__(
        self,
        block: Type[Union[BasicBlock, Bottleneck]] = BasicBlock,
        layers: Sequence[int] = (2, 2, 2, 2),
        num_classes: int = 100,
        in_chans: int = 3,
        zero_init_residual: bool = False,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = 512 * block.expansion

        self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_chs = 64
        self.feature_info = [dict(num_chs=64, reduction=1, module="bn1")]
        for idx, (planes, n, stride) in enumerate(zip((64, 128, 256, 512), layers, (1, 2, 2, 2)), start=1):
            blocks = []
            for i in range(n):
                blocks.append(block(in_chs, planes, stride if i == 0 else 1))
                in_chs = planes * block.expansion
            self.add_module(f"layer{idx}", nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=in_chs, reduction=2 ** max(idx - 1, 0), module=f"layer{idx}"))
        self.linear = self._make_classifier(num_classes)

        self._init_weights()
        if zero_init_residual:
            # Each residual branch starts as zero, so every block starts as an identity (Goyal et al. 2017).
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.conv1(x)))

    def _stages(self) -> List[Callable[[torch.Tensor], torch.Tensor]]:
        return [self._stem, self.layer1, self.layer2, self.layer3, self.layer4]


default_cfgs = generate_default_cfgs({
    name: cifar_cfg(pool_size=(4, 4), first_conv="conv1", classifier="linear", paper_ids="arXiv:1512.03385")
    for name in ("cifar_resnet18", "cifar_resnet50")
})


def _create(variant: str, pretrained: bool, block, layers: Sequence[int], **kwargs) -> CifarResNetV2:
    return build_cifar_model(CifarResNetV2, variant, pretrained, 5, block=block, layers=layers, **kwargs)


@register_model
def cifar_resnet18(pretrained: bool = False, **kwargs) -> CifarResNetV2:
    return _create("cifar_resnet18", pretrained, BasicBlock, (2, 2, 2, 2), **kwargs)


@register_model
def cifar_resnet50(pretrained: bool = False, **kwargs) -> CifarResNetV2:
    return _create("cifar_resnet50", pretrained, Bottleneck, (3, 4, 6, 3), **kwargs)
