"""``fastres::conv_dgrad``: the input gradient of a conv, dx = conv_transpose(dy, w), on the
Triton dgrad kernel. dy (N, K, P, Q) and dx (N, C, H, W) channels_last; w the conv weight
(K, C/groups, R, S), read OHWI."""
from typing import List

import torch

from fastres.kernels.conv import kernel_weight
from fastres.kernels.conv_bwd import conv_dgrad as launch_dgrad
from fastres.ops.common import CL, cl


@torch.library.custom_op("fastres::conv_dgrad", mutates_args=())
def conv_dgrad(dy: torch.Tensor, w: torch.Tensor, x_shape: List[int], stride: List[int],
               padding: List[int], dilation: List[int], groups: int) -> torch.Tensor:
    return launch_dgrad(cl(dy), kernel_weight(w), x_shape, stride=stride, padding=padding,
                        dilation=dilation, groups=groups)


@conv_dgrad.register_fake
def _(dy, w, x_shape, stride, padding, dilation, groups):
    return dy.new_empty(x_shape).contiguous(memory_format=CL)
