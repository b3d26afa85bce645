"""Facts every fastres op shares: the activation layout, the supported dtypes, which tensors
run on the Triton kernels, autocast, and the input checks (one named error per problem)."""
from typing import Optional

import torch

from fastres.kernels.configs import interpreting

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CL = torch.channels_last  # activations: NCHW-shaped, channels_last-dense
AUTOCAST_DEVICES = ("cpu", "cuda")  # the device types fastres runs on (not meta)


def uses_triton(t: torch.Tensor) -> bool:
    """The one place that says whether a tensor's op runs on the Triton kernels: CUDA tensors,
    and CPU tensors when Triton interprets (``TRITON_INTERPRET=1``)."""
    return t.is_cuda or (t.device.type == "cpu" and interpreting())


def autocasting(device_type: str) -> bool:
    """Whether autocast is on for this device type (False for types without autocast: meta).
    A membership test, not ``torch.amp.is_autocast_available``: torch 2.11's Dynamo cannot
    trace that call and would break a ``fullgraph=True`` graph."""
    return device_type in AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type)


def no_double_backward() -> None:
    """The training ops' backward is not differentiable: refuse ``create_graph=True`` (the
    backward then runs with grad mode on) instead of returning gradients without a graph."""
    if torch.is_grad_enabled():
        raise RuntimeError("fastres: double backward (create_graph=True) through the fused "
                           "training kernels is not supported; run that forward inside "
                           "fastres.unfused() (op by op, exact to any order)")


def cl(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The kernels' activation layout (a no-op when the tensor already has it)."""
    return t.contiguous(memory_format=CL) if t is not None else None


def check_input(x, conv, weight: torch.Tensor, mean: Optional[torch.Tensor]) -> None:
    """Raise a clear error for an input ``conv`` (an nn.Conv2d with ``weight``) and a
    BatchNorm (``mean``: its running_mean or None) cannot take on the kernels."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"fastres: expected a torch.Tensor input, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"fastres: expected a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"fastres: input dtype {x.dtype} is not supported; "
                        f"use float32, float16 or bfloat16")
    if x.shape[1] != conv.in_channels:
        raise ValueError(f"fastres: input has {x.shape[1]} channels but the conv expects "
                         f"{conv.in_channels} (input shape {tuple(x.shape)})")
    if weight.device != x.device:
        raise ValueError(f"fastres: the conv weight is on {weight.device} but the input is on "
                         f"{x.device}")
    if mean is not None and mean.device != x.device:
        raise ValueError(f"fastres: the BatchNorm state is on {mean.device} but the input is "
                         f"on {x.device}")
    for i, name in ((2, "height"), (3, "width")):
        k, pad, dil = conv.kernel_size[i - 2], conv.padding[i - 2], conv.dilation[i - 2]
        span = dil * (k - 1) + 1
        if x.shape[i] + 2 * pad < span:
            raise ValueError(f"fastres: input {name} {x.shape[i]} (padded by {pad}) is smaller "
                             f"than the kernel's extent {span}")


def dtype_mismatch(x: torch.Tensor, weight: torch.Tensor) -> RuntimeError:
    """Outside autocast a conv's input and weight must share a dtype, as in PyTorch."""
    return RuntimeError(f"fastres: input dtype {x.dtype} and conv weight dtype {weight.dtype} "
                        f"should be the same (as torch.nn.Conv2d requires); cast the model or "
                        f"the input, or run under torch.autocast")


def conv_out_shape(x: torch.Tensor, conv) -> tuple:
    """(N, K, P, Q) of ``conv(x)``."""
    (r, s), (sh, sw) = conv.kernel_size, conv.stride
    (ph, pw), (dh, dw) = conv.padding, conv.dilation
    return (x.shape[0], conv.out_channels, (x.shape[2] + 2 * ph - dh * (r - 1) - 1) // sh + 1,
            (x.shape[3] + 2 * pw - dw * (s - 1) - 1) // sw + 1)


def check_second_input(name: str, t: torch.Tensor, x: torch.Tensor, conv, step: int = 1,
                       channels: int = -1) -> None:
    """A residual (``name`` "residual": t[:, :, ::step, ::step] shifted by ``channels``
    (its channel offset) must fit conv(x)) or a projection shortcut input (``channels`` its
    conv's input channels, ``step`` its stride) must be 4-D, on x's device and fit conv(x)."""
    if t.dim() != 4:
        raise ValueError(f"fastres: {name} must be 4-D (N, C, H, W), got shape {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"fastres: {name} is on {t.device} but the input is on {x.device}")
    n, k, p, q = out = conv_out_shape(x, conv)
    t_n, t_c, t_h, t_w = t.shape
    fits = (t_n, -(-t_h // step), -(-t_w // step)) == (n, p, q)
    if name == "residual" and not (fits and t_c + channels <= k):
        raise ValueError(f"fastres: residual of shape {tuple(t.shape)} does not match the conv "
                         f"output {out}")
    if name != "residual" and not (fits and t_c == channels):
        raise ValueError(f"fastres: projection shortcut input {tuple(t.shape)} (stride {step}, "
                         f"{channels} channels) does not match the conv output {out}")
