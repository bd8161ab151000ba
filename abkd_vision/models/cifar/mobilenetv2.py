"""MobileNetV2 for CIFAR ("mobile_half": width 0.5, expansion 6).

Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018 (arXiv:1801.04381),
in the CIFAR variant of the distillation benchmark (Tian et al., "Contrastive Representation
Distillation", ICLR 2020): the ImageNet stride pattern is kept (stride-2 stem, overall stride 16), every
inverted residual has an expansion conv (also when t = 1) and the 1x1 head conv keeps 1280 channels.
Parameter and buffer names match RepDistiller/mdistiller ``mobile_half`` so their checkpoints load strictly.
"""

from typing import Callable, List

import torch
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ._base import CifarNet, build_cifar_model, cifar_cfg, stage_info

__all__ = ["CifarMobileNetV2"]

# (expansion, channels, blocks, first stride) per stage; ``None`` expansion means "use expand_ratio".
_STAGES = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2), (None, 96, 3, 1),
           (None, 160, 3, 2), (None, 320, 1, 1))


def _conv_bn_relu(in_chs: int, out_chs: int, kernel_size: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_chs),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 linear projection, residual when the shape is kept."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, expand_ratio: int):
        super().__init__()
        mid = in_chs * expand_ratio
        self.use_res = stride == 1 and in_chs == out_chs
        self.conv = nn.Sequential(
            nn.Conv2d(in_chs, mid, 1, 1, 0, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, out_chs, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out_chs),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class CifarMobileNetV2(CifarNet):
    """MobileNetV2 with width multiplier ``w`` (``mobile_half``: w = 0.5, channels below for it).

    Shapes for a ``[B, 3, 32, 32]`` input: stem ``[B, 16, 16, 16]`` -> blocks[0:2] ``[B, 12, 16, 16]``
    -> blocks[2] ``[B, 16, 8, 8]`` -> blocks[3:5] ``[B, 48, 4, 4]`` -> blocks[5:7] ``[B, 160, 2, 2]``
    -> conv2 final features ``[B, 1280, 2, 2]`` -> pooled ``[B, 1280]`` -> ``classifier`` ``[B, num_classes]``.
    ``forward_intermediates`` returns ``[stem, blocks[1], blocks[2], blocks[4], blocks[6]]`` (one stage per
    group of blocks above); global average pooling == the reference AvgPool2d(2, ceil_mode=True) on 2x2.
    """

    _classifier_attr = "classifier"

    def __init__(
        self,
        width_mult: float = 0.5,
        expand_ratio: int = 6,
        num_classes: int = 100,
        in_chans: int = 3,
    ):
        super().__init__()
        self.num_classes = num_classes
        in_chs = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(in_chans, in_chs, 3, 2)
        self.blocks = nn.ModuleList()
        widths = []
        for t, c, n, s in _STAGES:
            out_chs = int(c * width_mult)
            layers = []
            for i in range(n):
                layers.append(InvertedResidual(in_chs, out_chs, s if i == 0 else 1, t or expand_ratio))
                in_chs = out_chs
            self.blocks.append(nn.Sequential(*layers))
            widths.append(out_chs)
        # The reference only widens the head conv for width_mult > 1.
        self.num_features = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(in_chs, self.num_features, 1, 1)
        self.classifier = self._make_classifier(num_classes)

        # Stage taps as in the reference ``feats`` list: the stem, then after blocks 1, 2, 4 and 6.
        self._taps = (0, 2, 3, 5, 7)  # number of blocks run before each tap
        self.feature_info = stage_info(
            (int(32 * width_mult), widths[1], widths[2], widths[4], widths[6]),
            (2, 2, 4, 8, 16),
            ("conv1", "blocks.1", "blocks.2", "blocks.4", "blocks.6"),
        )

        self._init_weights(linear_std=0.01)

    def _make_classifier(self, num_classes: int) -> nn.Module:
        # A one-element Sequential: the reference keys are ``classifier.0.*``.
        if num_classes <= 0:
            return nn.Identity()
        return nn.Sequential(nn.Linear(self.num_features, num_classes))

    def _run_blocks(self, start: int, stop: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks[start:stop]:
                x = block(x)
            return x

        return run

    def _stages(self) -> List[Callable[[torch.Tensor], torch.Tensor]]:
        # The stem, then the blocks between consecutive taps.
        return [self.conv1] + [self._run_blocks(a, b) for a, b in zip(self._taps[:-1], self._taps[1:])]

    def _final(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(x)


default_cfgs = generate_default_cfgs({
    "cifar_mobilenetv2": cifar_cfg(
        pool_size=(2, 2),
        first_conv="conv1.0",
        # The head is a one-layer Sequential; timm's classifier entry names the layer holding weight/bias.
        classifier="classifier.0",
        paper_ids="arXiv:1801.04381",
    )
})


@register_model
def cifar_mobilenetv2(pretrained: bool = False, **kwargs) -> CifarMobileNetV2:
    """The benchmark's ``MobileNetV2`` student (reference name ``mobile_half``)."""
    return build_cifar_model(
        CifarMobileNetV2, "cifar_mobilenetv2", pretrained, 5, **dict(dict(width_mult=0.5, expand_ratio=6), **kwargs)
    )
