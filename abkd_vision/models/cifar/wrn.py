"""Wide residual networks for CIFAR (wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2).

Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016 (arXiv:1605.07146): pre-activation basic
blocks, depth = 6n + 4, widths [16, 16k, 32k, 64k] for widening factor k. ``wrn_40_2`` is a standard
teacher of the CIFAR-100 distillation benchmark (Tian et al., "Contrastive Representation Distillation",
ICLR 2020). Parameter and buffer names match RepDistiller/mdistiller so their checkpoints load strictly.
"""

from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn

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


class WideResNet(nn.Module):
    """WRN-d-k for 32x32 inputs.

    Shapes for a ``[B, 3, 32, 32]`` input: stem conv ``[B, 16, 32, 32]`` -> block1 ``[B, 16k, 32, 32]``
    -> block2 ``[B, 32k, 16, 16]`` -> block3 ``[B, 64k, 8, 8]`` -> relu(bn1) final features
    ``[B, 64k, 8, 8]`` -> pooled ``[B, 64k]`` -> ``fc`` logits ``[B, num_classes]``.
    """

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
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

        # Same order as the reference ``feats`` list (stage outputs before the next block's BN/ReLU).
        self.feature_info = [
            dict(num_chs=widths[0], reduction=1, module="conv1"),
            dict(num_chs=widths[1], reduction=1, module="block1"),
            dict(num_chs=widths[2], reduction=2, module="block2"),
            dict(num_chs=widths[3], reduction=4, module="block3"),
        ]

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def _stages(self) -> List[Callable[[torch.Tensor], torch.Tensor]]:
        return [self.conv1, self.block1, self.block2, self.block3]

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs ``[conv1, block1, block2, block3]`` (shapes in the class docstring).

        ``indices``: None = all, int n = last n, list = those indices. Returns the list if
        ``intermediates_only`` else ``(final feature map relu(bn1(block3)) [B, 64k, 8, 8], list)``.
        ``norm=True`` applies the final BN + ReLU to the last stage output as well.
        """
        if output_fmt != "NCHW":
            raise ValueError("only NCHW output is supported")
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        intermediates = []
        stages = self._stages()
        if stop_early:
            stages = stages[: max_index + 1]
        last = len(self.feature_info) - 1
        for idx, stage in enumerate(stages):
            x = stage(x)
            if idx in take:
                intermediates.append(self.relu(self.bn1(x)) if norm and idx == last else x)
        if intermediates_only:
            return intermediates
        return self.relu(self.bn1(x)), intermediates

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, 32, 32]`` image -> final feature map ``[B, 64k, 8, 8]`` (after the last BN + ReLU)."""
        for stage in self._stages():
            x = stage(x)
        return self.relu(self.bn1(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map -> pooled features ``[B, 64k]`` (``pre_logits``) or logits ``[B, num_classes]``."""
        # Global average == the reference avg_pool2d(8) at 32x32, and stays valid at other input sizes.
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs):
    return {
        "num_classes": 100,
        "input_size": (3, 32, 32),
        "pool_size": (8, 8),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": (0.5071, 0.4867, 0.4408),
        "std": (0.2675, 0.2565, 0.2761),
        "first_conv": "conv1",
        "classifier": "fc",
        "paper_ids": "arXiv:1605.07146",
        "origin_url": "https://github.com/HobbitLong/RepDistiller",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    f"cifar_wrn_{d}_{k}": _cfg() for d, k in ((16, 1), (16, 2), (40, 1), (40, 2))
})


def _create(variant: str, pretrained: bool, depth: int, widen_factor: int, **kwargs) -> WideResNet:
    return build_model_with_cfg(
        WideResNet,
        variant,
        pretrained,
        depth=depth,
        widen_factor=widen_factor,
        feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)),
        **kwargs,
    )


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
