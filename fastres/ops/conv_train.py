"""``fastres::conv_train``: a train-mode conv whose epilogue also reduces BatchNorm
statistics. ``conv_train(x, w) -> (raw, merged)``: raw = conv(x, w) (no bias; N, K, P, Q
channels_last in x's dtype), merged = per-channel (count, mean, M2) of raw, fp32 (3, K), the
per-tile partials merged in a fixed order. Backward: ``conv_dgrad`` and ``conv_wgrad``."""
from typing import List

import torch

from fastres.kernels import bn as bn_kernels
from fastres.kernels.conv import conv_fused, kernel_weight
from fastres.ops.common import CL, cl, conv_out_shape, no_double_backward
from fastres.ops.conv_bn_act import _Geometry


@torch.library.custom_op("fastres::conv_train", mutates_args=())
def conv_train(x: torch.Tensor, w: torch.Tensor, stride: List[int], padding: List[int],
               dilation: List[int], groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    raw, partials = conv_fused(cl(x), kernel_weight(w), stride=stride, padding=padding,
                               dilation=dilation, groups=groups, relu=False, with_stats=True)
    merged, _ = bn_kernels.bn_merge(partials)
    return raw, merged


@conv_train.register_fake
def _(x, w, stride, padding, dilation, groups):
    shape = conv_out_shape(x, _Geometry(w, stride, padding, dilation))
    raw = x.new_empty(shape).contiguous(memory_format=CL)
    return raw, x.new_empty((3, shape[1]), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, w, *geometry = inputs
    ctx.save_for_backward(x, w)
    ctx.geometry = geometry
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, d_raw, _d_merged):
    no_double_backward()
    x, w = ctx.saved_tensors
    d_raw = cl(d_raw.to(x.dtype))
    dx = dw = None
    if ctx.needs_input_grad[0]:
        dx = torch.ops.fastres.conv_dgrad(d_raw, w, list(x.shape), *ctx.geometry)
    if ctx.needs_input_grad[1]:
        dw = torch.ops.fastres.conv_wgrad(x, d_raw, list(w.shape[2:]), *ctx.geometry)
        dw = dw.to(w.dtype)
    return dx, dw, None, None, None, None


conv_train.register_autograd(_backward, setup_context=_setup_context)
