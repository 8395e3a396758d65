"""bench/throughput.py and its parts: the shape table, flag validation, sharding, targets, the
correctness check that fails a wrong kernel's rows, the timer, and the CPU smoke run (the mode CI
runs: it must finish, write the JSON / PNG / markdown, and say its timings mean nothing)."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import layers, report, timing
from bench import throughput as tp
from bench.roofline import layer_roofline
from blockdpr.models import WideResNet, sparse_parameters

ROOT = Path(__file__).resolve().parent.parent


def wrn_sparse_conv_shapes(depth: int, width: int) -> collections.Counter:
    """(c_in, c_out, k, stride, input hw) -> count, read from the model's sparse convs on 32x32 input."""
    model = WideResNet(depth, width)
    modules = dict(model.named_modules())
    seen = collections.Counter()

    def hook(conv, inputs, output):
        seen[(conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0], inputs[0].shape[-1])] += 1

    for name in sparse_parameters(model):
        modules[name.rsplit(".", 1)[0]].register_forward_hook(hook)
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    return seen


def table_shapes(model: str) -> collections.Counter:
    counts = collections.Counter()
    for s in tp.SHAPES:
        if s.model == model:
            counts[(s.c_in, s.c_out, s.k, s.stride, s.hw)] += s.count
    return counts


@pytest.mark.parametrize("width", [2, 10])
def test_wrn_rows_match_the_model(width):
    assert table_shapes(f"wrn-28-{width}") == wrn_sparse_conv_shapes(28, width)


def test_resnet50_rows():
    rows = [s for s in tp.SHAPES if s.model == "resnet-50"]
    # torchvision resnet50: 25,557,032 parameters = these convs + 7x7 stem (9,408) + fc (2,049,000) + BN (53,120).
    assert sum(s.count * s.c_in * s.c_out * s.k ** 2 for s in rows) == 25_557_032 - 9_408 - 2_049_000 - 53_120
    assert sum(s.count for s in rows if s.k == 3) == 16  # one 3x3 per bottleneck: 3 + 4 + 6 + 3
    assert sum(s.count for s in rows if s.k == 1) == 36  # two 1x1 per bottleneck + 4 downsamples
    for s in rows:  # a stage's first block reads the previous stage's maps up to its stride-2 3x3 (v1.5)
        stage = int(s.name[1])
        reads_previous = stage > 2 and (s.name.endswith(".0") or s.name.endswith(".down"))
        assert s.hw == 56 // 2 ** (stage - 2 - reads_previous), s
        assert s.stride == (2 if reads_previous and s.name != f"s{stage}.reduce.0" else 1), s
    ids = [s.id for s in tp.SHAPES]
    assert len(ids) == len(set(ids))


def test_roofline_ceiling_of_a_row():
    g3 = next(s for s in tp.SHAPES if s.id == "wrn-28-10/g3")
    r = layer_roofline(g3, 256, 8192, 0.1, 32, "fwdbwd", "bf16", "NVIDIA H100 80GB HBM3")
    assert r["roofline_device"] == "h100-sxm" and 1 < r["roofline_ceiling"] <= 10 + 1e-9
    assert r["roofline_ms"] < r["roofline_dense_ms"]
    assert layer_roofline(g3, 256, 8192, 0.1, 32, "fwd", "bf16", "NVIDIA L4") == {}  # no model for that GPU


def test_linear_rows_and_ids():
    assert [(s.c_in, s.c_out) for s in tp.SHAPES if s.model == "linear"] == [(n, n) for n in (1024, 2048, 4096, 8192)]
    assert {s.model for s in tp.SHAPES} == set(tp.LAYER_MODELS) | {"smoke"}


def test_exact_mask_keeps_exactly_the_block_count():
    gen = torch.Generator().manual_seed(0)
    for grid, density, expected in [((20, 180), 0.1, 360), ((4, 4), 0.02, 1), ((3, 5), 1.0, 15), ((10, 10), 0.55, 55)]:
        assert int(layers.exact_mask(grid, density, gen).sum()) == expected


def parse(argv, cuda=True):
    parser = tp.build_parser()
    return tp.resolve_config(parser.parse_args(argv), parser, cuda=cuda)


@pytest.mark.parametrize("argv, message", [
    (["--sparsities", "0.5", "1.0"], "--sparsities"),
    (["--blocks", "48"], "--blocks"),
    (["--dtypes", "int8"], "--dtypes"),
    (["--models", "vgg-16"], "--models"),
    (["--passes", "sideways"], "--passes"),
    (["--layers", "nope/*"], "--layers"),
    (["--train-models", "wrn-27-2"], "--train-models"),
    (["--train-modes", "magic"], "--train-modes"),
    (["--train-sparsities", "0"], "--train-sparsities"),
    (["--shard", "3/2"], "--shard"),
    (["--tokens", "0"], "--tokens"),
])
def test_bad_flags_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_presets_and_explicit_flags():
    full = parse([])
    assert full["dtypes"] == ["bf16"] and full["blocks"] == [16, 32, 64] and not full["smoke"]
    assert full["sparsities"] == [0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98]
    quick = parse(["--quick"])
    assert {s.id for s in tp.selected_shapes(quick)} >= {"wrn-28-10/g3", "linear/4096"}
    assert parse(["--quick", "--blocks", "16"])["blocks"] == [16]  # explicit flags beat presets
    assert parse(["--quick", "--models", "linear"])["layers"] is None
    smoke = parse(["--models", "wrn-28-10", "--blocks", "16"], cuda=False)  # no GPU: smoke is forced
    assert smoke["smoke"] and smoke["models"] == ["smoke"] and smoke["blocks"] == [16]
    assert {s.id for s in tp.selected_shapes(parse(["--layers", "linear/*"]))} == {f"linear/{n}" for n in (1024, 2048, 4096, 8192)}


def test_shards_partition_the_work():
    full = tp.work_items(parse([]))
    shards = [tp.work_items(parse(["--shard", f"{i}/3"])) for i in (1, 2, 3)]
    assert sorted(map(repr, full)) == sorted(repr(item) for shard in shards for item in shard)
    assert all(shards)


def test_targets_read_the_rows():
    layer = dict(layer="wrn-28-10/g3", batch=256, dtype="bf16", status="ok", impl="block", block=32)
    result = {"layers": [dict(layer, **{"pass": "fwdbwd"}, sparsity=0.9, speedup=6.5),
                         dict(layer, **{"pass": "fwdbwd"}, sparsity=0.8, speedup=3.0)],
              "training": [dict(model="wrn-28-10", mode="block", sparsity=0.9, dtype="bf16", batch=128, block=32,
                                speedup=3.2)],
              "memory": [dict(model="WRN-28-10", sparsity=0.9, block=32, ratio=0.12)]}
    got = {t["target"]: t for t in report.targets(result)}
    met = {k.split(", ")[-1] if "conv" in k else k: t["met"] for k, t in got.items()}
    assert met["x cuDNN at 90%"] is True and met["x cuDNN at 80%"] is False and met["x cuDNN at 50%"] is None
    assert [t["met"] for k, t in got.items() if k.startswith("WRN-28-10 step")] == [True]
    assert [t["met"] for k, t in got.items() if "bytes" in k] == [True]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """`python bench/throughput.py` on this CPU-only machine: the forced smoke mode, as CI runs it."""
    out = tmp_path_factory.mktemp("smoke")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")  # one thread: far faster on a busy CI box
    proc = subprocess.run([sys.executable, "bench/throughput.py", "--out", str(out), "--cpu-reps", "1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_smoke_run_writes_json_png_and_tables(smoke_run):
    out, stdout = smoke_run
    assert "SMOKE MODE" in stdout and "mean nothing" in stdout.lower()
    for title in ("layers: speedup vs dense", "training step", "sparse layers", "targets"):
        assert title in stdout
    result = json.loads((out / "throughput-smoke.json").read_text())
    assert result["timings_meaningless"] is True and result["smoke"] is True and result["complete"] is True
    for key in ("provenance", "config", "layers", "training", "memory", "targets"):
        assert key in result
    assert {"torch", "triton", "cuda"} <= set(result["provenance"]["versions"])
    assert result["provenance"]["git"]["commit"] and "bench/throughput.py" in result["provenance"]["command"]
    impls = collections.Counter((r["impl"], r.get("pass")) for r in result["layers"] if r["status"] == "ok")
    for impl in ("dense", "masked", "block"):
        assert all(impls[(impl, p)] for p in tp.PASSES), impl
    assert impls[("bsr", "fwd")] > 0
    for r in result["layers"]:
        if r["status"] == "ok":
            assert r["times_ms"] and r["median_ms"] > 0 and r["speedup"] > 0
    block = [r for r in result["layers"] if r["impl"] == "block" and r["status"] == "ok"]
    assert {r["sparsity"] for r in block} == {0.0, 0.5, 0.9} and {r["block"] for r in block} == {16, 32}
    assert all(abs(r["ideal"] - 1 / r["density"]) < 1e-9 for r in block)
    assert all(r["roofline_ceiling"] > 0 for r in block)  # the H100 roofline ceiling is shown even without a GPU
    assert all(r["check"] == "ok" and set(r["check_errors"]) == {"y", "dx", "dw"} for r in block)
    modes = {(r["mode"], r["block"]) for r in result["training"] if r["status"] == "ok"}
    assert modes == {("dense", None), ("element", None), ("block", 16), ("block", 32)}
    assert all(r["images_per_s"] > 0 and r["state_bytes"] > 0 for r in result["training"])
    assert {r["block"] for r in result["memory"]} == {16, 32}
    png = out / "throughput-smoke-fp32.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "SMOKE MODE" in (out / "throughput-smoke.md").read_text()


def test_report_merges_shards(smoke_run, tmp_path, capsys):
    out, _ = smoke_run
    result = json.loads((out / "throughput-smoke.json").read_text())
    a, b = dict(result, training=[], memory=[]), dict(result, layers=[])
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    merged = tp.main(["--report", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "m")])
    assert len(merged["layers"]) == len(result["layers"]) and len(merged["training"]) == len(result["training"])
    assert len(merged["sources"]) == 2 and merged["timings_meaningless"] is True
    written = json.loads((tmp_path / "m" / "throughput-smoke-merged.json").read_text())
    assert len(written["layers"]) == len(result["layers"])
    assert "targets" in capsys.readouterr().out
    b["provenance"] = dict(b["provenance"], device=dict(b["provenance"]["device"], gpu_name="Other GPU"))
    (tmp_path / "b.json").write_text(json.dumps(b))
    with pytest.raises(SystemExit, match="different devices"):
        report.merge([tmp_path / "a.json", tmp_path / "b.json"])


def test_list_prints_the_plan(capsys):
    assert tp.main(["--list", "--smoke"]) is None
    text = capsys.readouterr().out
    assert "SHAPE_TABLE" in text and "wrn-28-10/g3" in text and "work items" in text


def test_cuda_timing_goes_through_do_bench_and_keeps_raw_times(monkeypatch):
    """The CUDA branch of the timer (no GPU here): triton.testing.do_bench with return_mode="all"."""
    import triton.testing

    calls = []

    def fake_do_bench(fn, warmup, rep, return_mode):
        calls.append((warmup, rep, return_mode))
        fn()
        return [0.5, 0.25, 0.75]

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    ran = []
    assert timing.time_ms(lambda: ran.append(1), "cuda", warmup_ms=5, rep_ms=40) == [0.5, 0.25, 0.75]
    assert calls == [(5, 40, "all")] and ran == [1]
    assert timing.stats([0.5, 0.25, 0.75])["median_ms"] == 0.5
    cpu = timing.time_ms(lambda: ran.append(1), "cpu", cpu_reps=4)
    assert len(cpu) == 4 and len(ran) == 1 + 5  # one warm-up call, then the timed ones


def _smoke_layer_rows(name: str):
    cfg = parse(["--smoke", "--sparsities", "0.5", "--blocks", "16", "--cpu-reps", "1"], cuda=False)
    return layers.layer_rows(next(s for s in tp.SHAPES if s.id == f"smoke/{name}"), "fp32", cfg, None,
                             lambda *a: None)


@pytest.mark.parametrize("name, op", [("linear", "block_sparse_linear"), ("conv3x3", "block_sparse_conv2d")])
@pytest.mark.parametrize("wrong", ["forward", "gradients"])
def test_a_wrong_kernel_fails_its_rows_and_is_not_timed(monkeypatch, name, op, wrong):
    """Correctness before speed: an injected kernel 1% off in its output (or 5% off in its gradients
    only) makes every block row of that case failed, with the error named, and no time recorded."""
    real = getattr(layers, op)

    def bad(*args, **kwargs):
        y = real(*args, **kwargs)
        return y * 1.01 if wrong == "forward" else y + 0.05 * (y - y.detach())

    good = [r for r in _smoke_layer_rows(name) if r["impl"] == "block"]
    assert good and all(r["status"] == "ok" and r["check"] == "ok" for r in good)
    monkeypatch.setattr(layers, op, bad)
    rows = _smoke_layer_rows(name)
    block = [r for r in rows if r["impl"] == "block"]
    assert {r["pass"] for r in block} == set(tp.PASSES)
    for r in block:
        assert r["status"] == "failed" and r["check"] == "failed" and "times_ms" not in r and "speedup" not in r
        assert "wrong result against the dense op" in r["error"]
        bad_tensors = {k for k, e in r["check_errors"].items() if e > r["check_tol"]}
        assert bad_tensors == ({"y", "dx", "dw"} if wrong == "forward" else {"dx", "dw"})
    assert all(r["status"] == "ok" for r in rows if r["impl"] in ("dense", "masked"))  # the peers still run
