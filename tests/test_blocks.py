"""fastres blocks against torchvision's, with copied weights and random BN statistics."""
import copy

import pytest
import torch
import torch.nn as nn
import torchvision.models.resnet as tv

import fastres
from fastres.blocks import conv1x1
from helpers import DEVICE, ConvCounter, assert_close, randomize_bn

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _projection(inplanes, outplanes, stride):
    return nn.Sequential(conv1x1(inplanes, outplanes, stride), nn.BatchNorm2d(outplanes))


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


def _pair(kind, inplanes, planes, stride, projection, groups, base_width, dilation):
    torch.manual_seed(0)
    tv_cls, fr_cls = (tv.BasicBlock, fastres.BasicBlock) if kind == "basic" else \
        (tv.Bottleneck, fastres.Bottleneck)
    down = _projection(inplanes, planes * tv_cls.expansion, stride) if projection else None
    ref = tv_cls(inplanes, planes, stride, down, groups, base_width, dilation)
    randomize_bn(ref)
    for p in ref.parameters():
        if p.dim() == 4:
            nn.init.kaiming_normal_(p)
    ours = fr_cls(inplanes, planes, stride, copy.deepcopy(down), groups, base_width, dilation)
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
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
            got = ours.to(DEVICE)(x.to(DEVICE))
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


def test_fold_cache_follows_parameter_and_buffer_changes():
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
        ours.eval()(x)  # fill the fold cache
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


def test_convbnact_standalone():
    torch.manual_seed(0)
    m = fastres.ConvBNAct(3, 16, 7, stride=2, padding=3)
    randomize_bn(m)
    assert set(m.state_dict()) >= {"weight", "bn.weight", "bn.running_var"}
    x = torch.randn(2, 3, 13, 13)
    with torch.no_grad():
        expect = torch.relu(m.bn.eval()(nn.functional.conv2d(x, m.weight, None, 2, 3)))
        got = m.eval()(x)
    assert_close(got, expect, torch.float32, "ConvBNAct")
