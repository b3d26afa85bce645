"""``fastres::bn_stats``: merge per-rank BatchNorm partials into the batch statistics.

merged (W, 3, C) holds each rank's per-channel (count, mean, M2) (W = 1 without synchronized
BN); the result is stats (3, C) = (mean, invstd, count), merged with Chan's formula in a fixed
order, and running_mean / running_var are updated in place exactly like nn.BatchNorm2d
(momentum, or the cumulative average when momentum is None; unbiased running variance). Not
differentiable: ``bn_act_train``'s backward is the full BN backward, through mean and var.
"""
from typing import Optional

import torch

from fastres.kernels import bn as bn_kernels


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
