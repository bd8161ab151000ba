"""``make demo``'s Markdown table (``runs/demo/results.md``): the printed table's numbers, headed by the date, the
machine and the elapsed time. The runs themselves are stood in for (the real demo trains for about a minute)."""

from __future__ import annotations

import datetime
import re

from abkd_vision import demo


def _result(best: float, last: float, epoch: int, images: int, teacher: float | None = None) -> dict:
    r = {"val_acc1_best": best, "val_acc1_last": last, "best_epoch": epoch, "seconds": 12.34,
         "protocol": {"train_images": images}, "curve": [last]}
    if teacher is not None:
        r["teacher_val_acc1"] = teacher
    return r


RESULTS = {"teacher": _result(0.9978, 0.9978, 14, 1347),
           "ce": _result(0.8956, 0.8911, 31, 150),
           "kd": _result(0.9511, 0.9511, 38, 150, teacher=0.9978),
           "abkd": _result(0.9511, 0.9467, 36, 150, teacher=0.9978)}


def test_results_markdown_is_the_printed_table_with_date_machine_and_time():
    when = datetime.datetime(2026, 12, 1, 9, 30, tzinfo=datetime.timezone.utc)
    text = demo.results_markdown(RESULTS, 132.4, "2 CPU cores (Linux x86_64), CPU, torch 2.14.1 (2 threads)", when)
    lines = text.splitlines()
    assert lines[0] == "# `make demo` results"
    assert "Measured 2026-12-01 09:30 UTC on 2 CPU cores (Linux x86_64), CPU, torch 2.14.1 (2 threads), in " \
           "2 min 12 s" in text
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| run") and "---" not in line]
    assert rows == [
        "| teacher resnet20 | 1,347 | 99.78% (14) | 99.78% |  | 12.3 |",
        "| student resnet8, CE only | 150 | 89.56% (31) | 89.11% |  | 12.3 |",
        "| student resnet8, KD (T=4, CE 0.1 + KD 0.9) | 150 | 95.11% (38) | 95.11% | 99.78% | 12.3 |",
        "| student resnet8, ABKD (α=0.8, β=0.3, CE 1 + KD 2) | 150 | 95.11% (36) | 94.67% | 99.78% | 12.3 |",
    ]
    assert "max_epochs" not in text
    assert "every run's max_epochs set to 3" in demo.results_markdown(RESULTS, 5.0, "x", when, epochs=3)


def test_machine_names_cores_device_and_torch():
    import torch

    assert re.fullmatch(rf"\d+ CPU cores \(.+\), .+, torch {re.escape(torch.__version__)} \(\d+ threads\)",
                        demo.machine())


def test_main_writes_results_md_beside_the_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "export_digits", lambda *a, **k: None)
    monkeypatch.setattr(demo, "_run", lambda config_dir, name, *a: dict(RESULTS[name]))
    monkeypatch.setattr(demo, "_plot", lambda results, path: path.write_bytes(b""))
    demo.main(["--out", str(tmp_path)])
    table = (tmp_path / "results.md").read_text()
    assert "| student resnet8, KD (T=4, CE 0.1 + KD 0.9) | 150 | 95.11% (38) |" in table
    assert (tmp_path / "results.json").is_file()
    out = capsys.readouterr().out
    assert f"table (Markdown): {tmp_path / 'results.md'}" in out and " in all, on " in out
