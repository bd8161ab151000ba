"""VGG with batch norm for CIFAR (vgg8, vgg11, vgg13, vgg16, vgg19).

Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition", ICLR 2015
(arXiv:1409.1556), with BatchNorm after every convolution and the CIFAR layout of the distillation
benchmark (Tian et al., "Contrastive Representation Distillation", ICLR 2020): five conv stages, max
pooling between stages 0-3, global average pooling and a single linear ``classifier`` (no FC stack).
``vgg8`` is the extra one-conv-per-stage student of that benchmark. These are the reference ``vgg*_bn``
models; parameter and buffer names match RepDistiller/mdistiller so their checkpoints load strictly.
"""

from typing import Callable, List, Sequence

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ._base import CifarNet, build_cifar_model, cifar_cfg

__all__ = ["CifarVGG", "VGG_STAGES"]

# Output widths of the convs in each of the five stages.
VGG_STAGES = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


def _make_stage(in_chs: int, widths: Sequence[int]) -> nn.Sequential:
    layers: List[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_chs, width, kernel_size=3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_chs = width
    # The stage ends at its last BN (the reference drops the final ReLU so the pre-activation can be tapped);
    # forward applies that ReLU. Keeping the ReLU modules in between reproduces the Sequential indices.
    return nn.Sequential(*layers[:-1])


class CifarVGG(CifarNet):
    """VGG-BN for 32x32 inputs.

    Shapes for a ``[B, 3, 32, 32]`` input: block0 ``[B, 64, 32, 32]`` -> block1 ``[B, 128, 16, 16]``
    -> block2 ``[B, 256, 8, 8]`` -> block3 ``[B, 512, 4, 4]`` -> block4 ``[B, 512, 4, 4]``
    -> pooled ``[B, 512]`` -> ``classifier`` logits ``[B, num_classes]``.
    ``forward_intermediates`` returns the post-ReLU outputs ``[block0, ..., block4]``; the final feature map is
    block4's.
    """

    _classifier_attr = "classifier"

    def __init__(
        self,
        stages: Sequence[Sequence[int]] = VGG_STAGES["vgg13"],
        num_classes: int = 100,
        in_chans: int = 3,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = stages[-1][-1]
        in_chs = in_chans
        for idx, widths in enumerate(stages):
            self.add_module(f"block{idx}", _make_stage(in_chs, widths))
            in_chs = widths[-1]
        self.classifier = self._make_classifier(num_classes)

        self.feature_info = [
            dict(num_chs=stages[i][-1], reduction=r, module=f"block{i}") for i, r in enumerate((1, 2, 4, 8, 8))
        ]

        self._init_weights(linear_std=0.01)

    def _stage0(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.block0(x))

    def _stage1(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.block1(F.max_pool2d(x, 2)))

    def _stage2(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.block2(F.max_pool2d(x, 2)))

    def _stage3(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.block3(F.max_pool2d(x, 2)))

    def _stage4(self, x: torch.Tensor) -> torch.Tensor:
        # The reference skips the 4th max-pool on CIFAR (block4 runs at 4x4) and applies it on 64x64 inputs
        # (Tiny-ImageNet, 8x8 -> 4x4); pooling only maps larger than 4x4 reproduces both cases.
        if x.shape[-1] > 4:
            x = F.max_pool2d(x, 2)
        return F.relu(self.block4(x))

    def _stages(self) -> List[Callable[[torch.Tensor], torch.Tensor]]:
        return [self._stage0, self._stage1, self._stage2, self._stage3, self._stage4]


default_cfgs = generate_default_cfgs({
    f"cifar_{name}": cifar_cfg(
        pool_size=(4, 4), first_conv="block0.0", classifier="classifier", paper_ids="arXiv:1409.1556"
    )
    for name in VGG_STAGES
})


def _create(variant: str, pretrained: bool, **kwargs) -> CifarVGG:
    stages = VGG_STAGES[variant.removeprefix("cifar_")]
    return build_cifar_model(CifarVGG, variant, pretrained, 5, stages=stages, **kwargs)


@register_model
def cifar_vgg8(pretrained: bool = False, **kwargs) -> CifarVGG:
    return _create("cifar_vgg8", pretrained, **kwargs)


@register_model
def cifar_vgg11(pretrained: bool = False, **kwargs) -> CifarVGG:
    return _create("cifar_vgg11", pretrained, **kwargs)


@register_model
def cifar_vgg13(pretrained: bool = False, **kwargs) -> CifarVGG:
    return _create("cifar_vgg13", pretrained, **kwargs)


@register_model
def cifar_vgg16(pretrained: bool = False, **kwargs) -> CifarVGG:
    return _create("cifar_vgg16", pretrained, **kwargs)


@register_model
def cifar_vgg19(pretrained: bool = False, **kwargs) -> CifarVGG:
    return _create("cifar_vgg19", pretrained, **kwargs)
