"""What is benchmarked: the units (one place for ResNet-50's conv and block shapes), their
PyTorch reference modules, and the fastres module of each.

A unit is a reference ``nn.Module`` (plain PyTorch / torchvision) plus its input's (C, H, W):

- ``conv``: one distinct conv of a network as conv + BatchNorm + ReLU (what one fused kernel
  computes), named after its first occurrence, e.g. ``resnet50.layer2.0.conv2``. The distinct
  shapes are read off torchvision's own architectures (``distinct_convs``).
- ``block``: every stage's first block (projection shortcut) and second block (identity) of
  ResNet-50, e.g. ``resnet50.layer3.0``, ``resnet50.layer3.1``.
- ``network``: torchvision's ResNet-18..152 at 224x224 and He et al.'s CIFAR ResNet-20/56/110
  (option-A shortcuts) at 32x32.

The fastres version of a unit shares nothing with the reference but the weights: a
``ConvBNAct`` for a conv, ``fastres.convert`` of a copy for blocks and networks.
"""
import copy
import functools
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn as nn
import torchvision
from torchvision.models.resnet import BasicBlock

import fastres
from fastres.blocks import PadShortcut

IMAGENET_NETWORKS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
CIFAR_NETWORKS = ("cifar_resnet20", "cifar_resnet56", "cifar_resnet110")
BLOCK_NAMES = tuple(f"layer{s}.{i}" for s in range(1, 5) for i in (0, 1))


@dataclass(frozen=True)
class Unit:
    name: str                       # e.g. "resnet50.layer3.0"
    kind: str                       # "conv", "block" or "network"
    input_chw: Tuple[int, int, int]
    build: Callable[[], nn.Module]  # a fresh reference module (float32, CPU, train mode)

    def fastres_version(self, ref: nn.Module) -> nn.Module:
        """The fastres module computing what ``ref`` computes, with a copy of its weights."""
        if self.kind != "conv":
            return fastres.convert(copy.deepcopy(ref))
        conv, bn = ref[0], ref[1]
        new = fastres.ConvBNAct(conv.in_channels, conv.out_channels, conv.kernel_size,
                                conv.stride, conv.padding, relu=True)
        new.load_state_dict({"weight": conv.weight,
                             **{f"bn.{k}": v for k, v in bn.state_dict().items()}})
        return new


class CifarResNet(nn.Module):
    """Reference CIFAR-10 ResNet (He et al. 2015, 4.2) from torchvision's BasicBlock: 3x3
    stem of 16 channels, stages of n blocks at 16/32/64 channels, option-A shortcuts."""

    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        layers, inplanes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            down = PadShortcut(stride, (planes - inplanes) // 2) if planes != inplanes else None
            blocks = [BasicBlock(inplanes, planes, stride, down)]
            blocks += [BasicBlock(planes, planes) for _ in range(1, n)]
            layers.append(nn.Sequential(*blocks))
            inplanes = planes
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x))))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_network(name: str) -> nn.Module:
    if name.startswith("cifar_resnet"):
        return CifarResNet(int(name[len("cifar_resnet"):]))
    return getattr(torchvision.models, name)()


@functools.lru_cache(maxsize=None)
def _conv_inputs(network: str) -> Dict[str, Tuple[nn.Conv2d, Tuple[int, int, int]]]:
    """Every Conv2d of a torchvision network (built on the meta device), in forward order,
    with the (C, H, W) of its input at 224x224."""
    with torch.device("meta"):
        model = build_network(network)
        seen = {}

        def record(name: str, conv: nn.Conv2d, x: torch.Tensor) -> None:
            seen.setdefault(name, (conv, tuple(x.shape[1:])))

        for name, m in model.named_modules():
            if isinstance(m, nn.Conv2d):
                m.register_forward_pre_hook(functools.partial(
                    lambda name, m, args: record(name, m, args[0]), name))
        model(torch.empty(1, 3, 224, 224))
    return seen


def _conv_unit(network: str, name: str, conv: nn.Conv2d, chw) -> Unit:
    def build() -> nn.Module:
        return nn.Sequential(nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                                       conv.stride, conv.padding, bias=False),
                             nn.BatchNorm2d(conv.out_channels), nn.ReLU(inplace=True))
    return Unit(f"{network}.{name}", "conv", chw, build)


def distinct_convs(network: str, prefix: str = "") -> List[Unit]:
    """One conv unit per distinct (C, K, kernel, stride, padding, H, W) of ``network``, among
    the convs whose name starts with ``prefix``."""
    units, keys = [], set()
    for name, (conv, chw) in _conv_inputs(network).items():
        key = (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
               conv.padding, chw)
        if name.startswith(prefix) and key not in keys:
            keys.add(key)
            units.append(_conv_unit(network, name, conv, chw))
    return units


@functools.lru_cache(maxsize=None)
def _resnet50() -> nn.Module:
    return torchvision.models.resnet50()


def resnet50_blocks() -> List[Unit]:
    convs = _conv_inputs("resnet50")
    return [Unit(f"resnet50.{name}", "block", convs[f"{name}.conv1"][1],
                 lambda name=name: copy.deepcopy(_resnet50().get_submodule(name)))
            for name in BLOCK_NAMES]


def networks(imagenet_hw: int = 224) -> List[Unit]:
    """Whole networks; ImageNet ones at ``imagenet_hw`` (224 native), CIFAR ones at 32."""
    return ([Unit(n, "network", (3, imagenet_hw, imagenet_hw), functools.partial(build_network, n))
             for n in IMAGENET_NETWORKS]
            + [Unit(n, "network", (3, 32, 32), functools.partial(build_network, n))
               for n in CIFAR_NETWORKS])


def all_units(imagenet_hw: int = 224) -> Dict[str, List[Unit]]:
    """Units by group: ``convs`` (ResNet-50's distinct convs), ``r18convs`` (ResNet-18's
    BasicBlock convs), ``blocks``, ``networks``."""
    return {"convs": distinct_convs("resnet50"),
            "r18convs": distinct_convs("resnet18", prefix="layer"),
            "blocks": resnet50_blocks(),
            "networks": networks(imagenet_hw)}
