"""Block-sparse conv2d as implicit GEMM over NHWC input (Triton).

The weight is the matrix ``W [C_out, R*S*C_in]`` with K ordered ``(r, s, c_in)``, stored
packed as ``values [nnz, b_out, b_in]`` with a :class:`~blockdpr_kernels.BlockLayout`.
A block is a ``(b_out x b_in)`` channel tile at one kernel tap ``(r, s)``.

The im2col matrix is never built: each program gathers the input rows of one kernel
tap on the fly (masked at the batch*spatial edge and at zero padding). Three kernels:

* ``_fwd_kernel``: ``y[m, n-block] = sum over active blocks (n, k) of im2col(x)[m, k-block] @ W_blk^T``;
  one program per (M tile, output-channel block), looping over that block row only.
* ``_dgrad_kernel``: ``dx[m, c-block] = sum over taps t, active blocks (n, (t, c)) of
  col2im(dy)[m, n-block] @ W_blk``; one program per (M tile, input-channel block), looping
  over the active blocks of the columns ``(t, c)`` through the column-compressed view.
* ``_wgrad_kernel``: ``dW_blk^T = im2col(x)[:, k-block]^T @ dy[:, n-block]`` for active
  blocks only; one program per (run of up to ``64 // b_in`` blocks of one block row, M split),
  the run's blocks stacked into one dot of M >= 64 (wgmma on Hopper). With one split a program
  owns its blocks and stores them; with more, the split programs reduce in the kernel (see there).

Every launch tensor derived from the layout (weight-gradient runs, counters) is built
once by :class:`~blockdpr_kernels.BlockLayout`; the split count and density bucket are its O(1)
functions of their sizes (SM count cached per device). A launcher allocates its output and launches
through a :class:`~blockdpr_kernels.launch.Launcher` (once tuned, straight to the compiled kernel's C
launcher); tensors come as NHWC memory plus their sizes, so no view is made per call.
The autotune key holds the shapes and the layout's coarse density bucket (``DENSITY``, not
specialised on), so a config tuned on a dense layout is not reused at 90% sparsity.

Autotune configs that would spill registers or overflow shared memory on the launch's GPU are
pruned before tuning (:func:`prune_configs`, calibrated with ``python -m bench.aot``).

A dense linear layer is the 1x1 conv over ``M`` pixels, so :mod:`.matmul` reuses these
kernels with ``H = W = 1``. Kernels specialise only on block shape, dtype, geometry and
tile config; the layout arrives as index tensors.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .launch import Launcher
from .layout import density_bucket, wgrad_group, wgrad_runs_bound, wgrad_splits, wgrad_workspace

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Whether ops may launch the kernels on CPU tensors: under the interpreter, or under the do-nothing CUDA
# driver of bench/host.py (which sets it to measure the host path).
CPU_LAUNCH = INTERPRET


def _configs():
    """Autotune configs (Hopper-sensible); a single small one under the interpreter.

    BLOCK_M 256 with 8 warps gives the narrow (32- or 64-wide) output tiles of a sparse row
    more rows per program, so each gathered weight block feeds more MMA work; the pruner drops
    the combinations that would spill or overflow shared memory."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
            for bm in (64, 128, 256) for w in (4, 8) for s in (2, 4)]


_MIN_BLOCK_M = min(c.kwargs["BLOCK_M"] for c in _configs())


def _cost(kernel: str, config, bn: int, bk: int, elem_bytes: int, hopper: bool) -> tuple[float, int]:
    """(register pressure, shared memory bytes) of a config, calibrated on ``python -m bench.aot``.

    Pressure: fp32 accumulator elements per thread (plus, for wgrad, its operand tiles per thread:
    conservative since its gathered operand is copied by cp.async and no longer held in registers,
    39-57 registers in the AOT report), weighted by the operand size (more on Ampere, whose mma.sync keeps the
    operands in registers). Shared memory: ``num_stages`` (Hopper) or ``num_stages - 1`` (Ampere)
    copies of the operand tiles.
    """
    bm, threads = config.kwargs["BLOCK_M"], 32 * config.num_warps
    if kernel == "wgrad":
        g = wgrad_group(bk)
        tiles = bm * (g * bk + bn)
        per_thread = (g * bk * bn + tiles) / threads
    else:
        tiles = bm * bk + bn * bk
        per_thread = bm * (bn if kernel == "fwd" else bk) / threads
    weight = elem_bytes / 2 if hopper else (elem_bytes / 2) ** 2
    return per_thread * weight, (config.num_stages - (0 if hopper else 1)) * tiles * elem_bytes


def config_fits(kernel: str, config, bn: int, bk: int, elem_bytes: int, smem_limit: int, hopper: bool) -> bool:
    """Whether ``config`` of ``kernel`` ("fwd", "dgrad", "wgrad") should neither spill registers nor
    overflow ``smem_limit``. On Ampere, 2 stages (a single buffer: no pipelining) are left out too, and
    so are more than 32 rows of ``BLOCK_M`` per warp (mma.sync holds the operand fragments in registers:
    BLOCK_M 256 with 4 warps spilled in the AOT report, linear dgrad at block 16)."""
    pressure, smem = _cost(kernel, config, bn, bk, elem_bytes, hopper)
    limit = 128 if hopper else 48 if kernel == "wgrad" else 64
    rows_per_warp = config.kwargs["BLOCK_M"] // config.num_warps
    return pressure <= limit and smem <= smem_limit and (hopper or (config.num_stages > 2 and rows_per_warp <= 32))


def prune_configs(kernel: str, configs, bn: int, bk: int, elem_bytes: int, smem_limit: int, hopper: bool) -> list:
    """The configs that fit (:func:`config_fits`); if none, the least register pressure within shared memory."""
    kept = [c for c in configs if config_fits(kernel, c, bn, bk, elem_bytes, smem_limit, hopper)]
    cost = {id(c): _cost(kernel, c, bn, bk, elem_bytes, hopper) for c in configs}
    return kept or [min(configs, key=lambda c: (cost[id(c)][1] > smem_limit, cost[id(c)][0], cost[id(c)][1]))]


@functools.lru_cache(maxsize=None)
def _smem_limit_and_hopper(device: torch.device) -> tuple[int, bool]:
    """(shared memory per block, whether Hopper or newer) of a device, queried once per device."""
    if device.type != "cuda":  # interpreter
        return 1 << 30, True
    props = torch.cuda.get_device_properties(device)
    return props.shared_memory_per_block_optin, props.major >= 9


def _pruner(kernel: str):
    """``early_config_prune`` for the autotuner: :func:`prune_configs` for the launch's block, dtype and GPU."""
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        t = args["v_ptr" if kernel != "wgrad" else "x_ptr"]
        limit, hopper = _smem_limit_and_hopper(t.device)
        return prune_configs(kernel, configs, args["BN"], args["BK"], t.element_size(), limit, hopper)
    return prune


# Autotune key: shapes, geometry and the layout's density bucket, never layout contents (triton
# adds the tensor dtypes).
_KEY = ["M", "H", "W", "C_IN", "C_OUT", "R", "S", "STRIDE", "PAD", "BN", "BK", "DENSITY"]
_WGRAD_KEY = [k for k in _KEY if k != "R"]  # the weight gradient reads a block's tap from its column


@triton.jit
def _pixels(offs_m, H, W):
    """Split flat pixel indices over a ``[B, H, W]`` grid into ``(b, i, j)``."""
    j = offs_m % W
    t = offs_m // W
    return t // H, t % H, j


@triton.jit
def _tap_rows(b, i, j, in_range, tap, H_SRC, W_SRC,
              S: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Pixel rows of the source ``[B, H_SRC, W_SRC, C]`` tensor seen through kernel tap ``tap``.

    Forward / weight grad: ``(i, j)`` is an output pixel, the source is the input.
    Transposed (input grad): ``(i, j)`` is an input pixel, the source is the output grid.
    Returns int64 pixel indices and the mask of rows that exist (not padding, not past M).
    """
    r = tap // S
    s = tap % S
    if TRANSPOSED:
        hs = i + PAD - r
        ws = j + PAD - s
        h = hs // STRIDE
        w = ws // STRIDE
        ok = (hs >= 0) & (ws >= 0) & (hs % STRIDE == 0) & (ws % STRIDE == 0) & (h < H_SRC) & (w < W_SRC)
    else:
        h = i * STRIDE - PAD + r
        w = j * STRIDE - PAD + s
        ok = (h >= 0) & (h < H_SRC) & (w >= 0) & (w < W_SRC)
    return ((b * H_SRC + h) * W_SRC + w).to(tl.int64), ok & in_range


@triton.autotune(configs=_configs(), key=_KEY,
                 prune_configs_by={"early_config_prune": _pruner("fwd")})
@triton.jit(do_not_specialize=["DENSITY"])
def _fwd_kernel(x_ptr, v_ptr, row_prefix, col_idx, bias_ptr, y_ptr,
                M, H, W, P, Q, C_IN, C_OUT, DENSITY,
                R: tl.constexpr, S: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
                BN: tl.constexpr, BK: tl.constexpr, HAS_BIAS: tl.constexpr,
                PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
    """y [B*P*Q, C_OUT] = im2col(x [B*H*W, C_IN]) @ W^T (+ bias); W packed in v [nnz, BN, BK].

    ``row_prefix [C_OUT // BN, KB + 1]`` (the layout's, ``KB = R * S * C_IN // BK`` block columns):
    the packed blocks of block row ``n`` in block columns ``c0 .. c1 - 1`` are ``row_prefix[n, c0] ..
    row_prefix[n, c1] - 1``. A tap's blocks are the columns ``tap * C_IN // BK ..``, so the input
    rows of a tap are computed once per tap, not once per block. ``DENSITY`` (the layout's density
    bucket) is only read by the autotuner's key."""
    pid = tl.program_id(0)
    n_blocks = C_OUT // BN
    k_blocks = C_IN // BK
    row = R * S * k_blocks + 1  # row stride of row_prefix
    n = pid % n_blocks  # output-channel blocks fastest: neighbours share the x rows in L2
    offs_m = (pid // n_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    b, i, j = _pixels(offs_m, P, Q)
    acc = tl.zeros((BLOCK_M, BN), dtype=tl.float32)
    w_tile = offs_n[None, :] * BK + offs_k[:, None]  # [BK, BN]: a block read transposed
    for tap in range(R * S):
        rows, ok = _tap_rows(b, i, j, offs_m < M, tap, H, W, S, STRIDE, PAD, False)
        a_tile = x_ptr + rows[:, None] * C_IN + offs_k[None, :]  # channel block 0 of this tap
        lo = tl.load(row_prefix + n * row + tap * k_blocks)
        hi = tl.load(row_prefix + n * row + (tap + 1) * k_blocks)
        kb_next = tl.load(col_idx + lo, mask=lo < hi, other=0)
        for blk in range(lo, hi):
            # the block index is loaded an iteration ahead: an address that depends on a load of the
            # same iteration keeps Triton's software pipeliner at 2 stages whatever num_stages says
            kb = kb_next
            kb_next = tl.load(col_idx + blk + 1, mask=blk + 1 < hi, other=0)
            a = tl.load(a_tile + (kb - tap * k_blocks) * BK, mask=ok[:, None], other=0.0)
            w_t = tl.load(v_ptr + blk * (BN * BK) + w_tile)
            acc = tl.dot(a, w_t, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n * BN + offs_n)[None, :].to(tl.float32)
    y = y_ptr + offs_m[:, None].to(tl.int64) * C_OUT + n * BN + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=(offs_m < M)[:, None])


@triton.autotune(configs=_configs(), key=_KEY,
                 prune_configs_by={"early_config_prune": _pruner("dgrad")})
@triton.jit(do_not_specialize=["DENSITY"])
def _dgrad_kernel(dy_ptr, v_ptr, col_ptr, col_row_idx, col_perm, dx_ptr,
                  M, H, W, P, Q, C_IN, C_OUT, DENSITY,
                  R: tl.constexpr, S: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
                  BN: tl.constexpr, BK: tl.constexpr,
                  PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
    """dx [B*H*W, C_IN] = col2im(dy [B*P*Q, C_OUT] @ W); W packed in v [nnz, BN, BK]."""
    pid = tl.program_id(0)
    k_blocks = C_IN // BK
    c = pid % k_blocks
    offs_m = (pid // k_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    b, i, j = _pixels(offs_m, H, W)
    acc = tl.zeros((BLOCK_M, BK), dtype=tl.float32)
    for tap in range(R * S):
        rows, ok = _tap_rows(b, i, j, offs_m < M, tap, P, Q, S, STRIDE, PAD, True)
        col = tap * k_blocks + c
        lo, hi = tl.load(col_ptr + col), tl.load(col_ptr + col + 1)
        nb_next = tl.load(col_row_idx + lo, mask=lo < hi, other=0)
        blk_next = tl.load(col_perm + lo, mask=lo < hi, other=0)
        for e in range(lo, hi):  # indices loaded an iteration ahead, as in _fwd_kernel
            nb, blk = nb_next, blk_next
            nb_next = tl.load(col_row_idx + e + 1, mask=e + 1 < hi, other=0)
            blk_next = tl.load(col_perm + e + 1, mask=e + 1 < hi, other=0)
            g = tl.load(dy_ptr + rows[:, None] * C_OUT + nb * BN + offs_n[None, :],
                        mask=ok[:, None], other=0.0)
            w = tl.load(v_ptr + blk * (BN * BK) + offs_n[:, None] * BK + offs_k[None, :])  # [BN, BK]
            acc = tl.dot(g, w, acc, input_precision=PRECISION)
    dx = dx_ptr + offs_m[:, None].to(tl.int64) * C_IN + c * BK + offs_k[None, :]
    tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=(offs_m < M)[:, None])


@triton.jit
def _input_tile(x_ptr, offs_m, tap, chans, mine, H: tl.constexpr, W: tl.constexpr, P: tl.constexpr,
                Q: tl.constexpr, C_IN: tl.constexpr, S: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
                G: tl.constexpr, BK: tl.constexpr):
    """Pointers and mask (padding, blocks past the run) of the weight gradient's gathered input tile
    ``[BLOCK_M, G * BK]`` of NHWC ``x``: the pixel rows of output pixels ``offs_m [BLOCK_M]`` through each
    block's tap ``tap [1, G]``, block ``g``'s channels ``chans[g]`` (``[G, BK]``, ``mine [G]``: block
    exists). Channels are contiguous: the layout a dot operand is copied in asynchronously (cp.async)."""
    BLOCK_M: tl.constexpr = offs_m.shape[0]
    b, i, j = _pixels(offs_m, P, Q)
    rows, ok = _tap_rows(b[:, None], i[:, None], j[:, None], mine[None, :], tap, H, W, S, STRIDE, PAD, False)
    ptrs = x_ptr + rows[:, :, None] * C_IN + chans[None, :, :]
    mask = tl.broadcast_to(ok[:, :, None], (BLOCK_M, G, BK))
    return tl.reshape(ptrs, (BLOCK_M, G * BK)), tl.reshape(mask, (BLOCK_M, G * BK))


@triton.jit
def _dy_tile(dy_ptr, offs_m, n, C_OUT: tl.constexpr, BN: tl.constexpr):
    """Pointers ``[BLOCK_M, BN]`` of dy's rows ``offs_m`` in block column ``n`` (dy ``[M, C_OUT]``)."""
    return dy_ptr + offs_m[:, None].to(tl.int64) * C_OUT + n * BN + tl.arange(0, BN)[None, :]


@triton.jit
def _wgrad_step(acc, a_ptrs, a_ok, g_ptrs, g_ok, PRECISION: tl.constexpr):
    """``acc [G*BK, BN] += a^T @ g`` for one M tile: the gathered input ``a`` and dy ``g`` (masks: None = all)."""
    a = tl.load(a_ptrs, mask=a_ok, other=0.0)
    if g_ok is None:
        g = tl.load(g_ptrs)
    else:
        g = tl.load(g_ptrs, mask=g_ok, other=0.0)
    return tl.dot(tl.trans(a), g, acc, input_precision=PRECISION)


@triton.autotune(configs=_configs(), key=_WGRAD_KEY,
                 prune_configs_by={"early_config_prune": _pruner("wgrad")})
@triton.jit(do_not_specialize=["DENSITY"])
def _wgrad_kernel(x_ptr, dy_ptr, groups, row_idx, col_idx, dv_ptr, ws_ptr, count_ptr,
                  M, H: tl.constexpr, W: tl.constexpr, P: tl.constexpr, Q: tl.constexpr,
                  C_IN: tl.constexpr, C_OUT: tl.constexpr, DENSITY,
                  S: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
                  BN: tl.constexpr, BK: tl.constexpr,
                  PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
    """dv[blk]^T = im2col(x)[:, k-block]^T @ dy[:, n-block] over M = B*P*Q, for the packed blocks
    ``groups[g, 0] .. groups[g, 1] - 1`` (at most G, all of one block row n); dv [nnz, BN, BK].

    The G blocks share the dy tile and are stacked into one dot ``[G*BK, BLOCK_M] @ [BLOCK_M, BN]``
    whose M dimension G*BK >= 64 lets Hopper use wgmma. Grid ``(groups, n_splits)``; unused groups
    are empty. With one split the program owns its blocks and stores them. With ``n_splits > 1``
    each split adds its fp32 partial sum into the fp32 workspace ``ws [nnz, BN, BK]`` (atomics at
    L2) and counts itself done in ``count[g]``; the last split of the group reads the total from
    the workspace (at L2), zeroes it, stores the total cast to dv's dtype and resets the counter,
    so the workspace and counters are all zero again between launches (no memset, no second
    pass, no partial buffer). The sum order of the splits varies between runs, so with splits the
    low bits of dv are not bitwise reproducible (as cuDNN's split-K weight gradients).

    The geometry is constexpr (fixed per layer: one compile per layer shape), because every
    iteration splits a new M tile into pixels: by constants these divisions are multiplications
    (372 -> 178 SASS instructions per iteration at BLOCK_M 64, 4 warps, block 32 on sm_90), and a tile
    of whole images computes its pixels once, before the loop (178 -> 114 at 8x8); the tiles wholly inside
    M load without a row mask, the partial last one after the loop (114 -> 86). The gathered input
    tile is loaded as ``[BLOCK_M, G*BK]``, channels contiguous, so it is copied global -> shared
    asynchronously (cp.async) like dy.
    """
    G: tl.constexpr = 64 // BK if BK < 64 else 1  # as layout.wgrad_group(BK)
    group = tl.program_id(0)
    start, end = tl.load(groups + 2 * group), tl.load(groups + 2 * group + 1)
    if start >= end:
        return
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    n = tl.load(row_idx + start)
    blks = start + tl.arange(0, G)
    mine = blks < end
    kb = tl.load(col_idx + blks, mask=mine, other=0)
    k_blocks = C_IN // BK
    tap = (kb // k_blocks)[None, :]  # [1, G]
    offs_n = tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    chans = (kb % k_blocks)[:, None] * BK + offs_k[None, :]  # [G, BK]
    tiles = tl.cdiv(M, BLOCK_M)
    per_split = tl.cdiv(tiles, n_splits)
    acc = tl.zeros((G * BK, BN), dtype=tl.float32)
    first = split * per_split
    last = tl.minimum(tiles, first + per_split)
    full = tl.maximum(first, tl.minimum(last, M // BLOCK_M))  # first .. full - 1 lie wholly in M: no row mask
    offs_m = first * BLOCK_M + tl.arange(0, BLOCK_M)
    g_ptrs = _dy_tile(dy_ptr, offs_m, n, C_OUT, BN)
    # A tile of whole images (BLOCK_M a multiple of P*Q, e.g. WRN's 8x8 stage) has one pixel pattern:
    # tile t + 1 is tile t moved by BLOCK_M / (P*Q) images, so its rows and padding masks are computed
    # once, outside the loop, which then only moves the pointers (no per-pixel division or bound check).
    WHOLE_IMAGES: tl.constexpr = BLOCK_M % (P * Q) == 0
    if WHOLE_IMAGES:
        a_ptrs, a_ok = _input_tile(x_ptr, offs_m, tap, chans, mine, H, W, P, Q, C_IN, S, STRIDE, PAD, G, BK)
    for t in range(first, full):
        if not WHOLE_IMAGES:
            offs_m = t * BLOCK_M + tl.arange(0, BLOCK_M)
            a_ptrs, a_ok = _input_tile(x_ptr, offs_m, tap, chans, mine, H, W, P, Q, C_IN, S, STRIDE, PAD, G, BK)
        acc = _wgrad_step(acc, a_ptrs, a_ok, g_ptrs, None, PRECISION)
        g_ptrs += BLOCK_M * C_OUT
        if WHOLE_IMAGES:
            a_ptrs += BLOCK_M // (P * Q) * H * W * C_IN
    if full < last:  # the last tile of M, partial: rows past M masked
        # pointers computed afresh: the loop's are dead after it, so a pipelined loop keeps no copies
        offs_m = full * BLOCK_M + tl.arange(0, BLOCK_M)
        a_ptrs, a_ok = _input_tile(x_ptr, offs_m, tap, chans, mine, H, W, P, Q, C_IN, S, STRIDE, PAD, G, BK)
        g_ptrs = _dy_tile(dy_ptr, offs_m, n, C_OUT, BN)
        in_m = (offs_m < M)[:, None]
        acc = _wgrad_step(acc, a_ptrs, a_ok & in_m, g_ptrs, in_m, PRECISION)
    offs = blks.to(tl.int64)[:, None, None] * (BN * BK) + offs_n[None, None, :] * BK + offs_k[None, :, None]
    keep = mine[:, None, None]  # offs, keep: [G, BK, BN]
    acc = tl.reshape(acc, (G, BK, BN))
    if n_splits == 1:
        tl.store(dv_ptr + offs, acc.to(dv_ptr.dtype.element_ty), mask=keep)
    else:
        tl.atomic_add(ws_ptr + offs, acc, mask=keep, sem="relaxed")
        tl.debug_barrier()  # every thread's adds are issued before the release below
        if tl.atomic_add(count_ptr + group, 1, sem="acq_rel") == n_splits - 1:
            total = tl.load(ws_ptr + offs, mask=keep, cache_modifier=".cg")  # from L2, where the adds landed
            tl.store(dv_ptr + offs, total.to(dv_ptr.dtype.element_ty), mask=keep)
            tl.store(ws_ptr + offs, tl.zeros_like(total), mask=keep)
            tl.store(count_ptr + group, 0)


# ----------------------------------------------------------------------------- launchers
# Each launcher passes the kernel's arguments positionally, in its parameter order, all but BLOCK_M
# (the autotuned tile), to a Launcher (see launch.py): once a launch signature is tuned, later launches
# go straight to the compiled kernel's C launcher. Ceiling divisions are written -(-a // b): triton.cdiv
# is a constexpr function whose wrapper costs microseconds per call on the host.

# O(1) formulas of sizes (and the device's SM count), but per launch: memoised
_density = functools.lru_cache(maxsize=4096)(density_bucket)
_splits = functools.lru_cache(maxsize=4096)(wgrad_splits)
_FWD = Launcher(_fwd_kernel, tensors=6)
_DGRAD = Launcher(_dgrad_kernel, tensors=6)
_WGRAD = Launcher(_wgrad_kernel, tensors=8)


def _precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    return "tf32" if dtype == torch.float32 and allow_tf32 and not INTERPRET else "ieee"


def _nhwc_view(t: torch.Tensor, shape) -> torch.Tensor:
    """``t`` (memory: a contiguous NHWC array of ``shape``) as that array."""
    return t.as_strided(shape, (shape[1] * shape[2] * shape[3], shape[2] * shape[3], shape[3], 1))


def forward(x, values, row_prefix, col_idx, bias, y, x_nhwc, y_nhwc, kernel_size, stride, padding, allow_tf32):
    """Fill ``y`` from ``x``: tensors whose memory is the contiguous NHWC arrays of sizes ``x_nhwc`` =
    ``(B, H, W, C_in)`` and ``y_nhwc`` = ``(B, P, Q, C_out)`` (a channels_last NCHW tensor, or a
    ``[M, C]`` matrix as ``(M, 1, 1, C)``): no view is made per call.

    ``values [nnz, C_out-block, C_in-block]`` with layout ``row_prefix``/``col_idx``; ``bias [C_out]`` or None.
    """
    (_, h, w, c_in), (b, p, q, c_out) = x_nhwc, y_nhwc
    nnz, bn, bk = values.shape
    m = b * p * q
    if nnz == 0 or m == 0:  # no active block or no rows: nothing to launch
        out = _nhwc_view(y, y_nhwc).zero_()
        if bias is not None:
            out += bias
        return y
    n_blocks = c_out // bn
    _FWD.launch(lambda block_m: (-(-m // block_m) * n_blocks,),
                (x, values, row_prefix, col_idx, y if bias is None else bias, y, m, h, w, p, q, c_in, c_out,
                 _density(nnz, n_blocks), kernel_size[0], kernel_size[1], stride, padding, bn, bk,
                 bias is not None, _precision(x.dtype, allow_tf32)))
    return y


def grad_input(dy, values, col_ptr, col_row_idx, col_perm, dx, dy_nhwc, dx_nhwc, kernel_size, stride, padding,
               allow_tf32):
    """Fill ``dx`` (NHWC sizes ``dx_nhwc`` = ``(B, H, W, C_in)``) from ``dy`` (``dy_nhwc`` = ``(B, P, Q, C_out)``),
    via the column view; memory as in :func:`forward`."""
    (b, h, w, c_in), (_, p, q, c_out) = dx_nhwc, dy_nhwc
    nnz, bn, bk = values.shape
    m = b * h * w
    if nnz == 0 or m == 0:
        return dx.zero_()
    k_blocks = c_in // bk
    _DGRAD.launch(lambda block_m: (-(-m // block_m) * k_blocks,),
                  (dy, values, col_ptr, col_row_idx, col_perm, dx, m, h, w, p, q, c_in, c_out,
                   _density(nnz, c_out // bn), kernel_size[0], kernel_size[1], stride, padding, bn, bk,
                   _precision(dy.dtype, allow_tf32)))
    return dx


def grad_weight(x, dy, row_idx, col_idx, groups, counters, block, x_nhwc, dy_nhwc, kernel_size, stride, padding,
                allow_tf32, out=None, own_blocks=None):
    """Packed weight gradient ``[nnz, bn, bk]`` (dtype of x) for the active blocks only.

    ``x`` (NHWC sizes ``x_nhwc`` = ``(B, H, W, C_in)``), ``dy`` (``dy_nhwc`` = ``(B, P, Q, C_out)``), memory as
    in :func:`forward`; the rest is the layout's (see :class:`~blockdpr_kernels.BlockLayout`):
    ``row_idx``/``col_idx`` of each packed block, the runs ``groups [n_groups, 2]`` and int32 ``counters
    [n_groups]`` (zeros) for the split reduction, which adds into the device's shared fp32 workspace
    (:func:`~blockdpr_kernels.layout.wgrad_workspace`). The split count and density bucket are the layout's
    (:func:`~blockdpr_kernels.layout.wgrad_splits`, :func:`~blockdpr_kernels.layout.density_bucket` of these
    sizes; the SM count is cached per device). ``out``: the ``[nnz, bn, bk]`` tensor to write, whose rows
    outside the groups are left as they are (zeros for a layout sharing a PackedStorage); default a new one.
    ``own_blocks``: the layout's own block count when ``row_idx`` holds a PackedStorage's ``total``; the
    split count and density bucket then follow it (the groups are sized for any density).
    """
    (_, h, w, c_in), (b, p, q, c_out) = x_nhwc, dy_nhwc
    bn, bk = block
    nnz = row_idx.shape[0]
    m = b * p * q
    dv = x.new_empty(nnz, bn, bk) if out is None else out
    if nnz == 0 or m == 0:
        return dv.zero_()
    n_groups = groups.shape[0]
    own = nnz if own_blocks is None else own_blocks
    used = n_groups if own_blocks is None else wgrad_runs_bound(own, c_out // bn, bk)
    device = x.device
    splits = min(_splits(used, device), -(-m // _MIN_BLOCK_M))  # each split >= 1 M tile
    workspace = wgrad_workspace(nnz * bn * bk, device)  # a lookup: the layout sized it
    _WGRAD.launch(lambda block_m: (n_groups, splits),
                  (x, dy, groups, row_idx, col_idx, dv, workspace, counters, m, h, w, p, q, c_in, c_out,
                   _density(own, c_out // bn), kernel_size[1], stride, padding, bn, bk,
                   _precision(x.dtype, allow_tf32)))
    return dv
