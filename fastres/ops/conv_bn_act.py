"""``fastres::conv_bn_act``: an eval-mode conv + BatchNorm (+ projection shortcut) (+ residual)
(+ ReLU) in one kernel launch. On NCHW-shaped tensors:

    y = relu?( bn(conv(x, weight) + conv_bias)
               + bn_sc(conv1x1(shortcut, sc_weight, sc_stride))
               + pad_c(residual[:, :, ::res_step, ::res_step], res_off) )

with ``bn(t) = (t - mean) * rsqrt(var + eps) * bn_weight + bn_bias`` per output channel from
the live running statistics, computed in fp32 in the kernel's epilogue (nothing is folded
into the weights, nothing is cached). The projection shortcut has its own BatchNorm and its
own accumulator. Activations are read channels_last, weights OHWI (``kernel_weight``: free for
a channels_last weight); y is channels_last in x's dtype.

No autograd: ``fastres.fused`` sends an eval forward that records autograd (saliency,
penalties, double backward) through the modules op by op, which is exact to any order.
"""
from typing import List, Optional

import torch

from fastres.kernels.conv import BNParams, conv_fused, kernel_weight
from fastres.ops.common import CL, conv_out_shape


# Defined with torch.library.Library rather than custom_op: the eval forward's hot path then
# reaches ``conv_bn_act`` straight from the dispatcher (custom_op adds about a dozen Python
# calls a launch for its autograd wrapper, which this op does not have).
_LIB = torch.library.Library("fastres", "FRAGMENT")
_LIB.define(
    "conv_bn_act(Tensor x, Tensor weight, Tensor? conv_bias, Tensor? bn_weight, "
    "Tensor? bn_bias, Tensor mean, Tensor var, float eps, Tensor? residual, Tensor? shortcut, "
    "Tensor? sc_weight, Tensor? sc_bn_weight, Tensor? sc_bn_bias, Tensor? sc_mean, "
    "Tensor? sc_var, float sc_eps, SymInt[] stride, SymInt[] padding, SymInt[] dilation, "
    "SymInt groups, bool relu, SymInt res_step, SymInt res_off, SymInt sc_stride) -> Tensor")


def conv_bn_act(x: torch.Tensor, weight: torch.Tensor, conv_bias: Optional[torch.Tensor],
                bn_weight: Optional[torch.Tensor], bn_bias: Optional[torch.Tensor],
                mean: torch.Tensor, var: torch.Tensor, eps: float,
                residual: Optional[torch.Tensor], shortcut: Optional[torch.Tensor],
                sc_weight: Optional[torch.Tensor], sc_bn_weight: Optional[torch.Tensor],
                sc_bn_bias: Optional[torch.Tensor], sc_mean: Optional[torch.Tensor],
                sc_var: Optional[torch.Tensor], sc_eps: float, stride: List[int],
                padding: List[int], dilation: List[int], groups: int, relu: bool,
                res_step: int, res_off: int, sc_stride: int) -> torch.Tensor:
    sc_bn = BNParams(sc_bn_weight, sc_bn_bias, sc_mean, sc_var, sc_eps) \
        if shortcut is not None else None
    if residual is not None:
        residual = residual.contiguous(memory_format=CL)
    if shortcut is not None:
        shortcut = shortcut.contiguous(memory_format=CL)
    return conv_fused(
        x.contiguous(memory_format=CL), kernel_weight(weight), stride=stride, padding=padding,
        dilation=dilation, groups=groups, relu=relu, conv_bias=conv_bias,
        bn=BNParams(bn_weight, bn_bias, mean, var, eps), residual=residual,
        res_step=res_step, res_off=res_off, shortcut=shortcut,
        shortcut_w=kernel_weight(sc_weight) if shortcut is not None else None,
        shortcut_stride=sc_stride, shortcut_bn=sc_bn)


for _device in ("CPU", "CUDA"):
    _LIB.impl("conv_bn_act", conv_bn_act, _device)


@torch.library.register_fake("fastres::conv_bn_act")
def _(x, weight, conv_bias, bn_weight, bn_bias, mean, var, eps, residual, shortcut,
      sc_weight, sc_bn_weight, sc_bn_bias, sc_mean, sc_var, sc_eps, stride, padding, dilation,
      groups, relu, res_step, res_off, sc_stride):
    geometry = _Geometry(weight, stride, padding, dilation)
    return x.new_empty(conv_out_shape(x, geometry)).contiguous(memory_format=CL)


class _Geometry:
    """A conv's integers, shaped like an nn.Conv2d for ``conv_out_shape``."""

    def __init__(self, weight, stride, padding, dilation):
        self.out_channels, self.kernel_size = weight.shape[0], tuple(weight.shape[2:])
        self.stride, self.padding, self.dilation = stride, padding, dilation
