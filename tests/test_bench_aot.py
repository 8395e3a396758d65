"""GPU readiness without a GPU: every Triton kernel compiles ahead of time for sm_90 and sm_80, uses
tensor cores, does not spill and fits shared memory (bench/aot.py).

The compile tests run the kernels' real autotune configs in worker subprocesses (this pytest
process runs under TRITON_INTERPRET=1 without a GPU, see conftest.py). Results are cached per
kernel source under $BLOCKDPR_AOT_CACHE (default ~/.cache/blockdpr/aot), so a second run is fast.
"""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest

from bench import aot as kr
from bench.aot_compile import compile_jobs
from bench.aot_jobs import KERNELS, REPRESENTATIVE_BLOCK, VARIANTS, build_jobs, build_signature, parse_config


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
BLOCK = REPRESENTATIVE_BLOCK


def test_signature_table_errors_name_the_missing_entry():
    job = dict(kernel="fwd", variant="linear", dtype="bf16", block=[32, 32],
               config=parse_config("BLOCK_M=64,num_warps=4,num_stages=3"), config_index=None, target=90)
    sig, const, attrs = build_signature(job, ["x_ptr", "row_ptr", "M", "H", "BN", "BLOCK_M"], ["BN", "BLOCK_M"])
    assert sig == {"x_ptr": "*bf16", "row_ptr": "*i32", "M": "i32", "H": "constexpr", "BN": "constexpr",
                   "BLOCK_M": "constexpr"}
    assert const == {"H": 1, "BN": 32, "BLOCK_M": 64} and (0,) in attrs and (2,) in attrs
    with pytest.raises(ValueError, match="NEW_ARG"):
        build_signature(job, ["x_ptr", "NEW_ARG"], [])
    with pytest.raises(ValueError, match="NEW_CONST"):
        build_signature(job, ["x_ptr", "NEW_CONST"], ["NEW_CONST"])


def test_jobs_skip_the_configs_the_kernel_prunes():
    cfg = [parse_config(f"BLOCK_M={bm}") for bm in (64, 128, 256)]
    info = dict(kernels=dict(fwd=dict(configs=cfg, pickable={"bf16/32/90": [1, 2], "bf16/32/80": [2]})),
                blocks=dict(linear=[32]))
    jobs = build_jobs(info, kernels=["fwd"], variants=["linear"], dtypes=["bf16"], blocks=[32],
                      extra_configs=[parse_config("BLOCK_M=16")])
    assert [(j["config_index"], j["target"]) for j in jobs] == [(1, 90), (2, 90), (2, 80), (None, 90), (None, 80)]
    first = build_jobs(info, kernels=["fwd"], variants=["linear"], dtypes=["bf16"], blocks=[32], configs="first")
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
    assert aot["unlisted"] == [], "add these kernels to KERNELS in bench/aot_jobs.py"
    seen = {(r["kernel"], r["variant"]) for r in aot["rows"]}
    assert seen == {(k, v) for k in KERNELS for v in VARIANTS}
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
    too_big = parse_config("BLOCK_M=1024,num_warps=4,num_stages=4")  # ~390 KB of shared memory
    not_pow2 = parse_config("BLOCK_M=48,num_warps=4,num_stages=3")   # tl.arange needs a power of 2
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
    job = dict(kernel="fwd", variant="linear", dtype="bf16", block=[BLOCK, BLOCK], config=parse_config("BLOCK_M=64"),
               config_index=None, target=90, _crash=True)
    info = dict(kernels=aot["kernels"])
    (row,) = compile_jobs([job], info, workers=1, use_cache=False)
    assert "compiler process died: worker exited with code 3" in row["error"] and row["ok"] is False


@needs_tools
def test_every_sm90_kernel_has_a_hot_loop_with_its_mma(aot):
    """bench.sass finds the K loop of every kernel: the loop that issues the wgmma instructions."""
    sm90 = [r for r in aot["rows"] if r["target"] == 90 and not r.get("error")]
    assert sm90
    missing = [f"{r['variant']}.{r['kernel']} {r['dtype']} {r['config_label']}" for r in sm90
               if not r["loop"] or not r["loop"]["mma"]]
    assert not missing, "no loop with MMA found in:\n" + "\n".join(missing)
    summary = [g for g in aot["summary"] if g["target"] == "sm_90"]
    assert all(g["hot_loop"]["bf16"]["min"] <= g["hot_loop"]["bf16"]["max"] for g in summary)
