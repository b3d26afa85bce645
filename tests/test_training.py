"""Train-mode fastres blocks on the Triton training kernels against torchvision's blocks:
outputs, input and parameter gradients and BN buffers over several SGD steps."""
import copy

import pytest
import torch
import torch.nn as nn

import fastres
from fastres.kernels.bn import MERGE_ROWS, REDUCE_ROWS, bn_bwd_reduce, bn_merge
from fastres.kernels.conv import conv_fused
from fastres.kernels.conv_bwd import conv_dgrad, conv_wgrad
from helpers import DEVICE, REL_TOL, ConvCounter, assert_close, block_pair, rel_err

# Gradients pass through more roundings than outputs. In half precision, a ReLU input that
# rounds to the other side of zero flips one mask element, which moves a gradient of n
# elements by about 1/sqrt(n): several percent at test sizes (fp32 stays tight).
GRAD_TOL = {torch.float32: REL_TOL[torch.float32], torch.float16: 3e-2, torch.bfloat16: 0.15}

# (kind, inplanes, planes, stride, projection, groups, base_width, dilation, H, bn kwargs)
CASES = [
    ("basic", 8, 16, 2, True, 1, 64, 1, 7, {}),
    ("basic", 16, 16, 1, False, 1, 64, 1, 5, {"momentum": None}),
    ("bottleneck", 16, 8, 2, True, 4, 16, 1, 7, {"momentum": 0.3}),
    ("bottleneck", 32, 8, 1, False, 1, 64, 2, 6, {"affine": False}),
    ("basic", 16, 16, 1, False, 1, 64, 1, 5, {"track_running_stats": False}),
]


# (N, C, H, K, kernel, stride, padding, dilation, groups)
CONV_CASES = [
    (2, 8, 7, 16, 3, 2, 1, 1, 1),
    (2, 16, 6, 16, 3, 1, 2, 2, 4),
    (1, 4, 6, 8, 1, 2, 0, 1, 1),
    (3, 16, 9, 32, 3, 2, 1, 1, 8),
    (2, 3, 9, 8, 5, 3, 2, 1, 1),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "-".join(map(str, c)))
def test_dgrad_wgrad_kernels_match_autograd(case):
    n, c, h, k, r, stride, pad, dil, groups = case
    torch.manual_seed(0)
    x = torch.randn(n, c, h, h, dtype=torch.float64, requires_grad=True)
    w = torch.randn(k, c // groups, r, r, dtype=torch.float64, requires_grad=True)
    y = nn.functional.conv2d(x, w, None, stride, pad, dil, groups)
    dy = torch.randn_like(y)
    y.backward(dy)
    geo = dict(stride=(stride, stride), padding=(pad, pad), dilation=(dil, dil), groups=groups)
    w_cl, x_cl, dy_cl = (t.detach().float().to(DEVICE).contiguous(memory_format=torch.channels_last)
                         for t in (w, x, dy))
    dx = conv_dgrad(dy_cl, w_cl, x.shape, **geo)
    assert_close(dx.cpu(), x.grad, torch.float32, "dgrad")
    for split in (None, 3):  # split-K partials summed in order
        dw = conv_wgrad(x_cl, dy_cl, kernel_size=(r, r), split=split, **geo)
        assert_close(dw.cpu(), w.grad, torch.float32, f"wgrad split={split}")


def test_batch_statistics_survive_a_large_mean():
    """mean 1000, variance 1/16 over 4096 pixels: fp32 sum/sum-of-squares would lose the
    variance entirely (E[y^2] - E[y]^2 cancels 7 digits); per-tile M2 merged with Chan's
    formula keeps it."""
    torch.manual_seed(0)
    x = (1000 + torch.randn(4, 16, 32, 32)).to(DEVICE).contiguous(memory_format=torch.channels_last)
    w = torch.full((4, 16, 1, 1), 1 / 16, device=DEVICE)
    y, partials = conv_fused(x, w, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
                             relu=False, with_stats=True)
    y64 = y.double().cpu()
    var = y64.var((0, 2, 3), unbiased=False)
    for rows in (MERGE_ROWS, 3):  # one pass; a tree of passes
        merged, stats = bn_merge(partials, 1e-5, rows_per_program=rows)
        assert (merged[0].cpu() == 4 * 32 * 32).all()
        assert_close(merged[1].cpu(), y64.mean((0, 2, 3)), torch.float32, "mean")
        assert rel_err(merged[2].cpu() / merged[0].cpu(), var) < 1e-4, "variance"
        assert rel_err(stats[1].cpu(), (var + 1e-5).rsqrt()) < 1e-4, "invstd"


@pytest.mark.parametrize("max_rows", [REDUCE_ROWS, 3])
def test_bn_backward_reductions(max_rows):
    """sum(dz) and sum(dz * xhat) over pixels, dz = dy * (y > 0), in one program per
    channel block or spread over several."""
    torch.manual_seed(0)
    cl = torch.channels_last
    x, dy, y = (torch.randn(3, 40, 9, 11).to(DEVICE).contiguous(memory_format=cl)
                for _ in range(3))
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    stats = torch.stack([mean, (var + 1e-5).rsqrt(), torch.full_like(mean, 3 * 9 * 11)])
    sums = bn_bwd_reduce(dy, y, x, stats, relu=True, max_rows=max_rows)
    dz = (dy * (y > 0)).double()
    xhat = (x.double() - mean.double()[:, None, None]) * stats[1].double()[:, None, None]
    assert_close(sums[0].cpu(), dz.sum((0, 2, 3)).cpu(), torch.float32, "sum dz")
    assert_close(sums[1].cpu(), (dz * xhat).sum((0, 2, 3)).cpu(), torch.float32, "sum dz xhat")


def _pair(kind, inplanes, planes, stride, projection, groups, base_width, dilation, bn_kw,
          dtype=torch.float64):
    """A torchvision block (in ``dtype``, CPU) and a fastres copy (fp32, DEVICE), train mode."""
    ref, ours = block_pair(kind, inplanes, planes, stride, projection, groups, base_width,
                           dilation, bn_kw)
    return ref.to(dtype), ours


def _step(ref, ours, x, dtype, steps=3, lr=0.1):
    """Forward, backward and an SGD step on both, ``steps`` times; compare everything."""
    opt_ref = torch.optim.SGD(ref.parameters(), lr=lr)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=lr)
    for step in range(steps):
        xs = x[step]
        x_ref = xs.to(next(ref.parameters()).dtype).requires_grad_()
        x_ours = xs.to(DEVICE, dtype).requires_grad_()
        y_ref, y_ours = ref(x_ref), ours(x_ours)
        grad = torch.randn_like(y_ref)
        y_ref.backward(grad)
        y_ours.backward(grad.to(DEVICE, dtype))
        assert_close(y_ours.cpu(), y_ref, dtype, f"step {step} output")
        _close(x_ours.grad, x_ref.grad, GRAD_TOL[dtype], f"step {step} input grad")
        for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
            _close(p.grad, q.grad, GRAD_TOL[dtype], f"step {step} {name}.grad")
        for (name, b), c in zip(ours.named_buffers(), ref.buffers()):
            if name.endswith("num_batches_tracked"):
                assert b.item() == c.item(), name
            else:
                _close(b, c, REL_TOL[dtype], f"step {step} {name}")
        opt_ref.step()
        opt_ours.step()
        opt_ref.zero_grad()
        opt_ours.zero_grad()


def _close(out, ref, tol, what):
    err = rel_err(out.cpu(), ref)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.1g}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:9])) + str(c[9]))
def test_block_training_matches_torchvision(case):
    kind, inplanes, planes, stride, projection, groups, base_width, dilation, h, bn_kw = case
    ref, ours = _pair(kind, inplanes, planes, stride, projection, groups, base_width, dilation,
                      bn_kw)
    x = torch.randn(3, 2, inplanes, h, h)
    _step(ref, ours, x, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_block_training_half_precision_is_as_accurate_as_torchvision(dtype):
    """Against float64: our output, input grad and parameter grads are within the dtype's
    tolerance or, where half-precision rounding dominates, within 2x torchvision's own
    error in the same dtype."""
    ref, ours = _pair("basic", 8, 16, 2, True, 1, 64, 1, {})
    half, ours = copy.deepcopy(ref).to(dtype), ours.to(dtype)
    for step in range(2):
        x, grad = torch.randn(2, 8, 7, 7), torch.randn(2, 16, 4, 4)
        results = []
        for model, dev, dt in ((ref, "cpu", torch.float64), (half, "cpu", dtype),
                               (ours, DEVICE, dtype)):
            xi = x.to(dev, dt).requires_grad_()
            y = model(xi)
            y.backward(grad.to(dev, dt))
            results.append([y, xi.grad] + [p.grad for p in model.parameters()])
            model.zero_grad()
        exact, theirs, got = results
        for i, (a, b, e) in enumerate(zip(got, theirs, exact)):
            tol = REL_TOL[dtype] if i == 0 else GRAD_TOL[dtype]
            _close(a, e, max(tol, 2 * rel_err(b, e)), f"step {step} tensor {i}")


def test_block_training_under_autocast():
    ref, ours = _pair("basic", 8, 16, 2, True, 1, 64, 1, {})
    x = torch.randn(2, 8, 7, 7)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = ours(x.to(DEVICE))
    assert y.dtype == torch.bfloat16
    assert_close(y.float().cpu(), ref(x.double()), torch.bfloat16, "autocast output")
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in ours.parameters())


def test_no_torch_convolution_in_fused_training_step():
    ref, ours = _pair("bottleneck", 16, 8, 2, True, 4, 16, 1, {})
    x = torch.randn(2, 16, 5, 5, device=DEVICE, requires_grad=True)
    with ConvCounter() as counter:
        ours(x).square().sum().backward()
    assert counter.convs == 0, "a torch convolution ran in the fused training step"
    assert x.grad is not None and all(p.grad is not None for p in ours.parameters())


def test_conv_bn_act_trains_like_conv_then_bn():
    torch.manual_seed(0)
    ours = fastres.ConvBNAct(3, 8, 3, stride=2, padding=1).to(DEVICE).train()
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False).double()
    bn = nn.BatchNorm2d(8).double()
    conv.weight.data.copy_(ours.weight.detach().cpu())
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64, requires_grad=True)
    x_ours = x.detach().float().to(DEVICE).requires_grad_()
    y_ref, y = torch.relu(bn(conv(x))), ours(x_ours)
    y_ref.sum().backward()
    y.sum().backward()
    assert_close(y.cpu(), y_ref, torch.float32, "output")
    assert_close(x_ours.grad.cpu(), x.grad, torch.float32, "input grad")
    assert_close(ours.weight.grad.cpu(), conv.weight.grad, torch.float32, "weight grad")
    assert_close(ours.bn.running_var.cpu(), bn.running_var, torch.float32, "running_var")


def test_eval_after_training_uses_the_new_statistics():
    ref, ours = _pair("basic", 8, 16, 2, True, 1, 64, 1, {})
    x = torch.randn(2, 2, 8, 7, 7)
    _step(ref, ours, x, torch.float32, steps=2)
    with torch.no_grad():
        ours(x[0].to(DEVICE))  # a last train step whose stats eval must pick up
        ref(x[0].double())
        ours.eval(), ref.eval()
        assert_close(ours(x[1].to(DEVICE)).cpu(), ref(x[1].double()), torch.float32, "eval")


def test_one_value_per_channel_is_rejected_like_batchnorm():
    _, ours = _pair("basic", 16, 16, 1, False, 1, 64, 1, {})
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ours(torch.randn(1, 16, 1, 1, device=DEVICE))


def test_cifar_resnet20_trains_like_the_reference(monkeypatch):
    torch.manual_seed(0)
    ours = fastres.models.cifar_resnet20().train()
    ref = copy.deepcopy(ours).double()
    ours.to(DEVICE)
    x, target = torch.randn(2, 3, 8, 8), torch.tensor([3, 7])
    losses = {}
    for name, model, dtype in (("ours", ours, torch.float32), ("ref", ref, torch.float64)):
        if name == "ref":  # op by op, as torchvision: no fused training kernels
            monkeypatch.setattr(fastres.ops, "uses_triton", lambda t: False)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        dev = DEVICE if name == "ours" else "cpu"
        with ConvCounter() as counter:
            for _ in range(3):
                loss = nn.functional.cross_entropy(model(x.to(dev, dtype)), target.to(dev))
                opt.zero_grad()
                loss.backward()
                opt.step()
        assert (counter.convs == 0) == (name == "ours"), f"{name}: {counter.convs} torch convs"
        losses[name] = loss.item()
    assert abs(losses["ours"] - losses["ref"]) <= 1e-4 * max(1.0, abs(losses["ref"])), losses


def test_training_ops_pass_opcheck():
    """Schema, fake impls, autograd registration, and gradients under AOTAutograd (which
    traces the backward through the backward ops' fake impls)."""
    torch.manual_seed(0)
    cl = torch.channels_last
    x = torch.randn(2, 4, 5, 5, device=DEVICE).contiguous(memory_format=cl).requires_grad_()
    w = torch.randn(8, 4, 3, 3, device=DEVICE).contiguous(memory_format=cl).requires_grad_()
    geo = ([1, 1], [1, 1], [1, 1], 1)
    torch.library.opcheck(torch.ops.fastres.conv_train, (x, w) + geo)
    raw, merged = torch.ops.fastres.conv_train(x.detach(), w.detach(), *geo)
    buffers = (torch.zeros(8, device=DEVICE), torch.ones(8, device=DEVICE), None)
    torch.library.opcheck(torch.ops.fastres.bn_stats, (merged[None], 1e-5, 0.1) + buffers)
    stats = torch.ops.fastres.bn_stats(merged[None], 1e-5, 0.1, None, None, None)
    gamma, beta = (torch.rand(8, device=DEVICE, requires_grad=True) for _ in range(2))
    res = torch.randn(2, 8, 5, 5, device=DEVICE).contiguous(memory_format=cl).requires_grad_()
    torch.library.opcheck(torch.ops.fastres.bn_act_train,
                          (raw.requires_grad_(), stats, gamma, beta, res, None, None, None,
                           None, True, 1, 0, None))


def test_block_training_step_under_torch_compile():
    _, ours = _pair("basic", 8, 16, 2, True, 1, 64, 1, {})
    eager = copy.deepcopy(ours)
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    for _ in range(2):
        x = torch.randn(2, 8, 7, 7, device=DEVICE)
        for model in (compiled, eager):
            model(x).square().sum().backward()
    for (name, p), q in zip(ours.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    for (name, b), c in zip(ours.named_buffers(), eager.buffers()):
        torch.testing.assert_close(b, c, msg=name)


def test_double_backward_raises_and_unfused_is_exact():
    """create_graph=True through the training kernels raises (their backward has no graph);
    inside fastres.unfused() the same model runs op by op and matches torchvision."""
    ref, ours = _pair("basic", 8, 16, 2, True, 1, 64, 1, {})
    x = torch.randn(2, 8, 7, 7)
    params = list(ours.parameters())
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(ours(x.to(DEVICE)).square().sum(), params, create_graph=True)
    penalties = []
    for model, xs, ps in ((ref, x.double(), list(ref.parameters())),
                          (ours, x.to(DEVICE), params)):
        with fastres.unfused():
            grads = torch.autograd.grad(model(xs).square().sum(), ps, create_graph=True)
            sum(g.square().sum() for g in grads).backward()
        penalties.append([p.grad for p in ps])
    for (name, _), a, b in zip(ours.named_parameters(), *penalties[::-1]):
        assert_close(a.cpu(), b, torch.float32, f"penalty grad of {name}")
