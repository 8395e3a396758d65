"""bench/roofline.py: the performance model (pure python) and its report over bench/shapes.py."""
from __future__ import annotations

import json

import pytest

from bench import aot
from bench import roofline as kr

BLOCK = 32


# ----------------------------------------------------------------------------- roofline (pure python)
WRN_G3 = kr.ConvShape(256, 640, 640, 8, 8)  # WRN-28-10 group 3: conv 3x3 640->640 8x8, batch 256


def test_predict_counts_flops_and_bytes():
    m, n, k = WRN_G3.gemm
    assert (m, n, k) == (256 * 64, 640, 9 * 640)
    dense = kr.dense_prediction("fwd", WRN_G3, "bf16")
    assert dense["flops"] == 2 * m * n * k
    act = 2 * (WRN_G3.in_elems + m * n)
    assert dense["bytes"] == act + 2 * n * k
    full = kr.predict("fwd", WRN_G3, 1.0, BLOCK, "bf16")
    assert full["flops"] == dense["flops"] and full["nnz"] == full["blocks"] == (n // BLOCK) * (k // BLOCK)
    assert full["bytes"] == dense["bytes"] + 4 * (n // BLOCK + 1 + full["nnz"])  # row_ptr + col_idx
    s = kr.predict("wgrad", WRN_G3, 0.1, BLOCK, "bf16")
    assert s["flops"] == 2 * m * s["nnz"] * BLOCK * BLOCK
    assert s["seconds"] == max(s["flops"] / 989.4e12, s["bytes"] / 3.35e12)


def test_ceilings_for_wrn_28_10_group3():
    at80 = kr.speedup_ceiling("fwd", WRN_G3, 0.2, BLOCK, "bf16")
    at90 = kr.speedup_ceiling("fwd", WRN_G3, 0.1, BLOCK, "bf16")
    assert at80 == pytest.approx(5.0, rel=1e-3)  # still compute bound: 1 / density
    assert 9.0 < at90 < 10.0                      # memory bound: activations dominate
    assert kr.predict("fwd", WRN_G3, 0.1, BLOCK)["bound"] == "memory"


def test_predict_accepts_aliases_tuples_and_torch_dtypes():
    import torch
    a = kr.predict("linear_grad_input", (4096, 1024, 2048), 0.25, (32, 64), torch.float16)
    b = kr.predict("dgrad", kr.LinearShape(4096, 1024, 2048), 0.25, (32, 64), "fp16")
    assert a == b and a["op"] == "dgrad" and a["block"] == [32, 64]
    conv = kr.predict("conv_forward", (8, 64, 128, 16, 16, 3, 2, 1), 0.5, 16)
    assert conv["shape"] == "conv3x3 64->128 16x16 s2 b8"
    assert kr.roofline_fraction(2 * a["seconds"], a) == pytest.approx(0.5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(op="backward"), "op"),
    (dict(shape=(1, 2)), "shape"),
    (dict(block=48), "does not tile"),
    (dict(density=0.0), "density"),
    (dict(dtype="int8"), "dtype"),
])
def test_predict_rejects_bad_input(kwargs, match):
    args = dict(op="fwd", shape=(256, 1024, 1024), density=0.1, block=32, dtype="bf16") | kwargs
    with pytest.raises(ValueError, match=match):
        kr.predict(**args)


def test_roofline_report_covers_the_benchmark_shapes(tmp_path):
    rep = kr.roofline_report(densities=(0.2, 0.1), blocks=(16, 32, 64))
    models = {r["model"] for r in rep["layers"]}
    assert models == {"wrn-28-2", "wrn-28-10", "resnet-50", "linear"}
    shapes = {r["shape"] for r in rep["layers"]}
    assert {"conv3x3 640->640 8x8 b256", "conv1x1 1024->256 14x14 b256", "linear 8192->8192 m8192"} <= shapes
    # WRN-28-2's first conv (16 -> 32) cannot be cut into 32-blocks: it stays dense, ceiling 1
    stem = [r for r in rep["layers"] if r["model"] == "wrn-28-2" and r["layer"] == "g1.in" and r["block"] == 32]
    assert stem and all(not r["tileable"] and r["step_ceiling"] == 1.0 for r in stem)
    for agg in rep["models"]:
        assert agg["step_ceiling"] >= 1.0 - 1e-9
    out = tmp_path / "r.json"
    res = aot.main(["--skip-compile", "--json", str(out), "--roofline-blocks", "32"])
    saved = json.loads(out.read_text())
    assert saved["meta"]["versions"]["triton"] and "commit" in saved["meta"]["git"]
    assert saved["meta"]["command"].endswith("-m bench.aot --skip-compile --json " + str(out) + " --roofline-blocks 32")
    assert len(saved["roofline"]["layers"]) == len(res["roofline"]["layers"]) > 0


