"""GPU readiness without a GPU: every Triton kernel compiles ahead of time for sm_90 and sm_80, uses
tensor cores, does not spill and fits shared memory (bench/kernel_report.py); plus its roofline model.

The compile tests run the kernels' real autotune configs in worker subprocesses (this pytest
process runs under TRITON_INTERPRET=1 without a GPU, see conftest.py). Results are cached per
kernel source under $BLOCKDPR_AOT_CACHE (default ~/.cache/blockdpr/aot), so a second run is fast.
"""
from __future__ import annotations

import importlib.util
import io
import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("kernel_report", ROOT / "bench" / "kernel_report.py")
kr = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("kernel_report", kr)
_spec.loader.exec_module(kr)


def _have_nvidia_tools() -> bool:
    try:
        import inspect

        import triton
        from triton.compiler import ASTSource
    except ImportError:
        return False
    if "constexprs" not in inspect.signature(ASTSource).parameters:  # the report is written for triton >= 3.3
        return False
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return all((bin_dir / t).exists() or shutil.which(t) for t in ("ptxas", "cuobjdump"))


needs_tools = pytest.mark.skipif(not _have_nvidia_tools(), reason="triton's NVIDIA backend (ptxas, cuobjdump) or ASTSource(constexprs=) missing")
BLOCK = kr.REPRESENTATIVE_BLOCK


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
    assert models == {"WRN-28-2", "WRN-28-10", "ResNet-50", "linear"}
    shapes = {r["shape"] for r in rep["layers"]}
    assert {"conv3x3 640->640 8x8 b256", "conv1x1 1024->256 14x14 b256", "linear 8192->8192 m8192"} <= shapes
    # WRN-28-2's first conv (16 -> 32) cannot be cut into 32-blocks: it stays dense, ceiling 1
    stem = [r for r in rep["layers"] if r["model"] == "WRN-28-2" and r["layer"] == "g1.0.conv1" and r["block"] == 32]
    assert stem and all(not r["tileable"] and r["step_ceiling"] == 1.0 for r in stem)
    for agg in rep["models"]:
        assert agg["step_ceiling"] >= 1.0 - 1e-9
    out = tmp_path / "r.json"
    res = kr.main(["--skip-compile", "--json", str(out), "--roofline-blocks", "32"])
    saved = json.loads(out.read_text())
    assert saved["meta"]["versions"]["triton"] and "git_commit" in saved["meta"]
    assert len(saved["roofline"]["layers"]) == len(res["roofline"]["layers"]) > 0


def test_signature_table_errors_name_the_missing_entry():
    job = dict(kernel="fwd", variant="linear", dtype="bf16", block=[32, 32],
               config=kr.parse_config("BLOCK_M=64,num_warps=4,num_stages=3"), config_index=None, target=90)
    sig, const, attrs = kr.build_signature(job, ["x_ptr", "row_ptr", "M", "H", "BN", "BLOCK_M"], ["BN", "BLOCK_M"])
    assert sig == {"x_ptr": "*bf16", "row_ptr": "*i32", "M": "i32", "H": "constexpr", "BN": "constexpr",
                   "BLOCK_M": "constexpr"}
    assert const == {"H": 1, "BN": 32, "BLOCK_M": 64} and (0,) in attrs and (2,) in attrs
    with pytest.raises(ValueError, match="NEW_ARG"):
        kr.build_signature(job, ["x_ptr", "NEW_ARG"], [])
    with pytest.raises(ValueError, match="NEW_CONST"):
        kr.build_signature(job, ["x_ptr", "NEW_CONST"], ["NEW_CONST"])


def test_jobs_skip_the_configs_the_kernel_prunes():
    cfg = [kr.parse_config(f"BLOCK_M={bm}") for bm in (64, 128, 256)]
    info = dict(kernels=dict(fwd=dict(configs=cfg, pickable={"bf16/32/90": [1, 2], "bf16/32/80": [2]})),
                blocks=dict(linear=[32]))
    jobs = kr.build_jobs(info, kernels=["fwd"], variants=["linear"], dtypes=["bf16"], blocks=[32],
                         extra_configs=[kr.parse_config("BLOCK_M=16")])
    assert [(j["config_index"], j["target"]) for j in jobs] == [(1, 90), (2, 90), (2, 80), (None, 90), (None, 80)]
    first = kr.build_jobs(info, kernels=["fwd"], variants=["linear"], dtypes=["bf16"], blocks=[32], configs="first")
    assert [(j["config_index"], j["target"]) for j in first] == [(1, 90), (2, 80)]


# ----------------------------------------------------------------------------- ahead-of-time compile
@pytest.fixture(scope="module")
def aot():
    """All kernels, both variants, block 32, both targets: every autotune config in bf16, the first in
    fp16 and fp32 (TF32), among the configs the kernels do not prune. About 90 compiles on 2 processes,
    cached across runs."""
    every = kr.run_compile(dtypes=["bf16"], blocks=[BLOCK], configs="all", workers=2)
    first = kr.run_compile(dtypes=["fp16", "fp32"], blocks=[BLOCK], configs="first", workers=2)
    return dict(every, rows=every["rows"] + first["rows"])


@needs_tools
def test_every_kernel_is_in_the_table(aot):
    assert aot["kernel_errors"] == {}
    assert aot["unlisted"] == [], "add these kernels to KERNELS in bench/kernel_report.py"
    seen = {(r["kernel"], r["variant"]) for r in aot["rows"]}
    assert seen == {(k, v) for k in kr.KERNELS for v in kr.VARIANTS}
    n_configs = {k: len(v["configs"]) for k, v in aot["kernels"].items()}
    assert all(n > 1 for n in n_configs.values()), f"expected the real autotune lists, got {n_configs}"


@needs_tools
def test_every_config_compiles_for_sm90_and_sm80(aot):
    errors = [f"{r['variant']}.{r['kernel']} {r['dtype']} {r['config_label']} {r['target_name']}: "
              f"{r['error_summary'] if 'error_summary' in r else r['error']}" for r in aot["rows"] if r.get("error")]
    assert not errors, "\n".join(errors)
    assert {r["target"] for r in aot["rows"]} == {90, 80}


@needs_tools
def test_half_precision_kernels_use_tensor_cores(aot):
    half = [r for r in aot["rows"] if r["dtype"] in ("bf16", "fp16")]
    assert half
    missing = [f"{r['variant']}.{r['kernel']} {r['dtype']} {r['config_label']} {r['target_name']}"
               for r in half if not r["uses_tc"]]
    assert not missing, "no HGMMA/HMMA in the SASS of:\n" + "\n".join(missing)
    assert all("HMMA" in r["mma"] for r in half if r["target"] == 80)
    # wgmma on Hopper for every kernel, wgrad included (it stacks blocks of a row to reach M = 64)
    assert all("HGMMA" in r["mma"] for r in half if r["target"] == 90)


@needs_tools
def test_default_configs_do_not_spill_and_fit_shared_memory(aot):
    bad = [f"{r['variant']}.{r['kernel']} {r['dtype']} {r['config_label']} {r['target_name']}: "
           f"spill {r['spill_bytes']} B (STL {r['stl']}), smem {r['smem']} / {r['smem_limit']} B"
           for r in aot["rows"] if r["spills"] or not r["fits_smem"]]
    assert not bad, "\n".join(bad)
    limits = {r["target"]: r["smem_limit"] for r in aot["rows"]}
    assert limits == {90: 227 * 1024, 80: 163 * 1024}


@needs_tools
def test_bad_configs_are_reported_not_crashed_on():
    too_big = kr.parse_config("BLOCK_M=1024,num_warps=4,num_stages=4")  # ~390 KB of shared memory
    not_pow2 = kr.parse_config("BLOCK_M=48,num_warps=4,num_stages=3")   # tl.arange needs a power of 2
    res = kr.run_compile(kernels=["wgrad"], variants=["linear"], dtypes=["bf16"], blocks=[BLOCK], configs=[],
                         extra_configs=[too_big, not_pow2], workers=2)
    rows = {(r["config"]["kwargs"]["BLOCK_M"], r["target"]): r for r in res["rows"]}
    assert set(rows) == {(1024, 90), (1024, 80), (48, 90), (48, 80)}
    for t in (90, 80):
        big = rows[(1024, t)]
        assert big["error"] is None and big["config_index"] is None
        assert big["fits_smem"] is False and big["smem"] > big["smem_limit"] and big["ctas_per_sm"] == 0
        assert not big["ok"]
        bad = rows[(48, t)]
        assert bad["error"] and "power of 2" in bad["error_summary"] and bad["ok"] is False
    buf = io.StringIO()
    from rich.console import Console
    kr.print_compile(Console(file=buf, width=250), res["rows"], res["summary"], "problems")
    text = buf.getvalue()
    assert "power of 2" in text and "> 163.0" in text and "> 227.0" in text


@needs_tools
def test_a_dying_compiler_process_is_an_error_row(aot):
    job = dict(kernel="fwd", variant="linear", dtype="bf16", block=[BLOCK, BLOCK], config=kr.parse_config("BLOCK_M=64"),
               config_index=None, target=90, _crash=True)
    info = dict(kernels=aot["kernels"])
    (row,) = kr.compile_jobs([job], info, workers=1, use_cache=False)
    assert "compiler process died: worker exited with code 3" in row["error"] and row["ok"] is False
