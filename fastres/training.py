"""Train-mode conv + BatchNorm on the Triton training ops (``fastres.ops``).

Per conv + BatchNorm: one conv launch whose epilogue also reduces the BN statistics, a tiny
statistics merge (which updates the running buffers exactly like ``nn.BatchNorm2d``), and one
elementwise launch for BN-apply (+ projection-shortcut BN) (+ residual) (+ ReLU). Backward
runs on Triton kernels too (dReLU/dBN reductions, dgrad, wgrad).

Synchronized BatchNorm: ``sync_batchnorm(model, group)`` makes every BN of the model's fused
blocks use statistics over all ranks of ``group`` (as ``nn.SyncBatchNorm``): per-rank
(count, mean, M2) are all-gathered and merged before finalize, and the backward's two
per-channel sums are all-reduced.
"""
import torch
import torch.distributed as dist
import torch.nn as nn

from fastres import ops  # noqa: F401  (registers torch.ops.fastres.*)

SYNC_ATTR = "fastres_process_group"


def check_sync_runs(*bns) -> None:
    """Synchronized BN exists only on the training kernels: refuse the op-by-op path for a
    batch-statistics BN that ``sync_batchnorm`` marked, instead of silently not syncing."""
    for bn in bns:
        if getattr(bn, SYNC_ATTR, None) is not None and getattr(bn, "training", False):
            raise NotImplementedError(
                "fastres: synchronized BatchNorm runs on the Triton kernels only (CUDA tensors, "
                "or CPU tensors with TRITON_INTERPRET=1) and fused blocks; this forward would "
                "run op by op and not synchronize")


def _batch_stats(merged: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """(mean, invstd, count) of the batch (over all ranks for synchronized BN); updates the
    running statistics as nn.BatchNorm2d does."""
    group = getattr(bn, SYNC_ATTR, None)
    if group is not None:
        gathered = [torch.empty_like(merged) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, merged, group=group)
        merged = torch.stack(gathered)
    else:
        merged = merged.unsqueeze(0)
    update = bn.training and bn.track_running_stats and bn.running_mean is not None
    if update and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    if update and bn.momentum is None and bn.num_batches_tracked is None:
        raise ValueError("fastres: momentum=None needs num_batches_tracked")
    return torch.ops.fastres.bn_stats(
        merged, bn.eps, bn.momentum if update else 0.0,
        bn.running_mean if update else None, bn.running_var if update else None,
        bn.num_batches_tracked if update and bn.momentum is None else None)


def _conv(x: torch.Tensor, weight: torch.Tensor, conv: nn.Conv2d):
    raw, merged = torch.ops.fastres.conv_train(x, weight, list(conv.stride), list(conv.padding),
                                               list(conv.dilation), conv.groups)
    return raw, merged, raw.shape[0] * raw.shape[2] * raw.shape[3]


def _check_count(count: int, bn: nn.BatchNorm2d, shape) -> None:
    if count <= 1 and getattr(bn, SYNC_ATTR, None) is None:
        raise ValueError(f"Expected more than 1 value per channel when training, got input "
                         f"size {torch.Size(shape)}")


def conv_bn(x, weight, conv, bn, relu, residual=None, res_step=1, res_off=0, projection=None,
            shortcut=None):
    """relu?(bn(conv(x)) (+ proj_bn(proj_conv(shortcut))) (+ pad_c(residual[::step], off)))
    with batch-statistics BatchNorm, on the training kernels. ``fastres.fused.conv_bn_act``
    has checked the input and cast it (and ``weight``, conv.weight or its autocast copy)."""
    raw, merged, count = _conv(x, weight, conv)
    _check_count(count, bn, raw.shape)
    stats = _batch_stats(merged, bn)
    raw2 = stats2 = weight2 = bias2 = None
    if projection is not None:
        pconv, pbn = projection
        raw2, merged2, _ = _conv(shortcut, pconv.weight.to(x.dtype), pconv)
        if raw2.shape != raw.shape:
            raise ValueError(f"fastres: projection shortcut output {tuple(raw2.shape)} does "
                             f"not match the conv output {tuple(raw.shape)}")
        stats2 = _batch_stats(merged2, pbn)
        weight2, bias2 = pbn.weight, pbn.bias
    group = getattr(bn, SYNC_ATTR, None)
    return torch.ops.fastres.bn_act_train(
        raw, stats, bn.weight, bn.bias, residual, raw2, stats2, weight2, bias2, relu,
        res_step, res_off, group.group_name if group is not None else None)


def sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """Synchronize the batch statistics of every BatchNorm2d in ``model`` over
    ``process_group`` (default: the world) when the fused training kernels run them, as
    ``nn.SyncBatchNorm`` does. ``process_group=None`` after ``dist.init_process_group``
    means the default group. Returns the model (changed in place)."""
    group = process_group if process_group is not None else dist.group.WORLD
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            setattr(m, SYNC_ATTR, group)
    return model
