"""Ahead-of-time compile of every kernel variant for sm_90a (H100/H200), on a machine without
a GPU: ``python -m fastres.aot [--quick] [-j JOBS] [--kernel NAME]``.

Each variant is compiled with ``triton.compile(ASTSource(fn, signature, constexprs, attrs),
target=GPUTarget("cuda", 90, 32))``, specialized the way the JIT specializes a real launch
(pointers 16-byte aligned, an integer equal to 1 a constant, a multiple of 16 marked
divisible). One row per variant:

    regs   registers per thread                       (cuobjdump -res-usage: REG)
    spill  bytes of local memory per thread            (cuobjdump -res-usage: LOCAL + STACK)
    smem   dynamic shared memory per block, KiB        (Triton metadata ``shared``)
    hgmma  Hopper tensor-core instructions in the SASS (cuobjdump -sass: HGMMA = wgmma)
    hmma   mma.sync tensor-core instructions (HMMA: Ampere-style, slower than wgmma on Hopper)

Exit status 1 when any variant spills, needs more shared memory than an sm_90 block may have,
misses the tensor cores although its dot should use them (bf16, fp16, fp32 with tf32: HGMMA,
or, where a variant allows it, the older HMMA, marked in the status), fails to compile, or
when a kernel of ``fastres.kernels`` has no entry in ``KERNELS`` below: the one list of what
gets checked. fp32 with ``input_precision="ieee"`` is the bit-accurate reference mode, not a
performance path: its dot runs on the FMA units (no tensor cores by design) and ptxas spills a
few bytes there erratically (8-48 B, for tile shapes that compile clean with another
epilogue), so its spills are reported ("FMA dot") but do not fail the run.
"""
import argparse
import importlib
import itertools
import multiprocessing
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

SM90_MAX_SHARED = 232448  # bytes of dynamic shared memory one sm_90 block may use (227 KiB)
# (dtype, dot input precision, tensor cores expected): precision is explicit, never a default.
DTYPES = (("bf16", None, True), ("fp16", None, True), ("fp32", "tf32", True),
          ("fp32", "ieee", False))
ELEM_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def _dtypes(quick):
    """--quick leaves fp16 out: its code is bf16's with another MMA input type."""
    return [d for d in DTYPES if not (quick and d[0] == "fp16")]


@dataclass(frozen=True)
class Variant:
    """One compilation: ``args`` maps each runtime argument to an example value (a pointer's
    Triton type such as ``"*bf16"``, an int, or a float); ``tensor_cores`` is True when the
    SASS must hold tensor-core instructions (HGMMA, or also HMMA when not ``wgmma``), False
    for a dot that legitimately has none, None without a dot."""
    kernel: str
    label: str
    args: dict
    constexprs: dict
    num_warps: int
    num_stages: int
    tensor_cores: Optional[bool]
    wgmma: bool = True


@dataclass
class Row:
    variant: Variant
    regs: int = 0
    spill: int = 0
    smem: int = 0
    hgmma: int = 0
    hmma: int = 0
    seconds: float = 0.0
    error: str = ""
    problems: list = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# What gets compiled. Integer examples are a ResNet-50 layer: the JIT specializes on them (== 1,
# % 16 == 0), so they decide which index arithmetic the compiler can simplify.

def _conv_ints(r, stride, c, k):
    h = 56
    p = (h + 2 * (r // 2) - r) // stride + 1
    return dict(H=h, W=h, C=c, P=p, Q=p, M=256 * p * p, K=k, C_G=c, K_G=k,
                stride_h=stride, stride_w=stride, pad_h=r // 2, pad_w=r // 2,
                dil_h=1, dil_w=1)


# Epilogues of conv_fused_kernel: name -> the flags it sets (the others are off). "bn" is the
# main conv's BatchNorm with affine parameters, "shortcut" the projection conv + its BN.
CONV_EPILOGUES = {
    "bn+relu": ("HAS_BN", "BN_AFFINE", "RELU"),
    "bn+res+relu": ("HAS_BN", "BN_AFFINE", "HAS_RES", "RELU"),
    "bn+shortcut+relu": ("HAS_BN", "BN_AFFINE", "HAS_SHORTCUT", "SC_AFFINE", "RELU"),
    "stats": ("WITH_STATS",),
    "int64 bn+res+relu": ("HAS_BN", "BN_AFFINE", "HAS_RES", "RELU", "INT64"),
    "split-K bn+shortcut+relu": ("HAS_BN", "BN_AFFINE", "HAS_SHORTCUT", "SC_AFFINE", "RELU"),
    "joint bn+shortcut+relu": ("HAS_BN", "BN_AFFINE", "HAS_SHORTCUT", "SC_AFFINE", "RELU"),
    "bias+bn(affine=False)+shortcut": ("HAS_BIAS", "HAS_BN", "HAS_SHORTCUT"),
}
EPILOGUE_FLAGS = ("HAS_BIAS", "HAS_BN", "BN_AFFINE", "HAS_SHORTCUT", "SC_AFFINE", "HAS_RES",
                  "RELU", "WITH_STATS", "INT64")
# (R = S, stride, C, epilogue): the cases of ResNets, each with every config. 1x1 stride 1
# takes the GEMM path; the 7x7 stem (C = 3) and ResNeXt's 4 channels a group pack taps (with
# the configs whose BLOCK_K is a packed row's chunk, the only ones they get). split-K: SPLIT=4,
# partial sums (two sets with the shortcut), no epilogue.
CONV_CASES = ((3, 1, 64, "bn+shortcut+relu"), (1, 1, 256, "bn+res+relu"),
              (3, 1, 64, "stats"), (3, 2, 64, "int64 bn+res+relu"), (7, 2, 3, "bn+relu"),
              (3, 1, 4, "bn+relu"), (3, 1, 64, "split-K bn+shortcut+relu"))
# Epilogue-only differences, compiled with the largest tile of each dtype: (R = S, stride, C,
# epilogue). The 1x1 GEMM with the shortcut is the Bottleneck's conv3 of a downsampling block.
CONV_EXTRAS = ((3, 1, 64, "bias+bn(affine=False)+shortcut"), (1, 1, 256, "bn+shortcut+relu"),
               (1, 1, 128, "joint bn+shortcut+relu"))
QUICK_CASES = 2


def _cfg_label(cfg):
    return (f"BM{cfg.BLOCK_M} BN{cfg.BLOCK_N} BK{cfg.BLOCK_K} G{cfg.GROUP_M} "
            f"w{cfg.num_warps} s{cfg.num_stages}")


def _blocks(cfg):
    return {k: v for k, v in cfg.kwargs.items() if k not in ("num_warps", "num_stages")}


def _dtype_label(dt, prec):
    return dt + (f"/{prec}" if prec else "")


def _tile_size(cfg):
    return cfg.BLOCK_M * cfg.BLOCK_N * cfg.BLOCK_K, cfg.num_warps


def _configs_for(dt, quick, r, c, epi):
    """The configs ``pick_config`` can return for a case (with a shortcut:
    ``all_configs(shortcut=True)``; packed taps: those whose BLOCK_K is the packed chunk)."""
    from fastres.kernels.configs import _pow2_at_least, all_configs
    from fastres.kernels.conv import packs_taps
    cfgs = all_configs(ELEM_BYTES[dt], shortcut="HAS_SHORTCUT" in CONV_EPILOGUES[epi])
    if packs_taps(c, r):  # a packed row of r*c (s, c) pairs takes the smallest K chunk >= it
        cfgs = [cfg for cfg in cfgs if cfg.BLOCK_K == _pow2_at_least(r * c, 16, 128)]
    if quick:  # the smallest and the largest tile
        cfgs = [min(cfgs, key=_tile_size), max(cfgs, key=_tile_size)]
    return cfgs


def _conv_fused_variant(dt, prec, tc, r, stride, c, epi, bn_dt, cfg):
    from fastres.kernels.conv import even_k, packs_taps
    k = 256
    joint = epi.startswith("joint")  # the Bottleneck conv3's shortcut in the main loop: its
    padded = packs_taps(c, r) and c % 4  # chunks BLOCK_K, the main conv's half of them  # the launcher pads the stem's 3 channels to 4,
    if padded:                           # and in space: the kernel sees no padding (PAD0)
        c += -c % 4
    ints = _conv_ints(r, stride, c, k)
    flags = {f: f in CONV_EPILOGUES[epi] for f in EPILOGUE_FLAGS}
    res, sc = flags["HAS_RES"], flags["HAS_SHORTCUT"]
    act, bnp = f"*{dt}", f"*{bn_dt}"
    args = dict(x_ptr=act, w_ptr=act, y_ptr=act, bias_ptr=act, gamma_ptr=bnp, beta_ptr=bnp,
                mean_ptr=bnp, var_ptr=bnp, eps=1e-5, x2_ptr=act, w2_ptr=act,
                gamma2_ptr=bnp, beta2_ptr=bnp, mean2_ptr=bnp, var2_ptr=bnp, eps2=1e-5,
                res_ptr=act, stats_ptr="*fp32", part_ptr="*fp32",
                RH=ints["P"] if res else 0, RW=ints["Q"] if res else 0,
                RC=k if res else 0, res_step=1, res_off=0,
                H2=2 * ints["P"] if sc else 0, W2=2 * ints["Q"] if sc else 0,
                C2=(2 * c if joint else k // 2) if sc else 0, stride2=2, **ints)
    gemm = r == 1 and stride == 1
    pack = packs_taps(c, r)
    split = 4 if epi.startswith("split-K") else 1
    constexprs = dict(R=r, S=r, **flags, UPCAST=False, PRECISION=prec, GEMM=gemm,
                      PACK=c if pack else 0, ROW=pack, SPLIT=split,
                      EVEN_K=even_k(c, cfg.BLOCK_K // 2 if joint else cfg.BLOCK_K, split),
                      EVEN_N=k % cfg.BLOCK_N == 0, PAD0=r == 1 or bool(padded), JOINT=joint,
                      **dict(_blocks(cfg), BLOCK_K2=cfg.BLOCK_K,
                             BLOCK_K=cfg.BLOCK_K // 2 if joint else cfg.BLOCK_K))
    bn_label = f" bn-params {bn_dt}" if bn_dt != "fp32" else ""
    return Variant("conv_fused_kernel",
                   f"{_dtype_label(dt, prec)} {r}x{r}{' gemm' if gemm else ''}"
                   f"{' pack' if pack else ''} {epi}{bn_label} {_cfg_label(cfg)}",
                   args, constexprs, cfg.num_warps, cfg.num_stages, tc)


def conv_fused_variants(quick):
    """Every case of ``CONV_CASES`` with each of its configs and BN parameters in fp32; for
    2-byte dtypes also the largest tile with BN parameters in the activation dtype (a model
    cast as a whole: the two kinds of BN parameters launchers pass; split-K's partial sums
    read none); ``CONV_EXTRAS`` with the largest tile."""
    cases = CONV_CASES[:QUICK_CASES] if quick else CONV_CASES
    for (dt, prec, tc), (r, stride, c, epi) in itertools.product(_dtypes(quick), cases):
        cfgs = _configs_for(dt, quick, r, c, epi)
        for cfg in cfgs:
            yield _conv_fused_variant(dt, prec, tc, r, stride, c, epi, "fp32", cfg)
        if dt != "fp32" and "HAS_BN" in CONV_EPILOGUES[epi] and "split-K" not in epi:
            yield _conv_fused_variant(dt, prec, tc, r, stride, c, epi, dt,
                                      max(cfgs, key=_tile_size))
    if not quick:
        for (dt, prec, tc), (r, stride, c, epi) in itertools.product(_dtypes(quick),
                                                                     CONV_EXTRAS):
            yield _conv_fused_variant(dt, prec, tc, r, stride, c, epi, "fp32",
                                      max(_configs_for(dt, quick, r, c, epi), key=_tile_size))


def conv_dgrad_variants(quick):
    """``configs.all_dgrad_configs`` of each dtype's size with a 3x3 tap mask (MASK=32, the
    per-row bitmask: stride 1, padding 1), channel counts that fill the tiles; the largest
    also with int64 indexing and with K and channel tails (EVEN_K, EVEN_N off). --quick: the
    largest, int32 indexing."""
    from fastres.kernels.configs import all_dgrad_configs
    r = 3  # R and S only bound loops: the 3x3 code stands for the others
    ints = dict(_conv_ints(r, 1, 64, 64), TSTEP_H=1, TSTEP_W=1, OSTEP_H=1, OSTEP_W=1)
    for dt, prec, tc in _dtypes(quick):
        cfgs = all_dgrad_configs(ELEM_BYTES[dt])
        largest = max(cfgs, key=_tile_size)
        cases = [(False, True, largest)] if quick else \
            [(False, True, c) for c in cfgs] + [(True, True, largest), (False, False, largest)]
        for int64, even, cfg in cases:
            constexprs = dict(R=r, S=r, MASK=32, EVEN_K=even, EVEN_N=even, INT64=int64,
                              UPCAST=False, PRECISION=prec, **_blocks(cfg))
            yield Variant("conv_dgrad_kernel", f"{_dtype_label(dt, prec)} {r}x{r} "
                          f"{'int64 ' if int64 else ''}{'' if even else 'tails '}"
                          f"{_cfg_label(cfg)}",
                          dict(dy_ptr=f"*{dt}", w_ptr=f"*{dt}", dx_ptr=f"*{dt}", **ints),
                          constexprs, cfg.num_warps, cfg.num_stages, tc)


def conv_wgrad_variants(quick):
    """``configs.all_wgrad_blocks`` of each dtype's size on the 3x3 path (box chunks, exact:
    only the taps' bounds masked); the largest tile also on the 1x1 plain-GEMM path, on the
    7x7 stride-2 packed path reading 16-byte runs of x padded to 4 channels (the stem), with
    boxes and tiles that do not fit the conv exactly (every mask on) and with int64 indexing
    (S only enters the tap index arithmetic). --quick: the largest tile on the 3x3 and
    packed paths, int32 indexing."""
    from fastres.kernels.configs import _wgrad_gpu_blocks, all_wgrad_blocks
    for dt, prec, tc in _dtypes(quick):
        tiles = all_wgrad_blocks(ELEM_BYTES[dt])
        largest = max(tiles, key=lambda b: b.BLOCK_C * b.BLOCK_N * b.BLOCK_M)
        stem = _wgrad_gpu_blocks(32, 64, ELEM_BYTES[dt])  # 7*3 + 4 padding + 4 lead-in
        # (S, path, exact, int64, tile)
        extras = [(1, "gemm", True, False, largest), (7, "pack", True, False, stem)]
        cases = [(3, "", True, False, largest), extras[1]] if quick else \
            [(3, "", True, False, b) for b in tiles] + extras + \
            [(3, "", False, False, largest), (3, "", True, True, largest)]
        for s, path, exact, int64, tile in cases:
            blocks = dict(tile.kwargs)
            warps, stages = blocks.pop("num_warps"), blocks.pop("num_stages")
            pack = 16 // ELEM_BYTES[dt] if path == "pack" else 0
            ints = _conv_ints(s, 2 if pack else 1, 3 if pack else blocks["BLOCK_C"],
                              blocks["BLOCK_N"])
            if pack:  # the stem: 224x224 images, x padded to 4 channels
                ints.update(H=224, W=224, C=4, P=112, Q=112, M=256 * 112 * 112, pad_h=3,
                            pad_w=3)
            constexprs = dict(S=s, INT64=int64, UPCAST=False, PRECISION=prec,
                              GEMM=path == "gemm", PACK=pack, EXACT=exact, **blocks)
            tile_label = " ".join(f"{n[6:]}{v}" for n, v in blocks.items())
            yield Variant(
                "conv_wgrad_kernel", f"{_dtype_label(dt, prec)} S{s} {path + ' ' if path else ''}"
                f"{'' if exact else 'masked '}{'int64 ' if int64 else ''}{tile_label} "
                f"w{warps} s{stages}",
                dict(x_ptr=f"*{dt}", dy_ptr=f"*{dt}", dw_ptr="*fp32", **ints,
                     CHUNKS=ints["M"] // blocks["BLOCK_M"], CHUNKS_PER_SPLIT=ints["M"] // 1024,
                     BOX_P=4, BOX_Q=8, RSC=s * s * ints["C_G"]), constexprs, warps, stages, tc,
                wgmma=False)  # BLOCK_N < 64 (few output channels a group) takes mma.sync


def conv_wgrad_rows_variants(quick):
    """The stem's wgrad on ``conv_wgrad_rows_kernel``: 7 kernel rows of 7 taps over x padded
    in space and to 4 channels (224x224 images: 230x230 padded), 64 output channels, the
    tile ``configs.wgrad_rows_blocks`` picks on a GPU, whole chunks; the bf16 one also with a
    pixel tail and int64 indexing. --quick: bf16, fp32/tf32 and fp32/ieee, whole chunks."""
    from fastres.kernels.configs import wgrad_rows_blocks
    m = 256 * 112 * 112
    for dt, prec, tc in _dtypes(quick):
        blocks = dict(wgrad_rows_blocks(m, 28, 64, 7, ELEM_BYTES[dt]).kwargs)
        warps, stages = blocks.pop("num_warps"), blocks.pop("num_stages")
        cases = [(True, False)] if quick or dt != "bf16" else \
            [(True, False), (False, False), (True, True)]
        for even, int64 in cases:
            tile_label = " ".join(f"{n[6:]}{v}" for n, v in blocks.items())
            yield Variant(
                "conv_wgrad_rows_kernel", f"{_dtype_label(dt, prec)} 7x7/2 rows "
                f"{'' if even else 'tail '}{'int64 ' if int64 else ''}{tile_label} "
                f"w{warps} s{stages}",
                dict(x_ptr=f"*{dt}", dy_ptr=f"*{dt}", dw_ptr="*fp32", HP=230, WP=230, P=112,
                     Q=112, M=m, K=64, C_G=3, stride_h=2, stride_w=2,
                     CHUNKS=m // blocks["BLOCK_M"], CHUNKS_PER_SPLIT=96),
                dict(R=7, S=7, CP=4, EVEN_M=even, EVEN_N=True, INT64=int64, UPCAST=False,
                     PRECISION=prec, **blocks), warps, stages, tc)


# Elementwise / reduction kernels without a dot: every flag on, every flag off, per dtype.
# fp32 pointers are named here; every other pointer has the activation dtype; block sizes are
# the module's constants of the same name (any constexpr with BLOCK in its name: BLOCK_M,
# SPLITK_BLOCK_M, ...) unless given in "consts".
_ELEMENTWISE = {
    "bn_merge_kernel": dict(fp32=("part_ptr", "out_ptr", "stats_ptr", "rmean_ptr", "rvar_ptr"),
                            ptrs=dict(nbt_ptr="*i64"), floats=("momentum", "eps")),
    "bn_act_kernel": dict(fp32=("stats_ptr", "stats2_ptr", "w_ptr", "b_ptr", "w2_ptr",
                                "b2_ptr")),
    "bn_bwd_reduce_kernel": dict(fp32=("stats_ptr", "stats2_ptr", "part_ptr")),
    "column_sum_kernel": dict(fp32=("part_ptr", "stats_ptr", "stats2_ptr", "out_ptr")),
    "bn_bwd_dx_kernel": dict(fp32=("stats_ptr", "w_ptr", "stats2_ptr", "w2_ptr", "sums_ptr")),
    "sum_splits_kernel": dict(fp32=("part_ptr", "out_ptr"), consts=dict(BLOCK=1024)),
    "pad_nhwc_kernel": dict(fp32=(), consts=dict(CP_BLOCK=4, INT64=False, BLOCK=256)),
    "splitk_epilogue_kernel": dict(fp32=("part_ptr", "gamma_ptr", "beta_ptr", "mean_ptr",
                                         "var_ptr", "gamma2_ptr", "beta2_ptr", "mean2_ptr",
                                         "var2_ptr"),
                                   floats=("eps", "eps2"), consts=dict(SPLIT=4)),
}


def _elementwise_variants(name):
    def variants(quick):
        spec = _ELEMENTWISE[name]
        fn, module = _kernel(name)
        consts = spec.get("consts", {})
        flags = [p for p in _constexpr_names(fn) if "BLOCK" not in p and p not in consts]
        blocks = dict({p: getattr(module, p) for p in _constexpr_names(fn)
                       if "BLOCK" in p and p not in consts}, **consts)
        dtypes = ("bf16",) if quick else ("bf16", "fp16", "fp32")
        for dt, on in itertools.product(dtypes, (True,) if quick else (True, False)):
            args = {}
            for a in _runtime_names(fn):
                if a in spec.get("ptrs", {}):
                    args[a] = spec["ptrs"][a]
                elif a.endswith("_ptr"):
                    args[a] = "*fp32" if a in spec["fp32"] else f"*{dt}"
                else:
                    args[a] = 0.1 if a in spec.get("floats", ()) else 50176
            yield Variant(name, f"{dt} flags={'on' if on else 'off'}", args,
                          dict({f: on for f in flags}, **blocks), 4, 3, None)
    return variants


KERNELS = {
    "conv_fused_kernel": conv_fused_variants,
    "conv_dgrad_kernel": conv_dgrad_variants,
    "conv_wgrad_kernel": conv_wgrad_variants,
    "conv_wgrad_rows_kernel": conv_wgrad_rows_variants,
    **{name: _elementwise_variants(name) for name in _ELEMENTWISE},
}


# ---------------------------------------------------------------------------------------------
# Discovery, compilation, inspection.

def discover():
    """Every ``@triton.jit`` entry point (name ending in ``_kernel``) of ``fastres.kernels``:
    name -> (JITFunction, module)."""
    import fastres.kernels as pkg
    from triton.runtime.jit import JITFunction
    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for name, obj in vars(module).items():
            if (name.endswith("_kernel") and isinstance(obj, JITFunction)
                    and obj.fn.__module__ == module.__name__):
                found[name] = (obj, module)
    return found


def _kernel(name):
    return discover()[name]


def _constexpr_names(fn):
    return [p.name for p in fn.params if p.is_constexpr]


def _runtime_names(fn):
    return [p.name for p in fn.params if not p.is_constexpr]


def build_source(fn, variant):
    """The ASTSource of one variant, specialized as the JIT would specialize the launch."""
    from triton.compiler import ASTSource
    missing = set(_constexpr_names(fn)) - set(variant.constexprs)
    unknown = set(variant.constexprs) - set(_constexpr_names(fn))
    absent = set(_runtime_names(fn)) - set(variant.args)
    if missing or unknown or absent:
        raise ValueError(f"{variant.kernel}: its aot spec is out of date: constexprs missing "
                         f"{sorted(missing)}, unknown {sorted(unknown)}; runtime args missing "
                         f"{sorted(absent)}")
    signature, constexprs, attrs = {}, dict(variant.constexprs), {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            continue
        value = variant.args[p.name]
        if isinstance(value, str):
            signature[p.name] = value
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[p.name] = "fp32"
        elif value == 1 and not p.do_not_specialize:
            signature[p.name] = "constexpr"
            constexprs[p.name] = 1
        else:
            signature[p.name] = "i32"
            if value % 16 == 0 and not p.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
    try:
        return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    except TypeError as e:
        import triton
        raise RuntimeError(f"triton {triton.__version__}: ASTSource(fn, signature, constexprs, "
                           f"attrs) is not this version's API (needs Triton >= 3.3): {e}")


def cuobjdump() -> str:
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    path = path if os.path.exists(path) else shutil.which("cuobjdump")
    if path is None:
        raise RuntimeError("cuobjdump not found (neither in triton/backends/nvidia/bin nor "
                           "on PATH)")
    return path


def read_cubin(cubin: bytes):
    """(``cuobjdump -res-usage`` text, ``cuobjdump -sass`` text) of a one-kernel cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        tool = cuobjdump()
        return tuple(subprocess.run([tool, flag, f.name], capture_output=True, text=True,
                                    check=True).stdout for flag in ("-res-usage", "-sass"))


def usage_field(usage: str, key: str) -> int:
    """A number of ``cuobjdump -res-usage`` (REG, LOCAL, STACK, SHARED)."""
    return int(re.search(rf"\b{key}:(\d+)", usage).group(1))


def inspect_cubin(cubin: bytes):
    """(registers, spill bytes, HGMMA count, HMMA count) of a one-kernel cubin."""
    usage, sass = read_cubin(cubin)
    return (usage_field(usage, "REG"), usage_field(usage, "LOCAL") + usage_field(usage, "STACK"),
            len(re.findall(r"\bHGMMA\b", sass)), len(re.findall(r"\bHMMA\b", sass)))


def compile_one(variant: Variant) -> Row:
    import triton
    from triton.backends.compiler import GPUTarget
    row = Row(variant)
    start = time.perf_counter()
    try:
        fn, _ = _kernel(variant.kernel)
        compiled = triton.compile(build_source(fn, variant), target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=variant.num_warps,
                                               num_stages=variant.num_stages))
        row.regs, row.spill, row.hgmma, row.hmma = inspect_cubin(compiled.asm["cubin"])
        row.smem = compiled.metadata.shared
    except Exception as e:  # reported as a failed row; the run goes on
        row.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"
    row.seconds = time.perf_counter() - start
    row.problems = problems(row)
    return row


def problems(row: Row) -> list:
    """What fails the run for this row (empty: it passes)."""
    if row.error:
        return [row.error]
    out = []
    if row.spill and row.variant.tensor_cores is not False:
        out.append(f"spills {row.spill} B")
    if row.smem > SM90_MAX_SHARED:
        out.append(f"shared memory {row.smem} B > {SM90_MAX_SHARED} B")
    if row.variant.tensor_cores and not row.hgmma:
        if row.variant.wgmma:
            out.append("no HGMMA: the dot misses wgmma")
        elif not row.hmma:
            out.append("no HGMMA/HMMA: the dot misses the tensor cores")
    return out


def notes(row: Row) -> list:
    """What is reported without failing."""
    out = []
    if row.spill and row.variant.tensor_cores is False:
        out.append(f"FMA dot: spills {row.spill} B")
    if row.variant.tensor_cores and row.hmma and not row.hgmma:
        out.append("mma.sync (HMMA), not wgmma")
    return out


def variants(quick=False, only=None):
    """(all variants, names of kernels without an entry in KERNELS)."""
    found = discover()
    unlisted = sorted(set(found) - set(KERNELS))
    out = []
    for name, make in KERNELS.items():
        if name in found and (only is None or name == only):
            out.extend(make(quick))
    return out, unlisted


def run(quick=False, jobs=None, only=None, out=sys.stdout):
    """Compile every variant (``jobs`` processes); print the table; return (rows, ok)."""
    todo, unlisted = variants(quick, only)
    start = time.perf_counter()
    jobs = jobs or os.cpu_count() or 1
    if jobs > 1:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            rows = pool.map(compile_one, todo, chunksize=1)
    else:
        rows = [compile_one(v) for v in todo]
    wall = time.perf_counter() - start
    print(f"{'kernel':<22} {'variant':<62} {'regs':>4} {'spill':>5} {'smemKiB':>7} "
          f"{'hgmma':>5} {'hmma':>5}  status", file=out)
    for r in rows:
        status = "; ".join(r.problems) or "; ".join(["ok"] + notes(r))
        print(f"{r.variant.kernel:<22} {r.variant.label:<62} {r.regs:>4} {r.spill:>5} "
              f"{r.smem / 1024:>7.1f} {r.hgmma:>5} {r.hmma:>5}  {status}", file=out)
    for name in unlisted:
        print(f"{name}: a kernel without an aot spec: add it to KERNELS in fastres/aot.py",
              file=out)
    bad = [r for r in rows if r.problems]
    print(f"{len(rows)} variants, {len(bad)} failing, {len(unlisted)} unlisted kernels; "
          f"{wall:.1f} s wall with {jobs} processes", file=out)
    return rows, not bad and not unlisted


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastres.aot", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a subset: smallest and largest tile per dtype, one per kernel")
    parser.add_argument("-j", "--jobs", type=int, default=None,
                        help="compile processes (default: all CPUs)")
    parser.add_argument("--kernel", default=None, help="only this kernel")
    net = parser.add_argument_group(
        "the static performance report (fastres.report): every launch of a network's convs")
    net.add_argument("--network", default=None, help="e.g. resnet50, resnet18, resnext50_32x4d")
    net.add_argument("--batch", type=int, default=256)
    net.add_argument("--dtype", default="bf16", help="bf16, fp16 or fp32 (tf32)")
    net.add_argument("--roles", default=None,
                     help="comma-separated subset of forward,forward_train,dgrad,wgrad,other")
    net.add_argument("--dump", default=None,
                     help="write kernel.ttgir/.ptx/.sass and meta.json per distinct launch here")
    net.add_argument("--known", default=None,
                     help="JSON list of known failures ('role unit property') not to fail on")
    net.add_argument("--write-known", default=None,
                     help="add this run's failures to this JSON file (the known gaps)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        # The interpreter replaces @triton.jit functions: compile in a fresh process without it.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        argv = sys.argv[1:] if argv is None else list(argv)
        sys.exit(subprocess.run([sys.executable, "-m", "fastres.aot", *argv], env=env).returncode)
    if args.network:
        from fastres import report
        sys.exit(report.main(args))
    _, ok = run(args.quick, args.jobs, args.kernel)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
