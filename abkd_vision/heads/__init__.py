"""Distillation heads: KD, DKD, LSD, TTM. AB variants are these heads with an AB divergence."""

from abkd_vision.heads.base import DistillationHead
from abkd_vision.heads.dkd import DKD
from abkd_vision.heads.kd import KD
from abkd_vision.heads.lsd import LSD, standardize_logits
from abkd_vision.heads.ttm import TTM

HEADS = {"kd": KD, "dkd": DKD, "lsd": LSD, "ttm": TTM}


def build_head(name: str, **params) -> DistillationHead:
    """Build a head by short name (kd, dkd, lsd, ttm); pass ``divergence=`` for the AB variants."""
    key = name.lower() if isinstance(name, str) else name
    if key not in HEADS:
        raise ValueError(f"unknown head {name!r}; choose one of {sorted(HEADS)}")
    return HEADS[key](**params)


__all__ = ["DKD", "HEADS", "KD", "LSD", "TTM", "DistillationHead", "build_head", "standardize_logits"]
