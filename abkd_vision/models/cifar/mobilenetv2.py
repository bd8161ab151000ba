"""MobileNetV2 for CIFAR ("mobile_half": width 0.5, expansion 6).

Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018 (arXiv:1801.04381),
in the CIFAR variant of the distillation benchmark (Tian et al., "Contrastive Representation
Distillation", ICLR 2020): the ImageNet stride pattern is kept (stride-2 stem, overall stride 16), every
inverted residual has an expansion conv (also when t = 1) and the 1x1 head conv keeps 1280 channels.
Parameter and buffer names match RepDistiller/mdistiller ``mobile_half`` so their checkpoints load strictly.
"""

from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn

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


class CifarMobileNetV2(nn.Module):
    """MobileNetV2 with width multiplier ``w`` (``mobile_half``: w = 0.5, channels below for it).

    Shapes for a ``[B, 3, 32, 32]`` input: stem ``[B, 16, 16, 16]`` -> blocks[0:2] ``[B, 12, 16, 16]``
    -> blocks[2] ``[B, 16, 8, 8]`` -> blocks[3:5] ``[B, 48, 4, 4]`` -> blocks[5:7] ``[B, 160, 2, 2]``
    -> conv2 final features ``[B, 1280, 2, 2]`` -> pooled ``[B, 1280]`` -> ``classifier`` ``[B, num_classes]``.
    """

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
        self.feature_info = [
            dict(num_chs=in_c, reduction=r, module=mod)
            for in_c, r, mod in zip(
                (int(32 * width_mult), widths[1], widths[2], widths[4], widths[6]),
                (2, 2, 4, 8, 16),
                ("conv1", "blocks.1", "blocks.2", "blocks.4", "blocks.6"),
            )
        ]

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def _make_classifier(self, num_classes: int) -> nn.Module:
        # A one-element Sequential: the reference keys are ``classifier.0.*``.
        if num_classes <= 0:
            return nn.Identity()
        return nn.Sequential(nn.Linear(self.num_features, num_classes))

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.classifier = self._make_classifier(num_classes)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs ``[stem, blocks[1], blocks[2], blocks[4], blocks[6]]`` (shapes in the class docstring).

        ``indices``: None = all, int n = last n, list = those indices. Returns the list if
        ``intermediates_only`` else ``(final feature map conv2(...) [B, 1280, 2, 2], list)``. ``norm`` is
        accepted for timm API compatibility and ignored.
        """
        if output_fmt != "NCHW":
            raise ValueError("only NCHW output is supported")
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        intermediates = []
        num_taps = max_index + 1 if stop_early else len(self._taps)
        x = self.conv1(x)
        done = 0
        for idx, until in enumerate(self._taps[:num_taps]):
            for block in self.blocks[done:until]:
                x = block(x)
            done = until
            if idx in take:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        if done == len(self.blocks):
            x = self.conv2(x)
        return x, intermediates

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, 32, 32]`` image -> final feature map ``[B, 1280, 2, 2]`` (before pooling)."""
        x = self.conv1(x)
        for block in self.blocks:
            x = block(x)
        return self.conv2(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map -> pooled features ``[B, 1280]`` (``pre_logits``) or logits ``[B, num_classes]``."""
        # Global average == the reference AvgPool2d(2, ceil_mode=True) on the 2x2 CIFAR map.
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


default_cfgs = generate_default_cfgs({
    "cifar_mobilenetv2": {
        "num_classes": 100,
        "input_size": (3, 32, 32),
        "pool_size": (2, 2),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": (0.5071, 0.4867, 0.4408),
        "std": (0.2675, 0.2565, 0.2761),
        "first_conv": "conv1.0",
        # The head is a one-layer Sequential; timm's classifier entry names the layer holding weight/bias.
        "classifier": "classifier.0",
        "paper_ids": "arXiv:1801.04381",
        "origin_url": "https://github.com/HobbitLong/RepDistiller",
    }
})


@register_model
def cifar_mobilenetv2(pretrained: bool = False, **kwargs) -> CifarMobileNetV2:
    """The benchmark's ``MobileNetV2`` student (reference name ``mobile_half``)."""
    return build_model_with_cfg(
        CifarMobileNetV2,
        "cifar_mobilenetv2",
        pretrained,
        feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3, 4)),
        **dict(dict(width_mult=0.5, expand_ratio=6), **kwargs),
    )
