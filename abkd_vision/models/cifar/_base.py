"""The timm plumbing shared by every CIFAR model family: classifier access, stage loop, pooling head, cfgs.

A family subclasses :class:`CifarNet` and supplies only what is specific to it: its modules (built in its
``__init__``, which also sets ``num_classes``, ``num_features`` and ``feature_info``), ``_stages()`` (one
callable per ``feature_info`` entry, run in order), the name of its classifier attribute and, if the last
stage output is not yet the final feature map, ``_final``.
"""

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type, TypeVar, Union

import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg
from timm.models._features import feature_take_indices
from torch import nn

__all__ = ["CIFAR100_MEAN", "CIFAR100_STD", "CifarNet", "build_cifar_model", "cifar_cfg", "stage_info"]

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)

ModelT = TypeVar("ModelT", bound=nn.Module)


def cifar_cfg(*, pool_size: Tuple[int, int], first_conv: str, classifier: str, paper_ids: str,
              **overrides: Any) -> Dict[str, Any]:
    """timm default cfg of a CIFAR-100 model (100 classes, 32x32 inputs, CIFAR-100 mean/std, no crop).

    ``pool_size`` is the final feature map at 32x32, ``first_conv`` / ``classifier`` the module names of the
    stem conv and the classifier layer, ``paper_ids`` the architecture's paper; ``overrides`` add or replace
    any other key.
    """
    return {
        "num_classes": 100,
        "input_size": (3, 32, 32),
        "pool_size": pool_size,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": CIFAR100_MEAN,
        "std": CIFAR100_STD,
        "first_conv": first_conv,
        "classifier": classifier,
        "paper_ids": paper_ids,
        "origin_url": "https://github.com/HobbitLong/RepDistiller",
        **overrides,
    }


def stage_info(num_chs: Sequence[int], reductions: Sequence[int], modules: Sequence[str]) -> List[dict]:
    """timm ``feature_info`` entries, one per stage: channels, stride w.r.t. the input, module name."""
    return [dict(num_chs=c, reduction=r, module=m) for c, r, m in zip(num_chs, reductions, modules)]


def build_cifar_model(model_cls: Type[ModelT], variant: str, pretrained: bool, num_stages: int, **kwargs) -> ModelT:
    """``build_model_with_cfg`` for a registered CIFAR model; ``features_only=True`` gives its ``num_stages``
    stage outputs through ``forward_intermediates`` (timm's feature getter). ``kwargs`` go to ``model_cls``.
    """
    return build_model_with_cfg(
        model_cls,
        variant,
        pretrained,
        feature_cfg=dict(feature_cls="getter", out_indices=tuple(range(num_stages))),
        **kwargs,
    )


class CifarNet(nn.Module):
    """Base of the CIFAR models: stages -> optional final transform -> global average pool -> classifier.

    Subclass hooks:

    * ``_stages()``: the callables producing the ``feature_info`` stage outputs, in order (``x`` is fed through
      all of them; the output of stage ``i`` is intermediate ``i``).
    * ``_final(x)``: turns the last stage output into the final feature map (identity by default; e.g. the
      last BN + ReLU of a pre-activation net, or a 1x1 head conv).
    * ``_final_is_norm``: True when ``_final`` is a shape-preserving norm that ``forward_intermediates(...,
      norm=True)`` should also apply to the last intermediate; otherwise ``norm`` is ignored.
    * ``_classifier_attr``: attribute holding the classifier (``fc``, ``classifier``, ``linear``); the family's
      ``__init__`` creates it with ``_make_classifier`` so the state-dict keys keep the reference names.
    * ``_make_classifier(num_classes)``: the classifier module (override for a non-``nn.Linear`` head).

    ``_init_weights`` is the reference weight initialisation, called at the end of the family's ``__init__``.
    """

    _classifier_attr: str
    _final_is_norm: bool = False
    num_classes: int
    num_features: int
    feature_info: List[dict]

    def _stages(self) -> List[Callable[[torch.Tensor], torch.Tensor]]:
        raise NotImplementedError

    def _final(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _make_classifier(self, num_classes: int) -> nn.Module:
        """``nn.Linear(num_features, num_classes)``, or ``nn.Identity`` (pooled features out) if num_classes <= 0."""
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _init_weights(self, linear_std: Optional[float] = None, zero_linear_bias: bool = False) -> None:
        """Kaiming-normal (fan_out) convs with zero bias, BN weight 1 / bias 0; ``nn.Linear`` layers keep
        PyTorch's default init unless ``linear_std`` (weights ~ N(0, std), bias 0) or ``zero_linear_bias``."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                if linear_std is not None:
                    nn.init.normal_(m.weight, 0, linear_std)
                if linear_std is not None or zero_linear_bias:
                    nn.init.zeros_(m.bias)

    def get_classifier(self) -> nn.Module:
        return getattr(self, self._classifier_attr)

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        setattr(self, self._classifier_attr, self._make_classifier(num_classes))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs, one per ``feature_info`` entry (listed with their shapes in the class docstrings).

        ``indices``: None = all, int n = last n, list = those indices. Returns the list if
        ``intermediates_only`` else ``(final feature map, list)``, where the final feature map equals
        ``forward_features(x)`` (or, if ``stop_early`` skipped stages, is the last stage output computed).
        ``norm=True`` applies ``_final`` to the last intermediate when ``_final_is_norm`` (WRN's last BN + ReLU);
        other models accept it for timm API compatibility and ignore it.
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
                intermediates.append(self._final(x) if norm and self._final_is_norm and idx == last else x)
        if intermediates_only:
            return intermediates
        return (self._final(x) if len(stages) == len(self.feature_info) else x), intermediates

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, 32, 32]`` image -> final feature map ``[B, num_features, h, w]`` (before pooling)."""
        for stage in self._stages():
            x = stage(x)
        return self._final(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map -> pooled ``[B, num_features]`` (``pre_logits``) or logits ``[B, num_classes]``."""
        # Global average == the references' fixed-size average pool (AvgPool2d(8), avg_pool2d(4), ...) on the
        # CIFAR-sized final map (cfg ``pool_size``), and stays valid at other input sizes.
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return x if pre_logits else self.get_classifier()(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
