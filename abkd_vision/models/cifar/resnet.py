"""CIFAR ResNets (resnet8 ... resnet110, resnet8x4, resnet32x4).

The three-stage CIFAR ResNet of He et al., "Deep Residual Learning for Image Recognition", CVPR 2016
(arXiv:1512.03385, Sec. 4.2): a 3x3 stem and 3 stages of ``n`` basic blocks (depth = 6n + 2) at 32x32,
16x16 and 8x8, then global average pooling and a linear classifier.

Widths follow the knowledge-distillation benchmark of Tian et al., "Contrastive Representation
Distillation", ICLR 2020 (RepDistiller, reused by mdistiller): [16, 16, 32, 64] for the plain models and
[32, 64, 128, 256] for the ``x4`` models. Parameter and buffer names match those code bases exactly, so
their published teachers (``resnet56_vanilla/ckpt_epoch_240.pth`` ...) load strictly.
"""

from typing import Callable, List, Sequence

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ._base import CifarNet, build_cifar_model, cifar_cfg, stage_info

__all__ = ["CifarResNet"]


def _conv3x3(in_chs: int, out_chs: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Post-activation basic block: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(in_chs, out_chs, stride)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(out_chs, out_chs)
        self.bn2 = nn.BatchNorm2d(out_chs)
        # Projection shortcut (named ``downsample`` as in the reference checkpoints) only when the shape changes.
        self.downsample = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_chs),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + shortcut)


class CifarResNet(CifarNet):
    """Three-stage CIFAR ResNet with basic blocks.

    Shapes for a ``[B, 3, 32, 32]`` input and ``channels = (c0, c1, c2, c3)``:
    stem ``[B, c0, 32, 32]`` -> layer1 ``[B, c1, 32, 32]`` -> layer2 ``[B, c2, 16, 16]``
    -> layer3 ``[B, c3, 8, 8]`` -> pooled ``[B, c3]`` -> ``fc`` logits ``[B, num_classes]``.
    ``forward_intermediates`` returns ``[stem, layer1, layer2, layer3]``; the final feature map is layer3's
    output (global average pooling == the reference AvgPool2d(8) at 32x32).
    """

    _classifier_attr = "fc"

    def __init__(
        self,
        depth: int = 20,
        channels: Sequence[int] = (16, 16, 32, 64),
        num_classes: int = 100,
        in_chans: int = 3,
    ):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (8, 14, 20, ...), got {depth}")
        blocks_per_stage = (depth - 2) // 6
        self.num_classes = num_classes
        self.num_features = channels[3]

        self.conv1 = nn.Conv2d(in_chans, channels[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels[0])
        self.relu = nn.ReLU(inplace=True)
        in_chs = channels[0]
        for idx, (out_chs, stride) in enumerate(zip(channels[1:], (1, 2, 2)), start=1):
            blocks = [BasicBlock(in_chs if i == 0 else out_chs, out_chs, stride if i == 0 else 1)
                      for i in range(blocks_per_stage)]
            self.add_module(f"layer{idx}", nn.Sequential(*blocks))
            in_chs = out_chs
        self.fc = self._make_classifier(num_classes)

        # Stage outputs returned by forward_intermediates; same order as the reference ``feats`` list.
        self.feature_info = stage_info(channels, (1, 1, 2, 4), ("relu", "layer1", "layer2", "layer3"))

        self._init_weights()

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(self.conv1(x)))

    def _stages(self) -> List[Callable[[torch.Tensor], torch.Tensor]]:
        return [self._stem, self.layer1, self.layer2, self.layer3]


default_cfgs = generate_default_cfgs({
    f"cifar_resnet{name}": cifar_cfg(
        pool_size=(8, 8), first_conv="conv1", classifier="fc", paper_ids="arXiv:1512.03385"
    )
    for name in ("8", "14", "20", "32", "44", "56", "110", "8x4", "32x4")
})


def _create(variant: str, pretrained: bool, depth: int, channels: Sequence[int], **kwargs) -> CifarResNet:
    return build_cifar_model(CifarResNet, variant, pretrained, 4, depth=depth, channels=channels, **kwargs)


_NARROW = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)


@register_model
def cifar_resnet8(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create("cifar_resnet8", pretrained, 8, _NARROW, **kwargs)


@register_model
def cifar_resnet14(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create("cifar_resnet14", pretrained, 14, _NARROW, **kwargs)


@register_model
def cifar_resnet20(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create("cifar_resnet20", pretrained, 20, _NARROW, **kwargs)


@register_model
def cifar_resnet32(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create("cifar_resnet32", pretrained, 32, _NARROW, **kwargs)


@register_model
def cifar_resnet44(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create("cifar_resnet44", pretrained, 44, _NARROW, **kwargs)


@register_model
def cifar_resnet56(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create("cifar_resnet56", pretrained, 56, _NARROW, **kwargs)


@register_model
def cifar_resnet110(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create("cifar_resnet110", pretrained, 110, _NARROW, **kwargs)


@register_model
def cifar_resnet8x4(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create("cifar_resnet8x4", pretrained, 8, _WIDE, **kwargs)


@register_model
def cifar_resnet32x4(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _create("cifar_resnet32x4", pretrained, 32, _WIDE, **kwargs)
