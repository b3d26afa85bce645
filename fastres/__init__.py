"""fastres: fused Triton kernels for residual networks.

    import fastres
    model = fastres.convert(torchvision.models.resnet50(weights=...)).eval()
"""
from fastres import ops
from fastres.blocks import BasicBlock, Bottleneck, ConvBNAct, PadShortcut
from fastres.convert import convert
from fastres import models

__all__ = ["BasicBlock", "Bottleneck", "ConvBNAct", "PadShortcut", "convert", "models", "ops"]
__version__ = "0.1.0"
