"""Test helpers: where the Triton kernels can run (CUDA, or CPU under the interpreter),
and which compiled variants a sequence of launches would need.
"""
from __future__ import annotations

import contextlib

import torch

__all__ = ["kernel_device", "kernels", "record_specializations", "SKIP_REASON", "BF16_SKIP_REASON"]


def kernel_device() -> torch.device | None:
    """Device on which tests run the Triton backend, or None when it cannot run.

    CUDA when available; else CPU when the kernels run under the Triton interpreter
    (``TRITON_INTERPRET=1`` must be set before triton is first imported, e.g. in a conftest).
    """
    from . import ops
    if not ops.HAS_TRITON:
        return None
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu") if ops.conv.INTERPRET else None


SKIP_REASON = ("no CUDA device and the Triton interpreter is off: set TRITON_INTERPRET=1 before "
               "triton is imported (tests/conftest.py does this)")

BF16_SKIP_REASON = ("Triton interpreter does not support bf16 tl.dot (triton issue 11584: it multiplies raw "
                    "bit patterns; fp16 and fp32 are right); bf16 runs on a real GPU")


def kernels() -> dict:
    """The autotuned Triton kernels by name."""
    from . import conv
    return {"fwd": conv._fwd_kernel, "dgrad": conv._dgrad_kernel, "wgrad": conv._wgrad_kernel}


@contextlib.contextmanager
def record_specializations(arch: int = 90):
    """Collect ``(kernel name, key)`` for every kernel launch inside the block.

    ``key`` is the specialisation a real launch keys the compile cache on (argument
    types, divisibility/alignment attributes, constexpr values), computed for a CUDA
    ``sm_<arch>`` target with triton's own binder. Distinct keys mean distinct compiled
    variants, so this works under the interpreter too, where nothing is compiled.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    seen: list = []
    hooked = []
    for name, tuner in kernels().items():
        fn = tuner.fn  # the jitted / interpreted function under the autotuner
        jit = JITFunction(fn.fn)
        binder = create_function_from_signature(jit.signature, jit.params, backend)

        def hook(*args, _name=name, _binder=binder, **kwargs):
            _, spec, _ = _binder(*args, **kwargs)
            seen.append((_name, repr(spec)))

        fn.add_pre_run_hook(hook)
        hooked.append((fn, hook))
    try:
        yield seen
    finally:
        for fn, hook in hooked:
            fn.pre_run_hooks.remove(hook)
