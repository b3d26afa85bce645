"""The static performance report (``python -m fastres.aot --network``, ``fastres.report``):
it captures the real launches of a network's convs, compiles them for sm_90a and checks
P1-P7 and the FLOP ratio. The ResNet-50 bf16 batch-256 report runs whole here (about 20 s on
2 cores), gated by ``benchmarks/aot_known.json``: a launch that newly breaks a property, a
new compile failure or a changed launch set fails the suite on either Triton."""
import json
import os
import subprocess
import sys

import pytest

from fastres import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KNOWN = os.path.join(ROOT, "benchmarks", "aot_known.json")
META_FIELDS = {"kernel", "unit", "role", "dtype", "batch", "kernel_size", "stride", "num_warps",
               "num_stages", "shared_bytes", "registers", "spill_bytes", "block", "grid",
               "useful_flops", "executed_flops", "memory_bound", "floor_s", "predicted_s"}


@pytest.fixture(scope="module")
def resnet50_report(tmp_path_factory):
    dump = tmp_path_factory.mktemp("dump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fastres.aot", "--network", "resnet50",
                           "--batch", "256", "--dtype", "bf16", "--known", KNOWN,
                           "--dump", str(dump)], env=env, capture_output=True, text=True,
                          timeout=900)
    metas = []
    for folder in sorted(os.listdir(dump)):
        with open(os.path.join(dump, folder, "meta.json")) as f:
            metas.append((folder, json.load(f)))
    return proc, metas, dump


def test_resnet50_report_has_no_new_failures(resnet50_report):
    proc, _, _ = resnet50_report
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "0 new failures" in proc.stdout
    assert "inference forward: predicted" in proc.stdout
    assert "training step: predicted" in proc.stdout


def test_resnet50_report_captures_every_conv_in_every_role(resnet50_report):
    _, metas, dump = resnet50_report
    launches = {}
    for _, m in metas:
        if m["kernel"].startswith("conv_"):
            launches[m["role"]] = launches.get(m["role"], 0) + m["count"]
    # 53 convs; eval fuses the 4 projection shortcuts into their block's conv3; the stem
    # needs no dgrad (the image does not require grad).
    assert launches == {"forward": 49, "forward_train": 53, "dgrad": 52, "wgrad": 53}
    for folder, m in metas:
        assert META_FIELDS <= set(m), (folder, META_FIELDS - set(m))
        assert m["batch"] == 256 and m["dtype"] == "bf16"
        for name in ("kernel.ttgir", "kernel.ptx", "kernel.sass"):
            assert os.path.getsize(os.path.join(dump, folder, name)) > 0
        if m["role"] != "other":
            assert m["unit"].startswith("resnet50."), m["unit"]
            assert m["executed_flops"] >= m["useful_flops"] > 0
    units = {m["unit"] for _, m in metas if m["role"] == "forward"}
    assert "resnet50.layer2.0.conv3+downsample.0" in units and "resnet50.conv1" in units


def test_sass_main_loop_reads_the_innermost_mma_loop():
    sass = "\n".join([
        "        /*0000*/                   MOV R1, c[0x0][0x28] ;",
        "        /*0010*/                   LDGSTS.E.BYPASS.128 [R2], desc[UR4][R4.64] ;",
        "        /*0020*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ;",
        "        /*0030*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;",
        "        /*0040*/                   LDGSTS.E.BYPASS.64 [R2], desc[UR4][R4.64], P0 ;",
        "        /*0050*/               @P4 BRA 0x20 ;",
        "        /*0060*/                   EXIT ;"])
    main = report.sass_main_loop(sass)
    assert main["found"] and main["instructions"] == 4 and main["mma"] == 1
    assert main["gsb_waits"] == [1] and main["ldgsts"] == ["LDGSTS.E.BYPASS.64"]
    assert report._ldgsts_bytes(main["ldgsts"][0]) == 8
    assert not report.sass_main_loop(sass.replace("HGMMA", "FFMA"))["found"]


def test_ttgir_loops_nesting_and_waits():
    ttgir = "\n".join([
        "  %0 = scf.for %i = %a to %b step %c iter_args() -> () {",
        "    %1 = scf.for %j = %a to %b step %c iter_args() -> () {",
        "      %2 = ttng.warp_group_dot %x, %y, %z",
        "      %3 = ttng.warp_group_dot_wait %2 {pendings = 1 : i32}",
        "      %4 = ttg.async_copy_global_to_local %p, %q",
        "    }",
        "    %5 = ttng.warp_group_dot_wait %1 {pendings = 0 : i32}",
        "  }"])
    outer, inner = report.ttgir_loops(ttgir)
    assert (outer["depth"], inner["depth"]) == (0, 1) and outer["children"] == [1]
    assert inner["dots"] == 1 and inner["pendings"] == [1] and inner["copies"] == 1
    assert outer["dots"] == 0 and outer["pendings"] == [0]


def test_ctas_per_sm_from_registers_and_shared_memory():
    assert report.ctas_per_sm(128, 8, 96 * 1024) == 2
    assert report.ctas_per_sm(129, 8, 0) == 1  # 136 x 256 threads > half the register file
    assert report.ctas_per_sm(64, 4, 128 * 1024) == 1  # shared memory bound
    assert report.ctas_per_sm(32, 4, 0) == 16  # warps bound (64 a SM)
