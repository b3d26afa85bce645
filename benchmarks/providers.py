"""The providers compared side by side, each turning a unit into a callable ``run(x)``.

- ``eager``: the reference module, NCHW.
- ``eager_channels_last``: the reference module and its input in channels_last.
- ``compile``: ``torch.compile`` of the channels_last reference (default mode).
- ``compile_max_autotune``: ``torch.compile(mode="max-autotune-no-cudagraphs")``; in
  inference with ``torch._inductor.config.freezing`` on, so BatchNorm is folded into the
  conv weights as constants (no CUDA graphs: no provider replays graphs).
- ``fastres``: the unit's fastres module, channels_last (eval: one fused kernel per conv;
  train: whatever fastres' train mode runs on this device).

Modes: ``inference`` = eval mode under ``torch.no_grad``; ``train`` = train mode, forward
plus backward against a fixed output gradient, gradients set to None before each call (the
input needs a gradient too, except for whole networks).
"""
import contextlib
from typing import Callable

import torch
import torch.nn as nn

PROVIDERS = ("eager", "eager_channels_last", "compile", "compile_max_autotune", "fastres")
CPU_PROVIDERS = ("eager", "eager_channels_last", "fastres")
MODES = ("inference", "train")


def _compiled(model: nn.Module, provider: str) -> nn.Module:
    import torch._dynamo
    torch._dynamo.reset()  # every unit compiles afresh; no recompile limit is ever hit
    mode = "max-autotune-no-cudagraphs" if provider == "compile_max_autotune" else None
    return torch.compile(model, mode=mode)


def _compile_context(provider: str, mode: str):
    """Where the first (compiling) calls must run: with freezing for max-autotune inference."""
    if provider == "compile_max_autotune" and mode == "inference":
        import torch._inductor.config as inductor_config
        return inductor_config.patch(freezing=True)
    return contextlib.nullcontext()


def build(provider: str, unit, ref: nn.Module, mode: str, dtype: torch.dtype,
          dev: torch.device, example: torch.Tensor) -> Callable[[torch.Tensor], object]:
    """``run(x)`` for ``unit`` on ``provider`` from ``ref``, a fresh reference module of the
    unit (consumed), already called once on ``example`` (so compilation and caches are
    done). Inputs must come from ``prepare_input``."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    model = unit.fastres_version(ref) if provider == "fastres" else ref
    model = model.to(device=dev, dtype=dtype).train(mode == "train")
    if provider != "eager":
        model = model.to(memory_format=torch.channels_last)
    if provider.startswith("compile"):
        model = _compiled(model, provider)

    if mode == "inference":
        def run(x):
            with torch.no_grad():
                return model(x)
    else:
        grad_out = {}

        def run(x):
            model.zero_grad(set_to_none=True)
            x.grad = None
            y = model(x)
            if "g" not in grad_out:
                grad_out["g"] = torch.randn_like(y)
            y.backward(grad_out["g"])

    with _compile_context(provider, mode):
        run(example)
    return run


def prepare_input(provider: str, unit, mode: str, x: torch.Tensor) -> torch.Tensor:
    """``x`` in the provider's layout, requiring a gradient in train mode (not for networks)."""
    if provider != "eager":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(mode == "train" and unit.kind != "network")
