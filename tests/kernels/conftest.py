"""Fixtures shared by the blockdpr_kernels tests.

Self-contained, so tests/kernels also runs alone against an installed blockdpr_kernels (torch, triton,
pytest and hypothesis only; ``.ci/run`` does so with ``--confcutdir tests/kernels``, skipping
tests/conftest.py and its numpy): without a GPU the Triton kernels run under the interpreter, which
must be switched on before anything imports triton (tests/conftest.py does the same for the whole suite).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def full_fp32():
    """fp32 comparisons at 1e-4 need full fp32 on a GPU, in the kernels and in the reference.

    Saved and restored by hand rather than with ``monkeypatch.setattr``: torch's
    ``backends.cuda.matmul`` module exposes ``allow_tf32`` through ``__getattr__``, which
    newer pytest versions cannot restore at teardown (pytest 9.2: AttributeError).
    """
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
