"""Test setup: kernels run on CUDA tensors when a GPU is present, else through the Triton
interpreter on CPU tensors. TRITON_INTERPRET must be set before triton is imported."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastres.ops as ops  # noqa: E402  (after TRITON_INTERPRET is set)
from helpers import DEVICE  # noqa: E402


def pytest_configure(config):
    # Triton 3.6's interpreter converts 1-element arrays with int(): numpy < 2.4 warns each time.
    config.addinivalue_line("filterwarnings",
                            "ignore:Conversion of an array with ndim > 0:DeprecationWarning")


@pytest.fixture(params=["triton", "pytorch"])
def path(request, monkeypatch):
    """Run a test twice: on the Triton kernels, and on the plain-PyTorch CPU path."""
    if request.param == "pytorch":
        if DEVICE != "cpu":
            pytest.skip("the plain-PyTorch path serves CPU tensors only")
        monkeypatch.setattr(ops, "uses_triton", lambda t: False)
    return request.param
