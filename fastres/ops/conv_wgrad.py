"""``fastres::conv_wgrad``: the weight gradient of a conv, dw[k, c, r, s] = sum over output
pixels of x[.., tap (r, s), c] * dy[.., k], on the Triton wgrad kernel (split over pixels,
partials summed in a fixed order). x (N, C, H, W) and dy (N, K, P, Q) channels_last, one
dtype; dw (K, C/groups, R, S) fp32, channels_last (OHWI) memory."""
from typing import List

import torch

from fastres.kernels.conv_bwd import conv_wgrad as launch_wgrad
from fastres.ops.common import CL, cl


@torch.library.custom_op("fastres::conv_wgrad", mutates_args=())
def conv_wgrad(x: torch.Tensor, dy: torch.Tensor, kernel_size: List[int], stride: List[int],
               padding: List[int], dilation: List[int], groups: int) -> torch.Tensor:
    return launch_wgrad(cl(x), cl(dy), kernel_size=kernel_size, stride=stride, padding=padding,
                        dilation=dilation, groups=groups)


@conv_wgrad.register_fake
def _(x, dy, kernel_size, stride, padding, dilation, groups):
    shape = (dy.shape[1], x.shape[1] // groups, kernel_size[0], kernel_size[1])
    return x.new_empty(shape, dtype=torch.float32).contiguous(memory_format=CL)
