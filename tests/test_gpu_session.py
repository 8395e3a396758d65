"""`bash bench/gpu_session.sh` on this CPU-only machine: the CPU smoke parts run in under two minutes,
say that they are a smoke run, write summary.json with every step, and leave the README alone; the
README regeneration works on the smoke JSON (on a copy of the README); the step runner enforces
its time limit."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import readme, session

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke_session(tmp_path_factory):
    out = tmp_path_factory.mktemp("session")
    readme_before = (ROOT / "README.md").read_bytes()
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHON=sys.executable)
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", "bench/gpu_session.sh", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (ROOT / "README.md").read_bytes() == readme_before, "a CPU smoke session must not touch README.md"
    return out, proc.stdout, wall


def test_cpu_session_runs_the_smoke_steps_and_says_so(smoke_session):
    out, stdout, wall = smoke_session
    assert "NO CUDA GPU" in stdout and "CPU SMOKE" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "cpu-smoke" and summary["complete"] and "no CUDA GPU" in summary["note"]
    assert [s["name"] for s in summary["steps"]] == [s.name for s in session.cpu_steps()]
    assert summary["wall_s"] < 120 and wall < 150
    assert summary["provenance"]["git"]["commit"] and summary["provenance"]["versions"]["torch"]
    for step in summary["steps"]:
        assert step["status"] == "ok" and step["exit_code"] == 0 and 0 < step["wall_s"] <= step["timeout_s"]
        assert step["files"] and Path(step["log"]).is_file()
    written = {Path(f).name for s in summary["steps"] for f in s["files"]}
    assert {"throughput-smoke-quick.json", "throughput-smoke-train.json", "breakdown.json", "breakdown.md",
            "train-speed.json", "train-speed.md"} <= written
    layers = json.loads((out / "throughput-smoke-quick.json").read_text())["layers"]
    assert layers and all(r["check"] == "ok" for r in layers if r["impl"] == "block")
    breakdown = json.loads((out / "breakdown.json").read_text())
    assert all(r["status"] == "ok" and set(r["launch_ms"]) == {"forward", "grad_input", "grad_weight"}
               for r in breakdown["rows"])  # the launchers were recorded and replayed under the interpreter
    assert "README.md" in summary["readme"] and "left as it is" in summary["readme"]


def test_readme_regeneration_on_the_smoke_json(smoke_session, tmp_path):
    out, _, _ = smoke_session
    copy = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", copy)
    before = copy.read_text()
    text = readme.update_readme(copy, out)
    assert copy.read_text() == text
    head, rest = before.split(readme.START)
    _, tail = rest.split(readme.END)
    assert text.startswith(head + readme.START) and text.endswith(readme.END + tail)  # only the table changed
    table = text.split(readme.START)[1].split(readme.END)[0]
    assert "SMOKE RUN WITHOUT A GPU" in table
    for step in json.loads((out / "summary.json").read_text())["steps"]:
        assert f"| {step['name']} | {step['wall_s']:.1f} | ok |" in table
    speed = json.loads((out / "train-speed.json").read_text())["rows"]
    assert speed and all(f"| {r['mode']} | {r['trials']} | fp32 | eager | {r['step_ms']:.2f} |" in table for r in speed)
    assert "| DPR, 1 trial, fp32 (img/s) |" in table
    assert readme.update_readme(copy, out) == text  # idempotent
    with pytest.raises(ValueError, match="gpu-results"):
        readme.replace_between_markers("no markers here", table)


def test_a_step_past_its_limit_is_killed(tmp_path):
    step = session.Step("sleeper", [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                        60)
    t0 = time.perf_counter()
    record = session.run_step(step, tmp_path, 2, [tmp_path])
    assert time.perf_counter() - t0 < 20
    assert record["timed_out"] and record["status"] == "timed out after 2 s" and record["exit_code"] != 0
    assert "started" in Path(record["log"]).read_text()


def test_a_gpu_session_regenerates_the_readme_table(tmp_path):
    """The CUDA branch of run_session (with one trivial step): summary in GPU mode and the README's table
    regenerated between the markers (a copy of the README), from a throughput result in the folder."""
    copy = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", copy)
    out = tmp_path / "results"
    out.mkdir()
    layer = dict(layer="wrn-28-10/g3", batch=256, dtype="bf16", status="ok", impl="block", block=32, sparsity=0.9,
                 speedup=6.5, **{"pass": "fwdbwd"})
    (out / "throughput-fake-gpu-quick.json").write_text(json.dumps({"layers": [layer], "training": []}))
    step = session.Step("hello", [sys.executable, "-c", "print('hello')"], 30)
    summary = session.run_session(out, True, "Fake GPU", [step], 60, copy, say=lambda *a: None)
    assert summary["mode"] == "gpu" and summary["steps"][0]["status"] == "ok"
    assert summary["readme"] == f"regenerated {copy}"
    table = copy.read_text().split(readme.START)[1].split(readme.END)[0]
    assert "SMOKE" not in table and "| hello |" in table
    assert "x cuDNN at 90% | >= 6.00 | 6.50 | yes |" in table


def test_steps_selects_steps_by_name_and_refuses_unknown_ones(tmp_path, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(session, "run_session", lambda out, cuda, gpu, steps, budget, readme_path: ran.append(
        ([s.name for s in steps], budget)) or {"steps": []})
    assert session.main(["--steps", "train-speed-smoke,breakdown-smoke", "--out", str(tmp_path)]) == 0
    limits = {s.name: s.timeout_s for s in session.cpu_steps()}
    assert ran == [(["breakdown-smoke", "train-speed-smoke"],  # in session order, with the sum of their limits
                    limits["breakdown-smoke"] + limits["train-speed-smoke"])]
    with pytest.raises(SystemExit) as e:
        session.main(["--steps", "train-speed"])  # a GPU step: not on this machine
    assert e.value.code == 2 and "no step named train-speed" in capsys.readouterr().err
