"""Distillation heads: KD, DKD, LSD, TTM, DIST, NKD, MLKD. AB variants are these heads with an AB divergence;
logit standardisation (LS) and CTKD's learned temperature are options of every head (``standardize``,
``learned_temperature``)."""

from abkd_vision.heads.base import DistillationHead, standardize_logits
from abkd_vision.heads.dist import DIST
from abkd_vision.heads.dkd import DKD
from abkd_vision.heads.kd import KD
from abkd_vision.heads.lsd import LSD
from abkd_vision.heads.mlkd import MLKD
from abkd_vision.heads.nkd import NKD
from abkd_vision.heads.temperature import CurriculumTemperature
from abkd_vision.heads.ttm import TTM

HEADS = {"kd": KD, "dkd": DKD, "lsd": LSD, "ttm": TTM, "dist": DIST, "nkd": NKD, "mlkd": MLKD}


def build_head(name: str, **params) -> DistillationHead:
    """Build a head by short name (kd, dkd, lsd, ttm, dist, nkd, mlkd); pass ``divergence=`` for the AB variants,
    ``standardize=True`` for +LS and ``learned_temperature=CurriculumTemperature()`` for CTKD."""
    key = name.lower() if isinstance(name, str) else name
    if key not in HEADS:
        raise ValueError(f"unknown head {name!r}; choose one of {sorted(HEADS)}")
    return HEADS[key](**params)


__all__ = ["DIST", "DKD", "HEADS", "KD", "LSD", "MLKD", "NKD", "TTM", "CurriculumTemperature", "DistillationHead",
           "build_head", "standardize_logits"]
