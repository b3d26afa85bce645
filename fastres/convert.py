"""``fastres.convert(model)``: swap fastres modules into an existing ResNet, in place.

Every torchvision ``BasicBlock``/``Bottleneck`` becomes the fastres block of the same kind,
built around the *same* child modules (so Parameters, buffers and state_dict keys are
shared and unchanged); a stem ``conv1 -> bn1 -> relu`` becomes a ``ConvBNAct`` that borrows
``bn1``. Converting twice changes nothing. Modules that look like residual blocks but are of
an unknown type are left alone and reported with a warning.
"""
import warnings

import torch.nn as nn

from fastres.blocks import BasicBlock, Bottleneck, ConvBNAct, FoldedBatchNorm2d

KNOWN_BLOCKS = {
    ("torchvision.models.resnet", "BasicBlock"): BasicBlock,
    ("torchvision.models.resnet", "Bottleneck"): Bottleneck,
}


def _fastres_block(old: nn.Module):
    cls = KNOWN_BLOCKS.get((type(old).__module__, type(old).__name__))
    if cls is None:
        return None
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for name, child in old.named_children():
        setattr(new, name, child)
    new.downsample = old.downsample  # a child, or a plain None attribute
    new.stride = old.stride
    return new.train(old.training)


def convert_stem(model: nn.Module) -> bool:
    """Fuse ``model.conv1 -> model.bn1 -> model.relu`` (torchvision's and the CIFAR ResNet's
    stem) into one ConvBNAct. Returns whether it did."""
    conv, bn, relu = (getattr(model, n, None) for n in ("conv1", "bn1", "relu"))
    if type(conv) is not nn.Conv2d or type(bn) is not nn.BatchNorm2d or type(relu) is not nn.ReLU:
        return False
    if not hasattr(model, "layer1"):  # a block's conv1/bn1/relu, not a network's stem
        return False
    model.bn1 = FoldedBatchNorm2d.sharing(bn)
    model.conv1 = ConvBNAct.borrowing(conv, model.bn1, relu=True)
    model.relu = nn.Identity()
    return True


def _looks_residual(module: nn.Module) -> bool:
    name = type(module).__name__
    return "Block" in name or "Bottleneck" in name


def convert(model: nn.Module) -> nn.Module:
    """Replace torchvision ResNet blocks and stems in ``model`` with fastres modules (in place)
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
                      f"(unknown types): {sorted(unknown)}", stacklevel=2)
    return model
