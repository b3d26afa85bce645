"""fastres blocks against torchvision's, with copied weights and random BN statistics."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

import fastres
from helpers import DEVICE, ConvCounter, assert_close, block_pair, randomize_bn

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# (block kind, inplanes, planes, stride, projection, groups, base_width, dilation, H)
CASES = [
    ("basic", 16, 16, 1, False, 1, 64, 1, 7),
    ("basic", 8, 16, 2, True, 1, 64, 1, 13),
    ("basic", 16, 16, 1, False, 1, 64, 1, 1),
    ("bottleneck", 32, 8, 1, False, 1, 64, 1, 7),
    ("bottleneck", 16, 8, 2, True, 1, 64, 1, 7),
    ("bottleneck", 16, 8, 1, True, 4, 16, 1, 5),   # ResNeXt-style groups
    ("bottleneck", 64, 16, 2, True, 32, 4, 1, 7),  # resnext50_32x4d's 32 groups
    ("bottleneck", 32, 8, 1, False, 1, 64, 2, 7),  # dilation
]


def _pair(*case):
    ref, ours = block_pair(*case)
    return ref.eval(), ours.eval()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_block_inference_matches_torchvision(case, dtype):
    kind, inplanes, planes, stride, projection, groups, base_width, dilation, h = case
    ref, ours = _pair(kind, inplanes, planes, stride, projection, groups, base_width, dilation)
    batch = 1 if h == 1 else 3
    x = torch.randn(batch, inplanes, h, h).to(dtype)
    with torch.no_grad():
        expect = ref.double()(x.double())
        with ConvCounter() as counter:
            got = ours.to(DEVICE, dtype)(x.to(DEVICE))
    assert counter.convs == 0, "a torch convolution ran inside the fused forward"
    assert got.dtype == dtype
    assert_close(got.float().cpu(), expect, dtype, f"{kind} block")


def test_train_mode_is_exactly_torchvision():
    ref, ours = _pair("bottleneck", 16, 8, 2, True, 1, 64, 1)
    ref.train(), ours.train()
    x = torch.randn(2, 16, 7, 7)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    for a, b in zip(ours.buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_eval_reads_live_parameters_and_buffers():
    """Nothing is cached: in-place updates, ``.data`` writes (which do not bump version
    counters) and load_state_dict all reach the next eval forward."""
    ref, ours = _pair("basic", 8, 16, 2, True, 1, 64, 1)
    ours.to(DEVICE)
    x = torch.randn(2, 8, 7, 7)
    with torch.no_grad():
        ours(x.to(DEVICE))
        for block in (ref, ours):
            block.bn1.running_mean.add_(0.3)
            block.downsample[1].running_var.mul_(2.0)
            block.conv2.weight.mul_(-1.0)
        assert_close(ours(x.to(DEVICE)).cpu(), ref(x), torch.float32, "after in-place changes")
        for block in (ref, ours):
            block.conv1.weight.data.mul_(1.5)
            block.bn2.bias.data.add_(0.25)
            block.downsample[1].running_mean.data.sub_(0.5)
        assert_close(ours(x.to(DEVICE)).cpu(), ref(x), torch.float32, "after .data writes")
        state = {k: torch.randn_like(v) if v.is_floating_point() else v
                 for k, v in ref.state_dict().items()}
        state = {k: v.abs() + 0.1 if "running_var" in k else v for k, v in state.items()}
        ref.load_state_dict(state)
        ours.load_state_dict(state)
        assert_close(ours(x.to(DEVICE)).cpu(), ref(x), torch.float32, "after load_state_dict")


def test_eval_after_training_steps_uses_fresh_statistics():
    ref, ours = _pair("basic", 8, 8, 1, False, 1, 64, 1)
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        ours.eval()(x)
        for block in (ref, ours):
            block.train()
            block(x + 1.0)
            block.eval()
        assert_close(ours(x), ref(x), torch.float32, "eval after train")


def test_eval_mode_gradients_flow_to_input_and_parameters():
    ref, ours = _pair("basic", 8, 16, 2, True, 1, 64, 1)
    x = torch.randn(2, 8, 7, 7)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref(xr).square().sum().backward()
    ours(xo).square().sum().backward()
    assert_close(xo.grad, xr.grad, torch.float32, "input grad")
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        assert_close(a.grad, b.grad, torch.float32, f"grad of {name}")


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_convbnact_standalone(padding_mode, path):
    torch.manual_seed(0)
    m = fastres.ConvBNAct(3, 16, 7, stride=2, padding=3, padding_mode=padding_mode)
    randomize_bn(m)
    assert set(m.state_dict()) >= {"weight", "bn.weight", "bn.running_var"}
    ref = nn.Sequential(nn.Conv2d(3, 16, 7, 2, 3, bias=False, padding_mode=padding_mode),
                        copy.deepcopy(m.bn), nn.ReLU()).eval()
    ref[0].weight.data.copy_(m.weight)
    x = torch.randn(2, 3, 13, 13)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = m.eval().to(DEVICE)(x.to(DEVICE))
    assert_close(got.cpu(), ref(x), torch.float32, "ConvBNAct")
    warned = any("padding_mode='reflect'" in str(w.message) for w in caught)
    assert warned == (padding_mode == "reflect" and path == "triton"), \
        [str(w.message) for w in caught]
