"""Property tests: the fused eval conv + BN entry point (``fastres.fused.conv_bn_act``, fed
the live modules) against torch.nn.functional in float64 over random conv geometry, dtypes,
epilogues and BatchNorm statistics.

Each example draws kernel (R, S), stride, padding, dilation, groups, channels per group,
odd spatial sizes, a dtype, ReLU on/off, an epilogue (none, residual, option-A residual,
projection shortcut) and BN statistics whose variances span 1e-8 .. 1e6. The reference is

    y = relu?( bn(conv(x)) + bn2(conv1x1(shortcut)) + pad_c(residual[:, :, ::step, ::step]) )

CI runs a fixed (derandomized) set of examples; ``FASTRES_FUZZ_EXAMPLES=N`` runs N fresh
random examples instead.
"""
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st

import fastres
from fastres import fused
from fastres.kernels.conv import out_size
from helpers import DEVICE, assert_close

BUDGET = int(os.environ.get("FASTRES_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=BUDGET or 60, derandomize=not BUDGET, deadline=None,
                database=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def conv_cases(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    kernel = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    spans = [d * (k - 1) + 1 for d, k in zip(dilation, kernel)]
    size = [max(1, span - 2 * p + draw(st.integers(0, 9))) for span, p in zip(spans, padding)]
    return dict(
        n=draw(st.integers(1, 3)), c=groups * draw(st.integers(1, 9)),
        k=groups * draw(st.integers(1, 9)), groups=groups, kernel=kernel, stride=stride,
        padding=padding, dilation=dilation, size=size,
        dtype=draw(st.sampled_from(DTYPES)), relu=draw(st.booleans()),
        epilogue=draw(st.sampled_from(["none", "residual", "option_a", "projection"])),
        step=draw(st.integers(1, 2)), c2=draw(st.integers(1, 9)),
        eps=draw(st.sampled_from([1e-5, 1e-3])), seed=draw(st.integers(0, 2 ** 31 - 1)))


def _random_bn(k, eps, g):
    """Eval BatchNorm2d with variances log-uniform over 1e-8 .. 1e6."""
    bn = nn.BatchNorm2d(k, eps=eps).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(k, generator=g) * 3)
        bn.running_var.copy_(10 ** (torch.rand(k, generator=g) * 14 - 8))
        bn.weight.copy_(torch.rand(k, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(k, generator=g))
    return bn


def _bn64(y, bn):
    return F.batch_norm(y, bn.running_mean.double(), bn.running_var.double(),
                        bn.weight.double(), bn.bias.double(), False, 0.0, bn.eps)


def _case_tensors(case):
    """The conv + BN (+ projection conv + BN), input, residual or shortcut of a case."""
    g = torch.Generator().manual_seed(case["seed"])
    n, c, k, groups = case["n"], case["c"], case["k"], case["groups"]
    conv = nn.Conv2d(c, k, case["kernel"], case["stride"], case["padding"], case["dilation"],
                     groups, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g)
                          / (conv.weight[0].numel() ** 0.5))
    bn = _random_bn(k, case["eps"], g)
    x = torch.randn(n, c, *case["size"], generator=g).to(case["dtype"])
    p, q = (out_size(case["size"][i], case["kernel"][i], case["stride"][i],
                         case["padding"][i], case["dilation"][i]) for i in (0, 1))
    extra, projection = {}, None
    step = case["step"]
    if case["epilogue"] == "residual":
        extra = dict(residual=torch.randn(n, k, p, q, generator=g).to(case["dtype"]))
    elif case["epilogue"] == "option_a":  # strided identity, zero-padded channels
        rc = 1 + case["seed"] % k
        off = (case["seed"] // k) % (k - rc + 1)
        rh, rw = (v * step - (case["seed"] % step) for v in (p, q))
        extra = dict(residual=torch.randn(n, rc, rh, rw, generator=g).to(case["dtype"]),
                     res_step=step, res_off=off)
    elif case["epilogue"] == "projection":
        conv2 = nn.Conv2d(case["c2"], k, 1, step, bias=False)
        with torch.no_grad():
            conv2.weight.copy_(torch.randn(conv2.weight.shape, generator=g) / case["c2"] ** 0.5)
        projection = (conv2, _random_bn(k, case["eps"], g))
        shortcut = torch.randn(n, case["c2"], (p - 1) * step + 1, (q - 1) * step + 1,
                               generator=g).to(case["dtype"])
        extra = dict(shortcut=shortcut, shortcut_stride=step)
    return conv, bn, projection, x, extra


def _reference(case, conv, bn, projection, x, extra):
    y = _bn64(F.conv2d(x.double(), conv.weight.double(), None, conv.stride, conv.padding,
                       conv.dilation, conv.groups), bn)
    if projection is not None:
        y = y + _bn64(F.conv2d(extra["shortcut"].double(), projection[0].weight.double(),
                               stride=extra["shortcut_stride"]), projection[1])
    if "residual" in extra:
        step, off = extra.get("res_step", 1), extra.get("res_off", 0)
        res = extra["residual"].double()[:, :, ::step, ::step]
        y = y + F.pad(res, (0, 0, 0, 0, off, y.shape[1] - res.shape[1] - off))
    return F.relu(y) if case["relu"] else y


def _fused(case, conv, bn, projection, x, extra):
    """The conv (and projection conv) in the case's dtype, BN state in fp32, as autocast or
    a half-precision conv with fp32 BN would have them."""
    extra = {name: t.to(DEVICE) if isinstance(t, torch.Tensor) else t
             for name, t in extra.items()}
    if projection is not None:
        del extra["shortcut_stride"]
        extra["projection"] = (projection[0].to(DEVICE, case["dtype"]), projection[1].to(DEVICE))
    return fused.conv_bn_act(x.to(DEVICE), conv.to(DEVICE, case["dtype"]), bn.to(DEVICE),
                             case["relu"], **extra)


@FUZZ
@given(case=conv_cases())
def test_fused_conv_bn_matches_functional(case):
    tensors = _case_tensors(case)
    with torch.no_grad():
        got = _fused(case, *tensors)
    assert got.dtype == case["dtype"]
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert_close(got.float().cpu(), _reference(case, *tensors), case["dtype"], str(case))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_repeated_runs_are_bit_identical(dtype):
    """Inference is deterministic: no atomics, a fixed reduction order per config."""
    torch.manual_seed(0)
    model = fastres.models.CifarResNet(1).eval().to(DEVICE, dtype)
    x = torch.randn(3, 3, 9, 9).to(DEVICE, dtype)
    with torch.no_grad():
        first = model.layer3(model.layer2(model.layer1(fused.stem(model, x))))
        for _ in range(2):
            again = model.layer3(model.layer2(model.layer1(fused.stem(model, x))))
            assert torch.equal(again, first), "same input, different bits"
