"""``fastres.convert(model)``: swap fastres modules into an existing ResNet, in place.

Every torchvision or timm ``BasicBlock``/``Bottleneck`` becomes the fastres block of the same
kind, built around the *same* child modules (so Parameters, buffers and state_dict keys are
shared and unchanged); a stem ``conv1 -> bn1 -> relu`` (timm: ``act1``) becomes a
``ConvBNAct`` that borrows ``bn1``. timm blocks convert only in their plain form: ReLU
activations and no attention, anti-aliasing, drop-block or drop-path (timm's
``resnet*``, ``resnext*``, ``wide_resnet*``). Converting twice changes nothing. Modules that
look like residual blocks but are of an unknown type or use an unsupported option are left
alone and reported with a warning.
"""
import warnings

import torch.nn as nn

from fastres.blocks import BasicBlock, Bottleneck, ConvBNAct, FoldedBatchNorm2d

KNOWN_BLOCKS = {
    ("torchvision.models.resnet", "BasicBlock"): BasicBlock,
    ("torchvision.models.resnet", "Bottleneck"): Bottleneck,
    ("timm.models.resnet", "BasicBlock"): BasicBlock,
    ("timm.models.resnet", "Bottleneck"): Bottleneck,
}
# timm's blocks: optional layers that must be absent (None or Identity), and the activations
# (plain ReLU), all replaced by the fastres block's single ``relu``.
TIMM_OPTIONAL = ("drop_block", "aa", "se", "drop_path")
TIMM_ACTS = ("act1", "act2", "act3")


def _plain_timm_block(old: nn.Module) -> bool:
    optional_ok = all(type(getattr(old, n, None)) in (type(None), nn.Identity)
                      for n in TIMM_OPTIONAL)
    acts = [getattr(old, n) for n in TIMM_ACTS if hasattr(old, n)]
    return optional_ok and len(acts) > 0 and all(type(a) is nn.ReLU for a in acts)


def _fastres_block(old: nn.Module):
    cls = KNOWN_BLOCKS.get((type(old).__module__, type(old).__name__))
    if cls is None:
        return None
    timm = type(old).__module__.startswith("timm.")
    if timm and not _plain_timm_block(old):
        return None
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for name, child in old.named_children():
        if not (timm and name in TIMM_OPTIONAL + TIMM_ACTS):
            setattr(new, name, child)
    if timm:
        new.relu = nn.ReLU(inplace=True)
    new.downsample = old.downsample  # a child, or a plain None attribute
    new.stride = old.stride
    return new.train(old.training)


def convert_stem(model: nn.Module) -> bool:
    """Fuse ``model.conv1 -> model.bn1 -> model.relu`` (torchvision's and the CIFAR ResNet's
    stem; timm calls the ReLU ``act1``) into one ConvBNAct. Returns whether it did."""
    act = "act1" if hasattr(model, "act1") else "relu"
    conv, bn, relu = (getattr(model, n, None) for n in ("conv1", "bn1", act))
    if type(conv) is not nn.Conv2d or type(bn) is not nn.BatchNorm2d or type(relu) is not nn.ReLU:
        return False
    if not hasattr(model, "layer1"):  # a block's conv1/bn1/relu, not a network's stem
        return False
    model.bn1 = FoldedBatchNorm2d.sharing(bn)
    model.conv1 = ConvBNAct.borrowing(conv, model.bn1, relu=True)
    setattr(model, act, nn.Identity())
    return True


def _looks_residual(module: nn.Module) -> bool:
    name = type(module).__name__
    return "Block" in name or "Bottleneck" in name


def convert(model: nn.Module) -> nn.Module:
    """Replace torchvision/timm ResNet blocks and stems in ``model`` with fastres modules (in place)
    and return ``model``. Works on any nesting (DataParallel, DDP, a backbone inside a
    detector) and on models already on the GPU."""
    unknown = set()

    def visit(module: nn.Module) -> None:
        convert_stem(module)
        for name, child in list(module.named_children()):
            new = _fastres_block(child)
            if new is not None:
                setattr(module, name, new)
                continue
            if _looks_residual(child) and not isinstance(child, (BasicBlock, Bottleneck)):
                unknown.add(f"{type(child).__module__}.{type(child).__name__}")
            visit(child)

    visit(model)
    if unknown:
        warnings.warn("fastres.convert left these residual-looking modules unconverted "
                      f"(unknown types or unsupported options): {sorted(unknown)}",
                      stacklevel=2)
    return model
