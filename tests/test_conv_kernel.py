"""The fused eval conv + BatchNorm (``fastres.fused.conv_bn_act``, the one entry point the
blocks and the stem call) against nn.Conv2d + nn.BatchNorm2d in float64, across geometries
and dtypes, on the Triton kernels (the plain-PyTorch path runs the modules themselves)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastres import fused
from helpers import DEVICE, ConvCounter, assert_close, randomize_bn

# (C, K, kernel, stride, padding, dilation, groups, H, W)
GEOMETRIES = [
    (16, 32, 1, 1, 0, 1, 1, 7, 7),     # 1x1 stride 1 (plain GEMM)
    (16, 24, 1, 2, 0, 1, 1, 13, 13),   # 1x1 stride 2 (projection shape)
    (8, 16, 3, 1, 1, 1, 1, 7, 5),      # 3x3, non-square input
    (8, 16, 3, 2, 1, 1, 1, 13, 13),    # 3x3 stride 2, odd size
    (3, 16, 7, 2, 3, 1, 1, 13, 11),    # the stem
    (16, 16, 3, 1, 2, 2, 1, 7, 7),     # dilation 2 (replace_stride_with_dilation)
    (32, 32, 3, 2, 1, 1, 8, 7, 7),     # groups (ResNeXt), 4 channels a group
    (64, 64, 3, 1, 1, 1, 32, 5, 5),    # 32 groups of 2
    (8, 8, 3, 1, 1, 1, 1, 1, 1),       # H = W = 1
    (20, 40, 3, 1, 0, 1, 1, 3, 3),     # no padding, channels not a power of two
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def conv_bn(c, k, ksz, stride=1, pad=0, dil=1, groups=1, dtype=torch.float32, bias=False,
            seed=0, affine=True):
    """An eval nn.Conv2d + nn.BatchNorm2d with random weights and BN state, cast to dtype."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(c, k, ksz, stride, pad, dil, groups, bias=bias)
    bn = randomize_bn(nn.BatchNorm2d(k, affine=affine), seed)
    return conv.to(DEVICE, dtype).eval(), bn.to(DEVICE, dtype).eval()


def reference(x, conv, bn, relu=True, residual=None, shortcut=None, projection=None):
    """The modules' math in float64 on the CPU."""
    d = lambda m: __import__("copy").deepcopy(m).cpu().double()  # noqa: E731
    y = d(bn)(d(conv)(x.cpu().double()))
    if projection is not None:
        y = y + d(projection[1])(d(projection[0])(shortcut.cpu().double()))
    if residual is not None:
        y = y + residual.cpu().double()
    return F.relu(y) if relu else y


def _inputs(c, h, w, batch, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, c, h, w, generator=g).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geom", GEOMETRIES, ids=lambda g: "x".join(map(str, g)))
def test_conv_bn_relu(geom, dtype):
    c, k, ksz, stride, pad, dil, groups, h, w = geom
    conv, bn = conv_bn(c, k, ksz, stride, pad, dil, groups, dtype)
    x = _inputs(c, h, w, 3 if h > 1 else 1, dtype)
    with torch.no_grad():
        y = fused.conv_bn_act(x, conv, bn, True)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y.cpu(), reference(x, conv, bn), dtype, f"conv {geom}")


@pytest.mark.parametrize("affine, bias", [(False, False), (True, True), (False, True)])
def test_batchnorm_variants(affine, bias):
    """affine=False BN (no gamma/beta) and a conv with its own bias, folded into the shift."""
    conv, bn = conv_bn(8, 16, 3, 1, 1, bias=bias, affine=affine, seed=8)
    x = _inputs(8, 7, 7, 2, torch.float32)
    with torch.no_grad():
        y = fused.conv_bn_act(x, conv, bn, False)
    assert_close(y.cpu(), reference(x, conv, bn, relu=False), torch.float32, "BN variant")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_bn_params_in_fp32_with_half_activations(dtype):
    """Under autocast the BN state stays fp32 while the conv runs in half precision."""
    conv, bn = conv_bn(8, 16, 3, 1, 1, seed=9)
    x = _inputs(8, 7, 7, 2, torch.float32)
    with torch.no_grad(), torch.autocast(x.device.type, dtype=dtype):
        y = fused.conv_bn_act(x, conv, bn, True)
    assert y.dtype == dtype
    assert_close(y.cpu(), reference(x, conv, bn), dtype, "autocast")


def test_large_gamma_tiny_variance_stays_finite_in_fp16():
    """Nothing is folded into fp16 weights: gamma 2000 over sqrt(1e-8 + eps) scales the fp32
    accumulator, not the weights (a folded weight would overflow to inf)."""
    conv, bn = conv_bn(8, 16, 3, 1, 1, seed=10)
    with torch.no_grad():
        bn.weight[3], bn.running_var[3], bn.eps = 2000.0, 1e-8, 1e-8
        conv.weight.mul_(1e-3)
    conv, bn = conv.half(), bn.half()
    x = _inputs(8, 7, 7, 2, torch.float16)
    with torch.no_grad():
        y = fused.conv_bn_act(x, conv, bn, True)
    ref = reference(x, conv, bn)
    assert torch.isfinite(ref).all()
    assert_close(y.cpu(), ref, torch.float16, "large gamma")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_residual_add_then_relu(dtype):
    conv, bn = conv_bn(8, 16, 3, 1, 1, dtype=dtype, seed=1)
    x = _inputs(8, 9, 9, 2, dtype, seed=1)
    res = _inputs(16, 9, 9, 2, dtype, seed=11)
    with torch.no_grad():
        y = fused.conv_bn_act(x, conv, bn, True, residual=res)
    assert_close(y.cpu(), reference(x, conv, bn, residual=res), dtype, "residual")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_projection_shortcut_keeps_its_own_batchnorm(dtype):
    """bn(conv3x3(y1)) + bn_sc(conv1x1_stride2(x)): the shortcut is a second GEMM in the same
    kernel, with its own accumulator and BN."""
    conv, bn = conv_bn(8, 24, 3, 1, 1, dtype=dtype, seed=2)
    pconv, pbn = conv_bn(12, 24, 1, 2, 0, dtype=dtype, seed=3)
    x = _inputs(12, 13, 13, 3, dtype, seed=2)
    y1 = _inputs(8, 7, 7, 3, dtype, seed=3)
    with torch.no_grad():
        y = fused.conv_bn_act(y1, conv, bn, True, projection=(pconv, pbn), shortcut=x)
    ref = reference(y1, conv, bn, shortcut=x, projection=(pconv, pbn))
    assert_close(y.cpu(), ref, dtype, "projection")


def test_option_a_residual_pattern():
    """CIFAR option A: residual x[:, :, ::2, ::2] zero-padded by 4 channels on each side."""
    conv, bn = conv_bn(16, 16, 3, 1, 1, seed=3)
    x = _inputs(16, 4, 4, 2, torch.float32, seed=3)
    block_in = _inputs(8, 8, 8, 2, torch.float32, seed=4)
    with torch.no_grad():
        y = fused.conv_bn_act(x, conv, bn, True, residual=block_in, res_step=2, res_off=4)
    shortcut = F.pad(block_in[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4))
    assert_close(y.cpu(), reference(x, conv, bn, residual=shortcut), torch.float32, "option A")


def test_non_contiguous_inputs_and_weights_in_any_layout():
    """Any input view and any weight layout: the kernels read channels_last activations and
    OHWI weights, made so for the call when they are not."""
    conv, bn = conv_bn(8, 16, 3, 1, 1, seed=4)
    x = _inputs(8, 12, 12, 2, torch.float32, seed=4)[:, :, 1:10:2, ::3]
    with torch.no_grad():
        for layout in (torch.contiguous_format, torch.channels_last):
            conv.weight.data = conv.weight.data.contiguous(memory_format=layout)
            y = fused.conv_bn_act(x, conv, bn, False)
            assert_close(y.cpu(), reference(x, conv, bn, relu=False), torch.float32, str(layout))


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the interpreter dispatch")
def test_triton_kernel_runs_and_no_torch_conv(monkeypatch):
    import fastres.ops.conv_bn_act as op_file
    launches = []
    real = op_file.conv_fused
    monkeypatch.setattr(op_file, "conv_fused", lambda *a, **k: launches.append(1) or real(*a, **k))
    conv, bn = conv_bn(8, 16, 3, 1, 1)
    with torch.no_grad(), ConvCounter() as counter:
        fused.conv_bn_act(_inputs(8, 7, 7, 1, torch.float32), conv, bn, True)
    assert launches == [1]
    assert counter.convs == 0
