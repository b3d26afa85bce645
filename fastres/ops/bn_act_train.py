"""``fastres::bn_act_train``: batch-statistics BatchNorm (+ the projection shortcut's BN)
(+ residual) (+ ReLU) in one elementwise pass, on NCHW-shaped channels_last tensors:

    y = relu?( (raw - mean) * invstd * weight + bias
               + (raw2 - mean2) * invstd2 * weight2 + bias2        (projection shortcut)
               + pad_c(residual[:, :, ::res_step, ::res_step], res_off) )

stats = (mean, invstd, count) from ``bn_stats``. Backward: ``bn_bwd_reduce`` and
``bn_bwd_dx`` (the sums all-reduced over ``group_name`` for synchronized BN).
"""
from typing import Optional

import torch
import torch.distributed as dist

from fastres.kernels import bn as bn_kernels
from fastres.kernels.bn_rows import SUMS
from fastres.ops import bn_bwd  # noqa: F401  (registers the backward ops)
from fastres.ops.common import CL, cl, no_double_backward


@torch.library.custom_op("fastres::bn_act_train", mutates_args=())
def bn_act_train(raw: torch.Tensor, stats: torch.Tensor, weight: Optional[torch.Tensor],
                 bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                 raw2: Optional[torch.Tensor], stats2: Optional[torch.Tensor],
                 weight2: Optional[torch.Tensor], bias2: Optional[torch.Tensor], relu: bool,
                 res_step: int, res_off: int, group_name: Optional[str]) -> torch.Tensor:
    shortcut = (cl(raw2), stats2, weight2, bias2) if raw2 is not None else None
    return bn_kernels.bn_act(cl(raw), stats, weight, bias, relu=relu, shortcut=shortcut,
                             residual=cl(residual), res_step=res_step, res_off=res_off)


@bn_act_train.register_fake
def _(raw, stats, weight, bias, residual, raw2, stats2, weight2, bias2, relu, res_step,
      res_off, group_name):
    return torch.empty_like(raw, memory_format=CL)


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


def _bn_act_backward(ctx, dy):
    no_double_backward()
    raw, stats, weight, raw2, stats2, weight2, y = ctx.saved_tensors
    dy = cl(dy.to(raw.dtype))
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
    d_bias = cast(local[SUMS.DZ], weight)
    return (dx, None, cast(local[SUMS.DZ_XHAT], weight), d_bias, d_res,
            dx2, None, cast(local[SUMS.DZ_XHAT2], weight2) if raw2 is not None else None,
            cast(local[SUMS.DZ], weight2) if raw2 is not None else None,
            None, None, None, None)


bn_act_train.register_autograd(_bn_act_backward, setup_context=_bn_act_setup)


def _group(name: str):
    return dist.distributed_c10d._resolve_process_group(name)
