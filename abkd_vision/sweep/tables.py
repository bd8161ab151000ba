"""Results of a sweep, read back from its run folders: one CSV row per run, Markdown tables, a plot.

Two kinds of results, told apart by the keys of ``results.json``:

* image classification (CIFAR-100, ImageFolder): best- and last-epoch top-1 -> methods x pairs tables of
  mean ± std over seeds;
* base-to-new: base / new / HM of the reported epoch -> the layout of the ABKD paper's Table 14: per dataset,
  methods x (base, new, HM), base and new as seed mean ± std and HM of the seed means (the paper's convention);
  then the average over the datasets, reported both ways: the mean of the per-dataset HMs (the paper's "Average
  over 11 datasets") and the HM of the mean base and mean new (CoOp's convention). On the paper's own ABKD rows
  they give 84.17 and 84.24.

Every table says the rule behind its numbers (from each run's ``results.json["protocol"]``, see
:mod:`abkd_vision.protocol`): "best epoch, selected on test" (the papers' convention: optimistic), "last epoch" (no
selection) or, for runs with a held-out val split, the test accuracy of the last epoch and of the best held-out
epoch beside the held-out numbers. Runs of one cell (method, setting, overrides) made under different protocols are
not averaged: :class:`~abkd_vision.sweep.grid.SweepError` names the differing fields. Cells that a published number
exists for are set beside it (:mod:`abkd_vision.sweep.published`).

The arithmetic is in pure functions (:func:`harmonic_mean`, :func:`mean_std`, :func:`dataset_summary`,
:func:`average_row`); everything is in percent.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from abkd_vision.io import atomic_write
from abkd_vision.protocol import is_test, protocol_differences
from abkd_vision.sweep.grid import SweepError
from abkd_vision.sweep.store import finished_result, log_path, read_record, run_dir, run_status

__all__ = ["CSV_FIELDS", "average_row", "collect_rows", "dataset_summary", "format_mean_std", "harmonic_mean",
           "headline", "mean_std", "result_metrics", "write_outputs"]

CSV_FIELDS = ("run_id", "method", "setting", "seed", "overrides", "status", "kind", "best_top1", "last_top1",
              "best_epoch", "teacher_top1", "report_epoch", "base", "new", "hm", "last_base", "last_new", "last_hm",
              "best_base_base", "best_base_new", "best_base_hm", "exit_code", "seconds", "log", "run_dir",
              "val_is", "test_top1_last", "test_top1_best_val", "test_base", "test_new", "test_hm")


# --- pure arithmetic ------------------------------------------------------------------------------------------

def harmonic_mean(base: float, new: float) -> float:
    """``2 B N / (B + N)`` (0 when both are 0)."""
    return 2.0 * base * new / (base + new) if base + new > 0 else 0.0


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value; NaN, NaN for none)."""
    values = [float(v) for v in values]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def format_mean_std(values: Sequence[float], digits: int = 2) -> str:
    """``"75.21 ± 0.30"``; one value alone; ``"–"`` for none."""
    if not values:
        return "–"
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def dataset_summary(bases: Sequence[float], news: Sequence[float]) -> dict:
    """One method on one dataset over seeds: base and new as mean ± std, ``hm`` = HM of the seed means (the paper's
    convention), and ``hm_per_seed`` = mean ± std of the per-seed HMs (for reference)."""
    if len(bases) != len(news) or not bases:
        raise ValueError(f"need as many base as new values, at least one (got {len(bases)} and {len(news)})")
    (b, b_sd), (n, n_sd) = mean_std(bases), mean_std(news)
    per_seed = mean_std([harmonic_mean(x, y) for x, y in zip(bases, news)])
    return {"n": len(bases), "base": b, "base_std": b_sd, "new": n, "new_std": n_sd, "hm": harmonic_mean(b, n),
            "hm_per_seed": per_seed[0], "hm_per_seed_std": per_seed[1]}


def average_row(per_dataset: Mapping[str, tuple[float, float]], printed_hm: Mapping[str, float] | None = None) -> dict:
    """The average over datasets of (base, new): ``{"base", "new", "hm_mean_of_hms", "hm_of_means"}``.

    ``hm_mean_of_hms`` averages the per-dataset HMs (the paper's convention); pass ``printed_hm`` to average
    printed HMs instead of recomputing them from base and new (a printed table may carry an HM that does not
    recompute). ``hm_of_means`` is the HM of the mean base and the mean new (CoOp's convention).
    """
    if not per_dataset:
        raise ValueError("average_row needs at least one dataset")
    printed_hm = printed_hm or {}
    base = statistics.fmean(b for b, _ in per_dataset.values())
    new = statistics.fmean(n for _, n in per_dataset.values())
    hms = [printed_hm[d] if d in printed_hm else harmonic_mean(b, n) for d, (b, n) in per_dataset.items()]
    return {"base": base, "new": new, "hm_mean_of_hms": statistics.fmean(hms), "hm_of_means": harmonic_mean(base, new)}


# --- rows -----------------------------------------------------------------------------------------------------

def _pct(x) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else 100.0 * x


def result_metrics(result: dict) -> dict:
    """CSV metric columns (percent) of one ``results.json``; the kind is told by its keys. ``val_is`` says what
    the val numbers are on (None for runs that predate the protocol record); ``test_*`` are the test numbers of a
    run whose val split was held out."""
    protocol = result.get("protocol") if isinstance(result.get("protocol"), dict) else {}
    val_is = protocol.get("val_is")
    test = result.get("test") if isinstance(result.get("test"), dict) else {}
    if "reported" in result or "last" in result and "best_base" in result:
        rep = result.get("reported") or {}
        last, best = result.get("last") or {}, result.get("best_base") or {}
        return {"kind": "base_to_new", "report_epoch": result.get("report_epoch"), "val_is": val_is,
                "test_base": _pct(test.get("base_acc")), "test_new": _pct(test.get("new_acc")),
                "test_hm": _pct(test.get("hm")),
                "base": _pct(rep.get("base_acc")), "new": _pct(rep.get("new_acc")), "hm": _pct(rep.get("hm")),
                "last_base": _pct(last.get("base_acc")), "last_new": _pct(last.get("new_acc")),
                "last_hm": _pct(last.get("hm")), "best_base_base": _pct(best.get("base_acc")),
                "best_base_new": _pct(best.get("new_acc")), "best_base_hm": _pct(best.get("hm"))}
    return {"kind": "classification", "best_top1": _pct(result.get("val_acc1_best")),
            "last_top1": _pct(result.get("val_acc1_last")), "best_epoch": result.get("best_epoch"),
            "teacher_top1": _pct(result.get("teacher_val_acc1")), "val_is": val_is,
            "test_top1_last": _pct((test.get("last") or {}).get("acc1")),
            "test_top1_best_val": _pct((test.get("best_val") or {}).get("acc1"))}


def headline(result: dict) -> str:
    """The key metric of one run for the console."""
    m = result_metrics(result)
    if m["kind"] == "base_to_new":
        if m["hm"] is None:
            return "no base/new accuracy"
        return f"base {m['base']:.2f}  new {m['new']:.2f}  HM {m['hm']:.2f}"
    best, last = m["best_top1"], m["last_top1"]
    if best is None:
        return "no top-1"
    if not is_test(m.get("val_is")):
        test = m.get("test_top1_last")
        return f"held-out top-1 best {best:.2f}" + ("" if test is None else f"  test last {test:.2f}")
    return f"top-1 best {best:.2f}" + ("" if last is None else f"  last {last:.2f}")


def collect_rows(out: Path, runs: Iterable[dict]) -> list[dict]:
    """One row per run (``runs``: ``Run.to_dict()``s or parsed run ids), with its status and metrics."""
    rows = []
    for run in runs:
        rid = run["run_id"]
        record = read_record(out, rid) or {}
        log = Path(record.get("log") or log_path(out, rid))
        row = {"run_id": rid, "method": run["method"], "setting": run["setting"], "seed": run["seed"],
               "overrides": " ".join(f"{k}={v}" for k, v in run.get("overrides", [])) or run.get("label", ""),
               "label": run.get("label", ""), "status": run_status(out, rid), "exit_code": record.get("exit_code"),
               "seconds": record.get("seconds"), "log": str(log) if log.is_file() else "",
               "run_dir": str(run_dir(out, rid))}
        result = finished_result(out, rid)
        if result is not None:
            row.update(result_metrics(result))
            row["protocol"] = result.get("protocol")
        rows.append(row)
    return rows


# --- tables ---------------------------------------------------------------------------------------------------

def _group(rows: list[dict], kind: str) -> dict[tuple[str, str, str], list[dict]]:
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in rows:
        if r["status"] == "finished" and r.get("kind") == kind:
            groups.setdefault((r["method"], r["setting"], r.get("label", "")), []).append(r)
    return groups


def _name(method: str, label: str) -> str:
    return f"{method} [{label}]" if label else method


def _values(rows: list[dict], key: str) -> list[float]:
    return [r[key] for r in rows if r.get(key) is not None]


def base_to_new_markdown(rows: list[dict]) -> str:
    """The base-to-new tables: on the split the runs validated on and, for runs whose val split was held out
    (``eval_split: val``), a second set on the test split (the last epoch, read after the fit)."""
    groups = _group(rows, "base_to_new")
    val = _base_to_new_tables(groups, "base", "new", test_section=False)
    held = {k: g for k, g in groups.items() if _category(g) == "held"}
    test = _base_to_new_tables(held, "test_base", "test_new", test_section=True) if held else ""
    return val + ("\n" + test if test else "")


def _base_to_new_tables(groups: dict, base_key: str, new_key: str, test_section: bool) -> str:
    groups = {k: [r for r in g if r.get(base_key) is not None and r.get(new_key) is not None]
              for k, g in groups.items()}
    groups = {k: g for k, g in groups.items() if g}
    if not groups:
        return ""
    datasets = list(dict.fromkeys(s for _, s, _ in groups))
    methods = list(dict.fromkeys((m, label) for m, _, label in groups))
    summary = {k: dataset_summary(_values(g, base_key), _values(g, new_key)) for k, g in groups.items()}
    convention = ("Per dataset: base and new as mean ± std over seeds, HM of the seed means (the paper's convention); "
                  "'HM per seed' is the mean ± std of the per-seed HMs.")
    if test_section:
        out = ["## Base-to-new on the test split (%)", "",
               "Runs whose val split was held out (eval_split: val), tested on the test split after the fit with "
               f"the last epoch's prompts (no selection: the test split was not read during training). {convention}",
               ""]
    else:
        epochs = sorted({str(r.get("report_epoch")) for g in groups.values() for r in g})
        splits = sorted({_category(g) for g in groups.values()})
        on = ", ".join({"test": "the test split", "held": "the held-out val split",
                        "unrecorded": "an unrecorded split (the test split unless eval_split: val)"}[c]
                       for c in splits)
        rules = {"best_base": f"best_base = the epoch of best base accuracy on {on}"
                              + (" (selected on test: the reference protocol)" if "held" not in splits else ""),
                 "last": "last = the last epoch (no selection)"}
        out = ["## Base-to-new (%)", "",
               f"Reported epoch: {', '.join(rules.get(e, e) for e in epochs)}; numbers on {on}. {convention}", ""]
    out += [f"### Average over {len(datasets)} datasets" + (", test split" if test_section else ""), "",
            "| method | base | new | HM: mean of per-dataset HMs (paper) | HM of mean base and new (CoOp) |",
            "| --- | ---: | ---: | ---: | ---: |"]
    for m, label in methods:
        per = {d: (summary[(m, d, label)]["base"], summary[(m, d, label)]["new"])
               for d in datasets if (m, d, label) in summary}
        missing = [d for d in datasets if d not in per]
        if missing:
            out.append(f"| {_name(m, label)} | – | – | – (no {', '.join(missing)}) | – |")
            continue
        a = average_row(per)
        out.append(f"| {_name(m, label)} | {a['base']:.2f} | {a['new']:.2f} | {a['hm_mean_of_hms']:.2f} | "
                   f"{a['hm_of_means']:.2f} |")
    out.append("")
    for d in datasets:
        out += [f"### {d}" + (", test split" if test_section else ""), "",
                "| method | seeds | base | new | HM | HM per seed |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for m, label in methods:
            g = groups.get((m, d, label))
            if g:
                s = summary[(m, d, label)]
                out.append(f"| {_name(m, label)} | {s['n']} | {format_mean_std(_values(g, base_key))} | "
                           f"{format_mean_std(_values(g, new_key))} | {s['hm']:.2f} | "
                           f"{format_mean_std([harmonic_mean(r[base_key], r[new_key]) for r in g])} |")
        out.append("")
    return "\n".join(out)


def _category(group: list[dict]) -> str:
    """What a cell's val numbers are on: "test", "held" (held out) or "unrecorded" (no protocol record)."""
    val_is = group[0].get("val_is")
    return "unrecorded" if val_is is None else "test" if is_test(val_is) else "held"


# Per kind of val split, the table sections: (column, title naming the selection rule and the split).
CLASSIFICATION_SECTIONS = {
    "test": (("best_top1", "Best epoch, selected on test (the papers' convention: optimistic)"),
             ("last_top1", "Last epoch (no selection), on test")),
    "held": (("test_top1_last", "Test, last epoch (no selection; val split held out)"),
             ("test_top1_best_val", "Test, best epoch on held-out (selected on held-out images)"),
             ("best_top1", "Held-out, best epoch (selected on held-out)"),
             ("last_top1", "Held-out, last epoch")),
    "unrecorded": (("best_top1", "Best epoch (val split not recorded; for CIFAR the test split: selected on test)"),
                   ("last_top1", "Last epoch (no selection; val split not recorded)")),
}


def classification_markdown(rows: list[dict]) -> str:
    groups = _group(rows, "classification")
    if not groups:
        return ""
    settings = list(dict.fromkeys(s for _, s, _ in groups))
    methods = list(dict.fromkeys((m, label) for m, _, label in groups))
    seeds = sorted({len(g) for g in groups.values()})
    out = ["## Image classification: top-1 (%)", "",
           f"Mean ± std over seeds ({'/'.join(map(str, seeds))} per cell); a cell with fewer seeds than the others "
           "says how many. Each section names its selection rule and the split its numbers are on.", ""]
    for category, sections in CLASSIFICATION_SECTIONS.items():
        mine = {k: g for k, g in groups.items() if _category(g) == category}
        first = True
        for key, title in sections:
            if not any(_values(g, key) for g in mine.values()):
                continue
            out += [f"### {title}", "", "| method | " + " | ".join(settings) + " |",
                    "| --- |" + " ---: |" * len(settings)]
            if first and any(_values(g, "teacher_top1") for g in mine.values()):
                cells = []
                for s in settings:
                    t = [v for (_, s2, _), g in mine.items() if s2 == s for v in _values(g, "teacher_top1")]
                    cells.append(f"{statistics.fmean(t):.2f}" if t else "–")
                where = "on test" if category != "held" else "on held-out"
                out.append(f"| teacher (measured at distillation start, {where}) | " + " | ".join(cells) + " |"
                           if category != "unrecorded" else
                           "| teacher (measured at distillation start) | " + " | ".join(cells) + " |")
            first = False
            for m, label in methods:
                if not any((m, s, label) in mine for s in settings):
                    continue
                cells = []
                for s in settings:
                    values = _values(mine.get((m, s, label), []), key)
                    n = f" (n={len(values)})" if values and len(values) < max(seeds) else ""
                    cells.append(format_mean_std(values) + n)
                out.append(f"| {_name(m, label)} | " + " | ".join(cells) + " |")
            out.append("")
    return "\n".join(out)


def protocol_errors(rows: list[dict]) -> list[str]:
    """One message per cell (kind, method, setting, overrides) whose finished runs differ in protocol."""
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["status"] == "finished":
            cells.setdefault((r.get("kind"), r["method"], r["setting"], r.get("label", "")), []).append(r)
    errors = []
    for (_, m, s, label), g in cells.items():
        diffs = protocol_differences([(r["run_id"], r.get("protocol")) for r in g])
        if diffs:
            errors.append(f"{_name(m, label)} on {s} ({len(g)} runs) differ in " + "; ".join(diffs))
    return errors


def status_markdown(rows: list[dict]) -> str:
    bad = [r for r in rows if r["status"] != "finished"]
    if not bad:
        return ""
    out = ["## Runs not finished", "", "| run | status | exit code | log |", "| --- | --- | ---: | --- |"]
    out += [f"| {r['run_id']} | {r['status']} | {'' if r['exit_code'] is None else r['exit_code']} | {r['log']} |"
            for r in bad]
    return "\n".join(out) + "\n"


def summary_line(rows: list[dict]) -> str:
    counts = {s: sum(r["status"] == s for r in rows) for s in ("finished", "failed", "unfinished", "pending")}
    return f"{len(rows)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)


# --- plot and files -------------------------------------------------------------------------------------------

def plot(rows: list[dict], path: Path) -> None:
    """Bars per setting x method (seed mean, std error bars): HM for base-to-new, best top-1 for classification."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(k, _group(rows, k)) for k in ("base_to_new", "classification")]
    panels = [(k, g) for k, g in panels if g]
    fig, axes = plt.subplots(len(panels) or 1, 1, figsize=(10, 3.8 * max(1, len(panels))), squeeze=False)
    for ax, (kind, groups) in zip(axes[:, 0], panels):
        settings = list(dict.fromkeys(s for _, s, _ in groups))
        methods = list(dict.fromkeys((m, label) for m, _, label in groups))
        width = 0.8 / len(methods)
        key = "hm" if kind == "base_to_new" else "best_top1"
        lows = []
        for i, (m, label) in enumerate(methods):
            stats = [mean_std(_values(groups.get((m, s, label), []), key)) for s in settings]
            lows += [mu - sd for mu, sd in stats if not math.isnan(mu)]
            ax.bar([j + i * width for j in range(len(settings))], [mu for mu, _ in stats], width,
                   yerr=[0.0 if math.isnan(sd) else sd for _, sd in stats], label=_name(m, label), capsize=2)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(settings))], settings, rotation=20, ha="right")
        if lows:
            ax.set_ylim(max(0.0, min(lows) - 5), None)
        ax.set_ylabel("HM (%)" if kind == "base_to_new" else "best top-1 (%)")
        ax.set_title("base-to-new: HM, mean ± std over seeds" if kind == "base_to_new"
                     else "classification: best-epoch top-1, mean ± std over seeds")
        ax.legend(fontsize=8)
    if not panels:
        axes[0, 0].text(0.5, 0.5, "no finished run yet", ha="center")
        axes[0, 0].set_axis_off()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def write_outputs(rows: list[dict], out: Path) -> dict[str, Path]:
    """``results.csv``, ``tables.md`` and ``plot.png`` in ``out``, each written atomically."""
    out = Path(out)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    paths = {"csv": out / "results.csv", "tables": out / "tables.md", "plot": out / "plot.png"}
    atomic_write(paths["csv"], buf.getvalue())
    errors = protocol_errors(rows)
    if errors:
        listing = "\n".join(f"- {e}" for e in errors)
        atomic_write(paths["tables"], f"# Sweep {out.name}\n\n{summary_line(rows)}.\n\n## Not averaged: runs of one "
                                      f"cell made under different protocols\n\n{listing}\n")
        raise SweepError("runs made under different protocols are not averaged together: " + " | ".join(errors)
                         + f"; every run is listed in {paths['csv']}: run the cell again under one protocol, or give "
                         "the differing runs their own setting or override")
    from abkd_vision.sweep.published import published_markdown

    parts = [base_to_new_markdown(rows), classification_markdown(rows), published_markdown(rows),
             status_markdown(rows)]
    md = f"# Sweep {out.name}\n\n{summary_line(rows)}.\n\n" + "\n".join(p for p in parts if p)
    atomic_write(paths["tables"], md.rstrip("\n") + "\n")
    plot(rows, paths["plot"])
    return paths
