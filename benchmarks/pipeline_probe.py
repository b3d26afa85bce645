"""What sm_90a makes of the conv main loops, without a GPU: compile the bf16 3x3 forward
(conv_fused_kernel, bn+relu epilogue) and dgrad of ResNet-50 layer2 conv2 (C = K = 128,
28x28, batch 256), the 7x7 stem (packed taps) and a split-K 4 forward (layer4 conv2 at
batch 8) with the configs the launchers pick, and print TTGIR/SASS facts:

    loops with a warp_group_dot, the pendings of warp_group_dot_wait inside them, the nums
    of async_wait, async_copy_global_to_local count; SASS HGMMA count,
    WARPGROUP.DEPBAR.LE gsb0 values, LDGSTS count; registers, spills, shared memory.

``python benchmarks/pipeline_probe.py [--dump DIR]`` (not under TRITON_INTERPRET).
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"


def ttgir_facts(ttgir):
    """Per scf.for loop (outermost first, with its nesting depth): the warp_group_dot ops, the
    pendings of warp_group_dot_wait, the nums of async_wait and the async_copy_global_to_local
    ops directly in its body (not in nested loops); and the totals of the kernel."""
    lines = ttgir.splitlines()
    loops, stack = [], []
    indent = lambda s: len(s) - len(s.lstrip())
    for line in lines:
        if re.search(r"= scf\.for\b", line) or re.match(r"\s*scf\.for\b", line):
            frame = dict(depth=len(stack), indent=indent(line), dots=0, pendings=[],
                         async_waits=[], copies=0)
            loops.append(frame)
            stack.append(frame)
            continue
        if stack and re.match(r"\s*}(\s|$)", line) and indent(line) == stack[-1]["indent"]:
            stack.pop()
            continue
        if stack:
            top = stack[-1]
            if re.search(r"ttng\.warp_group_dot\b(?!_)", line):
                top["dots"] += 1
            m = re.search(r"warp_group_dot_wait.*pendings = (\d+)", line)
            if m:
                top["pendings"].append(int(m.group(1)))
            m = re.search(r"async_wait.*num = (\d+)", line)
            if m:
                top["async_waits"].append(int(m.group(1)))
            top["copies"] += line.count("async_copy_global_to_local")
    return dict(
        loops=[{k: v for k, v in lp.items() if k != "indent"} for lp in loops],
        dot_loops=sum(1 for lp in loops if lp["dots"]),
        all_async_waits=[int(x) for x in re.findall(r"async_wait.*num = (\d+)", ttgir)],
        all_pendings=[int(x) for x in re.findall(r"warp_group_dot_wait.*pendings = (\d+)",
                                                 ttgir)],
        copies=ttgir.count("async_copy_global_to_local"),
        wgmma=len(re.findall(r"ttng\.warp_group_dot\b(?!_)", ttgir)),
    )


def sass_facts(cubin, tool):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    fld = lambda k: int(re.search(rf"\b{k}:(\d+)", usage).group(1))
    return dict(hgmma=len(re.findall(r"\bHGMMA\b", sass)),
                depbar=re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, (0x[0-9a-f]+)", sass),
                ldgsts=len(re.findall(r"\bLDGSTS\b", sass)),
                regs=fld("REG"), spill=fld("LOCAL") + fld("STACK")), sass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dump", default=None, help="write TTGIR and SASS here")
    args = ap.parse_args()
    import triton
    from triton.backends.compiler import GPUTarget
    from fastres import aot
    from fastres.kernels.configs import dgrad_config, pick_config
    n, h, c, k = 256, 28, 128, 128
    m = n * h * h
    ints = dict(H=h, W=h, C=c, P=h, Q=h, M=m, K=k, C_G=c, K_G=k, stride_h=1, stride_w=1,
                pad_h=1, pad_w=1, dil_h=1, dil_w=1)
    cfg = pick_config(m, k, c, 2, 9)
    fwd = aot._conv_fused_variant("bf16", None, True, 3, 1, 64, "bn+relu", "fp32", cfg)
    fwd.args.update(ints)
    dcfg = dgrad_config(m, c, k, 2)
    dgrad = aot.Variant("conv_dgrad_kernel", "bf16 3x3 " + aot._cfg_label(dcfg),
                        dict(dy_ptr="*bf16", w_ptr="*bf16", dx_ptr="*bf16", **ints),
                        dict(R=3, S=3, INT64=False, UPCAST=False, PRECISION=None,
                             **aot._blocks(dcfg)), dcfg.num_warps, dcfg.num_stages, True)
    # The 7x7 stem (C = 3: PACK, rows of 21 (s, c) pairs in one 32-wide chunk), 224 -> 112.
    scfg = pick_config(n * 112 * 112, 64, 21, 2, 7)
    stem = aot._conv_fused_variant("bf16", None, True, 7, 2, 3, "bn+relu", "fp32", scfg)
    stem.args.update(H=224, W=224, C=3, P=112, Q=112, M=n * 112 * 112, K=64, C_G=3, K_G=64,
                     stride_h=2, stride_w=2, pad_h=3, pad_w=3)
    # split-K 4 (layer4 conv2 at batch 8: C = K = 512, 7x7), the forward's other reduction.
    kcfg = pick_config(8 * 49, 512, 512, 2, 9)
    splitk = aot._conv_fused_variant("bf16", None, True, 3, 1, 64, "split-K bn+shortcut+relu",
                                     "fp32", kcfg)
    splitk.constexprs.update(HAS_SHORTCUT=False, SC_AFFINE=False)
    splitk.args.update(H=7, W=7, C=512, P=7, Q=7, M=8 * 49, K=512, C_G=512, K_G=512, C2=0)
    print(f"triton {triton.__version__}")
    for v in (fwd, dgrad, stem, splitk):
        fn, _ = aot._kernel(v.kernel)
        ck = triton.compile(aot.build_source(fn, v), target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=v.num_warps, num_stages=v.num_stages))
        t = ttgir_facts(ck.asm["ttgir"])
        s, sass = sass_facts(ck.asm["cubin"], aot.cuobjdump())
        print(f"{v.kernel} {v.label}")
        print(f"  TTGIR: loops with warp_group_dot: {t['dot_loops']}; loops "
              f"{t['loops']}; all warp_group_dot_wait pendings {t['all_pendings']}; "
              f"all async_wait nums {t['all_async_waits']}; async_copy_global_to_local "
              f"{t['copies']}; warp_group_dot ops {t['wgmma']}")
        print(f"  SASS: HGMMA {s['hgmma']}; WARPGROUP.DEPBAR.LE gsb0 {s['depbar']}; "
              f"LDGSTS {s['ldgsts']}; regs {s['regs']}; spill {s['spill']} B; "
              f"smem {ck.metadata.shared} B")
        if args.dump:
            os.makedirs(args.dump, exist_ok=True)
            base = os.path.join(args.dump, v.kernel + "-" + v.label.split()[1]
                                + ("-splitk" if "split-K" in v.label else ""))
            open(base + ".ttgir", "w").write(ck.asm["ttgir"])
            open(base + ".sass", "w").write(sass)


if __name__ == "__main__":
    main()
