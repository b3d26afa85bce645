"""fastres.convert as a drop-in: whatever users do to a torchvision ResNet (stem surgery, module
swaps, .data writes, copies, hooks, double backward, tracing, ...) gives the same result on
the converted model. Each test does the same thing to a converted model and to an unconverted
torchvision copy, and compares; fastres' fallback warnings are ignored except where asserted.
"""
import copy
import re
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn.utils import parameters_to_vector, parametrize, prune, vector_to_parameters
from torch.optim.swa_utils import AveragedModel
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops.misc import FrozenBatchNorm2d

import fastres
from helpers import DEVICE, REL_TOL, ConvCounter, randomize_bn, rel_err

pytestmark = pytest.mark.filterwarnings("ignore:fastres")
F32 = torch.float32
# Train-mode checks use 64x64 inputs (CIFAR stem: 16x16): at 32x32 layer4's maps are 1x1 and
# BN on batch statistics normalizes over two values, which amplifies rounding differences
# (even the weights' memory layout alone) past fp32's tolerance.
TRAIN_SIZE = 64


# --- Models, inputs, comparisons

def _tv(block=BasicBlock, seed=0, **kw):
    """A small torchvision ResNet ([1, 1, 1, 1], 10 classes) with random BN, in eval mode."""
    torch.manual_seed(seed)
    return randomize_bn(ResNet(block, [1, 1, 1, 1], num_classes=10, **kw), seed).eval()


def _pair(block=BasicBlock, **kw):
    """(torchvision model, converted deep copy of it), both on DEVICE."""
    ref = _tv(block, **kw).to(DEVICE)
    return ref, fastres.convert(copy.deepcopy(ref))


def _x(c=3, size=32, n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, size, size, generator=g).to(DEVICE)


def _eval(model, x):
    with torch.no_grad():
        return model.eval()(x)


def _same(got, expect, what, tol=REL_TOL[F32]):
    got, expect = got.detach().double().cpu(), expect.detach().double().cpu()
    assert got.shape == expect.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expect.shape)}"
    bad = (~torch.isfinite(got)).sum().item()
    assert bad == 0, f"{what}: {bad} non-finite values (torchvision: " \
        f"{(~torch.isfinite(expect)).sum().item()})"
    err = rel_err(got, expect)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.1g}"


def _same_named(model, ref, kind, what):
    """Every named parameter (kind="params"), parameter gradient ("grads") or buffer
    ("buffers"; integer ones exactly) of model equals torchvision's of the same name."""
    named = {"buffers": lambda m: m.named_buffers()}.get(kind, lambda m: m.named_parameters())
    got, expect = dict(named(model)), dict(named(ref))
    assert set(got) == set(expect), f"{what}: {kind} names differ: {set(got) ^ set(expect)}"
    for name, e in expect.items():
        g = got[name]
        if kind == "grads":
            g, e = g.grad, e.grad
            assert (g is None) == (e is None), \
                f"{what}: {name}.grad is None in {'fastres' if g is None else 'torchvision'} only"
            if e is not None:
                _same(g, e, f"{what}: gradient of {name}")
        elif kind == "buffers" and not e.is_floating_point():
            assert torch.equal(g.cpu(), e.cpu()), f"{what}: buffer {name} is {g}, torchvision {e}"
        else:
            _same(g, e, f"{what}: {kind[:-1]} {name}")


def _replace(model, match, make):
    """Replace, in place, every submodule for which match(child) holds by make(child)."""
    for _, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if match(child):
                setattr(parent, name, make(child).to(DEVICE))
    return model


def _fastres_warnings(caught):
    return [str(w.message) for w in caught
            if issubclass(w.category, UserWarning) and str(w.message).startswith("fastres")]


def _counted_eval(model, x):
    """(eval output under no_grad, number of aten convolutions it ran)."""
    with ConvCounter() as counter:
        out = _eval(model, x)
    return out, counter.convs


def _mul_params(model, factor):
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(factor)


# --- 1. Surgery on a converted model: stem recipes, norm-layer swaps

def _grayscale(m):
    torch.manual_seed(5)
    m.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False).to(DEVICE)


def _cifar(m):
    torch.manual_seed(5)
    m.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False).to(DEVICE)
    m.maxpool = nn.Identity()


def _syncbn(m):
    nn.SyncBatchNorm.convert_sync_batchnorm(m)


def _timm_frozen(m):
    timm_layers = pytest.importorskip("timm.layers")
    timm_layers.freeze_batch_norm_2d(m)


def _groupnorm(m):
    torch.manual_seed(5)
    _replace(m, lambda c: isinstance(c, nn.BatchNorm2d),
             lambda c: nn.GroupNorm(4, c.num_features))


# recipe: (surgery, input channels, input size, what is compared); "warm": the surgery comes
# after a fused forward
SURGERY = {
    "grayscale": (_grayscale, 1, TRAIN_SIZE, ("warm", "eval", "train")),
    "cifar": (_cifar, 3, TRAIN_SIZE // 4, ("eval", "train")),
    "syncbn": (_syncbn, 3, 32, ("eval",)),
    "timm_frozen_bn": (_timm_frozen, 3, TRAIN_SIZE, ("eval", "train")),
    "groupnorm": (_groupnorm, 3, 32, ("backward",)),
}


@pytest.mark.parametrize("recipe", list(SURGERY))
def test_surgery_after_convert(path, recipe):
    surgery, channels, size, checks = SURGERY[recipe]
    ref, model = _pair()
    if "warm" in checks:
        _eval(model, _x())
    for m in (ref, model):
        surgery(m)
    x = _x(channels, size)
    if "eval" in checks:
        _same(_eval(model, x), _eval(ref, x), f"{recipe}: eval output")
    if "train" in checks:
        with torch.no_grad():
            got, expect = model.train()(x), ref.train()(x)
        _same(got, expect, f"{recipe}: train-mode output")
        _same_named(model, ref, "buffers", f"{recipe}: after a train-mode forward")
    if "backward" in checks:
        got, expect = model.train()(x), ref.train()(x)
        _same(got, expect, f"{recipe}: train-mode output")
        got.square().sum().backward()
        expect.square().sum().backward()
        _same_named(model, ref, "grads", f"{recipe}: train-mode backward")


@pytest.mark.parametrize("recipe", ["grayscale", "cifar"])
def test_surgery_on_fastres_models_resnet18(path, recipe):
    torch.manual_seed(0)
    ref = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval().to(DEVICE)
    model = fastres.models.resnet18(num_classes=10).to(DEVICE)
    model.load_state_dict(ref.state_dict())
    surgery, channels, size, _ = SURGERY[recipe]
    for m in (ref, model):
        surgery(m)
    x = _x(channels, size, n=1)
    _same(_eval(model, x), _eval(ref, x), f"fastres.models.resnet18, {recipe} stem: eval output")


# --- 2. Activation swap

@pytest.mark.parametrize("when", ["before_convert", "after_convert"])
def test_relu_swapped_for_silu(path, when):
    def silu(m):
        return _replace(m, lambda c: isinstance(c, nn.ReLU), lambda c: nn.SiLU())

    ref = _tv().to(DEVICE)
    if when == "before_convert":
        model = fastres.convert(copy.deepcopy(silu(ref)))
    else:
        model = fastres.convert(copy.deepcopy(ref))
        for m in (ref, model):
            silu(m)
    x = _x()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _eval(model, x)
    _same(got, _eval(ref, x), f"ReLU -> SiLU {when}: eval output")
    if when == "after_convert" and path == "triton":  # the plain path never fuses: no loss
        assert _fastres_warnings(caught), "no UserWarning starting with 'fastres' after the " \
            f"blocks' ReLU became SiLU; warnings seen: {[str(w.message) for w in caught]}"


# --- 3. .data writes after an eval forward

def test_data_writes_after_eval_forward(path):
    ref, model = _pair()
    student = _tv(seed=1).to(DEVICE)
    x = _x()
    _same(_eval(model, x), _eval(ref, x), "before any write")
    names = [n for n, _ in ref.named_parameters()]
    assert [n for n, _ in model.named_parameters()] == names, \
        "the converted model's parameters are not torchvision's, in torchvision's order"
    for m in (ref, model):
        for p in m.parameters():
            p.data.mul_(1.1)
    _same(_eval(model, x), _eval(ref, x), "after p.data.mul_(1.1)")
    for m in (ref, model):  # mean teacher: teacher = 0.9 teacher + 0.1 student, through .data
        for t, s in zip(m.parameters(), student.parameters()):
            t.data.mul_(0.9).add_(s.data, alpha=0.1)
    _same(_eval(model, x), _eval(ref, x), "after a mean-teacher EMA update written with .data")
    vec = parameters_to_vector(ref.parameters()).detach() * 0.95
    for m in (ref, model):
        vector_to_parameters(vec, m.parameters())
    _same(_eval(model, x), _eval(ref, x), "after vector_to_parameters")
    for m in (ref, model):
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_var.data.mul_(2)
    _same(_eval(model, x), _eval(ref, x), "after running_var.data.mul_(2)")


# --- 4. Copies, weight averaging, tracing

@pytest.mark.parametrize("grad", [False, True], ids=["warm_no_grad", "warm_with_grad"])
def test_deepcopy_after_eval_forward(path, grad):
    ref, model = _pair()
    x = _x()
    with torch.set_grad_enabled(grad):
        model(x)
    ref_copy, copied = copy.deepcopy(ref), copy.deepcopy(model)
    shared = {id(p) for p in model.parameters()} & {id(p) for p in copied.parameters()}
    assert not shared, f"deepcopy shares {len(shared)} parameters with the original"
    for m in (ref, model):
        _mul_params(m, 1.1)
    _same(_eval(copied, x), _eval(ref_copy, x), "the deep copy, after the original changed")
    _same(_eval(model, x), _eval(ref, x), "the original, after its parameters changed")


def test_averaged_model_then_head_finetuning(path):
    ref, model = _pair()
    x, y = _x(size=TRAIN_SIZE), torch.tensor([1, 7], device=DEVICE)
    with torch.no_grad():
        model(x)
    swa_ref, swa = AveragedModel(ref), AveragedModel(model)
    for m in (ref, model):
        _mul_params(m, 1.1)
    swa_ref.update_parameters(ref)
    swa.update_parameters(model)
    _same(_eval(swa, x), _eval(swa_ref, x), "AveragedModel after update_parameters")
    _same_named(swa, swa_ref, "params", "AveragedModel after update_parameters")
    optimizers = []
    for m in (ref, model):
        m.requires_grad_(False)
        m.fc.requires_grad_(True)
        m.train()
        optimizers.append(torch.optim.SGD(m.fc.parameters(), lr=0.1))
    for step in range(2):
        losses = []
        for m, opt in zip((ref, model), optimizers):
            opt.zero_grad()
            loss = F.cross_entropy(m(x), y)
            loss.backward()
            opt.step()
            losses.append(loss)
        _same(losses[1], losses[0], f"head fine-tuning, loss of step {step}")
    _same_named(model, ref, "params", "after two SGD steps on the head")
    _same_named(model, ref, "buffers", "after two train-mode steps")


@pytest.mark.parametrize("grad", [False, True], ids=["traced_no_grad", "traced_with_grad"])
def test_jit_trace_reads_live_parameters(path, grad):
    ref, model = _pair()
    x = _x()
    _eval(model, x)  # warm
    with torch.set_grad_enabled(grad):
        try:
            traced = torch.jit.trace(model.eval(), x, check_trace=False)
            got = traced(x)
        except Exception as e:  # acceptable: a clear refusal that names fastres
            assert "fastres" in str(e), f"torch.jit.trace failed without naming fastres: {e!r}"
            return
        _same(got, _eval(ref, x), "traced module")
        for m in (ref, model):
            _mul_params(m, 1.1)
        _same(traced(x), _eval(ref, x), "traced module after an in-place parameter change")


# --- 5. Eval-mode double backward

@pytest.mark.parametrize("penalty", ["param_grad_norm", "input_grad_norm"])
def test_eval_double_backward(path, penalty):
    ref, model = _pair()
    results = []
    for m in (ref, model):
        x = _x().requires_grad_(penalty == "input_grad_norm")
        out = m.eval()(x)
        wrt = list(m.parameters()) if penalty == "param_grad_norm" else [x]
        grads = torch.autograd.grad(out.sum(), wrt, create_graph=True)
        loss = sum(g.pow(2).sum() for g in grads)
        loss.backward()
        results.append((out, loss, x.grad))
    (out_r, loss_r, xg_r), (out_m, loss_m, xg_m) = results
    _same(out_m, out_r, f"{penalty}: output")
    _same(loss_m, loss_r, f"{penalty}: penalty value")
    _same_named(model, ref, "grads", f"{penalty}: double backward")
    if penalty == "input_grad_norm":
        _same(xg_m, xg_r, f"{penalty}: gradient of the penalty w.r.t. the input")


# --- 6. Hooks and parametrizations on inner modules

class _Half(nn.Module):
    def forward(self, w):
        return w * 0.5


@pytest.mark.parametrize("kind", ["forward_hook", "prune", "parametrize"])
def test_hooks_and_parametrizations(path, kind):
    ref, model = _pair()
    x = _x()
    if kind == "forward_hook":
        _eval(model, x)  # warm: the hook arrives after a fused forward
        seen = ([], [])
        for m, log in zip((ref, model), seen):
            m.layer1[0].conv1.register_forward_hook(
                lambda mod, inp, out, log=log: log.append(out.detach().clone()))
        _same(_eval(model, x), _eval(ref, x), "output with a forward hook on layer1[0].conv1")
        assert len(seen[1]) == len(seen[0]), f"the hook on layer1[0].conv1 fired " \
            f"{len(seen[1])} times, torchvision's {len(seen[0])}"
        _same(seen[1][0], seen[0][0], "layer1[0].conv1 output seen by the forward hook")
        return
    if kind == "prune":
        for m in (ref, model):
            prune.l1_unstructured(m.layer1[0].conv1, "weight", amount=0.3)
        source = lambda m: m.layer1[0].conv1.weight_orig  # noqa: E731
    else:
        for m in (ref, model):
            parametrize.register_parametrization(m.layer2[0].conv2, "weight", _Half())
        source = lambda m: m.layer2[0].conv2.parametrizations.weight.original  # noqa: E731
    _same(_eval(model, x), _eval(ref, x), f"{kind}: output")
    with torch.no_grad():
        for m in (ref, model):
            source(m).mul_(-1.5)
    _same(_eval(model, x), _eval(ref, x), f"{kind}: output after the source weight changed")


# --- 7. Precision, BN flags, inference mode, FX, vmap, ConvBNAct padding, dtypes

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_extreme_bn_scale_in_half_precision(path, dtype):
    ref = _tv()
    bn, conv = ref.layer1[0].bn1, ref.layer1[0].conv1
    with torch.no_grad():  # scale = 2000 / sqrt(1e-8 + eps), about 6e5: past fp16's range
        bn.weight[0], bn.running_var[0], bn.running_mean[0], bn.bias[0] = 2000.0, 1e-8, 0.0, 0.0
        conv.weight[0] *= 1e-2  # keeps the BN's output (a few hundred) finite in fp16
    ref = ref.to(DEVICE, dtype)
    model = fastres.convert(copy.deepcopy(ref))
    x = _x().to(dtype)
    try:
        expect = _eval(ref, x)
    except RuntimeError as e:
        pytest.skip(f"torchvision cannot run {dtype} convs on {DEVICE}: {e}")
    if not torch.isfinite(expect).all():
        pytest.skip(f"torchvision's {dtype} output is not finite")
    exact = _eval(copy.deepcopy(ref).double(), x.double())
    got = _eval(model, x)
    assert got.dtype == dtype, f"output dtype {got.dtype}, torchvision's {dtype}"
    bad = (~torch.isfinite(got)).sum().item()
    assert bad == 0, f"{bad} non-finite outputs in {dtype}; torchvision's are all finite"
    tol = 2 * REL_TOL[dtype]  # a 6e5 scale amplifies rounding; the point here is finiteness
    err = rel_err(got, exact)
    assert err <= tol, f"{dtype}: relative error {err:.3g} against fp64 > {tol:.3g} " \
        f"(torchvision's own: {rel_err(expect, exact):.3g})"


def test_track_running_stats_turned_off(path):
    ref, model = _pair()
    for m in (ref, model):
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.track_running_stats = False
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = _x(size=TRAIN_SIZE)
    with torch.no_grad():
        got, expect = model.train()(x), ref.train()(x)
    _same(got, expect, "train-mode output, track_running_stats=False")
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert not changed, f"train-mode forward changed {changed} (torchvision changes none)"
    _same_named(model, ref, "buffers", "after a train-mode forward, track_running_stats=False")


def test_built_and_run_in_inference_mode(path):
    x = _x()
    with torch.inference_mode():
        ref = _tv().to(DEVICE)
        model = fastres.convert(_tv()).to("cpu").to(DEVICE)
        _same(model(x), ref(x), "model built, converted and run under inference_mode")


def test_feature_extractor_matches_torchvision(path):
    ref, model = _pair()
    names_ref, names = get_graph_node_names(ref), get_graph_node_names(model)
    for mode, got, expect in zip(("train", "eval"), names, names_ref):
        assert got == expect, f"FX node names ({mode}) differ from torchvision's: only " \
            f"fastres {sorted(set(got) - set(expect))}, only torchvision " \
            f"{sorted(set(expect) - set(got))}"
    nodes = {"layer1.0.relu_1": "f1", "layer2.0.relu_1": "f2"}
    x = _x()
    got = _eval(create_feature_extractor(model, nodes), x)
    expect = _eval(create_feature_extractor(ref, nodes), x)
    assert list(got) == list(expect), f"feature names {list(got)} != {list(expect)}"
    for key in expect:
        _same(got[key], expect[key], f"feature {key}")


def test_vmap_over_batches(path):
    ref, model = _pair()
    xb = _x().unsqueeze(1)  # two batches of one image
    with torch.no_grad():
        expect = torch.func.vmap(ref)(xb)
        try:
            got = torch.func.vmap(model)(xb)
        except Exception as e:  # acceptable: a clear refusal that names fastres
            assert "fastres" in str(e), f"vmap failed without naming fastres: {e!r}"
            return
    _same(got, expect, "vmap output")


def test_convbnact_reflect_padding(path):
    torch.manual_seed(0)
    m = randomize_bn(fastres.ConvBNAct(3, 8, 3, padding=1, padding_mode="reflect"))
    ref = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect",
                                  bias=m.bias is not None), nn.BatchNorm2d(8), nn.ReLU())
    ref[0].load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("bn.")})
    ref[1].load_state_dict(m.bn.state_dict())
    keys = set(ref[0].state_dict()) | {f"bn.{k}" for k in ref[1].state_dict()}
    assert set(m.state_dict()) == keys, f"ConvBNAct state_dict keys {sorted(m.state_dict())}, " \
        f"expected the conv's plus bn.*: {sorted(keys)}"
    m, ref = m.to(DEVICE), ref.to(DEVICE)
    x = _x(3, 9)
    _same(_eval(m, x), _eval(ref, x), "ConvBNAct(padding_mode='reflect'), eval")
    with torch.no_grad():
        got, expect = m.train()(x), ref.train()(x)
    _same(got, expect, "ConvBNAct(padding_mode='reflect'), train mode")
    for name, b in ref[1].named_buffers():
        torch.testing.assert_close(getattr(m.bn, name), b, msg=lambda s: f"bn.{name}: {s}")


def test_bf16_input_to_fp32_model(path):
    ref, model = _pair()
    x = _x()
    for name, m, inp in (("model", model, x), ("layer1", model.layer1, _x(64, 8))):
        try:
            out = _eval(m, inp.bfloat16())
        except Exception as e:
            assert re.search(r"(?i)type|bfloat16", str(e)), \
                f"{name}: the error does not name the dtype: {e!r}"
        else:
            pytest.fail(f"float32 {name} took a bfloat16 input without autocast and returned "
                        f"{out.dtype}; torchvision raises")
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got, expect = _eval(model, x), _eval(ref, x)
    assert got.dtype == expect.dtype, f"autocast output dtype {got.dtype}, torchvision's " \
        f"{expect.dtype}"
    _same(got, expect, "output under autocast(bfloat16)", REL_TOL[torch.bfloat16])


# --- 8. FrozenBatchNorm2d backbone (torchvision's detection recipe)

def test_frozen_bn_backbone_runs_fused(path):
    ref = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10, norm_layer=FrozenBatchNorm2d)
    ref.load_state_dict(_tv(Bottleneck).state_dict())  # random BN statistics and affine
    ref = ref.eval().to(DEVICE)
    x = _x()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = fastres.convert(copy.deepcopy(ref))
        got, convs = _counted_eval(model, x)
    _same(got, _eval(ref, x), "FrozenBatchNorm2d backbone: output")
    assert not _fastres_warnings(caught), f"fastres warned on a FrozenBatchNorm2d backbone: " \
        f"{_fastres_warnings(caught)}"
    if path == "triton":
        assert convs == 0, f"{convs} aten convolutions ran in the FrozenBatchNorm2d backbone " \
            "in eval under no_grad: it did not run fused"


# --- 9. convert itself: structure, idempotence, DataParallel, state_dict round trip

def _check_torchvision_tree(model, ref, stem):
    """Same module names and types as torchvision's (the blocks: fastres subclasses or
    replacements; the ResNet itself: a subclass at most); the stem objects untouched."""
    names = ("conv1", "bn1", "relu")
    kept = [n for n, s in zip(names, stem) if getattr(model, n) is not s]
    assert not kept, f"convert replaced the stem's {kept} (must leave the stem alone)"
    got = {n: type(m) for n, m in model.named_modules()}
    expect = {n: type(m) for n, m in ref.named_modules()}
    assert set(got) == set(expect), f"module names differ: {set(got) ^ set(expect)}"
    differ = {n: (got[n].__name__, t.__name__) for n, t in expect.items()
              if got[n] is not t and t not in (BasicBlock, Bottleneck)
              and not (n == "" and issubclass(got[n], t))}
    assert not differ, f"module types changed by convert (fastres, torchvision): {differ}"
    blocks = [n for n, t in expect.items() if t in (BasicBlock, Bottleneck)
              and not got[n].__module__.startswith("fastres")]
    assert not blocks, f"blocks left unconverted: {blocks}"


@pytest.mark.parametrize("case", ["convert_twice", "data_parallel", "state_dict_round_trip"])
def test_convert_structure(path, case):
    ref = _tv()
    model = copy.deepcopy(ref)
    stem = (model.conv1, model.bn1, model.relu)
    run = model
    if case == "convert_twice":
        fastres.convert(model)
        types = [(n, type(m)) for n, m in model.named_modules()]
        assert fastres.convert(model) is model, "convert must return the model it was given"
        again = [(n, type(m)) for n, m in model.named_modules()]
        assert again == types, f"second convert changed {set(again) ^ set(types)}"
    elif case == "data_parallel":
        if torch.cuda.is_available():
            pytest.skip("nn.DataParallel of a CPU model needs a machine without CUDA")
        run = fastres.convert(nn.DataParallel(model))
        assert run.module is model, "convert replaced DataParallel's module"
    else:
        fastres.convert(model)
        keys, ref_keys = list(model.state_dict()), list(ref.state_dict())
        assert keys == ref_keys, f"state_dict keys differ from torchvision's: " \
            f"{sorted(set(keys) ^ set(ref_keys))} (or their order)"
        ref = _tv(seed=1)  # another torchvision checkpoint, in and back out
        model.load_state_dict(ref.state_dict(), strict=True)
        back = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10).eval()
        back.load_state_dict(model.state_dict(), strict=True)
        _same_named(back, ref, "params", "torchvision model loaded from the converted one")
        _same_named(back, ref, "buffers", "torchvision model loaded from the converted one")
    x = _x().cpu()
    got, convs = _counted_eval(run, x)
    _same(got, _eval(ref, x), f"{case}: eval output")
    if path == "triton" and DEVICE == "cpu":
        assert convs == 0, f"{case}: {convs} aten convolutions ran in a plain converted model " \
            "in eval under no_grad: it did not run fused"
    _check_torchvision_tree(model, ref, stem)
