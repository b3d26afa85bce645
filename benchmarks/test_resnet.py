"""One benchmark row per case (unit, provider, mode, dtype, batch); see benchmarks.harness.

The harness times the case itself (CUDA events on a GPU) and the samples are replayed into
pytest-benchmark through a clock that advances by one sample per call, so its table,
``--benchmark-json`` and ``--benchmark-compare`` show the measured seconds per call.
"""
import pytest

from benchmarks.timing import CPU_NOTE


def replay(benchmark, samples, clock_name: str) -> None:
    now = [0.0]

    def clock() -> float:
        return now[0]
    clock.__name__ = clock_name
    pending = iter(samples)

    def step() -> None:
        now[0] += next(pending)

    benchmark._timer = clock
    benchmark.pedantic(step, rounds=len(samples), iterations=1, warmup_rounds=0)


def progress(config, line: str) -> None:
    """A progress line on the terminal, through pytest's output capture."""
    tr = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if tr is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            tr.write_line(line)


def test_resnet(benchmark, case, bench_harness, request):
    h = bench_harness
    if h.past_deadline():
        pytest.skip(f"past the time budget of {h.settings.deadline_s:.0f} s")
    h.done += 1
    where = f"[{h.done}/{h.total} {h.elapsed():6.0f}s]"
    if case.provider.startswith("compile"):
        progress(request.config, f"{where} compiling {case.id} ...")
    benchmark.group = f"{case.unit.kind} {case.mode} {case.dtype}" + \
        ("" if h.settings.on_gpu else f" ({CPU_NOTE})")
    info = benchmark.extra_info
    samples = h.run(case, info)
    h.samples[id(info)] = samples
    replay(benchmark, samples, "cuda_events" if h.settings.on_gpu else "perf_counter")
    progress(request.config, f"{where} {case.id}: {info['time_s'] * 1e3:.3g} ms, "
             f"{info['tflops']:.3g} TFLOP/s, {info['time_over_floor']:.3g}x floor"
             + ("" if h.settings.on_gpu else f"  ({CPU_NOTE})"))
