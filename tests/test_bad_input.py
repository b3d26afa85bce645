"""Bad and odd input: a clear error naming the problem, or the right answer; never a wrong one.

Errors are raised by the checked entry point ``fastres.fused.conv_bn_act`` before any launch;
blocks raise there too, or (where they run op by op) what torchvision's blocks raise.
"""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastres.kernels.conv as kconv
import fastres.ops as ops
from fastres import fused
from helpers import DEVICE, assert_close, block_pair, randomize_bn

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
    """An eval conv (with bias) + BN on the test device."""
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(c, k, ksz, padding=ksz // 2, groups=groups)
    bn = randomize_bn(torch.nn.BatchNorm2d(k), seed)
    return conv.to(DEVICE, dtype).eval(), bn.to(DEVICE, dtype).eval()


def _run(x, conv, bn, relu=True, **extra):
    with torch.no_grad():
        return fused.conv_bn_act(x, conv, bn, relu, **extra)


def _ref(x, conv, bn, relu=True, residual=None):
    y = copy.deepcopy(bn).cpu().double()(copy.deepcopy(conv).cpu().double()(x.cpu().double()))
    if residual is not None:
        y = y + residual.cpu().double()
    return F.relu(y) if relu else y


def _block(seed=0):
    """A torchvision BasicBlock with a projection and random BN, and its fastres twin."""
    ref, ours = block_pair("basic", 8, 16, 2, True, seed=seed)
    return ref.eval(), ours.eval()


def _eval_block(x):
    with torch.no_grad():
        return _block()[1](x)


# --- errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(8, 7, 7), (1, 1, 8, 7, 7), (8,)])
def test_wrong_rank(shape):
    conv, bn = _conv()
    with pytest.raises(ValueError, match=r"4-D input \(N, C, H, W\), got shape"):
        _run(torch.randn(shape, device=DEVICE), conv, bn)
    with pytest.raises(ValueError, match="4-D"):
        _eval_block(torch.randn(shape, device=DEVICE))


def test_not_a_tensor():
    conv, bn = _conv()
    with pytest.raises(TypeError, match="expected a torch.Tensor input, got list"):
        _run([[1.0]], conv, bn)
    with pytest.raises(TypeError, match="expected a torch.Tensor input, got list"):
        _eval_block([[1.0]])


def test_channel_mismatch():
    conv, bn = _conv(c=8)
    with pytest.raises(ValueError, match="input has 6 channels but the conv expects 8"):
        _run(torch.randn(2, 6, 7, 7, device=DEVICE), conv, bn)
    with pytest.raises(ValueError, match="input has 3 channels but the conv expects 8"):
        _eval_block(torch.randn(2, 3, 7, 7, device=DEVICE))


def test_mixed_devices():
    conv, bn = _conv()
    x = torch.randn(2, 8, 7, 7, device=DEVICE)
    with pytest.raises(ValueError, match=f"conv weight is on {OTHER_DEVICE}"):
        _run(x, copy.deepcopy(conv).to(OTHER_DEVICE), bn)
    with pytest.raises(ValueError, match=f"BatchNorm state is on {OTHER_DEVICE}"):
        _run(x, conv, copy.deepcopy(bn).to(OTHER_DEVICE))
    with pytest.raises(ValueError, match=f"residual is on {OTHER_DEVICE}"):
        _run(x, conv, bn, residual=torch.randn(2, 16, 7, 7, device=OTHER_DEVICE))
    with pytest.raises((ValueError, RuntimeError)):
        _eval_block(x.to(OTHER_DEVICE))  # model on DEVICE, input elsewhere: as torchvision


def test_mixed_dtypes_raise_as_pytorch_does():
    """Outside autocast a conv's input and weight must share a dtype (PyTorch raises too); a
    residual of another dtype is added as PyTorch's in-place add does."""
    conv, bn = _conv()
    x = torch.randn(2, 8, 7, 7, device=DEVICE)
    with pytest.raises(RuntimeError, match="input dtype torch.float32 and conv weight dtype "
                                           "torch.bfloat16 should be the same"):
        _run(x, copy.deepcopy(conv).bfloat16(), bn)
    _, block = _block()
    with pytest.raises(RuntimeError, match="should be the same"):
        with torch.no_grad():
            block(torch.randn(2, 8, 9, 9, device=DEVICE, dtype=torch.bfloat16))
    res = torch.randn(2, 16, 7, 7, device=DEVICE, dtype=torch.float16)
    assert_close(_run(x, conv, bn, residual=res).cpu(), _ref(x, conv, bn, residual=res),
                 torch.float32, "fp16 residual")


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.int64, torch.uint8,
                                   torch.complex64, torch.bool], ids=str)
def test_unsupported_dtypes(dtype):
    conv, bn = _conv()
    x = torch.ones(2, 8, 7, 7, device=DEVICE).to(dtype)
    with pytest.raises(TypeError, match=f"input dtype {dtype} is not supported; use float32"):
        _run(x, conv, bn)
    with pytest.raises(RuntimeError):  # the block runs as PyTorch does: PyTorch's error
        with torch.no_grad():
            _eval_block(x)


def test_float64_model_runs_as_pytorch(path):
    ref, ours = _block()
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours.double()(x.to(DEVICE)).cpu(), ref.double()(x))


def test_spatial_smaller_than_kernel():
    conv, bn = _conv(ksz=3)
    conv.padding = (0, 0)
    with pytest.raises(ValueError, match=r"input height 2 \(padded by 0\) is smaller than the "
                                         r"kernel's extent 3"):
        _run(torch.randn(1, 8, 2, 5, device=DEVICE), conv, bn)
    with pytest.raises(ValueError, match="input width 1"):
        _run(torch.randn(1, 8, 5, 1, device=DEVICE), conv, bn)


def test_mismatched_shortcut_and_residual():
    conv, bn = _conv()
    x = torch.randn(2, 8, 7, 7, device=DEVICE)
    pconv, pbn = _conv(c=8, k=16, ksz=1)
    with pytest.raises(ValueError, match="projection shortcut input"):
        _run(x, conv, bn, projection=(pconv, pbn), shortcut=torch.randn(2, 4, 7, 7, device=DEVICE))
    with pytest.raises(ValueError, match="residual of shape"):
        _run(x, conv, bn, residual=torch.randn(2, 16, 6, 7, device=DEVICE))


def test_batchnorm_of_the_wrong_size_fails_as_in_pytorch(path):
    """A BN whose size does not match its conv is not fused; the block then raises what
    torchvision's raises."""
    ref, ours = _block()
    for block in (ref, ours):
        block.bn1 = torch.nn.BatchNorm2d(8).eval()
    x = torch.randn(2, 8, 9, 9)
    with pytest.raises(RuntimeError) as expected:
        ref(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError) as got:
            ours.to(DEVICE)(x.to(DEVICE))
    assert str(got.value).split("\n")[0] == str(expected.value).split("\n")[0]


# --- odd but valid input: the right answer --------------------------------------------------

def test_empty_batch_gives_empty_output_without_launch(path, no_launch):
    conv, bn = _conv()
    y = _run(torch.randn(0, 8, 7, 7, device=DEVICE), conv, bn,
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


def test_strided_residual_is_correct():
    conv, bn = _conv()
    x = torch.randn(2, 8, 7, 7, device=DEVICE)
    res = torch.randn(2, 7, 7, 32, device=DEVICE)[..., ::2].permute(0, 3, 1, 2)  # C stride 2
    y = _run(x, conv, bn, residual=res)
    assert_close(y.cpu(), _ref(x, conv, bn, residual=res), torch.float32, "strided residual")


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
def test_nan_and_inf_propagate_as_in_pytorch(relu):
    conv, bn = _conv(c=8, k=16)
    x = torch.randn(2, 8, 9, 9)
    x[0, 3, 4, 4] = float("nan")
    x[1, 0, 0, 0] = float("inf")
    x[1, 5, 8, 2] = float("-inf")
    res = torch.randn(2, 16, 9, 9)
    res[0, 2, 0, 8] = float("nan")
    res[1, 7, 5, 5] = float("-inf")  # -Inf then ReLU: 0, as torch.relu
    y = _run(x.to(DEVICE), conv, bn, relu=relu, residual=res.to(DEVICE))
    _assert_same_nonfinite(y, _ref(x, conv, bn, relu, res))


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
    conv, bn = _conv(c=8, k=16)
    x = torch.randn(2, 8, 7, 7)
    res = torch.randn(2, 16, 7, 7)
    ref = _ref(x, conv, bn, residual=res)
    for limit, expect in ((0, True), (x.numel(), True), (res.numel(), False)):
        monkeypatch.setattr(kconv, "INT32_SAFE", limit)
        y = _run(x.to(DEVICE), conv, bn, residual=res.to(DEVICE))
        assert flags[-1] is expect, f"INT32_SAFE={limit}: INT64 should be {expect}"
        assert_close(y.cpu(), ref, torch.float32, f"INT64={expect}")
