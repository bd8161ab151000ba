"""Bad-input and fault messages: a corrupt teacher-logit cache (rebuilt, or one clear error), Optuna storage
failures of ``python -m abkd_vision.search`` (one message naming the URL and the database's reason), and negative
or NaN loss weights."""

from __future__ import annotations

import json
import logging
import math
import threading
from pathlib import Path

import optuna
import pytest
import torch
from sqlalchemy import event
from torch import nn

import abkd_vision.search.__main__ as search_cli
from abkd_vision.data.transforms import CropFlipViews
from abkd_vision.heads import DKD
from abkd_vision.lit import DistillationModule, PromptDistillationModule
from abkd_vision.search import objective as objective_module
from abkd_vision.teacher_cache import CacheCorrupt, CacheMismatch, TeacherLogitCache, cache_key, cached_logits

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo"
N, CLASSES = 4, 3


# -- (1) a corrupt teacher-logit cache -------------------------------------------------------------------------------
def _key() -> dict:
    return cache_key(teacher="resnet8", num_classes=CLASSES, teacher_sha256="c" * 64,
                     dataset={"dataset": "unit", "split": "train", "num_images": N}, views=CropFlipViews(),
                     dtype="float16")


@pytest.fixture
def teacher():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, CLASSES)).eval()


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, 4, 4, generator=g), torch.tensor([0, 1, 2, 3, 0, 3]), torch.tensor([0, 5, 161, 7, 9, 0])


def _stale_cache(root: Path) -> Path:
    """A cache with rows that a rebuild must forget (99s where the batch's views are), closed."""
    cache = TeacherLogitCache.open(root, _key())
    _, index, view = _batch()
    cache.write(index, view, torch.full((len(index), CLASSES), 99.0))
    cache.close()
    return cache.directory


def _corrupt(directory: Path, how: str) -> Path:
    header, logits, filled = (directory / n for n in ("header.json", "logits.bin", "filled.bin"))
    if how == "header_empty":
        header.write_text("")
    elif how == "header_truncated":
        header.write_text(header.read_text()[:60])
    elif how == "header_not_json":
        header.write_bytes(b"\xff\xfe\x00garbage")
    elif how == "header_without_key":
        header.write_text(json.dumps([1, 2]))
    elif how == "logits_short":
        logits.write_bytes(logits.read_bytes()[:100])
    elif how == "filled_short":
        filled.write_bytes(b"")
    elif how == "logits_missing":
        logits.unlink()
    return {"logits_short": logits, "filled_short": filled, "logits_missing": logits}.get(how, header)


CORRUPTIONS = ["header_empty", "header_truncated", "header_not_json", "header_without_key", "logits_short",
               "filled_short", "logits_missing"]


@pytest.mark.parametrize("how", CORRUPTIONS)
@pytest.mark.parametrize("given", ["root", "folder"])
def test_corrupt_cache_is_rebuilt_and_then_gives_the_live_teachers_logits(tmp_path, teacher, caplog, how, given):
    directory = _stale_cache(tmp_path)
    bad = _corrupt(directory, how)
    with caplog.at_level(logging.WARNING, logger="abkd_vision.teacher_cache"):
        cache = TeacherLogitCache.open(tmp_path if given == "root" else directory, _key())
    assert cache.directory == directory
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and "\n" not in record.getMessage()
    assert f"the teacher cache file {bad} is corrupt (" in record.getMessage()
    assert f"rebuilt the cache {directory} empty" in record.getMessage()
    assert cache.filled_count() == 0  # the stale rows are gone
    images, index, view = _batch()
    logits, hits = cached_logits(cache, teacher, images, index, view)
    assert hits == 0
    with torch.no_grad():
        live = cache.round(teacher(images))
    torch.testing.assert_close(logits, live, rtol=0, atol=0)
    cache.close()
    caplog.clear()
    again = TeacherLogitCache.open(tmp_path, _key())  # a sound cache now: no warning, the rows are read back
    logits, hits = cached_logits(again, teacher, images, index, view)
    assert hits == len(index) and not caplog.records
    torch.testing.assert_close(logits, live, rtol=0, atol=0)
    again.close()


def test_corrupt_cache_open_elsewhere_is_not_rebuilt(tmp_path, caplog):
    directory = _stale_cache(tmp_path)
    user = TeacherLogitCache.open(tmp_path, _key())  # another handle (as another process would) has it open
    _corrupt(directory, "header_empty")
    with pytest.raises(CacheCorrupt) as err, caplog.at_level(logging.WARNING):
        TeacherLogitCache.open(tmp_path, _key())
    assert str(err.value) == (f"the teacher cache file {directory / 'header.json'} is corrupt (it is empty); it is "
                              "not rebuilt while the cache is open elsewhere (another process or handle): delete "
                              f"the folder to rebuild it: rm -r {directory}")
    assert isinstance(err.value, CacheMismatch)  # so a distillation run falls back to the live teacher, saying why
    assert not caplog.records and user.filled_count() == 6  # untouched
    user.close()
    TeacherLogitCache.open(tmp_path, _key()).close()  # once no handle is open it is rebuilt


def test_corrupt_cache_in_a_folder_not_named_for_the_key_is_not_rebuilt(tmp_path):
    directory = _stale_cache(tmp_path)
    renamed = directory.rename(tmp_path / "my_cache")
    _corrupt(renamed, "header_truncated")
    with pytest.raises(CacheCorrupt, match=r"header\.json is corrupt \(it is not valid JSON: .*\); it is not "
                                           r"rebuilt, as .*my_cache is not the cache folder of this run's key: "
                                           r"delete the folder to rebuild it: rm -r .*my_cache$"):
        TeacherLogitCache.open(renamed, _key())
    # a readable header of this key vouches for the folder: a short array there is rebuilt
    TeacherLogitCache.open(tmp_path / "fresh", _key()).close()
    (folder,) = (tmp_path / "fresh").iterdir()
    folder = folder.rename(tmp_path / "fresh" / "renamed")
    _corrupt(folder, "logits_short")
    assert TeacherLogitCache.open(folder, _key()).filled_count() == 0


def test_corrupt_cache_that_cannot_be_rebuilt(tmp_path):
    directory = _stale_cache(tmp_path)
    (directory / "header.json").unlink()
    (directory / "header.json").mkdir()
    with pytest.raises(CacheCorrupt, match=r"header\.json is corrupt \(it cannot be read: Is a directory\) and "
                                           r"could not be rebuilt \(.*\): delete the folder to rebuild it: rm -r "):
        TeacherLogitCache.open(tmp_path, _key())


def test_concurrent_openers_rebuild_once(tmp_path, caplog):
    directory = _stale_cache(tmp_path)
    _corrupt(directory, "header_not_json")
    caches, errors = [], []

    def opener():
        try:
            caches.append(TeacherLogitCache.open(tmp_path, _key()))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    with caplog.at_level(logging.WARNING, logger="abkd_vision.teacher_cache"):
        threads = [threading.Thread(target=opener) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors and len(caches) == 4
    assert len(caplog.records) == 1 and all(c.filled_count() == 0 for c in caches)
    for c in caches:
        c.close()


# -- (2) Optuna storage failures ---------------------------------------------------------------------------------------
def _search(args: list[str], capsys) -> tuple[int, str]:
    code = search_cli.main(["--threads", "1", "--config", str(DEMO / "base.yaml"), "--n-trials", "2", *args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, err.strip().splitlines()[-1]


def _read_only_from_now(storage) -> None:
    """Every later connection to the SQLite database refuses writes, as a read-only file does."""
    event.listen(storage.engine, "connect", lambda conn, _: conn.execute("PRAGMA query_only = ON"))
    storage.engine.dispose()


def test_storage_that_cannot_be_opened(tmp_path, capsys):
    (tmp_path / "dir.db").mkdir()  # the database "file" is a folder
    url = f"sqlite:///{tmp_path / 'dir.db'}"
    code, last = _search(["--out", str(tmp_path / "s"), "--storage", url], capsys)
    assert code == 2
    assert last == (f"error: cannot open Optuna storage '{url}' (backend: sqlite): sqlite3.OperationalError: "
                    f"unable to open database file; check the URL, or use the default "
                    f"sqlite:///{tmp_path / 's' / 'study.db'}")


def test_read_only_storage_while_creating_the_study(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(search_cli._CHECKED_ENV, "1")  # no run config check: the storage fails first
    optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'ro.db'}")  # the schema exists; the study cannot be added
    url = f"sqlite:///file:{tmp_path / 'ro.db'}?mode=ro&uri=true"
    code, last = _search(["--out", str(tmp_path / "s"), "--storage", url], capsys)
    assert code == 2
    assert last == (f"error: Optuna storage '{url}' (backend: sqlite) failed while creating the study: "
                    "sqlite3.OperationalError: attempt to write a readonly database; no trial ran; the search needs "
                    "a database it can write to: check the URL, the permissions of the database and its folder and "
                    "the free space, or give another --storage")


@pytest.mark.parametrize("when", ["before_a_trial", "during_a_trial"])
def test_storage_failing_during_the_search(tmp_path, capsys, monkeypatch, when):
    monkeypatch.setenv(search_cli._CHECKED_ENV, "1")
    storages = []
    load_or_create = search_cli._load_or_create

    def created(storage, *args):
        study = load_or_create(storage, *args)
        storages.append(storage)
        if when == "before_a_trial":
            _read_only_from_now(storage)  # study.optimize fails asking for its first trial
        return study

    class Breaks:  # the trial starts, then the database turns read-only under it
        def __init__(self, *args, **kwargs):
            pass

        def __call__(self, trial):
            _read_only_from_now(storages[0])
            trial.set_user_attr("run_dir", "x")
            return 0.5

    monkeypatch.setattr(search_cli, "_load_or_create", created)
    monkeypatch.setattr(objective_module, "Objective", Breaks)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    code, last = _search(["--out", str(tmp_path)], capsys)
    assert code == 1
    assert last == (f"error: Optuna storage '{url}' (backend: sqlite) failed during the search: "
                    "sqlite3.OperationalError: attempt to write a readonly database; the trials it recorded are "
                    "kept; once the storage works again, run the same command to add trials, or --report-only for "
                    "the outputs")


# -- (3) loss weights ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"kd_weight": -1.0}, "kd_weight must be >= 0, got -1.0"),
    ({"ce_weight": -0.5}, "ce_weight must be >= 0, got -0.5"),
    ({"kd_weight": math.nan}, "kd_weight must be >= 0, got nan"),
    ({"ce_weight": math.inf}, "ce_weight must be finite, got inf"),
])
def test_distillation_loss_weights(kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        DistillationModule(student="resnet8", teacher="resnet8", num_classes=3, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"tckd_weight": -1}, "tckd_weight must be >= 0, got -1.0"),
    ({"nckd_weight": -8.0}, "nckd_weight must be >= 0, got -8.0"),
    ({"nckd_weight": math.nan}, "nckd_weight must be >= 0, got nan"),
])
def test_dkd_loss_weights(kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        DKD(**kwargs)
    assert DKD(tckd_weight=0, nckd_weight=0).nckd_weight == 0.0  # zero switches a term off


def test_zero_weights_are_accepted():
    module = DistillationModule(student="resnet8", teacher="resnet8", num_classes=3, kd_weight=0, ce_weight=0.0)
    assert (module.kd_weight, module.ce_weight) == (0.0, 0.0)


@pytest.mark.parametrize("value", [-1.0, math.nan])
def test_prompt_distillation_kd_weight(value):
    """Its only loss term: the existing check asks for > 0 (a 0 weight would train nothing); raised before any
    CLIP is built."""
    with pytest.raises(ValueError, match=f"^kd_weight must be > 0, got {value}$"):
        PromptDistillationModule(kd_weight=value)
