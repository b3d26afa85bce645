"""fastres inside larger programs: torch.compile, torch.export, autocast, inference_mode,
CUDA graphs, timm models, DataParallel/DDP, warm-up and per-batch-size recompilation.

Compile and export run on a ResNet-8 (7 fused convs) at 2x3x8x8, on the Triton kernel and on
the plain-PyTorch CPU path.
"""
import copy
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn as nn
import torchvision.models.resnet as tv
from torch.utils._python_dispatch import TorchDispatchMode

import fastres
import fastres.kernels.conv as kconv
import fastres.ops as ops
import fastres.ops.conv_bn_act as eval_op
from helpers import DEVICE, assert_close, randomize_bn

CONVS = 7  # fused convs of CifarResNet(1): the stem and two per block



@pytest.fixture
def op_calls(monkeypatch):
    """Counts launches of the fused conv by the eval op and the training conv op."""
    import fastres.ops.conv_train as train_op
    calls = []
    for module in (eval_op, train_op):
        real = module.conv_fused
        monkeypatch.setattr(module, "conv_fused",
                            lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    return calls


def _resnet8(seed=0):
    torch.manual_seed(seed)
    return randomize_bn(fastres.models.CifarResNet(1), seed).eval().to(DEVICE)


def _x(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


# --- torch.compile and torch.export -------------------------------------------------------

@pytest.mark.parametrize("mode", ["eval", "train"])
def test_compile_fullgraph(mode, path, op_calls):
    torch._dynamo.reset()
    model = _resnet8().train(mode == "train")
    ref = copy.deepcopy(model)
    x = _x(2, 3, 8, 8)
    with torch.no_grad():
        got = torch.compile(model, fullgraph=True)(x)  # fullgraph: a graph break raises
        compiled_calls = len(op_calls)
        expect = ref(x)
    assert_close(got.cpu(), expect.cpu(), torch.float32, f"compiled ({mode})")
    assert compiled_calls == (CONVS if path == "triton" else 0), \
        "on the kernels every conv must run as a fastres op, not decomposed"
    for (name, a), b in zip(model.named_buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, msg=f"buffer {name} after a compiled {mode} step")


def test_compiled_batch_size_changes_recompile_once():
    """Dynamo's automatic dynamic shapes: the second batch size recompiles with a symbolic
    batch (the op's fake implementation takes SymInts); later ones reuse that graph."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = _resnet8()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        for n in (2, 3, 4, 7):
            x = _x(n, 3, 8, 8)
            assert_close(compiled(x).cpu(), model(x).cpu(), torch.float32, f"batch {n}")
    assert counters["stats"]["unique_graphs"] == 2


def test_compiled_eval_gradients():
    torch._dynamo.reset()
    model = _resnet8()
    x = _x(2, 3, 8, 8).requires_grad_()
    torch.compile(model, fullgraph=True)(x).square().sum().backward()
    got, x.grad = x.grad, None
    model(x).square().sum().backward()
    assert_close(got.cpu(), x.grad.cpu(), torch.float32, "input grad through the compiled op")


def test_export_with_dynamic_batch(path, op_calls):
    """Exported for inference (no_grad: an eval forward that records autograd runs op by op),
    every conv is a fastres op on the kernels' path; on the plain path torchvision's ops."""
    model = _resnet8()
    batch = torch.export.Dim("batch", min=1, max=64)
    with torch.no_grad():
        ep = torch.export.export(model, (_x(2, 3, 8, 8),), dynamic_shapes=({0: batch},))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    fused_convs = targets.count(torch.ops.fastres.conv_bn_act.default)
    assert fused_convs == (CONVS if path == "triton" else 0)
    if path == "triton":
        assert not any("convolution" in str(t) for t in targets), "a conv left the fused op"
    x = _x(5, 3, 8, 8)
    with torch.no_grad():
        assert_close(ep.module()(x).cpu(), model(x).cpu(), torch.float32, "exported, batch 5")


# --- autocast, inference_mode ---------------------------------------------------------------

def _tv_bottleneck():
    torch.manual_seed(0)
    down = nn.Sequential(nn.Conv2d(16, 32, 1, 2, bias=False), nn.BatchNorm2d(32))
    ref = randomize_bn(tv.Bottleneck(16, 8, 2, down)).eval()
    return ref, fastres.convert(nn.Sequential(copy.deepcopy(ref)))[0].to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast(dtype, path):
    if DEVICE == "cpu" and dtype == torch.float16:
        pytest.skip("CPU autocast is bfloat16")
    ref, ours = _tv_bottleneck()
    x = torch.randn(2, 16, 9, 9)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=dtype):
        got = ours(x.to(DEVICE))
    assert got.dtype == dtype
    assert_close(got.float().cpu(), ref.double()(x.double()), dtype, "autocast")


def test_inference_mode_then_autograd(path):
    """A forward under inference_mode, then one with autograd on a frozen net (gradient to
    the input only): nothing from the first leaks into the second."""
    ref, ours = _tv_bottleneck()
    x = torch.randn(2, 16, 9, 9)
    with torch.inference_mode():
        got = ours(x.to(DEVICE))
    assert got.is_inference()
    assert_close(got.cpu(), ref(x), torch.float32, "inference_mode")
    for p in ours.parameters():
        p.requires_grad_(False)  # frozen net, gradient to x only
    xo, xr = x.clone().to(DEVICE).requires_grad_(), x.clone().requires_grad_()
    ours(xo).square().sum().backward()
    ref(xr).square().sum().backward()
    assert_close(xo.grad.cpu(), xr.grad, torch.float32, "input grad after inference_mode")


# --- CUDA graphs ------------------------------------------------------------------------------

class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_host_side_is_capture_safe(monkeypatch):
    """What CUDA-graph capture needs of the host code, checked without a GPU: after warm-up a
    forward reads no value back (no .item()), recomputes no fold, and allocates exactly one
    output per conv (the same every call; the stem also its padded input and weight) and
    computes nothing on the host (BatchNorm is
    applied in the kernel from the live buffers); only the launch itself is stubbed out."""
    if not ops.uses_triton(torch.empty(0, device=DEVICE)):
        pytest.skip("checks the Triton dispatch")
    model = fastres.warmup(_resnet8(), [(2, 3, 8, 8)])
    launches = []
    stub = type("Stub", (), {
        "__getitem__": lambda self, grid: lambda *a, **k: launches.append(grid)})()
    monkeypatch.setattr(kconv, "conv_fused_kernel", stub)
    monkeypatch.setattr(kconv, "pad_nhwc_kernel", stub)  # the stem's padded input and weight
    inner = OpLog()
    real = eval_op.conv_fused

    def logged(*args, **kwargs):
        with inner:
            return real(*args, **kwargs)
    monkeypatch.setattr(eval_op, "conv_fused", logged)
    logs = []
    for _ in range(2):
        inner.ops.clear()
        with torch.no_grad(), OpLog() as outer:
            model(_x(2, 3, 8, 8))
        logs.append((list(outer.ops), list(inner.ops)))
    (outer1, inner1), (outer2, inner2) = logs
    assert outer1 == outer2 and inner1 == inner2, "the host work changed between calls"
    # one output a conv, and the stem's input and weight padded to 4 channels (two launches)
    assert inner1 == ["aten.empty.memory_format"] * (CONVS + 2), inner1
    assert outer1.count("fastres.conv_bn_act.default") == CONVS
    assert not any(s in op for op in outer1 for s in ("_local_scalar_dense", "rsqrt", "nonzero"))
    assert len(launches) == 2 * (CONVS + 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_capture_and_replay():
    model = fastres.warmup(_resnet8(), [(4, 3, 16, 16)])
    static_x = _x(4, 3, 16, 16)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            model(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = model(static_x)
        for seed in range(3):
            x = _x(4, 3, 16, 16, seed=seed + 10)
            static_x.copy_(x)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(static_y, model(x)), "replay differs from eager"
        model.layer1[0].bn1.running_var.mul_(4.0)  # the kernels read the live buffers
        graph.replay()
        assert torch.equal(static_y, model(static_x)), "replay after an in-place update"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_compile_reduce_overhead():
    torch._dynamo.reset()
    model = _resnet8()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for seed in range(3):
            x = _x(4, 3, 16, 16, seed=seed)
            assert_close(compiled(x).clone(), model(x), torch.float32, "cudagraph trees")


# --- timm, DataParallel, DDP ----------------------------------------------------------------

def _timm_resnet(block, **kw):
    resnet = pytest.importorskip("timm.models.resnet")
    torch.manual_seed(0)
    model = resnet.ResNet(getattr(resnet, block), [1, 1, 1, 1], channels=(8, 16, 16, 16),
                          stem_width=8, num_classes=5, **kw)
    return randomize_bn(model).eval()


@pytest.mark.parametrize("block,kw", [("BasicBlock", {}),
                                      ("Bottleneck", dict(cardinality=4, base_width=8)),
                                      ("Bottleneck", dict(avg_down=True))],
                         ids=["basic", "resnext", "avg_down"])
def test_timm_resnet(block, kw):
    ref = _timm_resnet(block, **kw)
    model = fastres.convert(copy.deepcopy(ref)).to(DEVICE)
    assert list(model.state_dict()) == list(ref.state_dict())
    assert type(model.conv1) is nn.Conv2d and type(model.act1) is nn.ReLU  # timm's stem stays
    blocks = [m for m in model.modules() if isinstance(m, fastres.FusedBlock)]
    assert len(blocks) == 4
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert_close(model(x.to(DEVICE)).cpu(), ref(x), torch.float32, f"timm {block} {kw}")
    model.train()  # train mode keeps timm's math (batch statistics of 2x1x1 maps at the end)
    ref.train()
    torch.testing.assert_close(model(x.to(DEVICE)).cpu(), ref(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,blocks", [("resnet18", 8), ("resnext50_32x4d", 16),
                                         ("wide_resnet50_2", 16)])
def test_timm_registered_models_convert_fully(name, blocks):
    timm = pytest.importorskip("timm")
    model = timm.create_model(name)
    keys = list(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastres.convert(model)
    assert sum(isinstance(m, fastres.FusedBlock) for m in model.modules()) == blocks
    assert list(model.state_dict()) == keys


def test_timm_block_with_attention_runs_timms_forward(path):
    """A timm block with squeeze-excitation converts, and at each call runs timm's own
    forward (with a warning naming the reason) since the kernels have no SE."""
    ref = _timm_resnet("BasicBlock", block_args=dict(attn_layer="se"))
    model = fastres.convert(copy.deepcopy(ref)).to(DEVICE)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_close(model(x.to(DEVICE)).cpu(), ref(x), torch.float32, "timm SE")
    assert any("se is a" in str(w.message) for w in caught) == (path == "triton")


def test_data_parallel():
    ref = _resnet8()
    model = fastres.convert(nn.DataParallel(copy.deepcopy(ref)))
    x = _x(2, 3, 8, 8)
    with torch.no_grad():
        assert_close(model(x).cpu(), ref(x).cpu(), torch.float32, "DataParallel")


def test_distributed_data_parallel(tmp_path):
    import torch.distributed as dist
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0,
                            world_size=1)
    try:
        ref = _tv_bottleneck()[0]
        model = fastres.convert(nn.parallel.DistributedDataParallel(
            nn.Sequential(copy.deepcopy(ref)).to(DEVICE)))
        assert isinstance(model.module[0], fastres.FusedBlock)
        x = torch.randn(2, 16, 9, 9)
        with torch.no_grad():
            assert_close(model(x.to(DEVICE)).cpu(), ref(x), torch.float32, "DDP")
    finally:
        dist.destroy_process_group()


# --- warm-up and per-batch-size recompilation -----------------------------------------------

def test_warmup_runs_each_shape_and_changes_nothing(op_calls):
    model = _resnet8().train()
    state = copy.deepcopy(model.state_dict())
    fastres.warmup(model, [(1, 3, 8, 8), (3, 3, 8, 8)])
    assert len(op_calls) == 2 * CONVS
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), f"warm-up changed {k}"


SPECIALIZATION_SCRIPT = textwrap.dedent("""
    import torch
    import fastres, fastres.ops
    import fastres.kernels.conv as kconv
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature
        kernel = kconv.conv_fused_kernel
        binder = create_function_from_signature(kernel.signature, kernel.params,
                                                make_backend(GPUTarget("cuda", 90, 32)))
    except (ImportError, AttributeError, TypeError) as e:
        print("SKIP", e)
        raise SystemExit
    keys = {}

    class Binder:  # what the JIT would key its compile cache on, without launching
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                _, spec, options = binder(*args, **kwargs)
                keys.setdefault(str(spec) + str(sorted(options.items())), set()).add(
                    (BATCH, kwargs["BLOCK_M"]))
            return launch

    kconv.conv_fused_kernel = Binder()
    fastres.ops.uses_triton = lambda t: True
    model = fastres.ConvBNAct(32, 32, 3, padding=1).eval()
    with torch.no_grad():
        for BATCH in (1, 2, 3, 15, 16, 17, 32, 33, 200, 256):
            model(torch.randn(BATCH, 32, 7, 7))  # M = 49 * BATCH
    for batches in keys.values():
        print(sorted(batches))
""")


def test_batch_size_does_not_recompile(tmp_path):
    """The conv kernel's JIT cache key (argument specialization, constexprs, options) for one
    layer over ten batch sizes: only the BLOCK_M bucket splits it, never M's value,
    divisibility by 16 or equality to 1. Computed for sm_90 in a process without the
    interpreter (where the kernel is a real JITFunction); nothing is compiled or launched."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FASTRES_TUNE_CACHE"] = str(tmp_path / "no-tuned-configs.json")  # the heuristic's
    out = subprocess.run([sys.executable, "-c", SPECIALIZATION_SCRIPT], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    if out.stdout.startswith("SKIP"):
        pytest.skip(f"this Triton's JIT internals differ: {out.stdout}")
    groups = [eval(line) for line in out.stdout.strip().splitlines()]
    assert len(groups) == 2, f"expected one cache key per BLOCK_M bucket, got {groups}"
    for batches in groups:
        assert len({bm for _, bm in batches}) == 1, groups
