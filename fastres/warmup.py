"""Warm-up: compile, before serving, every kernel variant a set of input shapes will use.

Triton compiles a kernel the first time it meets a new *specialization*: a new value of a
``tl.constexpr`` (block sizes, flags), a new dtype, or a new divisibility-by-16 / equal-to-1
class of an integer argument. For the fused conv, per layer and dtype:

- the batch size N enters only through M = N*P*Q, which the kernel does not specialize on
  (``do_not_specialize=["M"]``), and through the config ``fastres.kernels.configs.pick_config``
  returns for M's bucket (two buckets from the heuristic; with autotuning, one per power of
  two of M);
- INT64 indexing switches on once a tensor passes ``fastres.kernels.conv.INT32_SAFE``
  elements.

So warming up the smallest and largest batch of each input resolution (plus, when tuned,
the batch sizes in between that cross a power of two of M) compiles every variant needed.
Compiled kernels persist in Triton's on-disk cache (``TRITON_CACHE_DIR``, by default
``~/.triton/cache``): a later process loads them instead of compiling again.
"""
from typing import Iterable, Optional, Sequence

import torch
import torch.nn as nn


def warmup(model: nn.Module, shapes: Iterable[Sequence[int]],
           dtype: Optional[torch.dtype] = None,
           device: Optional[torch.device] = None) -> nn.Module:
    """Run ``model`` once in eval mode under ``torch.inference_mode`` on zeros of each input
    shape in ``shapes`` (e.g. ``[(1, 3, 224, 224), (256, 3, 224, 224)]``). This compiles the
    kernels those shapes use, so the first real batch (or a CUDA-graph capture) runs no
    compiler. ``dtype`` and ``device`` default to those of
    the model's first floating-point parameter; call it inside ``torch.autocast`` to warm up
    the autocast dtype. Every module's train/eval flag is restored and no running statistic
    changes. Returns ``model``.
    """
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = dtype or (first.dtype if first is not None else torch.float32)
    device = device or (first.device if first is not None else torch.device("cpu"))
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            for shape in shapes:
                model(torch.zeros(tuple(shape), dtype=dtype, device=device))
    finally:
        for m, training in modes:
            m.training = training
    return model
