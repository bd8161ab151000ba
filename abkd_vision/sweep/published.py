"""Published numbers (``published.json``) and a sweep's cells set beside them.

``published.json`` holds the numbers the docs quote (``docs/cifar100.md``, ``docs/base-to-new.md``): the ABKD
paper's Tables 11, 12 and 14, the logit-standardisation repository's table (KD, CTKD, DKD, MLKD and their +LS
runs; 4-run means) and DIST's README, each entry with its source, and each source with its protocol (as text, and
as the ``results.json`` protocol fields a run must match), its number of runs (None where not stated) and its
selection rule as far as it is known.

An entry matches a sweep cell by method folder and setting (config stem); an entry with ``alpha_beta`` matches the
cell whose only overrides are that alpha and beta, any other entry the cell without overrides. For each matched
cell :func:`published_markdown` prints the measured mean with its rule and seeds, the published value, the
difference, whether the published value lies within the measured seed range (lowest to highest seed) and whether
the runs were made at the source's protocol (otherwise which fields differ): only a "yes" there makes the cell an
attempt at reproducing the number.
"""

from __future__ import annotations

import json
import math
import statistics
from functools import lru_cache
from pathlib import Path

from abkd_vision.protocol import is_test

__all__ = ["PUBLISHED", "at_protocol", "load_published", "match_cells", "published_markdown"]

PUBLISHED = Path(__file__).with_name("published.json")


@lru_cache(maxsize=4)
def _load(path: str) -> dict:
    return json.loads(Path(path).read_text())


def load_published(path: str | Path | None = None) -> dict:
    """The published numbers: ``{"sources": {id: {...}}, "entries": [{source, method, setting, metric, value,
    std?, spread?, alpha_beta?, note?}, ...]}``."""
    return _load(str(path or PUBLISHED))


def _alpha_beta(label: str) -> tuple[float, float] | None | bool:
    """``None`` for no overrides, ``(alpha, beta)`` for exactly those two, ``False`` for anything else."""
    if not label:
        return None
    parts = dict(p.split("=", 1) for p in label.split() if "=" in p)
    if set(parts) != {"alpha", "beta"}:
        return False
    try:
        return float(parts["alpha"]), float(parts["beta"])
    except ValueError:
        return False


def at_protocol(rows: list[dict], wanted: dict) -> list[str]:
    """The fields in which the runs' recorded protocols differ from ``wanted`` (``["protocol not recorded"]``
    when a run has none); empty when every run was made at it."""
    out: list[str] = []
    for r in rows:
        p = r.get("protocol")
        if not isinstance(p, dict):
            return ["protocol not recorded"]
        for key, value in wanted.items():
            mine = p.get(key)
            if mine != value and f"{key} " not in " ".join(out):
                out.append(f"{key} {mine} (paper {value})")
    return out


def _measured(group: list[dict], metric: str) -> tuple[list[float], str]:
    """The seed values of a cell for a published metric, and their rule."""
    held = not is_test(group[0].get("val_is"))
    if metric == "top1":
        if held:
            values = [r["test_top1_best_val"] for r in group if r.get("test_top1_best_val") is not None]
            return values, "test, best epoch on held-out"
        return [r["best_top1"] for r in group if r.get("best_top1") is not None], "best epoch, selected on test"
    if metric == "hm":
        values = [2 * r["base"] * r["new"] / (r["base"] + r["new"]) if r["base"] + r["new"] > 0 else 0.0
                  for r in group if r.get("base") is not None and r.get("new") is not None]
    else:
        values = [r[metric] for r in group if r.get(metric) is not None]
    epochs = {str(r.get("report_epoch")) for r in group}
    rule = ("best base epoch, selected on " + ("held-out" if held else "test")) if epochs == {"best_base"} else \
        "last epoch" if epochs == {"last"} else f"reported epoch {'/'.join(sorted(epochs))}"
    return values, rule


def match_cells(rows: list[dict], published: dict | None = None) -> list[dict]:
    """One record per (finished cell, matching published entry): measured values, rule, published entry, source."""
    published = published or load_published()
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["status"] == "finished" and r.get("kind") in ("classification", "base_to_new"):
            cells.setdefault((r["method"], r["setting"], r.get("label", "")), []).append(r)
    out = []
    for entry in published["entries"]:
        want = tuple(entry["alpha_beta"]) if entry.get("alpha_beta") is not None else None
        for (method, setting, label), group in cells.items():
            if method != entry["method"] or setting != entry["setting"]:
                continue
            ab = _alpha_beta(label)
            if ab is False or (want is None) != (ab is None):
                continue
            if want is not None and not all(math.isclose(x, y) for x, y in zip(want, ab)):
                continue
            kind = group[0].get("kind")
            if (entry["metric"] == "top1") != (kind == "classification"):
                continue
            values, rule = _measured(group, entry["metric"])
            if not values:
                continue
            source = published["sources"][entry["source"]]
            out.append({"method": method, "setting": setting, "label": label, "metric": entry["metric"],
                        "values": values, "rule": rule, "entry": entry, "source": source,
                        "protocol_differences": at_protocol(group, source.get("protocol") or {})})
    return out


def _published_text(entry: dict) -> str:
    text = f"{entry['value']:.2f}"
    if entry.get("std") is not None:
        text += f" ± {entry['std']:.2f}"
    if entry.get("spread") is not None:
        text += f" ({entry['spread']:.2f})"
    return text


def published_markdown(rows: list[dict], published: dict | None = None) -> str:
    """The "Beside the published numbers" section of tables.md ("" when no cell matches)."""
    published = published or load_published()
    matches = match_cells(rows, published)
    if not matches:
        return ""
    out = ["## Beside the published numbers (%)", "",
           "Each measured cell beside the published number for its method and setting "
           "(`abkd_vision/sweep/published.json`). 'At the paper's protocol' compares the runs' recorded protocol "
           "with the source's (data, training images, epochs, global batch, views, what val is): only a 'yes' makes "
           "the cell an attempt at reproducing the number; every other row is a different experiment set beside it. "
           "'Within seed range': the published value lies between the lowest and the highest measured seed. "
           "Difference = measured mean − published.", "",
           "| method | setting | metric | measured (rule) | seeds | published | source (runs) | difference | "
           "within seed range | at the paper's protocol |",
           "| --- | --- | --- | --- | ---: | ---: | --- | ---: | --- | --- |"]
    for m in matches:
        values, entry, source = m["values"], m["entry"], m["source"]
        mean = statistics.fmean(values)
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        measured = f"{mean:.2f} ± {sd:.2f}" if len(values) > 1 else f"{mean:.2f}"
        within = ("– (1 seed)" if len(values) < 2 else
                  "yes" if min(values) <= entry["value"] <= max(values) else "no")
        runs = source.get("runs")
        cite = f"{entry['source']} ({runs} runs)" if runs else f"{entry['source']} (runs not stated)"
        diffs = m["protocol_differences"]
        proto = "yes" if not diffs else "no: " + ", ".join(diffs)
        name = f"{m['method']} [{m['label']}]" if m["label"] else m["method"]
        out.append(f"| {name} | {m['setting']} | {m['metric']} | {measured} ({m['rule']}) | {len(values)} | "
                   f"{_published_text(entry)} | {cite} | {mean - entry['value']:+.2f} | {within} | {proto} |")
    cited = sorted({m["entry"]["source"] for m in matches})
    out += ["", "Sources: " + "; ".join(f"{s}: {published['sources'][s]['citation']}" for s in cited) + "."]
    return "\n".join(out) + "\n"
