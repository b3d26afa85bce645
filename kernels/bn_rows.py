"""The rows of the BatchNorm statistics tensors, named in this one place:

    PARTIAL  count, mean, M2 (sum of squared deviations from the mean), per channel: the
             conv epilogue's per-tile partials (3, T, C) and ``bn_merge``'s merged (3, C)
    STATS    mean, invstd = 1 / sqrt(M2 / count + eps), count: the batch statistics (3, C)
             ``bn_merge`` writes and BN-apply and the backward read
    SUMS     sum dz, sum dz * xhat, (with a projection shortcut) sum dz * xhat2: the
             backward's per-channel sums (2 or 3, C) from ``bn_bwd_reduce``

Host code indexes with the NamedTuples (``stats[STATS.INVSTD]``); kernels, which may read no
global but a ``tl.constexpr``, with their constexpr copies (``STATS_INVSTD``).
(Its own module because both ``conv.py``, whose epilogue writes the partials, and ``bn.py``,
which imports ``conv.py``, use it.)
"""
from typing import NamedTuple

import triton.language as tl


class PartialRows(NamedTuple):
    COUNT: int
    MEAN: int
    M2: int


class StatsRows(NamedTuple):
    MEAN: int
    INVSTD: int
    COUNT: int


class SumsRows(NamedTuple):
    DZ: int
    DZ_XHAT: int
    DZ_XHAT2: int


PARTIAL = PartialRows(COUNT=0, MEAN=1, M2=2)
STATS = StatsRows(MEAN=0, INVSTD=1, COUNT=2)
SUMS = SumsRows(DZ=0, DZ_XHAT=1, DZ_XHAT2=2)

PARTIAL_COUNT, PARTIAL_MEAN, PARTIAL_M2 = (tl.constexpr(row) for row in PARTIAL)
STATS_MEAN, STATS_INVSTD, STATS_COUNT = (tl.constexpr(row) for row in STATS)
SUMS_DZ, SUMS_DZ_XHAT, SUMS_DZ_XHAT2 = (tl.constexpr(row) for row in SUMS)
