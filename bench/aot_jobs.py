"""The compile matrix of bench.aot: what to compile, and the triton signature of each compile.

The tables to update when a kernel changes -- KERNELS (with VARIANTS / DTYPES next to it) -- plus
the targets (sm_90, sm_80) and their limits. From them: the job list (kernel x variant x dtype x
block x autotune config x target, as plain dicts, see :func:`build_jobs`) and the
``(signature, constexprs, attrs)`` of one job for ``triton.compile(ASTSource(...))``
(:func:`build_signature`, called in the worker process :mod:`bench.aot_worker`).
"""
from __future__ import annotations

from typing import Any, Iterable

PACKAGE = "blockdpr_kernels"


# ============================================================================ the table to update
# Per kernel: where it lives (module attribute of blockdpr_kernels), its pointer arguments and the
# element type each points to ("T" = the activation dtype, else a triton type name), and any
# constexpr values of its own. Every other argument is found by name in VARIANTS (ints and
# geometry constexprs), DTYPES (precision constexprs), the block (BN, BK) or the autotune config.
# Arg names, which of them are constexpr, and the config list are read from the kernel objects.
KERNELS: dict[str, dict[str, Any]] = {
    "fwd": dict(obj="conv._fwd_kernel",
                pointers=dict(x_ptr="T", v_ptr="T", row_prefix="i32", col_idx="i32", bias_ptr="T", y_ptr="T"),
                constexprs=dict(HAS_BIAS=True)),
    "dgrad": dict(obj="conv._dgrad_kernel",
                  pointers=dict(dy_ptr="T", v_ptr="T", col_ptr="i32", col_row_idx="i32", col_perm="i32", dx_ptr="T"),
                  constexprs={}),
    "wgrad": dict(obj="conv._wgrad_kernel",
                  pointers=dict(x_ptr="T", dy_ptr="T", groups="i32", row_idx="i32", col_idx="i32",
                                dv_ptr="T", ws_ptr="fp32", count_ptr="i32"),
                  constexprs={}),
}
# The density bucket is an autotune-key int the kernels do not specialise on (do_not_specialize):
# any value that is neither 1 nor a multiple of 16 compiles it as the runtime does, a plain i32.
DENSITY_BUCKET = 3
# How the kernels are launched: geometry ints (specialised like the runtime: 1 -> constexpr) and
# constexprs; block sizes from blockdpr_kernels.ops.<blocks>; block constexpr names (rows, cols).
VARIANTS: dict[str, dict[str, Any]] = {
    "linear": dict(blocks="LINEAR_BLOCKS", block_args=("BN", "BK"),
                   ints=dict(M=8192, H=1, W=1, P=1, Q=1, C_IN=4096, C_OUT=4096, DENSITY=DENSITY_BUCKET),
                   constexprs=dict(R=1, S=1, STRIDE=1, PAD=0)),
    "conv3x3": dict(blocks="CONV_BLOCKS", block_args=("BN", "BK"),
                    ints=dict(M=256 * 8 * 8, H=8, W=8, P=8, Q=8, C_IN=640, C_OUT=640, DENSITY=DENSITY_BUCKET),
                    constexprs=dict(R=3, S=3, STRIDE=1, PAD=1)),
}
# dtype -> triton element type of "T" pointers and constexprs (fp32 runs as TF32 on tensor cores).
DTYPES: dict[str, dict[str, Any]] = {
    "bf16": dict(ptr="bf16", constexprs=dict(PRECISION="ieee")),
    "fp16": dict(ptr="fp16", constexprs=dict(PRECISION="ieee")),
    "fp32": dict(ptr="fp32", constexprs=dict(PRECISION="tf32")),
    "fp32-ieee": dict(ptr="fp32", constexprs=dict(PRECISION="ieee")),  # CUDA cores; not in the default matrix
}
DEFAULT_DTYPES = ("bf16", "fp16", "fp32")
# Targets: shared memory per block (opt-in max) and per SM, registers per SM, max warps per SM,
# the MMA instruction expected (wgmma -> HGMMA on Hopper, mma.sync -> HMMA on Ampere).
TARGETS: dict[int, dict[str, Any]] = {
    90: dict(name="sm_90", gpus="H100/H200", smem_block=227 * 1024, smem_sm=228 * 1024,
             regs_sm=65536, warps_sm=64, ctas_sm=32, mma="HGMMA"),
    80: dict(name="sm_80", gpus="A100", smem_block=163 * 1024, smem_sm=164 * 1024,
             regs_sm=65536, warps_sm=64, ctas_sm=32, mma="HMMA"),
}
TC_INSTRUCTIONS = ("HGMMA", "HMMA", "IMMA", "QGMMA", "IGMMA", "UTCHMMA", "UTCQMMA")
REPRESENTATIVE_BLOCK = 32


# ============================================================================ jobs and signatures
def _abbrev(key: str) -> str:
    """BLOCK_M -> BM, BLOCK_SIZE_N -> BSN, GROUP -> GROUP."""
    parts = key.split("_")
    return "".join(p[0] for p in parts) if len(parts) > 1 else key


def config_label(cfg: dict) -> str:
    kw = " ".join(f"{_abbrev(k)}{v}" for k, v in cfg["kwargs"].items())
    extra = "".join(f" {k}={cfg[k]}" for k in ("num_ctas", "maxnreg") if cfg.get(k) not in (None, 1))
    return f"{kw} w{cfg['num_warps']} s{cfg['num_stages']}{extra}"


def parse_config(text: str) -> dict:
    """``BLOCK_M=512,num_warps=4,num_stages=4`` -> a config dict (unknown keys are kernel kwargs)."""
    cfg = dict(kwargs={}, num_warps=4, num_stages=3, num_ctas=1, maxnreg=None)
    for item in filter(None, text.split(",")):
        key, _, val = item.partition("=")
        val = int(val) if val.lstrip("-").isdigit() else val
        (cfg if key in ("num_warps", "num_stages", "num_ctas", "maxnreg") else cfg["kwargs"])[key.strip()] = val
    return cfg


def _specialize_int(value: int) -> tuple[str, bool]:
    """(triton type, divisible by 16) as the launcher specialises an int argument; 'constexpr' for 1."""
    if value == 1:
        return "constexpr", False
    ty = "i32" if -2**31 <= value < 2**31 else "i64"
    return ty, value % 16 == 0


def build_signature(job: dict, arg_names: list[str], constexpr_names: list[str]):
    """(signature, constexprs, attrs) for ASTSource, or raises ValueError naming what is missing."""
    spec, variant, dt = KERNELS[job["kernel"]], VARIANTS[job["variant"]], DTYPES[job["dtype"]]
    values = dict(variant["ints"])  # geometry a kernel declares constexpr (fixed per layer)
    values.update(variant["constexprs"])
    values.update(dt["constexprs"])
    values.update(zip(variant["block_args"], job["block"]))
    values.update(spec["constexprs"])
    values.update(job["config"]["kwargs"])
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(arg_names):
        if name in constexpr_names:
            if name not in values:
                raise ValueError(f"no value for constexpr {name!r}: add it to KERNELS / VARIANTS / DTYPES")
            signature[name], constexprs[name] = "constexpr", values[name]
        elif name in spec["pointers"]:
            elem = spec["pointers"][name]
            signature[name] = "*" + (dt["ptr"] if elem == "T" else elem)
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif name in variant["ints"]:
            ty, div16 = _specialize_int(variant["ints"][name])
            signature[name] = ty
            if ty == "constexpr":
                constexprs[name] = variant["ints"][name]
            elif div16:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            raise ValueError(f"unknown argument {name!r}: add it to KERNELS[{job['kernel']!r}]['pointers'] "
                             f"or VARIANTS[{job['variant']!r}]['ints']")
    return signature, constexprs, attrs


def build_jobs(info: dict, kernels: Iterable[str] | None = None, variants: Iterable[str] | None = None,
               dtypes: Iterable[str] = DEFAULT_DTYPES, blocks: Iterable[int] | None = None,
               targets: Iterable[int] = tuple(TARGETS), configs: str | Iterable[int] = "all",
               extra_configs: Iterable[dict] = ()) -> list[dict]:
    """The compile jobs: kernel x variant x dtype x (square) block x config x target.

    blocks: None = every block size the variant supports (ops.LINEAR_BLOCKS / CONV_BLOCKS), else the
    given ones that it supports. configs: "all", "first" or indices into the autotune list, taken among the
    configs that the kernel's ``early_config_prune`` keeps for each dtype / block / target (the autotuner
    never runs the others). extra_configs: configs of your own (e.g. deliberately bad), never pruned,
    marked config_index=None.
    """
    jobs = []
    for kname in kernels or KERNELS:
        k = info["kernels"][kname]
        if "error" in k:
            continue
        every = list(enumerate(k["configs"])) + [(None, c) for c in extra_configs]

        def chosen(key: str) -> set:
            """Indices to compile: among the pickable configs (kernel's pruning), "first" / "all" / given."""
            pick = [i for i, _ in every if i is not None and (not k.get("pickable") or i in k["pickable"][key])]
            return set(pick[:1] if configs == "first" else pick if configs == "all" else
                       [i for i in pick if i in configs]) | {None}

        for variant in variants or VARIANTS:
            supported = info["blocks"].get(variant) or [REPRESENTATIVE_BLOCK]
            for block in [b for b in (blocks or supported) if b in supported]:
                for dtype in dtypes:
                    keep = {t: chosen(f"{dtype}/{block}/{t}") for t in targets}
                    for idx, cfg in every:
                        for target in targets:
                            if idx in keep[target]:
                                jobs.append(dict(kernel=kname, variant=variant, dtype=dtype, block=[block, block],
                                                 config=cfg, config_index=idx, target=int(target)))
    return jobs
