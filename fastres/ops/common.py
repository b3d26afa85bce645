"""The fused conv as a PyTorch custom op, with input checks and device dispatch.

``torch.ops.fastres.conv_bn_act`` computes, on NCHW-shaped tensors stored channels_last,

    y = relu?( conv(x, w) + bias + conv1x1(shortcut, shortcut_w, shortcut_stride)
               + pad_c(residual[:, :, ::res_step, ::res_step], res_off) )

w is in the kernel's layout (R*S*C/groups, K); shortcut_w is (C2, K). Dispatch: CUDA tensors
run the Triton kernel; CPU tensors run it through the Triton interpreter when
``TRITON_INTERPRET=1``, else the same math in plain PyTorch.
"""
from typing import List, Optional

import torch
import torch.nn.functional as F

from fastres.kernels.configs import interpreting
from fastres.kernels.conv import conv_fused, out_size

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CL = torch.channels_last


def uses_triton(t: torch.Tensor) -> bool:
    """The one place that says whether a tensor's op runs on the Triton kernels."""
    return t.is_cuda or (t.device.type == "cpu" and interpreting())


def _weight_oihw(w: torch.Tensor, kernel_size: List[int], c_g: int) -> torch.Tensor:
    """(R*S*C_g, K) -> (K, C_g, R, S); free, and channels_last, when w is the transposed view
    of an OHWI-contiguous tensor (``fastres.fold`` lays the CPU path's weights out so)."""
    r, s = kernel_size
    return w.t().reshape(w.shape[1], r, s, c_g).permute(0, 3, 1, 2)


def _reference(x, w, bias, residual, shortcut, shortcut_w, kernel_size, stride, padding,
               dilation, groups, relu, res_step, res_off, shortcut_stride):
    """The fused op's math in plain PyTorch (the CPU path without the interpreter)."""
    y = F.conv2d(x, _weight_oihw(w, kernel_size, x.shape[1] // groups),
                 bias.to(x.dtype) if bias is not None else None, stride, padding, dilation, groups)
    if shortcut is not None:
        w2 = _weight_oihw(shortcut_w, [1, 1], shortcut_w.shape[0])
        y.add_(F.conv2d(shortcut, w2, stride=shortcut_stride))
    if residual is not None:
        res = residual[:, :, ::res_step, ::res_step]
        pad = y.shape[1] - res.shape[1] - res_off
        if res_off or pad:
            res = F.pad(res, (0, 0, 0, 0, res_off, pad))
        y.add_(res)
    if relu:
        y.relu_()
    return y.contiguous(memory_format=CL)


@torch.library.custom_op("fastres::conv_bn_act", mutates_args=())
def conv_bn_act_op(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor],
                   residual: Optional[torch.Tensor], shortcut: Optional[torch.Tensor],
                   shortcut_w: Optional[torch.Tensor], kernel_size: List[int],
                   stride: List[int], padding: List[int], dilation: List[int], groups: int,
                   relu: bool, res_step: int, res_off: int,
                   shortcut_stride: int) -> torch.Tensor:
    if not uses_triton(x):
        return _reference(x, w, bias, residual, shortcut, shortcut_w, kernel_size, stride,
                          padding, dilation, groups, relu, res_step, res_off, shortcut_stride)
    dense = lambda t: t.contiguous() if t is not None else None  # noqa: E731
    cl = lambda t: t.contiguous(memory_format=CL) if t is not None else None  # noqa: E731
    return conv_fused(cl(x), dense(w), dense(bias), kernel_size=kernel_size, stride=stride,
                      padding=padding, dilation=dilation, groups=groups, relu=relu,
                      residual=cl(residual), res_step=res_step, res_off=res_off,
                      shortcut=cl(shortcut), shortcut_stride=shortcut_stride,
                      shortcut_w=dense(shortcut_w), allow_tf32=torch.backends.cudnn.allow_tf32)


@conv_bn_act_op.register_fake
def _(x, w, bias, residual, shortcut, shortcut_w, kernel_size, stride, padding, dilation,
      groups, relu, res_step, res_off, shortcut_stride):
    n, _, h, wd = x.shape
    p = out_size(h, kernel_size[0], stride[0], padding[0], dilation[0])
    q = out_size(wd, kernel_size[1], stride[1], padding[1], dilation[1])
    return x.new_empty((n, w.shape[1], p, q)).contiguous(memory_format=CL)


def _check_activation(name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    if t.dim() != 4:
        raise ValueError(f"fastres: {name} must be 4-D (N, C, H, W), got shape {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"fastres: {name} is on {t.device} but the input is on {like.device}")
    if t.dtype != like.dtype:
        raise TypeError(f"fastres: {name} has dtype {t.dtype} but the input has {like.dtype}")


def _check_param(name: str, t: torch.Tensor, x: torch.Tensor, dtype) -> None:
    if t.device != x.device:
        raise ValueError(f"fastres: the {name} tensor is on {t.device} but the input is on "
                         f"{x.device}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"fastres: the {name} tensor has dtype {t.dtype} but the input has "
                        f"{dtype}")
    if not t.is_floating_point():
        raise TypeError(f"fastres: the {name} tensor must be floating point, got {t.dtype}")


def _check_weights(w: torch.Tensor, bias: Optional[torch.Tensor], kernel_size, groups) -> None:
    """w must be (R*S*C/groups, K) with K divisible by groups; bias (K,)."""
    taps = kernel_size[0] * kernel_size[1]
    if w.dim() != 2 or w.shape[0] % taps or w.shape[1] % groups:
        raise ValueError(f"fastres: weights must be (R*S*C/groups, K) = ({taps}*C/groups, K) "
                         f"with K divisible by groups={groups}, got shape {tuple(w.shape)}")
    if bias is not None and tuple(bias.shape) != (w.shape[1],):
        raise ValueError(f"fastres: bias must have shape ({w.shape[1]},), got "
                         f"{tuple(bias.shape)}")


def check_residual(residual: torch.Tensor, out_shape, res_step: int, res_off: int) -> None:
    """residual[:, :, ::res_step, ::res_step], shifted by res_off channels, must fit the conv
    output (N, K, P, Q)."""
    n, k, p, q = out_shape
    r_n, r_c, r_h, r_w = residual.shape
    if (r_n, -(-r_h // res_step), -(-r_w // res_step)) != (n, p, q) or r_c + res_off > k:
        raise ValueError(f"fastres: residual of shape {tuple(residual.shape)} does not "
                         f"match the conv output {tuple(out_shape)}")


def check_input(x: torch.Tensor, in_channels: int, kernel_size, padding, dilation) -> None:
    """Raise a clear error for an input the fused conv cannot take."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"fastres: expected a torch.Tensor input, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"fastres: expected a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"fastres: input dtype {x.dtype} is not supported; "
                        f"use float32, float16 or bfloat16")
    if x.shape[1] != in_channels:
        raise ValueError(f"fastres: input has {x.shape[1]} channels but the conv expects "
                         f"{in_channels} (input shape {tuple(x.shape)})")
    for i, name in ((2, "height"), (3, "width")):
        span = dilation[i - 2] * (kernel_size[i - 2] - 1) + 1
        if x.shape[i] + 2 * padding[i - 2] < span:
            raise ValueError(f"fastres: input {name} {x.shape[i]} (padded by {padding[i - 2]}) "
                             f"is smaller than the kernel's extent {span}")


def conv_bn_act(x, w, bias, *, kernel_size, stride, padding, dilation, groups, relu,
                residual=None, res_step=1, res_off=0, shortcut=None, shortcut_w=None,
                shortcut_stride=1):
    """Checked entry point: validate, make activations channels_last-dense, run the op."""
    _check_weights(w, bias, kernel_size, groups)
    c_g = w.shape[0] // (kernel_size[0] * kernel_size[1])
    check_input(x, c_g * groups, kernel_size, padding, dilation)
    _check_param("weight", w, x, x.dtype)
    if bias is not None:
        _check_param("bias", bias, x, None)
    n, k = x.shape[0], w.shape[1]
    p = out_size(x.shape[2], kernel_size[0], stride[0], padding[0], dilation[0])
    q = out_size(x.shape[3], kernel_size[1], stride[1], padding[1], dilation[1])
    x = x.contiguous(memory_format=CL)
    if residual is not None:
        _check_activation("residual", residual, x)
        check_residual(residual, (n, k, p, q), res_step, res_off)
        residual = residual.contiguous(memory_format=CL)
    if (shortcut is None) != (shortcut_w is None):
        raise ValueError("fastres: a projection shortcut needs both its input and its weights")
    if shortcut is not None:
        _check_activation("shortcut input", shortcut, x)
        if shortcut_w.dim() != 2 or shortcut_w.shape[1] != k:
            raise ValueError(f"fastres: shortcut weights must be (C2, {k}), got shape "
                             f"{tuple(shortcut_w.shape)}")
        _check_param("shortcut weight", shortcut_w, x, x.dtype)
        s_n, s_c, s_h, s_w = shortcut.shape
        size = lambda v: (v - 1) // shortcut_stride + 1
        if (s_n, s_c, size(s_h), size(s_w)) != (n, shortcut_w.shape[0], p, q):
            raise ValueError(f"fastres: projection shortcut input {tuple(shortcut.shape)} "
                             f"(stride {shortcut_stride}) does not match the conv output "
                             f"{(n, k, p, q)}")
        shortcut = shortcut.contiguous(memory_format=CL)
    return torch.ops.fastres.conv_bn_act(x, w, bias, residual, shortcut, shortcut_w,
                                         list(kernel_size), list(stride), list(padding),
                                         list(dilation), groups, relu, res_step, res_off,
                                         shortcut_stride)



def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:6])
    ctx.params = inputs[6:]


def _backward(ctx, grad_y):
    """Eval-mode gradients (e.g. saliency through a frozen net): recompute the op's math with
    autograd and differentiate it. The training path has its own Triton backward."""
    saved = ctx.saved_tensors
    leaves = [t.detach().requires_grad_(needs) if t is not None else None
              for t, needs in zip(saved, ctx.needs_input_grad[:6])]
    with torch.enable_grad():
        y = _reference(*leaves, *ctx.params)
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(y, wanted, grad_y))
    return tuple(next(grads) if t is not None and t.requires_grad else None for t in leaves) \
        + (None,) * len(ctx.params)


conv_bn_act_op.register_autograd(_backward, setup_context=_setup_context)
