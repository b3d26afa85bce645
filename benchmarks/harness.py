"""The benchmark harness: which cases run (settings), and one row per case.

A case is (unit, provider, mode, dtype, batch). Its row is the per-call seconds (the samples
handed to pytest-benchmark) and ``extra_info``:

    unit kind provider mode dtype batch input_shape device note
    flops       FlopCounterMode on the reference (inference: forward; train: fwd + bwd)
    bytes       fastres.flops.minimal_bytes of the fastres module (x3 for train)
    time_s      median seconds per call          tflops      flops / time_s / 1e12
    peak_tflops, peak_gbps                       measured in this run, this dtype
    pct_peak    tflops / peak_tflops * 100       floor_s     roofline floor (fastres.flops)
    time_over_floor                              images_per_s  batch / time_s
    speedup_vs_<provider>   on fastres rows: that provider's time / fastres' time
    fastres_speedup         on other rows: this row's time / fastres' time

Settings come from pytest options or environment variables (``FASTRES_BENCH_QUICK=1`` is
``--quick``); defaults depend on the device: on a GPU every unit, provider, mode and dtype;
on the CPU small shapes (batch 1, ImageNet networks at 64x64), float32, the eager and
fastres paths only, one thread (``cpu_paths``), every row labelled ``CPU_NOTE``. Quick mode: five small units (two
convs, two blocks, CIFAR ResNet-20), one batch size, no compiled providers, 3 samples.
"""
import contextlib
import copy
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import providers, timing, units
from fastres import flops as fflops

QUICK_UNITS = ("resnet50.layer3.0.conv1", "resnet50.layer3.0.conv2", "resnet50.layer3.0",
               "resnet50.layer3.1", "cifar_resnet20")
GPU_BATCHES = {"conv": (256,), "block": (256,), "network": (1, 32, 256)}
CPU_BATCHES = {"conv": (1,), "block": (1,), "network": (1,)}
CPU_IMAGENET_HW = 64
PEAK_MATMUL_N = {"cuda": 8192, "cpu": 1024}
PEAK_COPY_BYTES = {"cuda": 2 << 30, "cpu": 64 << 20}
ROUNDS = {"cuda": 25, "cpu": 5}
QUICK_ROUNDS = 3


def _csv(value: Optional[str]) -> Optional[Tuple[str, ...]]:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else None


@contextlib.contextmanager
def cpu_paths():
    """Time what a CPU user runs: CPU tensors on the plain-PyTorch path, even when the Triton
    interpreter is on in this process (another conftest of the same session set
    TRITON_INTERPRET before triton was imported), and on one thread (figures a shared machine
    does not scramble; CPU figures are never performance figures). Both are restored
    afterwards."""
    import fastres.ops
    uses_triton, threads = fastres.ops.uses_triton, torch.get_num_threads()
    fastres.ops.uses_triton = lambda t: t.is_cuda
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        fastres.ops.uses_triton = uses_triton


@dataclass(frozen=True)
class Case:
    unit: units.Unit
    provider: str
    mode: str
    dtype: str
    batch: int

    @property
    def id(self) -> str:
        return f"{self.unit.name}-{self.provider}-{self.mode}-{self.dtype}-b{self.batch}"


@dataclass
class Settings:
    dev: torch.device
    quick: bool = False
    units: Optional[Tuple[str, ...]] = None      # group names or unit names
    providers: Optional[Tuple[str, ...]] = None
    modes: Optional[Tuple[str, ...]] = None
    dtypes: Optional[Tuple[str, ...]] = None
    batches: Optional[Tuple[int, ...]] = None
    rounds: Optional[int] = None
    deadline_s: Optional[float] = None           # skip cases that start later than this

    @classmethod
    def from_config(cls, config) -> "Settings":
        """From pytest options (``--quick --units --providers --modes --dtypes --batches
        --rounds --bench-deadline``), each falling back to ``FASTRES_BENCH_<NAME>``."""
        def get(name: str) -> Optional[str]:
            value = config.getoption(f"--{name}", default=None) if config else None
            return value if value not in (None, False) else \
                os.environ.get(f"FASTRES_BENCH_{name.upper().replace('-', '_')}")
        batches, rounds, deadline = _csv(get("batches")), get("rounds"), get("bench-deadline")
        return cls(dev=timing.device(), quick=str(get("quick")) in ("1", "True", "true"),
                   units=_csv(get("units")), providers=_csv(get("providers")),
                   modes=_csv(get("modes")), dtypes=_csv(get("dtypes")),
                   batches=tuple(int(b) for b in batches) if batches else None,
                   rounds=int(rounds) if rounds else None,
                   deadline_s=float(deadline) if deadline else None)

    @property
    def on_gpu(self) -> bool:
        return self.dev.type == "cuda"

    def cases(self) -> List[Case]:
        groups = units.all_units(224 if self.on_gpu else CPU_IMAGENET_HW)
        pool = [u for g in groups.values() for u in g]
        wanted = QUICK_UNITS if self.quick and not self.units else self.units
        if wanted:
            unknown = set(wanted) - set(groups) - {u.name for u in pool}
            if unknown:
                raise ValueError(f"unknown units {sorted(unknown)}; use group names "
                                 f"{sorted(groups)} or unit names such as {pool[0].name}")
            pool = [u for u in pool if u.name in wanted
                    or any(u in groups.get(w, ()) for w in wanted)]
        provs = self.providers or (providers.PROVIDERS if self.on_gpu and not self.quick
                                   else providers.CPU_PROVIDERS)
        modes = self.modes or providers.MODES
        dtypes = self.dtypes or (("bf16",) if self.on_gpu and self.quick
                                 else ("bf16", "fp16", "fp32") if self.on_gpu else ("fp32",))
        for name, chosen, allowed in (("providers", provs, providers.PROVIDERS),
                                      ("modes", modes, providers.MODES),
                                      ("dtypes", dtypes, tuple(timing.DTYPES))):
            if set(chosen) - set(allowed):
                raise ValueError(f"unknown {name} {sorted(set(chosen) - set(allowed))}; "
                                 f"expected some of {allowed}")
        out = []
        for unit in dict.fromkeys(pool):
            batches = self.batches or (GPU_BATCHES if self.on_gpu else CPU_BATCHES)[unit.kind]
            if self.quick and not self.batches:
                batches = batches[:1]
            out += [Case(unit, p, m, d, b) for m in modes for d in dtypes for b in batches
                    for p in provs]
        return out


@dataclass
class Harness:
    settings: Settings
    started: float = field(default_factory=time.perf_counter)
    groups: Dict[tuple, Dict[str, dict]] = field(default_factory=dict)
    _work: Dict[tuple, Tuple[int, int]] = field(default_factory=dict)
    _pristine: Dict[str, torch.nn.Module] = field(default_factory=dict)  # the last unit's
    samples: Dict[int, List[float]] = field(default_factory=dict)  # id(row) -> samples
    total: int = 0
    done: int = 0
    outputs: Optional[Tuple[str, Optional[str]]] = None  # table.md, plot.png once written

    @property
    def dev(self) -> torch.device:
        return self.settings.dev

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def past_deadline(self) -> bool:
        return self.settings.deadline_s is not None and self.elapsed() > self.settings.deadline_s

    def peaks(self, dtype: torch.dtype) -> Tuple[float, float]:
        """(FLOP/s, bytes/s) measured on this device; fp32 matmuls use TF32 exactly when
        cuDNN convs do, so the fp32 peak is the one fp32 convs can reach."""
        kind = self.dev.type
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
        try:
            f = timing.peak_flops(self.dev, dtype, PEAK_MATMUL_N[kind])
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        return f, timing.peak_bandwidth(self.dev, PEAK_COPY_BYTES[kind])

    def reference(self, unit: units.Unit) -> torch.nn.Module:
        """A fresh reference module of ``unit``: a copy of one built once per unit (building
        and initializing a ResNet-152 costs more than copying it)."""
        if unit.name not in self._pristine:
            self._pristine = {unit.name: unit.build()}
        return copy.deepcopy(self._pristine[unit.name])

    def _shape(self, case: Case) -> Tuple[int, ...]:
        return (case.batch, *case.unit.input_chw)

    def work(self, case: Case) -> Tuple[int, int]:
        """(FLOPs, minimal bytes) of the case, counted on the meta device (once per unit,
        mode, dtype and batch: every provider is charged the same work)."""
        key = (case.unit.name, case.mode, case.dtype, case.batch)
        if key not in self._work:
            self._work[key] = self._count_work(case)
        return self._work[key]

    def _count_work(self, case: Case) -> Tuple[int, int]:
        ref = self.reference(case.unit)
        fast = case.unit.fastres_version(ref).to("meta", timing.DTYPES[case.dtype]).eval()
        ref = ref.to("meta").train(case.mode == "train")
        x = torch.empty(self._shape(case), device="meta")
        with FlopCounterMode(display=False) as counter:
            if case.mode == "train":
                y = ref(x.requires_grad_(case.unit.kind != "network"))
                y.backward(torch.empty_like(y))
            else:
                with torch.no_grad():
                    ref(x)
        nbytes = fflops.minimal_bytes(fast, x.detach().to(timing.DTYPES[case.dtype]))
        factor = fflops.TRAIN_BYTES_FACTOR if case.mode == "train" else 1
        return counter.get_total_flops(), nbytes * factor

    def run(self, case: Case, info: dict) -> List[float]:
        """Build, warm up and time ``case``; fill ``info`` (pytest-benchmark's extra_info,
        kept by reference so later rows can add speedups) and return the samples (seconds
        per call)."""
        if self.settings.on_gpu:
            return self._run(case, info)
        with cpu_paths():
            return self._run(case, info)

    def _run(self, case: Case, info: dict) -> List[float]:
        dtype = timing.DTYPES[case.dtype]
        flops, nbytes = self.work(case)
        peak_f, peak_bw = self.peaks(dtype)
        shape = self._shape(case)
        count = timing.buffer_count(torch.Size(shape).numel() * dtype.itemsize, self.dev)
        inputs = [providers.prepare_input(case.provider, case.unit, case.mode,
                                          torch.randn(shape, device=self.dev, dtype=dtype))
                  for _ in range(count)]
        run = providers.build(case.provider, case.unit, self.reference(case.unit), case.mode,
                              dtype, self.dev, inputs[0])
        rounds = self.settings.rounds or (QUICK_ROUNDS if self.settings.quick
                                          else ROUNDS[self.dev.type])
        samples = timing.measure(run, inputs, self.dev, rounds,
                                 warmup=2 if self.settings.on_gpu else 1)
        t = statistics.median(samples)
        floor = fflops.roofline_floor(flops, nbytes, peak_f, peak_bw)
        info.update(unit=case.unit.name, kind=case.unit.kind, provider=case.provider,
                    mode=case.mode, dtype=case.dtype, batch=case.batch,
                    input_shape=list(shape), device=timing.device_name(self.dev),
                    note="" if self.settings.on_gpu else timing.CPU_NOTE,
                    flops=flops, bytes=nbytes, time_s=t, tflops=flops / t / 1e12,
                    peak_tflops=peak_f / 1e12, peak_gbps=peak_bw / 1e9,
                    pct_peak=100 * flops / t / peak_f, floor_s=floor, time_over_floor=t / floor,
                    images_per_s=case.batch / t)
        self._record(case, info)
        return samples

    def _record(self, case: Case, info: dict) -> None:
        """Add ``info`` to its group and refresh the fastres speedups of the group (rows are
        dicts pytest-benchmark holds by reference, so later rows update earlier ones)."""
        group = self.groups.setdefault((case.unit.name, case.mode, case.dtype, case.batch), {})
        group[case.provider] = info
        fast = group.get("fastres")
        if fast is None:
            return
        for provider, other in group.items():
            if provider != "fastres":
                fast[f"speedup_vs_{provider}"] = other["time_s"] / fast["time_s"]
                other["fastres_speedup"] = other["time_s"] / fast["time_s"]

    def rows(self) -> List[dict]:
        return [info for group in self.groups.values() for info in group.values()]
