"""Device detection, per-call timing and the peaks measured in the same run.

GPU: CUDA events around ``k`` back-to-back calls (``k`` chosen so one sample lasts at least
``MIN_SAMPLE_S``), each call on the next of several input buffers whose total size exceeds
twice the L2 cache, so a small layer's input is not served from L2; a sample is the mean
time per call; after warm-up calls (which compile and autotune) the median of the samples
is what a row reports. CPU: ``time.perf_counter`` around single calls, same statistics; CPU
figures are labelled ``CPU_NOTE`` and are never performance figures.

Peaks: a large matmul (FLOP/s, per dtype) and a large device-to-device copy (bytes/s, read
plus write).
"""
import functools
import math
import statistics
import time
from typing import Callable, List, Sequence

import torch

CPU_NOTE = "CPU, not a performance figure"
MIN_SAMPLE_S = 1e-3
L2_ROTATION_FACTOR = 2
MAX_BUFFER_BYTES = 2 << 30
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def device() -> torch.device:
    """The one place that picks the benchmark device: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def buffer_count(input_bytes: int, dev: torch.device) -> int:
    """How many input buffers to rotate through: enough to overflow the L2 twice over."""
    if dev.type != "cuda":
        return 2
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 64 << 20)
    want = math.ceil(L2_ROTATION_FACTOR * l2 / max(input_bytes, 1))
    return max(2, min(want, 16, MAX_BUFFER_BYTES // max(input_bytes, 1)))


def _sample(fn: Callable, inputs: Sequence, k: int, start: int, dev: torch.device) -> float:
    """Mean seconds per call over k calls, starting at input ``start``."""
    if dev.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for i in range(k):
            fn(inputs[(start + i) % len(inputs)])
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3 / k
    t0 = time.perf_counter()
    for i in range(k):
        fn(inputs[(start + i) % len(inputs)])
    return (time.perf_counter() - t0) / k


def measure(fn: Callable, inputs: Sequence, dev: torch.device, rounds: int,
            warmup: int = 2) -> List[float]:
    """``rounds`` samples of seconds per call of ``fn`` (after ``warmup`` calls; on a GPU
    each sample spans at least ``MIN_SAMPLE_S``)."""
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    k = 1
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        estimate = _sample(fn, inputs, 1, 0, dev)
        k = max(1, math.ceil(MIN_SAMPLE_S / max(estimate, 1e-9)))
    return [_sample(fn, inputs, k, r * k, dev) for r in range(rounds)]


@functools.lru_cache(maxsize=None)
def peak_flops(dev: torch.device, dtype: torch.dtype, n: int) -> float:
    """Measured FLOP/s of an n x n x n matmul in ``dtype`` (median of several)."""
    a, b = (torch.randn(n, n, device=dev).to(dtype) for _ in range(2))
    seconds = statistics.median(measure(lambda x: torch.mm(x, b), [a], dev, rounds=10))
    return 2 * n ** 3 / seconds


@functools.lru_cache(maxsize=None)
def peak_bandwidth(dev: torch.device, nbytes: int) -> float:
    """Measured bytes/s of a device-to-device copy of ``nbytes`` (read + write)."""
    src = torch.empty(nbytes // 4, device=dev, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    seconds = statistics.median(measure(lambda x: dst.copy_(x), [src], dev, rounds=10))
    return 2 * nbytes / seconds
