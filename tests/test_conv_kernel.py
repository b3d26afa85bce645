"""The fused conv op against torch.nn.functional in float64, across geometries and dtypes."""
import pytest
import torch
import torch.nn.functional as F

import fastres.ops as ops
from helpers import DEVICE, ConvCounter, assert_close

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



def _inputs(c, k, ksz, groups, h, w, batch, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c, h, w, generator=g).to(dtype)
    weight = (torch.randn(k, c // groups, ksz, ksz, generator=g) / (c // groups * ksz * ksz) ** 0.5)
    bias = torch.randn(k, generator=g)
    return x, weight.to(dtype), bias


def _kernel_layout(weight):
    return weight.permute(2, 3, 1, 0).reshape(-1, weight.shape[0]).contiguous()


def _run(x, weight, bias, stride, padding, dilation, groups, relu, **extra):
    ksz = weight.shape[-1]
    return ops.conv_bn_act(x.to(DEVICE), _kernel_layout(weight).to(DEVICE), bias.to(DEVICE),
                           kernel_size=(ksz, ksz), stride=(stride, stride),
                           padding=(padding, padding), dilation=(dilation, dilation),
                           groups=groups, relu=relu, **extra)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geom", GEOMETRIES, ids=lambda g: "x".join(map(str, g)))
def test_conv_bias_relu(geom, dtype, path):
    c, k, ksz, stride, pad, dil, groups, h, w = geom
    batch = 3 if h > 1 else 1
    x, weight, bias = _inputs(c, k, ksz, groups, h, w, batch, dtype)
    y = _run(x, weight, bias, stride, pad, dil, groups, relu=True)
    ref = F.relu(F.conv2d(x.double(), weight.double(), bias.double(), stride, pad, dil, groups))
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y.cpu(), ref, dtype, f"conv {geom}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_residual_add_then_relu(dtype, path):
    x, weight, bias = _inputs(8, 16, 3, 1, 9, 9, 2, dtype, seed=1)
    res = torch.randn(2, 16, 9, 9).to(dtype)
    y = _run(x, weight, bias, 1, 1, 1, 1, relu=True, residual=res.to(DEVICE))
    ref = F.relu(F.conv2d(x.double(), weight.double(), bias.double(), 1, 1) + res.double())
    assert_close(y.cpu(), ref, dtype, "residual")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_projection_shortcut_second_gemm(dtype, path):
    """conv3x3(y1) + conv1x1_stride2(x): the shortcut accumulates into the same tile."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 12, 13, 13, generator=g).to(dtype)
    y1 = torch.randn(3, 8, 7, 7, generator=g).to(dtype)
    w1 = (torch.randn(24, 8, 3, 3, generator=g) / 8).to(dtype)
    w2 = (torch.randn(24, 12, 1, 1, generator=g) / 4).to(dtype)
    bias = torch.randn(24, generator=g)
    y = _run(y1, w1, bias, 1, 1, 1, 1, relu=True, shortcut=x.to(DEVICE),
             shortcut_w=w2.reshape(24, 12).t().contiguous().to(DEVICE), shortcut_stride=2)
    ref = F.relu(F.conv2d(y1.double(), w1.double(), bias.double(), 1, 1)
                 + F.conv2d(x.double(), w2.double(), stride=2))
    assert_close(y.cpu(), ref, dtype, "projection")


def test_option_a_residual_pattern(path):
    """CIFAR option A: residual x[:, :, ::2, ::2] zero-padded by 4 channels on each side."""
    x, weight, bias = _inputs(16, 16, 3, 1, 4, 4, 2, torch.float32, seed=3)
    block_in = torch.randn(2, 8, 8, 8)
    y = _run(x, weight, bias, 1, 1, 1, 1, relu=True, residual=block_in.to(DEVICE),
             res_step=2, res_off=4)
    shortcut = F.pad(block_in[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4)).double()
    ref = F.relu(F.conv2d(x.double(), weight.double(), bias.double(), 1, 1) + shortcut)
    assert_close(y.cpu(), ref, torch.float32, "option A")


def test_non_contiguous_and_nchw_inputs_are_correct(path):
    x, weight, bias = _inputs(8, 16, 3, 1, 12, 12, 2, torch.float32, seed=4)
    sliced = x[:, :, 1:10:2, ::3]  # strided view, NCHW memory
    y = _run(sliced, weight, bias, 1, 1, 1, 1, relu=False)
    ref = F.conv2d(sliced.double(), weight.double(), bias.double(), 1, 1)
    assert_close(y.cpu(), ref, torch.float32, "sliced input")


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the interpreter dispatch")
def test_triton_kernel_runs_and_no_torch_conv(monkeypatch):
    launches = []
    real = ops.conv_fused
    monkeypatch.setattr(ops, "conv_fused", lambda *a, **k: launches.append(1) or real(*a, **k))
    x, weight, bias = _inputs(8, 16, 3, 1, 7, 7, 1, torch.float32)
    with ConvCounter() as counter:
        _run(x, weight, bias, 1, 1, 1, 1, relu=True)
    assert launches == [1]
    assert counter.convs == 0


def test_any_weight_layout_reaches_the_right_answer(path):
    """The op takes (R*S*C_g, K) weights in any memory layout: contiguous (the kernel's) or the
    transposed view of OHWI memory (what the fold gives the plain-PyTorch path)."""
    x, weight, bias = _inputs(8, 16, 3, 1, 7, 7, 2, torch.float32, seed=5)
    ohwi_view = weight.permute(0, 2, 3, 1).reshape(16, -1).contiguous().t()
    y = ops.conv_bn_act(x.to(DEVICE), ohwi_view.to(DEVICE), bias.to(DEVICE), kernel_size=(3, 3),
                        stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, relu=False)
    ref = F.conv2d(x.double(), weight.double(), bias.double(), 1, 1)
    assert_close(y.cpu(), ref, torch.float32, "OHWI-view weights")


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("geom", [(3, 16, 7, 2, 3, 1, 1, 13, 11), (16, 16, 3, 1, 2, 2, 4, 7, 7)],
                         ids=["stem", "dilated-groups-of-4"])
def test_tap_packing_on_and_off(geom, pack, monkeypatch):
    """Few channels a group reduce over (s, c) pairs (PACK); the tap-by-tap loop stays right."""
    import fastres.kernels.conv as kconv
    c, k, ksz, stride, pad, dil, groups, h, w = geom
    assert kconv.packs_taps(c // groups, ksz)
    monkeypatch.setattr(kconv, "packs_taps", lambda c_g, s: pack)
    x, weight, bias = _inputs(c, k, ksz, groups, h, w, 2, torch.float32, seed=6)
    y = _run(x, weight, bias, stride, pad, dil, groups, relu=False)
    ref = F.conv2d(x.double(), weight.double(), bias.double(), stride, pad, dil, groups)
    assert_close(y.cpu(), ref, torch.float32, f"pack={pack}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("split", [2, 3])
def test_split_k_with_every_epilogue(split, dtype):
    """Split-K (layer4 at small batch): partial sums in fp32, added in order by the epilogue
    kernel with bias, projection shortcut, residual and ReLU; deterministic."""
    from fastres.kernels.conv import conv_fused
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 40, 5, 5, generator=g).to(dtype)
    block_in = torch.randn(2, 24, 9, 9, generator=g).to(dtype)
    weight = (torch.randn(32, 40, 3, 3, generator=g) / 19).to(dtype)
    w2 = (torch.randn(32, 24, 1, 1, generator=g) / 5).to(dtype)
    bias = torch.randn(32, generator=g)
    cl = torch.channels_last
    kw = dict(kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1,
              relu=True, shortcut=block_in.to(DEVICE).contiguous(memory_format=cl),
              shortcut_stride=2, shortcut_w=w2.reshape(32, 24).t().contiguous().to(DEVICE),
              split=split)
    xs = x.to(DEVICE).contiguous(memory_format=cl)
    y = conv_fused(xs, _kernel_layout(weight).to(DEVICE), bias.to(DEVICE), **kw)
    ref = F.relu(F.conv2d(x.double(), weight.double(), bias.double(), 1, 1)
                 + F.conv2d(block_in.double(), w2.double(), stride=2))
    assert_close(y.cpu(), ref, dtype, f"split {split}")
    again = conv_fused(xs, _kernel_layout(weight).to(DEVICE), bias.to(DEVICE), **kw)
    assert torch.equal(y, again)
    res = torch.randn(2, 32, 5, 5, generator=g).to(dtype)
    kw.update(shortcut=None, shortcut_w=None, residual=res.to(DEVICE).contiguous(memory_format=cl))
    y = conv_fused(xs, _kernel_layout(weight).to(DEVICE), bias.to(DEVICE), **kw)
    ref = F.relu(F.conv2d(x.double(), weight.double(), bias.double(), 1, 1) + res.double())
    assert_close(y.cpu(), ref, dtype, f"split {split} residual")


def test_split_k_heuristic():
    from fastres.kernels.conv import split_k
    assert split_k(tiles=4, chunks_per_tap=8, taps=9, sms=132) == 8   # layer4 3x3, batch 1
    assert split_k(tiles=4, chunks_per_tap=32, taps=1, sms=132) == 8  # layer4 1x1 2048->512
    assert split_k(tiles=400, chunks_per_tap=8, taps=9, sms=132) == 1  # batch 256 fills the GPU
    assert split_k(tiles=4, chunks_per_tap=1, taps=9, sms=132) == 1   # one chunk a tap
