"""Block-size configurations of the implicit-GEMM conv kernels, the heuristic that picks one per
shape bucket, and an optional measured autotune with a persistent cache.

A conv is the GEMM  (M = N*P*Q pixels) x (K = R*S*C/G) @ (K x N = output channels / G).
Its config depends on a shape *bucket*, never on the exact batch size, so a new batch size
reuses a compiled kernel:

    BLOCK_M  64 when M < SMALL_M (late stages at small batch: more tiles to fill 132 SMs), else 128
    BLOCK_N  the channels per group rounded up to a power of two, 16..N_CAP[bytes]: 128 for
             2-byte dtypes (a 128x256 tile, 8 warps, spills 88-96 B/thread with the residual
             epilogue in the sm_90a compile), 64 for fp32 (the ieee-precision dgrad spills at
             128x128)
    BLOCK_K  the input channels per group rounded up, 16..(128 bytes of one row: 64 bf16/fp16,
             32 fp32), the row a 128-byte shared-memory swizzle wants
    warps    8 from BLOCK_M * BLOCK_N * bytes >= 128 * 64 * 2 up (two warpgroups share the
             wgmma tile), else 4: at 4 warps the 128x64 bf16 tile with int64 indexing and the
             128x32/128x64 fp32 tiles spilled 24-288 B/thread in the sm_90a compile
    stages   as many as fit SMEM_BUDGET, 2..4: (BLOCK_M + BLOCK_N) * BLOCK_K * bytes each

Every dot dimension is >= 16 and BLOCK_M * num_warps fit Hopper's wgmma (64 rows per
warpgroup), so bf16/fp16/tf32 dots lower to wgmma: ``python -m fastres.aot`` checks this for
``all_configs()``, the closed set this module can return on a GPU (heuristic and tuning
candidates alike), and that none spills or overflows shared memory.

Autotune (GPU only, opt-in): with ``FASTRES_AUTOTUNE=1``, the first launch of a bucket times
``tune_candidates`` with ``triton.testing.do_bench`` and stores the fastest in a JSON file
(``FASTRES_TUNE_CACHE``, default ``~/.cache/fastres/configs.json``), keyed on the GPU, the
dtype size, the taps R*S and the bucket (M rounded up to a power of two, channels exact).
Later processes read the file, with or without ``FASTRES_AUTOTUNE``. Tune before serving:
``fastres.warmup(model, shapes)`` with the variable set runs every conv of those shapes once.
"""
import functools
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from typing import Callable, Optional

SMALL_M = 128 * 64  # below: BLOCK_M = 64
N_CAP = {2: 128, 4: 64}  # largest BLOCK_N per element size, see the module docstring
SMEM_BUDGET = 192 * 1024  # bytes for the pipelined tiles; sm_90 allows 227 KiB per block
AUTOTUNE_ENV = "FASTRES_AUTOTUNE"
CACHE_ENV = "FASTRES_TUNE_CACHE"


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


def _make(bm: int, bn: int, bk: int, elem_bytes: int) -> ConvConfig:
    warps = 8 if bm * bn * elem_bytes >= 128 * 64 * 2 else 4
    stages = max(2, min(4, SMEM_BUDGET // ((bm + bn) * bk * elem_bytes)))
    return ConvConfig(bm, bn, bk, num_warps=warps, num_stages=stages)


def heuristic_config(m: int, n_per_group: int, c_per_group: int,
                     elem_bytes: int = 4) -> ConvConfig:
    """The GPU config of a bucket, before any tuning (see the module docstring)."""
    bn = _pow2_at_least(n_per_group, 16, N_CAP[elem_bytes])
    bk = _pow2_at_least(c_per_group, 16, 128 // elem_bytes)
    return _make(128 if m >= SMALL_M else 64, bn, bk, elem_bytes)


def pick_config(m: int, n_per_group: int, c_per_group: int, elem_bytes: int = 4,
                taps: int = 1, launch: Optional[Callable] = None) -> ConvConfig:
    """Block sizes for a conv whose GEMM is M=N*P*Q pixels, N=n_per_group output channels,
    reduction over ``taps`` (R*S) chunks of c_per_group input channels of ``elem_bytes`` each.
    ``launch(cfg)`` runs the conv with a given config: with it and ``FASTRES_AUTOTUNE=1`` on a
    GPU, an untuned bucket is tuned now. (``elem_bytes`` defaults to the safe 4: a 2-byte
    dtype gets fewer stages than it could.)

    Under the interpreter the cost is per program and per op, so blocks are as large as the
    problem allows.
    """
    if interpreting():
        return ConvConfig(BLOCK_M=_pow2_at_least(m, 16, 128),
                          BLOCK_N=_pow2_at_least(n_per_group, 16, 128),
                          BLOCK_K=_pow2_at_least(c_per_group, 16, 64),
                          num_warps=1, num_stages=1)
    key = bucket_key(m, n_per_group, c_per_group, elem_bytes, taps)
    tuned = _tuned().get(key)
    if tuned is not None:
        return ConvConfig(**tuned)
    if launch is not None and os.environ.get(AUTOTUNE_ENV, "0") == "1":
        return autotune(key, tune_candidates(m, n_per_group, c_per_group, elem_bytes), launch)
    return heuristic_config(m, n_per_group, c_per_group, elem_bytes)


def tune_candidates(m: int, n_per_group: int, c_per_group: int, elem_bytes: int) -> list:
    """The configs autotune times for a bucket: the heuristic's, then its neighbours in
    BLOCK_M and BLOCK_N, each no larger than the problem needs."""
    n_cap = _pow2_at_least(n_per_group, 16, N_CAP[elem_bytes])
    k_cap = _pow2_at_least(c_per_group, 16, 128 // elem_bytes)
    out = [heuristic_config(m, n_per_group, c_per_group, elem_bytes)]
    for bm in (64, 128):
        for bn in (32, 64, 128):
            cfg = _make(bm, min(bn, n_cap), k_cap, elem_bytes)
            if cfg not in out:
                out.append(cfg)
    return out


def all_configs(elem_bytes: Optional[int] = None) -> list:
    """Every config ``pick_config`` can return on a GPU for a dtype of ``elem_bytes`` bytes
    (both sizes when None), tuned ones included: the set the ahead-of-time check compiles."""
    out = []
    for e in ((2, 4) if elem_bytes is None else (elem_bytes,)):
        for m in (1, SMALL_M):
            for n in (16, 32, 64, 128, 256):
                for c in (16, 32, 64):
                    for cfg in [heuristic_config(m, n, c, e)] + tune_candidates(m, n, c, e):
                        if cfg not in out:
                            out.append(cfg)
    return out


# ---------------------------------------------------------------------------------------------
# Persistent autotune cache.

def bucket_key(m: int, n_per_group: int, c_per_group: int, elem_bytes: int, taps: int) -> str:
    """The cache key of a conv: M rounded up to a power of two (never the exact batch size)."""
    return f"m{_pow2_at_least(m, 1, 1 << 62)}-n{n_per_group}-c{c_per_group}-b{elem_bytes}-t{taps}"


def cache_path() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "fastres", "configs.json")


_CACHE: dict = {}  # path -> {device: {bucket key: config fields}}


@functools.lru_cache(maxsize=None)
def _device() -> str:
    import triton
    target = triton.runtime.driver.active.get_current_target()
    return f"{target.backend}:{target.arch}"


def _load() -> dict:
    path = cache_path()
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
    path = cache_path()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return best
