"""The one entry point for conv + BatchNorm (+ ReLU) (+ shortcut), and the per-call decision
whether a module runs fused.

A fastres block (and a ResNet stem) runs on the kernels only when, at this call, its live
submodules are exactly what the kernels compute: an ``nn.Conv2d`` with zero padding, an
``nn.BatchNorm2d`` (``nn.SyncBatchNorm`` in eval mode, torchvision's ``FrozenBatchNorm2d``),
an ``nn.ReLU``, none of them with hooks (pruning and weight norm are hooks) or
parametrizations (a parametrized module has another class). Otherwise the module runs its
reference forward, torchvision's op by op, and warns once saying why. The reference forward
also serves, silently, what the kernels are not for: tensors that do not run on Triton (the
plain CPU path), an eval forward that records autograd (saliency, penalties, double
backward: the eval kernel has no autograd, the op-by-op path is exact to any order),
``torch.fx`` symbolic tracing (the graph gets torchvision's nodes), ``torch.jit.trace`` and
``torch.func`` transforms. Nothing is decided at conversion time and nothing is cached: the
kernels read the live parameters and buffers on every call.
"""
import contextlib
import sys
import warnings
import weakref

import torch
import torch.nn as nn
from torch.nn.modules import module as _torch_module

from fastres import ops, training

_WARNED = weakref.WeakKeyDictionary()  # module -> reasons already warned about
_UNFUSED = 0  # depth of ``unfused()`` contexts


@contextlib.contextmanager
def unfused():
    """Within this context every fastres module runs its reference forward, op by op (for
    double backward through a train-mode model, or to compare against the fused path)."""
    global _UNFUSED
    _UNFUSED += 1
    try:
        yield
    finally:
        _UNFUSED -= 1


def frozen_bn_type():
    """torchvision's FrozenBatchNorm2d when torchvision is imported (fastres does not need it)."""
    misc = sys.modules.get("torchvision.ops.misc")
    return getattr(misc, "FrozenBatchNorm2d", None)


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or m._backward_pre_hooks)


def _global_hooks() -> bool:
    return bool(_torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks
                or _torch_module._global_backward_hooks
                or _torch_module._global_backward_pre_hooks)


def uses_running_stats(bn: nn.Module) -> bool:
    """Whether a BatchNorm normalizes with its running statistics (as in eval mode), by
    nn.BatchNorm2d's rule; FrozenBatchNorm2d always does."""
    if bn.training and type(bn) is not frozen_bn_type():
        return False
    return bn.running_mean is not None


def pair_problem(conv, bn, act, names, conv_type=nn.Conv2d) -> str:
    """Why ``conv -> bn (-> act)`` is not what the kernels compute ('' when it is): an
    nn.Conv2d with zero padding, a BatchNorm2d (SyncBatchNorm in eval mode, FrozenBatchNorm2d)
    of its size, an nn.ReLU (``act`` None: none), no hooks; no conv bias with batch
    statistics. ``names``: the three attribute names, for the message."""
    if type(conv) is not conv_type:
        return f"{names[0]} is a {type(conv).__name__}, not an {conv_type.__name__}"
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return f"{names[0]} has padding_mode={conv.padding_mode!r}, padding={conv.padding!r}"
    kind = type(bn)
    if kind is not nn.BatchNorm2d and kind is not nn.SyncBatchNorm \
            and kind is not frozen_bn_type():
        return f"{names[1]} is a {kind.__name__}, not an nn.BatchNorm2d"
    if kind is nn.SyncBatchNorm and bn.training:
        return f"{names[1]} is an nn.SyncBatchNorm in train mode (fastres.sync_batchnorm " \
               f"synchronizes fused blocks)"
    mean = bn.running_mean
    size = mean.shape[0] if mean is not None else bn.num_features
    if size != conv.out_channels:
        return f"{names[1]} has {size} features for {conv.out_channels} channels"
    if act is not None and type(act) is not nn.ReLU:
        return f"{names[2]} is a {type(act).__name__}, not an nn.ReLU"
    for name, m in zip(names, (conv, bn, act)):
        if m is not None and _hooked(m):
            return f"{name} has hooks"
    if conv.bias is not None and not uses_running_stats(bn):
        return f"{names[0]} has a bias (train mode: the training kernels have none)"
    return ""


def silent_reason(x) -> str:
    """Why a forward takes the reference path without a warning ('' to fuse)."""
    if _UNFUSED:
        return "fastres.unfused()"
    if isinstance(x, torch.fx.Proxy):
        return "torch.fx tracing"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"fastres: expected a torch.Tensor input, got {type(x).__name__}")
    if not ops.uses_triton(x):
        return "not a Triton tensor"
    if x.dtype not in ops.SUPPORTED_DTYPES:
        return f"{x.dtype} input"  # float64 models run as PyTorch runs them
    if torch.compiler.is_compiling():
        return ""
    if torch._C._is_tracing():
        return "torch.jit.trace"
    if torch._C._functorch.is_functorch_wrapped_tensor(x):
        return "a torch.func transform"
    return ""


def records_autograd(x: torch.Tensor, pairs) -> bool:
    """Whether an eval forward of these (conv, bn) pairs would record autograd."""
    if not torch.is_grad_enabled():
        return False
    if x.requires_grad:
        return True
    for conv, bn in pairs:
        for t in (conv.weight, conv.bias, getattr(bn, "weight", None), getattr(bn, "bias", None)):
            if t is not None and t.requires_grad:
                return True
    return False


def warn_once(module: nn.Module, reason: str) -> None:
    seen = _WARNED.setdefault(module, set())
    if reason not in seen:
        seen.add(reason)
        warnings.warn(f"fastres: {type(module).__name__} runs op by op (not fused): {reason}",
                      UserWarning, stacklevel=4)


def conv_bn_act(x, conv, bn, relu, residual=None, res_step=1, res_off=0, projection=None,
                shortcut=None):
    """relu?(bn(conv(x)) (+ pbn(pconv(shortcut))) (+ pad_c(residual[::step], off))) on the
    kernels: the eval kernel when ``bn`` uses its running statistics, the training kernels
    when it uses batch statistics. The caller has checked the modules (``pair_problem``); input
    checks and autocast are done here, once."""
    weight, mean = conv.weight, bn.running_mean
    ops.check_input(x, conv, weight, mean)
    if ops.autocasting(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    elif x.dtype != weight.dtype:
        raise ops.common.dtype_mismatch(x, weight)
    if residual is not None:
        ops.common.check_second_input("residual", residual, x, conv, res_step, res_off)
        residual = residual.to(x.dtype)
    if projection is not None:
        pconv, pbn = projection
        ops.common.check_second_input("shortcut input", shortcut, x, conv, pconv.stride[0],
                                      pconv.in_channels)
        shortcut = shortcut.to(x.dtype)
    if not uses_running_stats(bn):
        return training.conv_bn(x, weight, conv, bn, relu, residual, res_step, res_off,
                                projection, shortcut)
    if projection is None:
        sc, sc_eps, sc_stride = (None,) * 6, 0.0, 1
    else:
        sc = (shortcut, pconv.weight.to(x.dtype), pbn.weight, pbn.bias, pbn.running_mean,
              pbn.running_var)
        sc_eps, sc_stride = float(pbn.eps), pconv.stride[0]
    return torch.ops.fastres.conv_bn_act(
        x, weight, conv.bias, bn.weight, bn.bias, mean, bn.running_var,
        float(bn.eps), residual, *sc, sc_eps, list(conv.stride), list(conv.padding),
        list(conv.dilation), conv.groups, relu, res_step, res_off, sc_stride)


def projection_of(downsample, eval_mode: bool):
    """(conv, bn) when ``downsample`` is a 1x1 conv + BN the kernels can add as a second
    GEMM in the same mode (eval or batch statistics) as the block, else None."""
    if type(downsample) is not nn.Sequential or len(downsample) != 2 or _hooked(downsample):
        return None
    conv, bn = downsample
    if pair_problem(conv, bn, None, ("downsample.0", "downsample.1", None)) \
            or uses_running_stats(bn) != eval_mode:
        return None
    if conv.kernel_size != (1, 1) or conv.padding != (0, 0) or conv.groups != 1 \
            or conv.stride[0] != conv.stride[1] or conv.dilation != (1, 1):
        return None
    return conv, bn


def stem(model: nn.Module, x, act: str = "relu"):
    """``model.<act>(model.bn1(model.conv1(x)))``, a ResNet's stem, fused when the live
    modules allow (decided as for a block)."""
    conv, bn, relu = model.conv1, model.bn1, getattr(model, act)
    reason = silent_reason(x)
    if not reason:
        problem = pair_problem(conv, bn, relu, ("conv1", "bn1", act)) \
            or ("global module hooks are registered" if _global_hooks() else "")
        if problem:
            warn_once(model, problem)
            reason = problem
        elif uses_running_stats(bn) and records_autograd(x, ((conv, bn),)):
            reason = "autograd"
    if reason:
        training.check_sync_runs(bn)
        return relu(bn(conv(x)))
    return conv_bn_act(x, conv, bn, True)
