"""Confirmation of a search on the test split: the best k points and a baseline, retrained with N seeds.

The runs are a sweep (:mod:`abkd_vision.sweep`: resumable, one ``run.py fit`` per run) into ``<out>/confirm/``, on
the **full** training set (``--data.init_args.val_split null``; base-to-new: ``--data.init_args.eval_split test``)
with the search's configs and run arguments, each point at its (alpha, beta):

* ``--baseline fkl``: the same configs at (alpha, beta) = (1, 0), the forward KL at the same temperature and loss
  weights (run id ``search__<setting>__seed<N>__alpha=1.0__beta=0.0``);
* ``--baseline-config YAML``: the given file in place of the last ``--config`` (e.g. the published KD recipe).

The number compared is the test accuracy of the last epoch (top-1; HM for base-to-new): no selection at all.
For each point: mean ± std over the seeds, and the paired difference to the baseline over the seeds both finished
with its 95 % t interval (:func:`abkd_vision.sweep.stats.paired_difference`). The record goes to
``<out>/confirmation.json`` (and into ``best.json``) and a table to ``<out>/confirmation.md``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from abkd_vision.io import atomic_write
from abkd_vision.protocol import is_test
from abkd_vision.search.space import ALPHA_KEY, BETA_KEY, SearchError
from abkd_vision.sweep.grid import Run, dedupe
from abkd_vision.sweep.stats import paired_difference

__all__ = ["CONFIRMATION_FILE", "confirmation_extra", "confirmation_runs", "run_confirmation", "summarize",
           "test_value", "top_points"]

CONFIRMATION_FILE = "confirmation.json"
NUMBERS = ("test: the last epoch's accuracy on the test split (top-1; HM for base-to-new) of runs retrained on the "
           "full training set, no selection; mean ± std over seeds, and the paired difference to the baseline")


def top_points(study, k: int) -> list[dict]:
    """The ``k`` best distinct (alpha, beta) of the complete trials, best first."""
    from optuna.trial import TrialState

    trials = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
                    key=lambda t: (-t.value, t.number))
    out, seen = [], set()
    for t in trials:
        point = (float(t.params["alpha"]), float(t.params["beta"]))
        if point in seen:
            continue
        seen.add(point)
        out.append({"alpha": point[0], "beta": point[1], "trial": t.number, "search_value": t.value})
        if len(out) == k:
            break
    return out


def _point_run(configs: tuple[str, ...], seed: int, alpha: float, beta: float) -> Run:
    return Run("search", Path(configs[-1]).stem, int(seed), configs, ((ALPHA_KEY, repr(float(alpha))),
                                                                       (BETA_KEY, repr(float(beta)))))


def confirmation_runs(points: list[dict], seeds: list[int], configs: list[str], baseline: str | None,
                      baseline_config: str | None) -> tuple[list[Run], dict]:
    """The sweep's runs and ``{"points": [[run per seed]...], "baseline": [run per seed], "baseline_name"}``."""
    configs_t = tuple(str(Path(c).resolve()) for c in configs)
    if baseline_config is not None:
        base_configs = (*configs_t[:-1], str(Path(baseline_config).resolve()))
        base_runs = [Run("baseline", Path(baseline_config).stem, int(s), base_configs, ()) for s in seeds]
        name = f"{Path(baseline_config).name} in place of {Path(configs_t[-1]).name}"
    elif baseline == "fkl":
        base_runs = [_point_run(configs_t, s, 1.0, 0.0) for s in seeds]
        name = "forward KL: the search's configs at alpha 1, beta 0 (same temperature and loss weights)"
    else:
        raise SearchError("confirmation compares the best points with a baseline: give --baseline fkl (the search's "
                          "configs at alpha 1, beta 0: the forward KL at the same temperature and weights) or "
                          "--baseline-config <YAML> (a file in place of the last --config, e.g. "
                          "configs/cifar100/kd/resnet32x4-resnet8x4.yaml)")
    point_runs = [[_point_run(configs_t, s, p["alpha"], p["beta"]) for s in seeds] for p in points]
    runs = dedupe([r for group in point_runs for r in group] + base_runs)  # (1, 0) among the points: run once
    return runs, {"points": point_runs, "baseline": base_runs, "baseline_name": name}


def confirmation_extra(info: dict, extra: list[str]) -> list[str]:
    """The search's run arguments, on the full training set and the test split."""
    out = list(extra)
    if info.get("has_val_split"):
        out += ["--data.init_args.val_split", "null"]
    elif info.get("eval_split") is not None:
        out += ["--data.init_args.eval_split", "test"]
    return out


def test_value(row: dict) -> tuple[float | None, str]:
    """The confirmation number of a sweep row (percent) and its rule: the last epoch on the test split."""
    if row.get("kind") == "base_to_new":
        if row.get("test_hm") is not None:
            return row["test_hm"], "HM on test, last epoch"
        return (row.get("last_hm"), "HM on test, last epoch") if is_test(row.get("val_is")) else (None, "")
    if row.get("test_top1_last") is not None:
        return row["test_top1_last"], "top-1 on test, last epoch"
    return (row.get("last_top1"), "top-1 on test, last epoch") if is_test(row.get("val_is")) else (None, "")


def summarize(rows: list[dict], points: list[dict], plan: dict, seeds: list[int]) -> dict:
    """The confirmation record from the sweep's rows (:func:`abkd_vision.sweep.tables.collect_rows`)."""
    by_id = {r["run_id"]: r for r in rows}

    def values(runs: list[Run]) -> dict[int, float]:
        out = {}
        for run in runs:
            row = by_id.get(run.run_id) or {}
            v = test_value(row)[0] if row.get("status") == "finished" else None
            if v is not None and math.isfinite(v):
                out[run.seed] = v
        return out

    base = values(plan["baseline"])
    rule = next((test_value(by_id[r.run_id])[1] for r in plan["baseline"] if r.run_id in by_id
                 and test_value(by_id[r.run_id])[0] is not None), "top-1 on test, last epoch")
    record = {"numbers": NUMBERS, "rule": rule, "seeds": list(seeds),
              "baseline": {"name": plan["baseline_name"], "values": base, "runs": [r.run_id for r in plan["baseline"]],
                           **_mean_std(base)},
              "points": []}
    for point, runs in zip(points, plan["points"]):
        mine = values(runs)
        record["points"].append({**point, "values": mine, "runs": [r.run_id for r in runs], **_mean_std(mine),
                                 "paired": paired_difference(mine, base)})
    record["missing"] = [r.run_id for group in [*plan["points"], plan["baseline"]] for r in group
                         if (by_id.get(r.run_id) or {}).get("status") != "finished"]
    return record


def _mean_std(values: dict[int, float]) -> dict:
    from abkd_vision.sweep.tables import mean_std

    m, s = mean_std(list(values.values()))
    return {"n": len(values), "mean": None if math.isnan(m) else m, "std": None if math.isnan(s) else s}


def _fmt(m, s, n) -> str:
    if m is None:
        return "–"
    return f"{m:.2f} ± {s:.2f}" if n > 1 else f"{m:.2f}"


def lines(record: dict) -> list[str]:
    """Console lines of a confirmation record."""
    base = record["baseline"]
    out = [f"confirmation on test ({record['rule']}, seeds {' '.join(map(str, record['seeds']))}); baseline "
           f"{_fmt(base['mean'], base['std'], base['n'])} ({base['name']})"]
    for p in record["points"]:
        d = p["paired"]
        ci = (f"95% CI {d['ci95'][0]:+.2f} to {d['ci95'][1]:+.2f}" if d["ci95"] is not None
              else "no interval with fewer than 2 paired seeds")
        diff = f"{d['diff_mean']:+.2f}" if d["n"] else "–"
        out.append(f"  alpha {p['alpha']:.4f}  beta {p['beta']:.4f}  (search {100 * p['search_value']:.2f}%): "
                   f"{_fmt(p['mean'], p['std'], p['n'])}; paired difference {diff} over {d['n']} seeds ({ci})")
    if record.get("missing"):
        out.append(f"  not finished: {', '.join(record['missing'])}")
    return out


def markdown(record: dict, selection: dict | None) -> str:
    base = record["baseline"]
    out = ["# Confirmation on the test split", "",
           f"Search: ranked on {(selection or {}).get('selected_on', 'an unrecorded split')} (search values are "
           "held-out numbers when that split is held out, never test numbers).",
           f"Confirmation: {record['numbers']}. Rule: {record['rule']}. Seeds: "
           f"{', '.join(map(str, record['seeds']))}.", "",
           "| run | alpha | beta | search value (%) | test (%) | paired difference to the baseline | 95 % CI | "
           "seeds |", "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
           f"| baseline: {base['name']} | | | | {_fmt(base['mean'], base['std'], base['n'])} | | | {base['n']} |"]
    for p in record["points"]:
        d = p["paired"]
        ci = f"[{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]" if d["ci95"] is not None else "–"
        diff = f"{d['diff_mean']:+.2f} ± {d['diff_std']:.2f}" if d["n"] else "–"
        out.append(f"| trial {p['trial']} | {p['alpha']:.4g} | {p['beta']:.4g} | {100 * p['search_value']:.2f} | "
                   f"{_fmt(p['mean'], p['std'], p['n'])} | {diff} | {ci} | {d['n']} |")
    return "\n".join(out) + "\n"


def run_confirmation(study, out: Path, configs: list[str], extra: list[str], info: dict, selection: dict | None,
                     k: int, seeds: list[int], baseline: str | None, baseline_config: str | None,
                     workers: int | None = None, run_script: Path | None = None, echo=print) -> dict:
    """Run the confirmation sweep and write ``confirmation.json`` / ``confirmation.md`` into ``out``."""
    from abkd_vision.sweep.runner import SweepOptions, run_sweep

    points = top_points(study, k)
    if not points:
        raise SearchError("no completed trial to confirm")
    runs, plan = confirmation_runs(points, seeds, configs, baseline, baseline_config)
    opts = SweepOptions(out=Path(out) / "confirm", extra=confirmation_extra(info, extra), workers=workers,
                        cwd=Path(os.getcwd()))
    if run_script is not None:
        opts.run_script = Path(run_script).resolve()
    echo(f"confirmation: {len(points)} point(s) and the baseline x {len(seeds)} seed(s) on the full training set, "
         f"into {opts.out}")
    result = run_sweep(runs, opts, echo=echo)
    record = summarize(result.rows, points, plan, seeds)
    record["sweep"] = str(opts.out)
    record["exit_code"] = result.exit_code
    atomic_write(Path(out) / CONFIRMATION_FILE, json.dumps(record, indent=2) + "\n")
    atomic_write(Path(out) / "confirmation.md", markdown(record, selection))
    for line in lines(record):
        echo(line)
    return record
