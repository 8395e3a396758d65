"""Correctness before speed: a block-sparse case is checked against the dense op on the same
(masked) weights before it is timed; a wrong result makes its rows failed, never a speed.

The reference is the dense op (``F.conv2d`` / ``F.linear``) in float32 with TF32 off, on the
block-sparse weight unpacked to dense (zeros where no block is active), fed the same input
(upcast). Compared: the forward output, and for backward passes the input gradient and the
weight gradient of the active blocks, for one fixed output gradient. The error is
``max |got - want| / max |want|`` (one number per tensor, relative to its largest entry); the
tolerance depends on the dtype the kernels compute in (fp32 accumulation in every case):

    bf16 1e-2, fp16 2e-3, fp32 as TF32 5e-3 (torch's allow_tf32 flag of the op), fp32 1e-4.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["TOLERANCES", "tolerance", "relative_error", "check_case"]

TOLERANCES = {torch.bfloat16: 1e-2, torch.float16: 2e-3, "tf32": 5e-3, torch.float32: 1e-4}


def tolerance(dtype: torch.dtype, kind: str) -> float:
    """Tolerance of a ``kind`` ("conv" | "linear") op computed in ``dtype`` (fp32 -> TF32 when torch allows it)."""
    if dtype == torch.float32:
        tf32 = torch.backends.cudnn.allow_tf32 if kind == "conv" else torch.backends.cuda.matmul.allow_tf32
        return TOLERANCES["tf32" if tf32 else torch.float32]
    return TOLERANCES[dtype]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``max |got - want| / max |want|`` in float32 (``max |got|`` when want is all zeros); inf on a shape mismatch."""
    if got.shape != want.shape:
        return float("inf")
    got, want = got.float(), want.float()
    scale = want.abs().max() if want.numel() else torch.tensor(0.0)
    return float((got - want).abs().max() / scale.clamp_min(1e-30)) if got.numel() else 0.0


@contextlib.contextmanager
def _exact_fp32():
    """TF32 off for matmuls and cuDNN convs inside the block (the reference is plain fp32)."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        cudnn = torch.backends.cudnn
        with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                         allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


def check_case(kind: str, forward: Callable[[], torch.Tensor], x: torch.Tensor, values: torch.Tensor, layout,
               geometry: dict, backward: bool, seed: int = 0) -> dict:
    """Check one block-sparse case against the dense op on the same weights.

    kind: "conv" (x ``[B, C_in, H, W]`` channels_last, layout of ``W [C_out, R*S*C_in]``, K ordered
    (r, s, c_in)) or "linear" (x ``[M, K]``, layout of ``W [N, K]``). forward() computes the
    block-sparse output from x and values ``[nnz, bn, bk]`` (both requiring grad when ``backward``).
    geometry: stride / padding of the conv. Returns ``{"check": "ok" | "failed", "check_tol": tol,
    "check_errors": {"y": e[, "dx": e, "dw": e]}}`` plus ``"check_message"`` when failed.
    """
    tol = tolerance(x.dtype, kind)
    y = forward()
    weight = layout.unpack(values.detach()).float()
    if kind == "conv":
        c_out, c_in = weight.shape[0], x.shape[1]
        taps = weight.shape[1] // c_in
        r = round(taps ** 0.5)
        weight = weight.view(c_out, r, taps // r, c_in).permute(0, 3, 1, 2)
    if backward:  # the op's own gradients, under the caller's TF32 settings
        gen = torch.Generator().manual_seed(seed)
        dy = torch.randn(y.shape, generator=gen).to(y.device)
        dx, dv = torch.autograd.grad(y, (x, values), dy.to(y.dtype).contiguous(memory_format=_format(y)))
    x_ref = x.detach().float().requires_grad_(backward)
    w_ref = weight.contiguous().requires_grad_(backward)
    with _exact_fp32():
        want = F.conv2d(x_ref, w_ref, **geometry) if kind == "conv" else F.linear(x_ref, w_ref)
        errors = {"y": relative_error(y.detach(), want.detach())}
        if backward:
            dx_want, dw_want = torch.autograd.grad(want, (x_ref, w_ref), dy)
            if kind == "conv":
                dw_want = dw_want.permute(0, 2, 3, 1).reshape(dw_want.shape[0], -1)
            errors["dx"] = relative_error(dx, dx_want)
            errors["dw"] = relative_error(dv, layout.pack(dw_want.contiguous()))
    bad = {k: e for k, e in errors.items() if not e <= tol}  # NaN counts as bad
    out = {"check": "failed" if bad else "ok", "check_tol": tol, "check_errors": errors}
    if bad:
        out["check_message"] = "wrong result against the dense op: " + ", ".join(
            f"{k} relative error {e:.3g} > {tol:g}" for k, e in bad.items())
    return out


def _format(t: torch.Tensor) -> torch.memory_format:
    """channels_last for 4-D channels_last tensors, else contiguous."""
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
