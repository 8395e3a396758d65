"""Test helpers: where the Triton kernels can run (CUDA, or CPU under the interpreter),
which compiled variants and autotune keys a sequence of launches would need, and what work
(torch ops, kernel launches) a call does.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from .ops import BF16_INTERPRETER_REASON

__all__ = ["kernel_device", "kernels", "launchers", "record_specializations", "record_autotune_keys", "record_work", "Work",
           "SKIP_REASON", "BF16_SKIP_REASON"]


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

BF16_SKIP_REASON = BF16_INTERPRETER_REASON  # the ops refuse bf16 with backend="triton" under the interpreter


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

    def make_hook(name, tuner):
        fn = tuner.fn  # the jitted / interpreted function under the autotuner
        jit = JITFunction(fn.fn, do_not_specialize=_jit_option(fn, "do_not_specialize"))
        binder = create_function_from_signature(jit.signature, jit.params, backend)

        def hook(*args, **kwargs):
            _, spec, _ = binder(*args, **kwargs)
            seen.append((name, repr(spec)))
        return hook

    with _pre_run_hooks(make_hook):
        yield seen


@contextlib.contextmanager
def _pre_run_hooks(make_hook):
    """Install ``make_hook(name, tuner)`` as a pre-run hook of every kernel of :func:`kernels` for the
    block (it sees each launch's arguments), and remove them after."""
    hooked = []
    for name, tuner in kernels().items():
        hook = make_hook(name, tuner)
        tuner.fn.add_pre_run_hook(hook)
        hooked.append((tuner.fn, hook))
    try:
        yield
    finally:
        for fn, hook in hooked:
            fn.pre_run_hooks.remove(hook)


def _jit_option(fn, name: str):
    """A ``triton.jit`` option of a jitted (``JITFunction``) or interpreted (``InterpretedFunction``) kernel."""
    return getattr(fn, name, None) if hasattr(fn, name) else getattr(fn, "kwargs", {}).get(name)


@contextlib.contextmanager
def record_autotune_keys():
    """Collect ``(kernel name, key)`` for every kernel launch inside the block, ``key`` being the values
    of the autotuner's ``key`` arguments (``tuner.keys``), as the autotuner looks them up (it adds the
    tensor dtypes). Works under the interpreter, where the single config skips the autotuner's cache."""
    seen: list = []

    def make_hook(name, tuner):
        def hook(*args, **kwargs):
            named = {**dict(zip(tuner.arg_names, args)), **kwargs}
            seen.append((name, tuple(named[k] for k in tuner.keys if k in named)))
        return hook

    with _pre_run_hooks(make_hook):
        yield seen


@dataclasses.dataclass
class Work:
    """What a block of code made the device do: ``ops`` counts the torch ops dispatched that are not
    views (``"aten.empty"``, ``"blockdpr_kernels.conv2d"``, ...), including those inside this package's
    custom ops but not those of a kernel launch itself; ``launches`` counts the launches per kernel
    name of :func:`kernels` (one per call, whatever autotuning or the interpreter do inside it);
    ``syncs`` counts what makes the host wait for the device: a tensor read as a Python number
    (``"item"``: ``.item()``, ``bool()``, ``int()``, ``float()``), ``"tolist"`` and ``"numpy"`` (each
    counted even on a CPU tensor, so CPU tests see what a GPU run would wait for), a copy from a
    GPU to the CPU (``"to_cpu"``), a tensor made from host data (``"from_host"``: ``torch.tensor``,
    ``torch.as_tensor``; on a GPU a blocking copy, which waits for the stream and cannot be
    captured in a CUDA graph; counted on CPU too), and ops whose output size depends on tensor
    values (``"aten.nonzero"``, ...)."""
    ops: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    launches: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    syncs: collections.Counter = dataclasses.field(default_factory=collections.Counter)


_VALUE_SIZED_OPS = frozenset({"aten.nonzero", "aten.masked_select", "aten._unique2", "aten.unique_dim",
                              "aten.unique_consecutive", "aten.repeat_interleave"})


class _OpCounter(TorchDispatchMode):
    """Counts non-view ops; runs this package's custom ops' implementations with the mode still on."""

    def __init__(self, work: Work):
        super().__init__()
        self.work = work

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = f"{func.namespace}.{func._opname}"
        if not func.is_view:
            self.work.ops[name] += 1
        if name == "aten._local_scalar_dense":
            self.work.syncs["item"] += 1
        elif name == "aten.lift_fresh":  # torch.tensor / as_tensor of host data: a blocking copy to a GPU
            self.work.syncs["from_host"] += 1
        elif name in _VALUE_SIZED_OPS and kwargs.get("output_size") is None:  # repeat_interleave may be told it
            self.work.syncs[name] += 1
        elif name in ("aten._to_copy", "aten.copy_") and _to_cpu(func, args, kwargs):
            self.work.syncs["to_cpu"] += 1
        if func.namespace == "blockdpr_kernels":
            from torch._library.custom_ops import OPDEFS
            with self:
                return OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
        return func(*args, **kwargs)


def _to_cpu(func, args, kwargs) -> bool:
    """Whether a _to_copy / copy_ moves a tensor from a GPU to the CPU."""
    if func._opname == "copy_":
        return args[0].device.type == "cpu" and args[1].device.type != "cpu"
    return args[0].device.type != "cpu" and torch.device(kwargs.get("device") or args[0].device).type == "cpu"


def launchers() -> dict:
    """The :class:`~blockdpr_kernels.launch.Launcher` of each kernel of :func:`kernels`, by name: every launch
    of this package goes through one of them."""
    from . import conv
    return {"fwd": conv._FWD, "dgrad": conv._DGRAD, "wgrad": conv._WGRAD}


@contextlib.contextmanager
def record_work():
    """Count the torch ops and kernel launches inside the block (see :class:`Work`). Each kernel
    launch runs with the op counter off, so the interpreter's or the autotuner's own tensor work
    is not counted."""
    work = Work()
    patched = []
    for name, launcher in launchers().items():
        def launch(*args, _name=name, _launch=launcher.launch, **kwargs):
            work.launches[_name] += 1
            with _disable_current_modes():
                return _launch(*args, **kwargs)
        launcher.launch = launch  # the instance attribute wins over the method
        patched.append(launcher)
    readers = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}  # read memory without an op
    for name, read in readers.items():
        def counted(self, *args, _name=name, _read=read, **kwargs):
            work.syncs[_name] += 1
            return _read(self, *args, **kwargs)
        setattr(torch.Tensor, name, counted)
    try:
        with _OpCounter(work):
            yield work
    finally:
        for name, read in readers.items():
            setattr(torch.Tensor, name, read)
        for launcher in patched:
            del launcher.launch
