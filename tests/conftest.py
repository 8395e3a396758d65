"""Shared pytest setup.

Without a GPU, run Triton kernels under the Triton interpreter (on CPU tensors). This must
happen before anything imports triton, so it lives here rather than in a test module.
Code that does not ask for the Triton backend explicitly is unaffected (it uses the
plain-torch path on CPU).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402  (after the TRITON_INTERPRET set-up above)

from tiny import write_tiny_cifar  # noqa: E402


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory):
    """A tiny synthetic cifar-10-batches-py directory (see tests/tiny.py)."""
    return write_tiny_cifar(tmp_path_factory.mktemp("data") / "cifar-10-batches-py")


@pytest.fixture
def float64():
    """Train in float64: a grouped conv sums in another order than T plain convs, and in float32 that
    difference (~1e-7) can flip which weight falls below the threshold H; in float64 it cannot."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
