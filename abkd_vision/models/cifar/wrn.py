"""Wide residual networks for CIFAR (wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2).

Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016 (arXiv:1605.07146): pre-activation basic
blocks, depth = 6n + 4, widths [16, 16k, 32k, 64k] for widening factor k. ``wrn_40_2`` is a standard
teacher of the CIFAR-100 distillation benchmark (Tian et al., "Contrastive Representation Distillation",
ICLR 2020). Parameter and buffer names match RepDistiller/mdistiller so their checkpoints load strictly.
"""

from typing import Callable, List

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ._base import CifarNet, build_cifar_model, cifar_cfg, stage_info

__all__ = ["WideResNet"]


class PreActBlock(nn.Module):
    """Pre-activation block: conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        # The original code only projects when the width changes (it does not test the stride); every
        # stride-2 block also changes width, so this is equivalent and keeps the reference key names.
        self.convShortcut = None
        if in_chs != out_chs:
            self.convShortcut = nn.Conv2d(in_chs, out_chs, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        # A projected shortcut takes the pre-activated input, an identity shortcut the raw input.
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return self.conv2(out) + shortcut


class NetworkBlock(nn.Module):
    """A stage of ``n`` blocks; the wrapper exists to reproduce the ``blockN.layer.i.*`` key names."""

    def __init__(self, num_blocks: int, in_chs: int, out_chs: int, stride: int, drop_rate: float):
        super().__init__()
        self.layer = nn.Sequential(*[
            PreActBlock(in_chs if i == 0 else out_chs, out_chs, stride if i == 0 else 1, drop_rate)
            for i in range(num_blocks)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(CifarNet):
    """WRN-d-k for 32x32 inputs.

    Shapes for a ``[B, 3, 32, 32]`` input: stem conv ``[B, 16, 32, 32]`` -> block1 ``[B, 16k, 32, 32]``
    -> block2 ``[B, 32k, 16, 16]`` -> block3 ``[B, 64k, 8, 8]`` -> relu(bn1) final features
    ``[B, 64k, 8, 8]`` -> pooled ``[B, 64k]`` -> ``fc`` logits ``[B, num_classes]``.
    ``forward_intermediates`` returns ``[conv1, block1, block2, block3]`` (before the final BN + ReLU, which
    ``norm=True`` applies to the last one as well); global average pooling == the reference avg_pool2d(8).
    """

    _classifier_attr = "fc"
    _final_is_norm = True

    def __init__(
        self,
        depth: int = 40,
        widen_factor: int = 2,
        num_classes: int = 100,
        in_chans: int = 3,
        drop_rate: float = 0.0,
    ):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4 (16, 22, 28, 40, ...), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.num_classes = num_classes
        self.num_features = widths[3]

        self.conv1 = nn.Conv2d(in_chans, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2, drop_rate)
        # Pre-activation nets need a last BN + ReLU before pooling.
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = self._make_classifier(num_classes)

        # Same order as the reference ``feats`` list (stage outputs before the next block's BN/ReLU).
        self.feature_info = stage_info(widths, (1, 1, 2, 4), ("conv1", "block1", "block2", "block3"))

        self._init_weights(zero_linear_bias=True)

    def _stages(self) -> List[Callable[[torch.Tensor], torch.Tensor]]:
        return [self.conv1, self.block1, self.block2, self.block3]

    def _final(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(x))


default_cfgs = generate_default_cfgs({
    f"cifar_wrn_{d}_{k}": cifar_cfg(
        pool_size=(8, 8), first_conv="conv1", classifier="fc", paper_ids="arXiv:1605.07146"
    )
    for d, k in ((16, 1), (16, 2), (40, 1), (40, 2))
})


def _create(variant: str, pretrained: bool, depth: int, widen_factor: int, **kwargs) -> WideResNet:
    return build_cifar_model(WideResNet, variant, pretrained, 4, depth=depth, widen_factor=widen_factor, **kwargs)


@register_model
def cifar_wrn_16_1(pretrained: bool = False, **kwargs) -> WideResNet:
    return _create("cifar_wrn_16_1", pretrained, 16, 1, **kwargs)


@register_model
def cifar_wrn_16_2(pretrained: bool = False, **kwargs) -> WideResNet:
    return _create("cifar_wrn_16_2", pretrained, 16, 2, **kwargs)


@register_model
def cifar_wrn_40_1(pretrained: bool = False, **kwargs) -> WideResNet:
    return _create("cifar_wrn_40_1", pretrained, 40, 1, **kwargs)


@register_model
def cifar_wrn_40_2(pretrained: bool = False, **kwargs) -> WideResNet:
    return _create("cifar_wrn_40_2", pretrained, 40, 2, **kwargs)
