"""Shared test facts: the device the kernels run on, per-dtype tolerances, reference helpers."""
import torch
import torch.nn as nn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Relative L2 error ||out - ref|| / ||ref|| allowed against a float64 (or fp32) reference.
# fp32 on the interpreter is exact up to summation order; on a GPU the dot may use tf32.
REL_TOL = {
    torch.float32: 1e-5 if DEVICE == "cpu" else 2e-3,
    torch.float16: 3e-3,
    torch.bfloat16: 2e-2,
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "output has NaN/Inf"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = rel_err(out, ref)
    assert err <= REL_TOL[dtype], f"{what}: relative error {err:.3g} > {REL_TOL[dtype]:.1g} ({dtype})"


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics and affine parameters (never the identity), in place."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            with torch.no_grad():
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                    m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(n, generator=g) - 0.5)
    return model


class ConvCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts aten convolution calls, to prove a fused forward never ran a torch conv."""

    def __init__(self):
        super().__init__()
        self.convs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "convolution" in func.__name__ or "conv2d" in func.__name__:
            self.convs += 1
        return func(*args, **(kwargs or {}))


def block_pair(kind: str = "basic", inplanes: int = 8, planes: int = 16, stride: int = 2,
               projection: bool = True, groups: int = 1, base_width: int = 64,
               dilation: int = 1, bn_kw=None, seed: int = 0):
    """The one block-pair fixture: a torchvision block (on the CPU) and a fastres block of
    the same kind and state (on DEVICE), conv weights Kaiming-normal, BN statistics and
    affine parameters random, both in train mode (call .eval() for inference)."""
    import copy

    import torchvision.models.resnet as tv

    import fastres
    torch.manual_seed(seed)
    tv_cls, fr_cls = (tv.BasicBlock, fastres.BasicBlock) if kind == "basic" else \
        (tv.Bottleneck, fastres.Bottleneck)
    norm = lambda c: nn.BatchNorm2d(c, **(bn_kw or {}))  # noqa: E731
    out = planes * tv_cls.expansion
    down = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), norm(out)) \
        if projection else None
    ref = tv_cls(inplanes, planes, stride, down, groups, base_width, dilation, norm)
    for p in ref.parameters():
        if p.dim() == 4:
            nn.init.kaiming_normal_(p)
    randomize_bn(ref, seed)
    ours = fr_cls(inplanes, planes, stride, copy.deepcopy(down), groups, base_width, dilation,
                  norm)
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict()), "state_dict keys differ"
    return ref.train(), ours.to(DEVICE).train()
