"""The search's outputs from the study: ``best.json``, ``trials.csv`` and ``landscape.png`` (written atomically).

``best.json`` says where its numbers come from: ``selected_on`` (the held-out split the trials were ranked on, or
"selected on test"), ``numbers.value`` (the search value: held-out unless selected on test) and, after a
confirmation, ``confirmation`` (test numbers of retrained runs, :mod:`abkd_vision.search.confirm`)."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path

import optuna
from optuna.trial import TrialState

from abkd_vision.io import atomic_write, atomic_write_with
from abkd_vision.search.space import SearchSpace

CSV_FIELDS = ("number", "alpha", "beta", "value", "state", "duration_s", "run_dir", "best_epoch",
              "epochs_reported", "last_reported", "worker", "error")


def redact(url: str) -> str:
    """A storage URL without its password."""
    return re.sub(r"(://[^:/@]+:)[^@/]*@", r"\1***@", url)


def trial_rows(study: optuna.Study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        steps = sorted(t.intermediate_values)
        rows.append({
            "number": t.number, "alpha": t.params.get("alpha"), "beta": t.params.get("beta"),
            "value": t.value if t.state == TrialState.COMPLETE else None, "state": t.state.name,
            "duration_s": round(t.duration.total_seconds(), 3) if t.duration is not None else None,
            "run_dir": t.user_attrs.get("run_dir"), "best_epoch": t.user_attrs.get("best_epoch"),
            "epochs_reported": len(steps), "last_reported": t.intermediate_values[steps[-1]] if steps else None,
            "worker": t.user_attrs.get("worker"), "error": t.user_attrs.get("error"),
        })
    return rows


def best_trial(study: optuna.Study):
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    return max(complete, key=lambda t: (t.value, -t.number)) if complete else None


def write_csv(rows: list[dict], path: Path) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in CSV_FIELDS})
    return atomic_write(path, buf.getvalue())


def selection_record(study: optuna.Study) -> dict:
    """Where the study's trials were ranked (``selected_on``, ``held_out``, ``monitor``) and what ``value`` is."""
    sel = study.user_attrs.get("selection") or {}
    where = sel.get("selected_on") or "an unrecorded split (a study from before held-out searches)"
    monitor = sel.get("monitor") or "val/acc1"
    kind = ("held-out" if sel.get("held_out") else "test" if sel.get("held_out") is False else "unrecorded")
    return {"selected_on": where, "held_out": sel.get("held_out"), "monitor": monitor,
            "numbers": {"value": f"search ({kind}): the trial's best-epoch {monitor} on the {where}"}}


def best_record(study: optuna.Study, storage_url: str, rows: list[dict]) -> dict:
    best = best_trial(study)
    counts = {state: sum(r["state"] == state for r in rows) for state in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    selection = selection_record(study)
    record = {"study_name": study.study_name, "storage": redact(storage_url),
              "search_space": study.user_attrs.get("search_space"),
              "objective": f"best {selection['monitor']} ([0, 1]) on the {selection['selected_on']}", **selection,
              "trials": len(rows), **{f"n_{k.lower()}": v for k, v in counts.items()}}
    if best is None:
        return {"alpha": None, "beta": None, "value": None, **record}
    return {"alpha": best.params["alpha"], "beta": best.params["beta"], "value": best.value,
            "trial": best.number, "run_dir": best.user_attrs.get("run_dir"),
            "best_epoch": best.user_attrs.get("best_epoch"), **record}


def plot_landscape(rows: list[dict], space: SearchSpace | None, best: dict, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    done = [r for r in rows if r["state"] == "COMPLETE" and r["alpha"] is not None]
    pruned = [r for r in rows if r["state"] == "PRUNED" and r["alpha"] is not None]
    failed = [r for r in rows if r["state"] == "FAIL" and r["alpha"] is not None]
    a = np.array([r["alpha"] for r in done], dtype=float)
    b = np.array([r["beta"] for r in done], dtype=float)
    v = 100 * np.array([r["value"] for r in done], dtype=float)

    fig, ax = plt.subplots(figsize=(7.2, 5.8))
    cmap = plt.get_cmap("viridis")
    vmin, vmax = (float(v.min()), float(v.max())) if len(v) else (0.0, 1.0)
    if vmax - vmin < 1e-9:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    norm = matplotlib.colors.Normalize(vmin, vmax)
    mappable = None
    if space is not None and space.is_grid:
        # Exact cells: one per grid point, edges half-way between neighbours.
        ga, gb = np.array(space.grid_alpha, float), np.array(space.grid_beta, float)
        z = np.full((len(gb), len(ga)), np.nan)
        for r in done:
            i, j = int(np.argmin(abs(gb - r["beta"]))), int(np.argmin(abs(ga - r["alpha"])))
            z[i, j] = 100 * r["value"]
        mappable = ax.pcolormesh(_edges(ga), _edges(gb), np.ma.masked_invalid(z), cmap=cmap, norm=norm,
                                 shading="flat", edgecolors="white", linewidth=0.5)
        for i in range(len(gb)):
            for j in range(len(ga)):
                if not math.isnan(z[i, j]):
                    ax.annotate(f"{z[i, j]:.2f}%", (ga[j], gb[i]), textcoords="offset points", xytext=(0, -16),
                                ha="center", va="center", fontsize=8, zorder=9,
                                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})
    else:
        if len(v) >= 3 and _spans_2d(a, b):
            # Interpolated surface inside the sampled points' hull (linear on a Delaunay triangulation).
            mappable = ax.tricontourf(a, b, v, levels=14, cmap=cmap, norm=norm, alpha=0.85)
        if len(v):
            sc = ax.scatter(a, b, c=v, cmap=cmap, norm=norm, s=46, edgecolors="black", linewidths=0.6, zorder=4,
                            label="trial (colour = accuracy)")
            mappable = mappable or sc
            if len(v) <= 60:  # each trial's accuracy beside its point
                for x, y, value in zip(a, b, v):
                    ax.annotate(f"{value:.1f}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7,
                                zorder=9, bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none",
                                                "alpha": 0.7})
    if space is not None and not space.is_grid:
        (a0, a1), (b0, b1) = space.alpha_range, space.beta_range
        ax.add_patch(matplotlib.patches.Rectangle((a0, b0), a1 - a0, b1 - b0, fill=False, ls=":", lw=1.2,
                                                  ec="0.3", zorder=3, label="search range"))
    if pruned:
        ax.scatter([r["alpha"] for r in pruned], [r["beta"] for r in pruned], marker="x", s=30, color="0.45",
                   zorder=4, label="pruned trial")
    if failed:
        ax.scatter([r["alpha"] for r in failed], [r["beta"] for r in failed], marker="x", s=30, color="red",
                   zorder=4, label="failed trial")
    if mappable is not None:
        fig.colorbar(mappable, ax=ax, label="best validation top-1 (%)")

    # Axis limits: the search space, widened so that FKL (1, 0) and RKL (0, 1) are always on the map.
    xs = [0.0, 1.0] + (list(a) + [r["alpha"] for r in pruned + failed])
    ys = [0.0, 1.0] + (list(b) + [r["beta"] for r in pruned + failed])
    if space is not None:
        xs += list(space.grid_alpha) if space.is_grid else list(space.alpha_range)
        ys += list(space.grid_beta) if space.is_grid else list(space.beta_range)
    if space is not None and space.is_grid:
        xs += list(_edges(np.array(space.grid_alpha, float)))
        ys += list(_edges(np.array(space.grid_beta, float)))
    pad_x, pad_y = 0.04 * (max(xs) - min(xs)), 0.04 * (max(ys) - min(ys))
    xlim, ylim = (min(xs) - pad_x, max(xs) + pad_x), (min(ys) - pad_y, max(ys) + pad_y)

    line = np.linspace(*xlim, 2)
    ax.plot(line, 1 - line, color="white", lw=3.2, zorder=5)
    ax.plot(line, 1 - line, color="crimson", lw=1.6, ls="--", zorder=5, label=r"$\alpha+\beta=1$ ($\alpha$-divergence)")
    for (x, y), name, offset in (((1.0, 0.0), "FKL (1, 0)", (7, 7)), ((0.0, 1.0), "RKL (0, 1)", (7, 7))):
        ax.scatter([x], [y], marker="o", s=80, facecolors="white", edgecolors="black", linewidths=1.5, zorder=6)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=offset, fontsize=9, zorder=7,
                    bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "0.3", "alpha": 0.85})
    if best.get("alpha") is not None:
        ax.scatter([best["alpha"]], [best["beta"]], marker="*", s=360, color="gold", edgecolors="black",
                   linewidths=1.0, zorder=8,
                   label=f"best ({best['alpha']:.3g}, {best['beta']:.3g}): {100 * best['value']:.2f}%")
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_xlabel(r"$\alpha$")
    ax.set_ylabel(r"$\beta$")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path


def _edges(centres):
    import numpy as np

    if len(centres) == 1:
        return np.array([centres[0] - 0.25, centres[0] + 0.25])
    mids = (centres[1:] + centres[:-1]) / 2
    return np.concatenate([[2 * centres[0] - mids[0]], mids, [2 * centres[-1] - mids[-1]]])


def _spans_2d(a, b) -> bool:
    import numpy as np

    points = np.stack([a, b], axis=1)
    return np.linalg.matrix_rank(points[1:] - points[0], tol=1e-9) == 2


def write_outputs(study: optuna.Study, out: Path, storage_url: str) -> dict:
    """best.json, trials.csv and landscape.png into ``out``; returns their paths and the best record."""
    rows = trial_rows(study)
    best = best_record(study, storage_url, rows)
    confirmation = out / "confirmation.json"
    if confirmation.is_file():
        try:
            best["confirmation"] = json.loads(confirmation.read_text())
            best["numbers"]["confirmation"] = best["confirmation"].get("numbers")
        except ValueError:
            pass
    space_dict = study.user_attrs.get("search_space")
    space = SearchSpace.from_dict(space_dict) if space_dict else None
    paths = {"best": atomic_write(out / "best.json", json.dumps(best, indent=2) + "\n"),
             "csv": write_csv(rows, out / "trials.csv")}
    mode = "exact grid" if space is not None and space.is_grid else "TPE samples, interpolated"
    ranked = {True: "held-out accuracy", False: "selected on test"}.get(best["held_out"], "unrecorded split")
    title = (f"ABKD accuracy over (alpha, beta): study '{study.study_name}' ({ranked})\n{mode}; "
             f"{best['n_complete']} complete, {best['n_pruned']} pruned, {best['n_fail']} failed trials")
    paths["plot"] = plot_landscape(rows, space, best, out / "landscape.png", title)
    return {"paths": paths, "best": best, "rows": rows}
