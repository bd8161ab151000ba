"""Results of a sweep, read back from its run folders: one CSV row per run, Markdown tables, a plot.

Two kinds of results, told apart by the keys of ``results.json``:

* image classification (CIFAR-100 and friends): best- and last-epoch top-1 -> a methods x pairs table of
  mean +- std over seeds;
* base-to-new: base / new / HM of the reported epoch -> the layout of the ABKD paper's Table 14: per dataset and
  method, base and new as seed mean +- std and the HM of those means (the paper's convention), then the average
  over datasets reported both ways: the mean of the per-dataset HMs (the paper's "Average" row) and the HM of the
  mean base and mean new (CoOp's convention). They differ (84.17 vs 84.24 on the paper's own ABKD rows).
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path

from abkd_vision.io import atomic_write
from abkd_vision.metrics import harmonic_mean

__all__ = ["average_row", "collect_rows", "mean_std", "read_result", "write_outputs"]

CSV_FIELDS = ("run_id", "method", "setting", "seed", "overrides", "status", "kind", "best_top1", "last_top1",
              "base", "new", "hm", "last_base", "last_new", "last_hm", "best_base_base", "best_base_new",
              "best_base_hm", "run_dir", "log")


def read_result(run_dir: Path) -> dict | None:
    """The run's ``results.json`` if it is complete (``"finished": true``), else None."""
    path = Path(run_dir) / "results.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("finished") is True else None


def _pct(x) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else 100.0 * float(x)


def result_metrics(result: dict) -> dict:
    """CSV metric columns (percent) of one results.json."""
    if "reported" in result:
        rep, last, best = result.get("reported") or {}, result.get("last") or {}, result.get("best_base") or {}
        return {"kind": "base_to_new", "base": _pct(rep.get("base_acc")), "new": _pct(rep.get("new_acc")),
                "hm": _pct(rep.get("hm")), "last_base": _pct(last.get("base_acc")),
                "last_new": _pct(last.get("new_acc")), "last_hm": _pct(last.get("hm")),
                "best_base_base": _pct(best.get("base_acc")), "best_base_new": _pct(best.get("new_acc")),
                "best_base_hm": _pct(best.get("hm"))}
    return {"kind": "classification", "best_top1": _pct(result.get("val_acc1_best")),
            "last_top1": _pct(result.get("val_acc1_last"))}


def collect_rows(runs: Iterable[dict], out: Path, failed: dict[str, str] | None = None) -> list[dict]:
    """One row per planned run (``runs`` are ``Run.to_dict()``s), with status finished / failed / pending."""
    rows = []
    for run in runs:
        run_dir = out / "runs" / run["run_id"] / "version_0"
        result = read_result(run_dir)
        row = {"run_id": run["run_id"], "method": run["method"], "setting": run["setting"], "seed": run["seed"],
               "overrides": " ".join(f"{k}={v}" for k, v in run.get("overrides", [])), "run_dir": str(run_dir),
               "log": str(out / "logs" / f"{run['run_id']}.log")}
        if result is not None:
            row.update(status="finished", **result_metrics(result))
        else:
            row["status"] = "failed" if failed and run["run_id"] in failed else "pending"
        rows.append(row)
    return rows


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def average_row(per_dataset: dict[str, tuple[float, float]], printed_hm: dict[str, float] | None = None) -> dict:
    """The average over datasets of (base, new): ``{"base", "new", "hm_mean_of_hms", "hm_of_means"}``.

    ``hm_mean_of_hms`` averages the per-dataset HMs (the paper's convention; pass ``printed_hm`` to average
    printed values instead of recomputing them), ``hm_of_means`` is the HM of the mean base and mean new (CoOp).
    """
    bases = [b for b, _ in per_dataset.values()]
    news = [n for _, n in per_dataset.values()]
    hms = [printed_hm[d] if printed_hm and d in printed_hm else harmonic_mean(b, n)
           for d, (b, n) in per_dataset.items()]
    base, new = statistics.fmean(bases), statistics.fmean(news)
    return {"base": base, "new": new, "hm_mean_of_hms": statistics.fmean(hms), "hm_of_means": harmonic_mean(base, new)}


def _fmt(values: list[float]) -> str:
    if not values:
        return "–"
    m, s = mean_std(values)
    return f"{m:.2f} ± {s:.2f}" if len(values) > 1 else f"{m:.2f}"


def _group(rows: list[dict], kind: str) -> dict[tuple[str, str, str], list[dict]]:
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in rows:
        if r["status"] == "finished" and r.get("kind") == kind:
            groups.setdefault((r["method"], r["setting"], r["overrides"]), []).append(r)
    return groups


def _label(method: str, overrides: str) -> str:
    return f"{method} [{overrides}]" if overrides else method


def base_to_new_markdown(rows: list[dict]) -> str:
    groups = _group(rows, "base_to_new")
    if not groups:
        return ""
    settings = list(dict.fromkeys(s for _, s, _ in groups))
    labels = list(dict.fromkeys((m, o) for m, _, o in groups))
    out = ["## Base-to-new (percent; seed mean ± std; HM of the seed means)", ""]
    for setting in settings:
        out += [f"### {setting}", "", "| method | seeds | base | new | HM |", "| --- | ---: | ---: | ---: | ---: |"]
        for m, o in labels:
            g = groups.get((m, setting, o))
            if g:
                b, n = [r["base"] for r in g], [r["new"] for r in g]
                hm = harmonic_mean(statistics.fmean(b), statistics.fmean(n))
                out.append(f"| {_label(m, o)} | {len(g)} | {_fmt(b)} | {_fmt(n)} | {hm:.2f} |")
        out.append("")
    out += [f"### Average over the datasets (a method is averaged only where it has every dataset: {len(settings)})",
            "", "| method | base | new | HM: mean of per-dataset HMs (paper) | HM of mean base and new (CoOp) |",
            "| --- | ---: | ---: | ---: | ---: |"]
    for m, o in labels:
        per = {}
        for s in settings:
            g = groups.get((m, s, o))
            if g:
                per[s] = (statistics.fmean(r["base"] for r in g), statistics.fmean(r["new"] for r in g))
        if len(per) == len(settings):
            a = average_row(per)
            out.append(f"| {_label(m, o)} | {a['base']:.2f} | {a['new']:.2f} | {a['hm_mean_of_hms']:.2f} | "
                       f"{a['hm_of_means']:.2f} |")
    return "\n".join(out) + "\n"


def classification_markdown(rows: list[dict]) -> str:
    groups = _group(rows, "classification")
    if not groups:
        return ""
    settings = list(dict.fromkeys(s for _, s, _ in groups))
    labels = list(dict.fromkeys((m, o) for m, _, o in groups))
    out = ["## Classification top-1 (percent; seed mean ± std; best epoch / last epoch)", "",
           "| method | " + " | ".join(settings) + " |", "| --- |" + " ---: |" * len(settings)]
    for m, o in labels:
        cells = []
        for s in settings:
            g = groups.get((m, s, o), [])
            cells.append(f"{_fmt([r['best_top1'] for r in g])} / {_fmt([r['last_top1'] for r in g])}" if g else "–")
        out.append(f"| {_label(m, o)} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def status_markdown(rows: list[dict]) -> str:
    bad = [r for r in rows if r["status"] != "finished"]
    if not bad:
        return ""
    out = ["## Runs not finished", "", "| run | status | log |", "| --- | --- | --- |"]
    out += [f"| {r['run_id']} | {r['status']} | {r['log']} |" for r in bad]
    return "\n".join(out) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(k, _group(rows, k)) for k in ("base_to_new", "classification")]
    panels = [(k, g) for k, g in panels if g]
    fig, axes = plt.subplots(len(panels) or 1, 1, figsize=(10, 3.5 * max(1, len(panels))), squeeze=False)
    for ax, (kind, groups) in zip(axes[:, 0], panels):
        settings = list(dict.fromkeys(s for _, s, _ in groups))
        labels = list(dict.fromkeys((m, o) for m, _, o in groups))
        width = 0.8 / max(1, len(labels))
        key = "hm" if kind == "base_to_new" else "best_top1"
        for i, (m, o) in enumerate(labels):
            means, stds = [], []
            for s in settings:
                values = [r[key] for r in groups.get((m, s, o), [])]
                mu, sd = mean_std(values) if values else (math.nan, 0.0)
                means.append(mu)
                stds.append(sd)
            ax.bar([j + i * width for j in range(len(settings))], means, width, yerr=stds, label=_label(m, o),
                   capsize=2)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(settings))], settings, rotation=20, ha="right")
        ax.set_ylabel("HM (%)" if kind == "base_to_new" else "best top-1 (%)")
        ax.legend(fontsize=8)
    if not panels:
        axes[0, 0].text(0.5, 0.5, "no finished run yet", ha="center")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def write_outputs(rows: list[dict], out: Path) -> dict[str, Path]:
    """``results.csv``, ``tables.md`` and ``plot.png`` in ``out``, each written atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    paths = {"csv": out / "results.csv", "tables": out / "tables.md", "plot": out / "plot.png"}
    atomic_write(paths["csv"], buf.getvalue())
    md = "\n".join(t for t in (base_to_new_markdown(rows), classification_markdown(rows), status_markdown(rows)) if t)
    atomic_write(paths["tables"], md or "No finished run yet.\n")
    plot(rows, paths["plot"])
    return paths
