"""fastres: fused Triton kernels for residual networks.

    import fastres
    model = fastres.convert(torchvision.models.resnet50(weights=...)).eval()
"""
from fastres import ops
from fastres import flops  # registers the FlopCounterMode formula of fastres' op
from fastres.blocks import BasicBlock, Bottleneck, ConvBNAct, PadShortcut
from fastres.convert import convert
from fastres import models
from fastres.training import sync_batchnorm
from fastres.warmup import warmup

__all__ = ["BasicBlock", "Bottleneck", "ConvBNAct", "PadShortcut", "convert", "models", "ops",
           "sync_batchnorm", "warmup"]
__version__ = "0.1.0"
