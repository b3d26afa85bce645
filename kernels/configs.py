"""Block-size configurations of the conv kernel and the heuristic that picks one.

A config is keyed on a shape *bucket* (powers of two of the GEMM sizes), never on the exact
batch size, so a new batch size reuses an already compiled kernel. ``ALL_CONFIGS`` is the
closed set the heuristic can return on a GPU: ``python -m fastres.aot`` compiles every one
of them ahead of time for sm_90a.
"""
import os
from dataclasses import dataclass


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class ConvConfig:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def kwargs(self) -> dict:
        return dict(BLOCK_M=self.BLOCK_M, BLOCK_N=self.BLOCK_N, BLOCK_K=self.BLOCK_K,
                    GROUP_M=self.GROUP_M, num_warps=self.num_warps, num_stages=self.num_stages)


def _pow2_at_least(n: int, lo: int, hi: int) -> int:
    p = lo
    while p < n and p < hi:
        p *= 2
    return p


def pick_config(m: int, n_per_group: int, c_per_group: int) -> ConvConfig:
    """Block sizes for a conv whose GEMM is M=N*P*Q pixels, N=n_per_group output channels,
    K chunks of c_per_group input channels.

    Tensor cores need every dot dimension >= 16. Under the interpreter the cost is per
    program and per op, so blocks are as large as the problem allows.
    """
    bn = _pow2_at_least(n_per_group, 16, 128)
    bk = _pow2_at_least(c_per_group, 16, 64)
    if interpreting():
        return ConvConfig(BLOCK_M=_pow2_at_least(m, 16, 128), BLOCK_N=bn, BLOCK_K=bk,
                          num_warps=1, num_stages=1)
    bm = 128 if m >= 128 * 64 else 64
    warps = 8 if bm * bn >= 128 * 128 else 4
    return ConvConfig(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
                      num_stages=4 if bk <= 32 else 3)


def all_configs() -> list:
    """Every config ``pick_config`` can return on a GPU."""
    out = []
    for bm in (64, 128):
        for bn in (16, 32, 64, 128):
            for bk in (16, 32, 64):
                warps = 8 if bm * bn >= 128 * 128 else 4
                out.append(ConvConfig(bm, bn, bk, num_warps=warps,
                                      num_stages=4 if bk <= 32 else 3))
    return out
