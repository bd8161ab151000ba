"""Fault injection on the real run.py and sweep processes: signals, kills, a full disk, bad checkpoints, resumes
with changed keys, runs that would train nothing, file modes. Each interrupted run is compared with an
uninterrupted run of the same config and seed (CPU, deterministic: bit-identical weights). The run is a
distillation (AB head, KD warm-up over 2 epochs, an lr step at epoch 2), so the resumed state includes the
optimiser, the schedule, the warm-up position and the best-epoch tracking."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_image_folder

from abkd_vision.models import create_model

REPO = Path(__file__).resolve().parents[1]
STEPS = 6  # per epoch: 24 images, batch 4
EPOCHS = 3


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("faults")
    tiny_image_folder(root / "data", 24, 6)
    torch.manual_seed(0)
    torch.save(create_model("resnet8", num_classes=3).state_dict(), root / "teacher.pth")
    (root / "slow_callback.py").write_text(
        "import time\nfrom lightning.pytorch import Callback\n\n"
        "class SlowDown(Callback):\n"
        "    def __init__(self, seconds: float = 0.15):\n        self.seconds = seconds\n\n"
        "    def on_train_batch_end(self, *args, **kwargs):\n        time.sleep(self.seconds)\n"
    )
    base = {
        "seed_everything": 3,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": EPOCHS, "deterministic": True, "log_every_n_steps": 1,
            "enable_progress_bar": False, "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(root / "runs"), "name": "unnamed"}},
            "callbacks": [{"class_path": "abkd_vision.durable.ResumeCheckpoint",
                           "init_args": {"every_n_train_steps": 2}}],
        },
        "model": {"class_path": "abkd_vision.lit.DistillationModule", "init_args": {
            "student": "resnet8", "teacher": "resnet8", "teacher_ckpt": str(root / "teacher.pth"), "kd_weight": 2.0,
            "kd_warmup_epochs": 2, "lr": 0.05, "lr_milestones": [2],
            "head": {"class_path": "abkd_vision.heads.KD", "init_args": {"temperature": 4.0, "divergence": {
                "class_path": "abkd_vision.losses.AlphaBetaDivergence", "init_args": {"alpha": 0.8, "beta": 0.3}}}}}},
        "data": {"class_path": "abkd_vision.data.ImageFolderDataModule",
                 "init_args": {"root": str(root / "data"), "image_size": 16, "batch_size": 4, "num_workers": 0}},
    }
    (root / "base.yaml").write_text(json.dumps(base))
    world = {"root": root, "cfg": root / "base.yaml"}
    full = _run(world, "full")
    assert full.returncode == 0, full.stderr[-3000:]
    return world


def _env(world: dict) -> dict:
    return {**os.environ, "PYTHONPATH": f"{world['root']}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def _args(world: dict, name: str, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "run.py"), "fit", "--config", str(world["cfg"]),
            "--trainer.logger.init_args.name", name, *extra]


def _umask_022():
    os.umask(0o022)


def _run(world: dict, name: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_args(world, name, *extra), capture_output=True, text=True, cwd=REPO, env=_env(world),
                          timeout=300, preexec_fn=_umask_022)


def _folder(world: dict, name: str, version: int = 0) -> Path:
    return world["root"] / "runs" / name / f"version_{version}"


def _step(path: Path) -> int | None:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])
    except Exception:  # noqa: BLE001 -- not written yet
        return None


def _start_and_signal(world: dict, name: str, at_step: int, sig: int) -> tuple[int, int]:
    """Start a slowed-down run with --resume auto, send ``sig`` once last.ckpt has reached ``at_step``; returns the
    exit code and the step of last.ckpt afterwards."""
    proc = subprocess.Popen(_args(world, name, "--resume", "auto", "--trainer.callbacks+=slow_callback.SlowDown"),
                            cwd=REPO, env=_env(world), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_umask_022)
    last = _folder(world, name) / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        step = _step(last) if last.is_file() else None
        if step is not None and step >= at_step:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before the signal: {proc.stderr.read()[-2000:]}"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    world.setdefault("stderr", []).append(err)
    return proc.returncode, _step(last)


def _weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def test_sigterm_sigint_sigkill_then_resume_is_bit_identical(world):
    name = "stopped"
    code, step = _start_and_signal(world, name, 2, signal.SIGTERM)  # mid-epoch 0
    assert code == 75, world["stderr"][-1][-2000:]
    assert "stopped by SIGTERM" in world["stderr"][-1].strip().splitlines()[-1]
    result = json.loads((_folder(world, name) / "results.json").read_text())
    assert result["finished"] is False and result["stopped_by"] == "SIGTERM"
    assert result["steps_done"] == step and 2 <= step < STEPS and result["steps_planned"] == EPOCHS * STEPS

    code, step = _start_and_signal(world, name, STEPS + 2, signal.SIGINT)  # mid-epoch 1, Ctrl-C
    assert code == 75 and STEPS + 2 <= step < 2 * STEPS, world["stderr"][-1][-2000:]
    code, step = _start_and_signal(world, name, 2 * STEPS + 2, signal.SIGKILL)  # mid-epoch 2, no chance to save
    assert code == -signal.SIGKILL and 2 * STEPS + 2 <= step < EPOCHS * STEPS  # the periodic last.ckpt loads
    assert not (_folder(world, name, 1)).exists()  # every restart continued version_0

    done = _run(world, name, "--resume", "auto")
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = _weights(_folder(world, "full") / "checkpoints" / "last.ckpt"), _weights(
        _folder(world, name) / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((_folder(world, n) / "results.json").read_text()) for n in ("full", name))
    assert ra == rb and rb["finished"] is True and rb["steps_done"] == EPOCHS * STEPS
    # one metrics.csv: every step's row once, validation rows equal (the epoch means of training metrics in an
    # interrupted epoch cover its steps after the resume; Lightning does not checkpoint them)
    rows = {n: list(csv.DictReader((_folder(world, n) / "metrics.csv").open())) for n in ("full", name)}
    assert [(r["epoch"], r["step"]) for r in rows["full"]] == [(r["epoch"], r["step"]) for r in rows[name]]
    assert [r["val/acc1"] for r in rows["full"]] == [r["val/acc1"] for r in rows[name]]
    assert [r["train/kd_step"] for r in rows["full"]] == [r["train/kd_step"] for r in rows[name]]


def test_files_honour_the_umask(world):
    folder = _folder(world, "full")
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert {"results.json", "last.ckpt", "metrics.csv", "config.yaml", "versions.json"} <= {p.name for p in files}
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: "0o644" for p in files}


def test_kill_during_a_checkpoint_write_leaves_the_previous_one(world, tmp_path):
    """SIGKILL while AtomicCheckpointIO is writing (held in its fsync): the old last.ckpt still loads unchanged."""
    last = tmp_path / "last.ckpt"
    shutil.copy(_folder(world, "full") / "checkpoints" / "last.ckpt", last)
    before = last.read_bytes()
    code = ("import os, sys, time, torch\n"
            "from abkd_vision.durable import AtomicCheckpointIO\n"
            "def stall(fd):\n    print('writing', flush=True)\n    time.sleep(60)\n"
            "os.fsync = stall\n"
            f"AtomicCheckpointIO().save_checkpoint({{'state_dict': {{'w': torch.zeros(10**6)}}}}, {str(last)!r})\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert last.read_bytes() == before and _step(last) == EPOCHS * STEPS
    assert any(p.name.startswith(".last.ckpt.") for p in tmp_path.iterdir())  # the unfinished temporary file


def test_resume_with_a_changed_key_is_an_error_unless_allowed(world, capsys):
    from abkd_vision.cli import run

    name = "changed"
    shutil.copytree(_folder(world, "full"), _folder(world, name))
    # refused before training (in-process: the same run.py code path, without a second interpreter start)
    assert run(_args(world, name, "--resume", "auto", "--model.init_args.lr", "0.01")[2:]) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()
    assert "resuming" in err and "with a different configuration" in err
    assert "model.init_args.lr: 0.05 in the checkpoint, 0.01 now" in err
    assert "--resume_changes allow" in err and last[-1].startswith("(ABKD_DEBUG=1")
    assert not (_folder(world, name) / "resumes.json").exists()
    allowed = _run(world, name, "--resume", "auto", "--model.init_args.lr", "0.01", "--trainer.max_epochs",
                   str(EPOCHS + 1), "--resume_changes", "allow")
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    history = json.loads((_folder(world, name) / "resumes.json").read_text())
    assert history[-1]["epoch"] == EPOCHS - 1 and history[-1]["global_step"] == EPOCHS * STEPS
    assert history[-1]["changes"]["model.init_args.lr"] == {"checkpoint": 0.05, "now": 0.01}
    ckpt = torch.load(_folder(world, name) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    group = ckpt["optimizer_states"][0]["param_groups"][0]
    assert group["initial_lr"] == 0.01 and group["lr"] == pytest.approx(0.001)  # x0.1 after the milestone
    assert ckpt["global_step"] == (EPOCHS + 1) * STEPS
    assert ckpt["abkd_run"]["config"]["model.init_args.lr"] == 0.01 and ckpt["abkd_run"]["resumes"]
    result = json.loads((_folder(world, name) / "results.json").read_text())
    assert result["finished"] is True and result["epochs_done"] == EPOCHS + 1


def test_bad_checkpoints_and_empty_plans_are_refused(world, tmp_path, capsys):
    from abkd_vision.cli import run

    base = ["fit", "--config", str(world["cfg"]), "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")]
    plain = world["root"] / "teacher.pth"
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes((_folder(world, "full") / "checkpoints" / "last.ckpt").read_bytes()[:5000])
    junk = tmp_path / "notes.ckpt"
    junk.write_text("not a checkpoint\n")
    cases = [
        (["--ckpt_path", str(plain)], "is not a Lightning training checkpoint"),
        (["--ckpt_path", str(cut)], "the file is truncated or corrupt"),
        (["--ckpt_path", str(junk)], "is not a PyTorch checkpoint"),
        (["--ckpt_path", str(tmp_path / "missing.ckpt")], "no such file"),
        (["--trainer.max_epochs", "0"], "trainer.max_epochs 0 trains nothing"),
        (["--data.init_args.batch_size", "64"],
         "batch_size 64 with drop_last leaves 0 batches from 24 training images; use batch_size <= 24 or drop_last"),
        (["--resume", "auto", "--ckpt_path", str(plain)], "give --resume auto or --ckpt_path"),
    ]
    for extra, message in cases:
        assert run(base + extra) == 1, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-2] and err[-1].startswith("(ABKD_DEBUG=1"), (extra, err[-3:])
    assert not list((tmp_path / "runs").rglob("results.json"))  # nothing ran, nothing claims to have


def test_full_disk_names_the_folder_and_keeps_the_previous_checkpoint(world, tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    # room for one resnet8 last.ckpt (~660 kB) and the logs, not for a second one beside it
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1000k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        result = _run(world, "disk", "--trainer.logger.init_args.save_dir", str(mount))
        assert result.returncode == 1
        err = result.stderr.strip().splitlines()
        assert err[-2].startswith("error: no space left on device writing ")
        assert "last.ckpt" in err[-2] and "free" in err[-2] and "needed" in err[-2]
        assert "the previous last.ckpt is intact" in err[-2] and "--resume auto" in err[-2]
        last = mount / "disk" / "version_0" / "checkpoints" / "last.ckpt"
        assert _step(last) == 2  # the first periodic checkpoint, whole
        assert not [p for p in last.parent.iterdir() if p.name.endswith(".tmp")]
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_sweep_killed_mid_run_leaves_no_child_and_continues_the_run(world, tmp_path):
    """SIGKILL of the sweep process: its run stops (saving last.ckpt) instead of running on as an orphan; the
    next sweep continues that run, which ends identical to the uninterrupted one."""
    run_file = tmp_path / "ce" / "tiny.yaml"
    run_file.parent.mkdir()
    run_file.write_text("trainer:\n  logger:\n    init_args: {name: tiny}\n")
    out = tmp_path / "sweep"
    argv = [sys.executable, "-m", "abkd_vision.sweep", "--base", str(world["cfg"]), "--configs", str(run_file),
            "--seeds", "3", "--out", str(out)]
    sweep = subprocess.Popen([*argv, "--extra=--trainer.callbacks+=slow_callback.SlowDown"], cwd=REPO,
                             env=_env(world), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    folder = out / "runs" / "ce__tiny__seed3" / "version_0"
    deadline = time.time() + 120
    while time.time() < deadline and (_step(folder / "checkpoints" / "last.ckpt") or 0) < STEPS + 2:
        time.sleep(0.05)
    children = _processes_mentioning(str(out / "runs"))
    assert children, "the run did not start"
    sweep.send_signal(signal.SIGKILL)
    sweep.wait()
    deadline = time.time() + 60
    while time.time() < deadline and _processes_mentioning(str(out / "runs")):
        time.sleep(0.1)
    assert not _processes_mentioning(str(out / "runs")), "a run outlived its sweep"
    stopped_at = _step(folder / "checkpoints" / "last.ckpt")
    assert STEPS + 2 <= stopped_at < EPOCHS * STEPS

    again = subprocess.run(argv, cwd=REPO, env=_env(world), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "1 to run, 1 of them continue from their last.ckpt" in again.stdout
    log = (out / "logs" / "ce__tiny__seed3.log").read_text()
    assert log.count("$ cd ") == 2 and "continuing from" in log  # both attempts logged
    a, b = _weights(_folder(world, "full") / "checkpoints" / "last.ckpt"), _weights(folder / "checkpoints" /
                                                                                     "last.ckpt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((f / "results.json").read_text()) for f in (_folder(world, "full"), folder))
    assert ra == rb
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 1 and rows[0]["status"] == "finished"
    assert float(rows[0]["best_top1"]) == pytest.approx(100 * ra["val_acc1_best"])


def _processes_mentioning(text: str) -> list[int]:
    """Live (non-zombie) processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z" and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return found


def test_epoch_sampler_shards_like_the_ddp_sampler_and_skips_per_process():
    """Under DDP each process takes its share of epoch e's permutation exactly as torch's DistributedSampler with
    Lightning's seed would, and a mid-epoch restart skips that process's completed batches."""
    from types import SimpleNamespace

    from torch.utils.data import DistributedSampler

    from abkd_vision.data.resumable import EpochSampler

    n, seed, batch = 23, 7, 4
    for world in (1, 2, 3):
        for rank in range(world):
            for epoch in (0, 5):
                progress = SimpleNamespace(current=SimpleNamespace(completed=0))
                trainer = SimpleNamespace(world_size=world, global_rank=rank, current_epoch=epoch, fit_loop=
                                          SimpleNamespace(restarting=False, epoch_loop=SimpleNamespace(
                                              batch_progress=progress)))
                sampler = EpochSampler(n, seed, batch, SimpleNamespace(trainer=trainer))
                reference = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed)
                reference.set_epoch(epoch)
                expected = list(reference)
                got = list(sampler)
                assert [i - epoch * n for i in got] == expected and len(sampler) == len(expected)
                trainer.fit_loop.restarting, progress.current.completed = True, 2
                assert [i - epoch * n for i in sampler] == expected[2 * batch:]
