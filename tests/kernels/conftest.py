"""Fixtures shared by the blockdpr_kernels tests."""
import pytest
import torch


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
