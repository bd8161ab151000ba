#!/usr/bin/env python
"""Write the CIFAR-100 per-run configs (teachers and distillation) from one small table.

    python scripts/make_cifar100_configs.py          # (re)write configs/cifar100/{teachers,<method>}/*.yaml
    python scripts/make_cifar100_configs.py --check  # exit 1 if a committed file differs from what would be written

Every generated file is composed with the hand-written ``configs/cifar100/base.yaml``:

    python run.py fit --config configs/cifar100/base.yaml --config configs/cifar100/abkd/resnet32x4-resnet8x4.yaml

The output depends only on the tables below (no dates, no environment), so ``--check`` can guard the
committed files in the tests.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import configgen  # noqa: E402
from configgen import num  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs" / "cifar100"
TEACHER_CKPT = "checkpoints/cifar_teachers/{teacher}_vanilla/ckpt_epoch_240.pth"

# Methods in file order. The first eight are the ABKD paper's; the rest add DIST, NKD, MLKD and CTKD (and their AB
# variants: the same head with D_AB), and the logit-standardisation paper's combinations (*_ls) for the pairs it
# reports. KD+LS is ``lsd``.
METHODS = ("kd", "abkd", "dkd", "abdkd", "lsd", "ablsd", "ttm", "abttm",
           "dist", "nkd", "abnkd", "mlkd", "abmlkd", "ctkd", "abctkd", "dkd_ls", "ctkd_ls", "mlkd_ls")
LS_METHODS = ("dkd_ls", "ctkd_ls", "mlkd_ls")

# ABKD paper (Wang et al., ICML 2025), App. I.2.3, Table 4: (alpha, beta) for ABKD, ABDKD, ABLSD, ABTTM.
# ResNet50 -> vgg8 (the paper's Table 12) is not in Table 4; it reuses the vgg13 -> vgg8 column.
TABLE4 = {
    ("wrn_40_2", "wrn_16_2"): ((0.6, 0.5), (0.8, 0.4), (0.9, 0.1), (0.8, 0.3)),
    ("wrn_40_2", "wrn_40_1"): ((0.9, 0.2), (1.0, 0.2), (0.8, 0.4), (1.0, 0.1)),
    ("resnet56", "resnet20"): ((0.8, 0.3), (1.0, 0.2), (0.9, 0.3), (0.7, 0.5)),
    ("resnet110", "resnet20"): ((0.8, 0.3), (0.8, 0.3), (1.2, -0.1), (0.9, 0.2)),
    ("resnet110", "resnet32"): ((0.7, 0.4), (0.9, 0.3), (0.9, 0.2), (0.8, 0.3)),
    ("resnet32x4", "resnet8x4"): ((0.5, 0.5), (0.8, 0.3), (1.2, -0.2), (0.8, 0.3)),
    ("vgg13", "vgg8"): ((0.9, 0.2), (0.7, 0.4), (1.0, 0.2), (0.7, 0.5)),
    ("resnet110", "resnet44"): ((0.8, 0.3), (0.8, 0.3), (1.0, 0.2), (0.8, 0.2)),
}
PAIRS = (*TABLE4, ("ResNet50", "vgg8"))
AB_SOURCE = {("ResNet50", "vgg8"): ("vgg13", "vgg8")}
AB_COLUMN = {"abkd": 0, "abdkd": 1, "ablsd": 2, "abttm": 3}
# AB variants the ABKD paper does not have: (alpha, beta) NOT published; they borrow the Table 4 column of the
# closest method (NKD's normalised non-target term is DKD's NCKD; MLKD and CTKD are KD with more terms).
AB_BORROWED = {"abnkd": "abdkd", "abmlkd": "abkd", "abctkd": "abkd"}

# DKD beta (NCKD weight) per pair from mdistiller configs/cifar100/dkd/*.yaml; pairs without a config
# there get mdistiller's default 8.0.
DKD_NCKD = {
    ("wrn_40_2", "wrn_16_2"): 6.0,
    ("wrn_40_2", "wrn_40_1"): 6.0,
    ("resnet56", "resnet20"): 2.0,
    ("resnet110", "resnet32"): 2.0,
    ("resnet32x4", "resnet8x4"): 8.0,
    ("vgg13", "vgg8"): 6.0,
}
DKD_DEFAULT_NCKD = 8.0

# KD-based LSD (T, kd_weight) from the official logs (sunshangquan/logit-standardization-KD,
# logs/KD/kd,<teacher>,<student>,<T>,<weight>.txt); pairs without a log get the defaults (2, 9).
LSD = {
    ("wrn_40_2", "wrn_16_2"): (2.0, 9.0),
    ("wrn_40_2", "wrn_40_1"): (2.0, 9.0),
    ("resnet56", "resnet20"): (2.0, 9.0),
    ("resnet110", "resnet20"): (4.0, 12.0),
    ("resnet110", "resnet32"): (2.0, 9.0),
    ("resnet32x4", "resnet8x4"): (2.0, 9.0),
    ("vgg13", "vgg8"): (3.0, 9.0),
}
LSD_DEFAULT = (2.0, 9.0)
ABLSD = (2.0, 9.0)  # the official ABLSD script (train_ls.sh) uses T 2, weight 9 for every pair

# TTM (gamma = 1/T, lambda = beta of the TTM paper). The TTM paper's per-pair table (App. A.4, arXiv 2402.11148)
# could not be read from here; these two values are published elsewhere. Other pairs fall back to the README's
# gamma 0.1, lambda 45, and their files say so.
TTM = {
    ("vgg13", "vgg8"): (0.1, 45.0, "TTM README example (zkxufo/TTM)"),
    ("wrn_40_2", "wrn_40_1"): (0.1, 76.0, "official ABTTM script (ghwang-s/abkd train_ttm.sh)"),
}
TTM_DEFAULT = (0.1, 45.0)

# DIST (Huang et al., NeurIPS 2022), the official CIFAR recipe (hunto/image_classification_sota,
# configs/strategies/distill/dist_cifar.yaml + kd_loss.py: kd dist_t4 = beta 1, gamma 1, tau 4; kd_loss_weight 2,
# ori_loss_weight 1; SGD lr 0.05, batch 64, 240 epochs, x0.1 at 150/180/210 = our defaults). One recipe for every
# pair; DIST publishes results with it for these of ours:
DIST_REPORTED = {("wrn_40_2", "wrn_40_1"), ("resnet56", "resnet20"), ("resnet32x4", "resnet8x4")}
DIST = {"temperature": 4.0, "inter_weight": 1.0, "intra_weight": 1.0, "ce": 1.0, "kd": 2.0}

# NKD (Yang et al., ICCV 2023), official yzd-v/cls_KD: its only CIFAR-100 config is ResNet34 -> ResNet18
# (configs/distillers/cifar100/res34_distill_res18_cifar.py: temp 3.0, gamma 3.5, CE 1, NKD loss weight 1);
# ImageNet uses temp 1, gamma 1.5. None of our pairs has a published setting: every file uses the CIFAR one.
NKD = {"temperature": 3.0, "gamma": 3.5, "ce": 1.0, "kd": 1.0}

# MLKD (Jin et al., CVPR 2023), official Jin-Ying/Multi-Level-Logit-Distillation configs/cifar100/ours/*.yaml:
# batch 64, 240 epochs, lr 0.025 (0.01 for MobileNet/ShuffleNet students; none here), x0.1 at 150/180/210,
# wd 5e-4, CE 0.1, KD 0.9, T 4 plus {3, 5, 2, 6}, a weak (crop/flip) and a strong (+ RandAugment(2, 10)) view.
# Pairs with a config there; the others use the same same-family recipe.
MLKD_CONFIGS = {("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"), ("resnet56", "resnet20"), ("vgg13", "vgg8"),
                ("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1")}
MLKD_LR, MLKD_T, MLKD_EXTRA = 0.025, 4.0, (3.0, 5.0, 2.0, 6.0)

# CTKD (Li et al., AAAI 2023), official zhengli97/CTKD scripts/run_cifar_distill.sh: KD with -r 0.1 (CE) -a 0.9
# (KD), lr 0.05, batch 64, global temperature, t_start 1 / t_end 20 (our t_min 1, t_range 20), cosine curriculum
# decay_max 0 -> decay_min -1 over decay_loops 10 epochs (our lambda_min 0, lambda_max 1, curriculum_epochs 10).
CTKD_TEMPERATURE = ("{mode: global, t_min: 1.0, t_range: 20.0, lambda_min: 0.0, lambda_max: 1.0, "
                    "curriculum_epochs: 10}")

# The logit-standardisation paper's combinations (Sun et al., CVPR 2024; sunshangquan/logit-standardization-KD,
# README tables and logs/<KD_TYPE>/<kd_type>,<teacher>,<student>,<base T>,<kd weight>[,<DKD beta>].txt), for the
# seven of our pairs its README reports (resnet110 -> resnet44 and ResNet50 -> vgg8 are not reported: no files).
LS_PAIRS = (("resnet32x4", "resnet8x4"), ("vgg13", "vgg8"), ("wrn_40_2", "wrn_40_1"), ("wrn_40_2", "wrn_16_2"),
            ("resnet56", "resnet20"), ("resnet110", "resnet32"), ("resnet110", "resnet20"))
# DKD+LS (base T, kd weight, DKD beta) from logs/DKD/ (the README's table links only resnet32x4 -> resnet8x4's;
# the others are files in that folder, e.g. resnet110 -> resnet20: 2,15,2.0, best 71.86 vs 71.85 in the table).
# Their train.py multiplies both DKD alpha (1) and beta by the kd weight. resnet32x4 -> resnet8x4's log name has
# no beta: mdistiller's 8 for that pair. resnet56 -> resnet20 has two logs, (3, 18, 2.0) best 72.24 and
# (3, 12, 2.0) best 72.27, against 72.32 in the README; we use 18.
DKD_LS = {
    ("resnet32x4", "resnet8x4"): (2.0, 9.0, 8.0),
    ("vgg13", "vgg8"): (2.0, 15.0, 2.0),
    ("wrn_40_2", "wrn_40_1"): (2.0, 12.0, 2.0),
    ("wrn_40_2", "wrn_16_2"): (2.0, 12.0, 2.0),
    ("resnet56", "resnet20"): (3.0, 18.0, 2.0),
    ("resnet110", "resnet32"): (2.0, 15.0, 2.0),
    ("resnet110", "resnet20"): (2.0, 15.0, 2.0),
}
# CTKD+LS: every reported pair's log is (base T 2, weight 9); the learned temperature replaces the base one. CE 0.1.
CTKD_LS_WEIGHT = 9.0
# MLKD+LS kd weight from logs/MLKD/ (base T 2 everywhere; their code replaces only MLKD's base temperature, the
# extra temperatures stay 3, 5, 2, 6). resnet56 -> resnet20 has no log: weight 9 (NOT published). The published
# MLKD+LS numbers come from 480-epoch runs (their MLKD configs); these files keep the 240-epoch recipe.
MLKD_LS_T = 2.0
MLKD_LS = {
    ("resnet32x4", "resnet8x4"): 9.0,
    ("vgg13", "vgg8"): 6.0,
    ("wrn_40_2", "wrn_40_1"): 9.0,
    ("wrn_40_2", "wrn_16_2"): 9.0,
    ("resnet110", "resnet32"): 9.0,
    ("resnet110", "resnet20"): 9.0,
}
MLKD_LS_DEFAULT = 9.0

HEADER = """\
# GENERATED by scripts/make_cifar100_configs.py -- do not edit; change the tables there and regenerate with
#   python scripts/make_cifar100_configs.py   (python scripts/make_cifar100_configs.py --check compares)
"""

METHOD_DOC = {
    "kd": "# KD (Hinton et al. 2015) as reproduced by CRD/RepDistiller and mdistiller: T 4, CE 0.1, KD 0.9.\n",
    "abkd": (
        "# ABKD: the KD head at T 4 with D_AB; (alpha, beta) from the ABKD paper, Table 4 (App. I.2.3).\n"
        "# kd_weight 2.0 = the paper's lambda 32 / T^2: the official ABKD loss has no T^2, our KD head has one.\n"
    ),
    "dkd": (
        "# DKD (Zhao et al., CVPR 2022) with mdistiller's settings: T 4, TCKD 1, NCKD per pair, CE 1,\n"
        "# warm-up 20 epochs on the whole DKD term.\n"
    ),
    "abdkd": (
        "# ABDKD: DKD with D_AB on the non-target part (TCKD stays KL); (alpha, beta) from the ABKD paper, Table 4.\n"
        "# Everything else as DKD (mdistiller's settings), as the paper states for the AB variants.\n"
    ),
    "lsd": (
        "# LSD (logit standardisation, Sun et al., CVPR 2024) on KD: z-scored logits, CE 0.1, (T, kd_weight) per\n"
        "# pair from the official logs (sunshangquan/logit-standardization-KD logs/KD/).\n"
    ),
    "ablsd": (
        "# ABLSD: LSD with D_AB; (alpha, beta) from the ABKD paper, Table 4. T 2, kd_weight 9, CE 0.1 for every\n"
        "# pair, as the official ABLSD script (train_ls.sh) does.\n"
    ),
    "ttm": (
        "# TTM (Zheng & Yang, ICLR 2024): KL(softmax(gamma * z_t) || softmax(z_s)), no T^2; CE 1,\n"
        "# gamma = 1/T and kd_weight = beta of the TTM paper.\n"
    ),
    "abttm": (
        "# ABTTM: TTM with D_AB; (alpha, beta) from the ABKD paper, Table 4; gamma and lambda as TTM, CE 1.\n"
    ),
    "dist": (
        "# DIST (Huang et al., NeurIPS 2022): Pearson-correlation relations between the networks' class\n"
        "# probabilities, inter-class (per sample) and intra-class (per class over the batch), no KL inside (so no\n"
        "# divergence and no AB variant). Its official CIFAR recipe (dist_cifar.yaml): tau 4, beta 1 (inter),\n"
        "# gamma 1 (intra), KD 2, CE 1, SGD lr 0.05, batch 64, 240 epochs (our defaults); one recipe for all pairs.\n"
    ),
    "nkd": (
        "# NKD (Yang et al., ICCV 2023): a target term plus the normalised non-target distribution's divergence,\n"
        "# weighted by gamma; it uses the labels. NOT published for our pairs: NKD's only CIFAR-100 setting\n"
        "# (ResNet34 -> ResNet18, yzd-v/cls_KD): temperature 3, gamma 3.5, CE 1, NKD 1.\n"
    ),
    "abnkd": (
        "# ABNKD: NKD with D_AB on the normalised non-target part. (alpha, beta) NOT published: the ABDKD column of\n"
        "# the ABKD paper's Table 4 (NKD's normalised non-target term is DKD's NCKD). Everything else as NKD:\n"
        "# temperature 3, gamma 3.5, CE 1, NKD 1 (NKD's CIFAR-100 ResNet34 -> ResNet18 setting, not this pair's).\n"
    ),
    "mlkd": (
        "# MLKD (Jin et al., CVPR 2023), official configs/cifar100/ours: instance-level KD at T 4 and {3, 5, 2, 6}\n"
        "# plus batch- and class-level alignment, on a weak (crop/flip) and a strong (+ RandAugment(2, 10)) view (CE\n"
        "# on both), CE 0.1, KD 0.9, SGD lr 0.025, batch 64, 240 epochs. (The logit-standardisation repo's MLKD runs\n"
        "# train 480 epochs; MLKD's own configs for these pairs train 240, as here.)\n"
    ),
    "abmlkd": (
        "# ABMLKD: MLKD with D_AB in its instance-level KD terms. (alpha, beta) NOT published: the ABKD column of the\n"
        "# ABKD paper's Table 4. Everything else as MLKD: T 4 and {3, 5, 2, 6}, two views, CE 0.1, KD 0.9, lr 0.025.\n"
    ),
    "ctkd": (
        "# CTKD (Li et al., AAAI 2023), official scripts/run_cifar_distill.sh: KD whose temperature is learned\n"
        "# adversarially (gradient reversal) along a cosine curriculum; it replaces the head's fixed temperature.\n"
        "# Global temperature in (1, 21) (t_start 1, t_end 20), reversal 0 -> 1 over 10 epochs, CE 0.1, KD 0.9,\n"
        "# SGD lr 0.05, batch 64, 240 epochs.\n"
    ),
    "abctkd": (
        "# ABCTKD: CTKD with D_AB. (alpha, beta) NOT published for CTKD: the ABKD column of the ABKD paper's\n"
        "# Table 4. Everything else as CTKD: learned global temperature (1 + 20 * sigmoid), curriculum 10 epochs,\n"
        "# CE 0.1, KD 0.9.\n"
    ),
    "dkd_ls": (
        "# DKD + logit standardisation (Sun et al., CVPR 2024; KD + LS is the lsd folder): z-scored logits, DKD at\n"
        "# the base temperature, both DKD weights (alpha 1, beta) multiplied by the kd weight as their train.py\n"
        "# does, CE 1, warm-up 20; (base T, kd weight, beta) per pair from the official logs (logs/DKD/).\n"
    ),
    "ctkd_ls": (
        "# CTKD + logit standardisation (Sun et al., CVPR 2024): z-scored logits, CTKD's learned global temperature\n"
        "# (it replaces the base temperature 2 of the logs), CE 0.1, kd weight 9 (logs/CTKD/ctkd,<pair>,2,9.txt).\n"
    ),
    "mlkd_ls": (
        "# MLKD + logit standardisation (Sun et al., CVPR 2024): z-scored logits, MLKD with base temperature 2\n"
        "# (the extra temperatures 3, 5, 2, 6 unchanged, as their code), CE 0.1, kd weight per pair (logs/MLKD/),\n"
        "# lr 0.025, two views. The published MLKD+LS numbers were trained 480 epochs; these files keep our\n"
        "# 240-epoch recipe.\n"
    ),
}


def method_pairs(method: str) -> tuple[tuple[str, str], ...]:
    """The pairs a method has files for: all of them, or the LS paper's reported pairs for its combinations."""
    return LS_PAIRS if method in LS_METHODS else PAIRS


def run_name(teacher: str, student: str) -> str:
    return f"{teacher}-{student}"


def teacher_yaml(model: str) -> str:
    return (
        HEADER
        + "# Cross-entropy training of one network: the CIFAR-100 teachers and the from-scratch student baselines.\n"
        + "# Run: python run.py fit --config configs/cifar100/base.yaml"
        + f" --config configs/cifar100/teachers/{model}.yaml\n"
        + "model:\n"
        + "  class_path: abkd_vision.lit.ClassifierModule\n"
        + "  init_args:\n"
        + f"    model: {model}\n"
        + "trainer:\n"
        + "  logger:\n"
        + "    init_args:\n"
        + f"      name: teachers/{model}\n"
    )


def divergence_lines(method: str, pair: tuple[str, str], indent: str) -> list[str]:
    if method == "dist":
        return []  # DIST has no divergence
    if not method.startswith("ab"):
        return [f"{indent}divergence: null  # forward KL"]
    source = AB_SOURCE.get(pair, pair)
    column = AB_BORROWED.get(method, method)
    alpha, beta = TABLE4[source][AB_COLUMN[column]]
    note = "" if source == pair else f"  # not in Table 4: the {source[0]} -> {source[1]} values"
    if column != method:
        where = "" if source == pair else f", {source[0]} -> {source[1]}"
        note = f"  # NOT published: Table 4's {column.upper()} column{where}"
    return [
        f"{indent}divergence:{note}",
        f"{indent}  class_path: abkd_vision.losses.AlphaBetaDivergence",
        f"{indent}  init_args: {{alpha: {num(alpha)}, beta: {num(beta)}}}",
    ]


def method_settings(method: str, pair: tuple[str, str]) -> tuple[str, list[str], float, float, int]:
    """(head class, head init_args lines without divergence, ce_weight, kd_weight, kd_warmup_epochs)."""
    base = method.removeprefix("ab")
    if base == "kd":
        kd_weight = 2.0 if method == "abkd" else 0.9
        ce_weight = 1.0 if method == "abkd" else 0.1
        return "KD", ["temperature: 4.0"], ce_weight, kd_weight, 0
    if base == "dkd":
        nckd = DKD_NCKD.get(pair)
        note = "" if nckd is not None else "  # no mdistiller config for this pair: its default beta 8"
        nckd = DKD_DEFAULT_NCKD if nckd is None else nckd
        lines = ["temperature: 4.0", "tckd_weight: 1.0", f"nckd_weight: {num(nckd)}{note}"]
        return "DKD", lines, 1.0, 1.0, 20
    if base == "lsd":
        if method == "ablsd":
            (t, w), note = ABLSD, ""
        else:
            found = LSD.get(pair)
            (t, w) = found if found is not None else LSD_DEFAULT
            note = "" if found is not None else "  # no official LSD log for this pair: defaults T 2, weight 9"
        return "LSD", [f"temperature: {num(t)}{note}"], 0.1, w, 0
    if base == "ttm":
        found = TTM.get(pair)
        if found is not None:
            gamma, lam, source = found
            note = f"  # gamma {num(gamma)}, lambda {num(lam)}: {source}"
        else:
            (gamma, lam), note = TTM_DEFAULT, "  # NOT published/found for this pair: fallback gamma 0.1, lambda 45"
        return "TTM", [f"gamma: {num(gamma)}{note}", "weighted: false"], 1.0, lam, 0
    if method == "dist":
        d = DIST
        lines = [f"temperature: {num(d['temperature'])}", f"inter_weight: {num(d['inter_weight'])}",
                 f"intra_weight: {num(d['intra_weight'])}"]
        return "DIST", lines, d["ce"], d["kd"], 0
    if base == "nkd":
        note = "  # NOT published for this pair: NKD's CIFAR-100 (ResNet34 -> ResNet18) setting"
        lines = [f"temperature: {num(NKD['temperature'])}{note}", f"gamma: {num(NKD['gamma'])}"]
        return "NKD", lines, NKD["ce"], NKD["kd"], 0
    if base == "mlkd":
        return "MLKD", [f"temperature: {num(MLKD_T)}", extra_temperatures_line()], 0.1, 0.9, 0
    if base == "ctkd":
        return "KD", learned_temperature_lines(), 0.1, 0.9, 0
    if method == "dkd_ls":
        t, w, nckd = DKD_LS[pair]
        note = "; the log name has no beta: mdistiller's 8 for this pair" if pair == ("resnet32x4", "resnet8x4") else ""
        lines = ["standardize: true", f"temperature: {num(t)}  # the base temperature",
                 f"tckd_weight: {num(w)}  # DKD alpha 1 x kd weight {num(w)}",
                 f"nckd_weight: {num(nckd * w)}  # DKD beta {num(nckd)} x kd weight {num(w)}{note}"]
        return "DKD", lines, 1.0, 1.0, 20
    if method == "ctkd_ls":
        return "KD", ["standardize: true", *learned_temperature_lines()], 0.1, CTKD_LS_WEIGHT, 0
    if method == "mlkd_ls":
        lines = ["standardize: true", f"temperature: {num(MLKD_LS_T)}  # the base temperature",
                 extra_temperatures_line()]
        return "MLKD", lines, 0.1, MLKD_LS.get(pair, MLKD_LS_DEFAULT), 0
    raise ValueError(f"unknown method {method!r}")


def extra_temperatures_line() -> str:
    return f"extra_temperatures: [{', '.join(num(t) for t in MLKD_EXTRA)}]"


def learned_temperature_lines() -> list[str]:
    """CTKD: no fixed temperature (the learned one replaces it), the released curriculum."""
    return ["learned_temperature:",
            "  class_path: abkd_vision.heads.CurriculumTemperature",
            f"  init_args: {CTKD_TEMPERATURE}"]


def kd_weight_note(method: str, pair: tuple[str, str]) -> str:
    if method == "mlkd_ls" and pair not in MLKD_LS:
        return f"  # NOT published (no MLKD+LS log for this pair): weight {num(MLKD_LS_DEFAULT)}"
    return ""


def model_extra_lines(method: str) -> list[str]:
    """DistillationModule arguments beyond the shared recipe (MLKD's lr)."""
    return [f"    lr: {num(MLKD_LR)}  # MLKD's lr (our default is 0.05)"] if "mlkd" in method else []


def data_lines(method: str) -> list[str]:
    """MLKD trains on two views of each image: the data module adds the strong (RandAugment) one."""
    if "mlkd" not in method:
        return []
    return ["data:", "  init_args:", "    strong_view: true  # MLKD: a weak and a strong (RandAugment(2, 10)) view"]


def pair_notes(method: str, pair: tuple[str, str]) -> list[str]:
    """Per-file comment lines on where this pair's values come from (new methods only)."""
    base = method.removeprefix("ab")
    if method == "dist":
        if pair in DIST_REPORTED:
            return ["# DIST reports a result for this pair with this recipe."]
        return ["# No DIST result is published for this pair: the same (untuned) CIFAR recipe."]
    if method == "dkd_ls":
        t, w, nckd = DKD_LS[pair]
        log = f"logs/DKD/dkd,{pair[0]},{pair[1]},{t:g},{w:g}" + ("" if pair == ("resnet32x4", "resnet8x4") else
                                                                  f",{num(nckd)}") + ".txt"
        notes = [f"# This pair: {log}."]
        if pair == ("resnet56", "resnet20"):
            notes.append("# (Two logs for this pair: weight 18 (best 72.24) and weight 12 (best 72.27); the README "
                         "reports 72.32. We use 18.)")
        return notes
    if base == "mlkd" and pair not in MLKD_CONFIGS:
        return ["# NOT published for this pair (no MLKD config): its same-family recipe (lr 0.025, CE 0.1, KD 0.9)."]
    return []


def distill_yaml(method: str, pair: tuple[str, str]) -> str:
    teacher, student = pair
    name = run_name(teacher, student)
    head, head_lines, ce_weight, kd_weight, warmup = method_settings(method, pair)
    lines = [
        *pair_notes(method, pair),
        f"# Run: python run.py fit --config configs/cifar100/base.yaml --config configs/cifar100/{method}/{name}.yaml",
        "model:",
        "  class_path: abkd_vision.lit.DistillationModule",
        "  init_args:",
        f"    student: {student}",
        f"    teacher: {teacher}",
        f"    teacher_ckpt: {TEACHER_CKPT.format(teacher=teacher)}  # see checkpoints/README.md",
        "    head:",
        f"      class_path: abkd_vision.heads.{head}",
        "      init_args:",
        *(f"        {line}" for line in head_lines),
        *divergence_lines(method, pair, "        "),
        f"    ce_weight: {num(ce_weight)}",
        f"    kd_weight: {num(kd_weight)}{kd_weight_note(method, pair)}",
        f"    kd_warmup_epochs: {warmup}",
        *model_extra_lines(method),
        *data_lines(method),
        "trainer:",
        "  logger:",
        "    init_args:",
        f"      name: {method}/{name}",
    ]
    return HEADER + METHOD_DOC[method] + "\n".join(lines) + "\n"


def expected_files() -> dict[Path, str]:
    """Every generated file (path relative to the repository root) and its content, in a fixed order."""
    files: dict[Path, str] = {}
    models = list(dict.fromkeys(m for pair in PAIRS for m in pair))  # teachers and students, first-seen order
    for model in models:
        files[Path("configs/cifar100/teachers") / f"{model}.yaml"] = teacher_yaml(model)
    for method in METHODS:
        for pair in method_pairs(method):
            files[Path("configs/cifar100") / method / f"{run_name(*pair)}.yaml"] = distill_yaml(method, pair)
    return files


def owned_dirs() -> list[Path]:
    return [Path("configs/cifar100/teachers"), *(Path("configs/cifar100") / m for m in METHODS)]


def main(argv: list[str] | None = None) -> int:
    return configgen.main(expected_files, owned_dirs, "scripts/make_cifar100_configs.py", ROOT,
                          __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
