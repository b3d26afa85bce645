"""Drop-in ResNet blocks: torchvision's constructors, attribute names and state_dict keys.

``FusedBlock`` is a mixin put in front of a block class (fastres' own below; torchvision's
and timm's through ``fastres.convert``). At every call it reads the block's live submodules
(``fastres.fused``): when they are what the kernels compute, each conv + BN (+ ReLU) is one
launch (eval: BN in the conv's epilogue, the shortcut and final ReLU in the last conv's;
train: the training kernels); otherwise the block class's own forward runs, op by op.
"""
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastres import fused, training


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


class FusedBlock:
    """Runs a residual block fused when its live submodules allow, else the block class's
    own forward. A subclass names its parts: ``CONVS`` the (conv, bn) attribute pairs in
    order, ``ACTS`` the activation after each (the last one after the residual add),
    ``OPTIONAL`` attributes that must be None or nn.Identity (timm's drop_block, aa, se,
    drop_path)."""

    CONVS = ()
    ACTS = ()
    OPTIONAL = ()

    def forward(self, x):
        problem, pairs, projection = self.fusion_plan(x)
        if problem:
            training.check_sync_runs(*(getattr(self, bn) for _, bn in self.CONVS))
            return super().forward(x)
        out = x
        for conv, bn in pairs[:-1]:
            out = fused.conv_bn_act(out, conv, bn, True)
        conv, bn = pairs[-1]
        if projection is not None:
            return fused.conv_bn_act(out, conv, bn, True, projection=projection, shortcut=x)
        return fused.conv_bn_act(out, conv, bn, True, **self.residual_of(x))

    def fusion_plan(self, x):
        """(problem, pairs, projection): why this call runs op by op ('' when fused; a
        warning says why once per block unless the reason is one of ``fused.silent_reason``'s
        or autograd recording in eval), the live (conv, bn) pairs, and the downsample as a
        fusable (conv, bn) projection or None."""
        reason = fused.silent_reason(x)
        if reason:
            return reason, None, None
        pairs = []
        for (conv_name, bn_name), act_name in zip(self.CONVS, self.ACTS):
            conv, bn = getattr(self, conv_name), getattr(self, bn_name)
            problem = fused.pair_problem(conv, bn, getattr(self, act_name),
                                         (conv_name, bn_name, act_name))
            if problem:
                return self._warn(problem), None, None
            pairs.append((conv, bn))
        for name in self.OPTIONAL:
            part = getattr(self, name, None)
            if part is not None and type(part) is not nn.Identity:
                return self._warn(f"{name} is a {type(part).__name__}"), None, None
        if fused._global_hooks():
            return self._warn("global module hooks are registered"), None, None
        eval_mode = fused.uses_running_stats(pairs[-1][1])
        projection = fused.projection_of(self.downsample, eval_mode)
        if torch.is_grad_enabled():
            evals = [pair for pair in pairs + [projection or pairs[-1]]
                     if fused.uses_running_stats(pair[1])]
            if evals and fused.records_autograd(x, evals):
                return "autograd recording in eval", None, None
        return "", pairs, projection

    def _warn(self, problem: str) -> str:
        fused.warn_once(self, problem)
        return problem

    def residual_of(self, x) -> dict:
        """The shortcut as the last conv's residual: the identity, option A as a load
        pattern, or any other downsample module run as it is."""
        ds = self.downsample
        if ds is None:
            return {"residual": x}
        if type(ds) is PadShortcut and not fused._hooked(ds):
            return {"residual": x, "res_step": ds.stride, "res_off": ds.pad}
        return {"residual": ds(x)}


class FusedStem:
    """torchvision ResNet's ``_forward_impl`` with the stem (conv1 -> bn1 -> relu) through
    ``fastres.fused.stem``: a mixin for ``fastres.models.ResNet`` and converted torchvision
    ResNets."""

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        x = fused.stem(self, x)
        x = self.maxpool(x)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)

        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)

        return x


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1,
            dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation,
                     groups=groups, bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class ReferenceBasicBlock(nn.Module):
    """torchvision's BasicBlock, op by op."""
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out += identity
        out = self.relu(out)

        return out


class ReferenceBottleneck(nn.Module):
    """torchvision's Bottleneck (V1.5: the stride in the 3x3 conv), op by op."""
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)

        out = self.conv3(out)
        out = self.bn3(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out += identity
        out = self.relu(out)

        return out


BASIC_PARTS = dict(CONVS=(("conv1", "bn1"), ("conv2", "bn2")), ACTS=("relu", "relu"))
BOTTLENECK_PARTS = dict(CONVS=(("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
                        ACTS=("relu", "relu", "relu"))


class BasicBlock(FusedBlock, ReferenceBasicBlock):
    CONVS, ACTS = BASIC_PARTS["CONVS"], BASIC_PARTS["ACTS"]


class Bottleneck(FusedBlock, ReferenceBottleneck):
    CONVS, ACTS = BOTTLENECK_PARTS["CONVS"], BOTTLENECK_PARTS["ACTS"]


class ConvBNAct(nn.Conv2d):
    """Conv2d + BatchNorm2d (child ``bn``) (+ ReLU), one fused launch when the live modules
    allow (as for a block); otherwise ``relu?(bn(conv2d(x)))`` op by op."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = False, padding_mode: str = "zeros",
                 relu: bool = True, norm_layer: Optional[Callable[..., nn.Module]] = None,
                 device=None, dtype=None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode, device=device, dtype=dtype)
        self.bn = (norm_layer or nn.BatchNorm2d)(out_channels, device=device, dtype=dtype)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reason = fused.silent_reason(x)
        if not reason:
            reason = self.fusion_problem()
            if reason:
                fused.warn_once(self, reason)
            elif fused.uses_running_stats(self.bn) and fused.records_autograd(x, ((self, self.bn),)):
                reason = "autograd"
        if reason:
            training.check_sync_runs(self.bn)
            y = self.bn(self._conv_forward(x, self.weight, self.bias))
            return F.relu(y) if self.relu else y
        return fused.conv_bn_act(x, self, self.bn, self.relu)

    def fusion_problem(self) -> str:
        """As a block's: this conv (hooks and parametrizations on it included) and its bn."""
        return fused.pair_problem(self, self.bn, None, ("the conv", "bn", None), ConvBNAct) \
            or ("global module hooks are registered" if fused._global_hooks() else "")

    def extra_repr(self) -> str:
        return super().extra_repr() + f", relu={self.relu}"
