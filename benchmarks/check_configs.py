"""Before anything is timed on a GPU: every launch config fastres picks for a network at the
batch sizes that will be timed, checked against PyTorch on that device.
``python -m benchmarks.check_configs [--network resnet50] [--batches 1,32,256] [--dtype bf16]``

Flattened conv loops at 8 warps have miscompiled in some Triton versions (inductor caps its
flattened conv at 4 warps for that reason), and the CPU tests cannot see a miscompile: they
run the interpreter at small shapes with small configs. So each distinct residual block of
the converted network (and the whole network, which adds the stem) runs at each batch size
with its real configs, in eval (one fused launch a conv) and in train mode (forward, then
backward: dgrad, wgrad, BatchNorm backward), and is compared with the same module in fp32.
The yardstick is eager PyTorch in the same low precision: a launch fails when its relative
error (Frobenius norm of the difference over that of the fp32 result) passes
``max(FACTOR x eager's error, FLOOR)``; a miscompile gives errors of order 1.

Exit status 1 on any failure (run_gpu.sh then stops before timing). Runs anywhere: on a
CPU under ``TRITON_INTERPRET=1`` (the tests run it at a tiny size).
"""
import argparse
import copy
import sys
import time

import torch
import torch.nn as nn

# A miscompile is off by order 1; these bounds only keep rounding noise from failing a run
# (the BatchNorm parameter gradients are sums whose relative error in bf16 is ~1e-2).
FACTOR, FLOOR = 4.0, {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """BatchNorm state away from the identity (fresh modules have mean 0, var 1, gamma 1)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            k = m.num_features
            m.running_mean.copy_(torch.rand(k, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(k, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(k, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(k, generator=g) - 0.5)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _block_inputs(model: nn.Module, x: torch.Tensor) -> dict:
    """name -> input shape of each distinct residual block (by class, shape and stride)."""
    from torchvision.models.resnet import BasicBlock, Bottleneck
    shapes, seen, hooks = {}, set(), []
    for name, m in model.named_modules():
        if isinstance(m, (BasicBlock, Bottleneck)):
            def hook(mod, inputs, name=name):
                key = (type(mod).__name__, tuple(inputs[0].shape), mod.stride,
                       mod.downsample is not None)
                if key not in seen:
                    seen.add(key)
                    shapes[name] = tuple(inputs[0].shape)
            hooks.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return shapes


def _run(module, x, train, grad_out_seed=1):
    """(output, input grad, param grads) of module(x); eval: output only."""
    module.train(train)
    if not train:
        with torch.no_grad():
            return module(x), None, []
    x = x.detach().requires_grad_(True)
    y = module(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_out_seed))
    y.backward(g.to(y.device, y.dtype))
    return y, x.grad, [p.grad for p in module.parameters()]


def compare(name, fast, ref32, eager, x, dtype, train):
    """Failures (strings) of ``fast`` against ``ref32`` with ``eager`` as the yardstick."""
    out = []
    f = _run(copy.deepcopy(fast), x.to(dtype), train)
    r = _run(copy.deepcopy(ref32), x.float(), train)
    e = _run(copy.deepcopy(eager), x.to(dtype), train)
    pairs = [("y", f[0], r[0], e[0])]
    if train:
        pairs.append(("dx", f[1], r[1], e[1]))
        pairs += [(f"grad{i}", a, b, c) for i, (a, b, c) in enumerate(zip(f[2], r[2], e[2]))
                  if b is not None]
    for what, a, b, c in pairs:
        err, yard = _rel(a, b), _rel(c, b)
        limit = max(FACTOR * yard, FLOOR[dtype])
        if not err <= limit:  # NaN fails too
            out.append(f"{name} {'train' if train else 'eval'} {what}: rel err {err:.3g} > "
                       f"{limit:.3g} (eager {yard:.3g})")
    return out


def check(network="resnet50", batches=(1, 32, 256), dtype="bf16", size=224, device=None,
          out=sys.stdout) -> list:
    """Every distinct block and the whole network at each batch size, eval and train."""
    import torchvision
    import fastres
    dt = DTYPES[dtype]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ref = getattr(torchvision.models, network)()
    _randomize_bn(ref)
    ref = ref.to(device).to(memory_format=torch.channels_last)
    ref32 = ref.float()
    eager = copy.deepcopy(ref).to(dt)
    fast = fastres.convert(copy.deepcopy(ref)).to(dt)
    failures = []
    for batch in batches:
        start = time.perf_counter()
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        x = x.to(device).contiguous(memory_format=torch.channels_last)
        shapes = _block_inputs(eager, x.to(dt))
        checked = 0
        for name, shape in shapes.items():
            xb = torch.randn(shape, generator=torch.Generator().manual_seed(len(name)))
            xb = xb.to(device).contiguous(memory_format=torch.channels_last)
            for train in (False, True):
                failures += compare(name, fast.get_submodule(name), ref32.get_submodule(name),
                                    eager.get_submodule(name), xb, dt, train)
                checked += 1
        for train in (False, True):
            failures += compare(network, fast, ref32, eager, x, dt, train)
            checked += 1
        if device == "cuda":
            torch.cuda.synchronize()
        print(f"check_configs {network} {dtype} batch {batch}: {len(shapes)} distinct blocks "
              f"+ the network, eval and train ({checked} runs) in "
              f"{time.perf_counter() - start:.1f} s; failures so far: {len(failures)}",
              file=out, flush=True)
    for f in failures:
        print(f"FAIL {f}", file=out)
    return failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.check_configs",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--network", default="resnet50")
    ap.add_argument("--batches", default="1,32,256")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args(argv)
    failures = check(args.network, tuple(int(b) for b in args.batches.split(",")), args.dtype,
                     args.size)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
