"""Bad and odd input: a clear error naming the problem, or the right answer; never a wrong one.

Errors are raised by the checked entry point ``fastres.ops.conv_bn_act`` before any dispatch;
results are checked on the Triton kernel and on the plain-PyTorch CPU path.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision.models.resnet as tv

import fastres
import fastres.kernels.conv as kconv
import fastres.ops as ops
from helpers import DEVICE, assert_close, randomize_bn

# A device other than the one the tensors live on: a second real device when there is one.
OTHER_DEVICE = "cpu" if DEVICE == "cuda" else "meta"



@pytest.fixture
def no_launch(monkeypatch):
    """Fails the test if the conv kernel is launched."""
    def launch(grid):
        raise AssertionError(f"the conv kernel was launched (grid {grid})")
    monkeypatch.setattr(kconv, "conv_fused_kernel", type("NoLaunch", (), {
        "__getitem__": lambda self, grid: launch(grid)})())


def _conv(c=8, k=16, ksz=3, groups=1, dtype=torch.float32, seed=0):
    """Weights in the kernel's layout and in OIHW, and an fp32 bias."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(k, c // groups, ksz, ksz, generator=g) / (c // groups * ksz * ksz) ** 0.5)
    w_kn = w.permute(2, 3, 1, 0).reshape(-1, k).contiguous()
    return w_kn.to(dtype).to(DEVICE), w.to(dtype), torch.randn(k, generator=g).to(DEVICE)


def _run(x, w_kn, bias, ksz=3, pad=1, groups=1, relu=True, **extra):
    return ops.conv_bn_act(x, w_kn, bias, kernel_size=(ksz, ksz), stride=(1, 1),
                           padding=(pad, pad), dilation=(1, 1), groups=groups, relu=relu,
                           **extra)


def _block(seed=0):
    """A torchvision BasicBlock with a projection and random BN, and its fastres twin."""
    torch.manual_seed(seed)
    down = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 1, 2, bias=False),
                               torch.nn.BatchNorm2d(16))
    ref = randomize_bn(tv.BasicBlock(8, 16, 2, down)).eval()
    ours = fastres.BasicBlock(8, 16, 2, copy.deepcopy(down))
    ours.load_state_dict(ref.state_dict())
    return ref, ours.eval().to(DEVICE)


# --- errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(8, 7, 7), (1, 1, 8, 7, 7), (8,)])
def test_wrong_rank(shape):
    w, _, b = _conv()
    with pytest.raises(ValueError, match=r"4-D input \(N, C, H, W\), got shape"):
        _run(torch.randn(shape, device=DEVICE), w, b)
    with pytest.raises(ValueError, match="4-D"):
        _block()[1](torch.randn(shape, device=DEVICE))


def test_not_a_tensor():
    w, _, b = _conv()
    with pytest.raises(TypeError, match="expected a torch.Tensor input, got list"):
        _run([[1.0]], w, b)
    with pytest.raises(TypeError, match="expected a torch.Tensor input, got list"):
        _block()[1]([[1.0]])


def test_channel_mismatch():
    w, _, b = _conv(c=8)
    with pytest.raises(ValueError, match="input has 6 channels but the conv expects 8"):
        _run(torch.randn(2, 6, 7, 7, device=DEVICE), w, b)
    with pytest.raises(ValueError, match="input has 3 channels but the conv expects 8"):
        _block()[1](torch.randn(2, 3, 7, 7, device=DEVICE))


def test_mixed_devices():
    w, _, b = _conv()
    x = torch.randn(2, 8, 7, 7, device=DEVICE)
    with pytest.raises(ValueError, match=f"weight tensor is on {OTHER_DEVICE}"):
        _run(x, w.to(OTHER_DEVICE), b)
    with pytest.raises(ValueError, match=f"bias tensor is on {OTHER_DEVICE}"):
        _run(x, w, b.to(OTHER_DEVICE))
    with pytest.raises(ValueError, match=f"residual is on {OTHER_DEVICE}"):
        _run(x, w, b, residual=torch.randn(2, 16, 7, 7, device=OTHER_DEVICE))
    with pytest.raises(ValueError, match=f"but the input is on {OTHER_DEVICE}"):
        _block()[1](x.to(OTHER_DEVICE))  # model on DEVICE, input elsewhere


def test_mixed_dtypes():
    w, _, b = _conv()
    x = torch.randn(2, 8, 7, 7, device=DEVICE)
    with pytest.raises(TypeError, match="residual has dtype torch.float16 but the input has "
                                        "torch.float32"):
        _run(x, w, b, residual=torch.randn(2, 16, 7, 7, device=DEVICE, dtype=torch.float16))
    with pytest.raises(TypeError, match="weight tensor has dtype torch.bfloat16"):
        _run(x, w.bfloat16(), b)
    with pytest.raises(TypeError, match="shortcut input has dtype torch.float16"):
        _run(x, w, b, shortcut=x.half(), shortcut_w=torch.randn(8, 16, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.int64, torch.uint8,
                                   torch.complex64, torch.bool], ids=str)
def test_unsupported_dtypes(dtype):
    w, _, b = _conv()
    x = torch.ones(2, 8, 7, 7, device=DEVICE).to(dtype)
    with pytest.raises(TypeError, match=f"input dtype {dtype} is not supported; use float32"):
        _run(x, w, b)
    with pytest.raises(TypeError, match=f"input dtype {dtype} is not supported"):
        _block()[1](x)


def test_spatial_smaller_than_kernel():
    w, _, b = _conv(ksz=3)
    with pytest.raises(ValueError, match=r"input height 2 \(padded by 0\) is smaller than the "
                                         r"kernel's extent 3"):
        _run(torch.randn(1, 8, 2, 5, device=DEVICE), w, b, pad=0)
    with pytest.raises(ValueError, match="input width 1"):
        _run(torch.randn(1, 8, 5, 1, device=DEVICE), w, b, pad=0)


def test_malformed_weights_bias_and_shortcut():
    w, _, b = _conv()
    x = torch.randn(2, 8, 7, 7, device=DEVICE)
    with pytest.raises(ValueError, match=r"weights must be \(R\*S\*C/groups, K\)"):
        _run(x, w[:-1], b)  # rows not a multiple of the 9 taps
    with pytest.raises(ValueError, match="K divisible by groups=3"):
        _run(x, w, b, groups=3)
    with pytest.raises(ValueError, match=r"bias must have shape \(16,\)"):
        _run(x, w, b[:8])
    with pytest.raises(ValueError, match="needs both its input and its weights"):
        _run(x, w, b, shortcut=x)
    with pytest.raises(ValueError, match=r"shortcut weights must be \(C2, 16\)"):
        _run(x, w, b, shortcut=x, shortcut_w=torch.randn(8, 4, device=DEVICE))
    with pytest.raises(ValueError, match="residual of shape"):
        _run(x, w, b, residual=torch.randn(2, 16, 6, 7, device=DEVICE))


# --- odd but valid input: the right answer --------------------------------------------------

def test_empty_batch_gives_empty_output_without_launch(path, no_launch):
    w, _, b = _conv()
    y = _run(torch.randn(0, 8, 7, 7, device=DEVICE), w, b,
             residual=torch.randn(0, 16, 7, 7, device=DEVICE))
    assert y.shape == (0, 16, 7, 7) and y.dtype == torch.float32
    _, block = _block()
    with torch.no_grad():
        assert block(torch.randn(0, 8, 9, 9, device=DEVICE)).shape == (0, 16, 5, 5)


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed", "expanded",
                                    "storage_offset"])
def test_strided_inputs_are_correct(layout, path):
    ref, ours = _block()
    base = torch.randn(3, 8, 13, 13)
    x = {"channels_last": base.contiguous(memory_format=torch.channels_last),
         "sliced": base[:, :, 1::2, :11],
         "transposed": base.transpose(2, 3),
         "expanded": base[:1].expand(3, -1, -1, -1),
         "storage_offset": base[1:]}[layout]
    with torch.no_grad():
        assert_close(ours(x.to(DEVICE)).cpu(), ref(x), torch.float32, layout)


def test_strided_residual_is_correct(path):
    w, w_oihw, b = _conv()
    x = torch.randn(2, 8, 7, 7)
    res = torch.randn(2, 7, 7, 32)[..., ::2].permute(0, 3, 1, 2)  # channels strided by 2
    y = _run(x.to(DEVICE), w, b, residual=res.to(DEVICE))
    ref = F.relu(F.conv2d(x.double(), w_oihw.double(), b.double().cpu(), padding=1)
                 + res.double())
    assert_close(y.cpu(), ref, torch.float32, "strided residual")


def _assert_same_nonfinite(y: torch.Tensor, ref: torch.Tensor) -> None:
    y, ref = y.double().cpu(), ref.double()
    for what, test in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        assert torch.equal(test(y), test(ref)), f"{what} pattern differs from PyTorch's"
    finite = torch.isfinite(ref)
    assert finite.any()
    assert_close(y[finite], ref[finite], torch.float32, "finite entries")


NUMPY_NAN_WARNING = "ignore:invalid value encountered:RuntimeWarning"  # the interpreter's


@pytest.mark.filterwarnings(NUMPY_NAN_WARNING)
@pytest.mark.parametrize("relu", [True, False])
def test_nan_and_inf_propagate_as_in_pytorch(relu, path):
    w, w_oihw, b = _conv(c=8, k=16)
    x = torch.randn(2, 8, 9, 9)
    x[0, 3, 4, 4] = float("nan")
    x[1, 0, 0, 0] = float("inf")
    x[1, 5, 8, 2] = float("-inf")
    res = torch.randn(2, 16, 9, 9)
    res[0, 2, 0, 8] = float("nan")
    res[1, 7, 5, 5] = float("-inf")  # -Inf then ReLU: 0, as torch.relu
    y = _run(x.to(DEVICE), w, b, relu=relu, residual=res.to(DEVICE))
    ref = F.conv2d(x.double(), w_oihw.double(), b.double().cpu(), padding=1) + res.double()
    _assert_same_nonfinite(y, F.relu(ref) if relu else ref)


@pytest.mark.filterwarnings(NUMPY_NAN_WARNING)
def test_nan_through_a_block_as_torchvision(path):
    ref, ours = _block()
    x = torch.randn(2, 8, 9, 9)
    x[0, 1, 2, 3] = float("nan")
    x[1, 4, 0, 0] = float("inf")
    with torch.no_grad():
        _assert_same_nonfinite(ours(x.to(DEVICE)), ref.double()(x.double()))


def test_int64_indexing_path(monkeypatch):
    """Offsets switch to int64 once any tensor passes INT32_SAFE elements (2**30 by default,
    the margin that keeps masked lanes below 2**31). Forced here on small tensors; nothing
    the size of 2**31 is allocated."""
    if not ops.uses_triton(torch.empty(0, device=DEVICE)):
        pytest.skip("the int64 path is the Triton kernel's")
    flags = []
    real = kconv.conv_fused_kernel
    monkeypatch.setattr(kconv, "conv_fused_kernel", type("Spy", (), {
        "__getitem__": lambda self, grid: lambda *a, **k: flags.append(k["INT64"])
        or real[grid](*a, **k)})())
    w, w_oihw, b = _conv(c=8, k=16)
    x = torch.randn(2, 8, 7, 7)
    res = torch.randn(2, 16, 7, 7)
    ref = F.relu(F.conv2d(x.double(), w_oihw.double(), b.double().cpu(), padding=1)
                 + res.double())
    for limit, expect in ((0, True), (x.numel(), True), (res.numel(), False)):
        monkeypatch.setattr(kconv, "INT32_SAFE", limit)
        y = _run(x.to(DEVICE), w, b, residual=res.to(DEVICE))
        assert flags[-1] is expect, f"INT32_SAFE={limit}: INT64 should be {expect}"
        assert_close(y.cpu(), ref, torch.float32, f"INT64={expect}")
