"""Test setup: kernels run on CUDA tensors when a GPU is present, else through the Triton
interpreter on CPU tensors. TRITON_INTERPRET must be set before triton is imported."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
