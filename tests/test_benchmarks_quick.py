"""The benchmark harness does not rot: its quick mode runs (in a subprocess, without the
Triton interpreter), every row carries the keys users compare providers by, pytest-benchmark
records the harness' own timings, and ``benchmarks.report`` rebuilds a table and a PNG.
Plus fastres.flops: FlopCounterMode charges a fastres block what it charges torchvision's.
"""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

import fastres
from fastres import flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW_KEYS = ("unit", "kind", "provider", "mode", "dtype", "batch", "flops", "bytes", "device",
            "note", "time_s", "tflops", "pct_peak", "floor_s", "time_over_floor",
            "images_per_s", "peak_tflops", "peak_gbps")


def _run(args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    log = _run(["-m", "pytest", "benchmarks", "--quick", "-q", "-p", "no:cacheprovider",
                "--bench-out", str(out), "--benchmark-json", str(out / "bench.json")], ROOT)
    with open(out / "bench.json") as f:
        return out, json.load(f)["benchmarks"], log


def test_quick_rows_have_extra_info(quick_run):
    _, rows, log = quick_run
    assert rows, "the quick run produced no benchmark rows"
    on_gpu = torch.cuda.is_available()
    providers = {r["extra_info"]["provider"] for r in rows}
    assert {"eager", "eager_channels_last", "fastres"} <= providers
    for r in rows:
        info = r["extra_info"]
        missing = [k for k in ROW_KEYS if k not in info]
        assert not missing, f"{r['name']}: extra_info lacks {missing}"
        assert info["flops"] > 0 and info["bytes"] > 0 and info["floor_s"] > 0
        # pytest-benchmark's statistics are the harness' own per-call seconds
        assert r["stats"]["median"] == pytest.approx(info["time_s"], rel=1e-6)
        if not on_gpu:
            assert info["device"] == "cpu" and info["note"] == "CPU, not a performance figure"
        other = [p for p in providers if p != "fastres"]
        if info["provider"] == "fastres":
            assert all(f"speedup_vs_{p}" in info for p in other), sorted(info)
        else:
            assert info["fastres_speedup"] > 0
    assert "fastres: FLOPs vs wall-clock" in log


def test_quick_flops_are_the_reference_convs(quick_run):
    _, rows, _ = quick_run
    by = {(r["extra_info"]["unit"], r["extra_info"]["mode"]): r["extra_info"] for r in rows}
    conv = by[("resnet50.layer3.0.conv1", "inference")]  # 1x1, 512 -> 256 at 28x28
    assert conv["flops"] == 2 * conv["batch"] * 28 * 28 * 256 * 512
    # a training step is forward + data gradient + weight gradient
    assert by[("resnet50.layer3.0.conv1", "train")]["flops"] == 3 * conv["flops"]


def test_report_rebuilds_table_and_plot(quick_run, tmp_path):
    out, rows, _ = quick_run
    _run(["-m", "benchmarks.report", str(out / "bench.json"), "--out", str(tmp_path)], ROOT)
    table = (tmp_path / "table.md").read_text()
    assert "| unit | mode | dtype | batch |" in table
    assert "resnet50.layer3.0 " in table and "cifar_resnet20" in table
    with open(tmp_path / "plot.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert (out / "table.md").exists() and (out / "plot.png").exists()  # the run's own


@pytest.mark.parametrize("name", ["layer2.0", "layer2.1"])
def test_flop_counter_charges_fastres_what_it_charges_torchvision(name):
    """Projection and identity Bottlenecks, on the meta device (no kernel runs)."""
    with torch.device("meta"):
        ref = torchvision.models.resnet50().get_submodule(name).eval()
    fast = fastres.convert(copy.deepcopy(ref)).eval()
    hw = 56 if name == "layer2.0" else 28
    x = torch.empty(2, ref.conv1.in_channels, hw, hw, device="meta")
    counts = []
    for module in (ref, fast):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(x)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0


def test_minimal_bytes_of_a_fused_conv():
    """One conv + BN + ReLU: read x, the weights and BN's four vectors once, write y once."""
    conv = fastres.ConvBNAct(8, 16, 3, padding=1).eval().to("meta")
    x = torch.empty(2, 8, 10, 10, device="meta")
    expected = 4 * (x.numel() + 8 * 9 * 16 + 4 * 16 + 2 * 16 * 10 * 10)
    assert flops.minimal_bytes(conv, x) == expected
    assert flops.roofline_floor(1e12, 1e9, 1e12, 1e12) == 1.0


def test_flop_counter_charges_a_fastres_training_step_like_torchvision():
    """conv_train, conv_dgrad and conv_wgrad carry FLOP formulas: a fused training step
    (forward + backward) is charged exactly the reference block's FLOPs."""
    tv = torchvision.models.resnet
    torch.manual_seed(0)
    down = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 1, 2, bias=False), torch.nn.BatchNorm2d(32))
    ref = tv.BasicBlock(16, 32, 2, down).train()
    ours = fastres.BasicBlock(16, 32, 2, copy.deepcopy(down)).train()
    ours.load_state_dict(ref.state_dict())
    counts = []
    for block in (ref, ours):
        x = torch.randn(2, 16, 8, 8, requires_grad=True)
        with FlopCounterMode(display=False) as counter:
            block(x).sum().backward()
        counts.append(counter.get_total_flops())
    assert counts[0] > 0 and counts[1] == counts[0]


def _small_blocks():
    """A torchvision Bottleneck with a projection shortcut and random BN state: fp32
    reference, fp16 eager yardstick, fp16 fastres (converted). fp16, not bf16: Triton's
    interpreter rounds fp32 -> bf16 by truncation, a bias a GPU does not have."""
    from torchvision.models.resnet import Bottleneck
    from benchmarks import check_configs
    down = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 1, 2, bias=False),
                               torch.nn.BatchNorm2d(16))
    ref = Bottleneck(8, 4, stride=2, downsample=down)
    check_configs._randomize_bn(ref)
    ref = ref.to(memory_format=torch.channels_last)
    eager = copy.deepcopy(ref).to(torch.float16)
    fast = fastres.convert(copy.deepcopy(ref)).to(torch.float16)
    return ref, eager, fast


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_check_configs_passes_the_kernels_and_catches_a_wrong_result(train):
    """The GPU script's first stage (benchmarks.check_configs): the fused block agrees with
    the fp32 module as closely as eager bf16 does; a perturbed weight (what a miscompile
    looks like) fails, in the output and in every gradient it feeds."""
    from benchmarks import check_configs
    ref, eager, fast = _small_blocks()
    x = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(0))
    x = x.contiguous(memory_format=torch.channels_last)
    assert check_configs.compare("blk", fast, ref, eager, x, torch.float16, train) == []
    with torch.no_grad():  # not a pure scale, which train-mode BatchNorm would undo
        w = fast.conv2.weight
        w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)).to(w.dtype)
               * w.float().std().to(w.dtype))
    failures = check_configs.compare("blk", fast, ref, eager, x, torch.float16, train)
    assert failures and all(f.startswith(f"blk {'train' if train else 'eval'}") for f in failures)
    assert any(" y: " in f for f in failures)
