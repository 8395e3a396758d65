"""Launch a tuned Triton kernel through its compiled kernel's C launcher.

``kernel[grid](...)`` on an autotuned kernel runs, per call, the autotuner's key and config lookup,
the JIT's binder (argument specialisation), the compile-cache key and a dict of bound arguments
before the C launcher: tens of microseconds of Python per launch. :class:`Launcher` pays that once
per *launch signature* and then calls the cached ``CompiledKernel``'s launcher directly, with the
tensors' pointers as the ints it reads (it would otherwise call each tensor's ``data_ptr()`` again,
and on a GPU ask the driver whether the pointer is a device pointer: the ops checked the devices).
The current device is read once per launch, for the signature and to make the tensors' GPU current
when it is not.

The signature holds everything the autotuner and the JIT key on: the device, every scalar
argument (ints, constexprs, strings) exactly, and each tensor's dtype and 16-byte alignment (the
JIT specialises pointers on it). A new signature, hence a new autotune key, goes the full way (the
autotuner tunes it, the JIT compiles or finds the variant) and is remembered with the config and
compiled kernel it ran. The slow path is also taken whenever something watches launches: a pre-run
hook on the kernel (``blockdpr_kernels.testing`` recorders) or a launch hook in ``triton.knobs``
(profilers). Under ``TRITON_INTERPRET=1`` there is no compiled kernel, so every launch is the
interpreter's. Changing a triton knob that enters the JIT cache key (e.g. ``TRITON_DEBUG``) after a
signature's first launch does not recompile it.
"""
from __future__ import annotations

from typing import Callable

import torch
from triton import knobs
from triton.compiler import CompiledKernel
from triton.runtime import driver
from triton.runtime.jit import JITFunction

__all__ = ["Launcher"]

_data_ptr = torch.Tensor.data_ptr
_MISALIGNED = (15).__and__  # p -> p % 16, as a C function for map()


def _watched() -> bool:
    """Whether a triton launch hook is installed (triton 3.9: a HookChain with calls; older: not None)."""
    runtime = knobs.runtime
    enter, exit_ = runtime.launch_enter_hook, runtime.launch_exit_hook
    return bool(getattr(enter, "calls", enter)) or bool(getattr(exit_, "calls", exit_))


class Launcher:
    """One ``triton.autotune``-d kernel whose first ``tensors`` parameters are tensors and whose last is
    ``BLOCK_M`` (the tuned tile size).

    ``launch(grid, args)``: ``args`` are every kernel argument but ``BLOCK_M``, positionally in the
    kernel's parameter order, all tensors on one device; ``grid(block_m)`` gives the launch grid (a tuple
    of 1 to 3 ints).
    """

    def __init__(self, tuner, tensors: int):
        self.tuner = tuner
        names = list(tuner.arg_names)
        if names[-1] != "BLOCK_M":
            raise ValueError(f"{tuner.base_fn.__name__}: the last parameter must be BLOCK_M, got {names[-1]}")
        self.n_args, self.n_tensors = len(names) - 1, tensors
        self.compiles = isinstance(tuner.fn, JITFunction)  # False under the interpreter: no compiled kernel
        # signature -> launch(grid_x, grid_y, grid_z, stream, args) of the kept compiled kernel (see _direct)
        self.compiled: dict[tuple, Callable] = {}
        self._driver = None  # triton's active driver when the first kernel was kept (bench.host sets its own)

    def signature(self, args: tuple) -> tuple:
        """The launch signature of ``args`` on the current device (see the module docstring)."""
        tensors = args[:self.n_tensors]
        return _signature((self._driver or driver.active).get_current_device(), tensors, args[self.n_tensors:],
                          tuple(map(_data_ptr, tensors)))

    def launch(self, grid: Callable[[int], tuple], args: tuple) -> None:
        """Launch on the tensors' device (the first tensor's): a GPU that is not the current device is made
        current for the launch (the current device is read once, for this and for the signature)."""
        if not self.compiles:
            self.tuner[lambda meta: grid(meta["BLOCK_M"])](*args)
            return
        current = (self._driver or driver.active).get_current_device()
        gpu = args[0].get_device()  # -1 off CUDA (bench.host's CPU tensors under its do-nothing driver)
        if gpu >= 0 and gpu != current:
            with torch.cuda.device(gpu):
                return self.launch(grid, args)
        tensors, scalars = args[:self.n_tensors], args[self.n_tensors:]
        pointers = tuple(map(_data_ptr, tensors))
        key = _signature(current, tensors, scalars, pointers)
        hit = self.compiled.get(key)
        if hit is None or self.tuner.fn.pre_run_hooks or _watched():
            self._tune_and_launch(key, grid, args)
            return
        launch, block_m = hit
        g = grid(block_m)
        # The C launcher takes a pointer as an int as readily as a tensor (whose data_ptr() it would call
        # again, and on a GPU check with the driver: the ops checked every tensor's device already).
        launch(g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1, self._driver.get_current_stream(current),
               pointers + scalars + (block_m,))

    def _tune_and_launch(self, key: tuple, grid, args) -> None:
        """The full path: autotuner (tunes a new key) and JIT (compiles a new variant); remembers the result."""
        if len(args) != self.n_args:
            raise TypeError(f"{self.tuner.base_fn.__name__}: expected {self.n_args} arguments, got {len(args)}")
        kernel = self.tuner[lambda meta: grid(meta["BLOCK_M"])](*args)
        if isinstance(kernel, CompiledKernel):
            self._driver = driver.active
            self.compiled[key] = _direct(kernel), self.tuner.best_config.kwargs["BLOCK_M"]


def _signature(device: int, tensors: tuple, scalars: tuple, pointers: tuple) -> tuple:
    """The launch signature, given the current device and the tensors' ``data_ptr()`` s. The alignments are
    one ``True`` when every pointer is a multiple of 16 (the usual case: one C-level pass), else a flag per
    tensor."""
    aligned = not any(map(_MISALIGNED, pointers)) or tuple([p % 16 == 0 for p in pointers])
    return device, scalars, tuple([t.dtype for t in tensors]), aligned


_C_LAUNCH_FIELDS = ("launch", "arg_annotations", "kernel_signature", "launch_cooperative_grid", "launch_pdl",
                    "global_scratch_size", "profile_scratch_size")


def _direct(kernel: CompiledKernel) -> Callable:
    """``launch(grid_x, grid_y, grid_z, stream, args)`` of a compiled kernel (``args``: all its arguments).

    When the kernel needs no scratch memory and no sanitizer (ours), this calls the C function under
    triton's CUDA launcher object (``CudaLauncher.launch``) with the launcher's fixed fields, skipping
    the object's per-launch Python (scratch allocation closures); otherwise the launcher object itself.
    """
    runner, function, metadata = kernel.run, kernel.function, kernel.packed_metadata
    if (all(hasattr(runner, f) for f in _C_LAUNCH_FIELDS) and not runner.global_scratch_size
            and not runner.profile_scratch_size and not getattr(runner, "gsan_enabled", False)):
        c_launch, cooperative, pdl = runner.launch, runner.launch_cooperative_grid, runner.launch_pdl
        annotations, signature = runner.arg_annotations, runner.kernel_signature

        def launch(gx, gy, gz, stream, args):
            c_launch(gx, gy, gz, stream, function, cooperative, pdl, metadata, None, None, None, None, None,
                     annotations, signature, args)
        return launch

    def launch(gx, gy, gz, stream, args):
        runner(gx, gy, gz, stream, function, metadata, None, None, None, *args)
    return launch
