"""Training-mode conv + BatchNorm as PyTorch custom ops over the Triton kernels.

A conv + BN (+ residual / projection shortcut) (+ ReLU) in train mode is three ops:

  ``fastres::conv_train(x, w)      -> (raw, merged)``  raw = conv(x, w) (no bias), merged =
        per-channel (count, mean, M2) of raw (fp32, (3, C)), from the conv epilogue.
        Backward: dgrad and wgrad kernels.
  ``fastres::bn_stats(merged, ...) -> stats``          merges (W, 3, C) per-rank partials
        (W = 1 without synchronized BN) into stats = (mean, invstd, count), updating
        running_mean / running_var in place exactly like nn.BatchNorm2d. Not differentiable:
        bn_act's backward is the full BN backward, through mean and var.
  ``fastres::bn_act_train(raw, stats, gamma, beta, ...) -> y``  y = relu?(bn(raw)
        (+ bn2(raw2)) (+ residual)). Backward: dReLU + dBN reductions, dx (and dx2, and the
        residual's gradient dz), all-reduced over ``group_name`` for synchronized BN.

The backward kernels are ops too (``fastres::conv_dgrad``, ``conv_wgrad``, ``bn_bwd_reduce``,
``bn_bwd_dx``), so AOTAutograd / torch.compile can trace the backward through their fake
impls. Synchronized BN's collectives (``torch.distributed``) are eager-only.

Activations are NCHW-shaped and made channels_last-dense (a no-op when they are); w is in
the kernel layout (R*S*C_g, K).
These ops always run the Triton kernels (on CPU: through the interpreter); which path a
module takes is decided by ``fastres.ops.uses_triton``.
"""
from typing import List, Optional

import torch
import torch.distributed as dist

from fastres.kernels import bn as bn_kernels
from fastres.kernels.conv import INT32_SAFE, conv_fused, out_size
from fastres.kernels.conv_bwd import conv_dgrad, conv_wgrad

CL = torch.channels_last


def _allow_tf32() -> bool:
    return torch.backends.cudnn.allow_tf32


def _cl(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The kernels' layout: NCHW-shaped, channels_last-dense (a no-op when it already is)."""
    return t.contiguous(memory_format=CL) if t is not None else None


@torch.library.custom_op("fastres::conv_train", mutates_args=())
def conv_train(x: torch.Tensor, w: torch.Tensor, kernel_size: List[int], stride: List[int],
               padding: List[int], dilation: List[int],
               groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    raw, partials = conv_fused(_cl(x), w.contiguous(), None, kernel_size=kernel_size, stride=stride,
                               padding=padding, dilation=dilation, groups=groups, relu=False,
                               allow_tf32=_allow_tf32(), with_stats=True)
    merged, _ = bn_kernels.bn_merge(partials)
    return raw, merged


@conv_train.register_fake
def _(x, w, kernel_size, stride, padding, dilation, groups):
    n, _, h, wd = x.shape
    p = out_size(h, kernel_size[0], stride[0], padding[0], dilation[0])
    q = out_size(wd, kernel_size[1], stride[1], padding[1], dilation[1])
    k = w.shape[1]
    raw = x.new_empty((n, k, p, q)).contiguous(memory_format=CL)
    return raw, x.new_empty((3, k), dtype=torch.float32)


def _conv_setup(ctx, inputs, output):
    x, w = inputs[:2]
    ctx.save_for_backward(x, w)
    ctx.conv = dict(zip(("kernel_size", "stride", "padding", "dilation", "groups"), inputs[2:]))
    ctx.mark_non_differentiable(output[1])


def _conv_backward(ctx, d_raw, _d_merged):
    x, w = ctx.saved_tensors
    d_raw = _cl(d_raw.to(x.dtype))
    geo = list(ctx.conv.values())
    dx = dw = None
    if ctx.needs_input_grad[0]:
        dx = torch.ops.fastres.conv_dgrad(d_raw, w, list(x.shape), *geo)
    if ctx.needs_input_grad[1]:
        dw = torch.ops.fastres.conv_wgrad(x, d_raw, *geo).to(w.dtype)
    return dx, dw, None, None, None, None, None


conv_train.register_autograd(_conv_backward, setup_context=_conv_setup)


@torch.library.custom_op("fastres::conv_dgrad", mutates_args=())
def conv_dgrad_op(dy: torch.Tensor, w: torch.Tensor, x_shape: List[int],
                  kernel_size: List[int], stride: List[int], padding: List[int],
                  dilation: List[int], groups: int) -> torch.Tensor:
    return conv_dgrad(_cl(dy), w.contiguous(), x_shape, kernel_size=kernel_size, stride=stride,
                      padding=padding, dilation=dilation, groups=groups,
                      allow_tf32=_allow_tf32())


@conv_dgrad_op.register_fake
def _(dy, w, x_shape, kernel_size, stride, padding, dilation, groups):
    return dy.new_empty(x_shape).contiguous(memory_format=CL)


@torch.library.custom_op("fastres::conv_wgrad", mutates_args=())
def conv_wgrad_op(x: torch.Tensor, dy: torch.Tensor, kernel_size: List[int],
                  stride: List[int], padding: List[int], dilation: List[int],
                  groups: int) -> torch.Tensor:
    return conv_wgrad(_cl(x), _cl(dy), kernel_size=kernel_size, stride=stride, padding=padding,
                      dilation=dilation, groups=groups, allow_tf32=_allow_tf32())


@conv_wgrad_op.register_fake
def _(x, dy, kernel_size, stride, padding, dilation, groups):
    rows = kernel_size[0] * kernel_size[1] * x.shape[1] // groups
    return x.new_empty((rows, dy.shape[1]), dtype=torch.float32)


@torch.library.custom_op("fastres::bn_stats", mutates_args=("running_mean", "running_var"))
def bn_stats(merged: torch.Tensor, eps: float, momentum: Optional[float],
             running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
             num_batches_tracked: Optional[torch.Tensor]) -> torch.Tensor:
    partials = merged.transpose(0, 1).contiguous()  # (W, 3, C) -> (3, W, C)
    _, stats = bn_kernels.bn_merge(partials, eps, running_mean, running_var,
                                   num_batches_tracked, momentum)
    return stats


@bn_stats.register_fake
def _(merged, eps, momentum, running_mean, running_var, num_batches_tracked):
    return merged.new_empty((3, merged.shape[2]))


@torch.library.custom_op("fastres::bn_act_train", mutates_args=())
def bn_act_train(raw: torch.Tensor, stats: torch.Tensor, weight: Optional[torch.Tensor],
                 bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                 raw2: Optional[torch.Tensor], stats2: Optional[torch.Tensor],
                 weight2: Optional[torch.Tensor], bias2: Optional[torch.Tensor], relu: bool,
                 res_step: int, res_off: int, group_name: Optional[str]) -> torch.Tensor:
    shortcut = (_cl(raw2), stats2, weight2, bias2) if raw2 is not None else None
    return bn_kernels.bn_act(_cl(raw), stats, weight, bias, relu=relu, shortcut=shortcut,
                             residual=_cl(residual), res_step=res_step, res_off=res_off,
                             big=_big(raw, residual))


@bn_act_train.register_fake
def _(raw, stats, weight, bias, residual, raw2, stats2, weight2, bias2, relu, res_step,
      res_off, group_name):
    return torch.empty_like(raw, memory_format=CL)


def _big(*tensors) -> bool:
    return max(t.numel() for t in tensors if t is not None) > INT32_SAFE


def _bn_act_setup(ctx, inputs, output):
    raw, stats, weight, _, residual, raw2, stats2, weight2 = inputs[:8]
    ctx.save_for_backward(raw, stats, weight, raw2, stats2, weight2, output)
    ctx.relu, ctx.res_step, ctx.res_off, ctx.group_name = inputs[9:]
    ctx.res_shape = residual.shape if residual is not None else None


def _residual_grad(dz, shape, step, off):
    """Gradient of pad_c(res[:, :, ::step, ::step], off) with respect to res."""
    if step == 1 and off == 0 and tuple(shape) == tuple(dz.shape):
        return dz
    d_res = dz.new_zeros(shape).contiguous(memory_format=CL)
    d_res[:, :, ::step, ::step] = dz[:, off:off + shape[1]]
    return d_res


@torch.library.custom_op("fastres::bn_bwd_reduce", mutates_args=())
def bn_bwd_reduce_op(dy: torch.Tensor, y: torch.Tensor, raw: torch.Tensor,
                     stats: torch.Tensor, raw2: Optional[torch.Tensor],
                     stats2: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    return bn_kernels.bn_bwd_reduce(_cl(dy), _cl(y), _cl(raw), stats, _cl(raw2), stats2,
                                    relu=relu, big=_big(raw))


@bn_bwd_reduce_op.register_fake
def _(dy, y, raw, stats, raw2, stats2, relu):
    return raw.new_empty((3 if raw2 is not None else 2, raw.shape[1]), dtype=torch.float32)


@torch.library.custom_op("fastres::bn_bwd_dx", mutates_args=())
def bn_bwd_dx_op(dy: torch.Tensor, y: torch.Tensor, raw: torch.Tensor, stats: torch.Tensor,
                 weight: Optional[torch.Tensor], sums: torch.Tensor,
                 raw2: Optional[torch.Tensor], stats2: Optional[torch.Tensor],
                 weight2: Optional[torch.Tensor], relu: bool,
                 store_dz: bool) -> List[torch.Tensor]:
    """[dx] + [dx2 if raw2 is given] + [dz if store_dz]."""
    shortcut = (_cl(raw2), stats2, weight2) if raw2 is not None else None
    dx, dx2, dz = bn_kernels.bn_bwd_dx(_cl(dy), _cl(y), _cl(raw), stats, weight, sums,
                                       relu=relu, shortcut=shortcut, store_dz=store_dz,
                                       big=_big(raw))
    return [t for t in (dx, dx2, dz) if t is not None]


@bn_bwd_dx_op.register_fake
def _(dy, y, raw, stats, weight, sums, raw2, stats2, weight2, relu, store_dz):
    return [torch.empty_like(raw, memory_format=CL) for _ in range(1 + (raw2 is not None)
                                                                   + store_dz)]


def _bn_act_backward(ctx, dy):
    raw, stats, weight, raw2, stats2, weight2, y = ctx.saved_tensors
    dy = _cl(dy.to(raw.dtype))
    sums = torch.ops.fastres.bn_bwd_reduce(dy, y, raw, stats, raw2, stats2, ctx.relu)
    local = sums.clone() if ctx.group_name is not None else sums  # param grads stay local
    if ctx.group_name is not None:
        dist.all_reduce(sums, group=_group(ctx.group_name))
    needs = ctx.needs_input_grad
    grads = iter(torch.ops.fastres.bn_bwd_dx(dy, y, raw, stats, weight, sums, raw2, stats2,
                                             weight2, ctx.relu, needs[4]))
    dx = next(grads)
    dx2 = next(grads) if raw2 is not None else None
    dz = next(grads) if needs[4] else None
    cast = lambda t, like: t.to(like.dtype) if like is not None else None
    d_res = _residual_grad(dz, ctx.res_shape, ctx.res_step, ctx.res_off) if needs[4] else None
    d_bias = cast(local[0], weight)
    return (dx, None, cast(local[1], weight), d_bias, d_res,
            dx2, None, cast(local[2], weight2) if raw2 is not None else None,
            cast(local[0], weight2) if raw2 is not None else None,
            None, None, None, None)


bn_act_train.register_autograd(_bn_act_backward, setup_context=_bn_act_setup)


def _group(name: str):
    return dist.distributed_c10d._resolve_process_group(name)
