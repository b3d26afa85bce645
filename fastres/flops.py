"""FLOPs and the minimal-bytes model of fastres' ops: the two axes of a roofline.

FLOPs. ``torch.ops.fastres.conv_bn_act`` and the training ops ``conv_train``, ``conv_dgrad``
and ``conv_wgrad`` get formulas for ``torch.utils.flop_counter.FlopCounterMode`` (registered
on import of ``fastres``), so a fastres model, forward and backward, is charged the same work
as the PyTorch reference, one MAC = 2 FLOPs:

    flops = 2 * N*P*Q * K * (C/groups*R*S)          the conv, w is (K, C/groups, R, S)
          + 2 * N*P*Q * K * C2                      the projection shortcut, if any

BatchNorm, residual add and ReLU are not counted (FlopCounterMode counts neither
BatchNorm nor elementwise ops on the reference).

Minimal bytes. An op that reads each of its tensor inputs once and writes each output once
moves ``sum(input bytes) + sum(output bytes)`` (floating-point tensors: activations, weights,
biases); ``MinimalBytesMode`` adds this up over every op a forward runs, skipping views and
pure layout copies. Run on a fastres module in eval
mode (one fused launch per conv) this is the traffic of a one-kernel-per-conv implementation
with perfect caching: for a conv, x + w + bias (+ residual or shortcut input and weights) +
y. A training step moves three times a conv's forward bytes (forward, data gradient and
weight gradient each touch x, w and y once): ``TRAIN_BYTES_FACTOR``.

Roofline floor: ``max(flops / peak_flops, bytes / peak_bandwidth)`` seconds.
"""
import copy

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import register_flop_formula

from fastres import ops  # noqa: F401  (registers torch.ops.fastres.*)

TRAIN_BYTES_FACTOR = 3
# Ops that only change layout, strides or dtype: not part of the minimal model.
_LAYOUT_OPS = {torch.ops.aten.clone.default, torch.ops.aten._to_copy.default,
               torch.ops.aten.copy_.default, torch.ops.aten.as_strided_.default,
               torch.ops.aten.empty_like.default, torch.ops.aten.empty_strided.default,
               torch.ops.aten.empty.memory_format}


def conv_flops(x_shape, w_shape, out_shape, shortcut_w_shape=None) -> int:
    """FLOPs of the fused conv: x (N, C, H, W), w (K, C/groups, R, S), out (N, K, P, Q),
    shortcut_w (K, C2, 1, 1) or None."""
    n, k, p, q = out_shape
    per_out = w_shape[1] * w_shape[2] * w_shape[3]
    if shortcut_w_shape is not None:
        per_out += shortcut_w_shape[1]
    return 2 * n * p * q * k * per_out


@register_flop_formula(torch.ops.fastres.conv_bn_act)
def _conv_bn_act_flops(x_shape, w_shape, conv_bias_shape, bn_weight_shape, bn_bias_shape,
                       mean_shape, var_shape, eps, residual_shape, shortcut_shape,
                       shortcut_w_shape, *args, out_shape=None, **kwargs) -> int:
    return conv_flops(x_shape, w_shape, out_shape, shortcut_w_shape)


@register_flop_formula(torch.ops.fastres.conv_train)
def _conv_train_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return conv_flops(x_shape, w_shape, out_shape[0])


@register_flop_formula(torch.ops.fastres.conv_dgrad)
def _conv_dgrad_flops(dy_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return conv_flops(out_shape, w_shape, dy_shape)  # the forward's MACs, transposed


@register_flop_formula(torch.ops.fastres.conv_wgrad)
def _conv_wgrad_flops(x_shape, dy_shape, *args, out_shape=None, **kwargs) -> int:
    return conv_flops(x_shape, out_shape, dy_shape)  # dw is (K, C/groups, R, S)


def tensor_bytes(t) -> int:
    """Bytes of a floating-point tensor; 0 for anything else (e.g. max-pool indices)."""
    if isinstance(t, torch.Tensor) and t.is_floating_point():
        return t.numel() * t.element_size()
    return 0


def _is_view(func) -> bool:
    rets = func._schema.returns
    return len(rets) > 0 and all(r.alias_info is not None and not r.alias_info.is_write
                                 for r in rets)


class MinimalBytesMode(TorchDispatchMode):
    """Counts ``self.bytes``: every op reads its floating-point tensor inputs once and writes
    its outputs once; views and layout/dtype copies count nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func not in _LAYOUT_OPS and not _is_view(func):
            flat_in = torch.utils._pytree.tree_leaves((args, kwargs))
            flat_out = torch.utils._pytree.tree_leaves(out)
            self.bytes += sum(tensor_bytes(t) for t in flat_in + flat_out)
        return out


def minimal_bytes(module: torch.nn.Module, x: torch.Tensor) -> int:
    """Minimal bytes of a fused forward of ``module(x)`` (under no_grad; call it on a fastres
    module in eval mode): run on a meta-device copy with the Triton path forced, so the
    fused ops' fake impls stand in for the kernels on any machine and nothing is computed."""
    meta = copy.deepcopy(module).to("meta")
    real = ops.uses_triton
    ops.uses_triton = lambda t: True
    try:
        with torch.no_grad(), MinimalBytesMode() as mode:
            meta(x.to("meta"))
    finally:
        ops.uses_triton = real
    return mode.bytes


def roofline_floor(flops: float, nbytes: float, peak_flops: float,
                   peak_bandwidth: float) -> float:
    """The least time (s) the work can take at the measured peaks (FLOP/s, bytes/s)."""
    return max(flops / peak_flops, nbytes / peak_bandwidth)
