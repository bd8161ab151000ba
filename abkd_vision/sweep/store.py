"""The on-disk layout of a sweep folder, and reading it back.

::

    <out>/manifest.json                      the runs of the last sweep started into <out>
    <out>/runs/<run_id>/version_0/           the run folder (config.yaml, metrics.csv, checkpoints/, results.json)
    <out>/runs/<run_id>/sweep_run.json       the sweep's record of the run: its grid point, last attempt, exit code
    <out>/logs/<run_id>.log                  the run's stdout + stderr
    <out>/results.csv, tables.md, plot.png   the outputs

A run is **finished** only when ``results.json`` parses and says ``"finished": true`` (and its last attempt did
not exit non-zero). Folders without a record (copied in, written by hand) are read by their run id.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from abkd_vision.io import atomic_write
from abkd_vision.sweep.grid import Run, parse_run_id

__all__ = ["all_runs", "finished_result", "log_path", "read_manifest", "read_record", "read_result", "run_dir",
           "run_status", "write_manifest", "write_record"]

RECORD = "sweep_run.json"


def run_dir(out: Path, run_id: str) -> Path:
    return Path(out) / "runs" / run_id / "version_0"


def log_path(out: Path, run_id: str) -> Path:
    return Path(out) / "logs" / f"{run_id}.log"


def _read_json(path: Path) -> dict | list | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def read_result(folder: Path) -> dict | None:
    """The run's ``results.json`` if it is complete (``"finished": true``), else None."""
    data = _read_json(Path(folder) / "results.json")
    return data if isinstance(data, dict) and data.get("finished") is True else None


def read_record(out: Path, run_id: str) -> dict | None:
    data = _read_json(Path(out) / "runs" / run_id / RECORD)
    return data if isinstance(data, dict) else None


def write_record(out: Path, run_id: str, **fields) -> None:
    """Update the sweep's record of a run (atomically)."""
    record = read_record(out, run_id) or {}
    record.update(fields)
    atomic_write(Path(out) / "runs" / run_id / RECORD, json.dumps(record, indent=1) + "\n")


def finished_result(out: Path, run_id: str) -> dict | None:
    """``results.json`` of a finished run, else None (also when its last attempt exited non-zero)."""
    result = read_result(run_dir(out, run_id))
    if result is None:
        return None
    record = read_record(out, run_id)
    return None if record is not None and record.get("status") == "failed" else result


def run_status(out: Path, run_id: str) -> str:
    """``finished``, ``failed`` (last attempt exited non-zero), ``unfinished`` (started, no complete results:
    interrupted, killed or still running) or ``pending`` (never started)."""
    if finished_result(out, run_id) is not None:
        return "finished"
    record = read_record(out, run_id)
    if record is not None and record.get("status") == "failed":
        return "failed"
    return "unfinished" if (Path(out) / "runs" / run_id).exists() else "pending"


def write_manifest(out: Path, runs: Iterable[Run]) -> None:
    atomic_write(Path(out) / "manifest.json", json.dumps([r.to_dict() for r in runs], indent=1) + "\n")


def read_manifest(out: Path) -> list[dict]:
    data = _read_json(Path(out) / "manifest.json")
    return data if isinstance(data, list) else []


def all_runs(out: Path, planned: Iterable[Run] | None = None) -> list[dict]:
    """Every run of the sweep folder, once: the planned runs (default: the manifest of the last sweep) first, then
    any other run folder under ``<out>/runs`` (from its record, or parsed from its run id)."""
    runs = [r.to_dict() for r in planned] if planned is not None else read_manifest(out)
    by_id = {r["run_id"]: r for r in runs}
    folder = Path(out) / "runs"
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if path.name in by_id or not path.is_dir():
            continue
        record = read_record(out, path.name)
        run = record.get("run") if record else None
        run = run if isinstance(run, dict) and run.get("run_id") == path.name else parse_run_id(path.name)
        if run is not None:
            by_id[path.name] = run
    return list(by_id.values())
