"""The backward reductions of ``bn_act_train`` (y = relu?(bn(raw) (+ bn2(raw2)) (+ res))):

``fastres::bn_bwd_reduce(dy, y, raw, stats, raw2, stats2) -> sums``: per channel, with
dz = dy * (y > 0 if relu), sums = (sum dz, sum dz * xhat (, sum dz * xhat2)), fp32.
``fastres::bn_bwd_dx(...) -> [dx] + [dx2] + [dz]``: BN's input gradients from those sums,
dx = invstd * gamma * (dz - (sums[0] + xhat * sums[1]) / count), and dz itself for the
residual's gradient when asked. Rows of stats and sums: ``fastres.kernels.bn_rows``.
"""
from typing import List, Optional

import torch

from fastres.kernels import bn as bn_kernels
from fastres.ops.common import CL, cl


@torch.library.custom_op("fastres::bn_bwd_reduce", mutates_args=())
def bn_bwd_reduce(dy: torch.Tensor, y: torch.Tensor, raw: torch.Tensor,
                     stats: torch.Tensor, raw2: Optional[torch.Tensor],
                     stats2: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    return bn_kernels.bn_bwd_reduce(cl(dy), cl(y), cl(raw), stats, cl(raw2), stats2,
                                    relu=relu)


@bn_bwd_reduce.register_fake
def _(dy, y, raw, stats, raw2, stats2, relu):
    return raw.new_empty((3 if raw2 is not None else 2, raw.shape[1]), dtype=torch.float32)


@torch.library.custom_op("fastres::bn_bwd_dx", mutates_args=())
def bn_bwd_dx(dy: torch.Tensor, y: torch.Tensor, raw: torch.Tensor, stats: torch.Tensor,
                 weight: Optional[torch.Tensor], sums: torch.Tensor,
                 raw2: Optional[torch.Tensor], stats2: Optional[torch.Tensor],
                 weight2: Optional[torch.Tensor], relu: bool,
                 store_dz: bool) -> List[torch.Tensor]:
    """[dx] + [dx2 if raw2 is given] + [dz if store_dz]."""
    shortcut = (cl(raw2), stats2, weight2) if raw2 is not None else None
    dx, dx2, dz = bn_kernels.bn_bwd_dx(cl(dy), cl(y), cl(raw), stats, weight, sums,
                                       relu=relu, shortcut=shortcut, store_dz=store_dz)
    return [t for t in (dx, dx2, dz) if t is not None]


@bn_bwd_dx.register_fake
def _(dy, y, raw, stats, weight, sums, raw2, stats2, weight2, relu, store_dz):
    return [torch.empty_like(raw, memory_format=CL) for _ in range(1 + (raw2 is not None)
                                                                   + store_dz)]
