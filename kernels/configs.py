"""Block-size configurations of the implicit-GEMM conv kernels, the heuristic that picks one per
shape bucket, and an optional measured autotune with a persistent cache.

A conv is the GEMM  (M = N*P*Q pixels) x (K = R*S*C/G) @ (K x N = output channels / G).
Its config depends on a shape *bucket*, never on the exact batch size, so a new batch size
reuses a compiled kernel:

    BLOCK_M  64 when M < SMALL_M (late stages at small batch: more tiles to fill 132 SMs), else 128;
             256 for a packed 2-byte conv (the stem: ``packed``), whose K step is one kernel row
             of 28 (s, c) pairs: twice the MMA work for an iteration's fixed cost (sm_90a issue
             ratio 0.83 -> 0.62, 2 CTAs/SM at 4 warps)
    BLOCK_N  the channels per group rounded up to a power of two, 16..N_CAP[bytes]: 128 for
             2-byte dtypes (a 128x256 tile, 8 warps, spills 88-96 B/thread with the residual
             epilogue in the sm_90a compile), 64 for fp32 (the ieee-precision dgrad spills at
             128x128); at most SHORTCUT_N_CAP = 64 with a projection shortcut, whose second
             fp32 accumulator made the bf16 128x128 tile (8 warps) spill 8-288 B/thread; at most
             64 for a 1x1 conv below the H200's ridge (``memory_bound_gemm``): a 128x128
             tile's BN/residual epilogue takes 180-241 registers (1 CTA/SM), a 128x64 tile on
             4 warps 128-164 (2-3 CTAs/SM), and a memory-bound launch needs the CTAs more
             than the reuse
    BLOCK_K  the input channels per group rounded up, 16..(128 bytes of one row: 64 bf16/fp16,
             32 fp32), the row a 128-byte shared-memory swizzle wants
    warps    8 from BLOCK_M * BLOCK_N * bytes >= 128 * 128 * 2 up (two warpgroups share the
             wgmma tile), else 4. (Earlier main loops spilled at 4 warps for 128x64 bf16 with
             int64 indexing; the loop that carries its tap and row offsets does not.)
    stages   as many as fit SMEM_BUDGET, 2..4: (BLOCK_M + BLOCK_N) * BLOCK_K * bytes each, and
             no more than the main loop's trip count + 1 (more stages only load zeros); 1x1
             convs at most 3 (96 KiB at 128x128x64: 2 CTAs fit an SM)

Every dot dimension is >= 16 and BLOCK_M * num_warps fit Hopper's wgmma (64 rows per
warpgroup), so bf16/fp16/tf32 dots lower to wgmma: ``python -m fastres.aot`` checks this for
``all_configs()``, the closed set this module can return on a GPU (heuristic and tuning
candidates alike), and that none spills or overflows shared memory.

Autotune (GPU only, opt-in): with ``FASTRES_AUTOTUNE=1``, the first launch of a bucket times
``tune_candidates`` with ``triton.testing.do_bench`` and stores the fastest in a JSON file
(``FASTRES_TUNE_CACHE``, default ``~/.cache/fastres/configs.json``), keyed on the GPU, the
dtype size, the taps R*S, the shortcut and the bucket (M rounded up to a power of two,
channels exact).
Later processes read the file, with or without ``FASTRES_AUTOTUNE``. Tune before serving:
``fastres.warmup(model, shapes)`` with the variable set runs every conv of those shapes once.

The backward kernels' tiles (``dgrad_config``, ``wgrad_blocks``) and the split-K heuristics
(``split_k``, ``wgrad_split``, fed the GPU's SM count by ``sm_count``) live here too, each
with the closed set the ahead-of-time check compiles (``all_dgrad_configs``,
``all_wgrad_blocks``).

Host cost: a launch looks its config up in a per-process memo keyed on the bucket (no
environment read, no string building). The environment is read once: ``TRITON_INTERPRET`` at
import (``INTERPRET``), ``FASTRES_AUTOTUNE`` and ``FASTRES_TUNE_CACHE`` (and the cache file)
at the first pick. ``reset()`` forgets the memo, those two settings and the loaded file: call
it after changing either variable (or the file) within a process.
"""
import functools
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

SMALL_M = 128 * 64  # below: BLOCK_M = 64
N_CAP = {2: 128, 4: 64}  # largest BLOCK_N per element size, see the module docstring
SHORTCUT_N_CAP = 64  # largest BLOCK_N with a projection shortcut (two accumulators)
SMEM_BUDGET = 192 * 1024  # bytes for the pipelined tiles; sm_90 allows 227 KiB per block
RIDGE = {2: 790e12 / 4.3e12, 4: 395e12 / 4.3e12}  # H200 FLOPs per byte: tensor peak / HBM
AUTOTUNE_ENV = "FASTRES_AUTOTUNE"
CACHE_ENV = "FASTRES_TUNE_CACHE"
MAX_SPLIT_K = 16  # split_k's largest factor
WGRAD_PROGRAMS_PER_SM = 2  # wgrad_split's target: two programs per SM

# Whether the kernels run through Triton's CPU interpreter, decided once, as Triton decides it:
# ``@triton.jit`` makes an interpreted function when TRITON_INTERPRET=1 at that moment (this
# package's import), and a later change of the variable does not change what the kernels are.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """True when the kernels run through Triton's CPU interpreter (``INTERPRET``)."""
    return INTERPRET


def _version(text: str) -> tuple:
    return tuple(int(part) for part in text.split("+")[0].split(".")[:2])


def check_interpreter_stack() -> None:
    """Triton before 3.7 interprets a loop bound with ``int()`` of a 1-element array, which
    numpy 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"): every
    kernel with a runtime loop bound would fail. Measured: Triton 3.6.0 fails with numpy
    2.4.6 and runs with 2.3.5; 3.7.1 and 3.8 run with both."""
    import numpy
    import triton
    if _version(triton.__version__) < (3, 7) and _version(numpy.__version__) >= (2, 4):
        raise RuntimeError(
            f"fastres: Triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1) cannot "
            f"run with numpy {numpy.__version__}: install numpy<2.4 (pip install 'numpy<2.4') "
            f"or Triton >= 3.7")


if INTERPRET:  # once, before any kernel runs
    check_interpreter_stack()


@dataclass(frozen=True)
class ConvConfig:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 3

    @functools.cached_property
    def kwargs(self) -> dict:
        """The launch's keyword arguments (built once; read-only)."""
        return dict(BLOCK_M=self.BLOCK_M, BLOCK_N=self.BLOCK_N, BLOCK_K=self.BLOCK_K,
                    GROUP_M=self.GROUP_M, num_warps=self.num_warps, num_stages=self.num_stages)


@dataclass(frozen=True)
class WgradBlocks:
    """wgrad's tile: BLOCK_N output channels x BLOCK_C columns (a tap's input channels, or a
    packed kernel row's (s, c) pairs), reduced over output pixels in chunks of BLOCK_M."""
    BLOCK_C: int
    BLOCK_N: int
    BLOCK_M: int
    num_warps: int = 4
    num_stages: int = 3

    @functools.cached_property
    def kwargs(self) -> dict:
        """The launch's keyword arguments (built once; read-only)."""
        return dict(BLOCK_C=self.BLOCK_C, BLOCK_N=self.BLOCK_N, BLOCK_M=self.BLOCK_M,
                    num_warps=self.num_warps, num_stages=self.num_stages)


def _pow2_at_least(n: int, lo: int, hi: int) -> int:
    p = lo
    while p < n and p < hi:
        p *= 2
    return p


def _make(bm: int, bn: int, bk: int, elem_bytes: int,
          trips: Optional[int] = None, tap_shortcut: bool = False) -> ConvConfig:
    """warps: 8 from a 128x128 2-byte tile up (64x128 fp32), else 4: a 1x1 conv's projection
    shortcut's second accumulator included (128x64 bf16 with both: 249 registers on 4 warps,
    2 CTAs/SM, against 174 on 8 warps, 1 CTA/SM), but not a 3x3's (``tap_shortcut``: the
    BasicBlock's conv2 + shortcut spilled 120 B/thread at 128x64 on 4 warps with Triton 3.6,
    so 8 warps from 128x64 up); stages: as many as fit SMEM_BUDGET, 2..4, and no more than
    the main loop's ``trips`` + 1 (a stage past the trip count only loads zeros)."""
    big = bm * bn * elem_bytes >= (128 * 64 * 2 if tap_shortcut else 128 * 128 * 2)
    stages = max(2, min(4, SMEM_BUDGET // ((bm + bn) * bk * elem_bytes)))
    if trips is not None:
        stages = max(2, min(stages, trips + 1))
    return ConvConfig(bm, bn, bk, num_warps=8 if big else 4, num_stages=stages)


def _trips(taps: int, c_per_group: int, bk: int) -> int:
    """The main loop's trip count as far as stages go: taps x channel chunks, and at most 2
    for a 1x1 conv (3 stages: 96 KiB at 128x128x64 in 2 bytes, so 2 CTAs fit an SM)."""
    trips = taps * -(-c_per_group // bk)
    return min(trips, 2) if taps == 1 else trips


def _n_cap(elem_bytes: int, shortcut: bool) -> int:
    return min(N_CAP[elem_bytes], SHORTCUT_N_CAP) if shortcut else N_CAP[elem_bytes]


def memory_bound_gemm(n_per_group: int, c_per_group: int, elem_bytes: int, taps: int,
                      stride: int = 1) -> bool:
    """A 1x1 conv whose FLOPs per byte moved sit below the H200's ridge (RIDGE), counting an
    output pixel's stride**2 * C inputs, N outputs and N residual values once each
    (2*N*C / ((stride**2 * C + 2N) * bytes)): its tiles should let 2+ CTAs share an SM rather
    than maximize reuse."""
    return taps == 1 and 2 * n_per_group * c_per_group < RIDGE[elem_bytes] * (
        stride * stride * c_per_group + 2 * n_per_group) * elem_bytes


def heuristic_config(m: int, n_per_group: int, c_per_group: int, elem_bytes: int = 4,
                     shortcut: bool = False, taps: int = 1, packed: bool = False,
                     stride: int = 1) -> ConvConfig:
    """The GPU config of a bucket, before any tuning (see the module docstring). ``packed``:
    the reduction runs over packed (s, c) rows (``conv.packs_taps``: the stem), whose K step is
    one short row: a 2-byte 256-row tile on 4 warps doubles the MMA work an iteration's fixed
    cost (barriers, descriptors) and its row bounds are spread over."""
    bn = _pow2_at_least(n_per_group, 16, _n_cap(elem_bytes, shortcut))
    if memory_bound_gemm(n_per_group, c_per_group, elem_bytes, taps, stride):
        bn = min(bn, 64)
    bk = _pow2_at_least(c_per_group, 16, 128 // elem_bytes)
    if packed and not shortcut and elem_bytes == 2 and bn <= 64 and m >= SMALL_M:
        return ConvConfig(256, bn, bk, num_warps=4, num_stages=min(4, taps + 1))
    return _make(128 if m >= SMALL_M else 64, bn, bk, elem_bytes, _trips(taps, c_per_group, bk),
                 shortcut and taps > 1)


# bucket -> config, for pick_config, dgrad_config and wgrad_blocks. M enters a bucket as
# ((m - 1).bit_length(), m >= SMALL_M): its power-of-two ceiling (tuned buckets, interpreter
# blocks) and its side of SMALL_M (the heuristic), all a config depends on.
_PICKED: dict = {}
_SETTINGS: dict = {}  # "path", "autotune": FASTRES_TUNE_CACHE and FASTRES_AUTOTUNE, read once


def reset() -> None:
    """Forget the picked configs, the tune settings and the loaded cache file: the next launch
    reads ``FASTRES_AUTOTUNE``, ``FASTRES_TUNE_CACHE`` and the file again."""
    _PICKED.clear()
    _SETTINGS.clear()
    _CACHE.clear()


def pick_config(m: int, n_per_group: int, c_per_group: int, elem_bytes: int = 4,
                taps: int = 1, launch: Optional[Callable] = None,
                shortcut: bool = False, packed: bool = False, stride: int = 1) -> ConvConfig:
    """Block sizes for a conv whose GEMM is M=N*P*Q pixels, N=n_per_group output channels,
    reduction over ``taps`` (R*S) chunks of c_per_group input channels of ``elem_bytes`` each,
    with a projection shortcut (a second accumulator) or not. ``launch(cfg)`` runs the conv
    with a given config: with it and ``FASTRES_AUTOTUNE=1`` on a GPU, an untuned bucket is
    tuned now. (``elem_bytes`` defaults to the safe 4: a 2-byte dtype gets fewer stages than
    it could.) Memoized per bucket (module docstring).

    Under the interpreter the cost is per program and per op, so blocks are as large as the
    problem allows.
    """
    key = ((m - 1).bit_length(), m >= SMALL_M, n_per_group, c_per_group, elem_bytes, taps,
           shortcut, packed, stride)
    if key in _PICKED:
        return _PICKED[key]
    cfg, final = _pick(m, n_per_group, c_per_group, elem_bytes, taps, launch, shortcut, packed,
                       stride)
    if final:
        _PICKED[key] = cfg
    return cfg


def _pick(m, n_per_group, c_per_group, elem_bytes, taps, launch, shortcut, packed, stride):
    """(config, final): not final when autotune is on but there is no ``launch`` to time, so
    a later launch of the bucket tunes it."""
    if INTERPRET:
        return ConvConfig(BLOCK_M=_pow2_at_least(m, 16, 128),
                          BLOCK_N=_pow2_at_least(n_per_group, 16, 128),
                          BLOCK_K=_pow2_at_least(c_per_group, 16, 64),
                          num_warps=1, num_stages=1), True
    key = bucket_key(m, n_per_group, c_per_group, elem_bytes, taps, shortcut, packed, stride)
    tuned = _tuned().get(key)
    if tuned is not None:
        return ConvConfig(**tuned), True
    if _settings()["autotune"]:
        if launch is not None:
            return autotune(key, tune_candidates(m, n_per_group, c_per_group, elem_bytes,
                                                 shortcut, taps, packed, stride), launch), True
        return heuristic_config(m, n_per_group, c_per_group, elem_bytes, shortcut, taps,
                                packed, stride), False
    return heuristic_config(m, n_per_group, c_per_group, elem_bytes, shortcut, taps,
                            packed, stride), True


def tune_candidates(m: int, n_per_group: int, c_per_group: int, elem_bytes: int,
                    shortcut: bool = False, taps: int = 1, packed: bool = False,
                    stride: int = 1) -> list:
    """The configs autotune times for a bucket: the heuristic's, then its neighbours in
    BLOCK_M and BLOCK_N, each no larger than the problem needs."""
    n_cap = _pow2_at_least(n_per_group, 16, _n_cap(elem_bytes, shortcut))
    k_cap = _pow2_at_least(c_per_group, 16, 128 // elem_bytes)
    trips = _trips(taps, c_per_group, k_cap)
    out = [heuristic_config(m, n_per_group, c_per_group, elem_bytes, shortcut, taps, packed,
                            stride)]
    for bm in (64, 128):
        for bn in (32, 64, 128):
            cfg = _make(bm, min(bn, n_cap), k_cap, elem_bytes, trips, shortcut and taps > 1)
            if cfg not in out:
                out.append(cfg)
    return out


def all_configs(elem_bytes: Optional[int] = None, shortcut: bool = False) -> list:
    """Every config ``pick_config`` can return on a GPU for a dtype of ``elem_bytes`` bytes
    (both sizes when None), with a projection shortcut or not, tuned ones included: the set
    the ahead-of-time check compiles."""
    out = []
    for e in ((2, 4) if elem_bytes is None else (elem_bytes,)):
        for m in (1, SMALL_M):
            for n in (16, 32, 64, 128, 256):
                for c in (16, 32, 64, 128, 256):
                    for taps, packed, stride in ((1, False, 1), (1, False, 2), (9, False, 1),
                                                 (7, True, 1)):
                        for cfg in tune_candidates(m, n, c, e, shortcut, taps, packed, stride):
                            if cfg not in out:
                                out.append(cfg)
    return out


# ---------------------------------------------------------------------------------------------
# Backward tiles.

def dgrad_config(m: int, c_per_group: int, k_per_group: int,
                 elem_bytes: int = 4) -> ConvConfig:
    """dgrad tiles: M = input pixels, N = input channels, K chunks of output channels of
    ``elem_bytes`` each. Memoized per bucket."""
    key = ("dgrad", (m - 1).bit_length(), m >= SMALL_M, c_per_group, k_per_group, elem_bytes)
    if key not in _PICKED:
        _PICKED[key] = pick_config(m, c_per_group, k_per_group) if INTERPRET else \
            _dgrad_gpu_config(m, c_per_group, k_per_group, elem_bytes)
    return _PICKED[key]


def _dgrad_gpu_config(m: int, c_per_group: int, k_per_group: int,
                      elem_bytes: int) -> ConvConfig:
    """K chunks of at most 128 bytes (64 bf16/fp16, 32 fp32: one swizzled shared-memory row),
    BLOCK_N up to 128, 8 warps from BLOCK_M * BLOCK_N * bytes >= 128 * 128 * 2 up (2-byte
    128x128, fp32 128x64 and 64x128), else 4, 3 stages (at most 96 KiB): every such config
    compiles for sm_90a to HGMMA without spilling in bf16, fp16 and tf32, int64 indexing
    included (``python -m fastres.aot``). 4 warps at 2-byte 128x64 (the C = 64 layers): half
    the issue slots per MMA cycle of 8 (ResNet-50 layer1 3x3 bf16: 0.56-0.64 instead of
    0.84), 3 CTAs/SM; fp32 keeps 8 there (4 warps took 252 registers at tf32 64x128)."""
    bn = _pow2_at_least(c_per_group, 16, 128)
    bk = _pow2_at_least(k_per_group, 16, 128 // elem_bytes)
    bm = 128 if m >= SMALL_M and bn >= 64 else 64
    warps = 8 if bm * bn * elem_bytes >= 128 * 128 * 2 else 4
    return ConvConfig(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
                      num_stages=3)


def all_dgrad_configs(elem_bytes: Optional[int] = None) -> list:
    """Every config ``dgrad_config`` can return on a GPU for a dtype of ``elem_bytes`` bytes
    (both sizes when None): the set the ahead-of-time check (``python -m fastres.aot``)
    compiles."""
    out = []
    for e in ((2, 4) if elem_bytes is None else (elem_bytes,)):
        for m in (1, SMALL_M):
            for c in (16, 32, 64, 128, 256):
                for k in (16, 32, 64, 128):
                    cfg = _dgrad_gpu_config(m, c, k, e)
                    if cfg not in out:
                        out.append(cfg)
    return out


def wgrad_blocks(m: int, c_per_group: int, k_per_group: int,
                 elem_bytes: int = 2) -> WgradBlocks:
    """wgrad tiles (``WgradBlocks``) for M output pixels, c_per_group columns (input channels,
    or a packed kernel row's (s, c) pairs) and k_per_group output channels of ``elem_bytes``
    each. Memoized per bucket."""
    key = ("wgrad", (m - 1).bit_length(), c_per_group, k_per_group, elem_bytes)
    if key not in _PICKED:
        _PICKED[key] = WgradBlocks(BLOCK_C=_pow2_at_least(c_per_group, 16, 64),
                                   BLOCK_N=_pow2_at_least(k_per_group, 16, 64),
                                   BLOCK_M=_pow2_at_least(m, 16, 128), num_warps=1,
                                   num_stages=1) if INTERPRET else \
            _wgrad_gpu_blocks(c_per_group, k_per_group, elem_bytes)
    return _PICKED[key]


def _wgrad_gpu_blocks(c_per_group: int, k_per_group: int, elem_bytes: int) -> WgradBlocks:
    """dw^T tile: BLOCK_N output channels (the wgmma's M: 64 a warpgroup, 8 warps from 128)
    x BLOCK_C columns (its N), reduced over BLOCK_M pixels a step: 128 for 2-byte dtypes, 256
    for the 64x64 and 64x32 tiles (ResNet's 64-channel 3x3 and the stem: the loop's fixed
    instructions over twice the MMAs; both were issue-bound at 128); 64 for fp32 from 128
    output channels, else 32 (tf32 wgmma wants K-major operands: larger fp32 tiles spilled
    200-344 B in the sm_90a compile). As many stages (2..4) as SMEM_BUDGET holds. Fewer than
    64 output channels a group (BLOCK_N 16/32) take mma.sync."""
    bc = _pow2_at_least(c_per_group, 16, 128)
    bn = _pow2_at_least(k_per_group, 16, 128)
    if elem_bytes == 4:
        bm = 64 if bn >= 128 else 32
    else:
        bm = 256 if bn == 64 and bc in (32, 64) else 128
    stages = max(2, min(4, SMEM_BUDGET // ((bc + bn) * bm * elem_bytes)))
    return WgradBlocks(BLOCK_C=bc, BLOCK_N=bn, BLOCK_M=bm, num_warps=8 if bn >= 128 else 4,
                       num_stages=stages)


def wgrad_rows_blocks(m: int, cols: int, k_per_group: int, rows: int,
                      elem_bytes: int = 2) -> WgradBlocks:
    """``conv_wgrad_rows_kernel``'s tile: BLOCK_N output channels (64 at most: the wgmma's M,
    one warpgroup) x BLOCK_C columns (a kernel row's S*CP (s, c) pairs, 16 or 32), ``rows``
    accumulators of it, reduced over BLOCK_M flat output pixels a step: 128 for 2-byte
    dtypes, 64 for fp32. A stage holds the dy tile and one x run tile a row; as many stages
    (2..4) as SMEM_BUDGET holds (the stem at 128: 72 KiB a stage, 2). Memoized per bucket."""
    key = ("wgrad_rows", (m - 1).bit_length(), cols, k_per_group, rows, elem_bytes)
    if key not in _PICKED:
        bc = _pow2_at_least(cols, 16, 32)
        bn = _pow2_at_least(k_per_group, 16, 64)
        if INTERPRET:
            _PICKED[key] = WgradBlocks(BLOCK_C=bc, BLOCK_N=bn, BLOCK_M=_pow2_at_least(m, 16, 64),
                                       num_warps=1, num_stages=1)
        else:
            bm = 64 if elem_bytes == 4 else 128
            stages = max(2, min(4, SMEM_BUDGET // ((bn + rows * bc) * bm * elem_bytes)))
            _PICKED[key] = WgradBlocks(BLOCK_C=bc, BLOCK_N=bn, BLOCK_M=bm, num_warps=4,
                                       num_stages=stages)
    return _PICKED[key]


def wgrad_box(n: int, p: int, q: int, block_m: int) -> tuple:
    """wgrad's chunk of ``block_m`` output pixels as a box (images, rows, columns), powers of
    two: the one that pads the N x P x Q pixels least (then the widest, then the tallest), so
    that boxes tile ResNet's 112/56/28/14/7-pixel images and batches of 2^k exactly."""
    best = None
    bq = 1
    while bq <= block_m:
        bp = 1
        while bq * bp <= block_m:
            bi = block_m // (bq * bp)
            key = (-(-n // bi) * bi * -(-p // bp) * bp * -(-q // bq) * bq, -bq, -bp)
            if best is None or key < best[0]:
                best = (key, (bi, bp, bq))
            bp *= 2
        bq *= 2
    return best[1]


def all_wgrad_blocks(elem_bytes: Optional[int] = None) -> list:
    """Every tile ``wgrad_blocks`` can return on a GPU for a dtype of ``elem_bytes`` bytes
    (both sizes when None): the set the ahead-of-time check compiles."""
    out = []
    for e in ((2, 4) if elem_bytes is None else (elem_bytes,)):
        for c in (16, 32, 64, 128, 256):
            for k in (16, 32, 64, 128, 256):
                blocks = _wgrad_gpu_blocks(c, k, e)
                if blocks not in out:
                    out.append(blocks)
    return out


# ---------------------------------------------------------------------------------------------
# Split-K: how many programs share one output tile's reduction.

@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (read once per device)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


# The static report (``python -m fastres.aot --network``) runs the launchers on meta tensors
# as if on a GPU of this many SMs; None otherwise.
CAPTURE_SMS: Optional[int] = None


def gpu_sms(device: torch.device) -> Optional[int]:
    """The SM count the split heuristics plan for: the CUDA device's, the captured GPU's for
    a meta tensor while the static report captures launches, else None (CPU: no split)."""
    if device.type == "cuda":
        return sm_count(device)
    if device.type == "meta":
        return CAPTURE_SMS
    return None


def split_k(tiles: int, chunks_per_tap: int, taps: int, sms: int) -> int:
    """The forward's split-K factor (a power of two, at most MAX_SPLIT_K): split the reduction
    while the output tiles fill less than half of the ``sms`` SMs (layer4 at small batch: 4
    tiles on 132 SMs), every split keeps at least one channel chunk a tap, and at least 4
    chunks in all."""
    split = 1
    while (split * 2 <= min(MAX_SPLIT_K, chunks_per_tap) and tiles * split * 2 <= sms
           and taps * chunks_per_tap >= 4 * split * 2):
        split *= 2
    return split


def wgrad_split(tiles: int, chunks: int, sms: int) -> int:
    """wgrad's split over output pixels: enough programs for WGRAD_PROGRAMS_PER_SM per SM, each
    reducing at least 8 of the ``chunks`` BLOCK_M-pixel chunks."""
    programs = WGRAD_PROGRAMS_PER_SM * sms
    return max(1, min((programs + tiles - 1) // tiles, chunks // 8))


# ---------------------------------------------------------------------------------------------
# Persistent autotune cache.

def bucket_key(m: int, n_per_group: int, c_per_group: int, elem_bytes: int, taps: int,
               shortcut: bool = False, packed: bool = False, stride: int = 1) -> str:
    """The cache key of a conv: M rounded up to a power of two (never the exact batch size)."""
    return (f"m{_pow2_at_least(m, 1, 1 << 62)}-n{n_per_group}-c{c_per_group}-b{elem_bytes}"
            f"-t{taps}{'-sc' if shortcut else ''}{'-pk' if packed else ''}"
            f"{f'-s{stride}' if stride != 1 else ''}")


def cache_path() -> str:
    """The tune cache file now: ``FASTRES_TUNE_CACHE``, or ~/.cache/fastres/configs.json."""
    return os.environ.get(CACHE_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "fastres", "configs.json")


def _settings() -> dict:
    """The tune settings, read from the environment at the first call after ``reset()``."""
    if not _SETTINGS:
        _SETTINGS.update(path=cache_path(),
                         autotune=os.environ.get(AUTOTUNE_ENV, "0") == "1")
    return _SETTINGS


_CACHE: dict = {}  # path -> {device: {bucket key: config fields}}


@functools.lru_cache(maxsize=None)
def _device() -> str:
    import triton
    target = triton.runtime.driver.active.get_current_target()
    return f"{target.backend}:{target.arch}"


def _load() -> dict:
    path = _settings()["path"]
    if path not in _CACHE:
        try:
            with open(path) as f:
                _CACHE[path] = json.load(f)
        except FileNotFoundError:
            _CACHE[path] = {}
    return _CACHE[path]


def _tuned() -> dict:
    data = _load()
    return data.get(_device(), {}) if data else {}


def autotune(key: str, candidates: list, launch: Callable) -> ConvConfig:
    """Time ``launch(cfg)`` for each candidate (median of ``do_bench``), store the fastest
    under ``key`` in the cache file (written atomically) and return it."""
    from triton.testing import do_bench
    times = [do_bench(lambda: launch(cfg), warmup=5, rep=20) for cfg in candidates]
    best = candidates[min(range(len(candidates)), key=times.__getitem__)]
    data = _load()
    data.setdefault(_device(), {})[key] = asdict(best)
    path = _settings()["path"]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return best
