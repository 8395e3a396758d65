"""bench/train_speed.py: the training-loop benchmark of issue 15, as a CPU smoke run (times mean
nothing here) and its target verdicts on constructed rows."""
import json

import pytest

from bench import train_speed


def test_smoke_run_times_every_case_and_writes_json_and_report(tmp_path, tiny_cifar):
    out = tmp_path / "speed.json"
    rows = train_speed.main(["--smoke", "--data", str(tiny_cifar), "--out", str(out), "--cpu-reps", "1"])
    assert [(r["mode"], r["trials"]) for r in rows] == [("dense", 1), ("dpr", 1), ("dense", 2), ("dpr", 2)]
    assert all(r["status"] == "ok" and r["images_per_s"] > 0 for r in rows), rows
    for r in rows:
        assert (r["realloc_ms"] > 0) == (r["mode"] == "dpr"), "DPR rows time their reallocations"
        assert r["amortised_step_ms"] == pytest.approx(r["step_ms"] + r["realloc_ms"] / r["period"])
        assert r["images_per_s"] == pytest.approx(r["trials"] * 4 / r["amortised_step_ms"] * 1e3)
    assert all("dpr_overhead" in r for r in rows if r["mode"] == "dpr")
    saved = json.loads(out.read_text())
    assert saved["rows"] == rows and saved["meta"]["smoke"]
    assert "bench.train_speed --smoke" in saved["meta"]["command"] and saved["meta"]["provenance"]["versions"]
    report = out.with_suffix(".md").read_text()
    assert "| DPR, 1 trial, fp32 (img/s) |" in report and "times mean nothing" in report


def _row(mode, trials, ips, precision="fp32"):
    return {"mode": mode, "trials": trials, "precision": precision, "path": "graph", "status": "ok", "images_per_s": ips}


def test_targets_are_judged_on_the_best_rows():
    rows = [_row("dense", 1, 31_000), _row("dpr", 1, 30_500), _row("dense", 32, 150_000), _row("dpr", 32, 140_000)]
    train_speed.overheads(rows)
    assert rows[1]["dpr_overhead"] == pytest.approx(31_000 / 30_500 - 1)
    lines = train_speed.verdicts(rows)
    assert lines[0].endswith("| 30,500 | >= 30,000 | met |")
    assert lines[1].endswith("| 140,000 | >= 100,000 | met |")
    assert lines[2].endswith("| +1.6% | <= 3% | met |")
    slow = [_row("dense", 1, 10_000), _row("dpr", 1, 9_000), _row("dpr", 8, 20_000, "bf16")]
    train_speed.overheads(slow)
    assert [line.rsplit("|", 2)[-2].strip() for line in train_speed.verdicts(slow)] == ["missed"] * 3
    assert all("not measured" in line for line in train_speed.verdicts([]))


def test_graph_path_without_cuda_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        train_speed.parse_args(["--paths", "graph", "--device", "cpu"])
    assert e.value.code == 2 and "needs a CUDA GPU" in capsys.readouterr().err
