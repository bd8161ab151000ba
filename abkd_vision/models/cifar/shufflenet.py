"""ShuffleNet V1 (g=3) and ShuffleNet V2 (1x) for CIFAR.

Zhang et al., "ShuffleNet: An Extremely Efficient Convolutional Neural Network for Mobile Devices", CVPR 2018
(arXiv:1707.01083) and Ma et al., "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture
Design", ECCV 2018 (arXiv:1807.11164), in the CIFAR variants of the distillation benchmark (Tian et al.,
"Contrastive Representation Distillation", ICLR 2020): a 1x1 stride-1 stem without max-pool, three stages
that each halve the resolution, and a ``linear`` classifier. Parameter and buffer names match
RepDistiller/mdistiller ``ShuffleV1`` / ``ShuffleV2`` so their checkpoints load strictly.
"""

from typing import Callable, List, Sequence

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ._base import CifarNet, build_cifar_model, cifar_cfg

__all__ = ["CifarShuffleNetV1", "CifarShuffleNetV2"]


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, g, C/g, H, W] -> transpose -> [B, C, H, W], so the next group conv mixes groups."""
    b, c, h, w = x.shape
    return x.reshape(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleV1Unit(nn.Module):
    """Grouped 1x1 -> shuffle -> depthwise 3x3 -> grouped 1x1; stride 2 concatenates an avg-pooled input."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        mid = out_chs // 4
        # The first unit sees only the 24-channel stem, too few channels to split into groups.
        self.first_groups = 1 if in_chs == 24 else groups
        self.conv1 = nn.Conv2d(in_chs, mid, kernel_size=1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, kernel_size=3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_chs, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], 1))
        return F.relu(out + x)


class ShuffleV2Unit(nn.Module):
    """Channel split: half passes through, half goes 1x1 -> depthwise 3x3 -> 1x1; concat, shuffle."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, kernel_size=3, stride=1, padding=1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=1)
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return channel_shuffle(torch.cat([x1, out], 1), 2)


class ShuffleV2DownUnit(nn.Module):
    """Stride-2 unit: both branches see the full input and each produces half of the output channels."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        mid = out_chs // 2
        # left branch: depthwise 3x3 (stride 2) -> 1x1
        self.conv1 = nn.Conv2d(in_chs, in_chs, kernel_size=3, stride=2, padding=1, groups=in_chs, bias=False)
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.conv2 = nn.Conv2d(in_chs, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # right branch: 1x1 -> depthwise 3x3 (stride 2) -> 1x1
        self.conv3 = nn.Conv2d(in_chs, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, kernel_size=3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class _ShuffleBase(CifarNet):
    """Shared stem and stage list of both ShuffleNets (stem 24 channels, three stride-2 stages).

    ``forward_intermediates`` returns ``[stem, layer1, layer2, layer3]``; global average pooling == the
    reference avg_pool2d(4) on the 4x4 CIFAR map.
    """

    _classifier_attr = "linear"

    def _init_body(
        self,
        in_chans: int,
        widths: Sequence[int],
        depths: Sequence[int],
        make_stage: Callable[[int, int, int], List[nn.Module]],
    ) -> int:
        """Build the stem and ``layer1..3`` (``make_stage(in_chs, out_chs, depth)`` gives a stage's units) with
        their ``feature_info``; returns the channels of ``layer3``."""
        self.conv1 = nn.Conv2d(in_chans, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_chs = 24
        self.feature_info = [dict(num_chs=24, reduction=1, module="bn1")]
        for idx, (out_chs, n) in enumerate(zip(widths, depths), start=1):
            self.add_module(f"layer{idx}", nn.Sequential(*make_stage(in_chs, out_chs, n)))
            self.feature_info.append(dict(num_chs=out_chs, reduction=2 ** idx, module=f"layer{idx}"))
            in_chs = out_chs
        return in_chs

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.conv1(x)))

    def _stages(self) -> List[Callable[[torch.Tensor], torch.Tensor]]:
        return [self._stem, self.layer1, self.layer2, self.layer3]


class CifarShuffleNetV1(_ShuffleBase):
    """ShuffleNet V1. Shapes for ``[B, 3, 32, 32]`` (default widths): stem ``[B, 24, 32, 32]`` -> layer1
    ``[B, 240, 16, 16]`` -> layer2 ``[B, 480, 8, 8]`` -> layer3 ``[B, 960, 4, 4]`` -> logits ``[B, num_classes]``.
    """

    def __init__(
        self,
        widths: Sequence[int] = (240, 480, 960),
        depths: Sequence[int] = (4, 8, 4),
        groups: int = 3,
        num_classes: int = 100,
        in_chans: int = 3,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = widths[-1]

        def make_stage(in_chs: int, out_chs: int, n: int) -> List[nn.Module]:
            # The stride-2 unit concatenates its pooled input, so its branch only adds out - in channels.
            units = [ShuffleV1Unit(in_chs, out_chs - in_chs, 2, groups)]
            return units + [ShuffleV1Unit(out_chs, out_chs, 1, groups) for _ in range(n - 1)]

        self._init_body(in_chans, widths, depths, make_stage)
        self.linear = self._make_classifier(num_classes)


class CifarShuffleNetV2(_ShuffleBase):
    """ShuffleNet V2 1x. Shapes for ``[B, 3, 32, 32]``: stem ``[B, 24, 32, 32]`` -> layer1 ``[B, 116, 16, 16]``
    -> layer2 ``[B, 232, 8, 8]`` -> layer3 ``[B, 464, 4, 4]`` -> relu(bn2(conv2)) final features
    ``[B, 1024, 4, 4]`` -> pooled ``[B, 1024]`` -> logits ``[B, num_classes]``.
    """

    def __init__(
        self,
        widths: Sequence[int] = (116, 232, 464, 1024),
        depths: Sequence[int] = (3, 7, 3),
        num_classes: int = 100,
        in_chans: int = 3,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = widths[-1]

        def make_stage(in_chs: int, out_chs: int, n: int) -> List[nn.Module]:
            # The reference stage is one down-sampling unit followed by ``n`` (not n - 1) regular units.
            return [ShuffleV2DownUnit(in_chs, out_chs)] + [ShuffleV2Unit(out_chs) for _ in range(n)]

        in_chs = self._init_body(in_chans, widths[:3], depths, make_stage)
        self.conv2 = nn.Conv2d(in_chs, self.num_features, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(self.num_features)
        self.linear = self._make_classifier(num_classes)

    def _final(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.conv2(x)))


def _cfg(paper_ids: str) -> dict:
    return cifar_cfg(pool_size=(4, 4), first_conv="conv1", classifier="linear", paper_ids=paper_ids)


default_cfgs = generate_default_cfgs({
    "cifar_shufflev1": _cfg("arXiv:1707.01083"),
    "cifar_shufflev2": _cfg("arXiv:1807.11164"),
})


@register_model
def cifar_shufflev1(pretrained: bool = False, **kwargs) -> CifarShuffleNetV1:
    """The benchmark's ``ShuffleV1`` student (groups = 3)."""
    return build_cifar_model(CifarShuffleNetV1, "cifar_shufflev1", pretrained, 4, **kwargs)


@register_model
def cifar_shufflev2(pretrained: bool = False, **kwargs) -> CifarShuffleNetV2:
    """The benchmark's ``ShuffleV2`` student (1x width)."""
    return build_cifar_model(CifarShuffleNetV2, "cifar_shufflev2", pretrained, 4, **kwargs)
