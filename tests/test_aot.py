"""The sm_90a ahead-of-time compile check (``python -m fastres.aot``) and the GPU configs it
checks (``fastres.kernels.configs``): heuristic, closed set, persistent autotune cache."""
import os
import re
import subprocess
import sys

import pytest

from fastres import aot
from fastres.kernels import configs

ROW = re.compile(r"^(\w+_kernel)\s+(.*?)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+(\d+)\s+(\d+)\s+(.*)$")
# ResNet-50 convs at batch 1 and 256 as (M, N, C, taps) and the stem; ResNeXt's 4-channel groups.
RESNET_GEMMS = [(n * pq, k, c, t) for n in (1, 256)
                for pq, k, c, t in ((112 * 112, 64, 3, 49), (56 * 56, 64, 64, 9),
                                    (56 * 56, 256, 64, 1), (28 * 28, 128, 128, 9),
                                    (14 * 14, 1024, 256, 1), (7 * 7, 512, 512, 9),
                                    (7 * 7, 2048, 512, 1), (56 * 56, 4, 4, 9))]


@pytest.fixture(scope="module")
def quick_rows():
    """The rows of ``python -m fastres.aot --quick``, compiled in a process without the
    interpreter (about a minute on 2 cores; Triton's cache makes reruns fast)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fastres.aot", "--quick"], env=env,
                          capture_output=True, text=True, timeout=600)
    rows = [m.groups() for m in map(ROW.match, proc.stdout.splitlines()) if m]
    return proc, [dict(kernel=k, label=l, regs=int(r), spill=int(s), smem=float(m),
                       hgmma=int(h), hmma=int(hm), status=st)
                  for k, l, r, s, m, h, hm, st in rows]


def test_quick_aot_compiles_every_kernel_without_spills(quick_rows):
    proc, rows = quick_rows
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {r["kernel"] for r in rows} == set(aot.KERNELS)
    for r in rows:
        assert r["status"].startswith("ok") and 0 < r["regs"] <= 255, r
        assert r["spill"] == 0 or r["label"].startswith("fp32/ieee"), r
        assert r["smem"] * 1024 <= aot.SM90_MAX_SHARED, r


def test_quick_aot_dots_take_the_tensor_cores_unless_ieee(quick_rows):
    _, rows = quick_rows
    dots = [r for r in rows if r["kernel"] in ("conv_fused_kernel", "conv_dgrad_kernel",
                                               "conv_wgrad_kernel")]
    assert {r["label"].split()[0] for r in dots} == {"bf16", "fp32/tf32", "fp32/ieee"}
    for r in dots:
        ieee = r["label"].startswith("fp32/ieee")
        assert (r["hgmma"] + r["hmma"] > 0) == (not ieee), r
        if r["kernel"] != "conv_wgrad_kernel":
            assert (r["hgmma"] > 0) == (not ieee), r  # wgmma, not the older mma.sync
    gemm = [r for r in dots if " 1x1 gemm " in r["label"]]
    assert gemm, "the 1x1 stride-1 plain-GEMM path is compiled"


def _row(**kw):
    variant = aot.Variant("k", "label", {}, {}, 4, 3, kw.pop("tensor_cores", True),
                          kw.pop("wgmma", True))
    return aot.Row(variant, **kw)


def test_problems_flag_spills_smem_and_missing_tensor_cores():
    assert aot.problems(_row(regs=128, hgmma=4, smem=1024)) == []
    assert aot.problems(_row(regs=255, spill=16, hgmma=4)) == ["spills 16 B"]
    assert aot.problems(_row(regs=255, spill=16, tensor_cores=None)) == ["spills 16 B"]
    assert "no HGMMA" in aot.problems(_row(regs=64))[0]
    assert "no HGMMA" in aot.problems(_row(regs=64, hmma=8))[0]  # wgmma required
    assert aot.problems(_row(regs=64, hmma=8, wgmma=False)) == []
    assert aot.notes(_row(regs=64, hmma=8, wgmma=False)) == ["mma.sync (HMMA), not wgmma"]
    assert "no HGMMA/HMMA" in aot.problems(_row(regs=64, wgmma=False))[0]
    assert aot.problems(_row(regs=64, tensor_cores=False)) == []  # ieee: no tensor cores
    assert aot.problems(_row(regs=64, spill=8, tensor_cores=False)) == []  # FMA dot
    assert aot.notes(_row(regs=64, spill=8, tensor_cores=False)) == ["FMA dot: spills 8 B"]
    assert aot.problems(_row(regs=64, tensor_cores=None)) == []  # no dot
    assert "shared memory" in aot.problems(_row(hgmma=1, smem=aot.SM90_MAX_SHARED + 1))[0]
    assert aot.problems(_row(error="PTXASError: boom")) == ["PTXASError: boom"]


@pytest.fixture
def gpu_configs(monkeypatch, tmp_path):
    """``pick_config`` as on a GPU, with an empty tune cache in tmp_path; the configs picked
    here are forgotten afterwards (``configs.reset``)."""
    monkeypatch.setattr(configs, "INTERPRET", False)
    monkeypatch.setenv(configs.CACHE_ENV, str(tmp_path / "configs.json"))
    monkeypatch.setattr(configs, "_device", lambda: "cuda:90")
    configs.reset()
    yield tmp_path / "configs.json"
    configs.reset()


@pytest.mark.parametrize("shortcut", [False, True], ids=["plain", "shortcut"])
@pytest.mark.parametrize("elem_bytes", [2, 4])
def test_gpu_configs_come_from_the_compiled_set(gpu_configs, elem_bytes, shortcut):
    closed = set(configs.all_configs(elem_bytes, shortcut))
    for m, n, c, taps in RESNET_GEMMS:
        cfg = configs.pick_config(m, n, c, elem_bytes, taps, shortcut=shortcut)
        assert cfg in closed, (m, n, c, cfg)
        assert min(cfg.BLOCK_M, cfg.BLOCK_N, cfg.BLOCK_K) >= 16  # tensor-core dot shapes
        stage = (cfg.BLOCK_M + cfg.BLOCK_N) * cfg.BLOCK_K * elem_bytes
        assert cfg.num_stages * stage <= configs.SMEM_BUDGET
        for cand in configs.tune_candidates(m, n, c, elem_bytes, shortcut, taps):
            assert cand in closed
    if shortcut:  # the second accumulator: narrower tiles (configs' module docstring)
        assert max(cfg.BLOCK_N for cfg in closed) == configs.SHORTCUT_N_CAP


def test_aot_compiles_every_forward_config_and_bn_parameter_dtype():
    """Each dtype's ``all_configs`` (with and without a shortcut) is compiled for the unpacked
    cases; BN parameters in fp32 with every activation dtype, and in bf16/fp16 themselves."""
    compiled, bn_dtypes = {}, set()
    for v in aot.conv_fused_variants(quick=False):
        act = v.args["x_ptr"][1:]
        bn_dtypes.add((act, v.args["gamma_ptr"][1:]))
        if not v.constexprs["PACK"] and not v.constexprs["JOINT"]:  # JOINT: BLOCK_K halved
            compiled.setdefault((act, v.constexprs["HAS_SHORTCUT"]), set()).add(
                configs.ConvConfig(v.constexprs["BLOCK_M"], v.constexprs["BLOCK_N"],
                                   v.constexprs["BLOCK_K"], v.constexprs["GROUP_M"],
                                   v.num_warps, v.num_stages))
    for (dt, shortcut), cfgs in compiled.items():
        assert cfgs == set(configs.all_configs(aot.ELEM_BYTES[dt], shortcut)), (dt, shortcut)
    assert len(compiled) == 6
    assert bn_dtypes == {("bf16", "fp32"), ("fp16", "fp32"), ("fp32", "fp32"),
                         ("bf16", "bf16"), ("fp16", "fp16")}


@pytest.mark.parametrize("elem_bytes", [2, 4])
def test_gpu_backward_tiles_come_from_the_compiled_sets(gpu_configs, elem_bytes):
    dgrad, wgrad = configs.all_dgrad_configs(elem_bytes), configs.all_wgrad_blocks()
    for m, k, c, _ in RESNET_GEMMS:  # dgrad's N is the forward's input channels c
        cfg = configs.dgrad_config(m, c, k, elem_bytes)
        assert cfg in dgrad, (m, c, k, cfg)
        assert cfg.BLOCK_K * elem_bytes <= 128 and min(cfg.BLOCK_M, cfg.BLOCK_N) >= 16
        assert configs.wgrad_blocks(m, c, k) in wgrad, (m, c, k)
    assert max(cfg.BLOCK_K for cfg in dgrad) == 128 // elem_bytes  # 128-byte K rows


def test_aot_compiles_exactly_the_backward_tiles():
    dgrad = {}
    for v in aot.conv_dgrad_variants(quick=False):
        dgrad.setdefault(v.args["dy_ptr"][1:], set()).add(configs.ConvConfig(
            v.constexprs["BLOCK_M"], v.constexprs["BLOCK_N"], v.constexprs["BLOCK_K"],
            v.constexprs["GROUP_M"], v.num_warps, v.num_stages))
    assert set(dgrad) == {"bf16", "fp16", "fp32"}
    for dt, cfgs in dgrad.items():
        assert cfgs == set(configs.all_dgrad_configs(aot.ELEM_BYTES[dt])), dt
    wgrad = {configs.WgradBlocks(v.constexprs["BLOCK_C"], v.constexprs["BLOCK_N"],
                                 v.constexprs["BLOCK_M"], v.num_warps, v.num_stages)
             for v in aot.conv_wgrad_variants(quick=False)}
    assert wgrad == set(configs.all_wgrad_blocks())


def test_bucket_never_keys_on_the_exact_batch_size():
    keys = {configs.bucket_key(n * 56 * 56, 64, 64, 2, 9) for n in (168, 200, 256, 334)}
    assert len(keys) == 1
    assert configs.bucket_key(8 * 56 * 56, 64, 64, 2, 9) not in keys
    assert configs.bucket_key(256 * 56 * 56, 64, 64, 2, 1) not in keys  # taps count
    assert configs.bucket_key(256 * 56 * 56, 64, 64, 2, 9, shortcut=True) not in keys


def test_autotune_persists_the_fastest_and_pick_config_reads_it(gpu_configs, monkeypatch):
    import triton.testing
    m, n, c = 256 * 28 * 28, 128, 128
    cands = configs.tune_candidates(m, n, c, 2, taps=9)
    assert len(cands) > 1
    fastest = cands[-1]
    calls = []

    def fake_bench(fn, **kw):
        fn()
        return 1.0 if calls[-1] == fastest else 2.0
    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    launch = calls.append
    assert configs.pick_config(m, n, c, 2, 9, launch=launch) == configs.heuristic_config(
        m, n, c, 2, taps=9)  # FASTRES_AUTOTUNE unset: the heuristic, nothing timed
    assert calls == []
    monkeypatch.setenv(configs.AUTOTUNE_ENV, "1")
    assert configs.pick_config(m, n, c, 2, 9, launch=launch) == configs.heuristic_config(
        m, n, c, 2, taps=9)  # the settings are read once: the heuristic's pick stands
    configs.reset()  # the variable is read again
    assert configs.pick_config(m, n, c, 2, 9) == configs.heuristic_config(m, n, c, 2, taps=9)
    assert calls == []  # nothing to time without launch; the next launch tunes
    assert configs.pick_config(m, n, c, 2, 9, launch=launch) == fastest
    assert calls == cands and gpu_configs.exists()
    assert configs.pick_config(m, n, c, 2, 9, launch=launch) == fastest  # memoized
    assert calls == cands
    monkeypatch.delenv(configs.AUTOTUNE_ENV)
    configs.reset()  # as in a new process: read back from the file
    assert configs.pick_config(200 * 28 * 28, n, c, 2, 9) == fastest
    assert configs.pick_config(m, n, c, 2, 1) == configs.heuristic_config(m, n, c, 2)


def test_a_changed_cache_path_is_read_after_reset(gpu_configs, monkeypatch, tmp_path):
    """The tune cache path is read once (at the first pick) and again after ``reset()``."""
    import json
    m, n, c = 256 * 28 * 28, 128, 128
    heuristic = configs.heuristic_config(m, n, c, 2, taps=9)
    tuned = next(cfg for cfg in configs.tune_candidates(m, n, c, 2, taps=9) if cfg != heuristic)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"cuda:90": {configs.bucket_key(m, n, c, 2, 9): {
        k: getattr(tuned, k) for k in tuned.__dataclass_fields__}}}))
    assert configs.pick_config(m, n, c, 2, 9) == heuristic
    monkeypatch.setenv(configs.CACHE_ENV, str(other))
    assert configs.pick_config(m, n, c, 2, 9) == heuristic  # memoized
    configs.reset()
    assert configs.pick_config(m, n, c, 2, 9) == tuned


def test_config_memo_keys_on_what_the_config_depends_on(gpu_configs):
    """The memo's M bucket: a power of two (tuned buckets) split at SMALL_M (heuristic)."""
    below, at = configs.SMALL_M - 1, configs.SMALL_M
    assert configs.pick_config(below, 64, 64, 2, 9).BLOCK_M == 64
    assert configs.pick_config(at, 64, 64, 2, 9).BLOCK_M == 128
    assert configs.pick_config(below, 64, 64, 2, 9).BLOCK_M == 64
