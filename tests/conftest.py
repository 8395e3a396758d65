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
