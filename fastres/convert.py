"""``fastres.convert(model)``: make an existing ResNet's blocks (and stem) run fused, in place.

Nothing is rebuilt: every torchvision or timm ``BasicBlock``/``Bottleneck`` keeps its
submodules, Parameters (in the layout they have), buffers, hooks and state_dict keys, and
gets a subclass of its own
class with ``fastres.blocks.FusedBlock`` in front (as ``torch.nn.utils.parametrize`` does
for a parametrized module): the block still is a torchvision (timm) block, and where the
kernels cannot run it (``fastres.fused`` decides at each call) it runs its class's own
forward. A torchvision ``ResNet`` likewise gets a subclass whose stem goes through
``fastres.fused.stem``. The subclasses are module attributes here (``TorchvisionBasicBlock``,
...), so pickling and ``copy.deepcopy`` work. timm's stem is left as it is (op by op).
Converting twice changes nothing; modules that look like residual blocks but are of an
unknown type are left alone and reported with a warning.
"""
import importlib
import warnings

import torch.nn as nn

from fastres.blocks import BASIC_PARTS, BOTTLENECK_PARTS, FusedBlock, FusedStem

TIMM_OPTIONAL = ("drop_block", "aa", "se", "drop_path")


# name of the fused subclass -> (module and class it extends, mixin, class attributes)
FUSED_CLASSES = {
    "TorchvisionBasicBlock": ("torchvision.models.resnet", "BasicBlock", FusedBlock,
                              BASIC_PARTS),
    "TorchvisionBottleneck": ("torchvision.models.resnet", "Bottleneck", FusedBlock,
                              BOTTLENECK_PARTS),
    "TimmBasicBlock": ("timm.models.resnet", "BasicBlock", FusedBlock,
                       dict(BASIC_PARTS, ACTS=("act1", "act2"), OPTIONAL=TIMM_OPTIONAL)),
    "TimmBottleneck": ("timm.models.resnet", "Bottleneck", FusedBlock,
                       dict(BOTTLENECK_PARTS, ACTS=("act1", "act2", "act3"),
                            OPTIONAL=TIMM_OPTIONAL)),
    "TorchvisionResNet": ("torchvision.models.resnet", "ResNet", FusedStem, {}),
}
_BY_BASE = {(module, cls): name for name, (module, cls, _, _) in FUSED_CLASSES.items()}


def fused_class(name: str) -> type:
    """The fused subclass ``name`` of ``FUSED_CLASSES``, made on first use."""
    cls = globals().get(name)
    if cls is None:
        module, base_name, mixin, attrs = FUSED_CLASSES[name]
        base = getattr(importlib.import_module(module), base_name)
        cls = type(name, (mixin, base), dict(attrs, __module__=__name__, __qualname__=name))
        globals()[name] = cls
    return cls


def __getattr__(name: str):  # pickle finds fastres.convert.TorchvisionBasicBlock & co here
    if name in FUSED_CLASSES:
        return fused_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _convert_one(module: nn.Module) -> bool:
    """Give ``module`` its fused subclass if it is a known block or ResNet; True if it is
    (or already was) fused."""
    if isinstance(module, (FusedBlock, FusedStem)):
        return True
    name = _BY_BASE.get((type(module).__module__, type(module).__name__))
    if name is None:
        return False
    module.__class__ = fused_class(name)
    return True


def _looks_residual(module: nn.Module) -> bool:
    name = type(module).__name__
    return "Block" in name or "Bottleneck" in name


def convert(model: nn.Module) -> nn.Module:
    """Make the torchvision/timm ResNet blocks (and torchvision ResNet stems) in ``model`` run
    on fastres' kernels, in place, and return ``model``. Works on any nesting
    (DataParallel, DDP, a backbone inside a detector) and on models already on the GPU."""
    unknown = set()
    for module in model.modules():
        if not _convert_one(module) and _looks_residual(module):
            unknown.add(f"{type(module).__module__}.{type(module).__name__}")
    if unknown:
        warnings.warn("fastres.convert left these residual-looking modules unconverted "
                      f"(unknown types): {sorted(unknown)}", stacklevel=2)
    return model
