"""Triton kernels of fastres (installed as ``fastres.kernels``).

Triton only: no ``torch.nn``, no autograd. Each kernel comes with a host launcher that takes
prepared tensors (NHWC activations, weights in the kernel's layout) and launches it.
"""
