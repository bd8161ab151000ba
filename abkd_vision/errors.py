"""One clear message for a bad input, printed last: what ``run.py`` shows instead of a library's dump.

The CLI's parser (jsonargparse) reports a bad value as a nested tree of every type it tried; our own checks raise
ValueError/FileNotFoundError/CheckpointError with the bad value and the fix, but under a traceback. ``run.py``
catches both and prints one message: the key path and the leaf error (with the valid choices for class paths),
or our exception's text. ``ABKD_DEBUG=1`` shows the full report and traceback instead.
"""

from __future__ import annotations

import re

__all__ = ["CLASS_CHOICES", "PREEMPTED_EXIT_CODE", "looks_like_parser_report", "summarize_parser_error"]

# Exit code of a run stopped by a signal after saving last.ckpt (sysexits' EX_TEMPFAIL: "try again later"); a sweep
# or an sbatch script continues such a run with --resume auto.
PREEMPTED_EXIT_CODE = 75


def looks_like_parser_report(text: str) -> bool:
    """True for jsonargparse's nested reports (errors raised while it instantiated the classes included)."""
    return "Given value" in text or "Parser key" in text or "Does not validate" in text

# What a user may put at a class_path, by the key it sits under (short names work once the package is imported).
CLASS_CHOICES = {
    "head": "abkd_vision.heads.KD, DKD, LSD, TTM, DIST, NKD, MLKD",
    "learned_temperature": "abkd_vision.heads.CurriculumTemperature (CTKD; or null for the head's fixed temperature)",
    "divergence": ("abkd_vision.losses.AlphaBetaDivergence, ForwardKL, ReverseKL, AlphaDivergence, BetaDivergence, "
                   "Hellinger, SquaredEuclidean, WeightedKL, JensenShannon"),
    "model": ("abkd_vision.lit.ClassifierModule, DistillationModule, PromptTuningModule, "
              "PromptDistillationModule"),
    "data": "abkd_vision.data.CIFAR100DataModule, ImageFolderDataModule, BaseToNewDataModule",
}

_BOILERPLATE = (
    "Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value type:",
    "Given value:", "Expected a <class 'NoneType'>", "- Expected a <class 'NoneType'>",
)
_KEY = re.compile(r'Parser key "([^"]+)":')
_CLASS = re.compile(r"Problem with given class_path '([^']+)':")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def summarize_parser_error(text: str) -> str:
    """The leaf errors of a jsonargparse report, each with the full dotted key (``a.init_args.b``)."""
    stack: list[tuple[int, str]] = []  # (indent, key segment)
    found: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        indent = _indent(raw)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if (m := _KEY.search(line)) and line.endswith(":"):
            stack.append((indent, m.group(1)))
            continue
        if _CLASS.search(line):
            stack.append((indent, "init_args"))
            continue
        item = line.removeprefix("- ").strip()
        if not item or any(item.startswith(b.removeprefix("- ")) for b in _BOILERPLATE):
            continue
        if line.startswith("error:") or line.startswith("usage:") or line.startswith("tip:"):
            item = line.split(":", 1)[1].strip()
            if not item or item.startswith("Parser key"):
                continue
        key = ".".join(seg for _, seg in stack)
        if key.endswith(".init_args") and "has no attribute" in item:
            key = key[: -len(".init_args")]
        leaf = key.rsplit(".", 1)[-1] if key else ""
        hint = ""
        if leaf in CLASS_CHOICES and any(w in item for w in ("class_path", "Import", "not a subclass", "does not",
                                                              "not accessible", "has no attribute")):
            hint = f"{'' if item.endswith('.') else '.'} Choose one of: {CLASS_CHOICES[leaf]}."
        message = f"{key}: {item}" if key else item
        if not any(f.startswith(message) for f in found):
            found.append(message + (hint if not any(hint and hint in f for f in found) else ""))
    if not found:
        return text.strip().splitlines()[-1] if text.strip() else "invalid arguments"
    return "\n".join(found)
