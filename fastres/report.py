"""The static performance report: what sm_90a makes of every launch a network's convs make,
without a GPU. ``python -m fastres.aot --network resnet50 --batch 256 --dtype bf16
[--roles forward,...] [--dump DIR] [--known FILE]``.

1. **Capture.** A torchvision network is converted with ``fastres.convert``, cast, moved to the
   meta device and run (eval forward under ``no_grad``; a train-mode forward and backward)
   under a dispatch mode that sends each ``torch.ops.fastres`` op to its real host launcher:
   the launchers pick configs, split factors and grids as on an H200 (132 SMs,
   ``configs.CAPTURE_SMS``), and every Triton launch is recorded (kernel, grid, arguments,
   constexprs, warps, stages) instead of run. Each launch is attributed to its conv(s) (unit
   ``resnet50.layer2.0.conv2``; a fused projection shortcut adds ``+downsample.0``) by the
   conv's geometry, matched to a forward-hooked reference copy in execution order, and to a
   role: ``forward`` (eval), ``forward_train``, ``dgrad``, ``wgrad``, or ``other`` (BatchNorm
   statistics and apply, split sums).
2. **Compile.** Each distinct launch (kernel, specialization, constexprs, config) is compiled
   for sm_90a as the JIT would (``fastres.aot.build_source``) and its TTGIR, PTX and SASS read.
3. **Properties** (``check``), for launches with a dot:
   P1 the dot sits in one loop, not nested in another;
   P2 no full drain (``warp_group_dot_wait {pendings = 0}`` or ``async_wait {num = 0}``)
      inside a loop that encloses the dot's loop;
   P3 the dot loop's operands reach shared memory by async copies (``cp.async``: SASS LDGSTS);
   P4 the dot loop keeps a wgmma group in flight (a ``warp_group_dot_wait`` in it with
      pendings >= 1, and no SASS ``WARPGROUP.DEPBAR.LE gsb0, 0x0`` in the SASS main loop);
   P5 the main loop's LDGSTS are 16 bytes (8 for the packed stem);
   P6 CTAs per SM from registers and shared memory: >= 2 for a memory-bound launch;
   P7 issue slots a sub-partition spends on one main-loop iteration (SASS instructions of the
      loop body x warps per sub-partition) over the tensor-pipe cycles of the iteration's MMAs
      (4096 bf16/fp16 FLOPs a cycle per SM, 2048 tf32): at most 0.6 for BLOCK_N >= 128, 0.8 for
      BLOCK_N = 64 and for wgrad;
   FLOPs: executed (what the MMAs do, padding and masked taps included) over useful (the
      conv's 2*M*N*K): at most 1.1, the packed stem 1.6.
   wgrad launches are held to P7 and the FLOP ratio only; launches without a dot to nothing.
4. **Model** (``predict``; uncalibrated until a GPU run): tensor time = executed FLOPs at the
   dtype's peak (790 TFLOP/s bf16/fp16, 395 tf32) x max(1, P7 ratio) x the wave quantization
   (programs over 132 SMs x CTAs per SM, rounded up); memory time = the launch's tensors'
   bytes once at 4.3 TB/s; predicted = max(tensor, memory) + LAUNCH_S + WAVE_S a wave
   (prologue fill and epilogue). The roofline floor: max(useful FLOPs / peak, bytes / 4.3 TB/s).
   Network totals: the eval forward's and the training step's predicted and floor times and
   images/s. Recorded in benchmarks/NOTES.md.

Exit status 1 when a launch breaks a property that applies to it and is not listed in the
``--known`` file (a JSON list of ``"role unit property"`` strings: the known gaps, so a CI
subset gates regressions), when the eval forward's predicted time is over 1.5x its floors'
sum, or when a launch fails to compile.
"""
import contextlib
import copy
import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Optional

import torch

H200_SMS = 132
PEAK_TC = {"bf16": 790e12, "fp16": 790e12, "fp32": 395e12}  # dense tensor FLOP/s (tf32 fp32)
FLOPS_PER_SM_CYCLE = {"bf16": 4096, "fp16": 4096, "fp32": 2048}
BANDWIDTH = 4.3e12  # bytes/s
LAUNCH_S = 2e-6  # a launch's fixed cost
WAVE_S = 1e-6  # pipeline fill + epilogue, once per wave of CTAs
SM_REGS, SM_SMEM, SMEM_RESERVED, SM_MAX_CTAS, SM_MAX_WARPS = 65536, 233472, 1024, 32, 64
FORWARD_BUDGET = 1.5  # the eval forward's predicted time over its floors' sum, at most
ROLES = ("forward", "forward_train", "dgrad", "wgrad", "other")
NETWORKS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
            "wide_resnet50_2")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TL_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
            torch.int64: "i64", torch.int32: "i32", torch.uint8: "u8", torch.bool: "i1"}
WGRAD_KERNELS = ("conv_wgrad_kernel", "conv_wgrad_rows_kernel")  # held to P7 and FLOPs only
CONV_KERNELS = ("conv_fused_kernel", "conv_dgrad_kernel") + WGRAD_KERNELS


@dataclasses.dataclass
class Launch:
    kernel: str
    role: str
    units: list
    grid: tuple
    args: dict  # runtime argument name -> tensor or scalar
    constexprs: dict
    num_warps: int
    num_stages: int
    count: int = 1
    useful: int = 0  # the op's conv FLOPs (2*M*N*K), for conv kernels
    phase: str = "inference"  # the pass that launched it: "inference" or "training"

    def programs(self) -> int:
        return math.prod(self.grid)


# ---------------------------------------------------------------------------------------------
# 1. Capture

@contextlib.contextmanager
def _recording(sink: list, context: dict):
    """Every fastres Triton kernel records its launches in ``sink`` instead of running."""
    from fastres.aot import discover
    from fastres.kernels import configs
    kernels = {name: fn for name, (fn, _) in discover().items()}

    def recorder(name, fn):
        def run(*args, grid, warmup, **kwargs):
            bound = dict(zip(fn.arg_names, args))
            bound.update(kwargs)
            warps, stages = bound.pop("num_warps", 4), bound.pop("num_stages", 3)
            names = {p.name for p in fn.params if p.is_constexpr}
            grid = tuple(grid(bound) if callable(grid) else grid)
            grid = grid + (1,) * (3 - len(grid))
            role = context["role"] if name in CONV_KERNELS else "other"
            sink.append(Launch(name, role, list(context["units"]), grid,
                               {k: v for k, v in bound.items() if k not in names},
                               {k: v for k, v in bound.items() if k in names}, warps, stages,
                               useful=context.get("useful", 0) if name in CONV_KERNELS else 0,
                               phase=context.get("phase", "inference")))
        return run

    saved_sms, configs.CAPTURE_SMS = configs.CAPTURE_SMS, H200_SMS
    for name, fn in kernels.items():
        fn.run = recorder(name, fn)
    try:
        yield
    finally:
        configs.CAPTURE_SMS = saved_sms
        for fn in kernels.values():
            del fn.run


def _impls() -> dict:
    """op name -> the Python function its CPU/CUDA kernel runs (the host launcher)."""
    import fastres.ops as pkg
    import pkgutil
    import importlib
    out = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for name, obj in vars(module).items():
            fn = getattr(obj, "_init_fn", None)
            if fn is not None and getattr(obj, "_namespace", "fastres") == "fastres":
                out[name] = fn
    from fastres.ops.conv_bn_act import conv_bn_act
    out["conv_bn_act"] = conv_bn_act
    return out


def _key(x_shape, w_shape, stride, padding, dilation, groups):
    return (tuple(x_shape), tuple(w_shape), tuple(stride), tuple(padding), tuple(dilation),
            int(groups))


class _Driver(torch.utils._python_dispatch.TorchDispatchMode):
    """Sends every ``fastres::`` op on meta tensors to its host launcher (whose launches
    ``_recording`` captures), setting the role and unit the launches are filed under."""

    def __init__(self, units_of, context):
        super().__init__()
        self.impls = _impls()
        self.units_of = units_of  # geometry key -> conv names in forward order
        self.seen = {}  # (key, backward?) -> occurrences so far
        self.context = context

    def _unit(self, key, role):
        names = self.units_of.get(key, ["?"])
        i = self.seen.get((key, role), 0)
        self.seen[(key, role)] = i + 1
        return (names[::-1] if role in ("dgrad", "wgrad") else names)[i % len(names)]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ns, _, name = func._schema.name.partition("::")
        if ns != "fastres":
            return func(*args, **kwargs)
        a = args
        if name == "conv_bn_act":
            units = [self._unit(_key(a[0].shape, a[1].shape, *a[16:20]), "forward")]
            if a[9] is not None:
                s = a[23]
                sc = self._unit(_key(a[9].shape, a[10].shape, (s, s), (0, 0), (1, 1), 1),
                                "forward")
                units[0] += "+" + ".".join(sc.split(".")[-2:])
            role = "forward"
        elif name == "conv_train":
            role = "forward_train"
            units = [self._unit(_key(a[0].shape, a[1].shape, *a[2:6]), role)]
        elif name == "conv_dgrad":
            role = "dgrad"
            units = [self._unit(_key(a[2], a[1].shape, *a[3:7]), role)]
        elif name == "conv_wgrad":
            w = (a[1].shape[1], a[0].shape[1] // a[6], *a[2])
            role = "wgrad"
            units = [self._unit(_key(a[0].shape, w, *a[3:7]), role)]
        else:
            units, role = [name], "other"
        self.context.update(role=role, units=units, useful=_useful_flops(name, a))
        return self.impls[name](*args, **kwargs)


def _useful_flops(op: str, a) -> int:
    """The conv's own 2*M*N*K of a fastres op call (from its tensors' shapes, so padding a
    launcher adds, such as the stem's fourth channel, is not useful work); 0 for others."""
    from fastres.flops import conv_flops
    from fastres.ops.common import conv_out_shape
    from fastres.ops.conv_bn_act import _Geometry
    if op == "conv_bn_act":
        out = conv_out_shape(a[0], _Geometry(a[1], *a[16:19]))
        return conv_flops(a[0].shape, a[1].shape, out,
                          a[10].shape if a[9] is not None else None)
    if op == "conv_train":
        return conv_flops(a[0].shape, a[1].shape, conv_out_shape(a[0], _Geometry(a[1], *a[2:5])))
    if op == "conv_dgrad":
        return conv_flops(a[2], a[1].shape, a[0].shape)
    if op == "conv_wgrad":
        return conv_flops(a[0].shape, (a[1].shape[1], a[0].shape[1] // a[6], *a[2]), a[1].shape)
    return 0


def _reference_units(model, x, prefix):
    """geometry key -> names of the Conv2d modules with it, in forward order."""
    out = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            def hook(mod, inputs, _out, name=name):
                out.setdefault(_key(inputs[0].shape, mod.weight.shape, mod.stride, mod.padding,
                                    mod.dilation, mod.groups), []).append(f"{prefix}.{name}")
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return out


def build_network(name: str):
    import torchvision
    return getattr(torchvision.models, name)()


def capture(network: str, batch: int, dtype: str, roles=ROLES, size: int = 224) -> list:
    """Every Triton launch of ``network``'s eval forward and training step (those of
    ``roles``) at this batch and dtype, as ``Launch`` records (in order, not deduplicated)."""
    import fastres
    from fastres import ops
    model = build_network(network).to(DTYPES[dtype]).to("meta")
    model = model.to(memory_format=torch.channels_last)
    x = torch.empty((batch, 3, size, size), dtype=DTYPES[dtype], device="meta").contiguous(
        memory_format=torch.channels_last)
    reference = copy.deepcopy(model).eval()
    units_of = _reference_units(reference, x, network)
    fastres.convert(model)
    sink, context = [], dict(role="other", units=[])
    real = ops.uses_triton
    ops.uses_triton = lambda t: True
    try:
        with _recording(sink, context):
            if "forward" in roles:
                context["phase"] = "inference"
                model.eval()
                with torch.no_grad(), _Driver(units_of, context):
                    model(x)
            if set(roles) - {"forward"}:
                context["phase"] = "training"
                model.train()
                with _Driver(units_of, context):
                    y = model(x)
                    y.float().sum().backward()
    finally:
        ops.uses_triton = real
    return [launch for launch in sink if launch.role in roles]


# ---------------------------------------------------------------------------------------------
# 2. What each launch computes (FLOPs, bytes) and which ones are the same compile

def _tensor_args(launch):
    seen = {}
    for v in launch.args.values():
        if isinstance(v, torch.Tensor):
            seen[id(v)] = v
    return list(seen.values())


def launch_bytes(launch) -> int:
    """Each distinct tensor argument read or written once (placeholders for absent operands
    are the same tensors as present ones and count once)."""
    return sum(t.numel() * t.element_size() for t in _tensor_args(launch))


def _cdiv(a, b):
    return -(-a // b)


def flops(launch):
    """(useful, executed) FLOPs of a conv launch; (0, 0) for the others."""
    a, c = launch.args, launch.constexprs
    if launch.kernel == "conv_fused_kernel":
        r, s, split = c["R"], c["S"], c["SPLIT"]
        bm, bn, bk = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]
        groups = launch.grid[1]
        useful = 2 * a["M"] * a["K_G"] * groups * a["C_G"] * r * s
        if c["PACK"]:
            steps = r * max(_cdiv(_cdiv(s * a["C_G"], bk), split), 1)
        else:
            steps = r * s * max(_cdiv(_cdiv(a["C_G"], bk), split), 1)
        executed = launch.programs() * steps * 2 * bm * bn * bk
        if c["HAS_SHORTCUT"]:
            useful += 2 * a["M"] * a["K"] * a["C2"]
            bk2 = c["BLOCK_K2"] if c.get("JOINT") else bk  # JOINT: its own chunk, same loop
            executed += launch.programs() * _cdiv(a["C2"], bk2 * split) * 2 * bm * bn * bk2
        return useful, executed
    if launch.kernel == "conv_dgrad_kernel":
        r, s = c["R"], c["S"]
        bm, bn, bk = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]
        groups = launch.grid[1]
        from fastres.kernels.conv_bwd import dgrad_plan
        sh, sw = a["stride_h"], a["stride_w"]
        batch = a["M"] // (_cdiv(a["H"], sh) * _cdiv(a["W"], sw))
        useful = 2 * batch * a["P"] * a["Q"] * a["K_G"] * groups * a["C_G"] * r * s
        # grid axis 2: the stride phases; a phase's tiles run its landing taps x K chunks,
        # the grid's other tiles (past a smaller phase's pixels) and tapless phases none
        phases, _ = dgrad_plan(a["H"], a["W"], a["P"], a["Q"], r, s, (sh, sw),
                               (a["pad_h"], a["pad_w"]), (a["dil_h"], a["dil_w"]))
        steps = max(_cdiv(a["K_G"], bk), 1)
        tiles = sum(_cdiv(batch * hv * wv, bm) * taps for hv, wv, taps in phases)
        return useful, tiles * _cdiv(a["C_G"], bn) * groups * steps * 2 * bm * bn * bk
    if launch.kernel == "conv_wgrad_kernel":
        s = c["S"]
        r = a["RSC"] // (s * a["C_G"])
        bc, bn, bm = c["BLOCK_C"], c["BLOCK_N"], c["BLOCK_M"]
        tiles, groups, _ = launch.grid  # the splits share the CHUNKS chunks out
        useful = 2 * a["M"] * a["K_G"] * groups * a["C_G"] * r * s
        return useful, tiles * groups * a["CHUNKS"] * 2 * bc * bn * bm
    if launch.kernel == "conv_wgrad_rows_kernel":
        r, s = c["R"], c["S"]
        bc, bn, bm = c["BLOCK_C"], c["BLOCK_N"], c["BLOCK_M"]
        useful = 2 * a["M"] * a["K"] * a["C_G"] * r * s
        return useful, launch.grid[0] * a["CHUNKS"] * r * 2 * bc * bn * bm
    return 0, 0


def useful_and_executed(launch):
    """``flops(launch)`` with the useful FLOPs of the op that made the launch where known
    (the launch's own integers count a launcher's padding as useful)."""
    useful, executed = flops(launch)
    return (launch.useful or useful), executed


def dtype_of(launch) -> str:
    """The activations' dtype: the conv input's, else the first 2-byte float tensor's."""
    for name in ("x_ptr", "dy_ptr"):
        t = launch.args.get(name)
        if isinstance(t, torch.Tensor):
            return TL_NAMES[t.dtype]
    for t in _tensor_args(launch):
        if t.dtype in (torch.bfloat16, torch.float16):
            return TL_NAMES[t.dtype]
    return "fp32"


def _arg_spec(v):
    if isinstance(v, torch.Tensor):
        return f"*{TL_NAMES[v.dtype]}"
    if isinstance(v, bool):
        return int(v)
    return v


def variant_of(launch):
    """The ``fastres.aot.Variant`` the JIT would compile for this launch."""
    from fastres.aot import Variant
    return Variant(launch.kernel, launch.role, {k: _arg_spec(v) for k, v in launch.args.items()},
                   dict(launch.constexprs), launch.num_warps, launch.num_stages,
                   tensor_cores=launch.kernel in CONV_KERNELS or None)


def compile_key(launch, fn) -> tuple:
    """What the JIT specializes on: constexprs, warps, stages, argument types, ints == 1 and
    ints divisible by 16 (``do_not_specialize`` arguments excepted)."""
    spec = []
    for p in fn.params:
        if p.is_constexpr:
            continue
        v = launch.args[p.name]
        if isinstance(v, torch.Tensor):
            spec.append(TL_NAMES[v.dtype])
        elif isinstance(v, float):
            spec.append("f")
        elif p.do_not_specialize:
            spec.append("i")
        else:
            spec.append("1" if v == 1 else "16" if v % 16 == 0 else "i")
    return (launch.kernel, tuple(sorted(launch.constexprs.items(), key=lambda kv: kv[0])),
            launch.num_warps, launch.num_stages, tuple(spec))


def launch_key(launch) -> tuple:
    """Launches that are the same work: one row (identical layers of a stage)."""
    ints = tuple((k, v) for k, v in launch.args.items() if not isinstance(v, torch.Tensor))
    shapes = tuple(tuple(t.shape) for t in _tensor_args(launch))
    return (launch.kernel, launch.phase, launch.role, launch.grid, ints, shapes,
            tuple(sorted(launch.constexprs.items())), launch.num_warps, launch.num_stages)


def dedupe(launches):
    out = {}
    for launch in launches:
        k = launch_key(launch)
        if k in out:
            out[k].count += 1
            out[k].units.extend(u for u in launch.units if u not in out[k].units)
        else:
            out[k] = dataclasses.replace(launch, units=list(launch.units))
    return list(out.values())


# ---------------------------------------------------------------------------------------------
# 3. Compile and read

def ttgir_loops(ttgir: str) -> list:
    """Per scf.for loop, outermost first: depth, the ops directly in its body that matter
    (warp_group_dot / tt.dot count, warp_group_dot_wait pendings, async_wait nums,
    async_copy_global_to_local count) and the indices of the loops it encloses."""
    loops, stack = [], []
    indent = lambda s: len(s) - len(s.lstrip())
    for line in ttgir.splitlines():
        if re.search(r"\bscf\.for\b", line) and not re.match(r"\s*}", line):
            frame = dict(depth=len(stack), indent=indent(line), dots=0, pendings=[],
                         async_waits=[], copies=0, children=[])
            if stack:
                stack[-1]["children"].append(len(loops))
            loops.append(frame)
            stack.append(frame)
            continue
        if stack and re.match(r"\s*}", line) and indent(line) == stack[-1]["indent"]:
            stack.pop()
            continue
        if stack:
            top = stack[-1]
            top["dots"] += len(re.findall(r"ttng\.warp_group_dot\b(?!_)|\btt\.dot\b", line))
            m = re.search(r"warp_group_dot_wait.*pendings = (\d+)", line)
            if m:
                top["pendings"].append(int(m.group(1)))
            m = re.search(r"async_wait.*num = (\d+)", line)
            if m:
                top["async_waits"].append(int(m.group(1)))
            top["copies"] += line.count("async_copy_global_to_local")
    for lp in loops:
        lp.pop("indent")
    return loops


_SASS_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def sass_main_loop(sass: str) -> dict:
    """The innermost SASS loop (a backward ``BRA`` to an earlier address) holding tensor-core
    instructions: its instruction count, HGMMA/HMMA count, the gsb0 wait values and the
    LDGSTS opcodes in it."""
    instrs = []  # (address, opcode, operands)
    for line in sass.splitlines():
        m = _SASS_INSTR.search(line)
        if m:
            instrs.append((int(m.group(1), 16), m.group(3), m.group(4)))
    best = None
    for i, (addr, op, rest) in enumerate(instrs):
        t = re.match(r"\s*(0x[0-9a-f]+)", rest) if op == "BRA" else None
        if t and int(t.group(1), 16) <= addr:
            body = [ins for ins in instrs[:i + 1] if ins[0] >= int(t.group(1), 16)]
            mma = sum(1 for _, o, _ in body if o.startswith(("HGMMA", "HMMA")))
            if mma and (best is None or len(body) < len(best)):
                best = body
    if best is None:
        return dict(found=False, instructions=0, mma=0, gsb_waits=[], ldgsts=[])
    return dict(found=True, instructions=len(best),
                mma=sum(1 for _, o, _ in best if o.startswith(("HGMMA", "HMMA"))),
                gsb_waits=[int(x, 16) for _, o, r in best if o.startswith("WARPGROUP.DEPBAR")
                           for x in re.findall(r"gsb0,\s*(0x[0-9a-f]+)", r)],
                ldgsts=[o for _, o, _ in best if o.startswith("LDGSTS")])


def _ldgsts_bytes(op: str) -> int:
    m = re.search(r"\.(32|64|128)\b", op)
    return int(m.group(1)) // 8 if m else 4


def compile_launch(variant) -> dict:
    """Compile a launch's ``variant_of`` for sm_90a; return the artifacts and the facts read
    from them."""
    import triton
    from triton.backends.compiler import GPUTarget
    from fastres.aot import _kernel, build_source, read_cubin, usage_field
    fn, _ = _kernel(variant.kernel)
    start = time.perf_counter()
    try:
        ck = triton.compile(build_source(fn, variant), target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=variant.num_warps,
                                         num_stages=variant.num_stages))
    except Exception as e:  # a failed compile is a failing row
        return dict(error=f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}")
    usage, sass = read_cubin(ck.asm["cubin"])
    field = lambda key: usage_field(usage, key)
    return dict(error="", ttgir=ck.asm["ttgir"], ptx=ck.asm["ptx"], sass=sass,
                registers=field("REG"), spill_bytes=field("LOCAL") + field("STACK"),
                shared_bytes=ck.metadata.shared, loops=ttgir_loops(ck.asm["ttgir"]),
                main=sass_main_loop(sass), compile_s=time.perf_counter() - start)


def ctas_per_sm(registers, num_warps, shared) -> int:
    regs = -(-max(registers, 1) // 8) * 8 * 32 * num_warps
    by_regs = SM_REGS // regs
    by_smem = SM_SMEM // (shared + SMEM_RESERVED)
    return max(0, min(by_regs, by_smem, SM_MAX_CTAS, SM_MAX_WARPS // num_warps))


# ---------------------------------------------------------------------------------------------
# 4. Properties and the model

def block_of(launch) -> dict:
    return {k: v for k, v in launch.constexprs.items() if k.startswith("BLOCK")}


def mma_flops_per_iteration(launch) -> int:
    b = block_of(launch)
    if launch.kernel == "conv_wgrad_kernel":
        return 2 * b["BLOCK_C"] * b["BLOCK_N"] * b["BLOCK_M"]
    if launch.kernel == "conv_wgrad_rows_kernel":  # R dots an iteration, one a kernel row
        return launch.constexprs["R"] * 2 * b["BLOCK_C"] * b["BLOCK_N"] * b["BLOCK_M"]
    if launch.constexprs.get("JOINT"):  # the projection shortcut's dot in the same iteration
        return 2 * b["BLOCK_M"] * b["BLOCK_N"] * (b["BLOCK_K"] + b["BLOCK_K2"])
    return 2 * b["BLOCK_M"] * b["BLOCK_N"] * b["BLOCK_K"]


def analyse(launch, facts) -> dict:
    """meta.json's fields (everything but the units' list) and the property verdicts."""
    dt = dtype_of(launch)
    useful, executed = useful_and_executed(launch)
    nbytes = launch_bytes(launch)
    row = dict(kernel=launch.kernel, unit=launch.units[0] if launch.units else "",
               units=launch.units, count=launch.count, role=launch.role, phase=launch.phase,
               dtype=dt,
               grid=list(launch.grid), num_warps=launch.num_warps,
               num_stages=launch.num_stages, block=block_of(launch),
               useful_flops=useful, executed_flops=executed, bytes=nbytes)
    c, a = launch.constexprs, launch.args
    if launch.kernel in ("conv_fused_kernel", "conv_dgrad_kernel"):
        row["kernel_size"] = [c["R"], c["S"]]
        row["stride"] = [a["stride_h"], a["stride_w"]]
    elif launch.kernel == "conv_wgrad_kernel":
        row["kernel_size"] = [a["RSC"] // (c["S"] * a["C_G"]), c["S"]]
        row["stride"] = [a["stride_h"], a["stride_w"]]
    elif launch.kernel == "conv_wgrad_rows_kernel":
        row["kernel_size"] = [c["R"], c["S"]]
        row["stride"] = [a["stride_h"], a["stride_w"]]
    else:
        row["kernel_size"], row["stride"] = None, None
    row["batch"] = None
    if facts.get("error"):
        row.update(error=facts["error"], properties={"compile": facts["error"]},
                   failures=["compile"])
        return row
    row.update(registers=facts["registers"], spill_bytes=facts["spill_bytes"],
               shared_bytes=facts["shared_bytes"])
    ctas = ctas_per_sm(facts["registers"], launch.num_warps, facts["shared_bytes"])
    peak = PEAK_TC[dt] if launch.kernel in CONV_KERNELS else PEAK_TC["bf16"]
    memory_s = nbytes / BANDWIDTH
    floor_s = max(useful / peak, memory_s)
    memory_bound = nbytes / BANDWIDTH > useful / peak
    main = facts["main"]
    props = {}
    if launch.kernel in CONV_KERNELS:
        dot_loops = [i for i, lp in enumerate(facts["loops"]) if lp["dots"]]
        loops = facts["loops"]
        enclosing = [lp for lp in loops if any(ch in dot_loops for ch in lp["children"])]
        pack = bool(c.get("PACK")) or launch.kernel == "conv_wgrad_rows_kernel"
        issue = None
        if main["found"]:
            issue = main["instructions"] * (launch.num_warps / 4) / (
                mma_flops_per_iteration(launch) / FLOPS_PER_SM_CYCLE[dt])
        wide = block_of(launch).get("BLOCK_N", 0) >= 128 and launch.kernel not in WGRAD_KERNELS
        issue_cap = 0.6 if wide else 0.8
        ratio = executed / useful if useful else math.inf
        ratio_cap = 1.6 if pack else 1.1
        dot_loop = loops[dot_loops[0]] if dot_loops else None
        props = dict(
            P1=(len(dot_loops) == 1 and loops[dot_loops[0]]["depth"] == 0,
                f"{len(dot_loops)} dot loop(s), depth "
                f"{[loops[i]['depth'] for i in dot_loops]}"),
            P2=(not any(0 in lp["pendings"] or 0 in lp["async_waits"] for lp in enclosing),
                f"{len(enclosing)} enclosing loop(s)"),
            P3=(bool(dot_loop and dot_loop["copies"]) and bool(main["ldgsts"]),
                f"{dot_loop['copies'] if dot_loop else 0} async copies in the dot loop, "
                f"{len(main['ldgsts'])} LDGSTS in the SASS loop"),
            P4=(bool(dot_loop and any(p >= 1 for p in dot_loop["pendings"]))
                and 0 not in main["gsb_waits"],
                f"pendings {dot_loop['pendings'] if dot_loop else []}, gsb0 waits "
                f"{main['gsb_waits']}"),
            P5=(bool(main["ldgsts"]) and all(_ldgsts_bytes(o) >= (8 if pack else 16)
                                             for o in main["ldgsts"]),
                f"LDGSTS widths {sorted({_ldgsts_bytes(o) for o in main['ldgsts']})} B"),
            P6=(ctas >= 2 or not memory_bound, f"{ctas} CTA/SM"),
            P7=(issue is not None and issue <= issue_cap,
                f"{issue:.2f} (cap {issue_cap})" if issue is not None else "no SASS main loop"),
            FLOPS=(ratio <= ratio_cap, f"{ratio:.2f} (cap {ratio_cap})"),
        )
        if launch.kernel in WGRAD_KERNELS:
            props = {k: v for k, v in props.items() if k in ("P7", "FLOPS")}
        if facts["spill_bytes"]:
            props["spill"] = (False, f"{facts['spill_bytes']} B")
        row["issue_ratio"] = issue
    # the model
    waves = launch.programs() / (H200_SMS * max(ctas, 1))
    quant = math.ceil(waves) / waves if waves else 1.0
    tensor_s = executed / peak * max(1.0, row.get("issue_ratio") or 1.0) * quant
    predicted = max(tensor_s, memory_s) + LAUNCH_S + math.ceil(waves) * WAVE_S
    row.update(ctas_per_sm=ctas, memory_bound=memory_bound, floor_s=floor_s,
               predicted_s=predicted, waves=waves,
               properties={k: dict(ok=ok, detail=d) for k, (ok, d) in props.items()},
               failures=[k for k, (ok, _) in props.items() if not ok])
    return row


def _compile_all(launches, jobs):
    from fastres.aot import _kernel
    keys, distinct = [], {}
    for launch in launches:
        k = compile_key(launch, _kernel(launch.kernel)[0])
        keys.append(k)
        distinct.setdefault(k, launch)
    todo = list(distinct.items())
    if jobs > 1 and len(todo) > 1:
        import multiprocessing
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            results = pool.map(compile_launch, [variant_of(v) for _, v in todo], chunksize=1)
    else:
        results = [compile_launch(variant_of(v)) for _, v in todo]
    facts = dict(zip([k for k, _ in todo], results))
    return [facts[k] for k in keys], len(todo)


def _short(unit, network):
    return unit[len(network) + 1:] if unit.startswith(network + ".") else unit


def report(network="resnet50", batch=256, dtype="bf16", roles=ROLES, dump=None, known=(),
           jobs=None, out=sys.stdout, write_known=None):
    """Capture, compile, check, print; return (rows, summary, ok)."""
    start = time.perf_counter()
    launches = dedupe(capture(network, batch, dtype, roles))
    facts, compiled = _compile_all(launches, jobs or os.cpu_count() or 1)
    rows = [dict(analyse(launch, f), dtype=dtype) for launch, f in zip(launches, facts)]
    known = set(known)
    print(f"fastres static report: {network}, batch {batch}, {dtype}, sm_90a (H200 model: "
          f"{H200_SMS} SMs, {PEAK_TC[dtype] / 1e12:.0f} TFLOP/s, {BANDWIDTH / 1e12:.1f} TB/s); "
          f"{len(rows)} distinct launches, {compiled} compiles", file=out)
    head = (f"{'role':<13} {'unit':<34} {'n':>2} {'kernel':<18} {'block':<14} {'w':>1} {'s':>1} "
            f"{'reg':>3} {'smKB':>5} {'cta':>3} {'issue':>5} {'x/u':>4} {'mb':>2} "
            f"{'floor_us':>8} {'pred_us':>8}  P1-P7 FLOPS")
    print(head, file=out)
    new_failures = []
    for r in rows:
        b = r["block"]
        blk = "x".join(str(b[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_C")
                       if k in b)
        marks = []
        for name in ("P1", "P2", "P3", "P4", "P5", "P6", "P7", "FLOPS", "spill", "compile"):
            if name in r.get("properties", {}):
                p = r["properties"][name]
                ok = p["ok"] if isinstance(p, dict) else False
                tag = f"{r['role']} {r['unit']} {name}"
                if not ok:
                    if tag in known:
                        marks.append(f"{name}:known")
                    else:
                        marks.append(f"{name}:FAIL")
                        new_failures.append((tag, p["detail"] if isinstance(p, dict) else p))
        ratio = r["executed_flops"] / r["useful_flops"] if r["useful_flops"] else 0
        print(f"{r['role']:<13} {_short(r['unit'], network)[:34]:<34} {r['count']:>2} "
              f"{r['kernel'].replace('_kernel', ''):<18} {blk:<14} {r['num_warps']:>1} "
              f"{r['num_stages']:>1} {r.get('registers', 0):>3} "
              f"{r.get('shared_bytes', 0) / 1024:>5.0f} {r.get('ctas_per_sm', 0):>3} "
              f"{(r.get('issue_ratio') or 0):>5.2f} {ratio:>4.2f} "
              f"{'y' if r.get('memory_bound') else 'n':>2} {r.get('floor_s', 0) * 1e6:>8.1f} "
              f"{r.get('predicted_s', 0) * 1e6:>8.1f}  {' '.join(marks) or 'ok'}", file=out)
    summary = {}
    for label, phase in (("inference forward", "inference"), ("training step", "training")):
        sel = [r for r in rows if r["phase"] == phase]
        if not sel:
            continue
        pred = sum(r.get("predicted_s", 0) * r["count"] for r in sel)
        floor = sum(r.get("floor_s", 0) * r["count"] for r in sel)
        summary[label] = dict(predicted_s=pred, floor_s=floor, ratio=pred / floor,
                              predicted_images_s=batch / pred, floor_images_s=batch / floor)
        print(f"{label}: predicted {pred * 1e3:.2f} ms ({batch / pred:,.0f} img/s), roofline "
              f"floors {floor * 1e3:.2f} ms ({batch / floor:,.0f} img/s), ratio "
              f"{pred / floor:.2f} (prediction, uncalibrated: no GPU run yet)", file=out)
    budget_tag = f"network {network} forward-budget"
    budget_ok = summary.get("inference forward", {}).get("ratio", 0) <= FORWARD_BUDGET
    if not budget_ok:
        print(f"{'known' if budget_tag in known else 'FAIL'}: the inference forward's "
              f"prediction is over {FORWARD_BUDGET}x its floors' sum", file=out)
        budget_ok = budget_tag in known
    for tag, detail in new_failures:
        print(f"FAIL {tag}: {detail}", file=out)
    if write_known:  # the failing (role, unit, property) tags now, merged with the file's
        tags = {f"{r['role']} {r['unit']} {name}" for r in rows for name in r["failures"]}
        if summary.get("inference forward", {}).get("ratio", 0) > FORWARD_BUDGET:
            tags.add(budget_tag)
        if os.path.exists(write_known):
            with open(write_known) as f:
                tags |= set(json.load(f))
        with open(write_known, "w") as f:
            json.dump(sorted(tags), f, indent=0)
            f.write("\n")
    if dump:
        _dump(dump, launches, rows, facts, batch)
    print(f"{len(new_failures)} new failures, "
          f"{sum(len(r.get('failures', [])) for r in rows) - len(new_failures)} known; "
          f"{time.perf_counter() - start:.0f} s", file=out)
    return rows, summary, budget_ok and not new_failures


def _dump(root, launches, rows, facts, batch):
    os.makedirs(root, exist_ok=True)
    for i, (launch, row, f) in enumerate(zip(launches, rows, facts)):
        folder = os.path.join(root, f"{i:03d}-{row['role']}-{row['unit'].replace('+', '_')}")
        os.makedirs(folder, exist_ok=True)
        for name in ("ttgir", "ptx", "sass"):
            if f.get(name):
                with open(os.path.join(folder, f"kernel.{name}"), "w") as fh:
                    fh.write(f[name])
        with open(os.path.join(folder, "meta.json"), "w") as fh:
            json.dump(dict(row, batch=batch), fh, indent=1, default=str)


def main(args) -> int:
    roles = tuple(args.roles.split(",")) if args.roles else ROLES
    bad = set(roles) - set(ROLES)
    if bad:
        raise SystemExit(f"--roles: unknown {sorted(bad)}; choose from {', '.join(ROLES)}")
    if args.network not in NETWORKS:
        raise SystemExit(f"--network: {args.network!r} is not one of {', '.join(NETWORKS)}")
    if args.dtype not in DTYPES:
        raise SystemExit(f"--dtype: {args.dtype!r} is not one of {', '.join(DTYPES)}")
    known = ()
    if args.known:
        with open(args.known) as f:
            known = json.load(f)
    _, _, ok = report(args.network, args.batch, args.dtype, roles, args.dump, known, args.jobs,
                      write_known=args.write_known)
    return 0 if ok else 1
