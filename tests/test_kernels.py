"""The Triton kernels called directly (``fastres.kernels``): the fused conv with the live
BatchNorm state in its epilogue, split-K, tap packing, dgrad and wgrad, against
torch.nn.functional / torch.nn.grad in float64."""
import pytest
import torch
import torch.nn.functional as F

import fastres.kernels.conv as kconv
from fastres.kernels import configs
from fastres.kernels.conv import BNParams, conv_fused, kernel_weight
from fastres.kernels.conv_bwd import conv_dgrad, conv_wgrad
from helpers import DEVICE, assert_close

CL = torch.channels_last
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (C, K, kernel, stride, padding, dilation, groups, H, W)
GEOMETRIES = [
    (16, 24, 1, 1, 0, 1, 1, 6, 5),     # 1x1 stride 1: the plain-GEMM path
    (16, 24, 1, 2, 0, 1, 1, 9, 9),     # 1x1 stride 2 (projection shape)
    (8, 16, 3, 1, 1, 1, 1, 7, 5),      # 3x3, non-square input
    (8, 16, 3, 2, 1, 1, 1, 9, 9),      # 3x3 stride 2, odd size
    (16, 16, 3, 1, 2, 2, 1, 6, 6),     # dilation 2
    (32, 32, 3, 2, 1, 1, 8, 7, 7),     # groups of 4 channels (ResNeXt): packed taps
    (3, 16, 7, 2, 3, 1, 1, 13, 11),    # the 7x7 stride-2 stem, C = 3: packed taps
    (5, 16, 3, 1, 1, 2, 1, 9, 8),      # 5 channels padded to 8, dilated: packed, not a row
    (1, 8, 5, 1, 2, 1, 1, 7, 6),       # one channel padded to 4: packed rows of 20
    (10, 8, 3, 2, 1, 1, 1, 7, 7),      # 10 channels padded to 12 (not a power of two)
]
GEOM_IDS = ["x".join(map(str, g)) for g in GEOMETRIES]


def _cl(t):
    return t.to(DEVICE).contiguous(memory_format=CL)


def _conv_inputs(c, k, ksz, groups, h, w, dtype, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c, h, w, generator=g).to(dtype)
    weight = torch.randn(k, c // groups, ksz, ksz, generator=g) / (c // groups * ksz * ksz) ** 0.5
    return x, weight.to(dtype)


def _bn(k, seed=0, affine=True, dtype=torch.float32):
    """Random running statistics and affine parameters (never the identity)."""
    g = torch.Generator().manual_seed(seed + 100)
    mean, var = torch.rand(k, generator=g) - 0.5, torch.rand(k, generator=g) * 1.5 + 0.5
    gamma, beta = torch.rand(k, generator=g) + 0.5, torch.rand(k, generator=g) - 0.5
    cast = lambda t: t.to(DEVICE, dtype)
    return BNParams(cast(gamma) if affine else None, cast(beta) if affine else None,
                    cast(mean), cast(var), 1e-5)


def _bn_ref(y, bn):
    """F.batch_norm in eval mode, in float64."""
    d = lambda t: None if t is None else t.cpu().double()
    return F.batch_norm(y, d(bn.mean), d(bn.var), d(bn.weight), d(bn.bias), False, 0.0, bn.eps)


def _geo(stride, padding, dilation, groups):
    return dict(stride=(stride, stride), padding=(padding, padding),
                dilation=(dilation, dilation), groups=groups)


# ---------------------------------------------------------------------------------------------
# Forward: conv + BN (+ shortcut) (+ residual) (+ ReLU).

def test_kernel_weight_is_ohwi_and_free_when_channels_last():
    w = torch.randn(16, 8, 3, 3)
    kw = kernel_weight(w)
    assert kw.shape == w.shape and kw.is_contiguous(memory_format=CL)
    flat = torch.as_strided(kw, (kw.numel(),), (1,))
    k, c, r, s = 5, 6, 2, 1
    assert flat[k * 9 * 8 + (r * 3 + s) * 8 + c] == w[k, c, r, s]
    assert kernel_weight(kw).data_ptr() == kw.data_ptr()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geom", GEOMETRIES, ids=GEOM_IDS)
def test_conv_bn_relu(geom, dtype):
    """BN parameters in fp32 whatever the activations' dtype (the usual mixed-precision case)."""
    c, k, ksz, stride, pad, dil, groups, h, w = geom
    x, weight = _conv_inputs(c, k, ksz, groups, h, w, dtype)
    bn = _bn(k)
    y = conv_fused(_cl(x), kernel_weight(weight.to(DEVICE)), **_geo(stride, pad, dil, groups),
                   relu=True, bn=bn)
    ref = F.relu(_bn_ref(F.conv2d(x.double(), weight.double(), None, stride, pad, dil, groups),
                         bn))
    assert y.dtype == dtype and y.is_contiguous(memory_format=CL)
    assert_close(y.cpu(), ref, dtype, f"conv+bn {geom}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conv_bias_and_bn_without_affine(dtype):
    """shift = (conv_bias - mean) / sqrt(var + eps): no gamma, no beta."""
    x, weight = _conv_inputs(8, 16, 3, 1, 7, 7, dtype, seed=1)
    bias = torch.randn(16, generator=torch.Generator().manual_seed(1)).to(dtype)
    bn = _bn(16, seed=1, affine=False)
    y = conv_fused(_cl(x), kernel_weight(weight.to(DEVICE)), **_geo(1, 1, 1, 1), relu=False,
                   conv_bias=bias.to(DEVICE), bn=bn)
    ref = _bn_ref(F.conv2d(x.double(), weight.double(), bias.double(), 1, 1), bn)
    assert_close(y.cpu(), ref, dtype, "conv bias + BN(affine=False)")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conv_bias_without_bn(dtype):
    x, weight = _conv_inputs(8, 16, 3, 1, 7, 7, dtype, seed=2)
    bias = torch.randn(16, generator=torch.Generator().manual_seed(2)).to(dtype)
    y = conv_fused(_cl(x), kernel_weight(weight.to(DEVICE)), **_geo(1, 1, 1, 1), relu=True,
                   conv_bias=bias.to(DEVICE))
    ref = F.relu(F.conv2d(x.double(), weight.double(), bias.double(), 1, 1))
    assert_close(y.cpu(), ref, dtype, "conv bias")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_bn_params_in_the_activation_dtype(dtype):
    """A model cast as a whole: BN weight, bias and running stats in fp16/bf16."""
    x, weight = _conv_inputs(16, 24, 3, 1, 6, 6, dtype, seed=3)
    bn = _bn(24, seed=3, dtype=dtype)
    y = conv_fused(_cl(x), kernel_weight(weight.to(DEVICE)), **_geo(1, 1, 1, 1), relu=True,
                   bn=bn)
    ref = F.relu(_bn_ref(F.conv2d(x.double(), weight.double(), None, 1, 1), bn))
    assert_close(y.cpu(), ref, dtype, "BN params in the activation dtype")


@pytest.mark.parametrize("bn_dtype", [torch.float32, torch.float16], ids=str)
def test_large_bn_scale_stays_finite_in_fp16(bn_dtype):
    """gamma = 2000, running_var = 1e-8: scale ~ 6e5. Folded into fp16 weights it would
    overflow; applied in the fp32 epilogue the output is finite wherever PyTorch's fp16
    conv + BN is, and accurate."""
    x, weight = _conv_inputs(8, 16, 3, 1, 6, 6, torch.float16, seed=4)
    x = (x.float() * 1e-3).half()
    weight[5] = (torch.randn(8, 3, 3, generator=torch.Generator().manual_seed(4)) * 0.2).half()
    bn = _bn(16, seed=4)
    bn.weight[5], bn.var[5], bn.mean[5], bn.bias[5] = 2000.0, 1e-8, 0.0, 0.0
    scale = bn.weight[5] / torch.sqrt(bn.var[5] + bn.eps)
    assert torch.isinf((weight[5].float() * scale).half()).any()  # what folding would give
    bn = BNParams(*(t.to(bn_dtype) for t in bn[:4]), bn.eps)
    y = conv_fused(_cl(x), kernel_weight(weight.to(DEVICE)), **_geo(1, 1, 1, 1), relu=False,
                   bn=bn).cpu()
    half = lambda t: t.cpu().half()
    torch_fp16 = F.batch_norm(F.conv2d(x, weight, None, 1, 1), half(bn.mean), half(bn.var),
                              half(bn.weight), half(bn.bias), False, 0.0, bn.eps)
    finite = torch.isfinite(torch_fp16)
    assert finite[:, 5].all() and torch_fp16[:, 5].abs().max() > 100
    assert torch.isfinite(y[finite]).all()
    ref = _bn_ref(F.conv2d(x.double(), weight.double(), None, 1, 1), bn)
    assert_close(y, ref, torch.float16, "gamma=2000, var=1e-8")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_projection_shortcut_with_its_own_bn(dtype):
    """relu(bn1(conv3x3(y1)) + bn2(conv1x1_stride2(x))): two accumulators, two BNs."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 12, 13, 13, generator=g).to(dtype)
    y1 = torch.randn(2, 8, 7, 7, generator=g).to(dtype)
    w1 = (torch.randn(24, 8, 3, 3, generator=g) / 8).to(dtype)
    w2 = (torch.randn(24, 12, 1, 1, generator=g) / 4).to(dtype)
    bn1, bn2 = _bn(24, seed=5), _bn(24, seed=6)
    y = conv_fused(_cl(y1), kernel_weight(w1.to(DEVICE)), **_geo(1, 1, 1, 1), relu=True,
                   bn=bn1, shortcut=_cl(x), shortcut_w=kernel_weight(w2.to(DEVICE)),
                   shortcut_stride=2, shortcut_bn=bn2)
    ref = F.relu(_bn_ref(F.conv2d(y1.double(), w1.double(), None, 1, 1), bn1)
                 + _bn_ref(F.conv2d(x.double(), w2.double(), stride=2), bn2))
    assert_close(y.cpu(), ref, dtype, "projection shortcut")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c, c2, k, pixels", [(32, 64, 24, 7), (16, 16, 48, 5), (32, 64, 64, 11)],
                         ids=["chunks-32-64", "chunks-16-16", "n-tile-tail"])
def test_projection_shortcut_in_the_main_loop(c, c2, k, pixels, dtype):
    """A Bottleneck's conv3 (1x1) with its projection shortcut reduced in the same loop
    (JOINT: the same number of chunks, BLOCK_K and BLOCK_K2 apart), two accumulators, two
    BNs: exact, and the launcher takes that path for these shapes."""
    g = torch.Generator().manual_seed(7)
    y2 = torch.randn(2, c, pixels, pixels, generator=g).to(dtype)
    x = torch.randn(2, c2, 2 * pixels - 1, 2 * pixels - 1, generator=g).to(dtype)
    w3 = (torch.randn(k, c, 1, 1, generator=g) / c ** 0.5).to(dtype)
    w2 = (torch.randn(k, c2, 1, 1, generator=g) / c2 ** 0.5).to(dtype)
    bn3, bn2 = _bn(k, seed=7), _bn(k, seed=8)
    m = 2 * pixels * pixels
    cfg = configs.pick_config(m, k, max(c, c2), y2.element_size(), 1, shortcut=True)
    assert kconv.joint_shortcut(c, c2, cfg, y2.element_size()) is not None
    y = conv_fused(_cl(y2), kernel_weight(w3.to(DEVICE)), **_geo(1, 0, 1, 1), relu=True,
                   bn=bn3, shortcut=_cl(x), shortcut_w=kernel_weight(w2.to(DEVICE)),
                   shortcut_stride=2, shortcut_bn=bn2)
    ref = F.relu(_bn_ref(F.conv2d(y2.double(), w3.double()), bn3)
                 + _bn_ref(F.conv2d(x.double(), w2.double(), stride=2), bn2))
    assert_close(y.cpu(), ref, dtype, "shortcut in the main loop")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_identity_residual_then_relu(dtype):
    x, weight = _conv_inputs(8, 16, 3, 1, 9, 9, dtype, seed=7)
    res = torch.randn(2, 16, 9, 9, generator=torch.Generator().manual_seed(7)).to(dtype)
    bn = _bn(16, seed=7)
    y = conv_fused(_cl(x), kernel_weight(weight.to(DEVICE)), **_geo(1, 1, 1, 1), relu=True,
                   bn=bn, residual=_cl(res))
    ref = F.relu(_bn_ref(F.conv2d(x.double(), weight.double(), None, 1, 1), bn) + res.double())
    assert_close(y.cpu(), ref, dtype, "identity residual")


def test_option_a_residual_pattern():
    """CIFAR option A: residual x[:, :, ::2, ::2] zero-padded by 4 channels on each side."""
    x, weight = _conv_inputs(16, 16, 3, 1, 4, 4, torch.float32, seed=8)
    block_in = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(8))
    bn = _bn(16, seed=8)
    y = conv_fused(_cl(x), kernel_weight(weight.to(DEVICE)), **_geo(1, 1, 1, 1), relu=True,
                   bn=bn, residual=_cl(block_in), res_step=2, res_off=4)
    shortcut = F.pad(block_in[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4)).double()
    ref = F.relu(_bn_ref(F.conv2d(x.double(), weight.double(), None, 1, 1), bn) + shortcut)
    assert_close(y.cpu(), ref, torch.float32, "option A")


def test_relu_keeps_nan():
    x, weight = _conv_inputs(8, 16, 1, 1, 4, 4, torch.float32, seed=9)
    x[0, :, 1, 2] = float("nan")
    y = conv_fused(_cl(x), kernel_weight(weight.to(DEVICE)), **_geo(1, 0, 1, 1), relu=True,
                   bn=_bn(16)).cpu()
    assert torch.isnan(y[0, :, 1, 2]).all() and torch.isnan(y).sum() == 16


def test_with_stats_gives_the_raw_conv_and_its_batch_statistics():
    """Training forward: y = conv(x) unnormalized, plus per-M-tile (count, mean, M2)."""
    x, weight = _conv_inputs(8, 16, 3, 1, 10, 10, torch.float32, seed=10)
    y, part = conv_fused(_cl(x), kernel_weight(weight.to(DEVICE)), **_geo(1, 1, 1, 1),
                         relu=False, with_stats=True)
    ref = F.conv2d(x.double(), weight.double(), None, 1, 1)
    assert_close(y.cpu(), ref, torch.float32, "raw conv")
    count, mean_t, m2_t = part.cpu().double()
    assert count.shape[0] > 1  # 200 pixels: more than one M tile to merge
    n = count.sum(0)
    mean = (count * mean_t).sum(0) / n
    m2 = (m2_t + count * (mean_t - mean) ** 2).sum(0)
    flat = y.cpu().double().permute(1, 0, 2, 3).reshape(16, -1)
    assert torch.equal(n, torch.full((16,), 200.0, dtype=torch.float64))
    assert torch.allclose(mean, flat.mean(1), atol=1e-6)
    assert torch.allclose(m2 / n, flat.var(1, unbiased=False), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Split-K and tap packing.

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("split", [2, 4])
def test_split_k_with_and_without_shortcut(split, dtype):
    """Split-K (layer4 at small batch): fp32 partial sums (the shortcut's in planes of their
    own), added in order by the epilogue kernel with both BNs, the residual and ReLU;
    deterministic."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 40, 5, 5, generator=g).to(dtype)
    block_in = torch.randn(2, 24, 9, 9, generator=g).to(dtype)
    weight = (torch.randn(32, 40, 3, 3, generator=g) / 19).to(dtype)
    w2 = (torch.randn(32, 24, 1, 1, generator=g) / 5).to(dtype)
    bn1, bn2 = _bn(32, seed=11), _bn(32, seed=12)
    xs, w = _cl(x), kernel_weight(weight.to(DEVICE))
    kw = dict(_geo(1, 1, 1, 1), relu=True, bn=bn1, shortcut=_cl(block_in),
              shortcut_w=kernel_weight(w2.to(DEVICE)), shortcut_stride=2, shortcut_bn=bn2,
              split=split)
    y = conv_fused(xs, w, **kw)
    ref = F.relu(_bn_ref(F.conv2d(x.double(), weight.double(), None, 1, 1), bn1)
                 + _bn_ref(F.conv2d(block_in.double(), w2.double(), stride=2), bn2))
    assert_close(y.cpu(), ref, dtype, f"split {split} shortcut")
    assert torch.equal(y, conv_fused(xs, w, **kw))
    res = torch.randn(2, 32, 5, 5, generator=g).to(dtype)
    kw.update(shortcut=None, shortcut_w=None, shortcut_bn=None, residual=_cl(res))
    y = conv_fused(xs, w, **kw)
    ref = F.relu(_bn_ref(F.conv2d(x.double(), weight.double(), None, 1, 1), bn1)
                 + res.double())
    assert_close(y.cpu(), ref, dtype, f"split {split} residual")


def test_split_k_heuristic():
    assert configs.split_k(tiles=4, chunks_per_tap=8, taps=9, sms=132) == 8   # layer4 3x3, b. 1
    assert configs.split_k(tiles=4, chunks_per_tap=32, taps=1, sms=132) == 8  # layer4 1x1
    assert configs.split_k(tiles=400, chunks_per_tap=8, taps=9, sms=132) == 1  # batch 256
    assert configs.split_k(tiles=4, chunks_per_tap=1, taps=9, sms=132) == 1   # one chunk a tap
    assert configs.wgrad_split(tiles=18, chunks=4096, sms=132) == 15  # 2 programs per SM
    assert configs.wgrad_split(tiles=18, chunks=40, sms=132) == 5     # >= 8 chunks a split
    assert configs.wgrad_split(tiles=400, chunks=4096, sms=132) == 1


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("geom", [GEOMETRIES[-1], (16, 16, 3, 1, 2, 2, 4, 7, 7)],
                         ids=["stem", "dilated-groups-of-4"])
def test_tap_packing_on_and_off(geom, pack, monkeypatch):
    """Few channels a group reduce over (s, c) pairs (PACK); the tap-by-tap loop stays right."""
    c, k, ksz, stride, pad, dil, groups, h, w = geom
    assert kconv.packs_taps(c // groups, ksz)
    monkeypatch.setattr(kconv, "packs_taps", lambda c_g, s: pack)
    x, weight = _conv_inputs(c, k, ksz, groups, h, w, torch.float32, seed=13)
    bn = _bn(k, seed=13)
    y = conv_fused(_cl(x), kernel_weight(weight.to(DEVICE)), **_geo(stride, pad, dil, groups),
                   relu=False, bn=bn)
    ref = _bn_ref(F.conv2d(x.double(), weight.double(), None, stride, pad, dil, groups), bn)
    assert_close(y.cpu(), ref, torch.float32, f"pack={pack}")


# ---------------------------------------------------------------------------------------------
# Backward: dgrad and wgrad.

BWD_GEOMETRIES = GEOMETRIES + [(8, 12, 3, 2, 2, 2, 2, 9, 8)]  # + stride, dilation and groups


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geom", BWD_GEOMETRIES, ids=lambda g: "x".join(map(str, g)))
def test_dgrad_and_wgrad(geom, dtype):
    """dx in the activations' dtype, dw fp32 (K, C/groups, R, S) in the kernels' layout."""
    c, k, ksz, stride, pad, dil, groups, h, w = geom
    x, weight = _conv_inputs(c, k, ksz, groups, h, w, dtype, seed=14)
    p = kconv.out_size(h, ksz, stride, pad, dil)
    q = kconv.out_size(w, ksz, stride, pad, dil)
    dy = torch.randn(2, k, p, q, generator=torch.Generator().manual_seed(14)).to(dtype)
    geo = dict(stride=stride, padding=pad, dilation=dil, groups=groups)
    dx = conv_dgrad(_cl(dy), kernel_weight(weight.to(DEVICE)), x.shape,
                    **_geo(stride, pad, dil, groups))
    ref = torch.nn.grad.conv2d_input(x.shape, weight.double(), dy.double(), **geo)
    assert dx.dtype == dtype and dx.is_contiguous(memory_format=CL)
    assert_close(dx.cpu(), ref, dtype, f"dgrad {geom}")
    dw = conv_wgrad(_cl(x), _cl(dy), kernel_size=(ksz, ksz), **_geo(stride, pad, dil, groups))
    ref = torch.nn.grad.conv2d_weight(x.double(), weight.shape, dy.double(), **geo)
    assert dw.dtype == torch.float32 and dw.is_contiguous(memory_format=CL)
    assert_close(dw.cpu(), ref, dtype, f"wgrad {geom}")


# dgrad's stride phases (grid axis 2): strides 2 and 3, a phase no tap reaches (1x1 stride 2
# padding 1), phases of unequal sizes over several M tiles, tiles past a smaller phase,
# dilation, groups, padding 0..3, K and channel tails, 49 taps (64-bit tap mask), 81 taps
# (compared in the loop), anisotropic geometry. (C, K, (R, S), stride, padding, dilation,
# groups, H, W)
DGRAD_PHASES = [
    (8, 8, (3, 3), (3, 3), (1, 1), (1, 1), 1, 10, 11),
    (8, 8, (1, 1), (2, 2), (1, 1), (1, 1), 1, 7, 6),
    (8, 8, (1, 1), (3, 3), (0, 0), (1, 1), 1, 2, 2),
    (8, 8, (5, 5), (3, 3), (2, 2), (1, 1), 1, 9, 10),
    (8, 8, (3, 3), (2, 2), (0, 0), (3, 3), 1, 11, 9),
    (8, 8, (3, 3), (2, 2), (1, 1), (1, 1), 1, 1, 1),
    (24, 16, (3, 3), (2, 2), (1, 1), (1, 1), 1, 17, 17),
    (16, 16, (3, 3), (2, 2), (3, 3), (2, 2), 2, 12, 9),
    (8, 40, (3, 3), (1, 1), (1, 1), (1, 1), 1, 5, 5),
    (4, 8, (7, 7), (1, 1), (3, 3), (1, 1), 1, 8, 8),
    (4, 8, (9, 9), (1, 1), (4, 4), (1, 1), 1, 9, 9),
    (8, 12, (3, 2), (2, 3), (1, 0), (1, 2), 2, 9, 13),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("geom", DGRAD_PHASES, ids=lambda g: "-".join(map(str, g)))
def test_dgrad_stride_phases(geom, dtype):
    c, k, (r, s), stride, pad, dil, groups, h, w = geom
    g = torch.Generator().manual_seed(16)
    weight = (torch.randn(k, c // groups, r, s, generator=g) / (c // groups * r * s) ** 0.5)
    p = kconv.out_size(h, r, stride[0], pad[0], dil[0])
    q = kconv.out_size(w, s, stride[1], pad[1], dil[1])
    dy = torch.randn(2, k, p, q, generator=g).to(dtype)
    weight = weight.to(dtype)
    dx = conv_dgrad(_cl(dy), kernel_weight(weight.to(DEVICE)), (2, c, h, w), stride=stride,
                    padding=pad, dilation=dil, groups=groups)
    ref = torch.nn.grad.conv2d_input((2, c, h, w), weight.double(), dy.double(), stride=stride,
                                     padding=pad, dilation=dil, groups=groups)
    assert dx.dtype == dtype and dx.is_contiguous(memory_format=CL)
    assert_close(dx.cpu(), ref, dtype, f"dgrad {geom}")


def _wgrad_check(c, k, ksz, stride, pad, h, w, dtype, batch=2, split=None, seed=16):
    x, weight = _conv_inputs(c, k, ksz, 1, h, w, dtype, batch=batch, seed=seed)
    p = kconv.out_size(h, ksz, stride, pad, 1)
    q = kconv.out_size(w, ksz, stride, pad, 1)
    dy = torch.randn(batch, k, p, q, generator=torch.Generator().manual_seed(seed)).to(dtype)
    dw = conv_wgrad(_cl(x), _cl(dy), kernel_size=(ksz, ksz), **_geo(stride, pad, 1, 1),
                    split=split)
    ref = torch.nn.grad.conv2d_weight(x.double(), weight.shape, dy.double(), stride=stride,
                                      padding=pad)
    assert_close(dw.cpu(), ref, dtype, f"wgrad {c}x{k} {ksz}x{ksz}/{stride} pad {pad} {h}x{w}")


@pytest.mark.parametrize("split", [None, 2])
@pytest.mark.parametrize("h, w, pad", [(4, 4, 1), (8, 4, 0)], ids=["3x3", "3x3-unpadded"])
def test_wgrad_exact_boxes_mask_only_the_taps(h, w, pad, split):
    """Boxes that tile the pixels and tiles that cover the channels (EXACT): the loads keep
    only the taps' bounds masks."""
    _wgrad_check(16, 16, 3, 1, pad, h, w, torch.float32, split=split)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pad", [3, 2])
def test_wgrad_stem_reads_runs_of_padded_x(pad, dtype):
    """The 7x7 stride-2 stem at an even width: each pixel's kernel row is one run of x padded
    to 4 channels, read from a lead-in that aligns it (pad 3: 4 elements, pad 2: none)."""
    from fastres.kernels.conv_bwd import wgrad_run
    assert wgrad_run(3, 12, 2, 1, 1, dtype.itemsize) == (4, 16 // dtype.itemsize)
    _wgrad_check(3, 16, 7, 2, pad, 14, 12, dtype)


# conv_wgrad_rows_kernel (the stem-like case: all kernel rows in one program over x padded
# once): (C, K, kernel, stride, padding, H, W, batch); the stem small, 1 channel 5x5, fewer
# rows than 8, a K tail, one image; every case in fp32 and bf16, split off and on.
WGRAD_ROWS = [(3, 16, 7, 2, 3, 13, 11, 2), (1, 8, 5, 1, 2, 9, 7, 2), (3, 24, 3, 2, 1, 9, 10, 2),
              (2, 16, 7, 2, 3, 12, 12, 1), (4, 16, 5, 2, 0, 11, 13, 2)]


@pytest.mark.parametrize("split", [None, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("geom", WGRAD_ROWS, ids=lambda g: "x".join(map(str, g)))
def test_wgrad_rows_kernel(geom, dtype, split):
    from fastres.kernels.conv_bwd import wgrad_takes_rows
    c, k, ksz, stride, pad, h, w, batch = geom
    assert wgrad_takes_rows(c, ksz, ksz, (1, 1), 1, dtype)
    _wgrad_check(c, k, ksz, stride, pad, h, w, dtype, batch=batch, split=split)


def test_wgrad_rows_kernel_takes_only_the_stem_like_case():
    from fastres.kernels.conv_bwd import wgrad_takes_rows
    assert wgrad_takes_rows(3, 7, 7, (1, 1), 1, torch.bfloat16)  # the stem: 7*4 = 28 columns
    assert not wgrad_takes_rows(3, 7, 7, (1, 1), 3, torch.bfloat16)  # groups
    assert not wgrad_takes_rows(3, 7, 7, (2, 2), 1, torch.bfloat16)  # dilation
    assert not wgrad_takes_rows(8, 7, 7, (1, 1), 1, torch.bfloat16)  # 7*8 > 32 columns
    assert not wgrad_takes_rows(3, 9, 3, (1, 1), 1, torch.bfloat16)  # R > 8
    assert not wgrad_takes_rows(16, 3, 3, (1, 1), 1, torch.bfloat16)  # not packed
    assert not wgrad_takes_rows(3, 7, 1, (1, 1), 1, torch.bfloat16)  # S = 1: not packed


def test_wgrad_box_tiles_resnet_images_exactly():
    assert configs.wgrad_box(256, 112, 112, 256) == (1, 16, 16)
    assert configs.wgrad_box(256, 56, 56, 128) == (2, 8, 8)
    assert configs.wgrad_box(256, 7, 7, 128) == (128, 1, 1)
    bi, bp, bq = configs.wgrad_box(3, 5, 7, 64)
    assert bi * bp * bq == 64 and -(-3 // bi) * bi * -(-5 // bp) * bp * -(-7 // bq) * bq < 2 * 105


@pytest.mark.parametrize("split", [2, 4])
def test_wgrad_split_partials_sum_in_order(split):
    x, weight = _conv_inputs(8, 16, 3, 1, 12, 12, torch.float32, seed=15)
    dy = torch.randn(2, 16, 12, 12, generator=torch.Generator().manual_seed(15))
    kw = dict(kernel_size=(3, 3), **_geo(1, 1, 1, 1), split=split)
    dw = conv_wgrad(_cl(x), _cl(dy), **kw)
    ref = torch.nn.grad.conv2d_weight(x.double(), weight.shape, dy.double(), padding=1)
    assert_close(dw.cpu(), ref, torch.float32, f"wgrad split {split}")
    assert torch.equal(dw, conv_wgrad(_cl(x), _cl(dy), **kw))
