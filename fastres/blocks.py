"""Drop-in ResNet blocks: torchvision's constructors, attribute names and state_dict keys.

In eval mode every conv of a block is one fused kernel launch (BN folded, ReLU, residual add
or projection shortcut in the epilogue). In train mode (BatchNorm on batch statistics) each
conv + BN runs on the training kernels (``fastres.training``: BN statistics from the conv
epilogue, one BN-apply(+shortcut)(+ReLU) pass, Triton backward); where those kernels do not
run (plain CPU, a BN that is not a BatchNorm2d) the blocks compute what torchvision's do,
op by op.
"""
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastres import ops, training
from fastres.fold import folded


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1,
            dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation,
                     groups=groups, bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class PadShortcut(nn.Module):
    """The paper's option-A shortcut: strided identity with zero-padded channels,
    ``F.pad(x[:, :, ::stride, ::stride], (0, 0, 0, 0, pad, pad))``. No parameters; the fused
    kernels read it as a load pattern instead of building the tensor."""

    def __init__(self, stride: int, pad: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad={self.pad}"


def can_fold(conv: nn.Module, bn: nn.Module) -> bool:
    """conv+bn the fused kernel can run: zero-padded Conv2d, eval BatchNorm2d with stats."""
    return (type(conv) in (nn.Conv2d, ConvBNAct) and conv.padding_mode == "zeros"
            and isinstance(conv.padding, tuple) and isinstance(bn, nn.BatchNorm2d)
            and bn.running_mean is not None and not bn.training)


def projection_of(downsample: Optional[nn.Module]):
    """(conv, bn) if downsample is a 1x1 conv + BN the kernel can fuse as a second GEMM."""
    if not isinstance(downsample, nn.Sequential) or len(downsample) != 2:
        return None
    conv, bn = downsample
    if not can_fold(conv, bn) or type(conv) is not nn.Conv2d:
        return None
    square = conv.stride[0] == conv.stride[1]
    if conv.kernel_size != (1, 1) or conv.padding != (0, 0) or conv.groups != 1 or not square:
        return None
    return conv, bn


def autocasting(device_type: str) -> bool:
    """Whether autocast is on for this device type (False for types without autocast: meta)."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def fused_conv_bn(x, conv, bn, relu, residual=None, res_step=1, res_off=0, projection=None,
                  shortcut=None):
    """relu?(bn(conv(x)) + residual + projection_bn(projection_conv(shortcut))) in one launch."""
    ops.check_input(x, conv.in_channels, conv.kernel_size, conv.padding, conv.dilation)
    if x.dtype == torch.float32 and autocasting(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    w, b, w2 = folded(conv, bn, x.dtype, projection, ops.uses_triton(x))
    if residual is not None:
        residual = residual.to(x.dtype)
    if shortcut is not None:
        shortcut = shortcut.to(x.dtype)
    return ops.conv_bn_act(
        x, w, b, kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=conv.groups, relu=relu, residual=residual,
        res_step=res_step, res_off=res_off, shortcut=shortcut, shortcut_w=w2,
        shortcut_stride=projection[0].stride[0] if projection is not None else 1)


def fused_last_conv(x, identity, conv, bn, downsample, train=False):
    """The block's last conv with its shortcut (projection, option A, identity or any other
    module) and the final ReLU fused into one launch (``train``: on the training kernels)."""
    run = training.conv_bn if train else fused_conv_bn
    projection = (training.projection_of if train else projection_of)(downsample)
    if projection is not None:
        return run(x, conv, bn, True, projection=projection, shortcut=identity)
    if isinstance(downsample, PadShortcut):
        return run(x, conv, bn, True, residual=identity, res_step=downsample.stride,
                   res_off=downsample.pad)
    if downsample is not None:
        identity = downsample(identity)
    return run(x, conv, bn, True, residual=identity)


class _ResidualBlock(nn.Module):
    """A chain of (conv, bn) pairs with ReLU, the last one joined by the shortcut. Runs the
    chain on the inference kernels (eval BN), the training kernels (batch-statistics BN), or
    op by op as torchvision does (anything else)."""

    def pairs(self):
        raise NotImplementedError

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pairs = self.pairs()
        if all(can_fold(conv, bn) for conv, bn in pairs):
            run, train = fused_conv_bn, False
        elif training.runs_fused(x, *pairs):
            run, train = training.conv_bn, True
        else:
            training.check_sync_runs(*pairs)
            return self.reference_forward(x)
        out = x
        for conv, bn in pairs[:-1]:
            out = run(out, conv, bn, True)
        return fused_last_conv(out, x, *pairs[-1], self.downsample, train=train)


class BasicBlock(_ResidualBlock):
    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer: Optional[Callable[..., nn.Module]] = None) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def pairs(self):
        return [(self.conv1, self.bn1), (self.conv2, self.bn2)]

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(_ResidualBlock):
    expansion: int = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer: Optional[Callable[..., nn.Module]] = None) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def pairs(self):
        return [(self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)]

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class FoldedBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d whose work is done by the ConvBNAct in front of it. It keeps the BN's
    parameters, buffers and state_dict keys where they were; its forward is the identity."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)

    @classmethod
    def sharing(cls, bn: nn.BatchNorm2d) -> "FoldedBatchNorm2d":
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                  device="meta")
        new._parameters = dict(bn._parameters)
        new._buffers = dict(bn._buffers)
        return new.train(bn.training)


class ConvBNAct(nn.Conv2d):
    """Conv2d + BatchNorm2d (+ ReLU), one fused kernel in eval mode.

    Standalone, the BN is a child (``bn``). Made by ``fastres.convert`` from a stem
    (conv1, bn1, relu) it borrows the model's BN, which stays registered where it was as a
    ``FoldedBatchNorm2d``, so the model's state_dict keys do not change.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = False, relu: bool = True,
                 norm_layer: Optional[Callable[..., nn.Module]] = None, device=None,
                 dtype=None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, device=device, dtype=dtype)
        self.bn = (norm_layer or nn.BatchNorm2d)(out_channels, device=device, dtype=dtype)
        self.relu = relu

    @classmethod
    def borrowing(cls, conv: nn.Conv2d, bn: FoldedBatchNorm2d, relu: bool) -> "ConvBNAct":
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                  conv.padding, conv.dilation, conv.groups, conv.bias is not None, relu,
                  device="meta")
        new.padding_mode = conv.padding_mode
        new._parameters = dict(conv._parameters)
        del new._modules["bn"]
        new.__dict__["bn"] = bn  # a reference, not a child: the model owns it
        return new.train(conv.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if can_fold(self, self.bn):
            return fused_conv_bn(x, self, self.bn, self.relu)
        if training.runs_fused(x, (self, self.bn)):
            return training.conv_bn(x, self, self.bn, self.relu)
        training.check_sync_runs((self, self.bn))
        y = self._conv_forward(x, self.weight, self.bias)
        y = self.bn.normalize(y) if isinstance(self.bn, FoldedBatchNorm2d) else self.bn(y)
        return F.relu(y) if self.relu else y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", relu={self.relu}"
