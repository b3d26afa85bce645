"""fastres: fused Triton kernels for residual networks.

    import fastres
    model = fastres.convert(torchvision.models.resnet50(weights=...)).eval()
"""
from fastres import ops
from fastres import flops  # registers the FlopCounterMode formulas of fastres' ops
from fastres.blocks import BasicBlock, Bottleneck, ConvBNAct, FusedBlock, PadShortcut
from fastres.convert import convert
from fastres.fused import unfused
from fastres import models
from fastres.training import sync_batchnorm
from fastres.warmup import warmup

__all__ = ["BasicBlock", "Bottleneck", "ConvBNAct", "FusedBlock", "PadShortcut", "convert", "models", "ops",
           "sync_batchnorm", "unfused", "warmup"]
__version__ = "0.1.0"
